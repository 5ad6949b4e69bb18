// Package connlimit bounds the connections a listener keeps open, so that
// a local process cannot exhaust the daemon's memory and file descriptors,
// without letting connections that merely stay open lock others out: at
// the bound, a new connection takes the place of the keep-alive connection
// idle the longest.
package connlimit

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are a Listener's instruments; nil ones are not updated.
type Metrics struct {
	Open    prometheus.Gauge   // connections open
	Reached prometheus.Counter // a new connection found the bound reached
	Evicted prometheus.Counter // idle connections closed to make room
	// OverShare: new connections closed at once because their owner held
	// its share of the slots (ShareByOwner).
	OverShare prometheus.Counter
}

// OwnerFunc names who made a connection (a uid, say); ok is false when it
// cannot tell. It runs in Accept, one connection at a time: it must be
// quick and bounded.
type OwnerFunc func(net.Conn) (owner uint32, ok bool)

// Listener accepts at most n connections open at once. At the bound,
// Accept closes the keep-alive connection idle the longest (between two
// requests, nothing received: see TrackIdle) to make room for the
// connection it has just accepted, or else waits for one to close (the
// kernel's backlog queues the rest; at most one accepted connection waits
// in Accept). Create it with NewListener; safe for concurrent use.
type Listener struct {
	net.Listener
	sem      chan struct{}
	done     chan struct{}
	once     sync.Once
	closeErr error // of the first Close (a second one, by http.Server.Shutdown, is a no-op)
	m        Metrics

	fresh atomic.Int64 // connections accepted whose first request has not been read (WaitFresh)

	mu     sync.Mutex
	conns  map[*Conn]struct{} // open, for evictIdle
	owner  OwnerFunc          // nil: no shares (ShareByOwner)
	share  int                // connections one owner may hold of those attributed
	owners map[uint32]int     // owner -> open connections attributed to it
}

// NewListener bounds ln to n open connections (n ≥ 1).
func NewListener(ln net.Listener, n int, m Metrics) *Listener {
	return &Listener{Listener: ln, sem: make(chan struct{}, max(n, 1)), done: make(chan struct{}), m: m,
		conns: make(map[*Conn]struct{})}
}

// ShareByOwner keeps any one owner from holding more than about three
// quarters of the slots with connections that are not idle (a slow
// client's headers, a request in progress), which eviction cannot take
// back: while more than half the slots are taken, Accept asks owner who
// made each new connection, and closes it at once when that owner already
// holds a quarter of the slots among the connections so attributed. Below
// half, nothing is asked (no cost). So one owner holds at most half the
// slots, unattributed, and a quarter more, and the others always find a
// quarter free. Call it before the first Accept.
func (l *Listener) ShareByOwner(owner OwnerFunc) {
	l.owner, l.share = owner, max(cap(l.sem)/4, 1)
	l.owners = make(map[uint32]int)
}

// Accept returns the next connection, a *Conn.
func (l *Listener) Accept() (net.Conn, error) {
	c, err := l.AcceptConn()
	if err != nil {
		return nil, err
	}
	return c, nil
}

// AcceptConn is Accept returning the *Conn itself, for listeners that wrap
// it.
func (l *Listener) AcceptConn() (*Conn, error) {
	for {
		// Accept first, then take a slot: a connection is evicted only for
		// a client that is there.
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		lc := &Conn{Conn: c, l: l}
		if !l.attribute(lc) {
			_ = c.Close()
			inc(l.m.OverShare)
			continue
		}
		select {
		case l.sem <- struct{}{}:
		default:
			inc(l.m.Reached)
			l.evictIdle()
			select {
			case l.sem <- struct{}{}:
			case <-l.done:
				l.release(lc)
				_ = c.Close()
				return nil, net.ErrClosed
			}
		}
		if l.m.Open != nil {
			l.m.Open.Inc()
		}
		l.mu.Lock()
		l.conns[lc] = struct{}{}
		l.mu.Unlock()
		lc.fresh.Store(true)
		l.fresh.Add(1)
		return lc, nil
	}
}

// Shutdown stops srv, which serves on l (Serve's result arrives on
// served), without dropping a request: http.Server.Shutdown drops,
// unanswered, a request read after it has begun. So Shutdown closes l,
// waits for the accept loop to return (a connection it held is then
// handed over: the loop does so before it accepts again), waits for the
// connections accepted to send their first request (WaitFresh), each at
// most freshWait, and only then drains srv, at most drainWait, closing
// what is left after that. On a hand-off of the socket the next process
// accepts the new connections meanwhile. It returns once Serve has
// returned, and reports whether the drain ran out of time.
func Shutdown(srv *http.Server, l *Listener, served <-chan error, freshWait, drainWait time.Duration) (late bool) {
	_ = l.Close()
	returned := false
	select {
	case <-served:
		returned = true
	case <-time.After(freshWait):
	}
	l.WaitFresh(freshWait)
	ctx, cancel := context.WithTimeout(context.Background(), drainWait)
	defer cancel()
	if err := srv.Shutdown(ctx); err != nil {
		late = true
		_ = srv.Close()
	}
	if !returned {
		<-served
	}
	return late
}

