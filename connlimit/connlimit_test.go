package connlimit

import (
	"bufio"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/http"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/imdsproxy/imdsproxy/connlimit/connlimittest"
)

// pair is one client connection and the Conn the Listener accepted for it.
type pair struct {
	client net.Conn
	server *Conn
}

func dial(t *testing.T, l *Listener) pair {
	t.Helper()
	c, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	s, err := l.AcceptConn()
	if err != nil {
		t.Fatal(err)
	}
	return pair{c, s}
}

func newTestListener(t *testing.T, n int) (*Listener, Metrics) {
	t.Helper()
	raw, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	m := Metrics{
		Open:    prometheus.NewGauge(prometheus.GaugeOpts{Name: "open"}),
		Reached: prometheus.NewCounter(prometheus.CounterOpts{Name: "reached"}),
		Evicted: prometheus.NewCounter(prometheus.CounterOpts{Name: "evicted"}),
	}
	l := NewListener(raw, n, m)
	t.Cleanup(func() { l.Close() })
	return l, m
}

// closedByServer reports whether the server side of p was closed (EOF).
func closedByServer(p pair) bool {
	_ = p.client.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err := p.client.Read(make([]byte, 1))
	return errors.Is(err, io.EOF)
}

// TestEvictionOrder: at the bound, a new connection takes the place of the
// connection idle the longest; one that has received bytes (its request is
// arriving) or is active is never taken, and with none idle Accept waits
// until a connection closes. The open gauge and the counters follow.
func TestEvictionOrder(t *testing.T) {
	l, m := newTestListener(t, 2)
	a, b := dial(t, l), dial(t, l)
	a.server.SetIdle(true)
	b.server.SetIdle(true)

	c := dial(t, l) // at the bound: a, idle the longest, gives way
	if !closedByServer(a) {
		t.Fatal("the connection idle the longest was not closed")
	}
	if got := testutil.ToFloat64(m.Evicted); got != 1 {
		t.Errorf("evicted %v, want 1", got)
	}
	if got := testutil.ToFloat64(m.Open); got != 2 {
		t.Errorf("open %v, want 2", got)
	}

	// b is idle but its next request has arrived; c is active.
	if _, err := b.client.Write([]byte("G")); err != nil {
		t.Fatal(err)
	}
	time.Sleep(50 * time.Millisecond) // let the byte reach b's receive queue
	c.server.SetIdle(false)
	got := make(chan *Conn, 1)
	go func() {
		if s, err := l.AcceptConn(); err == nil {
			got <- s
		}
	}()
	d, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	select {
	case <-got:
		t.Fatal("a connection with a request arriving, or an active one, was taken")
	case <-time.After(300 * time.Millisecond):
	}
	if got := testutil.ToFloat64(m.Evicted); got != 1 {
		t.Errorf("evicted %v, want still 1", got)
	}
	c.server.Close()
	select {
	case s := <-got:
		s.Close()
	case <-time.After(10 * time.Second):
		t.Fatal("Accept still waiting after a connection closed")
	}
	if got := testutil.ToFloat64(m.Reached); got != 2 {
		t.Errorf("reached %v, want 2", got)
	}
}

