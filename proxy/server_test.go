package proxy

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/imdsproxy/imdsproxy/access"
	"github.com/imdsproxy/imdsproxy/connlimit/connlimittest"
	"github.com/imdsproxy/imdsproxy/creds"
)

func TestConfigValidation(t *testing.T) {
	up, _ := url.Parse("http://169.254.169.254")
	mk := func(s string) *url.URL { u, _ := url.Parse(s); return u }
	p := planOf(t, defaultPlanConfig())
	tests := []struct {
		name string
		cfg  Config
		ok   bool
	}{
		{"minimal", Config{Plan: p}, true},
		{"full", Config{Plan: p, TokensRequired: true, HopLimit: 64, Upstream: up, UpstreamTimeout: time.Second,
			InstanceProfileARN: "arn:aws:iam::123456789012:instance-profile/p", AllowedHosts: []string{"imds.internal"}, MaxConns: 10}, true},
		{"https upstream with path", Config{Plan: p, Upstream: mk("https://imds.internal/base/")}, true},
		{"no plan", Config{}, false},
		{"no plan, otherwise full", Config{TokensRequired: true, HopLimit: 2, Upstream: up}, false},
		{"hop 65", Config{Plan: p, HopLimit: 65}, false},
		{"hop negative", Config{Plan: p, HopLimit: -1}, false},
		{"timeout negative", Config{Plan: p, UpstreamTimeout: -time.Second}, false},
		{"timeout huge", Config{Plan: p, UpstreamTimeout: time.Hour}, false},
		{"upstream ftp", Config{Plan: p, Upstream: mk("ftp://x")}, false},
		{"upstream no host", Config{Plan: p, Upstream: mk("http://")}, false},
		{"upstream relative", Config{Plan: p, Upstream: mk("/x")}, false},
		{"upstream query", Config{Plan: p, Upstream: mk("http://x/?a=b")}, false},
		{"upstream userinfo", Config{Plan: p, Upstream: mk("http://u:p@x/")}, false},
		{"bad profile ARN", Config{Plan: p, InstanceProfileARN: "arn:aws:iam::1:instance-profile/p"}, false},
		{"role ARN as profile ARN", Config{Plan: p, InstanceProfileARN: "arn:aws:iam::123456789012:role/p"}, false},
		{"negative max conns", Config{Plan: p, MaxConns: -1}, false},
		{"allowed host with port", Config{Plan: p, AllowedHosts: []string{"imds.internal:80"}}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := New(tt.cfg, newTestBroker(t, nil), nil, nil, prometheus.NewRegistry())
			if (err == nil) != tt.ok {
				t.Errorf("New: err %v, want ok=%v", err, tt.ok)
			}
			if err != nil && strings.Contains(err.Error(), "u:p") {
				t.Errorf("error leaks URL password: %v", err)
			}
			e := newEnv(t, Config{})
			if err := e.s.Update(tt.cfg); (err == nil) != tt.ok {
				t.Errorf("Update: err %v, want ok=%v", err, tt.ok)
			}
		})
	}
	if _, err := New(Config{Plan: p}, nil, nil, nil, nil); err == nil {
		t.Error("nil broker accepted")
	}
	n, _ := Config{Plan: p}.normalize()
	if n.HopLimit != 1 || n.UpstreamTimeout != DefaultUpstreamTimeout {
		t.Errorf("defaults: %+v", n)
	}
	reg := prometheus.NewRegistry()
	if _, err := New(Config{Plan: p}, newTestBroker(t, reg), nil, nil, reg); err != nil {
		t.Fatal(err)
	}
	if !panics(func() { _, _ = New(Config{Plan: p}, newTestBroker(t, nil), nil, nil, reg) }) {
		t.Error("second Server on the same registry accepted")
	}
}

// panics reports whether f panicked: registering a component's metrics
// twice on one registry is a programming error (promauto's MustRegister).
func panics(f func()) (did bool) {
	defer func() { did = recover() != nil }()
	f()
	return false
}

