package proxy

import (
	"bufio"
	"context"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"path"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
)

// fakeIMDS is an upstream IMDS that records what reaches it.
type fakeIMDS struct {
	t *testing.T

	mu       sync.Mutex
	puts     int
	gets     []*http.Request
	paths    []string
	tokens   []string // token issued, in order
	putCode  int      // status of the token PUT (0: 200)
	requireV bool     // 401 without a current token
	current  string
	reject   int // answer the next n GETs with 401
	delay    time.Duration
}

func (f *fakeIMDS) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	if r.Method == http.MethodPut && r.URL.Path == "/latest/api/token" {
		f.puts++
		code := f.putCode
		tok := "UPSTREAM-" + strings.Repeat("T", f.puts)
		if code == 0 {
			f.current = tok
			f.tokens = append(f.tokens, tok)
		}
		ttl := r.Header.Get(headerTokenTTL)
		xff := r.Header.Get("X-Forwarded-For")
		delay := f.delay
		f.mu.Unlock()
		time.Sleep(delay)
		if xff != "" {
			w.WriteHeader(400)
			return
		}
		if code != 0 {
			w.WriteHeader(code)
			return
		}
		if ttl != "21600" {
			f.t.Errorf("daemon asked for TTL %q", ttl)
		}
		w.Header().Set(headerTokenTTL, ttl)
		_, _ = io.WriteString(w, tok)
		return
	}
	f.gets = append(f.gets, r.Clone(context.Background()))
	f.paths = append(f.paths, r.URL.EscapedPath())
	got := r.Header.Get(headerToken)
	unauthorized := (f.requireV && got != f.current) || f.reject > 0
	if f.reject > 0 {
		f.reject--
	}
	f.mu.Unlock()
	if unauthorized {
		w.WriteHeader(http.StatusUnauthorized)
		return
	}
	switch r.URL.Path {
	case "/latest/meta-data/instance-id":
		w.Header().Set("X-Upstream", "yes")
		w.Header().Set("Content-Type", "text/plain")
		_, _ = io.WriteString(w, "i-0123456789abcdef0")
	case "/latest/meta-data/teapot":
		w.Header().Set("Content-Type", "application/weird")
		w.WriteHeader(http.StatusTeapot)
		_, _ = io.WriteString(w, "short and stout\n")
	case "/latest/meta-data/":
		_, _ = io.WriteString(w, "ami-id\ninstance-id\n")
	default:
		http.NotFound(w, r)
	}
}

func (f *fakeIMDS) lastGet() *http.Request {
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.gets) == 0 {
		return nil
	}
	return f.gets[len(f.gets)-1]
}

func startIMDS(t *testing.T, f *fakeIMDS) *url.URL {
	t.Helper()
	f.t = t
	srv := httptest.NewServer(f)
	t.Cleanup(srv.Close)
	u, _ := url.Parse(srv.URL)
	return u
}

