//go:build !linux

package peer

import "net"

// LookupUnix returns ErrUnsupported: peer credentials of unix sockets are
// read on Linux only.
func LookupUnix(*net.UnixConn) (Info, error) { return Info{}, ErrUnsupported }

// UnixUID returns ErrUnsupported: peer credentials of unix sockets are
// read on Linux only.
func UnixUID(*net.UnixConn) (int, error) { return -1, ErrUnsupported }