// newTestBroker is a broker over a fake source holding testCreds,
// registered with reg (nil: not registered).
func newTestBroker(t testing.TB, reg prometheus.Registerer) *access.Broker {
	t.Helper()
	b, err := access.NewBroker(&fakeSource{c: testCreds()}, nil, nil, reg)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestTokenPUT(t *testing.T) {
	tests := []struct {
		name     string
		method   string
		path     string
		hdr      map[string]string
		status   int
		body     string
		ttl      string
		allow    string
		rejected string
	}{
		{"go sdk", "PUT", "/latest/api/token", map[string]string{"X-Aws-Ec2-Metadata-Token-Ttl-Seconds": "300"}, 200, "", "300", "", ""},
		{"lower case header", "PUT", "/latest/api/token", map[string]string{"x-aws-ec2-metadata-token-ttl-seconds": "21600"}, 200, "", "21600", "", ""},
		{"trailing slash", "PUT", "/latest/api/token/", map[string]string{headerTokenTTL: "1"}, 200, "", "1", "", ""},
		{"with query", "PUT", "/latest/api/token?x=1", map[string]string{headerTokenTTL: "60"}, 200, "", "60", "", ""},
		{"missing ttl", "PUT", "/latest/api/token", nil, 400, "invalid token TTL", "", "", rejectBadTTL},
		{"ttl 0", "PUT", "/latest/api/token", map[string]string{headerTokenTTL: "0"}, 400, "invalid token TTL", "", "", rejectBadTTL},
		{"ttl 21601", "PUT", "/latest/api/token", map[string]string{headerTokenTTL: "21601"}, 400, "invalid token TTL", "", "", rejectBadTTL},
		{"ttl text", "PUT", "/latest/api/token", map[string]string{headerTokenTTL: "five"}, 400, "invalid token TTL", "", "", rejectBadTTL},
		{"ttl negative", "PUT", "/latest/api/token", map[string]string{headerTokenTTL: "-5"}, 400, "invalid token TTL", "", "", rejectBadTTL},
		{"x-forwarded-for", "PUT", "/latest/api/token", map[string]string{headerTokenTTL: "300", "X-Forwarded-For": "10.0.0.1"},
			400, forwardedRejection, "", "", rejectForwarded},
		{"empty x-forwarded-for", "PUT", "/latest/api/token", map[string]string{headerTokenTTL: "300", "X-Forwarded-For": ""},
			400, forwardedRejection, "", "", rejectForwarded},
		{"x-forwarded-for, bad ttl", "PUT", "/latest/api/token", map[string]string{"X-Forwarded-For": "10.0.0.1"},
			400, forwardedRejection, "", "", rejectForwarded},
		{"forwarded (RFC 7239)", "PUT", "/latest/api/token", map[string]string{headerTokenTTL: "300", "Forwarded": "for=10.0.0.1;proto=http"},
			400, forwardedRFC7239Rejection, "", "", rejectForwarded},
		{"empty forwarded", "PUT", "/latest/api/token", map[string]string{headerTokenTTL: "300", "Forwarded": ""},
			400, forwardedRFC7239Rejection, "", "", rejectForwarded},
		{"GET", "GET", "/latest/api/token", map[string]string{headerTokenTTL: "300"}, 405, "", "", "PUT", ""},
		{"POST", "POST", "/latest/api/token", map[string]string{headerTokenTTL: "300"}, 405, "", "", "PUT", ""},
		{"HEAD", "HEAD", "/latest/api/token/", nil, 405, "", "", "PUT", ""},
		{"DELETE", "DELETE", "/latest/api/token", nil, 405, "", "", "PUT", ""},
	}
	for _, mode := range []bool{false, true} {
		for _, tt := range tests {
			t.Run(fmt.Sprintf("required=%v/%s", mode, tt.name), func(t *testing.T) {
				e := newEnv(t, Config{TokensRequired: mode})
				w := e.do(tt.method, tt.path, tt.hdr)
				if w.Code != tt.status {
					t.Fatalf("status %d, want %d (%q)", w.Code, tt.status, w.Body.String())
				}
				if got := w.Header().Get("Allow"); got != tt.allow {
					t.Errorf("Allow %q, want %q", got, tt.allow)
				}
				if tt.rejected != "" {
					if got := testutil.ToFloat64(e.s.m.rejections.WithLabelValues(tt.rejected)); got != 1 {
						t.Errorf("rejections{%s} = %v", tt.rejected, got)
					}
				}
				if tt.body != "" && w.Body.String() != tt.body {
					t.Errorf("body %q, want %q", w.Body.String(), tt.body)
				}
				if tt.status != 200 {
					if w.Header().Get(headerTokenTTL) != "" {
						t.Error("TTL header on an error")
					}
					return
				}
				tok := w.Body.String()
				if got := w.Header().Get(headerTokenTTL); got != tt.ttl {
					t.Errorf("TTL header %q, want %q", got, tt.ttl)
				}
				if len(tok) != tokenLen || strings.ContainsAny(tok, "\r\n \t") {
					t.Errorf("token %q", tok)
				}
				if w.Header().Get("Content-Length") != strconv.Itoa(len(tok)) {
					t.Errorf("Content-Length %q", w.Header().Get("Content-Length"))
				}
				if st, gen := e.s.minter.verify(tok, e.clock.now()); st != tokenValid || gen != e.plan.Gen() {
					t.Errorf("issued token: status %d pin %d, want valid pinning generation %d", st, gen, e.plan.Gen())
				}
				if got := testutil.ToFloat64(e.s.m.tokensIssued); got != 1 {
					t.Errorf("issued = %v", got)
				}
				if got := testutil.ToFloat64(e.s.m.outstanding); got != 1 {
					t.Errorf("outstanding = %v", got)
				}
			})
		}
	}
}

func TestAuth(t *testing.T) {
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.WriteString(w, "ami-12345678")
	}))
	defer up.Close()
	upURL, _ := url.Parse(up.URL)

	paths := []string{
		"/latest/meta-data/iam/security-credentials/",
		"/latest/meta-data/iam/security-credentials/app",
		"/latest/meta-data/iam/security-credentials-extended/app",
		"/latest/meta-data/iam/info",
		"/latest/meta-data/iam/",
		"/latest/meta-data/iam/unknown",
		"/latest/meta-data/ami-id", // pass-through
	}
	type tokenKind int
	const (
		none tokenKind = iota
		valid
		expired
		garbage
		forged
		twoHeaders
		empty
	)
	tests := []struct {
		name     string
		required bool
		tok      tokenKind
		ok       bool
		reason   string
	}{
		{"optional, no token: IMDSv1", false, none, true, ""},
		{"optional, empty token header: IMDSv1", false, empty, true, ""},
		{"optional, valid", false, valid, true, ""},
		{"optional, expired", false, expired, false, rejectExpired},
		{"optional, garbage", false, garbage, false, rejectInvalid},
		{"optional, forged", false, forged, false, rejectInvalid},
		{"optional, two tokens", false, twoHeaders, false, rejectInvalid},
		{"required, no token", true, none, false, rejectMissing},
		{"required, empty token header", true, empty, false, rejectMissing},
		{"required, valid", true, valid, true, ""},
		{"required, expired", true, expired, false, rejectExpired},
		{"required, garbage", true, garbage, false, rejectInvalid},
		{"required, forged", true, forged, false, rejectInvalid},
	}
	for _, tt := range tests {
		for _, p := range paths {
			t.Run(tt.name+p, func(t *testing.T) {
				e := newEnv(t, Config{TokensRequired: tt.required, Upstream: upURL})
				r := httptest.NewRequest(http.MethodGet, p, nil)
				switch tt.tok {
				case valid:
					r.Header.Set(headerToken, e.token(t, "300"))
				case expired:
					tok := e.token(t, "300")
					e.clock.add(301 * time.Second)
					r.Header.Set(headerToken, tok)
				case garbage:
					r.Header.Set(headerToken, "AQAEAgarbage")
				case forged:
					other, _ := newTokenMinter(nil)
					tok, _, _ := other.mint(t0, 300, 1)
					r.Header.Set(headerToken, tok)
				case twoHeaders:
					tok := e.token(t, "300")
					r.Header.Add(headerToken, tok)
					r.Header.Add(headerToken, tok)
				case empty:
					r.Header.Set(headerToken, "")
				}
				if tt.tok == expired {
					// keep the credentials valid at the advanced clock
					c := testCreds()
					c.Expires = e.clock.now().Add(time.Hour)
					e.src.set(c, nil)
				}
				w := httptest.NewRecorder()
				e.s.Handler().ServeHTTP(w, r)
				if tt.ok {
					if w.Code == http.StatusUnauthorized {
						t.Fatalf("refused: %d", w.Code)
					}
					return
				}
				if w.Code != http.StatusUnauthorized {
					t.Fatalf("status %d, want 401", w.Code)
				}
				if ct := w.Header().Get("Content-Type"); ct != "text/plain" || w.Body.Len() == 0 {
					t.Errorf("401 body %q type %q", w.Body.String(), ct)
				}
				if got := testutil.ToFloat64(e.s.m.rejections.WithLabelValues(tt.reason)); got != 1 {
					t.Errorf("rejections{%s} = %v", tt.reason, got)
				}
				if e.src.calls != 0 {
					t.Error("credential source called for a refused request")
				}
			})
		}
	}
}

