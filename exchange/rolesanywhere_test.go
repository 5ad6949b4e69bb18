package exchange

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"errors"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/imdsproxy/imdsproxy/creds"
	"github.com/imdsproxy/imdsproxy/test/fakes/rolesanywhere"
)

// raRole is the role most Roles Anywhere tests fetch: no session name (Roles
// Anywhere names the session after the certificate serial) and the default
// duration.
var raRole = creds.Role{Name: "app", ARN: testRoleARN}

const (
	testTrustAnchor = "arn:aws:rolesanywhere:us-east-1:222222222222:trust-anchor/0b8c3f1e-1111-2222-3333-444455556666"
	testProfile     = "arn:aws:rolesanywhere:us-east-1:222222222222:profile/7c9a1b2c-1111-2222-3333-444455556666"
)

// staticX509 is an X509Source returning a fixed identity or error.
type staticX509 struct {
	leaf   *x509.Certificate
	chain  []*x509.Certificate
	signer crypto.Signer
	err    error
	calls  atomic.Int32
}

func (s *staticX509) X509(context.Context) (*x509.Certificate, []*x509.Certificate, crypto.Signer, error) {
	s.calls.Add(1)
	if s.err != nil {
		return nil, nil, nil, s.err
	}
	return s.leaf, s.chain, s.signer, nil
}

var (
	testCAOnce sync.Once
	testCA     *rolesanywhere.CA
	testCAErr  error
)

func sharedCA(t testing.TB) *rolesanywhere.CA {
	t.Helper()
	testCAOnce.Do(func() { testCA, testCAErr = rolesanywhere.NewCA() })
	if testCAErr != nil {
		t.Fatal(testCAErr)
	}
	return testCA
}

func issueLeaf(t testing.TB, o rolesanywhere.LeafOptions) *staticX509 {
	t.Helper()
	l, err := sharedCA(t).Issue(o)
	if err != nil {
		t.Fatal(err)
	}
	return &staticX509{leaf: l.Cert, chain: l.Chain, signer: l.Key}
}

func startFakeRA(t testing.TB) *rolesanywhere.Server {
	return rolesanywhere.Start(t, rolesanywhere.Config{
		Roots: sharedCA(t).Pool(), TrustAnchorARN: testTrustAnchor, ProfileARN: testProfile, RoleARN: testRoleARN,
	})
}

func newTestRolesAnywhere(t testing.TB, endpoint string, cfg RolesAnywhereConfig, src X509Source, log *zap.Logger) *RolesAnywhere {
	t.Helper()
	isolateAWSEnv(t)
	unsetenv(t, "AWS_ENDPOINT_URL_ROLESANYWHERE")
	t.Setenv("AWS_ENDPOINT_URL_ROLESANYWHERE", endpoint)
	if cfg.TrustAnchorARN == "" {
		cfg.TrustAnchorARN = testTrustAnchor
	}
	if cfg.ProfileARN == "" {
		cfg.ProfileARN = testProfile
	}
	r, err := NewRolesAnywhere(context.Background(), cfg, src, log)
	if err != nil {
		t.Fatal(err)
	}
	r.backoff = func(int) time.Duration { return time.Millisecond }
	return r
}

func TestRolesAnywhereFetch(t *testing.T) {
	fake := startFakeRA(t)
	for _, kt := range []rolesanywhere.KeyType{rolesanywhere.RSA2048, rolesanywhere.ECP256, rolesanywhere.ECP384} {
		t.Run(string(kt), func(t *testing.T) {
			src := issueLeaf(t, rolesanywhere.LeafOptions{Key: kt})
			r := newTestRolesAnywhere(t, fake.URL, RolesAnywhereConfig{}, src, nil)
			role := raRole
			role.Duration = 2 * time.Hour
			c, err := r.Fetch(context.Background(), role)
			if err != nil {
				t.Fatalf("Fetch: %v\ncalls: %+v", err, fake.CallLog())
			}
			is, ok := fake.Last()
			if !ok {
				t.Fatal("nothing issued")
			}
			if c.AccessKeyID != is.AccessKeyID || c.SecretAccessKey != is.SecretAccessKey || c.SessionToken != is.SessionToken ||
				!c.Expires.Equal(is.Expiration) {
				t.Fatalf("got %v, issued %s expiring %s", c, is.AccessKeyID, is.Expiration)
			}
			if c.Source != SourceRolesAnywhere || c.AccountID != "222222222222" || c.RoleARN != is.AssumedRoleARN ||
				!strings.HasPrefix(c.RoleARN, "arn:aws:sts::222222222222:assumed-role/app/") {
				t.Fatalf("identity fields: %v (source %q)", c, c.Source)
			}
			if is.DurationSeconds != 7200 || is.Serial != src.leaf.SerialNumber.String() || is.RoleARN != testRoleARN {
				t.Fatalf("request as the fake saw it: %+v", is)
			}
		})
	}
}

