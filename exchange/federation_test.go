package exchange

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/imdsproxy/imdsproxy/creds"
	"github.com/imdsproxy/imdsproxy/test/fakes/federation"
	"github.com/imdsproxy/imdsproxy/test/fakes/oidc"
)

type fedEnv struct {
	iss  *oidc.Issuer
	srv  *federation.Server
	ca   string
	jwt  string
	logs *observer.ObservedLogs
	log  *zap.Logger
}

func newFedEnv(t *testing.T, cfg federation.Config) *fedEnv {
	t.Helper()
	iss, err := oidc.New(oidc.Options{URL: "https://issuer.internal"})
	if err != nil {
		t.Fatal(err)
	}
	cfg.Issuer = iss
	srv := federation.Start(t, cfg)
	core, logs := observer.New(zap.DebugLevel)
	return &fedEnv{
		iss: iss, srv: srv, ca: srv.WriteCAFile(t, t.TempDir(), "ca.pem"),
		jwt: iss.Mint(oidc.Claims{Subject: "host-1"}), logs: logs, log: zap.New(core),
	}
}

func (e *fedEnv) federation(t *testing.T, cfg FederationConfig) *Federation {
	t.Helper()
	if cfg.URL == "" {
		cfg.URL = e.srv.URL
	}
	if cfg.CAFile == "" && cfg.HTTPClient == nil {
		cfg.CAFile = e.ca
	}
	f, err := NewFederation(cfg, &tokenSource{tokens: []string{e.jwt}}, e.log)
	if err != nil {
		t.Fatal(err)
	}
	return f
}

// assertNoSecrets checks that text holds neither the JWT nor any issued secret.
func (e *fedEnv) assertNoSecrets(t *testing.T, where, text string) {
	t.Helper()
	secrets := []string{e.jwt, e.jwt[strings.LastIndexByte(e.jwt, '.')+1:]}
	for _, is := range e.srv.Issued() {
		secrets = append(secrets, is.SecretAccessKey, is.SessionToken)
	}
	for _, s := range secrets {
		if strings.Contains(text, s) {
			t.Fatalf("%s contains a secret", where)
		}
	}
}

func (e *fedEnv) logText() string {
	var b strings.Builder
	for _, l := range e.logs.All() {
		fmt.Fprintf(&b, "%s %v\n", l.Message, l.ContextMap())
	}
	return b.String()
}

func TestFederationSuccess(t *testing.T) {
	e := newFedEnv(t, federation.Config{Audience: oidc.DefaultAudience, RoleARN: "arn:aws:iam::333333333333:role/web"})
	f := e.federation(t, FederationConfig{})
	c, err := f.Fetch(context.Background(), creds.Role{Name: "web", ARN: "arn:aws:iam::333333333333:role/web", SessionName: "host-1"})
	if err != nil {
		t.Fatal(err)
	}
	is, ok := e.srv.Last()
	if !ok {
		t.Fatal("nothing issued")
	}
	if c.AccessKeyID != is.AccessKeyID || c.SecretAccessKey != is.SecretAccessKey || c.SessionToken != is.SessionToken ||
		!c.Expires.Equal(is.Expiration) {
		t.Fatalf("got %v, issued %s exp %s", c, is.AccessKeyID, is.Expiration)
	}
	if c.Source != SourceFederation || c.AccountID != "333333333333" || c.RoleARN != "arn:aws:iam::333333333333:role/web" {
		t.Fatalf("source/account/role = %q %q %q", c.Source, c.AccountID, c.RoleARN)
	}
	if !c.ValidAt(time.Now()) || c.LastUpdated.IsZero() {
		t.Fatalf("not valid: %v", c)
	}
	if is.BearerToken != e.jwt || is.Subject != "host-1" {
		t.Fatalf("fake saw token/sub %q", is.Subject)
	}
	e.assertNoSecrets(t, "log", e.logText())
	if f.URL() != e.srv.URL {
		t.Fatalf("URL() = %s", f.URL())
	}
}