func TestPassthrough(t *testing.T) {
	f := &fakeIMDS{requireV: true}
	u := startIMDS(t, f)
	e := newEnv(t, Config{Upstream: u})
	clientTok := e.token(t, "300")

	tests := []struct {
		name   string
		method string
		path   string
		hdr    map[string]string
		status int
		body   string
		ctype  string
	}{
		{"plain", "GET", "/latest/meta-data/instance-id", nil, 200, "i-0123456789abcdef0", "text/plain"},
		{"head", "HEAD", "/latest/meta-data/instance-id", nil, 200, "", "text/plain"},
		{"status and body unchanged", "GET", "/latest/meta-data/teapot", nil, 418, "short and stout\n", "application/weird"},
		{"upstream 404", "GET", "/latest/meta-data/nothing", nil, 404, "404 page not found\n", "text/plain; charset=utf-8"},
		{"listing with trailing newline", "GET", "/latest/meta-data/", nil, 200, "ami-id\ninstance-id\n", ""},
		{"client token and forwarding headers stripped", "GET", "/latest/meta-data/instance-id", map[string]string{
			headerToken: clientTok, headerTokenTTL: "300", "X-Forwarded-For": "10.1.1.1", "X-Forwarded-Host": "evil",
			"X-Forwarded-Proto": "https", "Forwarded": "for=10.1.1.1", "X-Real-IP": "10.1.1.1",
		}, 200, "i-0123456789abcdef0", "text/plain"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			w := e.do(tt.method, tt.path, tt.hdr)
			if w.Code != tt.status {
				t.Fatalf("status %d, want %d", w.Code, tt.status)
			}
			if tt.method == "GET" && w.Body.String() != tt.body {
				t.Errorf("body %q, want %q", w.Body.String(), tt.body)
			}
			if tt.ctype != "" && w.Header().Get("Content-Type") != tt.ctype {
				t.Errorf("Content-Type %q", w.Header().Get("Content-Type"))
			}
			up := f.lastGet()
			if up == nil {
				t.Fatal("nothing reached upstream")
			}
			if up.Method != tt.method || up.URL.Path != tt.path {
				t.Errorf("upstream got %s %s", up.Method, up.URL.Path)
			}
			for _, h := range []string{"X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto", "Forwarded", "X-Real-Ip", headerTokenTTL} {
				if v := up.Header.Values(h); len(v) != 0 {
					t.Errorf("upstream got %s: %q", h, v)
				}
			}
			if got := up.Header.Get(headerToken); got != "UPSTREAM-T" {
				t.Errorf("upstream token %q, want the daemon's", got)
			}
		})
	}
	if f.puts != 1 {
		t.Errorf("%d upstream token PUTs, want 1 (cached)", f.puts)
	}
	if w := e.do("GET", "/latest/meta-data/instance-id", nil); w.Header().Get("X-Upstream") != "yes" {
		t.Error("upstream response header lost")
	}
}

func TestPassthroughQueryKept(t *testing.T) {
	f := &fakeIMDS{}
	e := newEnv(t, Config{Upstream: startIMDS(t, f)})
	e.do("GET", "/latest/meta-data/instance-id?x=1", nil)
	if up := f.lastGet(); up == nil || up.URL.RawQuery != "x=1" {
		t.Errorf("query not forwarded: %v", up)
	}
}

func TestPassthroughNeverForwardsIAM(t *testing.T) {
	f := &fakeIMDS{}
	e := newEnv(t, Config{Upstream: startIMDS(t, f)})
	for _, p := range []string{
		"/latest/meta-data/iam/security-credentials/instance-profile-role",
		"/2016-09-02/meta-data/iam/security-credentials/",
		"/1.0/meta-data/iam/info",
		"/latest/META-DATA/IAM/security-credentials/x",
		"/latest//meta-data//iam/security-credentials/x",
		"/latest/meta-data/iam%2Fsecurity-credentials%2Fx",
	} {
		e.do("GET", p, nil)
	}
	if len(f.paths) != 0 {
		t.Errorf("iam paths forwarded: %q", f.paths)
	}
}

func TestPassthroughRetry401(t *testing.T) {
	f := &fakeIMDS{requireV: true}
	e := newEnv(t, Config{Upstream: startIMDS(t, f)})
	if w := e.do("GET", "/latest/meta-data/instance-id", nil); w.Code != 200 {
		t.Fatalf("first: %d", w.Code)
	}
	// The upstream restarts and forgets its tokens: the next GET gets 401 once.
	f.mu.Lock()
	f.current = "forgotten"
	f.mu.Unlock()
	w := e.do("GET", "/latest/meta-data/instance-id", nil)
	if w.Code != 200 || w.Body.String() != "i-0123456789abcdef0" {
		t.Fatalf("after upstream 401: %d %q", w.Code, w.Body.String())
	}
	if f.puts != 2 {
		t.Errorf("%d PUTs, want 2 (re-fetch after 401)", f.puts)
	}
	if len(f.gets) != 3 {
		t.Errorf("%d GETs, want 3 (one retry)", len(f.gets))
	}
	// A persistent 401 is passed through after exactly one retry.
	f.mu.Lock()
	f.reject = 100
	f.mu.Unlock()
	before := len(f.gets)
	if w := e.do("GET", "/latest/meta-data/instance-id", nil); w.Code != 401 {
		t.Errorf("persistent 401: %d", w.Code)
	}
	if n := len(f.gets) - before; n != 2 {
		t.Errorf("%d attempts, want 2", n)
	}
}