func TestRolesAnywhereSessionNameAndDefaults(t *testing.T) {
	var got struct {
		body  map[string]any
		query string
		path  string
		ct    string
	}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		_ = json.Unmarshal(b, &got.body)
		got.query, got.path, got.ct = r.URL.RawQuery, r.URL.Path, r.Header.Get("Content-Type")
		w.WriteHeader(http.StatusCreated)
		_, _ = io.WriteString(w, raSuccessJSON(time.Now().Add(time.Hour)))
	}))
	defer srv.Close()
	src := issueLeaf(t, rolesanywhere.LeafOptions{})

	r := newTestRolesAnywhere(t, srv.URL+"/prefix/", RolesAnywhereConfig{}, src, nil)
	if _, err := r.Fetch(context.Background(), raRole); err != nil {
		t.Fatal(err)
	}
	if len(got.body) != 1 || got.body["durationSeconds"] != float64(3600) {
		t.Fatalf("default body %v", got.body)
	}
	if got.path != "/prefix/sessions" || got.ct != "application/json" {
		t.Fatalf("path %q content-type %q", got.path, got.ct)
	}
	wantQuery := "profileArn=" + uriEncode(testProfile) + "&roleArn=" + uriEncode(testRoleARN) + "&trustAnchorArn=" + uriEncode(testTrustAnchor)
	if got.query != wantQuery {
		t.Fatalf("query %q\nwant  %q", got.query, wantQuery)
	}

	r = newTestRolesAnywhere(t, srv.URL, RolesAnywhereConfig{}, src, nil)
	if _, err := r.Fetch(context.Background(), creds.Role{Name: "app", ARN: testRoleARN, SessionName: "host 1", Duration: 900 * time.Second}); err != nil {
		t.Fatal(err)
	}
	if got.body["roleSessionName"] != "host-1" || got.body["durationSeconds"] != float64(900) {
		t.Fatalf("body %v", got.body)
	}
}

func raSuccessJSON(exp time.Time) string {
	return `{"credentialSet":[{"assumedRoleUser":{"arn":"arn:aws:sts::222222222222:assumed-role/app/abc","assumedRoleId":"AROAEXAMPLE:abc"},` +
		`"credentials":{"accessKeyId":"ASIAEXAMPLEEXAMPLE","expiration":"` + exp.UTC().Format(time.RFC3339) + `",` +
		`"secretAccessKey":"` + testSecretKey + `","sessionToken":"` + testSessionToken + `"},` +
		`"packedPolicySize":0,"roleArn":"arn:aws:iam::222222222222:role/app","sourceIdentity":"CN=host"}],` +
		`"subjectArn":"arn:aws:rolesanywhere:us-east-1:222222222222:subject/x"}`
}