func TestListings(t *testing.T) {
	tests := []struct {
		path string
		body string
	}{
		{"/latest/meta-data/iam/security-credentials", "app"},
		{"/latest/meta-data/iam/security-credentials/", "app"},
		{"/latest/meta-data/iam/security-credentials-extended", "app"},
		{"/latest/meta-data/iam/security-credentials-extended/", "app"},
		{"/latest/meta-data/iam", "info\nsecurity-credentials/"},
		{"/latest/meta-data/iam/", "info\nsecurity-credentials/"},
		{"/2021-07-15/meta-data/iam/security-credentials/", "app"},
	}
	for _, tt := range tests {
		for _, method := range []string{http.MethodGet, http.MethodHead} {
			t.Run(method+tt.path, func(t *testing.T) {
				e := newEnv(t, Config{})
				w := e.doWire(t, method, tt.path, nil)
				if w.Code != http.StatusOK {
					t.Fatalf("status %d", w.Code)
				}
				if ct := w.Header().Get("Content-Type"); ct != "text/plain" {
					t.Errorf("Content-Type %q", ct)
				}
				if cl := w.Header().Get("Content-Length"); cl != strconv.Itoa(len(tt.body)) {
					t.Errorf("Content-Length %q", cl)
				}
				if method == http.MethodGet && w.Body.String() != tt.body {
					t.Errorf("body %q, want %q", w.Body.String(), tt.body)
				}
				if e.src.calls != 0 {
					t.Error("listing called the credential source")
				}
			})
		}
	}
}