func TestPassthroughV1OnlyUpstream(t *testing.T) {
	for _, code := range []int{403, 404, 405} {
		f := &fakeIMDS{putCode: code}
		e := newEnv(t, Config{Upstream: startIMDS(t, f)})
		for range 3 {
			if w := e.do("GET", "/latest/meta-data/instance-id", nil); w.Code != 200 {
				t.Fatalf("%d: status %d", code, w.Code)
			}
			if up := f.lastGet(); up.Header.Get(headerToken) != "" {
				t.Errorf("%d: token sent to a v1-only upstream", code)
			}
		}
		if f.puts != 1 {
			t.Errorf("%d: %d PUTs, want 1 (v1-only remembered)", code, f.puts)
		}
		if got := testutil.ToFloat64(e.s.m.upstreamTokens.WithLabelValues(fetchV1Only)); got != 1 {
			t.Errorf("v1_only fetches = %v", got)
		}
	}
}

func TestPassthroughUpstreamTokenErrors(t *testing.T) {
	f := &fakeIMDS{putCode: 500}
	e := newEnv(t, Config{Upstream: startIMDS(t, f)})
	if w := e.do("GET", "/latest/meta-data/instance-id", nil); w.Code != 502 {
		t.Errorf("token PUT 500: status %d, want 502", w.Code)
	}
	if got := testutil.ToFloat64(e.s.m.upstreamTokens.WithLabelValues(fetchError)); got != 1 {
		t.Errorf("error fetches = %v", got)
	}
	f.mu.Lock()
	f.putCode = 0
	f.mu.Unlock()
	if w := e.do("GET", "/latest/meta-data/instance-id", nil); w.Code != 200 {
		t.Errorf("after recovery: %d (errors must not be cached)", w.Code)
	}
}

func TestUpstreamTokenShared(t *testing.T) {
	f := &fakeIMDS{requireV: true, delay: 100 * time.Millisecond}
	e := newEnv(t, Config{Upstream: startIMDS(t, f)})
	var wg sync.WaitGroup
	var ok atomic.Int32
	for range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if w := e.do("GET", "/latest/meta-data/instance-id", nil); w.Code == 200 {
				ok.Add(1)
			}
		}()
	}
	wg.Wait()
	if ok.Load() != 20 || f.puts != 1 {
		t.Errorf("%d ok, %d PUTs; want 20 ok and 1 PUT", ok.Load(), f.puts)
	}
}

func TestUpstreamTokenExpiry(t *testing.T) {
	f := &fakeIMDS{requireV: true}
	e := newEnv(t, Config{Upstream: startIMDS(t, f)})
	e.do("GET", "/latest/meta-data/instance-id", nil)
	e.clock.add(21600*time.Second - time.Minute - time.Second)
	e.do("GET", "/latest/meta-data/instance-id", nil)
	if f.puts != 1 {
		t.Errorf("re-fetched too early: %d PUTs", f.puts)
	}
	e.clock.add(2 * time.Second) // within the last minute of the TTL
	e.do("GET", "/latest/meta-data/instance-id", nil)
	if f.puts != 2 {
		t.Errorf("not re-fetched in the last minute: %d PUTs", f.puts)
	}
}

func TestPassthroughUnreachable(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close() // nothing listens there any more: connection refused
	u, _ := url.Parse("http://" + addr)
	e := newEnv(t, Config{Upstream: u, UpstreamTimeout: 2 * time.Second})
	start := time.Now()
	w := e.do("GET", "/latest/meta-data/instance-id", nil)
	if w.Code != http.StatusBadGateway {
		t.Errorf("status %d, want 502", w.Code)
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("took %v", d)
	}
	if got := testutil.ToFloat64(e.s.m.ptErrors.WithLabelValues(ptErrUnreachable)); got != 1 {
		t.Errorf("unreachable = %v", got)
	}
}