func TestRolesAnywhereErrors(t *testing.T) {
	src := issueLeaf(t, rolesanywhere.LeafOptions{Key: rolesanywhere.ECP256})
	future := time.Now().Add(time.Hour)
	for _, tc := range []struct {
		name      string
		status    int
		header    map[string]string
		body      string
		class     string
		code      string
		permanent bool
		attempts  int32
	}{
		{"access denied header", 403, map[string]string{"X-Amzn-ErrorType": "AccessDeniedException:http://internal.amazon.com/coral/"}, `{"message":"Untrusted certificate. Insufficient certificate"}`, ClassAccessDenied, "AccessDeniedException", true, 1},
		{"validation body code", 400, nil, `{"code":"ValidationException","message":"bad duration"}`, ClassValidation, "ValidationException", true, 1},
		{"not found __type with namespace", 404, nil, `{"__type":"com.amazonaws.rolesanywhere#ResourceNotFoundException","message":"no profile"}`, ClassValidation, "ResourceNotFoundException", true, 1},
		{"throttling", 429, map[string]string{"X-Amzn-ErrorType": "ThrottlingException"}, `{"message":"Rate exceeded"}`, ClassThrottling, "ThrottlingException", false, 2},
		{"429 without code", 429, nil, ``, ClassThrottling, "", false, 2},
		{"500", 500, nil, `{"message":"internal"}`, ClassServer, "", false, 2},
		{"503 html", 503, nil, `<html>bad gateway</html>`, ClassServer, "", false, 2},
		{"403 unknown code", 403, nil, `{"message":"nope"}`, ClassAccessDenied, "", true, 1},
		{"400 html from a proxy", 400, nil, `<html>`, ClassInvalidResponse, "", false, 1},
		{"201 not json", 201, nil, `<html>`, ClassInvalidResponse, "", false, 1},
		{"201 empty set", 201, nil, `{"credentialSet":[]}`, ClassInvalidResponse, "", false, 1},
		{"201 no credentials", 201, nil, `{"credentialSet":[{}]}`, ClassInvalidResponse, "", false, 1},
		{"201 bad expiration", 201, nil, strings.Replace(raSuccessJSON(future), future.UTC().Format(time.RFC3339), "tomorrow", 1), ClassInvalidResponse, "", false, 1},
		{"201 expired", 201, nil, raSuccessJSON(time.Now().Add(-time.Minute)), ClassInvalidResponse, "", false, 1},
		{"201 no secret", 201, nil, strings.Replace(raSuccessJSON(future), `"secretAccessKey"`, `"x"`, 1), ClassInvalidResponse, "", false, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var calls atomic.Int32
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				calls.Add(1)
				for k, v := range tc.header {
					w.Header().Set(k, v)
				}
				w.Header().Set("X-Amzn-RequestId", "req-1")
				w.WriteHeader(tc.status)
				_, _ = io.WriteString(w, tc.body)
			}))
			defer srv.Close()
			r := newTestRolesAnywhere(t, srv.URL, RolesAnywhereConfig{}, src, nil)
			c, err := r.Fetch(context.Background(), raRole)
			if err == nil || !c.IsZero() {
				t.Fatalf("Fetch = %v, %v; want an error and no credentials", c, err)
			}
			var e *Error
			if !errors.As(err, &e) {
				t.Fatalf("error %T %v", err, err)
			}
			if e.Class != tc.class || e.Code != tc.code || e.Permanent() != tc.permanent || e.HTTPStatus != tc.status || e.Op != "CreateSession" {
				t.Fatalf("error %v: class %q code %q permanent %v status %d", e, e.Class, e.Code, e.Permanent(), e.HTTPStatus)
			}
			if calls.Load() != tc.attempts {
				t.Fatalf("%d attempts, want %d", calls.Load(), tc.attempts)
			}
			if strings.Contains(err.Error(), testSecretKey) || strings.Contains(err.Error(), testSessionToken) {
				t.Fatalf("secret in error: %v", err)
			}
		})
	}
}

func TestRolesAnywhereFakeModes(t *testing.T) {
	fake := startFakeRA(t)
	src := issueLeaf(t, rolesanywhere.LeafOptions{})
	r := newTestRolesAnywhere(t, fake.URL, RolesAnywhereConfig{}, src, nil)
	for _, tc := range []struct {
		mode      rolesanywhere.Mode
		class     string
		permanent bool
	}{
		{rolesanywhere.ModeAccessDenied, ClassAccessDenied, true},
		{rolesanywhere.ModeValidation, ClassValidation, true},
		{rolesanywhere.ModeNotFound, ClassValidation, true},
		{rolesanywhere.ModeThrottle, ClassThrottling, false},
		{rolesanywhere.ModeFail5xx, ClassServer, false},
		{rolesanywhere.ModeEmptySet, ClassInvalidResponse, false},
	} {
		t.Run(tc.mode.String(), func(t *testing.T) {
			fake.SetMode(tc.mode)
			_, err := r.Fetch(context.Background(), raRole)
			var e *Error
			if !errors.As(err, &e) || e.Class != tc.class || e.Permanent() != tc.permanent {
				t.Fatalf("error %v, want class %s permanent %v", err, tc.class, tc.permanent)
			}
		})
	}
}