func TestMethods(t *testing.T) {
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		t.Errorf("upstream reached by %s %s", r.Method, r.URL.Path)
	}))
	defer up.Close()
	upURL, _ := url.Parse(up.URL)
	paths := []string{
		"/latest/meta-data/iam/security-credentials/",
		"/latest/meta-data/iam/security-credentials/app",
		"/latest/meta-data/iam/security-credentials-extended/app/",
		"/latest/meta-data/iam/info",
		"/latest/meta-data/iam",
		"/latest/meta-data/iam/unknown",
		"/latest/meta-data/ami-id",
		"/latest/user-data",
	}
	for _, p := range paths {
		for _, m := range []string{"PUT", "POST", "DELETE", "PATCH", "OPTIONS", "TRACE", "PROPFIND"} {
			t.Run(m+p, func(t *testing.T) {
				e := newEnv(t, Config{Upstream: upURL})
				w := e.do(m, p, map[string]string{headerTokenTTL: "300"})
				if w.Code != http.StatusMethodNotAllowed {
					t.Fatalf("status %d, want 405", w.Code)
				}
				if got := w.Header().Get("Allow"); got != "GET, HEAD" {
					t.Errorf("Allow %q", got)
				}
			})
		}
	}
}

func TestLimits(t *testing.T) {
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		t.Errorf("upstream reached: %q", r.URL.Path)
	}))
	defer up.Close()
	upURL, _ := url.Parse(up.URL)
	long := "/latest/meta-data/" + strings.Repeat("a", 1024)
	tests := []struct {
		name   string
		raw    string // request line target
		method string
		body   string
		chunk  bool
		status int
	}{
		{"long path", long, "GET", "", false, 414},
		{"long query", "/latest/meta-data/x?" + strings.Repeat("q", 1024), "GET", "", false, 414},
		{"dotdot", "/latest/meta-data/../user-data", "GET", "", false, 400},
		{"dotdot at end", "/latest/meta-data/..", "GET", "", false, 400},
		{"dotdot encoded", "/latest/meta-data/%2e%2e/x", "GET", "", false, 400},
		{"dotdot mixed", "/latest/meta-data/.%2E/x", "GET", "", false, 400},
		{"dotdot after encoded slash", "/latest/meta-data%2F..%2Fx", "GET", "", false, 400},
		{"dotdot in iam", "/latest/meta-data/iam/../iam/info", "GET", "", false, 400},
		{"dotdot on token path", "/latest/api/../api/token", "PUT", "", false, 400},
		{"nul", "/latest/meta-data/x%00y", "GET", "", false, 400},
		{"newline", "/latest/meta-data/x%0ay", "GET", "", false, 400},
		{"body CL", "/latest/meta-data/iam/info", "GET", strings.Repeat("b", 1025), false, 413},
		{"body chunked", "/latest/meta-data/iam/info", "GET", strings.Repeat("b", 1025), true, 413},
		{"token body CL", "/latest/api/token", "PUT", strings.Repeat("b", 2000), false, 413},
		{"token body chunked", "/latest/api/token", "PUT", strings.Repeat("b", 2000), true, 413},
		{"passthrough body", "/latest/meta-data/ami-id", "GET", strings.Repeat("b", 5000), true, 413},
		{"small body ok", "/latest/meta-data/iam/info", "GET", strings.Repeat("b", 1024), true, 200},
		{"dot segment refused", "/latest/meta-data/iam/security-credentials/app/.", "GET", "", false, 400},
		{"dot before iam refused", "/latest/meta-data/./iam/security-credentials/app", "GET", "", false, 400},
		{"dot after latest refused", "/latest/./meta-data/iam/info", "GET", "", false, 400},
		{"encoded dot refused", "/latest/meta-data/%2e/iam/security-credentials/app", "GET", "", false, 400},
		{"encoded slash refused", "/latest/meta-data%2Fiam/info", "GET", "", false, 400},
		{"backslash refused", "/latest/meta-data\\iam/info", "GET", "", false, 400},
		{"dots in a name are fine", "/latest/meta-data/iam/security-credentials/my.role", "GET", "", false, 404},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t, Config{Upstream: upURL})
			var body io.Reader = strings.NewReader(tt.body)
			if tt.chunk {
				body = io.MultiReader(strings.NewReader(tt.body)) // hides the length
			}
			r := httptest.NewRequest(tt.method, tt.raw, body)
			if tt.chunk {
				r.ContentLength = -1
			}
			r.Header.Set(headerTokenTTL, "300")
			w := httptest.NewRecorder()
			e.s.Handler().ServeHTTP(w, r)
			if w.Code != tt.status {
				t.Errorf("status %d, want %d", w.Code, tt.status)
			}
		})
	}
}