func TestPassthroughTimeout(t *testing.T) {
	tests := []struct {
		name    string
		handler http.HandlerFunc
	}{
		{"hangs on token PUT", func(w http.ResponseWriter, r *http.Request) { <-r.Context().Done() }},
		{"hangs on GET", func(w http.ResponseWriter, r *http.Request) {
			if r.Method == http.MethodPut {
				w.WriteHeader(404)
				return
			}
			<-r.Context().Done()
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv := httptest.NewServer(tt.handler)
			defer srv.Close()
			u, _ := url.Parse(srv.URL)
			const timeout = 300 * time.Millisecond
			e := newEnv(t, Config{Upstream: u, UpstreamTimeout: timeout})
			start := time.Now()
			w := e.do("GET", "/latest/meta-data/instance-id", nil)
			d := time.Since(start)
			if w.Code != http.StatusGatewayTimeout {
				t.Errorf("status %d, want 504", w.Code)
			}
			if d < timeout-50*time.Millisecond || d > timeout+700*time.Millisecond {
				t.Errorf("answered after %v, want about %v", d, timeout)
			}
			if got := testutil.ToFloat64(e.s.m.ptErrors.WithLabelValues(ptErrTimeout)); got != 1 {
				t.Errorf("timeout = %v", got)
			}
		})
	}
}

// TestPassthroughBlackhole: an upstream that accepts TCP but never answers
// anything (not even HTTP) → 504 in bounded time.
func TestPassthroughBlackhole(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { _, _ = io.Copy(io.Discard, bufio.NewReader(c)) }()
		}
	}()
	u, _ := url.Parse("http://" + ln.Addr().String())
	e := newEnv(t, Config{Upstream: u, UpstreamTimeout: 200 * time.Millisecond})
	start := time.Now()
	if w := e.do("GET", "/latest/meta-data/instance-id", nil); w.Code != 504 {
		t.Errorf("status %d", w.Code)
	}
	if d := time.Since(start); d > 5*time.Second { // the upstream never answers: without the timeout, for ever
		t.Errorf("took %v", d)
	}
}

func TestPassthroughDisabled(t *testing.T) {
	e := newEnv(t, Config{})
	if w := e.do("GET", "/latest/meta-data/instance-id", nil); w.Code != 404 {
		t.Errorf("status %d, want 404", w.Code)
	}
	if got := testutil.ToFloat64(e.s.m.requests.WithLabelValues(routeNotFound, "404")); got != 1 {
		t.Errorf("not_found 404 = %v", got)
	}
}

func TestPassthroughUpstreamBasePath(t *testing.T) {
	f := &fakeIMDS{}
	srv := httptest.NewServer(http.StripPrefix("/imds", f))
	defer srv.Close()
	f.t = t
	u, _ := url.Parse(srv.URL + "/imds/")
	e := newEnv(t, Config{Upstream: u})
	if w := e.do("GET", "/latest/meta-data/instance-id", nil); w.Code != 200 {
		t.Errorf("status %d", w.Code)
	}
	if f.puts != 1 {
		t.Errorf("token PUT not sent under the base path")
	}
}

