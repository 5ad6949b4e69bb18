package proxy

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

// fakeAccess is a hand-written AccessControl: Identify answers who (or err),
// Allow admits the uids in allow.
type fakeAccess struct {
	who Peer
	err error

	identified atomic.Int32
	mu         sync.Mutex
	allow      map[int]bool
	seen       []Peer // every Peer passed to Allow
}

func (f *fakeAccess) Identify(ctx context.Context, conn net.Conn) (Peer, error) {
	f.identified.Add(1)
	if conn == nil || ctx.Err() != nil {
		return Peer{}, errors.New("no connection or done context")
	}
	if _, ok := ctx.Deadline(); !ok {
		return Peer{}, errors.New("unbounded context")
	}
	return f.who, f.err
}

func (f *fakeAccess) Allow(p Peer) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.seen = append(f.seen, p)
	return p.Known && f.allow[p.UID]
}

func (f *fakeAccess) setAllow(uids ...int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.allow = map[int]bool{}
	for _, u := range uids {
		f.allow[u] = true
	}
}

var testPeer = Peer{Known: true, UID: 1234, PID: 42, Exe: "/usr/bin/app", Unit: "app.service"}

// serveEnv runs e.s.Serve on a loopback listener and returns its base URL
// and a keep-alive client.
func serveEnv(t *testing.T, e *testEnv) (string, *http.Client) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan struct{})
	go func() { _ = e.s.Serve(ctx, ln); close(done) }()
	tr := &http.Transport{MaxIdleConnsPerHost: 1}
	t.Cleanup(func() { tr.CloseIdleConnections(); cancel(); <-done })
	return "http://" + ln.Addr().String(), &http.Client{Transport: tr}
}

func get(t *testing.T, c *http.Client, url string) (int, string) {
	t.Helper()
	resp, err := c.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func TestAccessDenied(t *testing.T) {
	upstream := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodPut {
			http.Error(w, "v1 only", http.StatusNotFound)
			return
		}
		_, _ = io.WriteString(w, "i-0123456789abcdef0")
	}))
	defer upstream.Close()
	u, _ := url.Parse(upstream.URL)
	fa := &fakeAccess{who: testPeer}
	core, logs := observer.New(zapcore.DebugLevel)
	e := newEnvLog(t, Config{Access: fa, Upstream: u}, zap.New(core))
	base, client := serveEnv(t, e)

	for _, tc := range []struct {
		path string
		want int
	}{
		{"/latest/meta-data/iam/security-credentials/", 403},
		{"/latest/meta-data/iam/security-credentials/" + testRole, 403},
		{"/latest/meta-data/iam/security-credentials-extended/" + testRole, 403},
		{"/latest/meta-data/iam/info", 403},
		{"/latest/meta-data/instance-id", 200},
		{"/latest/meta-data/iam/", 200}, // the listing names no role
		{"/latest/meta-data/iam/security-credentials/other", 403},
	} {
		code, body := get(t, client, base+tc.path)
		if code != tc.want {
			t.Errorf("GET %s = %d %q, want %d", tc.path, code, body, tc.want)
		}
		if code == 403 && body != accessDeniedBody {
			t.Errorf("GET %s: body %q", tc.path, body)
		}
		if strings.Contains(body, testSecret) || strings.Contains(body, testKeyID) {
			t.Errorf("GET %s leaked credentials: %q", tc.path, body)
		}
	}
	if got := testutil.ToFloat64(e.s.m.accessDenied); got != 5 {
		t.Errorf("imdsproxy_access_denied_total = %v, want 5", got)
	}
	if n := fa.identified.Load(); n != 1 {
		t.Errorf("Identify called %d times on one keep-alive connection, want 1", n)
	}
	if n := logs.FilterMessage("credentials served").Len(); n != 0 {
		t.Errorf("%d audit lines for refused requests", n)
	}
	if e.src.calls != 0 {
		t.Errorf("credential source called %d times for refused requests", e.src.calls)
	}

	// A policy change applies to the open connection at once.
	fa.setAllow(testPeer.UID)
	if code, body := get(t, client, base+"/latest/meta-data/iam/security-credentials/"+testRole); code != 200 || !strings.Contains(body, testKeyID) {
		t.Errorf("after allowing: %d %q", code, body)
	}
	if n := fa.identified.Load(); n != 1 {
		t.Errorf("Identify called %d times, want 1", n)
	}
}

func TestAccessAllowedAudit(t *testing.T) {
	fa := &fakeAccess{who: testPeer}
	fa.setAllow(testPeer.UID)
	core, logs := observer.New(zapcore.InfoLevel)
	e := newEnvLog(t, Config{Access: fa}, zap.New(core))
	base, client := serveEnv(t, e)

	for _, p := range []string{"security-credentials/", "security-credentials-extended/"} {
		code, body := get(t, client, base+"/latest/meta-data/iam/"+p+testRole)
		if code != 200 || !strings.Contains(body, testSecret) {
			t.Fatalf("GET %s: %d %q", p, code, body)
		}
	}
	audit := logs.FilterMessage("credentials served").All()
	if len(audit) != 2 {
		t.Fatalf("%d audit lines, want 2: %v", len(audit), logs.All())
	}
	for i, route := range []string{routeCredentials, routeCredentialsExtended} {
		l := audit[i]
		if l.LoggerName != "audit" || l.Level != zapcore.InfoLevel {
			t.Errorf("audit line from %q at %v", l.LoggerName, l.Level)
		}
		got := l.ContextMap()
		want := map[string]any{
			"identified": true, "uid": int64(1234), "pid": int64(42), "exe": "/usr/bin/app", "unit": "app.service",
			"role_name": testRole, "role": testCreds().RoleARN, "access_key_id": testKeyID,
			"kind": "cache", "route": route,
		}
		for k, v := range want {
			if got[k] != v {
				t.Errorf("audit %s = %v, want %v", k, got[k], v)
			}
		}
		for k, v := range got {
			if s, _ := v.(string); strings.Contains(s, testSecret) || strings.Contains(s, testToken) {
				t.Errorf("audit field %s holds a secret", k)
			}
		}
	}
	if n := fa.identified.Load(); n != 1 {
		t.Errorf("Identify called %d times, want 1", n)
	}
}

