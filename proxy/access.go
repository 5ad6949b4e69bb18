package proxy

import (
	"context"
	"net"
	"net/http"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/imdsproxy/imdsproxy/creds"
)

// Peer is the local process at the other end of a connection, as far as an
// AccessControl could tell.
type Peer struct {
	// Known is false when the process could not be identified (the
	// connection comes from another host or network namespace, or the
	// handler is served outside Serve); the other fields are then zero.
	Known bool
	// UID is the owner of the peer's socket, from the kernel.
	UID int
	// Unit (systemd unit) and Cgroup (the cgroup v2 path the peer's socket
	// was created in) come from the kernel when it records the socket's
	// cgroup, else best effort; PID and Exe are best effort. Zero when
	// unknown.
	PID    int
	Exe    string
	Unit   string
	Cgroup string
	// UnitUnknown: the kernel named the socket's cgroup but its unit could
	// not be told in time; Unit is "" for that reason, not because the
	// process runs outside a unit. Such a Peer is not remembered for the
	// connection: its next request identifies it again.
	UnitUnknown bool
}

// AccessControl decides which local processes may read credentials. It is
// consulted only on the credential routes (security-credentials[-extended]
// and their role listing, iam/info), after the session token check; every
// other route is unaffected.
//
// Identify finds who is at the other end of conn. The Server calls it at
// most once per connection, on the first credential request, with a context
// bounded by identifyTimeout and not cancelled by the client, and keeps the
// answer for the connection's later requests; an error means "unknown". It
// is never called for a handler served outside Serve (no connection is
// known).
//
// Allow reports whether p may read credentials. It is called on every
// credential request with the remembered Peer (Known false when Identify
// failed), so a changed policy applies at once to open connections; it must
// be cheap. Both methods must be safe for concurrent use.
type AccessControl interface {
	Identify(ctx context.Context, conn net.Conn) (Peer, error)
	Allow(p Peer) bool
}

// RoleMapper chooses, per client process, the role served to it: the
// per-workload roles of one host. It is consulted on the credential routes
// after AccessControl.Identify and Allow, with the same remembered Peer
// (Known false when the client could not be identified).
//
// RoleFor returns the name of the role p is served instead of
// Config.RoleName, and true; or false when p is served Config.RoleName (an
// unmatched or unidentified client). A returned name must be a valid IAM
// role name (1..64 of [A-Za-z0-9+=,.@_-]) that the CredentialSource knows;
// it is listed, served and passed to CredentialSource.Credentials as is.
// The mapping is the only thing that decides which role a client may read:
// a client mapped to a role gets 404 for every other role name except
// Config.AlsoServe (answered with its own role's credentials), and a client
// that is not mapped gets 404 for every mapped role not in AlsoServe. RoleFor is called on every credential
// request, so it must be cheap, and it must be safe for concurrent use.
type RoleMapper interface {
	RoleFor(p Peer) (name string, ok bool)
}

// identifyTimeout bounds AccessControl.Identify.
const identifyTimeout = 100 * time.Millisecond

// accessDeniedBody is the body of a 403 on a credential route.
const accessDeniedBody = "access denied for this process"

// peerKey is the context key of a connection's *peerMemo.
type peerKey struct{}

// peerMemo remembers the Peer of one connection. HTTP/1 requests of one
// connection are sequential; the mutex makes that an implementation detail.
type peerMemo struct {
	mu   sync.Mutex
	done bool
	who  Peer
}

// connAccessContext is Serve's http.Server.ConnContext: connContext plus a
// slot for the connection's Peer.
func connAccessContext(ctx context.Context, c net.Conn) context.Context {
	return context.WithValue(connContext(ctx, c), peerKey{}, &peerMemo{})
}

// PeerFromContext returns the Peer identified for the connection of the
// request whose context ctx is (the one passed to
// CredentialSource.Credentials), and whether it was identified: false
// without an AccessControl or before Identify ran. A CredentialSource that
// serves per process (a rollout's, choosing a workload's role) uses it to
// pick the credentials from the client itself rather than from the
// requested name.
func PeerFromContext(ctx context.Context) (Peer, bool) {
	memo, _ := ctx.Value(peerKey{}).(*peerMemo)
	if memo == nil {
		return Peer{}, false
	}
	memo.mu.Lock()
	defer memo.mu.Unlock()
	return memo.who, memo.done && memo.who.Known
}

func isCredentialRoute(route string) bool {
	switch route {
	case routeCredentials, routeCredentialsExtended, routeRoleList, routeIAMInfo:
		return true
	}
	return false
}

// checkAccess applies st's AccessControl to a request of route. It returns
// the peer (zero without an AccessControl or on other routes) and whether to
// go on; when not, it has written the 403.
func (s *Server) checkAccess(w http.ResponseWriter, r *http.Request, st *state, route string) (Peer, bool) {
	ac := st.cfg.Access
	if ac == nil || !isCredentialRoute(route) {
		return Peer{}, true
	}
	who := s.identify(r, ac)
	if ac.Allow(who) {
		return who, true
	}
	s.m.accessDenied.Inc()
	if ce := s.log.Check(zap.DebugLevel, "access denied"); ce != nil {
		ce.Write(append(peerFields(who), zap.String("route", route))...)
	}
	writeText(w, http.StatusForbidden, accessDeniedBody)
	return who, false
}

// identify returns the Peer of r's connection, asking ac once per connection.
func (s *Server) identify(r *http.Request, ac AccessControl) Peer {
	conn := connFrom(r.Context())
	memo, _ := r.Context().Value(peerKey{}).(*peerMemo)
	if conn == nil || memo == nil {
		return Peer{}
	}
	memo.mu.Lock()
	defer memo.mu.Unlock()
	if memo.done {
		return memo.who
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(r.Context()), identifyTimeout)
	defer cancel()
	who, err := ac.Identify(ctx, conn)
	if err != nil {
		s.log.Debug("cannot identify the client process", zap.Error(err))
		who = Peer{}
	}
	memo.who, memo.done = who, !who.UnitUnknown
	return who
}

// audit writes the audit line of one credential hand-out of role, asked for
// as requested (an AlsoServe alias when they differ, then logged too). kind
// is "fetch" when the credentials were obtained from upstream while the
// request waited (stored at or after fetchStart), else "cache".
func (s *Server) audit(st *state, who Peer, route, role, requested string, c creds.Credentials, fetchStart time.Time) {
	kind := "cache"
	if !c.LastUpdated.Before(fetchStart) {
		kind = "fetch"
	}
	log := st.cfg.AuditLog
	if log == nil {
		log = s.auditLog
	}
	if ce := log.Check(zap.InfoLevel, "credentials served"); ce != nil {
		fields := peerFields(who)
		if requested != role {
			fields = append(fields, zap.String("requested_role_name", requested))
		}
		ce.Write(append(fields,
			zap.String("role_name", role),
			zap.String("role", c.RoleARN),
			zap.String("access_key_id", c.AccessKeyID),
			zap.String("kind", kind),
			zap.String("route", route))...)
	}
}

// peerFields are the log fields of who; never a secret.
func peerFields(who Peer) []zap.Field {
	if !who.Known {
		return []zap.Field{zap.Bool("identified", false)}
	}
	return []zap.Field{
		zap.Bool("identified", true),
		zap.Int("uid", who.UID),
		zap.Int("pid", who.PID),
		zap.String("exe", who.Exe),
		zap.String("unit", who.Unit),
		zap.String("cgroup", who.Cgroup),
	}
}
