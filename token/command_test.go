package token

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
)

// testClock is a settable clock, safe for concurrent use.
type testClock struct{ ns atomic.Int64 }

func newTestClock(t time.Time) *testClock { c := &testClock{}; c.ns.Store(t.UnixNano()); return c }
func (c *testClock) Now() time.Time       { return time.Unix(0, c.ns.Load()).UTC() }
func (c *testClock) Add(d time.Duration)  { c.ns.Add(int64(d)) }

// script writes an executable /bin/sh script and returns its path.
func script(t *testing.T, dir, name, body string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte("#!/bin/sh\n"+body+"\n"), 0o700); err != nil {
		t.Fatal(err)
	}
	return p
}

// tokenScript prints the token kept in dir/token and appends a line to
// dir/runs on every run.
func tokenScript(t *testing.T, dir string) string {
	return script(t, dir, "mint", `echo run >> "`+dir+`/runs"; cat "`+dir+`/token"`)
}

func runs(t *testing.T, dir string) int {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, "runs"))
	if errors.Is(err, os.ErrNotExist) {
		return 0
	}
	if err != nil {
		t.Fatal(err)
	}
	return strings.Count(string(b), "run\n")
}

func newTestCommand(t *testing.T, argv []string, opts CommandOptions, reg prometheus.Registerer) (*Command, *observer.ObservedLogs) {
	t.Helper()
	core, logs := observer.New(zap.DebugLevel)
	c, err := NewCommand(argv, opts, zap.New(core), reg)
	if err != nil {
		t.Fatal(err)
	}
	return c, logs
}

// logText renders every log line with its fields.
func logText(logs *observer.ObservedLogs) string {
	var b strings.Builder
	for _, e := range logs.All() {
		fmt.Fprintf(&b, "%s %s %v\n", e.Level, e.Message, e.ContextMap())
	}
	return b.String()
}

func TestCommandSuccessAndCaching(t *testing.T) {
	dir := t.TempDir()
	clock := newTestClock(testNow)
	tok := validJWT(t, "host-1") // iat now, exp now+1h: reused until exp-6m
	write(t, filepath.Join(dir, "token"), "\n  "+tok+"\n\n")
	reg := prometheus.NewPedanticRegistry()
	c, logs := newTestCommand(t, []string{tokenScript(t, dir)}, CommandOptions{Now: clock.Now}, reg)
	ctx := context.Background()

	got, err := c.Token(ctx)
	if err != nil || got != tok {
		t.Fatalf("Token = %q, %v", got, err)
	}
	clock.Add(50 * time.Minute)
	if got, err = c.Token(ctx); err != nil || got != tok {
		t.Fatalf("cached Token = %q, %v", got, err)
	}
	if n := runs(t, dir); n != 1 {
		t.Fatalf("command ran %d times, want 1 (cached)", n)
	}

	// Past exp − 10% of the lifetime: a new run.
	clock.Add(5 * time.Minute)
	tok2 := makeJWT(t, map[string]any{"sub": "host-1", "exp": clock.Now().Add(time.Hour).Unix(), "iat": clock.Now().Unix()})
	write(t, filepath.Join(dir, "token"), tok2)
	if got, err = c.Token(ctx); err != nil || got != tok2 {
		t.Fatalf("Token after refresh = %q, %v", got, err)
	}
	if n := runs(t, dir); n != 2 {
		t.Fatalf("command ran %d times, want 2", n)
	}
	if v := testutil.ToFloat64(c.jwt.fetches.WithLabelValues("command", "ok")); v != 2 {
		t.Fatalf("fetches ok = %v, want 2", v)
	}
	if v := testutil.ToFloat64(c.jwt.expiry); v != float64(clock.Now().Add(time.Hour).Unix()) {
		t.Fatalf("expiry gauge = %v", v)
	}
	if problems, err := testutil.GatherAndLint(reg); err != nil || len(problems) > 0 {
		t.Fatalf("lint: %v %v", problems, err)
	}
	if strings.Contains(logText(logs), tok) || strings.Contains(logText(logs), tok2) {
		t.Fatal("the token reached the log")
	}
}

