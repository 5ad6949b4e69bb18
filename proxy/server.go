// Package proxy is the IMDS HTTP API of imdsproxy: a stand-in for the EC2
// instance metadata service that unmodified AWS SDKs talk to.
//
// A Server answers
//
//   - PUT /latest/api/token: IMDSv2 session tokens, minted locally and
//     stateless (HMAC over expiry and nonce with a per-process key), sent with
//     the configured IP TTL / IPv6 hop limit;
//   - GET …/meta-data/iam/security-credentials[-extended]/[<role>],
//     …/meta-data/iam/info and the iam listing: decided by the access.Plan
//     of the configuration in force (who the client process is, which role
//     it is served) and served by an access.Broker (normally from the
//     credential cache);
//   - every other GET/HEAD: forwarded unchanged to the real IMDS (the
//     upstream) with the daemon's own upstream token.
//
// Every path whose second and third segments are meta-data and iam (any
// version, case-insensitive) is answered locally and never forwarded, so a
// client can never obtain the instance profile's own credentials through the
// pass-through.
//
// Requests are bounded (header, URI and body size, timeouts) and measured
// with bounded-label Prometheus metrics. Tokens, secrets and client-sent
// header values are never logged.
package proxy

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/imdsproxy/imdsproxy/access"
	"github.com/imdsproxy/imdsproxy/connlimit"
	"github.com/imdsproxy/imdsproxy/creds"
	"github.com/imdsproxy/imdsproxy/growstack"
)

// Header names of the IMDSv2 protocol (canonical form).
const (
	headerToken    = "X-Aws-Ec2-Metadata-Token"
	headerTokenTTL = "X-Aws-Ec2-Metadata-Token-Ttl-Seconds"
)

// Request limits.
const (
	maxURIBytes       = 1024    // longer request targets get 414
	maxBodyBytes      = 1024    // longer request bodies get 413
	maxHeaderBytes    = 8 << 10 // http.Server.MaxHeaderBytes
	readHeaderTimeout = 2 * time.Second
	readTimeout       = 5 * time.Second
	idleTimeout       = 60 * time.Second
	writeTimeoutSlack = 5 * time.Second // WriteTimeout = UpstreamTimeout + this
	minShutdownWait   = 5 * time.Second // drain bound, at least UpstreamTimeout + 1s
)

// Bounds of Config.UpstreamTimeout.
const (
	// DefaultUpstreamTimeout is the pass-through bound used when
	// Config.UpstreamTimeout is zero.
	DefaultUpstreamTimeout = 2 * time.Second
	// MaxUpstreamTimeout is the largest accepted Config.UpstreamTimeout.
	MaxUpstreamTimeout = time.Minute
)

// forwardedRejection is the body of a token PUT refused for carrying
// X-Forwarded-For, as AWS's own IMDS emulator words it.
const forwardedRejection = "unable to process requests with X-Forwarded-For header"

// forwardedRFC7239Rejection is the body of a token PUT refused for carrying
// Forwarded (RFC 7239), the standard form of X-Forwarded-For.
const forwardedRFC7239Rejection = "unable to process requests with Forwarded header"

// Config is the part of the daemon's configuration the IMDS API uses. New and
// Update validate it; a Config is copied, so the caller may reuse it.
type Config struct {
	// Plan decides, per client process, whether it may read credentials
	// and which role it is listed and served (access.Plan). Required. A
	// Plan is built whole per configuration generation and replaced with
	// Update; a request uses the Plan it loaded first.
	Plan *access.Plan
	// TokensRequired selects IMDSv2-only (true: a request without a session
	// token gets 401) or optional mode (false: a request without a token is
	// served as IMDSv1). An invalid or expired token gets 401 in both modes.
	TokensRequired bool
	// HopLimit is the IP TTL (IPv4) or unicast hop limit (IPv6) of token PUT
	// responses, 1..64. Zero means 1, EC2's default.
	HopLimit int
	// Upstream is the base URL of the real IMDS (http or https), for example
	// http://169.254.169.254. Nil disables the pass-through: every path that
	// is not served locally gets 404.
	Upstream *url.URL
	// UpstreamTimeout bounds one pass-through request, including fetching the
	// daemon's upstream token and one retry. Zero means
	// DefaultUpstreamTimeout; at most MaxUpstreamTimeout. Connecting is
	// further bounded by 1s.
	UpstreamTimeout time.Duration
	// InstanceProfileARN is served by iam/info to the clients served the
	// host's own role. Empty means derived from the served credentials:
	// arn:<partition>:iam::<account>:instance-profile/<role name>.
	InstanceProfileARN string
	// TokenKey is the HMAC key of IMDSv2 session tokens, TokenKeySize bytes:
	// processes given the same key accept each other's tokens, so tokens
	// survive a restart. Nil: a random key per Server. Read by New only;
	// Update ignores it. Keep it secret: it mints tokens.
	TokenKey []byte
	// AllowedHosts are Host header values (host names or IP addresses, no
	// port) accepted besides 169.254.169.254, fd00:ec2::254, localhost,
	// 127.0.0.1, ::1 and the listener's own address; a request with any
	// other Host gets 403 (DNS-rebinding defence, hostcheck.go).
	AllowedHosts []string
	// MaxConns bounds the client connections one Serve keeps open
	// (connlimit.go). Zero means DefaultMaxConns. Read by Serve when it
	// starts.
	MaxConns int
}

