//go:build linux || darwin || freebsd || netbsd || openbsd || dragonfly

package proxy

import (
	"errors"
	"net"
	"syscall"
)

// errHopLimitUnsupported is returned for connections that are not TCP sockets.
var errHopLimitUnsupported = errors.New("proxy: hop limit: not a TCP socket")

// hopLimitOption returns the socket level and option for c's address family.
func hopLimitOption(c net.Conn) (level, opt int, err error) {
	v4, ok := isIPv4Conn(c)
	if !ok {
		return 0, 0, errHopLimitUnsupported
	}
	if v4 {
		return syscall.IPPROTO_IP, syscall.IP_TTL, nil
	}
	return syscall.IPPROTO_IPV6, syscall.IPV6_UNICAST_HOPS, nil
}

// getHopLimit reads c's current IP TTL / IPv6 unicast hop limit.
func getHopLimit(c net.Conn) (int, error) {
	level, opt, err := hopLimitOption(c)
	if err != nil {
		return 0, err
	}
	sc, ok := c.(syscall.Conn)
	if !ok {
		return 0, errHopLimitUnsupported
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return 0, err
	}
	var v int
	var serr error
	if err := rc.Control(func(fd uintptr) {
		v, serr = syscall.GetsockoptInt(int(fd), level, opt)
	}); err != nil {
		return 0, err
	}
	return v, serr
}

// setHopLimit sets c's IP TTL / IPv6 unicast hop limit to hops and returns a
// function that restores the previous value. On error nothing was changed
// and restore is nil.
func setHopLimit(c net.Conn, hops int) (restore func() error, err error) {
	level, opt, err := hopLimitOption(c)
	if err != nil {
		return nil, err
	}
	sc, ok := c.(syscall.Conn)
	if !ok {
		return nil, errHopLimitUnsupported
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return nil, err
	}
	var prev int
	var serr error
	if err := rc.Control(func(fd uintptr) {
		prev, serr = syscall.GetsockoptInt(int(fd), level, opt)
		if serr == nil && prev != hops {
			serr = syscall.SetsockoptInt(int(fd), level, opt, hops)
		}
	}); err != nil {
		return nil, err
	}
	if serr != nil {
		return nil, serr
	}
	if prev == hops {
		return func() error { return nil }, nil
	}
	return func() error {
		var rerr error
		if err := rc.Control(func(fd uintptr) {
			rerr = syscall.SetsockoptInt(int(fd), level, opt, prev)
		}); err != nil {
			return err
		}
		return rerr
	}, nil
}