func TestFederationAccountFromRoleArn(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprintf(w, `{"AccessKeyId":"ASIAX","SecretAccessKey":"s","Token":"t","Expiration":%q,"RoleArn":"arn:aws:sts::444444444444:assumed-role/app/s"}`,
			time.Now().Add(time.Hour).UTC().Format(time.RFC3339Nano))
	}))
	t.Cleanup(srv.Close)
	f, err := NewFederation(FederationConfig{URL: srv.URL}, &tokenSource{tokens: []string{"jwt"}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	c, err := f.Fetch(context.Background(), creds.Role{Name: "app", ARN: "arn:aws:iam::444444444444:role/app"})
	if err != nil {
		t.Fatal(err)
	}
	if c.AccountID != "444444444444" {
		t.Fatalf("AccountID = %q", c.AccountID)
	}
}

func TestFederationErrorClasses(t *testing.T) {
	type answer struct {
		status int
		ctype  string
		body   string
	}
	cases := []struct {
		name      string
		a         answer
		class     string
		permanent bool
		want      string
	}{
		{"401", answer{401, "application/json", `{"code":"InvalidToken","message":"bad signature"}`}, ClassAccessDenied, true, "access_denied InvalidToken (HTTP 401): bad signature"},
		{"403", answer{403, "application/json", `{"code":"AccessDenied","message":"no role for host"}`}, ClassAccessDenied, true, "AccessDenied (HTTP 403): no role for host"},
		{"400", answer{400, "text/plain", "bad request"}, ClassValidation, true, "validation (HTTP 400): bad request"},
		{"404", answer{404, "", ""}, ClassValidation, true, "(HTTP 404)"},
		{"408", answer{408, "", ""}, ClassTimeout, false, "timeout (HTTP 408)"},
		{"409", answer{409, "", ""}, ClassValidation, true, "(HTTP 409)"},
		{"429", answer{429, "application/json", `{"code":"Throttling","message":"slow down"}`}, ClassThrottling, false, "throttling Throttling (HTTP 429): slow down"},
		{"500", answer{500, "application/json", `{"code":"InternalError","message":"backend"}`}, ClassServer, false, "server InternalError (HTTP 500): backend"},
		{"503 html", answer{503, "text/html", "<html><body>" + strings.Repeat("x", 4000)}, ClassServer, false, "(HTTP 503): answered an HTML page"},
		{"302", answer{302, "", ""}, ClassInvalidResponse, false, "invalid_response (HTTP 302)"},
		{"200 html", answer{200, "text/html", "<html>login</html>"}, ClassInvalidResponse, false, "answered text/html"},
		{"200 garbage", answer{200, "application/json", "{"}, ClassInvalidResponse, false, "not a JSON credentials document"},
		{"200 missing secret", answer{200, "application/json", `{"AccessKeyId":"A","Token":"t","Expiration":"2099-01-01T00:00:00Z"}`}, ClassInvalidResponse, false, "lacks SecretAccessKey"},
		{"200 missing token", answer{200, "application/json", `{"AccessKeyId":"A","SecretAccessKey":"s","Expiration":"2099-01-01T00:00:00Z"}`}, ClassInvalidResponse, false, "lacks Token"},
		{"200 missing expiration", answer{200, "application/json", `{"AccessKeyId":"A","SecretAccessKey":"s","Token":"t"}`}, ClassInvalidResponse, false, "lacks Expiration"},
		{"200 bad expiration", answer{200, "application/json", `{"AccessKeyId":"A","SecretAccessKey":"s","Token":"t","Expiration":"tomorrow"}`}, ClassInvalidResponse, false, "RFC 3339"},
		{"200 expired", answer{200, "application/json", `{"AccessKeyId":"A","SecretAccessKey":"s","Token":"t","Expiration":"2001-01-01T00:00:00Z"}`}, ClassInvalidResponse, false, "expired at 2001"},
		{"200 wrong types", answer{200, "application/json", `{"AccessKeyId":1,"SecretAccessKey":"s","Token":"t","Expiration":"2099-01-01T00:00:00Z"}`}, ClassInvalidResponse, false, "not a JSON credentials document"},
		{"echoes the token", answer{401, "application/json", `{"code":"InvalidToken","message":"token TOKEN is bad"}`}, ClassAccessDenied, true, "token <redacted> is bad"},
		{"long message", answer{500, "application/json", `{"code":"X","message":"` + strings.Repeat("m", 1000) + `"}`}, ClassServer, false, "mmm…"},
	}
	const jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJob3N0LTEifQ.c2VjcmV0LXNpZ25hdHVyZQ"
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if tc.a.ctype != "" {
					w.Header().Set("Content-Type", tc.a.ctype)
				}
				w.WriteHeader(tc.a.status)
				_, _ = io.WriteString(w, strings.ReplaceAll(tc.a.body, "TOKEN", jwt))
			}))
			t.Cleanup(srv.Close)
			core, logs := observer.New(zap.DebugLevel)
			f, err := NewFederation(FederationConfig{URL: srv.URL + "/v1/credentials"}, &tokenSource{tokens: []string{jwt}}, zap.New(core))
			if err != nil {
				t.Fatal(err)
			}
			c, err := f.Fetch(context.Background(), testRole)
			var e *Error
			if !c.IsZero() || !errors.As(err, &e) {
				t.Fatalf("Fetch = %v, %v", c, err)
			}
			if e.Class != tc.class || e.Permanent() != tc.permanent || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %q (class %s permanent %v); want class %s permanent %v containing %q",
					err, e.Class, e.Permanent(), tc.class, tc.permanent, tc.want)
			}
			if len(e.Message) > maxMessage {
				t.Fatalf("message of %d bytes", len(e.Message))
			}
			for _, l := range logs.All() {
				if strings.Contains(fmt.Sprint(l.ContextMap()), "c2VjcmV0LXNpZ25hdHVyZQ") {
					t.Fatal("token logged")
				}
			}
			if strings.Contains(err.Error(), "c2VjcmV0LXNpZ25hdHVyZQ") {
				t.Fatal("token in the error")
			}
		})
	}
}

