package proxy

import (
	"net"
	"syscall"

	"github.com/imdsproxy/imdsproxy/connlimit"
	"github.com/imdsproxy/imdsproxy/peer"
)

// DefaultMaxConns is the number of client connections Serve keeps open at
// most when Config.MaxConns is zero. An idle connection costs about 10 KiB
// (goroutine and buffers), so the bound is about 40 MiB.
const DefaultMaxConns = 4096

// limitListener is Serve's connlimit.Listener: at most n connections open,
// a new one taking the place of the keep-alive connection idle the longest
// at the bound (a silent new connection is closed after readHeaderTimeout,
// so a flood of those delays new clients by at most that long), and, with
// an owner, keeps any one uid from holding more than about three quarters
// of the slots with connections that are not idle (ShareByOwner). It also
// remembers what it learnt of its socket once, for its connections.
type limitListener struct {
	*connlimit.Listener
	netns uint64 // network namespace cookie of ln, hence of its connections; 0 unknown
	hops4 int    // IP TTL of ln, hence of its new connections; 0 unknown
	hops6 int    // IPv6 unicast hop limit, likewise
}

func newLimitListener(ln net.Listener, n int, m *limitMetrics, owner connlimit.OwnerFunc) *limitListener {
	l := &limitListener{
		Listener: connlimit.NewListener(ln, n, connlimit.Metrics{Open: m.openConns, Reached: m.limitReached, Evicted: m.idleClosed, OverShare: m.overShare}),
		netns:    peer.ListenerNetns(ln),
	}
	if owner != nil {
		l.ShareByOwner(owner)
	}
	l.hops4, l.hops6 = listenerHops(ln)
	return l
}

func (l *limitListener) Accept() (net.Conn, error) {
	c, err := l.AcceptConn()
	if err != nil {
		return nil, err
	}
	return &limitConn{Conn: c, l: l}, nil
}

// limitConn is a connection of a limitListener (its slot, its idleness);
// what its listener learnt of its socket once is the connection's too.
type limitConn struct {
	*connlimit.Conn
	l *limitListener
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

// SyscallConn passes the accepted connection's socket on, so that the hop
// limit of token responses can still be set.
func (c *limitConn) SyscallConn() (syscall.RawConn, error) {
	sc, ok := c.Conn.Conn.(syscall.Conn)
	if !ok {
		return nil, errHopLimitUnsupported
	}
	return sc.SyscallConn()
}
