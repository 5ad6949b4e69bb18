// Package container is the container credentials endpoint of imdsproxy:
// the HTTP API that AWS SDKs call when AWS_CONTAINER_CREDENTIALS_FULL_URI
// is set (the ECS and EKS Pod Identity style, before IMDS in every SDK's
// default chain), with a per-workload authorization token.
//
// Each workload of the workloads: list gets its own token (Tokens): 32
// random bytes, rotated on a schedule and on demand, written atomically to
// a file only the workload's uid can read; SDKs send it verbatim in the
// Authorization header (AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE). A Server
// maps the token to the workload and asks the access.Plan of the
// configuration in force (Plan.DecideWorkload: when the client is a
// process of this host, the plan's own decision for it must agree) and
// serves through the access.Broker, like every front door.
//
// Requests are bounded and strict: GET of the one configured path, a Host
// that names the endpoint, no body; the token is compared in constant
// time and never logged.
package container

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/imdsproxy/imdsproxy/access"
	"github.com/imdsproxy/imdsproxy/connlimit"
	"github.com/imdsproxy/imdsproxy/creds"
	"github.com/imdsproxy/imdsproxy/growstack"
)

// Request limits.
const (
	maxURIBytes       = 1024
	maxHeaderBytes    = 8 << 10
	readHeaderTimeout = 2 * time.Second
	readTimeout       = 5 * time.Second
	writeTimeout      = 10 * time.Second // a request waits at most 2 × access.DefaultWait for an exchange (key, fallback)
	idleTimeout       = 60 * time.Second
	shutdownWait      = 5 * time.Second
	// freshConnWait bounds how long Serve waits, at shutdown, for the
	// accept loop to return and for accepted connections to send their
	// first request.
	freshConnWait = time.Second
	// MaxConns bounds the connections one Serve keeps open.
	MaxConns = 1024
)

// Identifier finds the local process at the other end of a connection
// (access.Identifier; *peer.Resolver implements it). A client in another
// network namespace (a container on a bridge) is identified by its token.
type Identifier = access.Identifier

// Config is what a Server serves by; New and Update validate it.
type Config struct {
	// Plan decides (access.Plan.DecideWorkload). Required.
	Plan *access.Plan
	// Path is the one path answered (container.path).
	Path string
}

// Server is the container credentials endpoint. Create it with New; safe
// for concurrent use, Update included.
type Server struct {
	broker *access.Broker
	tokens *Tokens
	id     Identifier
	log    *zap.Logger
	m      *metrics
	now    func() time.Time
	cfg    atomic.Pointer[Config]

	maxConns int // connections one Serve keeps open; 0 means MaxConns (tests lower it)
}

// New returns a Server answering for the workloads of tokens through
// broker, identifying clients with id (nil: never; every client is then
// taken for one that is not local, and only the token decides), logging to
// log and registering its metrics, and the tokens', with reg (nil: none).
func New(cfg Config, tokens *Tokens, broker *access.Broker, id Identifier, log *zap.Logger, reg prometheus.Registerer) (*Server, error) {
	if broker == nil || tokens == nil {
		return nil, errors.New("container: nil broker or tokens")
	}
	if log == nil {
		log = zap.NewNop()
	}
	s := &Server{broker: broker, tokens: tokens, id: id, log: log, m: newMetrics(reg), now: time.Now}
	tokens.mu.Lock()
	tokens.m = s.m
	tokens.publishLocked()
	tokens.mu.Unlock()
	broker.AddDoor(access.DoorContainer)
	if err := s.Update(cfg); err != nil {
		return nil, err
	}
	return s, nil
}

// Update replaces the plan and path for every request that starts
// afterwards; on error nothing changes.
func (s *Server) Update(cfg Config) error {
	if cfg.Plan == nil {
		return errors.New("container: no access plan")
	}
	if !pathRe.MatchString(cfg.Path) {
		return fmt.Errorf("container: invalid path %q", cfg.Path)
	}
	s.cfg.Store(&cfg)
	return nil
}

// Handler returns the endpoint's handler (Serve's, without the
// identification of clients, which needs Serve's connections).
func (s *Server) Handler() http.Handler { return http.HandlerFunc(s.serveHTTP) }

