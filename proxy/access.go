package proxy

import (
	"context"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/imdsproxy/imdsproxy/access"
)

// Identifier finds the local process at the other end of a connection
// (access.Identifier; *peer.Resolver implements it).
type Identifier = access.Identifier

// Bodies of refused credential requests.
const (
	accessDeniedBody = "access denied for this process"
	retryBody        = "the client process could not be identified; retry"
)

// connInfo is what Serve keeps of one accepted connection: the connection,
// the hop limit restore a token response left (hoplimit.go), and its
// client and last verified token (peerMemo). Serve's ConnContext stores it
// once; serveHTTP looks it up once per request and passes it down. A nil
// *connInfo is a request not served by Serve (httptest, another
// http.Server): no connection to identify, no memo, no hop limit.
type connInfo struct {
	conn net.Conn
	// hopRestore is the restore of a hop limit a token response left set,
	// run when the connection's next request arrives (hoplimit.go).
	hopRestore atomic.Pointer[func() error]
	peer       peerMemo
	// host is the last Host header value found allowed on this
	// connection, with the configuration it was checked against
	// (hostcheck.go): a client sends the same one on every request.
	host atomic.Pointer[hostMemo]
}

// connInfoKey is the context key of a connection's *connInfo.
type connInfoKey struct{}

// connInfoOf returns the record Serve stored for r's connection, or nil.
func connInfoOf(r *http.Request) *connInfo {
	ci, _ := r.Context().Value(connInfoKey{}).(*connInfo)
	return ci
}

// memo returns the connection's peerMemo, nil without a record.
func (ci *connInfo) memo() *peerMemo {
	if ci == nil {
		return nil
	}
	return &ci.peer
}

// connection returns the accepted connection, nil without a record.
func (ci *connInfo) connection() net.Conn {
	if ci == nil {
		return nil
	}
	return ci.conn
}

// peerMemo remembers the Client of one connection, and the last session
// token verified on it. HTTP/1 requests of one connection are sequential;
// the mutex makes that an implementation detail.
type peerMemo struct {
	client access.ConnClient

	mu     sync.Mutex
	tok    string // the last token found valid on this connection, "" none
	tokExp int64  // its expiry, unix seconds
	tokGen uint32 // the plan generation it pins
}

// verifiedToken reports whether tok is the token last found valid on this
// connection and still unexpired at now, and the generation it pins. A
// client sends the same token on every request of a session, and the token
// is immutable (its expiry and generation are inside it, under the MAC), so
// an identical string needs no second HMAC; the expiry is checked again.
// A nil memo (a request not served by Serve) remembers nothing.
func (m *peerMemo) verifiedToken(tok string, now time.Time) (uint32, bool) {
	if m == nil {
		return 0, false
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.tok == "" || m.tok != tok || now.Unix() >= m.tokExp {
		return 0, false
	}
	return m.tokGen, true
}

// rememberToken records tok, found valid at now, with its expiry and pin.
func (m *peerMemo) rememberToken(tok string, exp int64, gen uint32) {
	m.mu.Lock()
	m.tok, m.tokExp, m.tokGen = tok, exp, gen
	m.mu.Unlock()
}

// connAccessContext is Serve's http.Server.ConnContext: it stores the
// connection's record (connInfo).
func connAccessContext(ctx context.Context, c net.Conn) context.Context {
	return context.WithValue(ctx, connInfoKey{}, &connInfo{conn: c})
}

func isCredentialRoute(route string) bool {
	switch route {
	case routeCredentials, routeCredentialsExtended, routeRoleList, routeIAMInfo:
		return true
	}
	return false
}

// client returns the Client of r's connection (access.ConnClient: at most
// once per connection, again while unresolved), and the zero Client when
// the request was not served by Serve or when nothing about it needs the
// client: plan's decisions do not depend on it and it hands nothing out to
// audit (handout false: the role listing, iam/info, on a host without
// access lists or workloads; an SDK's listing is often on a connection of
// its own).
func (s *Server) client(r *http.Request, ci *connInfo, plan *access.Plan, handout bool) access.Client {
	decides := plan.Decides()
	if !decides && !(handout && plan.Audit()) {
		return access.Client{}
	}
	return s.identify(r, ci, plan, decides)
}

// identify returns the Client of r's connection: for a request whose answer
// depends on it (decides: client's when the plan decides by client, a
// protected pass-through path's), or that is audited.
func (s *Server) identify(r *http.Request, ci *connInfo, plan *access.Plan, decides bool) access.Client {
	if s.id == nil || ci == nil {
		return access.Client{}
	}
	return ci.peer.client.Get(r.Context(), s.id, ci.conn, plan.Audit(), decides, s.log)
}

// pathDeniedBody is the body of a pass-through path refused by
// imds.passthrough.
const pathDeniedBody = "this metadata path is not available to this process (imds.passthrough)"

// refusePath answers a pass-through request refused by imds.passthrough:
// 403 (deny), 503 (retry: the client could not be identified).
func (s *Server) refusePath(w http.ResponseWriter, d access.Decision) {
	s.m.passthroughRefused.WithLabelValues(map[access.Outcome]string{access.Deny: "deny", access.Retry: "retry"}[d.Outcome]).Inc()
	if d.Outcome == access.Retry {
		w.Header().Set("Retry-After", "1")
		writeText(w, http.StatusServiceUnavailable, retryBody)
		return
	}
	writeText(w, http.StatusForbidden, pathDeniedBody)
}

// refuse answers a credential request the decision d does not serve: 403
// for Deny, 503 for Retry.
func (s *Server) refuse(w http.ResponseWriter, d access.Decision, who access.Client, route string) {
	s.broker.Refused(d, access.DoorIMDS)
	if ce := s.log.Check(zap.DebugLevel, "credential request refused"); ce != nil {
		ce.Write(append(access.ClientFields(who), zap.String("route", route), zap.String("reason", d.Why))...)
	}
	if d.Outcome == access.Retry {
		w.Header().Set("Retry-After", "1")
		writeText(w, http.StatusServiceUnavailable, retryBody)
		return
	}
	writeText(w, http.StatusForbidden, accessDeniedBody)
}
