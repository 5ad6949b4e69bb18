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

// limitListener accepts at most cap(sem) connections open at once: Accept
// waits for one to close before accepting more (the kernel's backlog queues
// the rest). A silent connection is closed after readHeaderTimeout and an
// idle keep-alive one after idleTimeout, so a flood that fills the limit
// delays new clients by at most that long.
type limitListener struct {
	net.Listener
	sem   chan struct{}
	done  chan struct{}
	once  sync.Once
	m     *limitMetrics
	netns uint64 // network namespace cookie of ln, hence of its connections; 0 unknown
	hops4 int    // IP TTL of ln, hence of its new connections; 0 unknown
	hops6 int    // IPv6 unicast hop limit, likewise
}

func newLimitListener(ln net.Listener, n int, m *limitMetrics) *limitListener {
	l := &limitListener{Listener: ln, sem: make(chan struct{}, n), done: make(chan struct{}), m: m,
		netns: peer.ListenerNetns(ln)}
	l.hops4, l.hops6 = listenerHops(ln)
	return l
}

func (l *limitListener) Accept() (net.Conn, error) {
	select {
	case l.sem <- struct{}{}:
	default:
		l.m.limitReached.Inc()
		select {
		case l.sem <- struct{}{}:
		case <-l.done:
			return nil, net.ErrClosed
		}
	}
	c, err := l.Listener.Accept()
	if err != nil {
		<-l.sem
		return nil, err
	}
	l.m.openConns.Inc()
	return &limitConn{Conn: c, l: l}, nil
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
	fresh  atomic.Bool // accepted, first request not read yet (freshConns)
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
