package rolesanywhere_test

import (
	"bytes"
	"context"
	"crypto"
	"crypto/x509"
	"encoding/base64"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/imdsproxy/imdsproxy/creds"
	"github.com/imdsproxy/imdsproxy/exchange"
	"github.com/imdsproxy/imdsproxy/test/fakes/rolesanywhere"
)

const (
	trustAnchor = "arn:aws:rolesanywhere:us-east-1:222222222222:trust-anchor/0b8c3f1e-1111-2222-3333-444455556666"
	profile     = "arn:aws:rolesanywhere:us-east-1:222222222222:profile/7c9a1b2c-1111-2222-3333-444455556666"
	role        = "arn:aws:iam::222222222222:role/app"
)

var (
	caOnce sync.Once
	ca     *rolesanywhere.CA
)

func testCA(t testing.TB) *rolesanywhere.CA {
	t.Helper()
	caOnce.Do(func() {
		var err error
		if ca, err = rolesanywhere.NewCA(); err != nil {
			panic(err)
		}
	})
	return ca
}

type cryptoSigner = crypto.Signer

// leafSource adapts a Leaf to exchange.X509Source.
type leafSource struct{ l *rolesanywhere.Leaf }

func (s leafSource) X509(context.Context) (*x509.Certificate, []*x509.Certificate, crypto.Signer, error) {
	return s.l.Cert, s.l.Chain, s.l.Key, nil
}

func config(c *rolesanywhere.CA) rolesanywhere.Config {
	return rolesanywhere.Config{Roots: c.Pool(), TrustAnchorARN: trustAnchor, ProfileARN: profile, RoleARN: role}
}

