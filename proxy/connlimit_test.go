package proxy

import (
	"net"
	"testing"
)

// TestLimitConnCarriesListenerFacts: a connection carries what its
// listener learnt of its socket once (the slots themselves are connlimit's,
// tested there).
func TestLimitConnCarriesListenerFacts(t *testing.T) {
	raw, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ln := limitListenerOf(t, raw, 1)
	c := dialAccept(t, ln)
	defer c.Close()
	// A listener that set no TTL passes "unset" on: the value a token
	// response's restore puts back, without reading the socket.
	if lc := c.(*limitConn); lc.NetnsCookie() != ln.netns || ln.netns == 0 || lc.initialHops(true) != hopsUnset {
		t.Errorf("connection netns %d, TTL %d; want the listener's netns %d and TTL unset (%d)", lc.NetnsCookie(), lc.initialHops(true), ln.netns, hopsUnset)
	}
}

// limitListenerOf is Serve's limitListener of n slots on raw, with
// unregistered metrics, closed when the test ends.
func limitListenerOf(t *testing.T, raw net.Listener, n int) *limitListener {
	t.Helper()
	m, err := newLimitMetrics(nil)
	if err != nil {
		t.Fatal(err)
	}
	ln := newLimitListener(raw, n, m, nil)
	t.Cleanup(func() { ln.Close() })
	return ln
}

// dialAccept connects to ln over TCP and returns the connection ln
// accepted; the client side is closed when the test ends.
func dialAccept(t *testing.T, ln net.Listener) net.Conn {
	t.Helper()
	d, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	c, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	return c
}
