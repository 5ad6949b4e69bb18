//go:build !(linux || darwin || freebsd || netbsd || openbsd || dragonfly)

package proxy

import (
	"errors"
	"net"
)

var errHopLimitUnsupported = errors.New("proxy: hop limit: not supported on this platform")

func getHopLimit(net.Conn) (int, error) { return 0, errHopLimitUnsupported }

func setHopLimit(net.Conn, int) (func() error, error) { return nil, errHopLimitUnsupported }

func listenerHops(net.Listener) (v4, v6 int) { return 0, 0 }