// TestCloseReleasesOnceAndUnblocks: a connection closed twice gives its
// slot back once; Close of the listener ends an Accept waiting for a slot.
func TestCloseReleasesOnceAndUnblocks(t *testing.T) {
	l, m := newTestListener(t, 1)
	a := dial(t, l)
	a.server.Close()
	a.server.Close()
	b := dial(t, l)
	if got := testutil.ToFloat64(m.Open); got != 1 {
		t.Fatalf("open %v after a double close and a new accept, want 1", got)
	}
	errc := make(chan error, 1)
	go func() { _, err := l.AcceptConn(); errc <- err }()
	d, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	select {
	case <-errc:
		t.Fatal("a second slot was free")
	case <-time.After(200 * time.Millisecond):
	}
	l.Close()
	select {
	case err := <-errc:
		if !errors.Is(err, net.ErrClosed) {
			t.Errorf("Accept after Close: %v, want net.ErrClosed", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Accept still waiting after Close")
	}
	b.server.Close()
}

// TestShareByOwner: below half the slots nobody is asked who they are;
// above, an owner holding a quarter of the slots (among the connections
// attributed) has its next connection closed at once, while another
// owner's is accepted; closing an attributed connection gives its place in
// the share back.
func TestShareByOwner(t *testing.T) {
	l, m := newTestListener(t, 8) // share 2, attributed above 4 taken
	m.OverShare = prometheus.NewCounter(prometheus.CounterOpts{Name: "over_share"})
	l.m = m
	owners := map[string]uint32{} // client address -> owner
	calls := 0
	l.ShareByOwner(func(c net.Conn) (uint32, bool) {
		calls++
		o, ok := owners[c.RemoteAddr().String()]
		return o, ok
	})
	const a, b = 1000, 1001
	dialAs := func(owner uint32) net.Conn {
		t.Helper()
		c, err := net.Dial("tcp", l.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		owners[c.LocalAddr().String()] = owner
		return c
	}
	accept := func(want net.Conn) *Conn {
		t.Helper()
		s, err := l.AcceptConn()
		if err != nil {
			t.Fatal(err)
		}
		if s.RemoteAddr().String() != want.LocalAddr().String() {
			t.Fatalf("accepted %s, want %s", s.RemoteAddr(), want.LocalAddr())
		}
		return s
	}
	var held []*Conn
	for range 5 {
		held = append(held, accept(dialAs(a)))
	}
	if calls != 0 {
		t.Errorf("owner asked %d times with at most half the slots taken", calls)
	}
	for range 2 {
		held = append(held, accept(dialAs(a)))
	}
	refused := dialAs(a)
	other := dialAs(b)
	accept(other)
	if !closedByServer(pair{client: refused}) {
		t.Error("the connection of an owner at its share was not closed")
	}
	if got := testutil.ToFloat64(m.OverShare); got != 1 {
		t.Errorf("over-share counter %v, want 1", got)
	}
	held[6].Close() // attributed to a
	held[0].Close() // not attributed
	accept(dialAs(a))
	if got := l.owners[a]; got != 2 {
		t.Errorf("owner a holds %d attributed, want 2", got)
	}
	if got := testutil.ToFloat64(m.OverShare); got != 1 {
		t.Errorf("over-share counter %v after a place was given back, want 1", got)
	}
}

// TestTrackIdleThroughTLS: a server that serves TLS on a Listener
// (http.Server.ServeTLS) hands its ConnState hook the *tls.Conn; TrackIdle
// records the idleness of the Conn beneath.
func TestTrackIdleThroughTLS(t *testing.T) {
	l, _ := newTestListener(t, 1)
	p := dial(t, l)
	tc := tls.Server(p.server, &tls.Config{})
	TrackIdle(tc, http.StateIdle)
	if p.server.idle.Load() <= 0 {
		t.Fatal("a TLS connection going idle was not recorded")
	}
	TrackIdle(tc, http.StateActive)
	if p.server.idle.Load() != 0 {
		t.Fatal("a TLS connection going active was not recorded")
	}
}

// TestWaitFresh: a connection is fresh from its accept to its first state
// after http.StateNew, whichever it is, or its close, and only once;
// WaitFresh waits for the fresh ones, at most its bound.
func TestWaitFresh(t *testing.T) {
	l, _ := newTestListener(t, 4)
	a, b, c := dial(t, l), dial(t, l), dial(t, l)
	if n := l.fresh.Load(); n != 3 {
		t.Fatalf("three accepted: %d fresh", n)
	}
	start := time.Now()
	l.WaitFresh(100 * time.Millisecond)
	if d := time.Since(start); d < 100*time.Millisecond {
		t.Errorf("WaitFresh with fresh connections returned after %v", d)
	}
	for _, st := range []http.ConnState{http.StateNew, http.StateActive, http.StateIdle, http.StateActive, http.StateClosed} {
		a.server.Track(st)
	}
	b.server.Track(http.StateClosed) // closed before any request
	b.server.Track(http.StateClosed)
	if n := l.fresh.Load(); n != 1 {
		t.Fatalf("after a's requests and b's close: %d fresh, want 1", n)
	}
	done := make(chan struct{})
	go func() { l.WaitFresh(time.Minute); close(done) }()
	c.server.Close() // closed without a state change
	c.server.Close()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("WaitFresh still waiting with no fresh connection")
	}
	if n := l.fresh.Load(); n != 0 {
		t.Errorf("%d fresh at the end, want 0", n)
	}
}

// TestShutdownLosesNoRequest: Shutdown answers the first request of a
// connection accepted before it (sent after it began) and of one the
// accept loop holds when it begins, and reports a drain in time.
func TestShutdownLosesNoRequest(t *testing.T) {
	raw, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	pl := connlimittest.NewPausingListener(raw, 300*time.Millisecond)
	l := NewListener(pl, 8, Metrics{})
	srv := &http.Server{
		ConnState: TrackIdle,
		Handler:   http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "ok") }),
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(l) }()
	dial := func() net.Conn {
		t.Helper()
		c, err := net.Dial("tcp", raw.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	const request = "GET / HTTP/1.1\r\nHost: x\r\n\r\n"
	answered := func(c net.Conn) error {
		_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return errors.New(resp.Status)
		}
		return nil
	}

	early := dial() // accepted, its request still to come
	<-pl.Accepted
	for deadline := time.Now().Add(10 * time.Second); l.fresh.Load() != 1; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the first connection was not accepted")
		}
	}
	held := dial() // its request sent; the accept loop holds it
	if _, err := io.WriteString(held, request); err != nil {
		t.Fatal(err)
	}
	<-pl.Accepted
	late := make(chan bool, 1)
	go func() { late <- Shutdown(srv, l, served, 5*time.Second, 5*time.Second) }()
	time.Sleep(100 * time.Millisecond)
	if _, err := io.WriteString(early, request); err != nil {
		t.Fatal(err)
	}
	if err := answered(held); err != nil {
		t.Errorf("the connection held by the accept loop at the shutdown: %v", err)
	}
	if err := answered(early); err != nil {
		t.Errorf("the connection accepted before the shutdown, asking after: %v", err)
	}
	select {
	case l := <-late:
		if l {
			t.Error("Shutdown reports a late drain")
		}
	case <-time.After(20 * time.Second):
		t.Fatal("Shutdown did not return")
	}
}
