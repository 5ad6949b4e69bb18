package token

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"
	"unicode/utf8"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promauto"
	"go.uber.org/zap"
	"golang.org/x/sync/singleflight"

	"github.com/imdsproxy/imdsproxy/creds"
)

// Reasons of Command.Token failures, in addition to the shared ones
// (ReasonEmpty, ReasonTooLarge, ReasonMalformed, ReasonExpired). Neither is
// permanent: a hung or failing command may work on the next run.
const (
	// ReasonCommandFailed: the command could not be started or exited with
	// a non-zero status (or was killed by a signal).
	ReasonCommandFailed = "command_failed"
	// ReasonCommandTimeout: the command did not finish within
	// CommandOptions.Timeout; it and every process it started were killed.
	ReasonCommandTimeout = "command_timeout"
)

// WorkloadEnv is the environment variable through which a Command made by
// For tells the program which workload subject to mint a token for. The
// default subject's runs never have it.
const WorkloadEnv = "IMDSPROXY_WORKLOAD"

// MaxWorkloadSubject is the longest subject For accepts, in bytes
// (creds.ValidSubject is the rule).
const MaxWorkloadSubject = creds.MaxSubject

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

// commandWaitDelay bounds how long a run waits for the output pipes after
// the command exited or was killed and everything it started was killed too
// (only a process the daemon may not signal can still hold them open).
const commandWaitDelay = time.Second