func TestRolesAnywhereRetriesThenSucceeds(t *testing.T) {
	var calls atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if calls.Add(1) == 1 {
			w.WriteHeader(http.StatusServiceUnavailable)
			return
		}
		w.WriteHeader(http.StatusCreated)
		_, _ = io.WriteString(w, raSuccessJSON(time.Now().Add(time.Hour)))
	}))
	defer srv.Close()
	src := issueLeaf(t, rolesanywhere.LeafOptions{})
	r := newTestRolesAnywhere(t, srv.URL, RolesAnywhereConfig{}, src, nil)
	c, err := r.Fetch(context.Background(), raRole)
	if err != nil || !c.Complete() || calls.Load() != 2 || src.calls.Load() != 2 {
		t.Fatalf("Fetch = %v, %v after %d calls (%d identity reads)", c, err, calls.Load(), src.calls.Load())
	}
}

func TestRolesAnywhereTimeoutAndNetwork(t *testing.T) {
	src := issueLeaf(t, rolesanywhere.LeafOptions{})
	block := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-block:
		case <-r.Context().Done():
		}
	}))
	defer srv.Close()
	defer close(block)
	r := newTestRolesAnywhere(t, srv.URL, RolesAnywhereConfig{Timeout: 200 * time.Millisecond}, src, nil)
	_, err := r.Fetch(context.Background(), raRole)
	var e *Error
	if !errors.As(err, &e) || e.Class != ClassTimeout {
		t.Fatalf("error %v, want timeout", err)
	}

	dead := httptest.NewServer(http.NotFoundHandler())
	url := dead.URL
	dead.Close()
	r = newTestRolesAnywhere(t, url, RolesAnywhereConfig{}, src, nil)
	_, err = r.Fetch(context.Background(), raRole)
	if !errors.As(err, &e) || e.Class != ClassNetwork {
		t.Fatalf("error %v, want network", err)
	}
}

// classedIdentityErr mimics token.Error.
type classedIdentityErr struct{}

func (classedIdentityErr) Error() string {
	return "token: /etc/pki/key.pem: key_permissions: mode 0644"
}
func (classedIdentityErr) ErrorClass() string { return "identity" }
func (classedIdentityErr) Permanent() bool    { return true }

func TestRolesAnywhereIdentityError(t *testing.T) {
	var calls atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { calls.Add(1) }))
	defer srv.Close()
	r := newTestRolesAnywhere(t, srv.URL, RolesAnywhereConfig{}, &staticX509{err: classedIdentityErr{}}, nil)
	_, err := r.Fetch(context.Background(), raRole)
	var classed interface {
		ErrorClass() string
		Permanent() bool
	}
	if !errors.As(err, &classed) || classed.ErrorClass() != "identity" || !classed.Permanent() {
		t.Fatalf("error %v lost the identity class", err)
	}
	if e := Classify(err); e.Class != ClassIdentity || !e.Permanent() {
		t.Fatalf("Classify: %v", e)
	}

	r = newTestRolesAnywhere(t, srv.URL, RolesAnywhereConfig{}, &staticX509{err: errors.New("disk on fire")}, nil)
	_, err = r.Fetch(context.Background(), raRole)
	var e *Error
	if !errors.As(err, &e) || e.Class != ClassIdentity {
		t.Fatalf("error %v, want class identity", err)
	}
	if calls.Load() != 0 {
		t.Fatalf("%d requests sent without an identity", calls.Load())
	}
}