func TestUpdate(t *testing.T) {
	e := newEnv(t, Config{})
	e.src.setRole("new-role", credsFor("new-role", "111122223333", "ASIANEWROLE000000000"), nil)
	newRole := access.PlanConfig{Host: roleKey("new-role"), Access: noAudit()}
	e.publish(t, Config{TokensRequired: true, HopLimit: 2}, newRole)
	if w := e.do("GET", "/latest/meta-data/iam/security-credentials/", nil); w.Code != 401 {
		t.Errorf("tokens required after update: %d", w.Code)
	}
	tok := e.token(t, "300")
	hdr := map[string]string{headerToken: tok}
	if w := e.do("GET", "/latest/meta-data/iam/security-credentials/", hdr); w.Body.String() != "new-role" {
		t.Errorf("listing %q", w.Body.String())
	}
	if w := e.do("GET", "/latest/meta-data/iam/security-credentials/new-role", hdr); w.Code != 200 || e.src.roles[0] != "new-role" ||
		!strings.Contains(w.Body.String(), "ASIANEWROLE") {
		t.Errorf("new role: %d %v", w.Code, e.src.roles)
	}
	// The old role is answered while the replaced plan is retained, then
	// it is an unknown role.
	if w := e.do("GET", "/latest/meta-data/iam/security-credentials/app", hdr); w.Code != 200 || !strings.Contains(w.Body.String(), testKeyID) {
		t.Errorf("old role within Grace: %d", w.Code)
	}
	e.clock.add(access.Grace + time.Second)
	if w := e.do("GET", "/latest/meta-data/iam/security-credentials/app", hdr); w.Code != 404 {
		t.Errorf("old role after Grace: %d", w.Code)
	}
	// A bad config is refused and the old one stays.
	if err := e.s.Update(Config{TokensRequired: true}); err == nil {
		t.Fatal("config without a plan accepted")
	}
	if err := e.s.Update(Config{Plan: planOf(t, defaultPlanConfig()), HopLimit: 99}); err == nil {
		t.Fatal("bad config accepted")
	}
	if w := e.do("GET", "/latest/meta-data/iam/security-credentials/", hdr); w.Body.String() != "new-role" {
		t.Errorf("after bad update: %q", w.Body.String())
	}
	if e.s.state.Load().cfg.HopLimit != 2 {
		t.Error("hop limit not updated")
	}
	// Pass-through switched on and off.
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodPut {
			w.WriteHeader(http.StatusNotFound)
			return
		}
		_, _ = io.WriteString(w, "i-0abc")
	}))
	defer up.Close()
	if w := e.do("GET", "/latest/meta-data/instance-id", hdr); w.Code != 404 {
		t.Errorf("no upstream: %d", w.Code)
	}
	u, _ := url.Parse(up.URL)
	e.publish(t, Config{Upstream: u}, newRole)
	pt := e.s.state.Load().pt
	if w := e.do("GET", "/latest/meta-data/instance-id", nil); w.Code != 200 || w.Body.String() != "i-0abc" {
		t.Errorf("with upstream: %d %q", w.Code, w.Body.String())
	}
	e.publish(t, Config{Upstream: u}, access.PlanConfig{Host: roleKey("other"), Access: noAudit()})
	if e.s.state.Load().pt != pt {
		t.Error("same upstream: pass-through (and its token) should be kept")
	}
	// Concurrent updates and requests (run with -race).
	var plans []*access.Plan
	for j := range 50 {
		plans = append(plans, planOf(t, access.PlanConfig{Host: roleKey(fmt.Sprintf("r%d", j)), Access: noAudit()}))
	}
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := range 50 {
				if i%2 == 0 {
					_ = e.s.Update(Config{Plan: plans[j], TokensRequired: j%2 == 0})
				} else {
					e.do("GET", "/latest/meta-data/iam/security-credentials/", nil)
				}
			}
		}()
	}
	wg.Wait()
}

// TestServe runs the real http.Server: limits, keep-alive, shutdown.
func TestServe(t *testing.T) {
	e := newEnv(t, Config{})
	e.s.now = time.Now
	c := testCreds()
	c.Expires = time.Now().Add(time.Hour)
	e.src.set(c, nil)
	block := make(chan struct{})
	entered := make(chan struct{}, 1)
	ctxErr := make(chan error, 1)
	e.src.setHook(func(ctx context.Context, _ creds.Key) {
		entered <- struct{}{}
		<-block
		ctxErr <- ctx.Err()
	})

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- e.s.Serve(ctx, ln) }()
	base := "http://" + ln.Addr().String()

	// Oversized header → 431.
	req, _ := http.NewRequest("GET", base+"/latest/meta-data/iam/security-credentials/", nil)
	req.Header.Set("X-Big", strings.Repeat("x", 16<<10))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusRequestHeaderFieldsTooLarge {
		t.Errorf("big header: %d", resp.StatusCode)
	}

	// A request in flight when shutdown starts completes (drain), and its
	// context is not cancelled by the shutdown.
	type result struct {
		code int
		body string
		err  error
	}
	got := make(chan result, 1)
	go func() {
		resp, err := http.Get(base + "/latest/meta-data/iam/security-credentials/app")
		if err != nil {
			got <- result{err: err}
			return
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		got <- result{code: resp.StatusCode, body: string(b)}
	}()
	<-entered
	cancel()
	time.Sleep(100 * time.Millisecond) // shutdown has begun
	close(block)
	r := <-got
	if r.err != nil || r.code != 200 || !strings.Contains(r.body, `"Code" : "Success"`) {
		t.Errorf("in-flight request: %+v", r)
	}
	if err := <-ctxErr; err != nil {
		t.Errorf("source context cancelled by shutdown: %v", err)
	}
	waitServed(t, done)
	if _, err := net.Dial("tcp", ln.Addr().String()); err == nil {
		t.Error("listener still open")
	}
}

