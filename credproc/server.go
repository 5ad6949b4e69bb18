package credproc

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promauto"
	"go.uber.org/zap"

	"github.com/imdsproxy/imdsproxy/access"
	"github.com/imdsproxy/imdsproxy/connlimit"
	"github.com/imdsproxy/imdsproxy/creds"
	"github.com/imdsproxy/imdsproxy/growstack"
	"github.com/imdsproxy/imdsproxy/peer"
)

// Bounds of one connection.
const (
	readTimeout  = 2 * time.Second  // the request line
	fetchTimeout = 35 * time.Second // a first request may wait for an exchange (cache.fetch_timeout, 30s)
	writeTimeout = 5 * time.Second
	shutdownWait = 5 * time.Second
	// MaxConns bounds the connections served at once; more wait in the
	// listen backlog.
	MaxConns = 256
)

// Results of imdsproxy_process_requests_total.
const (
	resultOK = "ok"
)

var results = []string{resultOK, CodeBadRequest, CodeAccessDenied, CodeNotFound, CodeRetry, CodeUnavailable}

// Server answers the credential_process socket. Create it with New; safe
// for concurrent use, Update included.
type Server struct {
	broker   *access.Broker
	log      *zap.Logger
	plan     atomic.Pointer[access.Plan]
	identify func(*net.UnixConn) (peer.Info, error)
	owner    connlimit.OwnerFunc // nil: no shares of the connections by uid
	now      func() time.Time

	requests  *prometheus.CounterVec
	duration  prometheus.Histogram
	overShare prometheus.Counter
}

// unixOwner names the user of a unix socket's peer, for the shares of the
// connections (connlimit.Listener.ShareByOwner): its uid (SO_PEERCRED), or
// the user a subordinate uid is delegated to (users; nil: none known).
func unixOwner(users *peer.Users) connlimit.OwnerFunc {
	return func(c net.Conn) (uint32, bool) {
		uc, ok := c.(*net.UnixConn)
		if !ok {
			return 0, false
		}
		uid, err := peer.UnixUID(uc)
		if err != nil || uid < 0 {
			return 0, false
		}
		return users.Of(uint32(uid)), true
	}
}

// MapUsers makes the shares of the connections count each subordinate uid
// (peer.Users) against the user it is delegated to. Call it before Serve.
func (s *Server) MapUsers(users *peer.Users) { s.owner = unixOwner(users) }

// New returns a Server deciding by plan and serving through broker,
// logging to log and registering its metrics with reg (nil: none).
func New(plan *access.Plan, broker *access.Broker, log *zap.Logger, reg prometheus.Registerer) (*Server, error) {
	if plan == nil || broker == nil {
		return nil, errors.New("credproc: nil plan or broker")
	}
	if log == nil {
		log = zap.NewNop()
	}
	f := promauto.With(reg)
	s := &Server{
		broker: broker, log: log, identify: peer.LookupUnix, owner: unixOwner(nil), now: time.Now,
		requests: f.NewCounterVec(prometheus.CounterOpts{
			Name: "imdsproxy_process_requests_total",
			Help: "Requests on the credential_process socket, by result (ok, bad_request, access_denied, not_found, retry, unavailable).",
		}, []string{"result"}),
		duration: f.NewHistogram(prometheus.HistogramOpts{
			Name:    "imdsproxy_process_request_duration_seconds",
			Help:    "Time to answer a request on the credential_process socket, from the request line to the answer.",
			Buckets: []float64{0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5},
		}),
		overShare: f.NewCounter(prometheus.CounterOpts{
			Name: "imdsproxy_process_connections_over_share_total",
			Help: "New connections to the credential_process socket closed at once because their uid already held a quarter of the slots while more than half were taken.",
		}),
	}
	for _, r := range results {
		s.requests.WithLabelValues(r)
	}
	broker.AddDoor(access.DoorProcess)
	s.plan.Store(plan)
	return s, nil
}

// Update replaces the plan for every request that starts afterwards.
func (s *Server) Update(plan *access.Plan) error {
	if plan == nil {
		return errors.New("credproc: nil plan")
	}
	s.plan.Store(plan)
	return nil
}

// Serve answers on ln (a unix stream listener) until ctx is done, then
// stops accepting, waits at most 5s for the answers in progress and
// returns nil. It closes ln.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	var wg sync.WaitGroup
	// MaxConns at once (a connection closes when answered), and no one uid
	// holding more than about three quarters of them with connections that
	// never send their request: the others find room at once.
	lim := connlimit.NewListener(ln, MaxConns, connlimit.Metrics{OverShare: s.overShare})
	if s.owner != nil {
		lim.ShareByOwner(s.owner)
	}
	stop := context.AfterFunc(ctx, func() { lim.Close() })
	defer stop()
	var err error
	for {
		var c net.Conn
		if c, err = lim.Accept(); err != nil {
			break
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			s.handle(context.WithoutCancel(ctx), c)
		}()
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(shutdownWait):
	}
	if ctx.Err() != nil {
		return nil
	}
	return fmt.Errorf("credproc: accept: %w", err)
}