func TestNewRolesAnywhereValidation(t *testing.T) {
	isolateAWSEnv(t)
	src := &staticX509{}
	ok := RolesAnywhereConfig{TrustAnchorARN: testTrustAnchor, ProfileARN: testProfile}
	for _, tc := range []struct {
		name string
		mod  func(*RolesAnywhereConfig)
		want string
	}{
		{"profile in another region", func(c *RolesAnywhereConfig) {
			c.ProfileARN = strings.Replace(testProfile, "us-east-1", "eu-west-1", 1)
		}, "differs"},
		{"trust anchor not an ARN", func(c *RolesAnywhereConfig) { c.TrustAnchorARN = "0b8c3f1e" }, "trust_anchor_arn"},
		{"trust anchor is a profile", func(c *RolesAnywhereConfig) { c.TrustAnchorARN = testProfile }, "trust_anchor_arn"},
		{"profile is a trust anchor", func(c *RolesAnywhereConfig) { c.ProfileARN = testTrustAnchor }, "profile_arn"},
		{"no region", func(c *RolesAnywhereConfig) {
			c.TrustAnchorARN = "arn:aws:rolesanywhere::222222222222:trust-anchor/x"
		}, "trust_anchor_arn"},
		{"negative attempts", func(c *RolesAnywhereConfig) { c.MaxAttempts = -1 }, "negative"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := ok
			tc.mod(&cfg)
			_, err := NewRolesAnywhere(context.Background(), cfg, src, nil)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want it to mention %q", err, tc.want)
			}
		})
	}
	if _, err := NewRolesAnywhere(context.Background(), ok, nil, nil); err == nil {
		t.Fatal("nil source accepted")
	}
}

func TestRolesAnywhereEndpoint(t *testing.T) {
	src := &staticX509{}
	for _, tc := range []struct {
		name, specific, general, trustAnchor, want string
	}{
		{"default", "", "", testTrustAnchor, "https://rolesanywhere.us-east-1.amazonaws.com/sessions"},
		{"china", "", "", "arn:aws-cn:rolesanywhere:cn-north-1:222222222222:trust-anchor/x", "https://rolesanywhere.cn-north-1.amazonaws.com.cn/sessions"},
		{"general", "", "http://127.0.0.1:9/", testTrustAnchor, "http://127.0.0.1:9/sessions"},
		{"specific wins", "http://127.0.0.1:8/p", "http://127.0.0.1:9", testTrustAnchor, "http://127.0.0.1:8/p/sessions"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			isolateAWSEnv(t)
			unsetenv(t, "AWS_ENDPOINT_URL_ROLESANYWHERE")
			if tc.specific != "" {
				t.Setenv("AWS_ENDPOINT_URL_ROLESANYWHERE", tc.specific)
			}
			if tc.general != "" {
				t.Setenv("AWS_ENDPOINT_URL", tc.general)
			}
			profile := strings.Replace(tc.trustAnchor, "trust-anchor/", "profile/", 1)
			r, err := NewRolesAnywhere(context.Background(), RolesAnywhereConfig{TrustAnchorARN: tc.trustAnchor, ProfileARN: profile}, src, nil)
			if err != nil {
				t.Fatal(err)
			}
			if r.Endpoint() != tc.want {
				t.Fatalf("endpoint %s, want %s", r.Endpoint(), tc.want)
			}
		})
	}
	isolateAWSEnv(t)
	t.Setenv("AWS_ENDPOINT_URL_ROLESANYWHERE", "ftp://x")
	if _, err := NewRolesAnywhere(context.Background(), RolesAnywhereConfig{TrustAnchorARN: testTrustAnchor, ProfileARN: testProfile}, src, nil); err == nil {
		t.Fatal("ftp endpoint accepted")
	}
}

func TestRolesAnywhereNoSecretsInLogsOrErrors(t *testing.T) {
	fake := startFakeRA(t)
	l, err := sharedCA(t).Issue(rolesanywhere.LeafOptions{})
	if err != nil {
		t.Fatal(err)
	}
	core, logs := observer.New(zapcore.DebugLevel)
	src := &staticX509{leaf: l.Cert, chain: l.Chain, signer: l.Key}
	r := newTestRolesAnywhere(t, fake.URL, RolesAnywhereConfig{}, src, zap.New(core))
	c, err := r.Fetch(context.Background(), raRole)
	if err != nil {
		t.Fatal(err)
	}
	fake.SetMode(rolesanywhere.ModeAccessDenied)
	_, ferr := r.Fetch(context.Background(), raRole)
	var all strings.Builder
	for _, e := range logs.All() {
		all.WriteString(e.Message)
		for k, v := range e.ContextMap() {
			all.WriteString(k + "=" + strings.ReplaceAll(strings.TrimSpace(stringify(v)), "\n", " "))
		}
	}
	all.WriteString(ferr.Error())
	keyBody := strings.Join(strings.Split(string(l.KeyPEM), "\n")[1:3], "")
	for name, s := range map[string]string{"secret": c.SecretAccessKey, "token": c.SessionToken, "key": keyBody} {
		if strings.Contains(all.String(), s) {
			t.Errorf("%s appears in logs or errors", name)
		}
	}
}