// normalize validates c and returns a private copy with defaults applied.
func (c Config) normalize() (Config, error) {
	c.TokenKey = nil // used once by New; not kept in the running state
	var err error
	if c.AllowedHosts, err = normalizeHosts(c.AllowedHosts); err != nil || c.MaxConns < 0 {
		return Config{}, cmp.Or(err, fmt.Errorf("proxy: max connections %d is negative", c.MaxConns))
	}
	if c.Plan == nil {
		return Config{}, errors.New("proxy: no access plan")
	}
	if c.HopLimit == 0 {
		c.HopLimit = 1
	}
	if c.HopLimit < 1 || c.HopLimit > 64 {
		return Config{}, fmt.Errorf("proxy: hop limit %d out of range 1..64", c.HopLimit)
	}
	if c.UpstreamTimeout == 0 {
		c.UpstreamTimeout = DefaultUpstreamTimeout
	}
	if c.UpstreamTimeout < 0 || c.UpstreamTimeout > MaxUpstreamTimeout {
		return Config{}, fmt.Errorf("proxy: upstream timeout %s out of range (0, %s]", c.UpstreamTimeout, MaxUpstreamTimeout)
	}
	if c.Upstream != nil {
		u := *c.Upstream
		if u.User != nil {
			u.User = nil // never print credentials of the URL
			return Config{}, fmt.Errorf("proxy: upstream %s: user info not allowed", u.Redacted())
		}
		if (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || u.Opaque != "" {
			return Config{}, fmt.Errorf("proxy: upstream %q: want an http or https URL with a host", u.String())
		}
		if u.RawQuery != "" || u.Fragment != "" {
			return Config{}, fmt.Errorf("proxy: upstream %q: no query or fragment allowed", u.String())
		}
		c.Upstream = &u
	}
	if c.InstanceProfileARN != "" {
		if creds.AccountFromARN(c.InstanceProfileARN) == "" || !strings.Contains(c.InstanceProfileARN, ":instance-profile/") ||
			!headerSafe(c.InstanceProfileARN) {
			return Config{}, fmt.Errorf("proxy: invalid instance profile ARN %q", c.InstanceProfileARN)
		}
	}
	return c, nil
}

// sameUpstream reports whether a and b forward to the same place the same way.
func sameUpstream(a, b Config) bool {
	if (a.Upstream == nil) != (b.Upstream == nil) {
		return false
	}
	if a.Upstream != nil && a.Upstream.String() != b.Upstream.String() {
		return false
	}
	return a.UpstreamTimeout == b.UpstreamTimeout
}

// Server is the IMDS HTTP API. Create it with New; the zero value is not
// usable. All methods are safe for concurrent use: Update may be called while
// requests are served, and Serve may run on several listeners at once (for
// example an IPv4 and an IPv6 one), all sharing one configuration and one
// token key.
type Server struct {
	broker      *access.Broker
	id          Identifier // nil: clients are never identified
	log         *zap.Logger
	m           *metrics
	minter      *tokenMinter
	outstanding *outstandingTokens
	handler     http.Handler
	// now is the wall clock when set (tests set it before use); nil is the
	// real clock, read through clock and wall.
	now func() time.Time

	mu    sync.Mutex // serialises Update
	state atomic.Pointer[state]

	docs atomic.Pointer[docMemos] // last rendered credential documents, by role

	warnAt  atomic.Int64 // unix nanos of the last credential-error Warn
	hopWarn sync.Once
	lim     *limitMetrics // hostcheck.go, connlimit.go

}

// state is what Update swaps atomically.
type state struct {
	cfg Config
	pt  *passthrough // nil when Config.Upstream is nil
}

// New validates cfg and returns a Server that hands out credentials through
// broker, identifies client processes with id (nil: clients are never
// identified, and a plan that needs them identified sees the zero Client),
// logs to log (nil: no logging) and registers its metrics with reg (nil:
// metrics are kept but not registered). It fails on an invalid cfg or a nil
// broker, and panics when reg already holds the metrics of another Server.
func New(cfg Config, broker *access.Broker, id Identifier, log *zap.Logger, reg prometheus.Registerer) (*Server, error) {
	if broker == nil {
		return nil, errors.New("proxy: nil credential broker")
	}
	n, err := cfg.normalize()
	if err != nil {
		return nil, err
	}
	if log == nil {
		log = zap.NewNop()
	}
	minter, err := newTokenMinter(cfg.TokenKey)
	if err != nil {
		return nil, err
	}
	s := &Server{
		broker:      broker,
		id:          id,
		log:         log,
		minter:      minter,
		outstanding: newOutstandingTokens(time.Now()),
	}
	s.m, err = newMetrics(reg, func() float64 { return float64(s.outstanding.count(s.clock())) })
	if err != nil {
		return nil, err
	}
	if s.lim, err = newLimitMetrics(reg); err != nil {
		return nil, err
	}
	s.handler = http.HandlerFunc(s.serveHTTP)
	s.state.Store(&state{cfg: n, pt: s.newPassthrough(n)})
	return s, nil
}

func (s *Server) newPassthrough(cfg Config) *passthrough {
	if cfg.Upstream == nil {
		return nil
	}
	return newPassthrough(cfg.Upstream, cfg.UpstreamTimeout, s.m, s.log.Named("passthrough"),
		func() time.Time { return s.clock() })
}

// clock reads the wall clock: s.now when a test set it, else time.Now.
func (s *Server) clock() time.Time {
	if s.now != nil {
		return s.now()
	}
	return time.Now()
}

// wall is the wall-clock time of a request whose handler started at start
// (read with time.Now): start itself on the real clock, so a request reads
// the clock once for its decisions and once more for its duration; else
// the test's clock.
func (s *Server) wall(start time.Time) time.Time {
	if s.now != nil {
		return s.now()
	}
	return start
}

// Handler returns the IMDS HTTP handler. It is the same handler Serve uses;
// served through another http.Server it works the same except that the hop
// limit is not applied (that needs Serve's ConnContext).
func (s *Server) Handler() http.Handler { return s.handler }

// Update validates cfg and, if it is valid, atomically replaces the access
// plan, token mode, hop limit, allowed hosts, upstream and instance profile
// ARN for every request that starts afterwards. A new upstream (URL or timeout) gets a new
// connection pool and upstream token; in-flight requests finish with the old
// one. On error the running configuration is unchanged. Issued session tokens
// stay valid. The http.Server timeouts of a running Serve are not changed.
func (s *Server) Update(cfg Config) error {
	n, err := cfg.normalize()
	if err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	old := s.state.Load()
	pt := old.pt
	if !sameUpstream(old.cfg, n) {
		pt = s.newPassthrough(n)
		if old.pt != nil {
			defer old.pt.close()
		}
	}
	s.state.Store(&state{cfg: n, pt: pt})
	s.docs.Store(nil)
	s.log.Debug("configuration updated", zap.Uint32("plan", n.Plan.Gen()),
		zap.Bool("tokens_required", n.TokensRequired), zap.Int("hop_limit", n.HopLimit),
		zap.Bool("passthrough", n.Upstream != nil))
	return nil
}

// Serve serves the IMDS API on ln until ctx is done, then stops accepting,
// drains in-flight requests for a bounded time (at least 5s, and longer than
// UpstreamTimeout), closes what is left and returns nil. It returns an error
// only when serving fails before ctx is done. Serve closes ln. The request
// contexts are not derived from ctx, so a request in flight is not cancelled
// by the shutdown while it drains.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	cfg := s.state.Load().cfg
	errLog, _ := zap.NewStdLogAt(s.log.Named("http"), zap.WarnLevel)
	lim := newLimitListener(ln, cmp.Or(cfg.MaxConns, DefaultMaxConns), s.lim, access.ConnOwner(s.id))
	srv := &http.Server{
		ConnState:         trackConn,
		Handler:           s.handler,
		ReadHeaderTimeout: readHeaderTimeout,
		ReadTimeout:       readTimeout,
		WriteTimeout:      cfg.UpstreamTimeout + writeTimeoutSlack,
		IdleTimeout:       idleTimeout,
		MaxHeaderBytes:    maxHeaderBytes,
		ConnContext:       connAccessContext, // access.go
		ErrorLog:          errLog,
	}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(lim) }()
	select {
	case err := <-errc:
		return fmt.Errorf("proxy: serve: %w", err)
	case <-ctx.Done():
	}
	// No request of a connection accepted is dropped (connlimit.Shutdown):
	// on a hand-off (socket activation) the next process accepts the new
	// connections meanwhile.
	wait := max(minShutdownWait, cfg.UpstreamTimeout+time.Second)
	if connlimit.Shutdown(srv, lim.Listener, errc, freshConnWait, wait) {
		s.log.Warn("drain did not finish in time; closed the connections left", zap.Duration("wait", wait))
	}
	return nil
}