func newClient(t *testing.T, endpoint string, l *rolesanywhere.Leaf, hc *http.Client) *exchange.RolesAnywhere {
	t.Helper()
	t.Setenv("AWS_ENDPOINT_URL_ROLESANYWHERE", endpoint)
	r, err := exchange.NewRolesAnywhere(context.Background(), exchange.RolesAnywhereConfig{
		TrustAnchorARN: trustAnchor, ProfileARN: profile, HTTPClient: hc, MaxAttempts: 1,
	}, leafSource{l}, nil)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// TestDaemonSignerAccepted: the daemon's requests verify, for every
// supported key type, with and without an intermediate.
func TestDaemonSignerAccepted(t *testing.T) {
	c := testCA(t)
	fake := rolesanywhere.Start(t, config(c))
	for _, tc := range []rolesanywhere.LeafOptions{
		{Key: rolesanywhere.RSA2048},
		{Key: rolesanywhere.RSA4096},
		{Key: rolesanywhere.ECP256},
		{Key: rolesanywhere.ECP384},
		{Key: rolesanywhere.RSA2048, Direct: true},
		{Key: rolesanywhere.ECP256, Direct: true},
	} {
		name := string(tc.Key)
		if tc.Direct {
			name += "-direct"
		}
		t.Run(name, func(t *testing.T) {
			l, err := c.Issue(tc)
			if err != nil {
				t.Fatal(err)
			}
			cr, err := newClient(t, fake.URL, l, nil).Fetch(context.Background(), creds.Role{Name: "app", ARN: role})
			if err != nil {
				t.Fatalf("Fetch: %v\ncalls: %+v", err, fake.CallLog())
			}
			is, ok := fake.Find(cr.AccessKeyID)
			if !ok || is.SecretAccessKey != cr.SecretAccessKey || is.SessionToken != cr.SessionToken {
				t.Fatalf("served credentials are not the issued ones")
			}
			if is.Serial != l.Cert.SerialNumber.String() || is.DurationSeconds != 3600 {
				t.Fatalf("issued %+v", is)
			}
			wantAlg := "AWS4-X509-RSA-SHA256"
			if strings.HasPrefix(string(tc.Key), "ec") {
				wantAlg = "AWS4-X509-ECDSA-SHA256"
			}
			if is.Algorithm != wantAlg {
				t.Fatalf("algorithm %s", is.Algorithm)
			}
		})
	}
	// Every issued credential is unique.
	seen := map[string]bool{}
	for _, is := range fake.Issued() {
		if seen[is.AccessKeyID] || seen[is.SecretAccessKey] {
			t.Fatal("credentials reused")
		}
		seen[is.AccessKeyID], seen[is.SecretAccessKey] = true, true
	}
}

// captured is one request as the daemon sent it.
type captured struct {
	method, url, host string
	header            http.Header
	body              []byte
}

type captureTransport struct {
	mu   sync.Mutex
	reqs []captured
}

func (c *captureTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	b, _ := io.ReadAll(r.Body)
	c.mu.Lock()
	c.reqs = append(c.reqs, captured{r.Method, r.URL.String(), r.Host, r.Header.Clone(), b})
	c.mu.Unlock()
	return &http.Response{StatusCode: 500, Body: io.NopCloser(strings.NewReader("{}")), Header: http.Header{}, Request: r}, nil
}

// capture signs one request with the daemon's signer and returns it.
func capture(t *testing.T, l *rolesanywhere.Leaf) captured {
	t.Helper()
	ct := &captureTransport{}
	_, _ = newClient(t, "https://rolesanywhere.us-east-1.amazonaws.com", l, &http.Client{Transport: ct}).Fetch(context.Background(), creds.Role{Name: "app", ARN: role})
	if len(ct.reqs) != 1 {
		t.Fatalf("%d requests captured", len(ct.reqs))
	}
	return ct.reqs[0]
}

// replay sends c (after mod) to the fake's handler and returns the status and error code.
func replay(t *testing.T, s *rolesanywhere.Server, c captured) (int, string) {
	t.Helper()
	r := httptest.NewRequest(c.method, c.url, bytes.NewReader(c.body))
	r.Host = c.host
	r.Header = c.header.Clone()
	w := httptest.NewRecorder()
	s.Handler().ServeHTTP(w, r)
	return w.Code, strings.SplitN(w.Header().Get("X-Amzn-ErrorType"), ":", 2)[0]
}

func flipHex(s string) string {
	b := []byte(s)
	if b[len(b)-1] == '0' {
		b[len(b)-1] = '1'
	} else {
		b[len(b)-1] = '0'
	}
	return string(b)
}

// TestTamperedRequestsRejected: one flipped bit anywhere that is signed or
// verified makes the fake refuse the request.
func TestTamperedRequestsRejected(t *testing.T) {
	c := testCA(t)
	fake := rolesanywhere.New(config(c))
	for _, kt := range []rolesanywhere.KeyType{rolesanywhere.RSA2048, rolesanywhere.ECP384} {
		l, err := c.Issue(rolesanywhere.LeafOptions{Key: kt})
		if err != nil {
			t.Fatal(err)
		}
		orig := capture(t, l)
		if st, code := replay(t, fake, orig); st != http.StatusCreated {
			t.Fatalf("%s: untouched request refused: %d %s\n%+v", kt, st, code, fake.CallLog())
		}
		for _, tc := range []struct {
			name   string
			mod    func(*captured)
			status int
			reason string // substring of the fake's reason ("" for any)
		}{
			{"unsigned header added", func(c *captured) { c.header.Set("User-Agent", "other"); c.header.Set("Accept-Encoding", "gzip") }, 201, ""},
			{"signature bit", func(c *captured) {
				a := c.header.Get("Authorization")
				c.header.Set("Authorization", flipHex(a))
			}, 403, "signature does not verify"},
			{"body bit", func(c *captured) { c.body = append([]byte(nil), c.body...); c.body[len(c.body)-2] ^= 1 }, 403, "signature does not verify"},
			{"date one second", func(c *captured) {
				d, _ := time.Parse("20060102T150405Z", c.header.Get("X-Amz-Date"))
				c.header.Set("X-Amz-Date", d.Add(time.Second).Format("20060102T150405Z"))
			}, 403, "signature does not verify"},
			{"query bit", func(c *captured) { c.url = strings.Replace(c.url, "role%2Fapp", "role%2Fapq", 1) }, 403, "signature does not verify"},
			{"query parameter reordered is fine", func(c *captured) {
				base, q, _ := strings.Cut(c.url, "?")
				parts := strings.Split(q, "&")
				c.url = base + "?" + parts[2] + "&" + parts[0] + "&" + parts[1]
			}, 201, ""},
			{"certificate bit", func(c *captured) {
				der, _ := base64.StdEncoding.DecodeString(c.header.Get("X-Amz-X509"))
				der[len(der)-10] ^= 1
				c.header.Set("X-Amz-X509", base64.StdEncoding.EncodeToString(der))
			}, 403, ""},
			{"chain removed", func(c *captured) { c.header.Del("X-Amz-X509-Chain") }, 403, "untrusted certificate"},
			{"host", func(c *captured) { c.host = "rolesanywhere.us-east-2.amazonaws.com" }, 403, "signature does not verify"},
			{"content-type", func(c *captured) { c.header.Set("Content-Type", "application/json; charset=utf-8") }, 403, "signature does not verify"},
			{"serial in credential", func(c *captured) {
				a := c.header.Get("Authorization")
				i := strings.Index(a, "Credential=") + len("Credential=")
				c.header.Set("Authorization", a[:i]+"1"+a[i:])
			}, 403, "credential serial"},
			{"region in scope", func(c *captured) {
				c.header.Set("Authorization", strings.Replace(c.header.Get("Authorization"), "/us-east-1/", "/us-east-2/", 1))
			}, 403, "region"},
			{"signed headers list", func(c *captured) {
				c.header.Set("Authorization", strings.Replace(c.header.Get("Authorization"), "content-type;", "", 1))
			}, 403, "lacks content-type"},
			{"no authorization", func(c *captured) { c.header.Del("Authorization") }, 403, "no Authorization"},
		} {
			t.Run(string(kt)+"/"+tc.name, func(t *testing.T) {
				m := orig
				m.header = orig.header.Clone()
				tc.mod(&m)
				st, code := replay(t, fake, m)
				calls := fake.CallLog()
				reason := calls[len(calls)-1].Reason
				if st != tc.status {
					t.Fatalf("status %d %s, want %d (reason: %s)", st, code, tc.status, reason)
				}
				if !strings.Contains(reason, tc.reason) {
					t.Fatalf("refused because %q, want %q", reason, tc.reason)
				}
				if st == 403 && code != "AccessDeniedException" {
					t.Fatalf("code %q", code)
				}
			})
		}
	}
}

func TestWrongCARejected(t *testing.T) {
	other, err := rolesanywhere.NewCA()
	if err != nil {
		t.Fatal(err)
	}
	fake := rolesanywhere.New(config(other))
	l, err := testCA(t).Issue(rolesanywhere.LeafOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if st, _ := replay(t, fake, capture(t, l)); st != 403 {
		t.Fatalf("status %d", st)
	}
	if r := fake.CallLog()[0].Reason; !strings.Contains(r, "untrusted certificate") {
		t.Fatalf("reason %q", r)
	}
}

func TestExpiredCertificateRejected(t *testing.T) {
	c := testCA(t)
	l, err := c.Issue(rolesanywhere.LeafOptions{Expired: true})
	if err != nil {
		t.Fatal(err)
	}
	fake := rolesanywhere.New(config(c))
	// The daemon's signer does not check validity (token.X509 does); the fake must.
	if st, _ := replay(t, fake, capture(t, l)); st != 403 {
		t.Fatalf("status %d", st)
	}
}

func TestClockSkew(t *testing.T) {
	c := testCA(t)
	l, err := c.Issue(rolesanywhere.LeafOptions{Key: rolesanywhere.ECP256})
	if err != nil {
		t.Fatal(err)
	}
	req := capture(t, l)
	for _, tc := range []struct {
		skew time.Duration
		ok   bool
	}{{4 * time.Minute, true}, {-4 * time.Minute, true}, {6 * time.Minute, false}, {-6 * time.Minute, false}} {
		cfg := config(c)
		cfg.Now = func() time.Time { return time.Now().Add(tc.skew) }
		st, _ := replay(t, rolesanywhere.New(cfg), req)
		if (st == 201) != tc.ok {
			t.Errorf("skew %s: status %d", tc.skew, st)
		}
	}
}

func TestARNsAndDurationChecked(t *testing.T) {
	c := testCA(t)
	l, err := c.Issue(rolesanywhere.LeafOptions{})
	if err != nil {
		t.Fatal(err)
	}
	fake := rolesanywhere.Start(t, config(c))
	for _, tc := range []struct {
		name string
		cfg  exchange.RolesAnywhereConfig
		role string
		code string
	}{
		{"other role", exchange.RolesAnywhereConfig{}, "arn:aws:iam::222222222222:role/other", "AccessDeniedException"},
		{"other profile", exchange.RolesAnywhereConfig{ProfileARN: strings.Replace(profile, "7c9a", "7c9b", 1)}, role, "AccessDeniedException"},
		{"other trust anchor", exchange.RolesAnywhereConfig{TrustAnchorARN: strings.Replace(trustAnchor, "0b8c", "0b8d", 1)}, role, "AccessDeniedException"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Setenv("AWS_ENDPOINT_URL_ROLESANYWHERE", fake.URL)
			cfg := tc.cfg
			if cfg.ProfileARN == "" {
				cfg.ProfileARN = profile
			}
			if cfg.TrustAnchorARN == "" {
				cfg.TrustAnchorARN = trustAnchor
			}
			cfg.MaxAttempts = 1
			r, err := exchange.NewRolesAnywhere(context.Background(), cfg, leafSource{l}, nil)
			if err != nil {
				t.Fatal(err)
			}
			_, err = r.Fetch(context.Background(), creds.Role{Name: "app", ARN: tc.role})
			if err == nil || !strings.Contains(err.Error(), tc.code) {
				t.Fatalf("error %v, want %s", err, tc.code)
			}
		})
	}
	// Durations outside 900..43200 and deprecated fields, sent by hand
	// (the daemon refuses to build such requests).
	orig := capture(t, l)
	for body, want := range map[string]int{
		`{"durationSeconds":899}`:                           400,
		`{"durationSeconds":43201}`:                         400,
		`{"durationSeconds":900}`:                           201,
		`{"durationSeconds":3600,"sessionName":"x"}`:        400,
		`{"durationSeconds":3600,"roleSessionName":"host"}`: 201,
		`not json`: 400,
	} {
		m := resign(t, orig, l, []byte(body))
		if st, _ := replay(t, rolesanywhere.New(config(c)), m); st != want {
			t.Errorf("body %s: status %d, want %d", body, st, want)
		}
	}
}

// resign re-signs orig with another body using the fake's reference signer.
func resign(t *testing.T, orig captured, l *rolesanywhere.Leaf, body []byte) captured {
	t.Helper()
	r := httptest.NewRequest(orig.method, orig.url, bytes.NewReader(body))
	r.Host = orig.host
	r.Header = http.Header{"Content-Type": {"application/json"}}
	if err := rolesanywhere.SignRequest(r, body, "us-east-1", time.Now(), l.Cert, l.Chain, l.Key); err != nil {
		t.Fatal(err)
	}
	return captured{orig.method, orig.url, orig.host, r.Header, body}
}

func TestModesAndRecording(t *testing.T) {
	c := testCA(t)
	fake := rolesanywhere.Start(t, config(c))
	l, err := c.Issue(rolesanywhere.LeafOptions{})
	if err != nil {
		t.Fatal(err)
	}
	r := newClient(t, fake.URL, l, nil)
	for mode, want := range map[rolesanywhere.Mode]struct {
		status int
		code   string
	}{
		rolesanywhere.ModeAccessDenied: {403, "AccessDeniedException"},
		rolesanywhere.ModeValidation:   {400, "ValidationException"},
		rolesanywhere.ModeNotFound:     {404, "ResourceNotFoundException"},
		rolesanywhere.ModeThrottle:     {429, "ThrottlingException"},
		rolesanywhere.ModeFail5xx:      {500, "InternalServerException"},
	} {
		fake.SetMode(mode)
		_, err := r.Fetch(context.Background(), creds.Role{Name: "app", ARN: role})
		calls := fake.CallLog()
		last := calls[len(calls)-1]
		if err == nil || last.Status != want.status || last.Code != want.code {
			t.Errorf("mode %s: err %v, call %+v", mode, err, last)
		}
		if m, err := rolesanywhere.ParseMode(mode.String()); err != nil || m != mode {
			t.Errorf("ParseMode(%s) = %v, %v", mode, m, err)
		}
	}
	fake.SetMode(rolesanywhere.ModeOK)
	fake.SetSessionLength(20 * time.Second)
	cr, err := r.Fetch(context.Background(), creds.Role{Name: "app", ARN: role})
	if err != nil {
		t.Fatal(err)
	}
	if d := time.Until(cr.Expires); d > 21*time.Second || d < 15*time.Second {
		t.Fatalf("session length %s, want 20s", d)
	}
	if _, ok := fake.Last(); !ok || len(fake.Issued()) != 1 || fake.Calls() != 6 {
		t.Fatalf("issued %d, calls %d", len(fake.Issued()), fake.Calls())
	}
	fake.Reset()
	if fake.Calls() != 0 || len(fake.Issued()) != 0 {
		t.Fatal("Reset kept state")
	}
}

func TestCAFiles(t *testing.T) {
	c := testCA(t)
	for _, tc := range []rolesanywhere.LeafOptions{
		{Key: rolesanywhere.RSA2048, Format: rolesanywhere.PKCS1},
		{Key: rolesanywhere.ECP384, Format: rolesanywhere.SEC1},
		{Key: rolesanywhere.Ed25519},
		{NotYetValid: true},
	} {
		l, err := c.Issue(tc)
		if err != nil {
			t.Fatal(err)
		}
		dir := t.TempDir()
		cp, kp, chp, err := l.WriteFiles(dir)
		if err != nil {
			t.Fatal(err)
		}
		st, err := os.Stat(kp)
		if err != nil || st.Mode().Perm() != 0o600 {
			t.Fatalf("key mode %v %v", st.Mode(), err)
		}
		for _, p := range []string{cp, chp} {
			if _, err := os.Stat(p); err != nil {
				t.Fatal(err)
			}
		}
		if tc.NotYetValid && !l.Cert.NotBefore.After(time.Now()) {
			t.Fatal("NotYetValid leaf is valid")
		}
		if _, err := l.Cert.Verify(x509.VerifyOptions{Roots: c.Pool(), Intermediates: pool(l.Chain),
			CurrentTime: l.Cert.NotBefore.Add(time.Minute), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
			t.Fatalf("leaf does not chain to the root: %v", err)
		}
	}
	if _, err := rolesanywhere.EncodeKey(mustKey(t, rolesanywhere.ECP256), rolesanywhere.PKCS1); err == nil {
		t.Fatal("PKCS#1 of an EC key")
	}
}

func pool(certs []*x509.Certificate) *x509.CertPool {
	p := x509.NewCertPool()
	for _, c := range certs {
		p.AddCert(c)
	}
	return p
}

func mustKey(t *testing.T, kt rolesanywhere.KeyType) cryptoSigner {
	t.Helper()
	k, err := rolesanywhere.GenerateKey(kt)
	if err != nil {
		t.Fatal(err)
	}
	return k
}