func stringify(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}

func TestSanitizeErrorCode(t *testing.T) {
	for in, want := range map[string]string{
		"AccessDeniedException": "AccessDeniedException",
		"AccessDeniedException:http://internal.amazon.com/coral/com.amazonaws.rolesanywhere/": "AccessDeniedException",
		"com.amazonaws.rolesanywhere#ValidationException":                                     "ValidationException",
		"aws.protocoltests.restjson#FooError:http://internal.amazon.com/coral/":               "FooError",
		"  ThrottlingException ": "ThrottlingException",
		"":                       "",
	} {
		if got := sanitizeErrorCode(in); got != want {
			t.Errorf("sanitizeErrorCode(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestRolesAnywhereMessageTruncated(t *testing.T) {
	src := issueLeaf(t, rolesanywhere.LeafOptions{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(400)
		_, _ = io.WriteString(w, `{"code":"ValidationException","message":"`+strings.Repeat("x", 5000)+"\\u0007"+`"}`)
	}))
	defer srv.Close()
	r := newTestRolesAnywhere(t, srv.URL, RolesAnywhereConfig{}, src, nil)
	_, err := r.Fetch(context.Background(), raRole)
	var e *Error
	if !errors.As(err, &e) || len(e.Message) > maxMessage || strings.ContainsRune(e.Message, 7) {
		t.Fatalf("message not truncated/sanitized: %d bytes", len(e.Message))
	}
}

// TestRolesAnywhereFetchRefusesBadRole: a role CreateSession cannot be made
// for (what the constructor refused before roles were handed to Fetch) is a
// permanent validation error of Fetch, before the X.509 identity is read or
// a request is sent. A role without session name is fine (Roles Anywhere
// names the session).
func TestRolesAnywhereFetchRefusesBadRole(t *testing.T) {
	var calls atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls.Add(1)
		w.WriteHeader(http.StatusCreated)
		_, _ = io.WriteString(w, raSuccessJSON(time.Now().Add(time.Hour)))
	}))
	defer srv.Close()
	src := issueLeaf(t, rolesanywhere.LeafOptions{})
	r := newTestRolesAnywhere(t, srv.URL, RolesAnywhereConfig{}, src, nil)
	bad := append(badRoles(false),
		badRole{"app", creds.Role{Name: "app", ARN: "app"}, "invalid role ARN"},
		badRole{"899s", creds.Role{Name: "app", ARN: testRoleARN, Duration: 899 * time.Second}, "duration"},
		badRole{"43201s", creds.Role{Name: "app", ARN: testRoleARN, Duration: 43201 * time.Second}, "duration"})
	for _, tc := range bad {
		t.Run(tc.name, func(t *testing.T) {
			c, err := r.Fetch(context.Background(), tc.role)
			assertBadRole(t, err, c, "CreateSession", tc)
		})
	}
	if calls.Load() != 0 || src.calls.Load() != 0 {
		t.Fatalf("%d requests, %d identity reads for invalid roles", calls.Load(), src.calls.Load())
	}
	for _, role := range []creds.Role{raRole, {Name: "app", ARN: testRoleARN, SessionName: " "}} {
		if _, err := r.Fetch(context.Background(), role); err != nil {
			t.Fatalf("Fetch(%+v): %v", role, err)
		}
	}
}