// WaitFresh returns once every connection accepted so far has had its
// first request read (or is closed), or after at most d. http.Server's
// Shutdown drops, unanswered, a request read after it has begun: a server
// that closes its listener, waits for its accept loop to return and then
// for this, before Shutdown, loses no request of a connection it accepted
// (on a hand-off, the next process accepts the new ones; see Shutdown).
// The server's ConnState hook must be TrackIdle, or call Conn.Track.
func (l *Listener) WaitFresh(d time.Duration) {
	deadline := time.Now().Add(d)
	for l.fresh.Load() > 0 && time.Now().Before(deadline) {
		time.Sleep(2 * time.Millisecond)
	}
}

// attribute asks who made c when more than half the slots are taken and
// counts it against its owner's share; false: the owner's share is full.
func (l *Listener) attribute(c *Conn) bool {
	if l.owner == nil || len(l.sem) <= cap(l.sem)/2 {
		return true
	}
	owner, ok := l.owner(c.Conn)
	if !ok {
		return true
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.owners[owner] >= l.share {
		return false
	}
	l.owners[owner]++
	c.owner, c.attributed = owner, true
	return true
}

// release gives c's place in its owner's share back.
func (l *Listener) release(c *Conn) {
	if !c.attributed {
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.owners[c.owner]--; l.owners[c.owner] <= 0 {
		delete(l.owners, c.owner)
	}
}

// Close closes the listener; an Accept waiting for a slot returns. A
// second Close does nothing and returns the first one's error.
func (l *Listener) Close() error {
	l.once.Do(func() {
		close(l.done)
		l.closeErr = l.Listener.Close()
	})
	return l.closeErr
}

// evictIdle closes the connection idle the longest, unless it has received
// bytes (its next request is arriving), and reports whether it closed one.
// It looks at a few candidates at most.
func (l *Listener) evictIdle() bool {
	for range 4 {
		var oldest *Conn
		var seq int64
		l.mu.Lock()
		for c := range l.conns {
			if s := c.idle.Load(); s > 0 && (oldest == nil || s < seq) {
				oldest, seq = c, s
			}
		}
		l.mu.Unlock()
		if oldest == nil {
			return false
		}
		if pendingInput(oldest.Conn) {
			oldest.idle.CompareAndSwap(seq, 0) // about to be active: not a candidate
			continue
		}
		if oldest.idle.CompareAndSwap(seq, -1) {
			_ = oldest.Close()
			inc(l.m.Evicted)
			return true
		}
	}
	return false
}

func inc(c prometheus.Counter) {
	if c != nil {
		c.Inc()
	}
}

var errNoSyscallConn = errors.New("connlimit: the connection has no socket")

// idleTurn orders the connections' turns to go idle, across listeners.
var idleTurn atomic.Int64

// Conn is a connection of a Listener: it gives its slot back once, on the
// first Close. The zero Conn (no listener) only records idleness.
type Conn struct {
	net.Conn
	l          *Listener
	closed     atomic.Bool
	idle       atomic.Int64 // > 0: idle between requests, its turn; 0 active or new; -1 being closed
	owner      uint32       // with attributed: whose share it counts against (ShareByOwner)
	attributed bool
	fresh      atomic.Bool // accepted, first request not read yet (WaitFresh)
}

// started records that c's first request has been read (any state after
// http.StateNew): it no longer holds WaitFresh up. Idempotent.
func (c *Conn) started() {
	if c.fresh.CompareAndSwap(true, false) && c.l != nil {
		c.l.fresh.Add(-1)
	}
}

// SetIdle records c going idle between two requests (true) or active. It
// costs an atomic add and a store: it runs twice per request.
func (c *Conn) SetIdle(idle bool) {
	if idle {
		c.idle.Store(idleTurn.Add(1))
	} else {
		c.idle.Store(0)
	}
}

// Close closes the connection and gives its slot back.
func (c *Conn) Close() error {
	err := c.Conn.Close()
	c.started()
	if c.l != nil && c.closed.CompareAndSwap(false, true) {
		c.l.mu.Lock()
		delete(c.l.conns, c)
		c.l.mu.Unlock()
		c.l.release(c)
		<-c.l.sem
		if c.l.m.Open != nil {
			c.l.m.Open.Dec()
		}
	}
	return err
}

// SyscallConn passes the accepted connection's socket on (client
// identification and socket options need it).
func (c *Conn) SyscallConn() (syscall.RawConn, error) {
	sc, ok := c.Conn.(syscall.Conn)
	if !ok {
		return nil, errNoSyscallConn
	}
	return sc.SyscallConn()
}

// TrackIdle is the http.Server ConnState hook of a server on a Listener: it
// records when the connections go idle between requests, and when their
// first request has been read (Conn.Track; a server that has a hook of its
// own calls Track from it). A TLS connection (http.Server.ServeTLS on a
// Listener) is looked through.
func TrackIdle(c net.Conn, st http.ConnState) {
	if tc, ok := c.(*tls.Conn); ok {
		c = tc.NetConn()
	}
	lc, ok := c.(*Conn)
	if !ok {
		return
	}
	lc.Track(st)
}

// Track records a state change of c (what TrackIdle does, for a server
// whose ConnState hook does more): idleness for eviction, and the end of
// its freshness for WaitFresh.
func (c *Conn) Track(st http.ConnState) {
	switch st {
	case http.StateNew:
		return
	case http.StateIdle:
		c.SetIdle(true)
	case http.StateActive:
		c.SetIdle(false)
	}
	c.started()
}