func TestFederationFakeModes(t *testing.T) {
	e := newFedEnv(t, federation.Config{})
	// A short timeout for the endpoint that hangs; the others answer, and
	// on a loaded machine a TLS handshake with a client certificate can take
	// longer than that.
	f := e.federation(t, FederationConfig{Timeout: 10 * time.Second})
	short := e.federation(t, FederationConfig{Timeout: 300 * time.Millisecond})
	for _, tc := range []struct {
		mode  federation.Mode
		class string
	}{
		{federation.ModeFail5xx, ClassServer},
		{federation.ModeDenied, ClassAccessDenied},
		{federation.ModeThrottle, ClassThrottling},
		{federation.ModeHTML, ClassInvalidResponse},
		{federation.ModeHang, ClassTimeout},
	} {
		e.srv.SetMode(tc.mode)
		fetcher := f
		if tc.mode == federation.ModeHang {
			fetcher = short
		}
		_, err := fetcher.Fetch(context.Background(), testRole)
		var xe *Error
		if !errors.As(err, &xe) || xe.Class != tc.class {
			t.Errorf("mode %d: err = %v, want class %s", tc.mode, err, tc.class)
		}
	}
	e.srv.SetMode(federation.ModeOK)
	e.srv.SetSessionLength(20 * time.Second)
	c, err := f.Fetch(context.Background(), testRole)
	if err != nil {
		t.Fatal(err)
	}
	if r := c.Remaining(time.Now()); r > 21*time.Second || r < 15*time.Second {
		t.Fatalf("short session remaining %v", r)
	}
	e.assertNoSecrets(t, "log", e.logText())
}

func TestFederationBadToken(t *testing.T) {
	e := newFedEnv(t, federation.Config{})
	other, err := oidc.New(oidc.Options{URL: "https://issuer.internal"})
	if err != nil {
		t.Fatal(err)
	}
	e.jwt = other.Mint(oidc.Claims{}) // signed by a key the service does not trust
	f := e.federation(t, FederationConfig{})
	_, err = f.Fetch(context.Background(), testRole)
	var xe *Error
	if !errors.As(err, &xe) || xe.Class != ClassAccessDenied || xe.HTTPStatus != 401 || !xe.Permanent() {
		t.Fatalf("err = %v", err)
	}
	e.assertNoSecrets(t, "error", err.Error())
}