// routeOf maps a request path to its route and, for the credential routes,
// the requested role. Empty segments are ignored, so trailing (and doubled)
// slashes do not matter. A path whose first segment is not a version
// (isVersion) is not found; "/" itself (the version listing) is passed
// through. It allocates nothing (it runs on every request).
func routeOf(path string) (route, role string) {
	// The first maxRouteSegs non-empty segments, and how many there are.
	const maxRouteSegs = 5
	var segs [maxRouteSegs]string
	n := 0
	for i := 0; i < len(path); {
		if path[i] == '/' {
			i++
			continue
		}
		j := strings.IndexByte(path[i:], '/')
		if j < 0 {
			j = len(path) - i
		}
		if n < maxRouteSegs {
			segs[n] = path[i : i+j]
		}
		n++
		i += j
	}
	if n == 3 && segs[0] == "latest" && segs[1] == "api" && segs[2] == "token" {
		return routeToken, ""
	}
	if n > 0 && !isVersion(segs[0]) {
		// Only a version's tree is forwarded or routed: a path without one
		// (/meta-data/iam/…, /dynamic/instance-identity/…) would pass the
		// iam block and the protected-path check, which look past the
		// version segment, and reach the real IMDS with the daemon's token.
		return routeNotFound, ""
	}
	if n < 3 || !strings.EqualFold(segs[1], "meta-data") || !strings.EqualFold(segs[2], "iam") {
		return routePassthrough, ""
	}
	rest := segs[3:min(n, maxRouteSegs)]
	switch {
	case n > maxRouteSegs:
		return routeNotFound, ""
	case len(rest) == 0:
		return routeIAMList, ""
	case len(rest) == 1 && rest[0] == "info":
		return routeIAMInfo, ""
	case len(rest) == 1 && (rest[0] == "security-credentials" || rest[0] == "security-credentials-extended"):
		return routeRoleList, ""
	case len(rest) == 2 && rest[0] == "security-credentials":
		return routeCredentials, rest[1]
	case len(rest) == 2 && rest[0] == "security-credentials-extended":
		return routeCredentialsExtended, rest[1]
	}
	return routeNotFound, ""
}

