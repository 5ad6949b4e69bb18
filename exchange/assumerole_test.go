package exchange

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/imdsproxy/imdsproxy/creds"
	fakests "github.com/imdsproxy/imdsproxy/test/fakes/sts"
)

// arEnv is the fake STS (verifying SigV4) behind a recorder of raw forms,
// and an IMDS stand-in serving the base (instance-profile) credentials.
type arEnv struct {
	sts *fakests.Server
	srv *httptest.Server
	up  *profileStandIn
	ip  *InstanceProfile

	mu    sync.Mutex
	forms []url.Values
}

func newAREnv(t *testing.T, cfg fakests.Config) *arEnv {
	t.Helper()
	isolateAWSEnv(t)
	if cfg.RoleARN == "" {
		cfg.RoleARN = testRoleARN
	}
	e := &arEnv{sts: fakests.New(cfg)}
	h := e.sts.Handler()
	e.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		f, _ := url.ParseQuery(string(b))
		e.mu.Lock()
		e.forms = append(e.forms, f)
		e.mu.Unlock()
		r.Body = io.NopCloser(bytes.NewReader(b))
		h.ServeHTTP(w, r)
	}))
	t.Cleanup(func() { e.sts.Close(); e.srv.Close() })
	e.sts.AllowBaseSession(profileTestKey, profileTestSecret, profileTestToken)
	e.up = newIPStandIn(t)
	e.ip = newTestInstanceProfile(t, e.up.srv.URL, InstanceProfileConfig{}, nil)
	t.Setenv("AWS_ENDPOINT_URL_STS", e.srv.URL)
	return e
}

func (e *arEnv) rawForms() []url.Values {
	e.mu.Lock()
	defer e.mu.Unlock()
	return append([]url.Values(nil), e.forms...)
}