// FuzzRoute sends arbitrary methods and targets through the handler with a
// fake source and a fake upstream: never a panic, never a 5xx other than the
// pass-through's 502/504, never a ".." path upstream.
func FuzzRoute(f *testing.F) {
	for _, s := range [][2]string{
		{"GET", "/latest/meta-data/iam/security-credentials/app"},
		{"GET", "/latest/meta-data/iam/security-credentials-extended/"},
		{"HEAD", "/latest/meta-data/iam/info"},
		{"PUT", "/latest/api/token"},
		{"GET", "/latest/meta-data/instance-id"},
		{"GET", "/latest/meta-data/../../etc/passwd"},
		{"GET", "/latest/meta-data/%2e%2e/%2e%2e/x"},
		{"GET", "/latest/meta-data/%2F..%2F"},
		{"GET", "//latest///meta-data//iam"},
		{"GET", "http://evil.example/latest/meta-data/ami-id"},
		{"GET", "*"},
		{"OPTIONS", "*"},
		{"CONNECT", "169.254.169.254:80"},
		{"GET", "/latest/meta-data/x%00"},
		{"GET", "/" + strings.Repeat("a/", 600)},
		{"PROPFIND", "/"},
		{"GET", "/latest/meta-data/x?a=..&b=%00"},
		{"GET", "/latest/meta-data/./iam/security-credentials/app"},
		{"GET", "/latest/./meta-data/iam/info"},
		{"GET", "/latest/meta-data/%2e/iam/info"},
		{"GET", "/latest/meta-data%2fiam/info"},
		{"GET", "/latest/meta-data\\iam/info"},
		{"GET", "/latest/meta-data/placement/../iam/info"},
	} {
		f.Add(s[0], s[1])
	}
	var mu sync.Mutex
	var forwarded []string
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		forwarded = append(forwarded, r.URL.Path)
		mu.Unlock()
		if r.Method == http.MethodPut {
			w.WriteHeader(http.StatusNotFound)
			return
		}
		_, _ = io.WriteString(w, "ok")
	}))
	defer up.Close()
	u, _ := url.Parse(up.URL)
	e := newEnv(f, Config{Upstream: u})

	f.Fuzz(func(t *testing.T, method, target string) {
		raw := method + " " + target + " HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n"
		r, err := http.ReadRequest(bufio.NewReader(strings.NewReader(raw)))
		if err != nil {
			return // not a request net/http would hand to a handler
		}
		mu.Lock()
		forwarded = forwarded[:0]
		mu.Unlock()
		w := httptest.NewRecorder()
		e.s.Handler().ServeHTTP(w, r)
		if w.Code >= 500 && w.Code != http.StatusBadGateway && w.Code != http.StatusGatewayTimeout {
			t.Fatalf("%s %q: status %d", method, target, w.Code)
		}
		if w.Code == http.StatusOK && w.Body.Len() == 0 && method != http.MethodHead {
			t.Fatalf("%s %q: empty 200", method, target)
		}
		mu.Lock()
		defer mu.Unlock()
		// The oracle is independent of the proxy's own path rule: whatever
		// was forwarded is cleaned the way a web server (or a careless
		// IMDS) would clean it — path.Clean, backslashes as slashes,
		// doubled slashes merged — and neither the cleaned nor the raw form
		// may reach the iam tree; and what is forwarded is already in that
		// canonical form, so upstream cannot see other segments than the
		// proxy routed.
		for _, p := range forwarded {
			if strings.ContainsRune(p, 0) {
				t.Fatalf("%s %q: forwarded NUL", method, target)
			}
			clean := path.Clean("/" + strings.ReplaceAll(p, "\\", "/"))
			for _, form := range []string{p, clean} {
				if segs := strings.FieldsFunc(form, func(r rune) bool { return r == '/' }); len(segs) >= 3 &&
					strings.EqualFold(segs[1], "meta-data") && strings.EqualFold(segs[2], "iam") {
					t.Fatalf("%s %q: forwarded %q, an iam path once cleaned (%q)", method, target, p, clean)
				}
			}
			if strings.TrimSuffix(clean, "/") != strings.TrimSuffix(path.Clean(p), "/") || strings.Contains(p, "\\") {
				t.Fatalf("%s %q: forwarded %q, not in canonical form (%q)", method, target, p, clean)
			}
			for seg := range strings.SplitSeq(p, "/") {
				if seg == "." || seg == ".." {
					t.Fatalf("%s %q: forwarded a dot segment in %q", method, target, p)
				}
			}
		}
	})
}
