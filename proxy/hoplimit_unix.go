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

// listenerHops reads the IP TTL and IPv6 unicast hop limit of ln's socket,
// which every connection it accepts starts with (the kernel copies the
// listener's options into the accepted socket): the value the listener
// set, hopsUnset when it set none (a listening socket has no route, and
// the kernel answers EOPNOTSUPP for an option not set), 0 when unknown.
func listenerHops(ln net.Listener) (v4, v6 int) {
	sc, ok := ln.(syscall.Conn)
	if !ok {
		return 0, 0
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return 0, 0
	}
	read := func(fd, level, opt int) int {
		v, err := syscall.GetsockoptInt(fd, level, opt)
		switch {
		case err == nil && v > 0:
			return v
		case errors.Is(err, syscall.EOPNOTSUPP):
			return hopsUnset
		}
		return 0
	}
	_ = rc.Control(func(fd uintptr) {
		v4 = read(int(fd), syscall.IPPROTO_IP, syscall.IP_TTL)
		v6 = read(int(fd), syscall.IPPROTO_IPV6, syscall.IPV6_UNICAST_HOPS)
	})
	return v4, v6
}

// initialHopser is a connection that knows the hop limit its socket was
// accepted with (limitConn; hopsUnset: the route's default, 0: unknown):
// setHopLimit need not read it.
type initialHopser interface {
	initialHops(v4 bool) int
}

// setHopLimit sets c's IP TTL / IPv6 unicast hop limit to hops and returns a
// function that restores the previous value. On error nothing was changed
// and restore is nil. The previous value is read from the socket unless c
// knows the value it was accepted with (initialHopser): nothing but a
// token response changes the option, and its restore puts that value back,
// so it is the value to restore even while an earlier restore is pending.
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
	if ih, ok := c.(initialHopser); ok {
		prev = ih.initialHops(level == syscall.IPPROTO_IP)
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		if prev == 0 {
			prev, serr = syscall.GetsockoptInt(int(fd), level, opt)
		}
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