// TestCommandForget: a token STS refused is forgotten, so the next Token
// runs the command again even though the local clock says the remembered
// token is still good (the host's clock stepped back); forgetting another
// token (an older one) keeps the remembered one.
func TestCommandForget(t *testing.T) {
	dir := t.TempDir()
	clock := newTestClock(testNow)
	tok := validJWT(t, "host-1")
	write(t, filepath.Join(dir, "token"), tok)
	c, _ := newTestCommand(t, []string{tokenScript(t, dir)}, CommandOptions{Now: clock.Now}, nil)
	ctx := context.Background()
	if got, err := c.Token(ctx); err != nil || got != tok {
		t.Fatalf("Token = %q, %v", got, err)
	}
	c.Forget("an.older.token")
	if got, err := c.Token(ctx); err != nil || got != tok || runs(t, dir) != 1 {
		t.Fatalf("after forgetting another token: %q, %v, %d runs; want the remembered token, 1 run", got, err, runs(t, dir))
	}
	tok2 := makeJWT(t, map[string]any{"sub": "host-1", "exp": clock.Now().Add(time.Hour).Unix(), "iat": clock.Now().Unix() + 1})
	write(t, filepath.Join(dir, "token"), tok2)
	c.Forget(tok)
	if got, err := c.Token(ctx); err != nil || got != tok2 || runs(t, dir) != 2 {
		t.Fatalf("after Forget: %q, %v, %d runs; want a new run's token", got, err, runs(t, dir))
	}
}

