package token

import (
	"context"
	"encoding/pem"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/imdsproxy/imdsproxy/test/fakes/issuer"
	"github.com/imdsproxy/imdsproxy/test/fakes/oidc"
)

const testDocument = `{
	"accountId": "0123456789",
	"instanceId": "i-1234567890abcdef0",
	"region": "us-east-1"
}`

const testPKCS7 = "MIAGCSqGSIb3DQEHAqCAMIACAQExCzAJBgUrDgMCGgUAMIAGCSqGSIb3DQEHAaCA\nJIAEggHbewogICJhY2NvdW50SWQiIDogIjAxMjM0NTY3ODkiLAo=\n"

// fakeIMDS is an IMDSv2-only stand-in serving the identity document and
// its signature.
type fakeIMDS struct {
	puts, gets atomic.Int32
	fail       atomic.Bool // answer 500 to the document
}

func (f *fakeIMDS) handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("PUT /latest/api/token", func(w http.ResponseWriter, r *http.Request) {
		f.puts.Add(1)
		if r.Header.Get("X-aws-ec2-metadata-token-ttl-seconds") == "" {
			http.Error(w, "missing ttl", http.StatusBadRequest)
			return
		}
		_, _ = io.WriteString(w, "imds-session-token")
	})
	serve := func(body string) http.HandlerFunc {
		return func(w http.ResponseWriter, r *http.Request) {
			f.gets.Add(1)
			if r.Header.Get("X-aws-ec2-metadata-token") != "imds-session-token" {
				http.Error(w, "401 - Unauthorized", http.StatusUnauthorized)
				return
			}
			if f.fail.Load() {
				http.Error(w, "boom", http.StatusInternalServerError)
				return
			}
			w.Header().Set("Content-Type", "text/plain")
			_, _ = io.WriteString(w, body)
		}
	}
	mux.HandleFunc("GET /latest/dynamic/instance-identity/document", serve(testDocument))
	mux.HandleFunc("GET /latest/dynamic/instance-identity/pkcs7", serve(testPKCS7))
	return mux
}

func startIMDS(t *testing.T) (*fakeIMDS, string) {
	t.Helper()
	f := &fakeIMDS{}
	srv := httptest.NewServer(f.handler())
	t.Cleanup(srv.Close)
	return f, srv.URL
}

func newTestIssuer(t *testing.T) *oidc.Issuer {
	t.Helper()
	iss, err := oidc.New(oidc.Options{URL: "https://issuer.internal"})
	if err != nil {
		t.Fatal(err)
	}
	return iss
}

