package token

import (
	"context"
	"errors"
	"fmt"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"time"
	"unicode/utf8"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"golang.org/x/sync/singleflight"
)

// Reasons of Command.Token failures, in addition to the shared ones
// (ReasonEmpty, ReasonTooLarge, ReasonMalformed, ReasonExpired). Neither is
// permanent: a hung or failing command may work on the next run.
const (
	// ReasonCommandFailed: the command could not be started or exited with
	// a non-zero status (or was killed by a signal).
	ReasonCommandFailed = "command_failed"
	// ReasonCommandTimeout: the command did not finish within
	// CommandOptions.Timeout; its whole process group was killed.
	ReasonCommandTimeout = "command_timeout"
)

// Defaults of CommandOptions and URLOptions.
const (
	// DefaultCommandTimeout bounds one run of an identity command.
	DefaultCommandTimeout = 10 * time.Second
	// MaxCommandStderr is how much of a command's stderr is kept (and
	// logged, sanitized, when the run fails), in bytes.
	MaxCommandStderr = 4 << 10
)

// Token caching: a fetched token is reused while
// now < exp − max(jwtMinReuseMargin, jwtReuseFraction × lifetime), where the
// lifetime is exp − iat (or exp − fetch time when iat is absent).
const (
	jwtMinReuseMargin = 60 * time.Second
	jwtReuseFraction  = 10 // percent
)

// commandWaitDelay bounds how long Wait waits for the output pipes after the
// command exited or was killed (a grandchild that left the process group may
// hold them open).
const commandWaitDelay = time.Second

// CommandOptions tunes a Command. The zero value is usable.
type CommandOptions struct {
	// Timeout bounds one run of the command; 0 means DefaultCommandTimeout
	// (10 s). On timeout the command's whole process group is killed.
	Timeout time.Duration
	// Now returns the current time (expiry checks, caching); nil means
	// time.Now.
	Now func() time.Time
}

// Command is a token source that runs an external program
// (identity.jwt_command) and reads the JWT from its standard output. It is
// safe for concurrent use.
//
// The program is run directly (no shell) with the daemon's environment, its
// standard input connected to /dev/null, in a process group of its own. Its
// standard output (at most MaxTokenSize bytes, surrounding whitespace
// trimmed) is the token; it is never logged. Its standard error (the first
// MaxCommandStderr bytes) is logged at Warn, sanitized, only when the run
// fails. A token is reused until shortly before its own expiry (see Token),
// and concurrent callers share one run.
type Command struct {
	argv []string
	jwt  *jwtSource
}

// NewCommand returns a Command running argv. argv[0] must be an absolute
// path (the program's existence is checked on every run, so it may be
// installed after the daemon starts); no element may contain a NUL byte.
// log may be nil (no logging). reg may be nil (no metrics); otherwise these
// metrics are registered on it:
//
//	imdsproxy_identity_token_fetches_total{source="command",result}  counter; result is "ok" or a Reason
//	imdsproxy_identity_token_expiry_timestamp_seconds                gauge; exp of the last good token, Unix seconds
//
// The gauge has the same name as File's: register only one token source per
// registerer. NewCommand fails on a bad argv, a negative Timeout or when the
// metrics cannot be registered.
func NewCommand(argv []string, opts CommandOptions, log *zap.Logger, reg prometheus.Registerer) (*Command, error) {
	if len(argv) == 0 || argv[0] == "" {
		return nil, errors.New("token: command: empty argv")
	}
	if !filepath.IsAbs(argv[0]) {
		return nil, fmt.Errorf("token: command %q: the program must be an absolute path", argv[0])
	}
	for i, a := range argv {
		if strings.IndexByte(a, 0) >= 0 {
			return nil, fmt.Errorf("token: command %s: argument %d contains a NUL byte", argv[0], i)
		}
	}
	if opts.Timeout < 0 {
		return nil, fmt.Errorf("token: command %s: negative timeout %s", argv[0], opts.Timeout)
	}
	if opts.Timeout == 0 {
		opts.Timeout = DefaultCommandTimeout
	}
	if log == nil {
		log = zap.NewNop()
	}
	c := &Command{argv: append([]string(nil), argv...)}
	src, err := newJWTSource(jwtSourceConfig{
		source:  "command",
		path:    argv[0],
		timeout: opts.Timeout,
		now:     opts.Now,
		log:     log,
		reg:     reg,
		reasons: []string{ReasonCommandFailed, ReasonCommandTimeout},
		fetch:   c.run,
	})
	if err != nil {
		return nil, err
	}
	c.jwt = src
	return c, nil
}

// Path returns the program (argv[0]).
func (c *Command) Path() string { return c.argv[0] }

// Token returns the cached token while it is far enough from expiry (now <
// exp − max(60 s, 10 % of its lifetime)), else runs the command, checks the
// output with ParseClaims and refuses an expired token. Concurrent callers
// share one run, which is not cancelled when a caller gives up: it is bounded
// by CommandOptions.Timeout. A caller whose ctx ends first gets ctx's error.
// Other errors are *Error (class "identity"); they never contain the
// command's output.
func (c *Command) Token(ctx context.Context) (string, error) { return c.jwt.Token(ctx) }