// isVersion reports whether seg names a version of the metadata API as the
// real IMDS lists them at "/": "latest", "1.0" or a date, YYYY-MM-DD.
func isVersion(seg string) bool {
	if seg == "latest" || seg == "1.0" {
		return true
	}
	if len(seg) != len("2006-01-02") {
		return false
	}
	for i := 0; i < len(seg); i++ {
		if i == 4 || i == 7 {
			if seg[i] != '-' {
				return false
			}
		} else if seg[i] < '0' || seg[i] > '9' {
			return false
		}
	}
	return true
}

// badPath reports whether the request's path is not in canonical form and
// must be refused (400) rather than routed or forwarded: not absolute, a "."
// or ".." segment (also after percent-decoding: %2e), a percent-encoded
// slash, dot or backslash (a segment boundary the router and the real IMDS
// might draw differently), a backslash, or a control character such as NUL.
// Routing and the pass-through then see the same segments as any server
// would: no dot segment can take a request around the iam block or the
// pass-through policy.
func badPath(u *url.URL) bool {
	p := u.Path
	if p == "" || p[0] != '/' {
		return true
	}
	seg := 0 // start of the current segment
	for i := 0; i <= len(p); i++ {
		if i < len(p) {
			c := p[i]
			if c < 0x20 || c == 0x7f || c == '\\' {
				return true
			}
			if c != '/' {
				continue
			}
		}
		if s := p[seg:i]; s == "." || s == ".." {
			return true
		}
		seg = i + 1
	}
	if raw := u.RawPath; raw != "" && strings.IndexByte(raw, '%') >= 0 {
		raw = strings.ToLower(raw)
		for _, esc := range []string{"%2f", "%2e", "%5c"} {
			if strings.Contains(raw, esc) {
				return true
			}
		}
	}
	return false
}

