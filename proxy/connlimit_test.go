package proxy

import (
	"net"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
)

// TestLimitConnReleasesOnce: a connection closed twice gives its slot back
// once, so a listener of one slot still holds the next connection's slot
// and counts one open connection, not zero or minus one; and a connection
// carries what its listener learnt of its socket.
func TestLimitConnReleasesOnce(t *testing.T) {
	raw, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	m, err := newLimitMetrics(nil)
	if err != nil {
		t.Fatal(err)
	}
	ln := newLimitListener(raw, 1, m)
	t.Cleanup(func() { ln.Close() })
	first := dialAccept(t, ln)
	// A listener that set no TTL passes "unset" on: the value a token
	// response's restore puts back, without reading the socket.
	if lc := first.(*limitConn); lc.NetnsCookie() != ln.netns || ln.netns == 0 || lc.initialHops(true) != hopsUnset {
		t.Errorf("connection netns %d, TTL %d; want the listener's netns %d and TTL unset (%d)", lc.NetnsCookie(), lc.initialHops(true), ln.netns, hopsUnset)
	}
	first.Close()
	first.Close()
	second := dialAccept(t, ln)
	defer second.Close()
	if n := testutil.ToFloat64(m.openConns); n != 1 {
		t.Fatalf("open connections %v after a double close and a new accept, want 1", n)
	}
	// The one slot is the second connection's: a third waits.
	done := make(chan struct{})
	go func() {
		defer close(done)
		if c, err := ln.Accept(); err == nil {
			c.Close()
		}
	}()
	d, err := net.Dial("tcp4", raw.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	select {
	case <-done:
		t.Fatal("a second slot was free: the double close released twice")
	case <-time.After(100 * time.Millisecond):
	}
	second.Close()
	<-done
}

// limitListenerOf is Serve's limitListener of n slots on raw, with
// unregistered metrics, closed when the test ends.
func limitListenerOf(t *testing.T, raw net.Listener, n int) *limitListener {
	t.Helper()
	m, err := newLimitMetrics(nil)
	if err != nil {
		t.Fatal(err)
	}
	ln := newLimitListener(raw, n, m)
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