// Forget drops the remembered token if it is tok, so that the next Token
// runs the command again. The exchange calls it when STS refuses tok
// (expired or invalid by STS's clock and keys, whatever the local clock
// says, as after the host's clock stepped back). Safe for concurrent use.
func (c *Command) Forget(tok string) { c.jwt.forget(tok) }

// run executes the command once. ctx carries the run's timeout.
func (c *Command) run(ctx context.Context) (string, []zap.Field, error) {
	cmd := exec.CommandContext(ctx, c.argv[0], c.argv[1:]...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error {
		// The process is its group's leader: kill the whole group, so that
		// children of a shell script die too.
		return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	}
	cmd.WaitDelay = commandWaitDelay
	cmd.Stdin = nil // /dev/null
	stdout := &cappedBuffer{max: MaxTokenSize + 1}
	stderr := &cappedBuffer{max: MaxCommandStderr}
	cmd.Stdout, cmd.Stderr = stdout, stderr
	start := time.Now()
	err := cmd.Run()
	if errors.Is(err, exec.ErrWaitDelay) && cmd.Process != nil {
		// The command exited but something it started kept the output open.
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	}
	out := string(stdout.b)
	var fields []zap.Field
	if len(stderr.b) > 0 {
		fields = append(fields, zap.String("stderr", sanitizeStderr(string(stderr.b), out)))
	}
	fields = append(fields, zap.Duration("duration", time.Since(start)))
	if errors.Is(ctx.Err(), context.DeadlineExceeded) {
		return "", fields, c.jwt.fail(ReasonCommandTimeout, fmt.Errorf("no token within %s; killed its process group", c.jwt.timeout))
	}
	if err != nil && !errors.Is(err, exec.ErrWaitDelay) {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return "", fields, c.jwt.fail(ReasonCommandFailed, errors.New(ee.ProcessState.String()))
		}
		return "", fields, c.jwt.fail(ReasonCommandFailed, err)
	}
	if stdout.over {
		return "", fields, c.jwt.fail(ReasonTooLarge, fmt.Errorf("output larger than %d bytes", MaxTokenSize))
	}
	return out, fields, nil
}

// cappedBuffer keeps the first max bytes written to it and silently drops
// the rest (so the writer is never blocked nor sees EPIPE). over records
// that something was dropped. Not safe for concurrent use; os/exec writes
// each stream from one goroutine.
type cappedBuffer struct {
	b    []byte
	max  int
	over bool
}

func (w *cappedBuffer) Write(p []byte) (int, error) {
	if room := w.max - len(w.b); room > 0 {
		n := min(room, len(p))
		w.b = append(w.b, p[:n]...)
		if n < len(p) {
			w.over = true
		}
	} else if len(p) > 0 {
		w.over = true
	}
	return len(p), nil
}

// jwtLike matches anything shaped like a compact JWT, to keep tokens out of
// logged stderr and error excerpts.
var jwtLike = regexp.MustCompile(`[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_=-]*`)

// sanitizeStderr makes a command's stderr safe to log: the token (tok, when
// known) and anything shaped like a JWT are replaced by "<redacted>",
// control characters and invalid UTF-8 become spaces.
func sanitizeStderr(s, tok string) string {
	if tok = strings.TrimSpace(tok); len(tok) >= 8 {
		s = strings.ReplaceAll(s, tok, "<redacted>")
	}
	return sanitizeText(jwtLike.ReplaceAllString(s, "<redacted>"), MaxCommandStderr)
}

// sanitizeText replaces control characters and invalid UTF-8 with spaces,
// collapses runs of spaces and cuts s to at most max bytes.
func sanitizeText(s string, max int) string {
	s = strings.Map(func(r rune) rune {
		if r == utf8.RuneError || r < 0x20 || r == 0x7f || (r >= 0x80 && r < 0xa0) {
			return ' '
		}
		return r
	}, s)
	s = strings.Join(strings.Fields(s), " ")
	if len(s) > max {
		i := max
		for i > 0 && !utf8.RuneStart(s[i]) {
			i--
		}
		s = s[:i] + "…"
	}
	return s
}

// ---------------------------------------------------------------------------
// The machinery Command and URL share: caching, singleflight, validation,
// metrics.

type jwtSourceConfig struct {
	source  string // metric label and log field: "command", "url"
	path    string // Error.Path
	timeout time.Duration
	now     func() time.Time
	log     *zap.Logger
	reg     prometheus.Registerer
	reasons []string // source-specific reasons, to pre-create metric series
	// fetch obtains a raw token once; ctx carries the timeout. The fields
	// are added to the log line when the fetch (or the token it returned)
	// is refused. Errors should be *Error.
	fetch func(ctx context.Context) (string, []zap.Field, error)
}

type jwtSource struct {
	jwtSourceConfig

	group singleflight.Group

	mu     sync.Mutex
	tok    string
	claims Claims
	reuse  time.Time // reuse tok while now is before this

	fetches *prometheus.CounterVec // nil without a registerer
	expiry  prometheus.Gauge
}