// TestKeepAliveSequence replays what every SDK does on one connection.
func TestKeepAliveSequence(t *testing.T) {
	e := newEnv(t, Config{TokensRequired: true})
	e.s.now = time.Now
	c := testCreds()
	c.Expires = time.Now().Add(time.Hour)
	e.src.set(c, nil)
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() { _ = e.s.Serve(ctx, ln) }()

	conn, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	br := bufio.NewReader(conn)
	send := func(req string) (*http.Response, string) {
		t.Helper()
		if _, err := io.WriteString(conn, req); err != nil {
			t.Fatal(err)
		}
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		return resp, string(b)
	}
	resp, tok := send("PUT /latest/api/token HTTP/1.1\r\nHost: 169.254.169.254\r\nx-aws-ec2-metadata-token-ttl-seconds: 21600\r\n\r\n")
	if resp.StatusCode != 200 || resp.Header.Get(headerTokenTTL) != "21600" {
		t.Fatalf("token: %d %v", resp.StatusCode, resp.Header)
	}
	_, role := send("GET /latest/meta-data/iam/security-credentials/ HTTP/1.1\r\nHost: 169.254.169.254\r\nx-aws-ec2-metadata-token: " + tok + "\r\n\r\n")
	if role != "app" {
		t.Fatalf("role %q", role)
	}
	resp, doc := send("GET /latest/meta-data/iam/security-credentials/" + role + " HTTP/1.1\r\nHost: 169.254.169.254\r\nx-aws-ec2-metadata-token: " + tok + "\r\n\r\n")
	if resp.StatusCode != 200 || !strings.Contains(doc, testSecret) {
		t.Fatalf("credentials: %d %q", resp.StatusCode, doc)
	}
}

// TestTokenNotBoundToConnection: a session token is not bound to the
// connection that minted it (WIRE.md §1.3, "Tokens are not bound to the
// connection"). Go caches its token for the TTL and keeps sending it on
// later connections, so a token minted on one connection is accepted on
// another, also after the minting connection closed and on a connection
// that remembers another token (proxy/access.go peerMemo).
func TestTokenNotBoundToConnection(t *testing.T) {
	e := newEnv(t, Config{TokensRequired: true})
	base, _ := serveEnv(t, e)
	const credsPath = "/latest/meta-data/iam/security-credentials/" + testRole
	put := func(c *rawConn, name string) string {
		t.Helper()
		r := c.do(t, http.MethodPut, "/latest/api/token", "X-aws-ec2-metadata-token-ttl-seconds: 21600")
		if r.code != http.StatusOK || r.body == "" {
			t.Fatalf("token PUT on %s: %d %q", name, r.code, r.body)
		}
		return r.body
	}
	served := func(c *rawConn, name, tok, what string) {
		t.Helper()
		r := c.do(t, http.MethodGet, credsPath, "X-aws-ec2-metadata-token: "+tok)
		if r.code != http.StatusOK || !strings.Contains(r.body, testSecret) {
			t.Fatalf("%s on %s: %d %q, want 200 and the credentials", what, name, r.code, r.body)
		}
	}

	a, b := dialRaw(t, base), dialRaw(t, base)
	tokA := put(a, "A")
	served(b, "B", tokA, "the token minted on A")
	served(a, "A", tokA, "the token minted on A")
	tokB := put(b, "B")
	served(b, "B", tokB, "the token minted on B")
	served(a, "A", tokB, "the token minted on B")
	// B now remembers tokB (peerMemo): tokA is verified in full, and valid.
	served(b, "B", tokA, "the token minted on A, after B verified another")

	// The token outlives the connection that minted it.
	a.conn.Close()
	c := dialRaw(t, base)
	served(c, "C", tokA, "the token minted on A, after A closed")

	// The check is live: a forged token is refused on every connection.
	forged := []byte(tokA)
	forged[len(forged)-2] ^= 1
	for name, conn := range map[string]*rawConn{"B": b, "C": c} {
		if r := conn.do(t, http.MethodGet, credsPath, "X-aws-ec2-metadata-token: "+string(forged)); r.code != http.StatusUnauthorized {
			t.Fatalf("forged token on %s: %d %q, want 401", name, r.code, r.body)
		}
	}
}

func TestMetricsLint(t *testing.T) {
	e := newEnv(t, Config{})
	e.token(t, "300")
	e.do("GET", "/latest/meta-data/iam/security-credentials/app", nil)
	e.do("GET", "/nothing", nil)
	problems, err := testutil.GatherAndLint(e.reg)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("lint: %s: %s", p.Metric, p.Text)
	}
	want := []string{
		"imdsproxy_http_requests_total", "imdsproxy_http_request_duration_seconds",
		"imdsproxy_imds_tokens_issued_total", "imdsproxy_imds_tokens_outstanding",
		"imdsproxy_imds_token_rejections_total", "imdsproxy_passthrough_errors_total",
		"imdsproxy_upstream_token_fetches_total", "imdsproxy_access_refused_total",
		"imdsproxy_http_host_rejections_total", "imdsproxy_http_open_connections",
		"imdsproxy_http_connection_limit_reached_total",
		// the broker's, on the same registry
		"imdsproxy_rollout_served_total", "imdsproxy_rollout_fallbacks_total", "imdsproxy_access_refused_total",
	}
	mfs, err := e.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	have := map[string]bool{}
	for _, mf := range mfs {
		have[mf.GetName()] = true
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				switch l.GetName() {
				case "route", "code", "reason", "result", "kind", "outcome", "door":
				default:
					t.Errorf("%s: unexpected label %s", mf.GetName(), l.GetName())
				}
				if len(l.GetValue()) > 24 || strings.Contains(l.GetValue(), "/") {
					t.Errorf("%s: unbounded label value %q", mf.GetName(), l.GetValue())
				}
			}
		}
	}
	for _, n := range want {
		if !have[n] {
			t.Errorf("metric %s missing", n)
		}
	}
	if got := testutil.ToFloat64(e.s.m.requests.WithLabelValues(routeNotFound, "404")); got != 1 {
		t.Errorf("not_found 404 = %v", got)
	}
	if got := testutil.ToFloat64(e.s.m.requests.WithLabelValues(routeCredentials, "200")); got != 1 {
		t.Errorf("credentials 200 = %v", got)
	}
	if got := metricValue(t, e.reg, "imdsproxy_rollout_served_total", map[string]string{"kind": "workload"}); got != 1 {
		t.Errorf("served{workload} = %v", got)
	}
}