// Serve serves on ln until ctx is done, then stops accepting, drains for
// at most 5s and returns nil. It closes ln.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	errLog, _ := zap.NewStdLogAt(s.log.Named("http"), zap.WarnLevel)
	srv := &http.Server{
		ConnState:         connlimit.TrackIdle,
		Handler:           s.Handler(),
		ReadHeaderTimeout: readHeaderTimeout,
		ReadTimeout:       readTimeout,
		WriteTimeout:      writeTimeout,
		IdleTimeout:       idleTimeout,
		MaxHeaderBytes:    maxHeaderBytes,
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			return context.WithValue(ctx, connKey{}, &connMemo{conn: c})
		},
		ErrorLog: errLog,
	}
	errc := make(chan error, 1)
	// At the limit a new connection takes the place of the keep-alive
	// connection idle the longest: connections that merely stay open
	// cannot lock clients out.
	lim := connlimit.NewListener(ln, cmp.Or(s.maxConns, MaxConns), connlimit.Metrics{Evicted: s.m.idleClosed, OverShare: s.m.overShare})
	if owner := access.ConnOwner(s.id); owner != nil {
		lim.ShareByOwner(owner)
	}
	go func() { errc <- srv.Serve(lim) }()
	select {
	case err := <-errc:
		return fmt.Errorf("container: serve: %w", err)
	case <-ctx.Done():
	}
	// As the IMDS listener: no request of a connection accepted is dropped
	// (a restart hands the socket to the next process).
	connlimit.Shutdown(srv, lim, errc, freshConnWait, shutdownWait)
	return nil
}

// connKey is the context key of a connection's *connMemo.
type connKey struct{}

// connMemo is a connection and the client identified on it (once).
type connMemo struct {
	conn   net.Conn
	client access.ConnClient
}

// Error codes of the JSON error documents ({"code","message"}, which the
// Go SDK decodes; every SDK fails on a non-2xx status).
const (
	codeMissingToken = "MissingToken"
	codeInvalidToken = "InvalidToken"
	codeAccessDenied = "AccessDenied"
	codeRetry        = "ClientNotIdentified"
	codeNotFound     = "NotFound"
	codeMethod       = "MethodNotAllowed"
	codeBadRequest   = "BadRequest"
	codeUnavailable  = "CredentialsUnavailable"
)

// statusRecorder remembers the status written.
type statusRecorder struct {
	http.ResponseWriter
	code int
}

func (r *statusRecorder) WriteHeader(code int) {
	if r.code == 0 {
		r.code = code
	}
	r.ResponseWriter.WriteHeader(code)
}

func (s *Server) serveHTTP(w http.ResponseWriter, r *http.Request) {
	growstack.Grow() // a new connection's goroutine: its stack in one copy
	start := time.Now()
	rec := &statusRecorder{ResponseWriter: w}
	s.serve(rec, r)
	s.m.observe(rec.code, time.Since(start))
}

func (s *Server) serve(w *statusRecorder, r *http.Request) {
	cfg := s.cfg.Load()
	if reason, status, msg := s.check(r, cfg); reason != "" {
		s.m.rejections.WithLabelValues(reason).Inc()
		code := codeBadRequest
		switch status {
		case http.StatusMethodNotAllowed:
			w.Header().Set("Allow", http.MethodGet)
			code = codeMethod
		case http.StatusNotFound:
			code = codeNotFound
		case http.StatusForbidden:
			code = codeAccessDenied
		}
		if status == http.StatusBadRequest || status == http.StatusRequestEntityTooLarge {
			w.Header().Set("Connection", "close")
		}
		writeError(w, status, code, msg)
		return
	}
	vals := r.Header.Values("Authorization")
	if len(vals) == 0 || vals[0] == "" {
		s.m.rejections.WithLabelValues(rejectNoToken).Inc()
		writeError(w, http.StatusUnauthorized, codeMissingToken, "no authorization token: set AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE to the workload's token file")
		return
	}
	id, ok := "", false
	if len(vals) == 1 {
		id, ok = s.tokens.Lookup(vals[0])
	}
	if !ok {
		s.m.rejections.WithLabelValues(rejectBadToken).Inc()
		writeError(w, http.StatusUnauthorized, codeInvalidToken, "the authorization token is not valid (replaced or unknown): read the token file again")
		return
	}
	who := s.client(r, cfg.Plan)
	d := cfg.Plan.DecideWorkload(id, who)
	if d.Outcome != access.Serve {
		s.broker.Refused(d, access.DoorContainer)
		if ce := s.log.Check(zap.DebugLevel, "credential request refused"); ce != nil {
			ce.Write(append(access.ClientFields(who), zap.String("workload", id), zap.String("reason", d.Why))...)
		}
		if d.Outcome == access.Retry {
			w.Header().Set("Retry-After", "1")
			writeError(w, http.StatusServiceUnavailable, codeRetry, "the client process could not be identified; retry")
			return
		}
		writeError(w, http.StatusForbidden, codeAccessDenied, "access denied: this token is not for this process, or the process may not read credentials")
		return
	}
	c, err := s.broker.Credentials(r.Context(), d, who, access.DoorContainer, "credentials", "")
	now := s.now()
	if err != nil || !usable(c, now) {
		if err != nil {
			class, _ := creds.Classify(err)
			s.log.Debug("credentials unavailable", zap.String("workload", id), zap.String("class", class), zap.Error(err))
		}
		w.Header().Set("Retry-After", "1")
		writeError(w, http.StatusServiceUnavailable, codeUnavailable, "no valid credentials are available yet; retry later")
		return
	}
	writeBody(w, http.StatusOK, Document(c))
}

