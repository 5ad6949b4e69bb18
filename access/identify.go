package access

import (
	"context"
	"errors"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/imdsproxy/imdsproxy/peer"
)

// Identifier finds the local process at the other end of a connection;
// *peer.Resolver implements it. LookupConn gives what decisions use (uid,
// cgroup, unit, as the kernel recorded them for the client's socket); an
// error wrapping peer.ErrNotFound means the connection does not come from
// this host's network namespace, any other error that the client could not
// be identified (Client.Unresolved). Process adds the pid and executable,
// best effort, for the audit line only. It must be safe for concurrent use.
type Identifier interface {
	LookupConn(ctx context.Context, conn net.Conn) (peer.Info, error)
	Process(ctx context.Context, info peer.Info) peer.Info
}

// uidLookuper is an Identifier that can find a connection's uid alone,
// without its cgroup (*peer.Resolver: one sock_diag query, never a wait
// for the cgroup watcher).
type uidLookuper interface {
	LookupUID(ctx context.Context, c net.Conn) (int, error)
}

// ownerTimeout bounds a ConnOwner lookup: it runs in the accept loop.
const ownerTimeout = 50 * time.Millisecond

// unknownOwner is the owner ConnOwner gives the connections whose uid it
// cannot find (a client in another network namespace, a failed lookup):
// they share one share. It is (uid_t)-1, which no process runs as.
const unknownOwner = ^uint32(0)

// userMapper is an Identifier that knows the users of subordinate uids
// (*peer.Resolver: peer.Users).
type userMapper interface {
	UserOf(uid uint32) uint32
}

// ConnOwner names the user of a connection's client, for a front door's
// connection shares (connlimit.Listener.ShareByOwner): its uid, or, when id
// knows the host's subordinate uids, the uid of the user a subordinate uid
// is delegated to, so one user holds one share however many uids it runs
// processes as. nil when id cannot find a uid alone.
func ConnOwner(id Identifier) func(net.Conn) (uint32, bool) {
	u, ok := id.(uidLookuper)
	if !ok {
		return nil
	}
	users, _ := id.(userMapper)
	return func(c net.Conn) (uint32, bool) {
		ctx, cancel := context.WithTimeout(context.Background(), ownerTimeout)
		defer cancel()
		uid, err := u.LookupUID(ctx, c)
		if err != nil || uid < 0 || uint64(uid) >= uint64(unknownOwner) {
			return unknownOwner, true
		}
		if users != nil {
			return users.UserOf(uint32(uid)), true
		}
		return uint32(uid), true
	}
}

// IdentifyTimeout bounds identifying a connection (LookupConn and Process).
const IdentifyTimeout = 100 * time.Millisecond

// ConnClient is the Client of one connection, identified at most once: the
// front doors (IMDS, the container endpoint) keep one per connection. The
// zero value is ready to use; it is safe for concurrent use.
type ConnClient struct {
	// known is the answer once it is final (not unresolved, unit known),
	// read without the lock: every request of a kept-alive connection
	// after its first.
	known atomic.Pointer[connAnswer]
	mu    sync.Mutex // serialises identifying
}

// connAnswer is a ConnClient's final answer.
type connAnswer struct {
	who Client
	lax bool // found for the audit alone (auditLookuper)
}

// auditLookuper is an Identifier that can identify a connection for the
// audit alone (*peer.Resolver): as LookupConn, without the checks only
// decisions need.
type auditLookuper interface {
	LookupConnForAudit(ctx context.Context, conn net.Conn) (peer.Info, error)
}

// Get returns the Client behind conn, asking id the first time (and again
// while the client is unresolved or its unit unknown, so a transient
// failure is not remembered for the connection's life), within
// IdentifyTimeout of ctx (whose cancellation it ignores: the answer is
// shared by the connection's later requests). With audit it adds the pid
// and exe — to the audit fields only: a unit /proc reports is what the
// process says now, not what the kernel recorded for its socket, and
// decisions use the latter.
//
// decides says whether a decision depends on the answer; when it does not
// (the client is identified for the audit alone) and id can, the checks
// only decisions need are skipped, and the answer is remembered as such:
// a later Get that decides identifies the connection again.
func (m *ConnClient) Get(ctx context.Context, id Identifier, conn net.Conn, audit, decides bool, log *zap.Logger) Client {
	if a := m.known.Load(); a != nil && !(decides && a.lax) {
		return a.who
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if a := m.known.Load(); a != nil && !(decides && a.lax) {
		return a.who // found by a concurrent Get
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), IdentifyTimeout)
	defer cancel()
	lookup, lax := id.LookupConn, false
	if al, ok := id.(auditLookuper); ok && !decides {
		lookup, lax = al.LookupConnForAudit, true
	}
	info, err := lookup(ctx, conn)
	var who Client
	switch {
	case err == nil:
		who = Client{Local: true, Info: info}
		if audit {
			p := id.Process(ctx, info)
			who.PID, who.Exe = p.PID, p.Exe
		}
	case errors.Is(err, peer.ErrNotFound):
		// Another host or network namespace (a container on a bridge).
	default:
		if log != nil {
			log.Debug("cannot identify the client process", zap.Error(err))
		}
		who = Client{Unresolved: true}
	}
	who.slot = new(auditSlot) // a new identity: nothing to repeat yet
	// Only a final answer is kept; otherwise the next Get asks again.
	var a *connAnswer
	if !who.Unresolved && !who.UnitUnknown {
		a = &connAnswer{who: who, lax: lax}
	}
	m.known.Store(a)
	return who
}