// TestLogsNoSecrets runs every kind of request at Debug level and checks that
// no token, secret or client header value reaches the log.
func TestLogsNoSecrets(t *testing.T) {
	core, logs := observer.New(zapcore.DebugLevel)
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodPut {
			_, _ = io.WriteString(w, "UPSTREAM-TOKEN-SECRET")
			return
		}
		w.WriteHeader(http.StatusUnauthorized)
	}))
	defer up.Close()
	u, _ := url.Parse(up.URL)
	e := newEnvLog(t, Config{Upstream: u}, zap.New(core))
	tok := e.token(t, "300")
	hdr := map[string]string{headerToken: tok, "X-Client-Secret": "CLIENT-HEADER-VALUE", "User-Agent": "CLIENT-UA"}
	e.do("GET", "/latest/meta-data/iam/security-credentials/app", hdr)
	e.do("GET", "/latest/meta-data/iam/info", hdr)
	e.do("GET", "/latest/meta-data/ami-id", hdr)
	e.do("GET", "/latest/meta-data/iam/info", map[string]string{headerToken: "BAD-CLIENT-TOKEN"})
	e.do("PUT", "/latest/api/token", map[string]string{headerTokenTTL: "300", "X-Forwarded-For": "CLIENT-XFF"})
	e.src.set(testCreds(), &classErr{"access_denied", true, "denied"})
	e.do("GET", "/latest/meta-data/iam/security-credentials/app", hdr)

	if logs.Len() == 0 {
		t.Fatal("no logs at debug level")
	}
	for _, entry := range logs.All() {
		line := entry.Message + fmt.Sprint(entry.ContextMap())
		for _, secret := range []string{tok, testSecret, testToken, "UPSTREAM-TOKEN-SECRET", "CLIENT-HEADER-VALUE",
			"CLIENT-UA", "BAD-CLIENT-TOKEN", "CLIENT-XFF"} {
			if strings.Contains(line, secret) {
				t.Errorf("log line leaks %q: %s", secret, line)
			}
		}
		if entry.Level > zapcore.DebugLevel && entry.Message == "request" {
			t.Errorf("per-request line above debug: %v", entry.Level)
		}
	}
	var warned bool
	for _, entry := range logs.FilterMessage("no credentials to serve").All() {
		if entry.Level == zapcore.WarnLevel && entry.ContextMap()["class"] == "access_denied" {
			warned = true
		}
	}
	if !warned {
		t.Error("credential error not logged at Warn")
	}
}

// TestSlowClientsCannotPin: a client that never finishes its request header
// is disconnected after the header timeout, and many such clients do not
// stop others from being served meanwhile.
func TestSlowClientsCannotPin(t *testing.T) {
	_, addr := rawServer(t, Config{})

	var slow []net.Conn
	for range 50 {
		conn, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		if _, err := conn.Write([]byte("GET /latest/meta-data/ HTTP/1.1\r\nHost: x\r\n")); err != nil {
			t.Fatal(err)
		}
		slow = append(slow, conn)
	}
	// Others are served while the slow clients hang.
	resp, err := http.Get("http://" + addr + "/latest/meta-data/iam/security-credentials/")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("a normal client got %d while slow clients hung", resp.StatusCode)
	}
	// Every slow client is cut off within the header timeout (plus slack).
	start := time.Now()
	for _, conn := range slow {
		_ = conn.SetReadDeadline(start.Add(readHeaderTimeout + 5*time.Second))
		buf := make([]byte, 512)
		for {
			_, err := conn.Read(buf)
			if err == nil {
				continue // an error response (408) may come before the close
			}
			if ne, ok := err.(net.Error); ok && ne.Timeout() {
				t.Fatalf("a slow client was still connected %s after the header timeout", time.Since(start))
			}
			break
		}
	}
}