// TestAccessKind checks that credentials stored during the request are
// audited as a fetch.
func TestAccessKind(t *testing.T) {
	fa := &fakeAccess{who: testPeer}
	fa.setAllow(testPeer.UID)
	core, logs := observer.New(zapcore.InfoLevel)
	e := newEnvLog(t, Config{Access: fa}, zap.New(core))
	c := testCreds()
	c.LastUpdated = t0.AddDate(10, 0, 0) // "after" the request started
	e.src.set(c, nil)
	base, client := serveEnv(t, e)
	if code, body := get(t, client, base+"/latest/meta-data/iam/security-credentials/"+testRole); code != 200 {
		t.Fatalf("%d %q", code, body)
	}
	if got := logs.FilterMessage("credentials served").All(); len(got) != 1 || got[0].ContextMap()["kind"] != "fetch" {
		t.Errorf("audit lines %v, want one with kind fetch", got)
	}
}

// TestAccessUnknownPeer: outside Serve (no connection) and when Identify
// fails, Allow gets a Peer that is not Known.
func TestAccessUnknownPeer(t *testing.T) {
	path := "/latest/meta-data/iam/security-credentials/" + testRole
	t.Run("no connection", func(t *testing.T) {
		fa := &fakeAccess{who: testPeer}
		e := newEnv(t, Config{Access: fa})
		if w := e.do(http.MethodGet, path, nil); w.Code != 403 {
			t.Errorf("got %d, want 403", w.Code)
		}
		if fa.identified.Load() != 0 || len(fa.seen) != 1 || fa.seen[0].Known {
			t.Errorf("identified %d, seen %+v", fa.identified.Load(), fa.seen)
		}
	})
	t.Run("identify fails", func(t *testing.T) {
		fa := &fakeAccess{who: testPeer, err: errors.New("gone")}
		fa.setAllow(testPeer.UID)
		e := newEnv(t, Config{Access: fa})
		base, client := serveEnv(t, e)
		if code, _ := get(t, client, base+path); code != 403 {
			t.Errorf("got %d, want 403", code)
		}
		if len(fa.seen) != 1 || fa.seen[0] != (Peer{}) {
			t.Errorf("seen %+v, want one unknown peer", fa.seen)
		}
	})
	t.Run("no access control", func(t *testing.T) {
		core, logs := observer.New(zapcore.InfoLevel)
		e := newEnvLog(t, Config{}, zap.New(core))
		base, client := serveEnv(t, e)
		if code, _ := get(t, client, base+path); code != 200 {
			t.Errorf("got %d, want 200", code)
		}
		if n := logs.FilterMessage("credentials served").Len(); n != 0 {
			t.Errorf("%d audit lines without access control", n)
		}
	})
}

// TestAccessUnitUnknownNotRemembered: a Peer whose unit could not be told
// in time is not kept for the connection; its next request identifies the
// process again, while a complete answer is kept.
func TestAccessUnitUnknownNotRemembered(t *testing.T) {
	path := "/latest/meta-data/iam/security-credentials/" + testRole
	partial := testPeer
	partial.Unit, partial.UnitUnknown = "", true
	for _, tc := range []struct {
		name string
		who  Peer
		want int32 // Identify calls for three requests on one connection
	}{
		{"unit unknown", partial, 3},
		{"complete", testPeer, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fa := &fakeAccess{who: tc.who}
			fa.setAllow(testPeer.UID)
			e := newEnv(t, Config{Access: fa})
			base, client := serveEnv(t, e)
			for range 3 {
				if code, _ := get(t, client, base+path); code != 200 {
					t.Fatalf("got %d, want 200", code)
				}
			}
			if n := fa.identified.Load(); n != tc.want {
				t.Errorf("Identify called %d times for 3 requests on one connection, want %d", n, tc.want)
			}
		})
	}
}

// TestAccessAuditLogConfig: Config.AuditLog replaces the default logger.
func TestAccessAuditLogConfig(t *testing.T) {
	fa := &fakeAccess{who: testPeer}
	fa.setAllow(testPeer.UID)
	core, logs := observer.New(zapcore.InfoLevel)
	e := newEnv(t, Config{Access: fa, AuditLog: zap.New(core).Named("custom")})
	base, client := serveEnv(t, e)
	if code, _ := get(t, client, base+"/latest/meta-data/iam/security-credentials/"+testRole); code != 200 {
		t.Fatalf("got %d", code)
	}
	if got := logs.All(); len(got) != 1 || got[0].LoggerName != "custom" {
		t.Errorf("audit lines %v", got)
	}
}
