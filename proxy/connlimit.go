package proxy

import (
	"net"
	"sync"
	"sync/atomic"
	"syscall"

	"github.com/imdsproxy/imdsproxy/peer"
)

// DefaultMaxConns is the number of client connections Serve keeps open at
// most when Config.MaxConns is zero. An idle connection costs about 10 KiB
// (goroutine and buffers), so the bound is about 40 MiB.
const DefaultMaxConns = 4096

// limitListener accepts at most cap(sem) connections open at once. At the
// limit, Accept closes the keep-alive connection idle the longest (between
// two requests, nothing received) to make room for the connection it has
// just accepted, or else waits for one to close (the kernel's backlog
// queues the rest). A silent connection is
// closed after readHeaderTimeout, so a flood that fills the limit delays new
// clients by at most that long; connections that merely stay open cannot
// hold the limit against them.
type limitListener struct {
	net.Listener
	sem chan struct{}
	seq atomic.Int64 // orders the connections' turns to idle (limitConn.idle)

	mu    sync.Mutex
	conns map[*limitConn]struct{} // open, for evictIdle

	done  chan struct{}
	once  sync.Once
	m     *limitMetrics
	netns uint64 // network namespace cookie of ln, hence of its connections; 0 unknown
	hops4 int    // IP TTL of ln, hence of its new connections; 0 unknown
	hops6 int    // IPv6 unicast hop limit, likewise
}

func newLimitListener(ln net.Listener, n int, m *limitMetrics) *limitListener {
	l := &limitListener{Listener: ln, sem: make(chan struct{}, n), done: make(chan struct{}), m: m,
		netns: peer.ListenerNetns(ln), conns: make(map[*limitConn]struct{})}
	l.hops4, l.hops6 = listenerHops(ln)
	return l
}

func (l *limitListener) Accept() (net.Conn, error) {
	// Accept first, then take a slot: a connection is evicted only for a
	// client that is there (at most one accepted connection waits here).
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	select {
	case l.sem <- struct{}{}:
	default:
		l.m.limitReached.Inc()
		l.evictIdle()
		select {
		case l.sem <- struct{}{}:
		case <-l.done:
			_ = c.Close()
			return nil, net.ErrClosed
		}
	}
	l.m.openConns.Inc()
	lc := &limitConn{Conn: c, l: l}
	l.mu.Lock()
	l.conns[lc] = struct{}{}
	l.mu.Unlock()
	return lc, nil
}

// evictIdle closes the keep-alive connection idle the longest, unless it has
// received bytes (its next request is arriving), and reports whether it
// closed one. It looks at a few candidates at most.
func (l *limitListener) evictIdle() bool {
	for range 4 {
		var oldest *limitConn
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
			l.m.idleClosed.Inc()
			return true
		}
	}
	return false
}

func (l *limitListener) Close() error {
	l.once.Do(func() { close(l.done) })
	return l.Listener.Close()
}

// limitConn gives its slot back once, on the first Close. What its
// listener learnt of its socket once is the connection's too.
type limitConn struct {
	net.Conn
	l      *limitListener
	closed atomic.Bool
	fresh  atomic.Bool  // accepted, first request not read yet (freshConns)
	idle   atomic.Int64 // > 0: idle between requests, its turn (l.seq); 0 active or new; -1 being closed
}

// setIdle records c going idle between two requests (true) or active.
func (c *limitConn) setIdle(idle bool) {
	if idle {
		c.idle.Store(c.l.seq.Add(1))
	} else {
		c.idle.Store(0)
	}
}

// initialHops is the hop limit the connection was accepted with (its
// listener's), 0 when unknown (initialHopser).
func (c *limitConn) initialHops(v4 bool) int {
	if v4 {
		return c.l.hops4
	}
	return c.l.hops6
}

// NetnsCookie is the network namespace cookie of the connection's socket
// (its listener's), 0 when unknown (peer.NetnsConn): client identification
// need not ask the kernel for it on every connection.
func (c *limitConn) NetnsCookie() uint64 { return c.l.netns }

func (c *limitConn) Close() error {
	err := c.Conn.Close()
	if c.closed.CompareAndSwap(false, true) {
		c.l.mu.Lock()
		delete(c.l.conns, c)
		c.l.mu.Unlock()
		<-c.l.sem
		c.l.m.openConns.Dec()
	}
	return err
}

// SyscallConn passes the accepted connection's socket on, so that the hop
// limit of token responses can still be set.
func (c *limitConn) SyscallConn() (syscall.RawConn, error) {
	sc, ok := c.Conn.(syscall.Conn)
	if !ok {
		return nil, errHopLimitUnsupported
	}
	return sc.SyscallConn()
}
