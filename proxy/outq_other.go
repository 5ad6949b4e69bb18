//go:build !linux

package proxy

import "net"

// unacked cannot be told off Linux.
func unacked(net.Conn) (int, bool) { return 0, false }

// pendingInput cannot be told off Linux: assume there is some.
func pendingInput(net.Conn) bool { return true }