var (
	allowRead  = []string{http.MethodGet, http.MethodHead}
	allowToken = []string{http.MethodPut}
)

func allowedMethods(route string) []string {
	if route == routeToken {
		return allowToken
	}
	return allowRead
}

func (s *Server) serveHTTP(w http.ResponseWriter, r *http.Request) {
	growstack.Grow() // a new connection's goroutine: its stack in one copy
	start := time.Now()
	ci := connInfoOf(r) // the one context lookup of the request
	if restore := ci.takeHopRestore(); restore != nil {
		// The previous response on this connection was a token, sent with
		// the hop limit. Restore it only once the client has acknowledged
		// every byte: a request sent before the token response arrived
		// (pipelined, or blind by a client beyond the limit) would
		// otherwise let a retransmission of it leave with the normal TTL
		// (hoplimit.go). Until then this answer carries the limit too.
		if n, ok := unacked(ci.conn); ok && n > 0 {
			ci.deferHopRestore(restore)
		} else {
			s.restoreHopLimit(restore)
		}
	}
	st := s.state.Load()
	rec := &recorder{ResponseWriter: w}
	route, role := routeOf(r.URL.Path)
	if route == routePassthrough && st.pt == nil {
		route = routeNotFound
	}
	defer func() {
		d := time.Since(start)
		code := rec.code()
		s.m.observe(route, code, d)
		if ce := s.log.Check(zap.DebugLevel, "request"); ce != nil {
			ce.Write(zap.String("route", route), zap.String("method", methodLabel(r.Method)),
				zap.Int("code", code), zap.Duration("duration", d))
		}
	}()
	s.serve(rec, r, ci, st, route, role, start)
}

func (s *Server) serve(w http.ResponseWriter, r *http.Request, ci *connInfo, st *state, route, role string, start time.Time) {
	uri := r.RequestURI
	if uri == "" {
		uri = r.URL.RequestURI()
	}
	if len(uri) > maxURIBytes {
		writeText(w, http.StatusRequestURITooLong, "Request-URI Too Long")
		return
	}
	if !s.checkRequest(w, r, ci, st) { // hostcheck.go: framing (smuggling) and Host (DNS rebinding)
		return
	}
	if badPath(r.URL) {
		writeText(w, http.StatusBadRequest, "Bad Request")
		return
	}
	if r.ContentLength > maxBodyBytes {
		writeText(w, http.StatusRequestEntityTooLarge, "Request Entity Too Large")
		return
	}
	if r.Body != nil && r.Body != http.NoBody {
		n, err := io.Copy(io.Discard, io.LimitReader(r.Body, maxBodyBytes+1))
		if n > maxBodyBytes {
			writeText(w, http.StatusRequestEntityTooLarge, "Request Entity Too Large")
			return
		}
		if err != nil {
			writeText(w, http.StatusBadRequest, "Bad Request")
			return
		}
		// The body is not used by any route and never forwarded.
		r2 := *r
		r2.Body, r2.ContentLength, r2.TransferEncoding = http.NoBody, 0, nil
		r = &r2
	}
	allowed := allowedMethods(route)
	if !contains(allowed, r.Method) {
		w.Header().Set("Allow", strings.Join(allowed, ", "))
		writeText(w, http.StatusMethodNotAllowed, "Method Not Allowed")
		return
	}
	now := s.wall(start) // the wall clock, read once for the request
	if route == routeToken {
		s.serveToken(w, r, ci, st, now)
		return
	}
	pin, ok := s.authorize(w, r, ci, st, now)
	if !ok {
		return
	}
	if isCredentialRoute(route) {
		s.serveDecided(w, r, ci, st, route, role, pin, now)
		return
	}
	switch route {
	case routeIAMList:
		writeText(w, http.StatusOK, "info\nsecurity-credentials/")
	case routePassthrough:
		if prot := st.cfg.Plan.Passthrough(); prot.Protected(r.URL.Path) {
			if d := prot.AllowPath(s.identify(r, ci, st.cfg.Plan, true)); d.Outcome != access.Serve {
				s.refusePath(w, d)
				return
			}
		}
		st.pt.proxy.ServeHTTP(w, r)
	default:
		writeText(w, http.StatusNotFound, "Not Found")
	}
}