// CommandOptions tunes a Command. The zero value is usable.
type CommandOptions struct {
	// Timeout bounds one run of the command; 0 means DefaultCommandTimeout
	// (10 s). On timeout the command and every process it started are
	// killed.
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
// MaxCommandStderr bytes) is logged at Warn, redacted (creds.RedactText:
// JWTs, long-term key ids, secret keys) and sanitized, only when the run
// fails. A token is reused until shortly before its own expiry (see Token),
// and concurrent callers share one run.
//
// Nothing the program starts outlives its run. When the program exits (or
// is killed on timeout), every process it started is killed with SIGKILL
// and reaped, including those that left its process group and session
// (setsid, a double fork): on Linux, NewCommand makes the whole daemon a
// child subreaper (prctl PR_SET_CHILD_SUBREAPER, no privilege needed), so
// that such orphans are re-parented to the daemon instead of init, and each
// run's environment carries IMDSPROXY_RUN_ID=<random id>, inherited by its
// descendants, which tells overlapping runs' processes apart. A program
// must therefore not leave a helper running for later runs. The daemon
// must start no other child processes (it starts none).
//
// For returns the Command of one workload subject: the same program, run
// with IMDSPROXY_WORKLOAD=<subject> in its environment, with a cache of its
// own.
type Command struct {
	argv    []string
	subject string // "" for the default subject
	jwt     *jwtSource

	// The default subject's Command holds every subject's.
	mu       sync.Mutex
	subjects map[string]*Command
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
// registerer (a second one panics). NewCommand fails on a bad argv or a
// negative Timeout.
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
	c := &Command{argv: append([]string(nil), argv...), subjects: map[string]*Command{}}
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
	if err := becomeSubreaper(); err != nil {
		log.Warn("processes a token command starts outside its process group cannot be killed when it ends",
			zap.String("path", argv[0]), zap.Error(err))
	}
	return c, nil
}

// Path returns the program (argv[0]).
func (c *Command) Path() string { return c.argv[0] }

// Subject returns the workload subject the Command runs for, "" for the
// default subject.
func (c *Command) Subject() string { return c.subject }

// For returns the Command minting tokens for the workload subject: the
// same program and options, run with IMDSPROXY_WORKLOAD=<subject> in its
// environment (the default subject's runs never have that variable, even
// when the daemon's environment does). Each subject's token is cached,
// reused, shared between concurrent callers and forgotten exactly like the
// default subject's, independently of the others. For("") is c's default
// subject. Calls with the same subject return the same *Command, so a
// subject costs one cache for the life of c; subjects come from
// configuration, not from clients. Its metrics are the default subject's
// fetch counter (source="command"); the expiry gauge follows the default
// subject only. Errors of its Token name the subject (Error.Workload).
//
// A subject is 1..MaxWorkloadSubject (128) bytes of ASCII letters, digits
// and "._:@/+=-", starting with a letter or digit; For refuses anything
// else. Safe for concurrent use; call it on the Command NewCommand
// returned (on a subject's Command it is that of the default subject).
func (c *Command) For(subject string) (*Command, error) {
	root := c
	if c.subject != "" {
		return nil, fmt.Errorf("token: command %s: For on the Command of workload %q", c.argv[0], c.subject)
	}
	if subject == "" {
		return root, nil
	}
	if !creds.ValidSubject(subject) {
		return nil, fmt.Errorf("token: command %s: workload subject %q: want 1..%d letters, digits or ._:@/+=-, starting with a letter or digit",
			c.argv[0], sanitizeText(subject, 2*MaxWorkloadSubject), MaxWorkloadSubject)
	}
	root.mu.Lock()
	defer root.mu.Unlock()
	if sc, ok := root.subjects[subject]; ok {
		return sc, nil
	}
	sc := &Command{argv: root.argv, subject: subject}
	cfg := root.jwt.jwtSourceConfig
	cfg.workload, cfg.fetch, cfg.reg = subject, sc.run, nil
	sc.jwt = &jwtSource{jwtSourceConfig: cfg, fetches: root.jwt.fetches}
	root.subjects[subject] = sc
	return sc, nil
}

// ForSubject is For as a JWTSource, for the exchange: the tokens of a
// workload's own subject (workloads[].subject).
func (c *Command) ForSubject(subject string) (JWTSource, error) {
	sc, err := c.For(subject)
	if err != nil {
		return nil, err
	}
	return sc, nil
}

// Token returns the cached token while it is far enough from expiry (now <
// exp − max(60 s, 10 % of its lifetime)), else runs the command, checks the
// output with ParseClaims and refuses an expired token. Concurrent callers
// share one run, which is not cancelled when a caller gives up: it is bounded
// by CommandOptions.Timeout. A caller whose ctx ends first gets ctx's error.
// Other errors are *Error (class "identity"); they never contain the
// command's output.
func (c *Command) Token(ctx context.Context) (string, error) { return c.jwt.Token(ctx) }

// Forget drops the remembered token if it is tok (of c's subject), so that
// the next Token runs the command again. The exchange calls it when STS refuses tok
// (expired or invalid by STS's clock and keys, whatever the local clock
// says, as after the host's clock stepped back). Safe for concurrent use.
func (c *Command) Forget(tok string) { c.jwt.forget(tok) }

// run executes the command once. ctx carries the run's timeout.
func (c *Command) run(ctx context.Context) (string, []zap.Field, error) {
	outR, outW, err := os.Pipe()
	if err != nil {
		return "", nil, c.jwt.fail(ReasonCommandFailed, err)
	}
	defer outR.Close()
	errR, errW, err := os.Pipe()
	if err != nil {
		outW.Close()
		return "", nil, c.jwt.fail(ReasonCommandFailed, err)
	}
	defer errR.Close()

	tree := beginRun()
	defer tree.end()
	cmd := exec.CommandContext(ctx, c.argv[0], c.argv[1:]...)
	cmd.Env = c.env(tree)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error {
		// The program is its group's leader: kill the whole group, so that
		// children of a shell script die too, then whatever left it.
		err := syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		_, _ = tree.sweep(cmd.Process.Pid)
		return err
	}
	cmd.WaitDelay = commandWaitDelay
	cmd.Stdin = nil // /dev/null
	// The pipes are *os.File: the program writes to them directly, and
	// Wait returns as soon as it exited, whoever else holds them.
	cmd.Stdout, cmd.Stderr = outW, errW
	start := time.Now()
	err = cmd.Start()
	outW.Close()
	errW.Close()
	stdout := &cappedBuffer{max: MaxTokenSize + 1}
	stderr := &cappedBuffer{max: MaxCommandStderr}
	if err == nil {
		tree.started(cmd.Process.Pid)
		var wg sync.WaitGroup
		wg.Go(func() { _, _ = io.Copy(stdout, outR) })
		wg.Go(func() { _, _ = io.Copy(stderr, errR) })
		err = cmd.Wait()
		if left, serr := tree.sweep(0); serr != nil || left > 0 {
			c.jwt.log.Warn("processes started by the token command could not all be killed",
				zap.String("path", c.argv[0]), zap.Int("left", left), zap.Error(serr))
		}
		// Everything that held the pipes is dead now: they end at once,
		// unless a process the daemon may not signal holds them.
		done := make(chan struct{})
		go func() { wg.Wait(); close(done) }()
		t := time.NewTimer(commandWaitDelay)
		select {
		case <-done:
		case <-t.C:
			outR.Close()
			errR.Close()
			<-done
		}
		t.Stop()
	}
	out := string(stdout.b)
	var fields []zap.Field
	if len(stderr.b) > 0 {
		fields = append(fields, zap.String("stderr", sanitizeStderr(stderr.b, stderr.over, out)))
	}
	fields = append(fields, zap.Duration("duration", time.Since(start)))
	if errors.Is(ctx.Err(), context.DeadlineExceeded) {
		return "", fields, c.jwt.fail(ReasonCommandTimeout, fmt.Errorf("no token within %s; killed it and every process it started", c.jwt.timeout))
	}
	if err != nil {
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

// env returns the environment of one run: the daemon's, without
// WorkloadEnv and runIDEnv, plus the run's id and, for a subject's Command,
// WorkloadEnv.
func (c *Command) env(tree *procRun) []string {
	env := os.Environ()
	kept := env[:0:0]
	for _, kv := range env {
		if !strings.HasPrefix(kv, WorkloadEnv+"=") && !strings.HasPrefix(kv, runIDEnv+"=") {
			kept = append(kept, kv)
		}
	}
	kept = append(kept, tree.env())
	if c.subject != "" {
		kept = append(kept, WorkloadEnv+"="+c.subject)
	}
	return kept
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

// sanitizeStderr makes a command's stderr safe to log: the token (tok, when
// known) becomes "<redacted>", everything creds.RedactText recognises (JWTs
// whole or cut off, long-term key ids, secret keys, session tokens) is
// redacted, control characters and invalid UTF-8 become spaces. When the
// capture was cut (over), the word the cut went through is dropped first:
// the start of a secret no rule recognises any more.
func sanitizeStderr(b []byte, over bool, tok string) string {
	if over {
		b = dropCutWord(b)
	}
	s := string(b)
	if tok = strings.TrimSpace(tok); len(tok) >= 8 {
		s = strings.ReplaceAll(s, tok, "<redacted>")
	}
	return sanitizeText(creds.RedactText(s), MaxCommandStderr)
}

// dropCutWord drops the last word of b, which a cut went through.
func dropCutWord(b []byte) []byte {
	if i := bytes.LastIndexAny(b, " \t\r\n"); i >= 0 {
		return b[:i]
	}
	return nil
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
	source   string // metric label and log field: "command", "url"
	path     string // Error.Path
	workload string // Error.Workload: the subject of a Command made by For
	timeout  time.Duration
	now      func() time.Time
	log      *zap.Logger
	reg      prometheus.Registerer
	reasons  []string // source-specific reasons, to pre-create metric series
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
		factory := promauto.With(cfg.reg)
		s.fetches = factory.NewCounterVec(prometheus.CounterOpts{
			Name: "imdsproxy_identity_token_fetches_total",
			Help: "Runs of the identity token command or requests to the token issuer URL, by source and result (ok or the reason the token was refused).",
		}, []string{"source", "result"})
		s.expiry = factory.NewGauge(prometheus.GaugeOpts{
			Name: "imdsproxy_identity_token_expiry_timestamp_seconds",
			Help: "Expiry (exp claim) of the last identity token read successfully, in Unix seconds.",
		})
		for _, r := range append([]string{"ok", ReasonEmpty, ReasonTooLarge, ReasonMalformed, ReasonExpired}, cfg.reasons...) {
			s.fetches.WithLabelValues(cfg.source, r)
		}
	}
	return s, nil
}

// workloadField is the log field naming the workload subject, if any.
func (s *jwtSource) workloadField() []zap.Field {
	if s.workload == "" {
		return nil
	}
	return []zap.Field{zap.String("workload", s.workload)}
}

func (s *jwtSource) fail(reason string, err error) *Error {
	return &Error{Reason: reason, Path: s.path, Workload: s.workload, Err: err}
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
		s.log.Warn("identity token refused", append(append([]zap.Field{
			zap.String("source", s.source), zap.String("reason", reason),
			zap.String("path", s.path)}, s.workloadField()...), append([]zap.Field{zap.Error(err)}, fields...)...)...)
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
	s.log.Debug("identity token fetched", append([]zap.Field{zap.String("source", s.source), zap.String("path", s.path),
		zap.Time("expires", claims.Expiry), zap.Time("reuse_until", claims.Expiry.Add(-margin))}, s.workloadField()...)...)
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
