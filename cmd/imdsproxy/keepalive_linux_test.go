package main

import (
	"context"
	"net"
	"testing"

	"golang.org/x/sys/unix"
)

// TestListenersNoKeepAlive: a connection accepted on a listener the daemon
// opened from its config has no TCP keep-alive (noKeepAlive: four fewer
// setsockopt calls per connection) and still has TCP_NODELAY.
func TestListenersNoKeepAlive(t *testing.T) {
	t.Setenv("LISTEN_FDS", "")
	cfg, err := parseConfig([]byte(baseYAML + "listen: 127.0.0.1:0\nadmin_listen: \"localhost:0\"\n"))
	if err != nil {
		t.Fatal(err)
	}
	ls, err := openListeners(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer ls.close()
	for _, ln := range append(ls.imds, ls.admin) {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		a, err := ln.Accept()
		if err != nil {
			t.Fatal(err)
		}
		defer a.Close()
		rc, err := a.(*net.TCPConn).SyscallConn()
		if err != nil {
			t.Fatal(err)
		}
		var ka, nd int
		var kerr, nerr error
		if err := rc.Control(func(fd uintptr) {
			ka, kerr = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_KEEPALIVE)
			nd, nerr = unix.GetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_NODELAY)
		}); err != nil || kerr != nil || nerr != nil {
			t.Fatal(err, kerr, nerr)
		}
		if ka != 0 {
			t.Errorf("%s: SO_KEEPALIVE = %d on an accepted connection, want 0", ln.Addr(), ka)
		}
		if nd == 0 {
			t.Errorf("%s: TCP_NODELAY off on an accepted connection", ln.Addr())
		}
	}
}