// chainOfTwo issues root → intermediate 1 → intermediate 2 → leaf (ECDSA
// P-256) and returns a pool of the root, and the leaf's identity with its
// intermediates nearest first (as a chain file lists them).
func chainOfTwo(t *testing.T) (*x509.CertPool, *staticX509) {
	t.Helper()
	now := time.Now()
	issue := func(cn string, ca bool, parent *x509.Certificate, parentKey crypto.Signer) (*x509.Certificate, crypto.Signer) {
		t.Helper()
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 120))
		if err != nil {
			t.Fatal(err)
		}
		tmpl := &x509.Certificate{SerialNumber: serial, Subject: pkix.Name{CommonName: cn},
			NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour), BasicConstraintsValid: true}
		if ca {
			tmpl.IsCA, tmpl.KeyUsage = true, x509.KeyUsageCertSign
		} else {
			tmpl.KeyUsage, tmpl.ExtKeyUsage = x509.KeyUsageDigitalSignature, []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
		}
		if parent == nil {
			parent, parentKey = tmpl, key
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, key.Public(), parentKey)
		if err != nil {
			t.Fatal(err)
		}
		c, err := x509.ParseCertificate(der)
		if err != nil {
			t.Fatal(err)
		}
		return c, key
	}
	root, rootKey := issue("chain test root", true, nil, nil)
	int1, int1Key := issue("chain test intermediate 1", true, root, rootKey)
	int2, int2Key := issue("chain test intermediate 2", true, int1, int1Key)
	leaf, leafKey := issue("host-1.chain.test", false, int2, int2Key)
	pool := x509.NewCertPool()
	pool.AddCert(root)
	return pool, &staticX509{leaf: leaf, chain: []*x509.Certificate{int2, int1}, signer: leafKey}
}

// TestRolesAnywhereChainOfIntermediates: X-Amz-X509-Chain carries every
// intermediate, in order, as standard base64 DER joined by commas, and it
// is a signed header (WIRE.md §5.2 "Headers", §5.3, §10). The leaf chains
// to the trust anchor only through both intermediates, and the fake
// verifies the chain and the signature from the request alone.
func TestRolesAnywhereChainOfIntermediates(t *testing.T) {
	roots, src := chainOfTwo(t)
	fake := rolesanywhere.New(rolesanywhere.Config{Roots: roots, TrustAnchorARN: testTrustAnchor, ProfileARN: testProfile, RoleARN: testRoleARN})
	t.Cleanup(fake.Close)
	var (
		mu   sync.Mutex
		sent []http.Header
	)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		sent = append(sent, r.Header.Clone())
		mu.Unlock()
		fake.Handler().ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)

	r := newTestRolesAnywhere(t, srv.URL, RolesAnywhereConfig{MaxAttempts: 1}, src, nil)
	c, err := r.Fetch(context.Background(), raRole)
	if err != nil || !c.Complete() {
		t.Fatalf("Fetch = %v, %v\ncalls: %+v", c, err, fake.CallLog())
	}
	mu.Lock()
	defer mu.Unlock()
	if len(sent) != 1 {
		t.Fatalf("%d requests, want 1", len(sent))
	}
	h := sent[0]
	if v := h.Values("X-Amz-X509-Chain"); len(v) != 1 {
		t.Fatalf("X-Amz-X509-Chain sent %d times, want once", len(v))
	}
	want := base64.StdEncoding.EncodeToString(src.chain[0].Raw) + "," + base64.StdEncoding.EncodeToString(src.chain[1].Raw)
	if got := h.Get("X-Amz-X509-Chain"); got != want {
		t.Fatalf("X-Amz-X509-Chain = %q\nwant intermediate 2, intermediate 1: %q", got, want)
	}
	for i, part := range strings.Split(h.Get("X-Amz-X509-Chain"), ",") {
		der, err := base64.StdEncoding.Strict().DecodeString(part)
		if err != nil || !bytes.Equal(der, src.chain[i].Raw) {
			t.Fatalf("chain entry %d is not the standard base64 DER of intermediate %d (%v)", i, 2-i, err)
		}
	}
	m := regexp.MustCompile(`, SignedHeaders=([a-z0-9;-]+), `).FindStringSubmatch(h.Get("Authorization"))
	if m == nil || !slices.Contains(strings.Split(m[1], ";"), "x-amz-x509-chain") {
		t.Fatalf("x-amz-x509-chain is not a signed header: Authorization %q", h.Get("Authorization"))
	}
}