func TestURLSuccessJSONAndText(t *testing.T) {
	for _, format := range []issuer.Format{issuer.FormatJSON, issuer.FormatText} {
		t.Run(map[issuer.Format]string{issuer.FormatJSON: "json", issuer.FormatText: "text"}[format], func(t *testing.T) {
			imds, imdsURL := startIMDS(t)
			is := issuer.Start(t, issuer.Config{Issuer: newTestIssuer(t), Format: format})
			reg := prometheus.NewPedanticRegistry()
			core, logs := newObserver()
			u, err := NewURL(is.URL, URLOptions{IMDSBase: imdsURL}, core, reg)
			if err != nil {
				t.Fatal(err)
			}
			tok, err := u.Token(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			minted := is.Minted()
			if len(minted) != 1 || tok != minted[0] {
				t.Fatalf("Token is not the minted token")
			}
			c, _ := ParseClaims(tok)
			if c.Subject != "i-1234567890abcdef0" {
				t.Fatalf("sub = %q", c.Subject)
			}
			reqs := is.Requests()
			if reqs[0].PKCS7 != strings.Join(strings.Fields(testPKCS7), "") {
				t.Fatalf("pkcs7 sent = %q", reqs[0].PKCS7)
			}
			// Cached: no second IMDS or issuer round trip.
			if _, err := u.Token(context.Background()); err != nil {
				t.Fatal(err)
			}
			if is.Calls() != 1 || imds.puts.Load() != 1 || imds.gets.Load() != 2 {
				t.Fatalf("issuer calls %d, IMDS puts %d gets %d; want 1, 1, 2", is.Calls(), imds.puts.Load(), imds.gets.Load())
			}
			if v := testutil.ToFloat64(u.jwt.fetches.WithLabelValues("url", "ok")); v != 1 {
				t.Fatalf("fetches ok = %v", v)
			}
			if problems, err := testutil.GatherAndLint(reg); err != nil || len(problems) > 0 {
				t.Fatalf("lint: %v %v", problems, err)
			}
			if strings.Contains(logText(logs), tok) {
				t.Fatal("token logged")
			}
		})
	}
}

func TestURLRefreshNearExpiry(t *testing.T) {
	_, imdsURL := startIMDS(t)
	is := issuer.Start(t, issuer.Config{Issuer: newTestIssuer(t)})
	clock := newTestClock(time.Now())
	u, err := NewURL(is.URL, URLOptions{IMDSBase: imdsURL, Now: clock.Now}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, step := range []time.Duration{0, 50 * time.Minute, 5 * time.Minute} {
		clock.Add(step)
		if _, err := u.Token(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
	if is.Calls() != 2 {
		t.Fatalf("issuer calls = %d, want 2 (cached until exp - 6m)", is.Calls())
	}
}

func TestURLFailures(t *testing.T) {
	cases := []struct {
		name      string
		mode      issuer.Mode
		handler   http.HandlerFunc // instead of the fake issuer
		imdsFail  bool
		reason    string
		want      string
		permanent bool
	}{
		{name: "500", mode: issuer.ModeFail5xx, reason: ReasonIssuerFailed, want: "issuer answered HTTP 500: internal error"},
		{name: "html", mode: issuer.ModeHTML, reason: ReasonIssuerFailed, want: "issuer answered text/html, not a token"},
		{name: "garbage", mode: issuer.ModeGarbage, reason: ReasonMalformed, want: "malformed JWT", permanent: true},
		{name: "expired", mode: issuer.ModeExpired, reason: ReasonExpired, want: "is not after now", permanent: true},
		{name: "imds down", imdsFail: true, reason: ReasonDocumentUnavailable, want: "IMDS answered HTTP 500"},
		{name: "html 502", handler: func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "text/html")
			w.WriteHeader(502)
			_, _ = io.WriteString(w, "<html>"+strings.Repeat("x", 5000)+"</html>")
		}, reason: ReasonIssuerFailed, want: "issuer answered HTTP 502 (an HTML page)"},
		{name: "long error body with a token", handler: func(w http.ResponseWriter, r *http.Request) {
			w.WriteHeader(403)
			_, _ = io.WriteString(w, "denied for eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJpLTEifQ.c2lnbmF0dXJlLXNlY3JldA "+strings.Repeat("y", 5000))
		}, reason: ReasonIssuerFailed, want: "issuer answered HTTP 403: denied for <redacted-jwt>"},
		{name: "json without token", handler: func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "application/json")
			_, _ = io.WriteString(w, `{"jwt":"x"}`)
		}, reason: ReasonIssuerFailed, want: `no "token"`},
		{name: "json not an object", handler: func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "application/json")
			_, _ = io.WriteString(w, `[1,2]`)
		}, reason: ReasonIssuerFailed, want: `not an object with a "token" string`},
		{name: "octet-stream", handler: func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "application/octet-stream")
			_, _ = io.WriteString(w, "xx")
		}, reason: ReasonIssuerFailed, want: "issuer answered application/octet-stream, not a token"},
		{name: "redirect", handler: func(w http.ResponseWriter, r *http.Request) {
			http.Redirect(w, r, "http://example.invalid/", http.StatusTemporaryRedirect)
		}, reason: ReasonIssuerFailed, want: "issuer answered HTTP 307"},
		{name: "huge", handler: func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "text/plain")
			_, _ = io.WriteString(w, strings.Repeat("a", MaxTokenSize+10))
		}, reason: ReasonTooLarge, want: "larger than", permanent: true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			imds, imdsURL := startIMDS(t)
			imds.fail.Store(tc.imdsFail)
			target := ""
			if tc.handler != nil {
				srv := httptest.NewServer(tc.handler)
				t.Cleanup(srv.Close)
				target = srv.URL + "/v1/token"
			} else {
				is := issuer.Start(t, issuer.Config{Issuer: newTestIssuer(t)})
				is.SetMode(tc.mode)
				target = is.URL
			}
			core, logs := newObserver()
			u, err := NewURL(target, URLOptions{IMDSBase: imdsURL}, core, nil)
			if err != nil {
				t.Fatal(err)
			}
			_, err = u.Token(context.Background())
			var te *Error
			if !errors.As(err, &te) || te.Reason != tc.reason || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v; want reason %s and %q", err, tc.reason, tc.want)
			}
			if te.Permanent() != tc.permanent {
				t.Fatalf("Permanent = %v", te.Permanent())
			}
			if len(err.Error()) > 400 {
				t.Fatalf("error too long (%d bytes): %s", len(err.Error()), err)
			}
			if strings.Contains(err.Error(), "c2lnbmF0dXJlLXNlY3JldA") || strings.Contains(logText(logs), "c2lnbmF0dXJlLXNlY3JldA") {
				t.Fatal("a token from the body reached the error or the log")
			}
		})
	}
}