func TestCommandShortLivedTokenMargin(t *testing.T) {
	// A 5-minute token without iat: margin is the 60 s minimum.
	dir := t.TempDir()
	clock := newTestClock(testNow)
	write(t, filepath.Join(dir, "token"), makeJWT(t, map[string]any{"exp": testNow.Add(5 * time.Minute).Unix()}))
	c, _ := newTestCommand(t, []string{tokenScript(t, dir)}, CommandOptions{Now: clock.Now}, nil)
	for _, step := range []time.Duration{0, 3*time.Minute + 59*time.Second, 2 * time.Second} {
		clock.Add(step)
		if _, err := c.Token(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
	if n := runs(t, dir); n != 2 {
		t.Fatalf("command ran %d times, want 2 (reuse until exp-60s)", n)
	}
}

func TestCommandConcurrentCallersShareOneRun(t *testing.T) {
	dir := t.TempDir()
	write(t, filepath.Join(dir, "token"), makeJWT(t, map[string]any{"exp": time.Now().Add(time.Hour).Unix()}))
	argv := []string{script(t, dir, "slow", `echo run >> "`+dir+`/runs"; sleep 0.3; cat "`+dir+`/token"`)}
	c, _ := newTestCommand(t, argv, CommandOptions{}, nil)
	var wg sync.WaitGroup
	errs := make(chan error, 20)
	for range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := c.Token(context.Background()); err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if n := runs(t, dir); n != 1 {
		t.Fatalf("command ran %d times for 20 concurrent callers, want 1", n)
	}
}

func TestCommandTimeoutKillsProcessGroup(t *testing.T) {
	dir := t.TempDir()
	pidFile := filepath.Join(dir, "child.pid")
	// The script starts a grandchild that would outlive a plain kill of
	// the script, and records its pid.
	argv := []string{script(t, dir, "hang", `sleep 300 & echo $! > "`+pidFile+`"; wait`)}
	var (
		c    *Command
		logs *observer.ObservedLogs
		b    []byte
	)
	for timeout := 300 * time.Millisecond; ; {
		reg := prometheus.NewPedanticRegistry()
		c, logs = newTestCommand(t, argv, CommandOptions{Timeout: timeout}, reg)
		start := time.Now()
		_, err := c.Token(context.Background())
		elapsed := time.Since(start)
		var te *Error
		if !errors.As(err, &te) || te.Reason != ReasonCommandTimeout {
			t.Fatalf("err = %v, want reason %s", err, ReasonCommandTimeout)
		}
		if te.Permanent() || te.ErrorClass() != "identity" {
			t.Fatalf("timeout must be class identity, not permanent: %v %v", te.ErrorClass(), te.Permanent())
		}
		if elapsed > timeout+commandWaitDelay+time.Second {
			t.Fatalf("Token took %v with a %v timeout", elapsed, timeout)
		}
		if startedNothing(t, pidFile, &timeout, 5*time.Second) {
			continue
		}
		if b, err = os.ReadFile(pidFile); err != nil {
			t.Fatal(err)
		}
		break
	}
	pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	deadline := time.Now().Add(2 * time.Second)
	for {
		// Signal 0 probes; a killed-but-unreaped child (zombie of init)
		// disappears quickly.
		if err := syscall.Kill(pid, 0); errors.Is(err, syscall.ESRCH) {
			break
		}
		if stat, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid)); strings.Contains(string(stat), ") Z ") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("grandchild %d still alive: the process group was not killed", pid)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if v := testutil.ToFloat64(c.jwt.fetches.WithLabelValues("command", ReasonCommandTimeout)); v != 1 {
		t.Fatalf("fetches{command_timeout} = %v", v)
	}
	if logs.FilterMessage("identity token refused").Len() != 1 {
		t.Fatalf("want one Warn line:\n%s", logText(logs))
	}
}

func TestCommandCallerContextEndsFirst(t *testing.T) {
	dir := t.TempDir()
	c, _ := newTestCommand(t, []string{script(t, dir, "hang", "sleep 300")}, CommandOptions{Timeout: time.Second}, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	start := time.Now()
	if _, err := c.Token(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err = %v, want the caller's deadline", err)
	}
	if time.Since(start) > 500*time.Millisecond {
		t.Fatalf("caller waited %v past its own deadline", time.Since(start))
	}
	// The shared run still ends with its own timeout.
	if _, err := c.Token(context.Background()); err == nil {
		t.Fatal("want the run's timeout")
	}
}

func TestCommandFailures(t *testing.T) {
	secret := validJWT(t, "leak-me")
	cases := []struct {
		name, body, reason string
		permanent          bool
		stderrLogged       string
	}{
		{"non-zero exit", `echo "mint: cannot reach agent socket" >&2; echo '` + secret + `' >&2; exit 3`, ReasonCommandFailed, false, "cannot reach agent socket"},
		{"killed by signal", `kill -9 $$`, ReasonCommandFailed, false, ""},
		{"garbage", `echo "hello world"`, ReasonMalformed, true, ""},
		{"empty", `echo "   "`, ReasonEmpty, true, ""},
		{"expired", `echo '` + makeJWT(t, map[string]any{"exp": testNow.Add(-time.Minute).Unix()}) + `'`, ReasonExpired, true, ""},
		{"huge", `head -c 200000 /dev/zero | tr '\0' 'a'`, ReasonTooLarge, true, ""},
		{"control chars in stderr", `printf 'bad\033[31mred\nline2\001' >&2; exit 1`, ReasonCommandFailed, false, "bad [31mred line2"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			c, logs := newTestCommand(t, []string{script(t, dir, "cmd", tc.body)}, CommandOptions{Now: func() time.Time { return testNow }}, nil)
			tok, err := c.Token(context.Background())
			var te *Error
			if tok != "" || !errors.As(err, &te) || te.Reason != tc.reason {
				t.Fatalf("Token = %q, %v; want reason %s", tok, err, tc.reason)
			}
			if te.Permanent() != tc.permanent {
				t.Fatalf("Permanent = %v", te.Permanent())
			}
			if te.Path != c.Path() || !strings.HasPrefix(err.Error(), "token: "+c.Path()+": "+tc.reason) {
				t.Fatalf("error %q", err)
			}
			text := logText(logs)
			if strings.Contains(err.Error(), secret) || strings.Contains(text, secret) || strings.Contains(text, "aaaaaaaaaa") {
				t.Fatalf("output reached the error or the log:\n%s", text)
			}
			if tc.stderrLogged != "" && !strings.Contains(text, tc.stderrLogged) {
				t.Fatalf("stderr %q not logged:\n%s", tc.stderrLogged, text)
			}
			if strings.ContainsAny(text, "\x1b\x01") {
				t.Fatalf("control characters logged: %q", text)
			}
		})
	}
}

func TestCommandStderrOnlyOnFailure(t *testing.T) {
	dir := t.TempDir()
	write(t, filepath.Join(dir, "token"), validJWT(t, "h"))
	argv := []string{script(t, dir, "cmd", `echo "chatty diagnostics" >&2; cat "`+dir+`/token"`)}
	c, logs := newTestCommand(t, argv, CommandOptions{Now: func() time.Time { return testNow }}, nil)
	if _, err := c.Token(context.Background()); err != nil {
		t.Fatal(err)
	}
	if strings.Contains(logText(logs), "chatty") || logs.FilterLevelExact(zap.WarnLevel).Len() > 0 {
		t.Fatalf("stderr logged on success:\n%s", logText(logs))
	}
}

func TestCommandMissingProgram(t *testing.T) {
	c, _ := newTestCommand(t, []string{"/nonexistent/mint-token"}, CommandOptions{}, nil)
	_, err := c.Token(context.Background())
	var te *Error
	if !errors.As(err, &te) || te.Reason != ReasonCommandFailed || te.Permanent() {
		t.Fatalf("err = %v", err)
	}
}

func TestCommandStdinIsDevNull(t *testing.T) {
	dir := t.TempDir()
	write(t, filepath.Join(dir, "token"), validJWT(t, "h"))
	// cat of stdin must end at once (EOF), not hang.
	argv := []string{script(t, dir, "cmd", `cat >/dev/null; cat "`+dir+`/token"`)}
	c, _ := newTestCommand(t, argv, CommandOptions{Timeout: 2 * time.Second, Now: func() time.Time { return testNow }}, nil)
	if _, err := c.Token(context.Background()); err != nil {
		t.Fatal(err)
	}
}

func TestNewCommandErrors(t *testing.T) {
	for name, argv := range map[string][]string{
		"empty":    nil,
		"empty 0":  {""},
		"relative": {"mint-token"},
		"dot":      {"./mint-token"},
		"nul":      {"/bin/echo", "a\x00b"},
	} {
		if _, err := NewCommand(argv, CommandOptions{}, nil, nil); err == nil {
			t.Errorf("%s: NewCommand(%q) succeeded", name, argv)
		}
	}
	if _, err := NewCommand([]string{"/bin/true"}, CommandOptions{Timeout: -1}, nil, nil); err == nil {
		t.Error("negative timeout accepted")
	}
	reg := prometheus.NewRegistry()
	if _, err := NewCommand([]string{"/bin/true"}, CommandOptions{}, nil, reg); err != nil {
		t.Fatal(err)
	}
	if !panics(func() { _, _ = NewCommand([]string{"/bin/true"}, CommandOptions{}, nil, reg) }) {
		t.Error("registering twice on one registry succeeded")
	}
}

func TestCommandCancelledContext(t *testing.T) {
	c, _ := newTestCommand(t, []string{"/bin/true"}, CommandOptions{}, nil)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := c.Token(ctx); !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v", err)
	}
}

func TestSanitizeStderr(t *testing.T) {
	tok := validJWT(t, "x")
	got := sanitizeStderr([]byte("prefix "+tok+" and eyJhbGciOi.eyJzdWIiOiJ4.c2lnbmF0dXJl\x00\tend"), false, tok)
	if strings.Contains(got, tok) || strings.Contains(got, "eyJzdWIiOiJ4") || strings.ContainsAny(got, "\x00\t") {
		t.Fatalf("sanitizeStderr = %q", got)
	}
	long := sanitizeText(strings.Repeat("é", 5000), 101)
	if len(long) > 101+len("…") || !strings.HasSuffix(long, "…") {
		t.Fatalf("sanitizeText cut %d bytes", len(long))
	}
}