func (e *arEnv) newAssumeRole(t *testing.T, cfg AssumeRoleConfig, log *zap.Logger) *AssumeRole {
	t.Helper()
	if cfg.Base == nil {
		cfg.Base = e.ip.Provider()
	}
	a, err := NewAssumeRole(context.Background(), cfg, log)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// arAssertClean fails when text holds a base or issued secret.
func (e *arEnv) assertClean(t *testing.T, where, text string) {
	t.Helper()
	profileAssertClean(t, where, text)
	for _, is := range e.sts.Issued() {
		if strings.Contains(text, is.SecretAccessKey) || strings.Contains(text, is.SessionToken) {
			t.Errorf("%s contains an issued secret", where)
		}
	}
}

func TestAssumeRoleFromInstanceProfile(t *testing.T) {
	e := newAREnv(t, fakests.Config{ExternalID: "ext-123"})
	core, logs := observer.New(zapcore.DebugLevel)
	a := e.newAssumeRole(t, AssumeRoleConfig{
		ExternalID:     "ext-123",
		SourceIdentity: "host-1",
		Tags:           map[string]string{"team": "payments", "env": "prod", "Cost Center": "42"},
	}, zap.New(core))

	role := withDuration(time.Hour)
	c, err := a.Fetch(context.Background(), role)
	if err != nil {
		t.Fatal(err)
	}
	is, ok := e.sts.Last()
	if !ok {
		t.Fatal("STS issued nothing")
	}
	want := creds.Credentials{AccessKeyID: is.AccessKeyID, SecretAccessKey: is.SecretAccessKey, SessionToken: is.SessionToken,
		Expires: is.Expiration, AccountID: "222222222222", RoleARN: is.AssumedRoleARN, Source: SourceAssumeRole}
	got := c
	got.LastUpdated = time.Time{}
	if got != want {
		t.Fatalf("credentials %v, want %v", got, want)
	}
	if is.BaseAccessKeyID != profileTestKey || is.ExternalID != "ext-123" || is.SourceIdentity != "host-1" ||
		len(is.Tags) != 3 || is.Tags["team"] != "payments" || is.Tags["Cost Center"] != "42" ||
		is.DurationSeconds != 3600 || is.RoleSessionName != "i-0123456789abcdef0" {
		t.Fatalf("STS saw %+v", is)
	}
	call := e.sts.CallLog()[0]
	if !call.SignatureValid || call.AccessKeyID != profileTestKey || call.Action != fakests.ActionAssumeRole {
		t.Fatalf("call %+v", call)
	}
	// Tags are sent sorted by key.
	f := e.rawForms()[0]
	if f.Get("Tags.member.1.Key") != "Cost Center" || f.Get("Tags.member.2.Key") != "env" || f.Get("Tags.member.3.Key") != "team" {
		t.Fatalf("tag order %v", f)
	}

	// The base credentials are cached: a second Fetch reads IMDS no more.
	if _, err := a.Fetch(context.Background(), role); err != nil {
		t.Fatal(err)
	}
	if n := e.up.count("iam/security-credentials/" + profileTestRole); n != 1 {
		t.Errorf("instance-profile credentials read %d times, want 1", n)
	}
	for _, entry := range logs.All() {
		line := entry.Message + fmt.Sprint(entry.ContextMap())
		e.assertClean(t, "log", line)
	}
}

func TestAssumeRoleErrors(t *testing.T) {
	t.Run("access denied is permanent", func(t *testing.T) {
		e := newAREnv(t, fakests.Config{})
		e.sts.SetMode(fakests.ModeAccessDenied)
		a := e.newAssumeRole(t, AssumeRoleConfig{}, nil)
		_, err := a.Fetch(context.Background(), testRole)
		ee := profileClass(t, err)
		if ee.Class != ClassAccessDenied || !ee.Permanent() || ee.Code != "AccessDenied" || ee.Role != testRoleARN {
			t.Fatalf("class %s permanent %v: %v", ee.Class, ee.Permanent(), err)
		}
	})
	t.Run("wrong external id", func(t *testing.T) {
		e := newAREnv(t, fakests.Config{ExternalID: "ext-123"})
		a := e.newAssumeRole(t, AssumeRoleConfig{ExternalID: "ext-999"}, nil)
		_, err := a.Fetch(context.Background(), testRole)
		if ee := profileClass(t, err); ee.Class != ClassAccessDenied || !ee.Permanent() {
			t.Fatalf("class %s: %v", ee.Class, err)
		}
		if got := e.sts.CallLog()[0].ExternalID; got != "ext-999" {
			t.Fatalf("external id seen %q", got)
		}
	})
	t.Run("throttling", func(t *testing.T) {
		e := newAREnv(t, fakests.Config{})
		e.sts.SetMode(fakests.ModeThrottle)
		a := e.newAssumeRole(t, AssumeRoleConfig{MaxAttempts: 2}, nil)
		_, err := a.Fetch(context.Background(), testRole)
		if ee := profileClass(t, err); ee.Class != ClassThrottling || ee.Permanent() {
			t.Fatalf("class %s: %v", ee.Class, err)
		}
		if n := e.sts.Calls(); n != 2 {
			t.Fatalf("%d calls, want 2 (MaxAttempts)", n)
		}
	})
	t.Run("base credentials unavailable", func(t *testing.T) {
		e := newAREnv(t, fakests.Config{})
		e.up.set(func(s *profileStandIn) { s.doc = func() (int, string) { return 500, profileTestSecret } })
		a := e.newAssumeRole(t, AssumeRoleConfig{}, nil)
		_, err := a.Fetch(context.Background(), testRole)
		ee := profileClass(t, err)
		if ee.Class != ClassBaseCredentials || ee.Permanent() {
			t.Fatalf("class %s: %v", ee.Class, err)
		}
		// The base failure stays reachable.
		var inner *Error
		if !errors.As(ee.Err, &inner) || inner.Class != ClassServer {
			t.Fatalf("inner %v", ee.Err)
		}
		if n := e.sts.Calls(); n != 0 {
			t.Fatalf("%d STS calls without base credentials", n)
		}
		// Upstream recovers: the next Fetch works.
		e.up.set(func(s *profileStandIn) {
			s.doc = func() (int, string) {
				return 200, profileCredDoc(profileTestKey, profileTestSecret, profileTestToken, time.Now().Add(time.Hour))
			}
		})
		if _, err := a.Fetch(context.Background(), testRole); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("base credentials refused", func(t *testing.T) {
		e := newAREnv(t, fakests.Config{})
		a := e.newAssumeRole(t, AssumeRoleConfig{}, nil)
		if _, err := a.Fetch(context.Background(), testRole); err != nil {
			t.Fatal(err)
		}
		// The instance profile rotates to a key STS does not know.
		e.up.set(func(s *profileStandIn) {
			s.doc = func() (int, string) {
				return 200, profileCredDoc("ASIAUNKNOWNBASEKEY00", profileTestSecret, profileTestToken, time.Now().Add(time.Hour))
			}
		})
		e.sts.AllowBaseSession(profileTestKey, "rotated"+profileTestSecret, profileTestToken) // the cached key is refused now
		before := e.sts.Calls()
		_, err := a.Fetch(context.Background(), testRole)
		ee := profileClass(t, err)
		if ee.Class != ClassBaseCredentials || ee.Permanent() || ee.Code != "InvalidClientTokenId" {
			t.Fatalf("class %s code %s: %v", ee.Class, ee.Code, err)
		}
		log := e.sts.CallLog()[before:]
		if len(log) != 2 || log[0].Code != "SignatureDoesNotMatch" || log[1].AccessKeyID != "ASIAUNKNOWNBASEKEY00" {
			t.Fatalf("calls after rotation %+v (want a retry with re-read base credentials)", log)
		}
		// STS learns the new key: the next Fetch re-reads the base and works.
		e.sts.AllowBaseSession("ASIAUNKNOWNBASEKEY00", profileTestSecret, profileTestToken)
		if _, err := a.Fetch(context.Background(), testRole); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("role chaining limit", func(t *testing.T) {
		e := newAREnv(t, fakests.Config{})
		core, logs := observer.New(zapcore.WarnLevel)
		a := e.newAssumeRole(t, AssumeRoleConfig{}, zap.New(core))
		for i := 0; i < 2; i++ {
			c, err := a.Fetch(context.Background(), withDuration(4*time.Hour))
			if err != nil {
				t.Fatal(err)
			}
			if r := c.Remaining(time.Now()); r > time.Hour || r < 59*time.Minute {
				t.Fatalf("remaining %v", r)
			}
		}
		log := e.sts.CallLog()
		if len(log) != 3 || log[0].DurationSeconds != 14400 || log[0].Code != "ValidationError" ||
			log[1].DurationSeconds != 3600 || log[2].DurationSeconds != 3600 {
			t.Fatalf("calls %+v", log)
		}
		if logs.Len() != 1 {
			t.Fatalf("%d warnings, want 1", logs.Len())
		}
	})
}

// The SDK's endpoint conventions apply: AWS_ENDPOINT_URL alone works too.
func TestAssumeRoleGenericEndpoint(t *testing.T) {
	e := newAREnv(t, fakests.Config{})
	unsetenv(t, "AWS_ENDPOINT_URL_STS")
	t.Setenv("AWS_ENDPOINT_URL", e.srv.URL)
	a := e.newAssumeRole(t, AssumeRoleConfig{}, nil)
	if _, err := a.Fetch(context.Background(), testRole); err != nil {
		t.Fatal(err)
	}
	if e.sts.Calls() != 1 {
		t.Fatal("the fake STS was not called")
	}
}

// Base nil: the SDK's default chain (here: environment variables), never
// IMDS.
func TestAssumeRoleSDKChain(t *testing.T) {
	e := newAREnv(t, fakests.Config{})
	role := creds.Role{Name: "app", ARN: testRoleARN, SessionName: "host-1"}
	a := func() *AssumeRole {
		a, err := NewAssumeRole(context.Background(), AssumeRoleConfig{}, nil)
		if err != nil {
			t.Fatal(err)
		}
		return a
	}
	t.Run("no credentials", func(t *testing.T) {
		t.Setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", e.up.srv.URL) // must not be asked
		_, err := a().Fetch(context.Background(), role)
		if ee := profileClass(t, err); ee.Class != ClassBaseCredentials {
			t.Fatalf("class %s: %v", ee.Class, err)
		}
		if puts, _, _ := e.up.stats(); puts != 0 || e.up.count("iam/security-credentials/") != 0 {
			t.Fatal("the SDK chain asked IMDS")
		}
	})
	t.Run("environment", func(t *testing.T) {
		e.sts.AllowBase("AKIAENVIRONMENTKEY00", "envSecretAccessKeyEXAMPLE")
		t.Setenv("AWS_ACCESS_KEY_ID", "AKIAENVIRONMENTKEY00")
		t.Setenv("AWS_SECRET_ACCESS_KEY", "envSecretAccessKeyEXAMPLE")
		if _, err := a().Fetch(context.Background(), role); err != nil {
			t.Fatal(err)
		}
		if is, _ := e.sts.Last(); is.BaseAccessKeyID != "AKIAENVIRONMENTKEY00" || is.RoleSessionName != "host-1" {
			t.Fatalf("signed by %q, session %q", is.BaseAccessKeyID, is.RoleSessionName)
		}
	})
}

func TestNewAssumeRoleValidation(t *testing.T) {
	isolateAWSEnv(t)
	manyTags := map[string]string{}
	for i := 0; i < 51; i++ {
		manyTags[fmt.Sprintf("k%d", i)] = "v"
	}
	ok := AssumeRoleConfig{Base: (&InstanceProfile{}).Provider()}
	tests := map[string]func(c *AssumeRoleConfig){
		"51 tags":                func(c *AssumeRoleConfig) { c.Tags = manyTags },
		"long tag key":           func(c *AssumeRoleConfig) { c.Tags = map[string]string{strings.Repeat("k", 129): "v"} },
		"empty tag key":          func(c *AssumeRoleConfig) { c.Tags = map[string]string{"": "v"} },
		"long tag value":         func(c *AssumeRoleConfig) { c.Tags = map[string]string{"k": strings.Repeat("v", 257)} },
		"bad tag character":      func(c *AssumeRoleConfig) { c.Tags = map[string]string{"k": "a;b"} },
		"reserved tag key":       func(c *AssumeRoleConfig) { c.Tags = map[string]string{"AWS:x": "v"} },
		"case duplicate tags":    func(c *AssumeRoleConfig) { c.Tags = map[string]string{"Team": "a", "team": "b"} },
		"bad source identity":    func(c *AssumeRoleConfig) { c.SourceIdentity = "host 1" },
		"short source identity":  func(c *AssumeRoleConfig) { c.SourceIdentity = "h" },
		"long source identity":   func(c *AssumeRoleConfig) { c.SourceIdentity = strings.Repeat("h", 65) },
		"bad external id":        func(c *AssumeRoleConfig) { c.ExternalID = "ext 1" },
		"long external id":       func(c *AssumeRoleConfig) { c.ExternalID = strings.Repeat("e", 1225) },
		"negative timeout":       func(c *AssumeRoleConfig) { c.Timeout = -1 },
		"negative max attempts":  func(c *AssumeRoleConfig) { c.MaxAttempts = -1 },
		"tag value with newline": func(c *AssumeRoleConfig) { c.Tags = map[string]string{"k": "a\nb"} },
	}
	for name, mutate := range tests {
		t.Run(name, func(t *testing.T) {
			cfg := ok
			mutate(&cfg)
			if _, err := NewAssumeRole(context.Background(), cfg, nil); err == nil {
				t.Fatalf("accepted %+v", cfg)
			}
		})
	}
	t.Run("no region", func(t *testing.T) {
		unsetenv(t, "AWS_REGION")
		if _, err := NewAssumeRole(context.Background(), ok, nil); !errors.Is(err, ErrNoRegion) {
			t.Fatalf("no region: %v", err)
		}
		cfg := ok
		cfg.Region = "eu-central-1"
		if _, err := NewAssumeRole(context.Background(), cfg, nil); err != nil {
			t.Fatal(err)
		}
	})
	cfg := ok
	cfg.Tags = map[string]string{"team": "", "a.b:c/d=e+f-g@h": "ÄÖ ü 1", strings.Repeat("k", 128): strings.Repeat("v", 256)}
	cfg.ExternalID, cfg.SourceIdentity = "arn:aws:iam::1:x/y", "host@example.com"
	a, err := NewAssumeRole(context.Background(), cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(a.tags) != 3 || a.externalID != cfg.ExternalID || a.sourceIdentity != cfg.SourceIdentity {
		t.Fatalf("%v %q %q", a.tags, a.externalID, a.sourceIdentity)
	}
}

// TestAssumeRoleFetchRefusesBadRole: a role STS cannot be asked for is a
// permanent validation error of Fetch; neither the base credentials nor STS
// are asked.
func TestAssumeRoleFetchRefusesBadRole(t *testing.T) {
	e := newAREnv(t, fakests.Config{})
	a := e.newAssumeRole(t, AssumeRoleConfig{}, nil)
	for _, tc := range badRoles(true) {
		t.Run(tc.name, func(t *testing.T) {
			c, err := a.Fetch(context.Background(), tc.role)
			assertBadRole(t, err, c, "AssumeRole", tc)
		})
	}
	if n := e.sts.Calls(); n != 0 {
		t.Errorf("STS called %d times for invalid roles", n)
	}
	if n := e.up.count("iam/security-credentials/" + profileTestRole); n != 0 {
		t.Errorf("base credentials read %d times for invalid roles", n)
	}
	// A valid role still works with the same AssumeRole.
	if _, err := a.Fetch(context.Background(), testRole); err != nil {
		t.Fatal(err)
	}
}

// Every source fits the cache's Fetcher shape.
var (
	_ creds.Fetcher = (*AssumeRole)(nil)
	_ creds.Fetcher = (*WebIdentity)(nil)
	_ creds.Fetcher = (*RolesAnywhere)(nil)
	_ creds.Fetcher = (*Federation)(nil)
	_ creds.Fetcher = (*InstanceProfile)(nil)
)