func newJWTSource(cfg jwtSourceConfig) (*jwtSource, error) {
	if cfg.now == nil {
		cfg.now = time.Now
	}
	s := &jwtSource{jwtSourceConfig: cfg}
	if cfg.reg != nil {
		s.fetches = prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "imdsproxy_identity_token_fetches_total",
			Help: "Runs of the identity token command or requests to the token issuer URL, by source and result (ok or the reason the token was refused).",
		}, []string{"source", "result"})
		s.expiry = prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "imdsproxy_identity_token_expiry_timestamp_seconds",
			Help: "Expiry (exp claim) of the last identity token read successfully, in Unix seconds.",
		})
		for _, c := range []prometheus.Collector{s.fetches, s.expiry} {
			if err := cfg.reg.Register(c); err != nil {
				return nil, fmt.Errorf("token: register metrics: %w", err)
			}
		}
		for _, r := range append([]string{"ok", ReasonEmpty, ReasonTooLarge, ReasonMalformed, ReasonExpired}, cfg.reasons...) {
			s.fetches.WithLabelValues(cfg.source, r)
		}
	}
	return s, nil
}

func (s *jwtSource) fail(reason string, err error) *Error {
	return &Error{Reason: reason, Path: s.path, Err: err}
}

func (s *jwtSource) cached() (string, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.tok != "" && s.now().Before(s.reuse) {
		return s.tok, true
	}
	return "", false
}

// forget drops the remembered token if it is tok (an older token refused
// by STS must not drop a newer one fetched meanwhile).
func (s *jwtSource) forget(tok string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if tok != "" && s.tok == tok {
		s.tok, s.claims, s.reuse = "", Claims{}, time.Time{}
	}
}

func (s *jwtSource) Token(ctx context.Context) (string, error) {
	if err := ctx.Err(); err != nil {
		return "", err
	}
	if tok, ok := s.cached(); ok {
		return tok, nil
	}
	// The shared fetch must not die with the first caller's ctx: it gets
	// its own timeout, and each caller stops waiting when its ctx ends.
	bg := context.WithoutCancel(ctx)
	ch := s.group.DoChan("", func() (any, error) { return s.refresh(bg) })
	select {
	case r := <-ch:
		if r.Err != nil {
			return "", r.Err
		}
		return r.Val.(string), nil
	case <-ctx.Done():
		return "", ctx.Err()
	}
}

func (s *jwtSource) refresh(ctx context.Context) (string, error) {
	if tok, ok := s.cached(); ok { // another flight just finished
		return tok, nil
	}
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	fetched := s.now()
	raw, fields, err := s.fetch(ctx)
	var tok string
	var claims Claims
	if err == nil {
		tok, claims, err = s.validate(raw)
	}
	if err != nil {
		reason := "other"
		var te *Error
		if errors.As(err, &te) {
			reason = te.Reason
		}
		s.count(reason)
		s.log.Warn("identity token refused", append([]zap.Field{
			zap.String("source", s.source), zap.String("reason", reason),
			zap.String("path", s.path), zap.Error(err)}, fields...)...)
		return "", err
	}
	lifetime := claims.Expiry.Sub(fetched)
	if !claims.IssuedAt.IsZero() && claims.IssuedAt.Before(claims.Expiry) {
		lifetime = claims.Expiry.Sub(claims.IssuedAt)
	}
	margin := max(jwtMinReuseMargin, lifetime*jwtReuseFraction/100)
	s.mu.Lock()
	s.tok, s.claims, s.reuse = tok, claims, claims.Expiry.Add(-margin)
	s.mu.Unlock()
	s.count("ok")
	if s.expiry != nil {
		s.expiry.Set(float64(claims.Expiry.UnixNano()) / 1e9)
	}
	s.log.Debug("identity token fetched", zap.String("source", s.source), zap.String("path", s.path),
		zap.Time("expires", claims.Expiry), zap.Time("reuse_until", claims.Expiry.Add(-margin)))
	return tok, nil
}

func (s *jwtSource) validate(raw string) (string, Claims, error) {
	tok := strings.TrimSpace(raw)
	if tok == "" {
		return "", Claims{}, s.fail(ReasonEmpty, errors.New("no token in the output"))
	}
	if len(tok) > MaxTokenSize {
		return "", Claims{}, s.fail(ReasonTooLarge, fmt.Errorf("token larger than %d bytes", MaxTokenSize))
	}
	claims, err := ParseClaims(tok)
	if err != nil {
		return "", Claims{}, s.fail(ReasonMalformed, err)
	}
	if now := s.now(); !claims.Expiry.After(now) {
		return "", Claims{}, s.fail(ReasonExpired, fmt.Errorf("exp %s is not after now %s",
			claims.Expiry.Format(time.RFC3339), now.UTC().Format(time.RFC3339)))
	}
	return tok, claims, nil
}

func (s *jwtSource) count(result string) {
	if s.fetches != nil {
		s.fetches.WithLabelValues(s.source, result).Inc()
	}
}