func TestFederationTokenSourceError(t *testing.T) {
	f, err := NewFederation(FederationConfig{URL: "http://127.0.0.1:1/"}, &tokenSource{err: &classedErr{permanent: true}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	_, err = f.Fetch(context.Background(), testRole)
	var classed interface {
		ErrorClass() string
		Permanent() bool
	}
	if !errors.As(err, &classed) || classed.ErrorClass() != "identity" || !classed.Permanent() {
		t.Fatalf("err = %v", err)
	}
	f, _ = NewFederation(FederationConfig{URL: "http://127.0.0.1:1/"}, &tokenSource{err: errors.New("plain")}, nil)
	_, err = f.Fetch(context.Background(), testRole)
	var xe *Error
	if !errors.As(err, &xe) || xe.Class != ClassIdentity {
		t.Fatalf("err = %v", err)
	}
	f, _ = NewFederation(FederationConfig{URL: "http://127.0.0.1:1/"}, &tokenSource{tokens: []string{""}}, nil)
	if _, err = f.Fetch(context.Background(), testRole); !errors.As(err, &xe) || xe.Class != ClassIdentity {
		t.Fatalf("err = %v", err)
	}
}

func TestFederationConnectionRefused(t *testing.T) {
	f, err := NewFederation(FederationConfig{URL: "http://127.0.0.1:1/v1/credentials?secret=q"}, &tokenSource{tokens: []string{"jwt"}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	_, err = f.Fetch(context.Background(), testRole)
	var xe *Error
	if !errors.As(err, &xe) || xe.Class != ClassNetwork || xe.Permanent() {
		t.Fatalf("err = %v", err)
	}
	if strings.Contains(err.Error(), "secret=q") {
		t.Fatalf("query in the error: %v", err)
	}
}

func TestFederationTLS(t *testing.T) {
	ca, err := federation.NewClientCA()
	if err != nil {
		t.Fatal(err)
	}
	e := newFedEnv(t, federation.Config{ClientCAs: ca.Pool()})
	cert, err := ca.Issue("i-1234567890abcdef0")
	if err != nil {
		t.Fatal(err)
	}

	t.Run("unknown CA", func(t *testing.T) {
		f, err := NewFederation(FederationConfig{URL: e.srv.URL}, &tokenSource{tokens: []string{e.jwt}}, nil)
		if err != nil {
			t.Fatal(err)
		}
		_, err = f.Fetch(context.Background(), testRole)
		var xe *Error
		if !errors.As(err, &xe) || xe.Class != ClassNetwork || !strings.Contains(err.Error(), "certificate") {
			t.Fatalf("err = %v", err)
		}
	})
	t.Run("mTLS required, none given", func(t *testing.T) {
		f := e.federation(t, FederationConfig{})
		if _, err := f.Fetch(context.Background(), testRole); err == nil {
			t.Fatal("Fetch without a client certificate succeeded")
		} else {
			t.Logf("without a client certificate: %v", err)
		}
	})
	t.Run("mTLS provider fails", func(t *testing.T) {
		f := e.federation(t, FederationConfig{ClientCertificate: func(context.Context) (*tls.Certificate, error) {
			return nil, errors.New("key unreadable")
		}})
		if _, err := f.Fetch(context.Background(), testRole); err == nil || !strings.Contains(err.Error(), "key unreadable") {
			t.Fatalf("err = %v", err)
		}
	})
	t.Run("mTLS provided", func(t *testing.T) {
		var calls int
		var mu sync.Mutex
		f := e.federation(t, FederationConfig{ClientCertificate: func(context.Context) (*tls.Certificate, error) {
			mu.Lock()
			calls++
			mu.Unlock()
			return cert, nil
		}})
		c, err := f.Fetch(context.Background(), testRole)
		if err != nil {
			t.Fatal(err)
		}
		is, _ := e.srv.Last()
		if c.AccessKeyID != is.AccessKeyID || is.ClientCertSubject != "CN=i-1234567890abcdef0" || calls == 0 {
			t.Fatalf("issued to %q, calls %d", is.ClientCertSubject, calls)
		}
	})
}

func TestNewFederationValidation(t *testing.T) {
	dir := t.TempDir()
	bad := filepath.Join(dir, "bad.pem")
	if err := os.WriteFile(bad, []byte("nope"), 0o600); err != nil {
		t.Fatal(err)
	}
	ts := &tokenSource{tokens: []string{"x"}}
	cert := func(context.Context) (*tls.Certificate, error) { return nil, nil }
	for name, tc := range map[string]struct {
		cfg    FederationConfig
		tokens TokenSource
	}{
		"http to a remote host": {FederationConfig{URL: "http://creds.internal/v1/credentials"}, ts},
		"http to 10/8":          {FederationConfig{URL: "http://10.0.0.1/v1/credentials"}, ts},
		"no scheme":             {FederationConfig{URL: "creds.internal/v1"}, ts},
		"empty":                 {FederationConfig{}, ts},
		"file":                  {FederationConfig{URL: "file:///etc/passwd"}, ts},
		"nil tokens":            {FederationConfig{URL: "https://creds.internal/"}, nil},
		"missing CA":            {FederationConfig{URL: "https://creds.internal/", CAFile: filepath.Join(dir, "none")}, ts},
		"CA not PEM":            {FederationConfig{URL: "https://creds.internal/", CAFile: bad}, ts},
		"client and CA":         {FederationConfig{URL: "https://creds.internal/", CAFile: bad, HTTPClient: http.DefaultClient}, ts},
		"client and cert":       {FederationConfig{URL: "https://creds.internal/", ClientCertificate: cert, HTTPClient: http.DefaultClient}, ts},
		"negative timeout":      {FederationConfig{URL: "https://creds.internal/", Timeout: -1}, ts},
	} {
		if _, err := NewFederation(tc.cfg, tc.tokens, nil); err == nil {
			t.Errorf("%s: NewFederation succeeded", name)
		}
	}
	for _, ok := range []string{"https://creds.internal/v1/credentials", "http://127.0.0.1:8080/c", "http://[::1]/c", "http://localhost/c"} {
		if _, err := NewFederation(FederationConfig{URL: ok}, ts, nil); err != nil {
			t.Errorf("NewFederation(%s): %v", ok, err)
		}
	}
}

// FuzzFederationResponse serves arbitrary statuses, content types and bodies
// from a loopback endpoint: Fetch never panics, returns Complete valid
// credentials or an *Error (never both, never neither) and never puts the
// token in an error.
func FuzzFederationResponse(f *testing.F) {
	exp := time.Now().Add(24 * time.Hour).UTC().Format(time.RFC3339)
	good := `{"AccessKeyId":"ASIAX","SecretAccessKey":"s","Token":"t","Expiration":"` + exp + `","AccountId":"123456789012"}`
	f.Add(200, "application/json", good)
	f.Add(200, "application/json", strings.Replace(good, `"Token":"t",`, "", 1))
	f.Add(200, "application/json", `{"AccessKeyId":"A","SecretAccessKey":"s","Token":"t","Expiration":"0001-01-01T00:00:00Z"}`)
	f.Add(200, "text/html", "<html>")
	f.Add(200, "", "")
	f.Add(200, "application/json", "null")
	f.Add(401, "application/json", `{"code":"X","message":"FUZZTOKEN"}`)
	f.Add(403, "application/json", `{"code":5,"message":[1]}`)
	f.Add(429, "", "")
	f.Add(500, "text/plain", "\x00\xff")
	f.Add(302, "", "")

	const token = "FUZZTOKEN.eyJzdWIiOiJ4In0.c2ln"
	var mu sync.Mutex
	var status int
	var ctype, body string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if ctype != "" {
			w.Header().Set("Content-Type", ctype)
		}
		w.WriteHeader(status)
		_, _ = io.WriteString(w, body)
	}))
	f.Cleanup(srv.Close)
	fed, err := NewFederation(FederationConfig{URL: srv.URL, Timeout: 5 * time.Second}, &tokenSource{tokens: []string{token}}, nil)
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, st int, ct, b string) {
		if st < 200 || st > 599 {
			st = 200 + (st%400+400)%400
		}
		if strings.ContainsAny(ct, "\r\n\x00") {
			ct = ""
		}
		mu.Lock()
		defer mu.Unlock()
		status, ctype, body = st, ct, b
		c, err := fed.Fetch(context.Background(), testRole)
		switch {
		case err == nil && !c.ValidAt(time.Now()):
			t.Fatalf("no error but credentials not Complete/valid: %v", c)
		case err != nil && !c.IsZero():
			t.Fatalf("error %v with credentials %v", err, c)
		case err != nil:
			var xe *Error
			if !errors.As(err, &xe) {
				t.Fatalf("error is not *Error: %T %v", err, err)
			}
			if strings.Contains(err.Error(), token) {
				t.Fatal("token in the error")
			}
		}
	})
}