// check applies the request limits; it returns the rejection reason, the
// status and the message, or "" when the request may go on.
func (s *Server) check(r *http.Request, cfg *Config) (reason string, status int, msg string) {
	uri := r.RequestURI
	if uri == "" {
		uri = r.URL.RequestURI()
	}
	switch {
	case len(uri) > maxURIBytes:
		return rejectRequest, http.StatusRequestURITooLong, "request URI too long"
	case len(r.TransferEncoding) > 0 || r.ContentLength > 0:
		return rejectRequest, http.StatusBadRequest, "a credentials request has no body"
	}
	if local, ok := r.Context().Value(http.LocalAddrContextKey).(net.Addr); ok && !hostAllowed(r.Host, local) {
		return rejectHost, http.StatusForbidden, "Host header not allowed"
	}
	if r.URL.Path != cfg.Path || r.URL.RawQuery != "" || r.URL.RawPath != "" {
		return rejectPath, http.StatusNotFound, "not found"
	}
	if r.Method != http.MethodGet {
		return rejectMethod, http.StatusMethodNotAllowed, "only GET"
	}
	return "", 0, ""
}

// client identifies the process behind r's connection, once per
// connection (again while unresolved), with its pid and exe when plan
// audits. Every decision here depends on it (the token's owner).
func (s *Server) client(r *http.Request, plan *access.Plan) access.Client {
	memo, _ := r.Context().Value(connKey{}).(*connMemo)
	if s.id == nil || memo == nil {
		return access.Client{}
	}
	return memo.client.Get(r.Context(), s.id, memo.conn, plan.Audit(), true, s.log)
}

// hostAllowed reports whether the Host header host names this endpoint:
// the address the connection arrived on, loopback names, or the
// link-local addresses, each with or without a numeric port.
func hostAllowed(host string, local net.Addr) bool {
	name := host
	if h, port, err := net.SplitHostPort(host); err == nil {
		if port == "" || len(port) > 5 || strings.Trim(port, "0123456789") != "" {
			return false
		}
		name = h
		if strings.Contains(name, ":") && !strings.HasPrefix(host, "[") {
			return false
		}
	} else if strings.HasPrefix(host, "[") && strings.HasSuffix(host, "]") {
		name = host[1 : len(host)-1]
	} else if strings.ContainsAny(host, ":[]") {
		return false
	}
	if name == "" || strings.Contains(name, "%") {
		return false
	}
	if strings.EqualFold(name, "localhost") {
		return true
	}
	ip := net.ParseIP(name)
	if ip == nil {
		return false
	}
	if ip.IsLoopback() || ip.Equal(LinkLocalIPv4.AsSlice()) || ip.Equal(LinkLocalIPv6.AsSlice()) {
		return true
	}
	ta, ok := local.(*net.TCPAddr)
	return ok && ip.Equal(ta.IP)
}

// usable reports whether c may be served at now: complete, valid, and its
// Expiration (whole seconds) in the future.
func usable(c creds.Credentials, now time.Time) bool {
	return c.ValidAt(now) && c.Expires.Truncate(time.Second).After(now)
}

// TimeLayout is the Expiration format: RFC 3339, UTC, whole seconds.
const TimeLayout = "2006-01-02T15:04:05Z"

// document is the endpoint's answer, as SDKs read it: AccessKeyId,
// SecretAccessKey, Token, Expiration (RFC 3339), and AccountId (Go, JS and
// newer botocore use it) and RoleArn (ignored by SDKs) when known.
type document struct {
	AccessKeyID     string `json:"AccessKeyId"`
	SecretAccessKey string `json:"SecretAccessKey"`
	Token           string `json:"Token"`
	Expiration      string `json:"Expiration"`
	AccountID       string `json:"AccountId,omitempty"`
	RoleARN         string `json:"RoleArn,omitempty"`
}

// Document renders the credentials document of c.
func Document(c creds.Credentials) []byte {
	acct := c.AccountID
	if acct == "" {
		acct = creds.AccountFromARN(c.RoleARN)
	}
	b, _ := json.Marshal(document{
		AccessKeyID: c.AccessKeyID, SecretAccessKey: c.SecretAccessKey, Token: c.SessionToken,
		Expiration: c.Expires.UTC().Format(TimeLayout), AccountID: acct, RoleARN: c.RoleARN,
	})
	return b
}

func writeError(w http.ResponseWriter, status int, code, msg string) {
	b, _ := json.Marshal(struct {
		Code    string `json:"code"`
		Message string `json:"message"`
	}{code, msg})
	writeBody(w, status, b)
}

// writeBody writes a JSON body in one write (Content-Type exactly
// application/json: the Go SDK decodes error bodies only then).
func writeBody(w http.ResponseWriter, status int, body []byte) {
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Cache-Control", "no-store")
	h.Set("Content-Length", fmt.Sprint(len(body)))
	w.WriteHeader(status)
	_, _ = w.Write(body)
}