func TestURLTimeout(t *testing.T) {
	_, imdsURL := startIMDS(t)
	is := issuer.Start(t, issuer.Config{Issuer: newTestIssuer(t)})
	is.SetMode(issuer.ModeHang)
	u, err := NewURL(is.URL, URLOptions{IMDSBase: imdsURL, Timeout: 200 * time.Millisecond}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	_, err = u.Token(context.Background())
	var te *Error
	if !errors.As(err, &te) || te.Reason != ReasonIssuerTimeout || te.Permanent() {
		t.Fatalf("err = %v", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("took %v", d)
	}
}

func TestURLConcurrentCallersShareOneFetch(t *testing.T) {
	_, imdsURL := startIMDS(t)
	iss := newTestIssuer(t)
	var calls atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls.Add(1)
		time.Sleep(200 * time.Millisecond)
		_, _ = io.WriteString(w, iss.Mint(oidc.Claims{}))
	}))
	t.Cleanup(srv.Close)
	u, err := NewURL(srv.URL, URLOptions{IMDSBase: imdsURL}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for range 10 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := u.Token(context.Background()); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if n := calls.Load(); n != 1 {
		t.Fatalf("issuer called %d times", n)
	}
}

func TestURLTLSWithCAFile(t *testing.T) {
	_, imdsURL := startIMDS(t)
	is, srv := issuer.StartTLS(t, issuer.Config{Issuer: newTestIssuer(t)})
	ca := filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(ca, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw}), 0o600); err != nil {
		t.Fatal(err)
	}
	// Without the CA: refused as unknown authority.
	u, err := NewURL(is.URL, URLOptions{IMDSBase: imdsURL}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := u.Token(context.Background()); err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Fatalf("without ca_file: %v", err)
	}
	u, err = NewURL(is.URL, URLOptions{IMDSBase: imdsURL, CAFile: ca}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := u.Token(context.Background()); err != nil {
		t.Fatal(err)
	}
}

func TestNewURLErrors(t *testing.T) {
	dir := t.TempDir()
	notPEM := filepath.Join(dir, "x.pem")
	write(t, notPEM, "not a certificate")
	cases := map[string]struct {
		url  string
		opts URLOptions
	}{
		"http to a remote host": {"http://issuer.internal/v1/token", URLOptions{}},
		"ftp":                   {"ftp://issuer.internal/", URLOptions{}},
		"relative":              {"/v1/token", URLOptions{}},
		"empty":                 {"", URLOptions{}},
		"bad IMDS base":         {"https://issuer.internal/", URLOptions{IMDSBase: "169.254.169.254"}},
		"missing CA":            {"https://issuer.internal/", URLOptions{CAFile: filepath.Join(dir, "none.pem")}},
		"CA not PEM":            {"https://issuer.internal/", URLOptions{CAFile: notPEM}},
		"CA with client":        {"https://issuer.internal/", URLOptions{CAFile: notPEM, HTTPClient: http.DefaultClient}},
		"negative timeout":      {"https://issuer.internal/", URLOptions{Timeout: -time.Second}},
	}
	for name, tc := range cases {
		if _, err := NewURL(tc.url, tc.opts, nil, nil); err == nil {
			t.Errorf("%s: NewURL succeeded", name)
		}
	}
	for _, ok := range []string{"https://issuer.internal/v1/token", "http://127.0.0.1:1/", "http://[::1]:1/", "http://localhost:8080/t"} {
		if _, err := NewURL(ok, URLOptions{}, nil, nil); err != nil {
			t.Errorf("NewURL(%s): %v", ok, err)
		}
	}
	u, err := NewURL("https://user:pw@issuer.internal/v1/token?key=secret#f", URLOptions{}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if p := u.Path(); strings.Contains(p, "pw") || strings.Contains(p, "secret") {
		t.Fatalf("Path() = %s", p)
	}
}

func newObserver() (*zap.Logger, *observer.ObservedLogs) {
	core, logs := observer.New(zap.DebugLevel)
	return zap.New(core), logs
}