// TestRolesAnywhereAnySuccessStatus: CreateSession answers 201, and the
// client accepts any 2xx with a valid body, at the first attempt (WIRE.md
// §5.1 "Success status", §10).
func TestRolesAnywhereAnySuccessStatus(t *testing.T) {
	src := issueLeaf(t, rolesanywhere.LeafOptions{Key: rolesanywhere.ECP256})
	exp := time.Now().Add(time.Hour).Truncate(time.Second).UTC()
	for _, status := range []int{http.StatusCreated, http.StatusOK, http.StatusAccepted, http.StatusNonAuthoritativeInfo, 299} {
		t.Run(strconv.Itoa(status), func(t *testing.T) {
			var calls atomic.Int32
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				calls.Add(1)
				_, _ = io.Copy(io.Discard, r.Body)
				w.Header().Set("Content-Type", "application/json")
				w.WriteHeader(status)
				_, _ = io.WriteString(w, raSuccessJSON(exp))
			}))
			t.Cleanup(srv.Close)
			r := newTestRolesAnywhere(t, srv.URL, RolesAnywhereConfig{}, src, nil)
			c, err := r.Fetch(context.Background(), raRole)
			if err != nil {
				t.Fatalf("HTTP %d: %v", status, err)
			}
			if c.AccessKeyID != "ASIAEXAMPLEEXAMPLE" || c.SecretAccessKey != testSecretKey || c.SessionToken != testSessionToken ||
				!c.Expires.Equal(exp) || !c.Complete() {
				t.Fatalf("HTTP %d: credentials %v expiring %s", status, c, c.Expires)
			}
			if n := calls.Load(); n != 1 {
				t.Fatalf("HTTP %d: %d attempts, want 1", status, n)
			}
		})
	}
}

// TestRolesAnywhereOneConnection: refreshes do not leak a connection each
// (WIRE.md §10: AWS's helper leaks one per refresh). Successes and 403s,
// mixed, travel on one keep-alive connection of the default HTTP client:
// every answer body is read and closed, the refused ones too.
func TestRolesAnywhereOneConnection(t *testing.T) {
	src := issueLeaf(t, rolesanywhere.LeafOptions{Key: rolesanywhere.ECP256})
	exp := time.Now().Add(time.Hour)
	// true: 201 with credentials; false: 403 AccessDeniedException (not retried).
	script := []bool{true, false, false, true, true, false, true, false, true}
	var (
		calls atomic.Int32
		conns atomic.Int32
	)
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n := int(calls.Add(1)) - 1
		_, _ = io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "application/json")
		if n < len(script) && script[n] {
			w.WriteHeader(http.StatusCreated)
			_, _ = io.WriteString(w, raSuccessJSON(exp))
			return
		}
		w.Header().Set("X-Amzn-ErrorType", "AccessDeniedException")
		w.WriteHeader(http.StatusForbidden)
		// Longer than one read, so a client that stops at the message
		// leaves the rest unread.
		_, _ = io.WriteString(w, `{"message":"Untrusted certificate. Insufficient certificate","detail":"`+strings.Repeat("x", 8<<10)+`"}`)
	}))
	srv.Config.ConnState = func(_ net.Conn, st http.ConnState) {
		if st == http.StateNew {
			conns.Add(1)
		}
	}
	srv.Start()
	t.Cleanup(srv.Close)

	r := newTestRolesAnywhere(t, srv.URL, RolesAnywhereConfig{}, src, nil) // no HTTPClient: the daemon's default
	for i, ok := range script {
		c, err := r.Fetch(context.Background(), raRole)
		var e *Error
		switch {
		case ok && (err != nil || !c.Complete()):
			t.Fatalf("fetch %d: %v, %v; want credentials", i, c, err)
		case !ok && (!errors.As(err, &e) || e.Class != ClassAccessDenied):
			t.Fatalf("fetch %d: %v, want access_denied", i, err)
		}
	}
	if n := calls.Load(); n != int32(len(script)) {
		t.Fatalf("%d requests, want %d", n, len(script))
	}
	// One, normally. Go's transport may dial anew when the next request
	// comes before a finished connection is back in its idle pool (a busy
	// host); a leak — a body left unread — would open one per refusal at
	// least (5 here).
	if n := conns.Load(); n > 2 {
		t.Fatalf("%d connections opened for %d refreshes, want 1 (2 at most on a busy host)", n, len(script))
	}
}