// serveToken answers PUT /latest/api/token.
func (s *Server) serveToken(w http.ResponseWriter, r *http.Request, ci *connInfo, st *state, now time.Time) {
	if _, ok := r.Header["X-Forwarded-For"]; ok {
		s.m.rejections.WithLabelValues(rejectForwarded).Inc()
		writeText(w, http.StatusBadRequest, forwardedRejection)
		return
	}
	if _, ok := r.Header["Forwarded"]; ok { // RFC 7239: a proxy relayed it, as with X-Forwarded-For
		s.m.rejections.WithLabelValues(rejectForwarded).Inc()
		writeText(w, http.StatusBadRequest, forwardedRFC7239Rejection)
		return
	}
	ttl, ok := parseTTL(r.Header.Values(headerTokenTTL))
	if !ok {
		s.m.rejections.WithLabelValues(rejectBadTTL).Inc()
		writeText(w, http.StatusBadRequest, "invalid token TTL")
		return
	}
	tok, exp, err := s.minter.mint(now, ttl, st.cfg.Plan.Gen())
	if err != nil {
		s.log.Error("cannot mint session token", zap.Error(err))
		writeText(w, http.StatusInternalServerError, "Internal Server Error")
		return
	}
	s.outstanding.add(now, exp)
	s.m.tokensIssued.Inc()

	h := w.Header()
	h.Set(headerTokenTTL, strconv.Itoa(ttl))
	h.Set("Content-Type", "text/plain")
	h.Set("Content-Length", strconv.Itoa(len(tok)))
	restore := s.applyHopLimit(ci, st.cfg.HopLimit)
	w.WriteHeader(http.StatusOK)
	_, _ = io.WriteString(w, tok)
	if restore != nil {
		_ = http.NewResponseController(w).Flush()
		// Kept until the connection's next request (hoplimit.go): a
		// retransmission of this response must carry the limit too.
		if !ci.deferHopRestore(restore) {
			s.restoreHopLimit(restore)
		}
	}
}

// restoreHopLimit runs the restore of a hop limit set for a token response.
func (s *Server) restoreHopLimit(restore func() error) {
	if err := restore(); err != nil {
		s.log.Debug("cannot restore hop limit", zap.Error(err))
	}
}

// applyHopLimit sets the hop limit on the request's connection (when served
// by Serve) and returns the function that restores it, or nil.
func (s *Server) applyHopLimit(ci *connInfo, hops int) func() error {
	c := ci.connection()
	if c == nil {
		return nil
	}
	restore, err := setHopLimit(c, hops)
	if err != nil {
		if !errors.Is(err, errHopLimitUnsupported) {
			s.hopWarn.Do(func() {
				s.log.Warn("cannot set the hop limit of token responses", zap.Error(err))
			})
		}
		return nil
	}
	return restore
}

// authorize checks the client's session token and returns the plan
// generation it pins (0: none, IMDSv1). It writes the 401 and returns false
// when the request must be refused.
func (s *Server) authorize(w http.ResponseWriter, r *http.Request, ci *connInfo, st *state, now time.Time) (uint32, bool) {
	vals := r.Header[headerToken] // canonical: no Values (it canonicalises the key)
	if len(vals) == 0 || (len(vals) == 1 && vals[0] == "") {
		if !st.cfg.TokensRequired {
			return 0, true // IMDSv1
		}
		s.m.rejections.WithLabelValues(rejectMissing).Inc()
		writeText(w, http.StatusUnauthorized, "no token provided")
		return 0, false
	}
	status, pin := tokenInvalid, uint32(0)
	if len(vals) == 1 {
		memo := ci.memo() // nil when not served by Serve
		if gen, ok := memo.verifiedToken(vals[0], now); ok {
			return gen, true
		}
		var exp int64
		status, pin, exp = s.minter.check(vals[0], now)
		if status == tokenValid && memo != nil {
			memo.rememberToken(vals[0], exp, pin)
		}
	}
	switch status {
	case tokenValid:
		return pin, true
	case tokenExpired:
		s.m.rejections.WithLabelValues(rejectExpired).Inc()
	default:
		s.m.rejections.WithLabelValues(rejectInvalid).Inc()
	}
	writeText(w, http.StatusUnauthorized, "invalid token provided")
	return 0, false
}