// TestFederationChecksRole: the endpoint decides the role from the token, so
// Fetch refuses an answer whose RoleArn names another role or account than
// the role it was handed (permanent validation: configuration and endpoint
// disagree). The assumed-role ARN of the same role, a role ARN with a path,
// an answer without RoleArn, and a Fetch for a role without ARN are fine.
func TestFederationChecksRole(t *testing.T) {
	var mu sync.Mutex
	var answerARN string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		roleARN := answerARN
		mu.Unlock()
		doc := map[string]string{"AccessKeyId": "ASIAFEDERATIONKEY001", "SecretAccessKey": testSecretKey, "Token": testSessionToken,
			"Expiration": time.Now().Add(time.Hour).UTC().Format(time.RFC3339)}
		if roleARN != "" {
			doc["RoleArn"] = roleARN
		}
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(doc)
	}))
	t.Cleanup(srv.Close)
	f, err := NewFederation(FederationConfig{URL: srv.URL}, &tokenSource{tokens: []string{testJWT}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name    string
		answer  string // RoleArn of the answer, "" for none
		role    creds.Role
		refused bool
	}{
		{"same role", testRoleARN, testRole, false},
		{"assumed-role of the role", testAssumedARN, testRole, false},
		{"assumed-role, other session", "arn:aws:sts::222222222222:assumed-role/app/other-host", testRole, false},
		{"role with a path", "arn:aws:iam::222222222222:role/team/app", testRole, false},
		{"no RoleArn in the answer", "", testRole, false},
		{"role without ARN", "arn:aws:iam::999999999999:role/admin", creds.Role{Name: "app"}, false},
		{"other role name", "arn:aws:iam::222222222222:role/admin", testRole, true},
		{"other account", "arn:aws:iam::999999999999:role/app", testRole, true},
		{"assumed-role of another role", "arn:aws:sts::222222222222:assumed-role/admin/app", testRole, true},
		{"assumed-role in another account", "arn:aws:sts::999999999999:assumed-role/app/i-0123456789abcdef0", testRole, true},
		{"name with the role as prefix", "arn:aws:iam::222222222222:role/app-admin", testRole, true},
		{"a user, not a role", "arn:aws:iam::222222222222:user/app", testRole, true},
		{"not an ARN", "app", testRole, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mu.Lock()
			answerARN = tc.answer
			mu.Unlock()
			c, err := f.Fetch(context.Background(), tc.role)
			if !tc.refused {
				if err != nil || !c.Complete() || c.RoleARN != tc.answer {
					t.Fatalf("Fetch = %v (role %q), %v; want the answer's credentials", c, c.RoleARN, err)
				}
				return
			}
			var e *Error
			if !errors.As(err, &e) || !c.IsZero() {
				t.Fatalf("Fetch = %v, %v; want a refusal", c, err)
			}
			if e.Class != ClassValidation || !e.Permanent() || e.HTTPStatus != http.StatusOK ||
				!strings.Contains(e.Message, tc.role.ARN) {
				t.Fatalf("class %s permanent %v status %d: %v; want permanent validation naming %s",
					e.Class, e.Permanent(), e.HTTPStatus, err, tc.role.ARN)
			}
			if class, permanent := creds.Classify(err); class != ClassValidation || !permanent {
				t.Fatalf("creds.Classify = %s %v", class, permanent)
			}
			for _, secret := range []string{testSecretKey, testSessionToken, testJWT} {
				if strings.Contains(err.Error(), secret) {
					t.Fatalf("secret in the error: %v", err)
				}
			}
		})
	}
}