// TestContentLengthValues: the shared Content-Length values are right,
// built or repeated, and full (len = cap = 1), so appending to one (as
// Header.Add would) copies it and never changes what the next response
// gets.
func TestContentLengthValues(t *testing.T) {
	for _, n := range []int{0, 1, 99, 100, 1071, autoLengthBelow - 1, autoLengthBelow, 1 << 20} {
		for range 2 { // built, then repeated
			v := contentLength(n)
			if len(v) != 1 || v[0] != strconv.Itoa(n) {
				t.Fatalf("contentLength(%d) = %q", n, v)
			}
			if cap(v) != 1 {
				t.Fatalf("contentLength(%d) has capacity %d: an append would write into the shared value", n, cap(v))
			}
		}
	}
	if len(textPlain) != 1 || cap(textPlain) != 1 || textPlain[0] != "text/plain" {
		t.Fatalf("textPlain = %q (cap %d), want one full element", textPlain, cap(textPlain))
	}
}

// TestWriteBodyFraming: whatever the body's length, a response of
// writeBody carries Content-Length (set by net/http below autoLengthBelow,
// by writeBody from there), never chunked, for GET and HEAD, and HEAD
// sends no body.
func TestWriteBodyFraming(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n, _ := strconv.Atoi(r.URL.Query().Get("n"))
		writeBody(w, http.StatusOK, bytes.Repeat([]byte("a"), n))
	}))
	defer srv.Close()
	for _, n := range []int{1, 1071, autoLengthBelow - 1, autoLengthBelow, autoLengthBelow + 1, 5000} {
		for _, method := range []string{http.MethodGet, http.MethodHead} {
			conn, err := net.Dial("tcp", srv.Listener.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
			fmt.Fprintf(conn, "%s /?n=%d HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", method, n)
			raw, _ := io.ReadAll(conn)
			conn.Close()
			head, body, _ := strings.Cut(string(raw), "\r\n\r\n")
			if !strings.Contains(head, "\r\nContent-Length: "+strconv.Itoa(n)+"\r\n") || strings.Contains(head, "Transfer-Encoding") ||
				!strings.Contains(head, "\r\nContent-Type: text/plain\r\n") {
				t.Errorf("%s of %d bytes: header\n%s", method, n, head)
			}
			if want := map[string]int{http.MethodGet: n, http.MethodHead: 0}[method]; len(body) != want {
				t.Errorf("%s of %d bytes: %d bytes of body, want %d", method, n, len(body), want)
			}
		}
	}
}

// TestServeShutdownServesFreshConnection: a connection accepted before the
// shutdown whose first request arrives after it has begun is answered, not
// dropped (connlimit.Listener.WaitFresh), and Serve returns once it is (a hand-off to the next
// process loses no request). A run where the host stalled the test past
// half of freshConnWait between the shutdown and the request proves nothing
// and is repeated.
func TestServeShutdownServesFreshConnection(t *testing.T) {
	for attempt := 1; ; attempt++ {
		if serveFreshAfterShutdown(t) {
			return
		}
		if attempt == 3 {
			t.Fatal("the host stalled the test past freshConnWait/2 three times")
		}
	}
}

// serveFreshAfterShutdown runs the scenario once; false: the run was too
// slow to tell.
func serveFreshAfterShutdown(t *testing.T) bool {
	e, addr, cancel, done := servingEnv(t, Config{})
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	for deadline := time.Now().Add(5 * time.Second); testutil.ToFloat64(e.s.lim.openConns) != 1; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the connection was not accepted")
		}
	}
	cancel()
	shutdown := time.Now()
	time.Sleep(freshConnWait / 5) // the shutdown waits for the fresh connection
	select {
	case err := <-done:
		if time.Since(shutdown) < freshConnWait {
			t.Fatalf("Serve returned %v before the fresh connection's request", err)
		}
		return false
	default:
	}
	fmt.Fprintf(conn, "GET /latest/meta-data/iam/security-credentials/ HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n")
	if time.Since(shutdown) > freshConnWait/2 {
		return false
	}
	_ = conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatalf("the fresh connection's request was dropped: %v", err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || string(b) != testRole {
		t.Errorf("fresh connection's request: %d %q", resp.StatusCode, b)
	}
	waitServed(t, done)
	return true
}

// TestServeShutdownServesConnectionBeingAccepted: a connection the kernel
// handed to the accept loop just before the shutdown, and not yet seen by
// the server (no StateNew), is answered too: the shutdown waits for the
// accept loop to come round before it counts the fresh connections.
// (Found by the zero-drop restart test under load: 1 of 2,637 rounds lost
// its token request with EOF.)
func TestServeShutdownServesConnectionBeingAccepted(t *testing.T) {
	e := newEnv(t, Config{})
	e.s.now = time.Now
	c := testCreds()
	c.LastUpdated, c.Expires = time.Now(), time.Now().Add(time.Hour)
	e.src.set(c, nil)
	p := connlimittest.StartPaused(t, 300*time.Millisecond, e.s.Serve)
	conn, err := net.Dial("tcp", p.Addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	fmt.Fprintf(conn, "GET /latest/meta-data/iam/security-credentials/ HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n")
	<-p.Accepted
	p.Shutdown() // while the accept loop holds the connection
	_ = conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatalf("the request of a connection being accepted at the shutdown was dropped: %v", err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || string(b) != testRole {
		t.Errorf("its request: %d %q", resp.StatusCode, b)
	}
}

// waitServed fails t unless Serve's result arrives on done, nil, within 10s.
func waitServed(t *testing.T, done <-chan error) {
	t.Helper()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Serve returned %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Serve did not return")
	}
}