// serveDecided answers the credential routes: the role listing,
// security-credentials[-extended]/<role> and iam/info. The plan of st
// decides once, for the client process behind the connection and the
// generation the session token pins; a refusal is 403 (deny) or 503
// (retry); a role name the decision does not answer gets the same 404 as an
// unknown role.
func (s *Server) serveDecided(w http.ResponseWriter, r *http.Request, ci *connInfo, st *state, route, role string, pin uint32, now time.Time) {
	plan := st.cfg.Plan
	who := s.client(r, ci, plan, route == routeCredentials || route == routeCredentialsExtended)
	var d access.Decision
	switch route {
	case routeCredentials, routeCredentialsExtended:
		var answered bool
		if d, answered = plan.DecideName(who, pin, role, now); !answered {
			writeText(w, http.StatusNotFound, "Not Found")
			return
		}
	default:
		d = plan.Decide(who, pin, now)
	}
	if d.Outcome != access.Serve {
		s.refuse(w, d, who, route) // access.go
		return
	}
	if route == routeRoleList {
		writeText(w, http.StatusOK, d.Name)
		return
	}
	var c creds.Credentials
	var err error
	if route == routeIAMInfo {
		c, err = s.broker.Info(r.Context(), d) // no credentials handed out: not audited
	} else {
		c, err = s.broker.Credentials(r.Context(), d, who, doorIMDS, route, role)
	}
	if err != nil || c.LastUpdated.After(now) {
		// The request waited on upstream (the cache answers from memory
		// otherwise, within microseconds of now): read the clock again.
		now = s.clock()
	}
	if err != nil || !usable(c, now) {
		s.serveError(w, route, err, now)
		return
	}
	if route == routeIAMInfo {
		arn := instanceProfileARN(&st.cfg, d.Name, d.Host, c)
		if arn == "" {
			writeBody(w, http.StatusOK, errorDocument(codeNoProfile, errorMessages[codeNoProfile], now))
			return
		}
		writeBody(w, http.StatusOK, iamInfoDocument(arn, c, now))
		return
	}
	writeBody(w, http.StatusOK, s.credentialBody(d.Name, c, now, route == routeCredentialsExtended))
}

// doorIMDS names this front door in metrics and audit lines.
const doorIMDS = access.DoorIMDS

// docMemo holds the rendered credential documents of one set of credentials.
// The byte slices are shared between requests and never modified.
type docMemo struct {
	c                creds.Credentials
	legacy, extended []byte
}

// docMemos maps a served role name to the last documents rendered for it.
// It is copied on write (a new map per refresh of one role) and read
// without a lock; Update drops it, so names no longer served do not stay.
type docMemos map[string]*docMemo

// credentialBody renders the credential document of c, served as role,
// reusing the last rendering for role while the source keeps returning the
// same credentials: the cache hands out one value per refresh, so a hit
// costs a map lookup and a comparison instead of JSON encoding. A memo is
// used only when it holds exactly c (every field, secret and role ARN
// included), so two roles' credentials never share a document; keying by
// role keeps several roles' memos from evicting each other. Credentials
// without LastUpdated are rendered every time (their document depends on
// now).
func (s *Server) credentialBody(role string, c creds.Credentials, now time.Time, extended bool) []byte {
	if c.LastUpdated.IsZero() {
		return credentialDocument(c, now, extended)
	}
	var m *docMemo
	if p := s.docs.Load(); p != nil {
		m = (*p)[role]
	}
	if m == nil || m.c != c {
		m = &docMemo{c: c, legacy: credentialDocument(c, now, false), extended: credentialDocument(c, now, true)}
		s.storeDoc(role, m)
	}
	if extended {
		return m.extended
	}
	return m.legacy
}

// storeDoc records m as role's memo: a copy of the memo map with m in it.
// A lost race only costs a later re-rendering.
func (s *Server) storeDoc(role string, m *docMemo) {
	for {
		old := s.docs.Load()
		var next docMemos
		if old == nil {
			next = docMemos{role: m}
		} else {
			next = make(docMemos, len(*old)+1)
			for k, v := range *old {
				next[k] = v
			}
			next[role] = m
		}
		if s.docs.CompareAndSwap(old, &next) {
			return
		}
	}
}

// credentialWarnEvery bounds credential-error Warn lines; the rest go to Debug.
const credentialWarnEvery = 10 * time.Second

