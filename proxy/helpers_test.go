package proxy

import (
	"context"
	"flag"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/imdsproxy/imdsproxy/creds"
)

var update = flag.Bool("update", false, "rewrite the golden files under testdata/")

// t0 is the fixed "now" of the tests: half a second past a whole second, so
// that truncation (never rounding up) is visible.
var t0 = time.Date(2026, 3, 1, 12, 0, 0, 500_000_000, time.UTC)

const (
	testRole   = "app"
	testKeyID  = "ASIAIOSFODNN7EXAMPLE"
	testSecret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
	testToken  = "IQoJb3JpZ2luX2VjEXAMPLESESSIONTOKEN+/=="
)

func testCreds() creds.Credentials {
	return creds.Credentials{
		AccessKeyID:     testKeyID,
		SecretAccessKey: testSecret,
		SessionToken:    testToken,
		Expires:         t0.Add(time.Hour + 900*time.Millisecond), // 13:00:01.4 → 13:00:01Z
		LastUpdated:     t0.Add(-10*time.Minute + 700*time.Millisecond),
		AccountID:       "222222222222",
		RoleARN:         "arn:aws:sts::222222222222:assumed-role/app/i-0123456789abcdef0",
		Source:          "web-identity",
	}
}

// clock is a settable clock.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func newClock(t time.Time) *clock { return &clock{t: t} }

func (c *clock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *clock) add(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// fakeSource is a hand-written CredentialSource.
type fakeSource struct {
	mu    sync.Mutex
	c     creds.Credentials
	err   error
	calls int
	roles []string
	ctxOK bool // the context passed was live
}

func (f *fakeSource) Credentials(ctx context.Context, role string) (creds.Credentials, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls++
	f.roles = append(f.roles, role)
	f.ctxOK = ctx != nil && ctx.Err() == nil
	return f.c, f.err
}

func (f *fakeSource) set(c creds.Credentials, err error) {
	f.mu.Lock()
	f.c, f.err = c, err
	f.mu.Unlock()
}

// classErr is an error carrying a class and a permanence, like the ones of
// exchange and token.
type classErr struct {
	class     string
	permanent bool
	msg       string
}

func (e *classErr) Error() string      { return e.msg }
func (e *classErr) ErrorClass() string { return e.class }
func (e *classErr) Permanent() bool    { return e.permanent }

type testEnv struct {
	s     *Server
	src   *fakeSource
	clock *clock
	reg   *prometheus.Registry
}

// newEnv builds a Server on a fixed clock with a fake source holding testCreds.
func newEnv(t testing.TB, cfg Config) *testEnv {
	t.Helper()
	return newEnvLog(t, cfg, zap.NewNop())
}

func newEnvLog(t testing.TB, cfg Config, log *zap.Logger) *testEnv {
	t.Helper()
	if cfg.RoleName == "" {
		cfg.RoleName = testRole
	}
	src := &fakeSource{c: testCreds()}
	reg := prometheus.NewRegistry()
	s, err := New(cfg, src, log, reg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	c := newClock(t0)
	s.now = c.now
	s.outstanding = newOutstandingTokens(c.now())
	t.Cleanup(func() {
		if pt := s.state.Load().pt; pt != nil {
			pt.close()
		}
	})
	return &testEnv{s: s, src: src, clock: c, reg: reg}
}

// do sends one request through the handler.
func (e *testEnv) do(method, target string, hdr map[string]string) *httptest.ResponseRecorder {
	r := httptest.NewRequest(method, target, nil)
	for k, v := range hdr {
		r.Header.Set(k, v)
	}
	w := httptest.NewRecorder()
	e.s.Handler().ServeHTTP(w, r)
	return w
}

// token mints a valid session token through the API.
func (e *testEnv) token(t testing.TB, ttl string) string {
	t.Helper()
	w := e.do(http.MethodPut, "/latest/api/token", map[string]string{headerTokenTTL: ttl})
	if w.Code != http.StatusOK {
		t.Fatalf("token PUT: %d %q", w.Code, w.Body.String())
	}
	return w.Body.String()
}

// golden compares got with testdata/name, rewriting it under -update.
func golden(t *testing.T, name string, got []byte) {
	t.Helper()
	path := filepath.Join("testdata", name)
	if *update {
		if err := os.WriteFile(path, got, 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run go test -update to create it)", err)
	}
	if string(got) != string(want) {
		t.Errorf("%s mismatch\n--- got ---\n%s\n--- want ---\n%s", name, got, want)
	}
}