// handle answers one connection.
func (s *Server) handle(ctx context.Context, c net.Conn) {
	growstack.Grow() // the connection's new goroutine: its stack in one copy
	defer c.Close()
	start := time.Now()
	resp, who, result := s.answer(ctx, c)
	body, _ := json.Marshal(resp)
	if len(body)+1 > MaxResponse {
		// No client reads it: say so instead of sending what it must refuse.
		s.log.Warn("credential_process answer too large", zap.Int("bytes", len(body)+1), zap.Int("max_bytes", MaxResponse))
		result = CodeUnavailable
		body, _ = json.Marshal(Response{Version: Version, Error: &Error{Code: CodeUnavailable,
			Message: fmt.Sprintf("the credentials make an answer of %d bytes, more than the protocol's %d", len(body)+1, MaxResponse)}})
	}
	_ = c.SetWriteDeadline(time.Now().Add(writeTimeout))
	_, err := c.Write(append(body, '\n'))
	s.requests.WithLabelValues(result).Inc()
	s.duration.Observe(time.Since(start).Seconds())
	if ce := s.log.Check(zap.DebugLevel, "credential_process request"); ce != nil {
		ce.Write(append(access.ClientFields(who), zap.String("result", result), zap.NamedError("write_error", err))...)
	}
}

// answer reads and decides one request.
func (s *Server) answer(ctx context.Context, c net.Conn) (Response, access.Client, string) {
	fail := func(code, msg string) Response {
		return Response{Version: Version, Error: &Error{Code: code, Message: msg}}
	}
	_ = c.SetReadDeadline(time.Now().Add(readTimeout))
	line, err := bufio.NewReaderSize(io.LimitReader(c, MaxRequest), MaxRequest).ReadSlice('\n')
	var req Request
	if err == nil {
		err = decodeLine(line, &req)
	}
	switch {
	case err != nil:
		return fail(CodeBadRequest, fmt.Sprintf("a request is one line of JSON of at most %d bytes, such as {\"version\":1}", MaxRequest)), access.Client{}, CodeBadRequest
	case req.Version != Version:
		return fail(CodeBadRequest, fmt.Sprintf("protocol version %d, this daemon speaks %d", req.Version, Version)), access.Client{}, CodeBadRequest
	case req.Role != "" && !creds.ValidRoleName(req.Role):
		return fail(CodeBadRequest, "the role is not a role name"), access.Client{}, CodeBadRequest
	}
	who := access.Client{Unresolved: true}
	if lc, ok := c.(*connlimit.Conn); ok {
		c = lc.Conn // Serve's listener's
	}
	if uc, ok := c.(*net.UnixConn); ok {
		if info, err := s.identify(uc); err == nil {
			who = access.Client{Local: true, Info: info}
		} else {
			s.log.Debug("cannot identify the client process", zap.Error(err))
		}
	}
	plan := s.plan.Load()
	now := s.now()
	var d access.Decision
	if req.Role == "" {
		d = plan.Decide(who, 0, now)
	} else {
		var answered bool
		if d, answered = plan.DecideName(who, 0, req.Role, now); !answered {
			return fail(CodeNotFound, "role "+req.Role+" is not served to this process (it is served "+d.Name+")"), who, CodeNotFound
		}
	}
	switch d.Outcome {
	case access.Deny:
		s.broker.Refused(d, access.DoorProcess)
		return fail(CodeAccessDenied, "access denied for this process ("+d.Why+")"), who, CodeAccessDenied
	case access.Retry:
		s.broker.Refused(d, access.DoorProcess)
		return fail(CodeRetry, "this process could not be identified; retry"), who, CodeRetry
	}
	fctx, cancel := context.WithTimeout(ctx, fetchTimeout)
	defer cancel()
	cr, err := s.broker.Credentials(fctx, d, who, access.DoorProcess, "credentials", req.Role)
	now = s.now()
	if err != nil || !cr.ValidAt(now) || !cr.Expires.Truncate(time.Second).After(now) {
		if err != nil {
			class, _ := creds.Classify(err)
			s.log.Debug("credentials unavailable", zap.String("class", class), zap.Error(err))
		}
		return fail(CodeUnavailable, "no valid credentials are available yet; retry later"), who, CodeUnavailable
	}
	acct := cr.AccountID
	if acct == "" {
		acct = creds.AccountFromARN(cr.RoleARN)
	}
	return Response{Version: Version, Credentials: &Document{
		Version: 1, AccessKeyID: cr.AccessKeyID, SecretAccessKey: cr.SecretAccessKey, SessionToken: cr.SessionToken,
		Expiration: cr.Expires.UTC().Format(TimeLayout), AccountID: acct,
	}}, who, resultOK
}