// serveError writes the HTTP 200 error document for a failed credential
// lookup (err != nil) or unusable credentials (err == nil) and logs why.
func (s *Server) serveError(w http.ResponseWriter, route string, err error, now time.Time) {
	code, class, permanent := codeNoCredentials, "", false
	if err != nil {
		class, permanent = creds.Classify(err)
		code = errorCode(class)
	}
	lvl := zap.DebugLevel
	if t, last := time.Now().UnixNano(), s.warnAt.Load(); t-last >= int64(credentialWarnEvery) && s.warnAt.CompareAndSwap(last, t) {
		lvl = zap.WarnLevel
	}
	if ce := s.log.Check(lvl, "no credentials to serve"); ce != nil {
		fields := []zap.Field{zap.String("route", route), zap.String("code", code)}
		if err != nil {
			fields = append(fields, zap.String("class", class), zap.Bool("permanent", permanent), zap.Error(err))
		}
		ce.Write(fields...)
	}
	writeBody(w, http.StatusOK, errorDocument(code, errorMessages[code], now))
}

// writeText writes a complete text/plain response in one go.
func writeText(w http.ResponseWriter, status int, body string) {
	writeBody(w, status, []byte(body))
}

// writeBody writes a complete text/plain response with Content-Length, so
// net/http sends header and body in one write.
func writeBody(w http.ResponseWriter, status int, body []byte) {
	h := w.Header()
	// The keys are canonical already: Header.Set would canonicalise them
	// again on every response. The values are shared and never modified:
	// net/http copies the header at WriteHeader, and each slice is full
	// (len = cap = 1), so an append copies it too.
	h["Content-Type"] = textPlain
	if len(body) >= autoLengthBelow {
		h["Content-Length"] = contentLength(len(body))
	}
	w.WriteHeader(status)
	_, _ = w.Write(body)
}

// autoLengthBelow is the size of net/http's response buffer
// (bufferBeforeChunkingSize): a shorter body is still buffered whole when
// the handler returns, and net/http sends its Content-Length itself (for
// HEAD too: it counts the body it does not send), as cheaply as it can be
// done; a longer one would be chunked, so writeBody sets it.
// TestWriteBodyFraming holds net/http to this.
const autoLengthBelow = 2048

var textPlain = []string{"text/plain"}

// lengthValue is a Content-Length header value and the length it is for.
type lengthValue struct {
	n int
	v []string
}

// lastLength is the value of the last body contentLength was asked for: a
// role's documents keep one length while its credentials last.
var lastLength atomic.Pointer[lengthValue]

// contentLength is the Content-Length header value of a body of n bytes,
// full (len = cap = 1) and shared: a repeated length costs no allocation.
func contentLength(n int) []string {
	if l := lastLength.Load(); l != nil && l.n == n {
		return l.v
	}
	l := &lengthValue{n: n, v: []string{strconv.Itoa(n)}}
	lastLength.Store(l)
	return l.v
}

func contains(list []string, s string) bool {
	for _, v := range list {
		if v == s {
			return true
		}
	}
	return false
}

// methodLabel bounds a client-sent method for logging.
func methodLabel(m string) string {
	switch m {
	case http.MethodGet, http.MethodHead, http.MethodPut, http.MethodPost, http.MethodDelete,
		http.MethodPatch, http.MethodOptions, http.MethodConnect, http.MethodTrace:
		return m
	}
	return "other"
}

// recorder remembers the status code written through it. It passes Flush on
// and exposes the wrapped writer to http.ResponseController.
type recorder struct {
	http.ResponseWriter
	status int
}

func (r *recorder) WriteHeader(code int) {
	if r.status == 0 && (code < 100 || code > 199 || code == http.StatusSwitchingProtocols) {
		r.status = code
	}
	r.ResponseWriter.WriteHeader(code)
}

func (r *recorder) Write(b []byte) (int, error) {
	if r.status == 0 {
		r.status = http.StatusOK
	}
	return r.ResponseWriter.Write(b)
}

func (r *recorder) Flush() {
	_ = http.NewResponseController(r.ResponseWriter).Flush()
}

func (r *recorder) Unwrap() http.ResponseWriter { return r.ResponseWriter }

// code is the status sent (200 when the handler wrote nothing).
func (r *recorder) code() int {
	if r.status == 0 {
		return http.StatusOK
	}
	return r.status
}

// freshConnWait bounds how long Serve waits, at shutdown, for accepted
// connections to send their first request.
const freshConnWait = time.Second

// trackConn is Serve's ConnState hook: each connection of Serve's listener
// records its idleness (the connection limit's eviction) and the end of its
// freshness (connlimit.Listener.WaitFresh). It runs on every state change
// of every connection (twice per request), and takes no lock.
func trackConn(c net.Conn, st http.ConnState) {
	if lc, ok := c.(*limitConn); ok {
		lc.Track(st)
	}
}
