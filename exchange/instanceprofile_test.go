package exchange

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/imdsproxy/imdsproxy/creds"
)

// Instance-profile test values; the secret and token must never appear in
// errors or logs.
const (
	profileTestRole    = "instance-role"
	profileTestKey     = "ASIAINSTANCEPROFILE1"
	profileTestSecret  = "ipSecretAccessKeyEXAMPLEipSecretAccessKe"
	profileTestToken   = "IQoJb3JpZ2luX2VjEInstanceProfileSessionTokenEXAMPLE=="
	profileTestProfile = "arn:aws:iam::111111111111:instance-profile/web"
)

// profileCredDoc renders a credential document the way EC2 does.
func profileCredDoc(key, secret, token string, exp time.Time) string {
	return fmt.Sprintf(`{
  "Code" : "Success",
  "LastUpdated" : "%s",
  "Type" : "AWS-HMAC",
  "AccessKeyId" : "%s",
  "SecretAccessKey" : "%s",
  "Token" : "%s",
  "Expiration" : "%s"
}`, time.Now().UTC().Format(time.RFC3339), key, secret, token, exp.UTC().Format(time.RFC3339))
}

// profileStandIn is an httptest stand-in for the real IMDS. By default it is
// IMDSv2-only, lists profileTestRole and serves valid credentials and iam/info.
type profileStandIn struct {
	srv *httptest.Server

	mu          sync.Mutex
	tokens      map[string]bool
	putStatus   int           // != 0: answer token PUTs with this status
	putDelay    time.Duration // delay of token PUTs
	allowV1     bool          // serve GETs without a token
	listing     string
	doc         func() (int, string) // credential document
	docDelay    time.Duration
	info        func() (int, string)            // iam/info
	extra       map[string]func() (int, string) // documents of roles besides the listed one
	puts        int
	gets        map[string]int // path -> count
	tokenless   int            // GETs without a token
	rejected401 int
}

func newIPStandIn(t testing.TB) *profileStandIn {
	s := &profileStandIn{tokens: map[string]bool{}, gets: map[string]int{}, listing: profileTestRole}
	exp := time.Now().Add(6 * time.Hour)
	s.doc = func() (int, string) {
		return 200, profileCredDoc(profileTestKey, profileTestSecret, profileTestToken, exp)
	}
	s.info = func() (int, string) {
		return 200, `{
  "Code" : "Success",
  "LastUpdated" : "2026-01-01T00:00:00Z",
  "InstanceProfileArn" : "` + profileTestProfile + `",
  "InstanceProfileId" : "AIPAEXAMPLEEXAMPLE"
}`
	}
	s.srv = httptest.NewServer(http.HandlerFunc(s.serve))
	t.Cleanup(s.srv.Close)
	return s
}

func (s *profileStandIn) set(fn func(s *profileStandIn)) { s.mu.Lock(); fn(s); s.mu.Unlock() }

func (s *profileStandIn) count(path string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.gets[path]
}

// total is the number of GETs of any path.
func (s *profileStandIn) total() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, c := range s.gets {
		n += c
	}
	return n
}

func (s *profileStandIn) stats() (puts, tokenless, rejected int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.puts, s.tokenless, s.rejected401
}

// invalidateTokens forgets every issued token (as after an IMDS restart).
func (s *profileStandIn) invalidateTokens() {
	s.set(func(s *profileStandIn) { s.tokens = map[string]bool{} })
}

func (s *profileStandIn) wait(ctx context.Context, d time.Duration) {
	if d <= 0 {
		return
	}
	select {
	case <-ctx.Done():
	case <-time.After(d):
	}
}

func (s *profileStandIn) serve(w http.ResponseWriter, r *http.Request) {
	const prefix = "/latest/meta-data/"
	if r.URL.Path == "/latest/api/token" {
		if r.Method != http.MethodPut {
			http.Error(w, "method", http.StatusMethodNotAllowed)
			return
		}
		s.mu.Lock()
		s.puts++
		st, delay := s.putStatus, s.putDelay
		s.mu.Unlock()
		s.wait(r.Context(), delay)
		if st != 0 {
			http.Error(w, http.StatusText(st), st)
			return
		}
		ttl, err := strconv.Atoi(r.Header.Get("X-aws-ec2-metadata-token-ttl-seconds"))
		if err != nil || ttl < 1 || ttl > 21600 {
			http.Error(w, "bad ttl", http.StatusBadRequest)
			return
		}
		tok := "tok-" + strconv.FormatInt(time.Now().UnixNano(), 36)
		s.mu.Lock()
		s.tokens[tok] = true
		s.mu.Unlock()
		w.Header().Set("X-aws-ec2-metadata-token-ttl-seconds", strconv.Itoa(ttl))
		_, _ = w.Write([]byte(tok))
		return
	}
	if r.Method != http.MethodGet || !strings.HasPrefix(r.URL.Path, prefix) {
		http.NotFound(w, r)
		return
	}
	path := strings.TrimPrefix(r.URL.Path, prefix)
	tok := r.Header.Get("X-aws-ec2-metadata-token")
	s.mu.Lock()
	s.gets[path]++
	if tok == "" {
		s.tokenless++
	}
	ok := s.tokens[tok] || (tok == "" && s.allowV1)
	if !ok {
		s.rejected401++
	}
	listing, doc, docDelay, info := s.listing, s.doc, s.docDelay, s.info
	extra, isExtra := s.extra[strings.TrimPrefix(path, "iam/security-credentials/")]
	s.mu.Unlock()
	if !ok {
		http.Error(w, "401 - Unauthorized", http.StatusUnauthorized)
		return
	}
	switch path {
	case "iam/security-credentials", "iam/security-credentials/":
		_, _ = w.Write([]byte(listing))
	case "iam/security-credentials/" + strings.TrimSpace(strings.SplitN(listing, "\n", 2)[0]):
		s.wait(r.Context(), docDelay)
		st, body := doc()
		w.WriteHeader(st)
		_, _ = w.Write([]byte(body))
	case "iam/info":
		st, body := info()
		w.WriteHeader(st)
		_, _ = w.Write([]byte(body))
	case "instance-id":
		_, _ = w.Write([]byte("i-0123456789abcdef0"))
	default:
		if isExtra && strings.HasPrefix(path, "iam/security-credentials/") {
			st, body := extra()
			w.WriteHeader(st)
			_, _ = w.Write([]byte(body))
			return
		}
		http.NotFound(w, r)
	}
}

func newTestInstanceProfile(t testing.TB, base string, cfg InstanceProfileConfig, log *zap.Logger) *InstanceProfile {
	t.Helper()
	cfg.IMDSBase = base
	p, err := NewInstanceProfile(cfg, log)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// profileAssertClean fails when text holds the stand-in's secret or token.
func profileAssertClean(t *testing.T, where, text string) {
	t.Helper()
	for _, s := range []string{profileTestSecret, profileTestToken} {
		if strings.Contains(text, s) {
			t.Errorf("%s contains a secret: %s", where, text)
		}
	}
}

func profileClass(t *testing.T, err error) *Error {
	t.Helper()
	if err == nil {
		t.Fatal("no error")
	}
	var e *Error
	if !errors.As(err, &e) {
		t.Fatalf("error %T is not *Error: %v", err, err)
	}
	profileAssertClean(t, "error", err.Error())
	return e
}

func TestInstanceProfileFetch(t *testing.T) {
	t.Setenv("AWS_EC2_METADATA_DISABLED", "true") // ignored: the upstream is explicit
	up := newIPStandIn(t)
	p := newTestInstanceProfile(t, up.srv.URL+"/", InstanceProfileConfig{}, nil)
	ctx := context.Background()

	name, err := p.RoleName(ctx)
	if err != nil || name != profileTestRole {
		t.Fatalf("RoleName = %q, %v", name, err)
	}
	before := time.Now()
	c, err := p.Fetch(ctx, creds.Role{})
	if err != nil {
		t.Fatal(err)
	}
	if c.AccessKeyID != profileTestKey || c.SecretAccessKey != profileTestSecret || c.SessionToken != profileTestToken ||
		c.Source != SourceInstanceProfile || c.AccountID != "111111111111" ||
		c.RoleARN != "arn:aws:iam::111111111111:role/"+profileTestRole || !c.ValidAt(time.Now()) ||
		c.Expires.Location() != time.UTC || c.LastUpdated.Before(before.Add(-time.Second)) {
		t.Fatalf("credentials %v (LastUpdated %v)", c, c.LastUpdated)
	}
	if _, err := p.Fetch(ctx, creds.Role{}); err != nil {
		t.Fatal(err)
	}
	// The listing and iam/info are read once; credentials on every Fetch.
	if n := up.count("iam/security-credentials/"); n != 1 {
		t.Errorf("listing read %d times, want 1", n)
	}
	if n := up.count("iam/info"); n != 1 {
		t.Errorf("iam/info read %d times, want 1", n)
	}
	if n := up.count("iam/security-credentials/" + profileTestRole); n != 2 {
		t.Errorf("credentials read %d times, want 2", n)
	}
	if _, tokenless, _ := up.stats(); tokenless != 0 {
		t.Errorf("%d IMDSv1 requests to an IMDSv2 upstream", tokenless)
	}

	// Provider: the same credentials, as the SDK wants them.
	ac, err := p.Provider().Retrieve(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if ac.AccessKeyID != profileTestKey || ac.SecretAccessKey != profileTestSecret || ac.SessionToken != profileTestToken ||
		!ac.CanExpire || !ac.Expires.Equal(c.Expires) || ac.Source != SourceInstanceProfile || ac.AccountID != "111111111111" {
		t.Fatalf("provider credentials %+v", ac.AccessKeyID)
	}
}

func TestInstanceProfileConfiguredRole(t *testing.T) {
	up := newIPStandIn(t)
	up.set(func(s *profileStandIn) {
		s.listing = "other-role\nsecond"
		s.info = func() (int, string) { return 404, "" }
	})
	// The configured role is used as is, without the listing (the stand-in
	// serves documents under the first listed name only).
	p := newTestInstanceProfile(t, up.srv.URL, InstanceProfileConfig{RoleName: "other-role"}, nil)
	c, err := p.Fetch(context.Background(), creds.Role{})
	if err != nil {
		t.Fatal(err)
	}
	if up.count("iam/security-credentials/") != 0 {
		t.Error("listing read although the role is configured")
	}
	// iam/info unavailable: no account, no role ARN, still credentials.
	if c.AccountID != "" || c.RoleARN != "" || !c.Complete() {
		t.Fatalf("credentials %v", c)
	}
}

func TestInstanceProfileListing(t *testing.T) {
	for _, tc := range []struct {
		listing string
		want    string // "" for invalid_response
	}{
		{"instance-role", "instance-role"},
		{"instance-role\n", "instance-role"},
		{"  instance-role  \nsecond-role\n", "instance-role"},
		{"", ""},
		{"\n", ""},
		{"../../user-data", ""},
		{"role with spaces", ""},
	} {
		t.Run(fmt.Sprintf("%q", tc.listing), func(t *testing.T) {
			up := newIPStandIn(t)
			up.set(func(s *profileStandIn) { s.listing = tc.listing })
			p := newTestInstanceProfile(t, up.srv.URL, InstanceProfileConfig{}, nil)
			got, err := p.RoleName(context.Background())
			if tc.want == "" {
				if e := profileClass(t, err); e.Class != ClassInvalidResponse || e.Permanent() {
					t.Fatalf("class %s permanent %v: %v", e.Class, e.Permanent(), err)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("RoleName = %q, %v", got, err)
			}
		})
	}
}

func TestInstanceProfileErrorDocument(t *testing.T) {
	for _, tc := range []struct {
		code  string
		class string
	}{
		{"AssumeRoleUnauthorizedAccess", ClassOther},
		{"InternalError", ClassServer},
		{"Throttled", ClassServer},
		{"ServiceUnavailable", ClassServer},
		{"Failure", ClassOther},
	} {
		t.Run(tc.code, func(t *testing.T) {
			up := newIPStandIn(t)
			up.set(func(s *profileStandIn) {
				s.doc = func() (int, string) {
					// An error document that (wrongly) also carries the secret.
					return 200, `{"Code":"` + tc.code + `","Message":"EC2 cannot assume the role; ` + profileTestSecret + `",` +
						`"LastUpdated":"2026-01-01T00:00:00Z","SecretAccessKey":"` + profileTestSecret + `"}`
				}
			})
			core, logs := observer.New(zapcore.DebugLevel)
			p := newTestInstanceProfile(t, up.srv.URL, InstanceProfileConfig{}, zap.New(core))
			c, err := p.Fetch(context.Background(), creds.Role{})
			e := profileClass(t, err)
			if !c.IsZero() || e.Class != tc.class || e.Code != tc.code || e.Permanent() || !strings.Contains(err.Error(), tc.code) {
				t.Fatalf("class %s code %s permanent %v: %v", e.Class, e.Code, e.Permanent(), err)
			}
			profileAssertLogsClean(t, logs)
		})
	}
}

func profileAssertLogsClean(t *testing.T, logs *observer.ObservedLogs) {
	t.Helper()
	for _, entry := range logs.All() {
		line := entry.Message
		for k, v := range entry.ContextMap() {
			line += fmt.Sprintf(" %s=%v", k, v)
		}
		profileAssertClean(t, "log line", line)
	}
}

func TestInstanceProfileBadDocuments(t *testing.T) {
	future := time.Now().Add(time.Hour).UTC().Format(time.RFC3339)
	ok := map[string]any{"Code": "Success", "AccessKeyId": profileTestKey, "SecretAccessKey": profileTestSecret,
		"Token": profileTestToken, "Expiration": future}
	doc := func(change map[string]any) string {
		var parts []string
		for k, v := range ok {
			if nv, found := change[k]; found {
				if nv == nil {
					continue
				}
				v = nv
			}
			switch v := v.(type) {
			case string:
				parts = append(parts, strconv.Quote(k)+":"+strconv.Quote(v))
			default:
				parts = append(parts, fmt.Sprintf("%q:%v", k, v))
			}
		}
		return "{" + strings.Join(parts, ",") + "}"
	}
	tests := map[string]string{
		"not JSON":             "<html>proxy error</html>",
		"array":                "[]",
		"empty":                "",
		"no key":               doc(map[string]any{"AccessKeyId": nil}),
		"no secret":            doc(map[string]any{"SecretAccessKey": nil}),
		"no token":             doc(map[string]any{"Token": nil}),
		"no expiration":        doc(map[string]any{"Expiration": nil}),
		"expired":              doc(map[string]any{"Expiration": time.Now().Add(-time.Minute).UTC().Format(time.RFC3339)}),
		"bad time":             doc(map[string]any{"Expiration": "tomorrow"}),
		"number token":         doc(map[string]any{"Token": 12345}),
		"token with a newline": doc(map[string]any{"Token": profileTestToken + "\nX-Injected: 1"}),
		"token with a space":   doc(map[string]any{"Token": profileTestToken + " X"}),
		"token with DEL":       doc(map[string]any{"Token": profileTestToken + "\x7f"}),
		"non-ASCII token":      doc(map[string]any{"Token": profileTestToken + "\u00e9"}),
	}
	for name, body := range tests {
		t.Run(name, func(t *testing.T) {
			up := newIPStandIn(t)
			up.set(func(s *profileStandIn) { s.doc = func() (int, string) { return 200, body } })
			p := newTestInstanceProfile(t, up.srv.URL, InstanceProfileConfig{}, nil)
			c, err := p.Fetch(context.Background(), creds.Role{})
			if e := profileClass(t, err); e.Class != ClassInvalidResponse || !c.IsZero() {
				t.Fatalf("class %s: %v", e.Class, err)
			}
		})
	}
	t.Run("fractional seconds and no Code are fine", func(t *testing.T) {
		up := newIPStandIn(t)
		body := doc(map[string]any{"Code": nil, "Expiration": time.Now().Add(time.Hour).UTC().Format("2006-01-02T15:04:05.000000Z")})
		up.set(func(s *profileStandIn) { s.doc = func() (int, string) { return 200, body } })
		p := newTestInstanceProfile(t, up.srv.URL, InstanceProfileConfig{}, nil)
		if c, err := p.Fetch(context.Background(), creds.Role{}); err != nil || !c.Complete() {
			t.Fatalf("%v %v", c, err)
		}
	})
}

// TestInstanceProfileDocumentTolerance: the credential document parser
// ignores keys it does not know, an unknown nested object included, reads
// microsecond timestamps and accepts AccountId (WIRE.md §2.2: "unknown keys
// are ignored", "clients must tolerate fractions"; §7.4: the Java SDK's
// "tolerance" document and its extended, AccountId-carrying shape).
func TestInstanceProfileDocumentTolerance(t *testing.T) {
	const (
		key    = "ASIAIOSFODNN7EXAMPLE"
		secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
		token  = "AQoEXAMPLEH4aoAH0gNCAPyJxz4BlCFFxWNE1OPTgk5TthT+FvwqnKw"
	)
	now := time.Date(2025, 3, 18, 21, 0, 0, 0, time.UTC)
	exp := time.Date(2025, 3, 18, 21, 53, 17, 832308000, time.UTC)
	for name, doc := range map[string]string{
		"tolerance": `{"Code":"Success","LastUpdated":"2025-03-18T20:53:17.832308Z","Type":"AWS-HMAC",` +
			`"AccessKeyId":"` + key + `","SecretAccessKey":"` + secret + `","Token":"` + token + `",` +
			`"Expiration":"2025-03-18T21:53:17.832308Z","AccountId":"123456789012",` +
			`"UnexpectedElement7":{"Name":"ignore-me-7"}}`,
		"extended, pretty-printed": `{
  "AccessKeyId" : "` + key + `",
  "SecretAccessKey" : "` + secret + `",
  "Token" : "` + token + `",
  "Expiration" : "2025-03-18T21:53:17.832308Z",
  "AccountId" : "123456789012",
  "UnexpectedElement7" : { "Name" : "ignore-me-7", "Nested" : { "List" : [1, "two", null, true] } },
  "UnexpectedElement8" : [ { "Name" : "ignore-me-8" } ],
  "UnexpectedElement9" : 9.5
}`,
	} {
		t.Run(name, func(t *testing.T) {
			c, err := parseInstanceProfileDocument([]byte(doc), now)
			if err != nil {
				t.Fatalf("parse: %v", err)
			}
			if !c.Expires.Equal(exp) {
				t.Fatalf("Expires %s, want %s", c.Expires.Format(time.RFC3339Nano), exp.Format(time.RFC3339Nano))
			}
			want := creds.Credentials{AccessKeyID: key, SecretAccessKey: secret, SessionToken: token,
				Expires: c.Expires, LastUpdated: now, Source: SourceInstanceProfile}
			if c != want || !c.ValidAt(now) {
				t.Fatalf("parsed %#v\nwant   %#v", c, want)
			}
		})
	}
}

// TestInstanceProfileSessionTokenNotCapped: the Token of a credential
// document has no length cap of its own (WIRE.md §6.3: "The session-token
// size is not fixed, so do not cap it"); only the whole answer is bounded,
// by MaxResponseBody, with a classified error that names the bound.
func TestInstanceProfileSessionTokenNotCapped(t *testing.T) {
	exp := time.Now().Add(time.Hour)
	for _, n := range []int{16384, 16385, 20 << 10, 100 << 10, MaxResponseBody - 1024} {
		t.Run(strconv.Itoa(n), func(t *testing.T) {
			up := newIPStandIn(t)
			tok := "IQoJb3JpZ2luX2Vj" + strings.Repeat("A", n-16)
			up.set(func(s *profileStandIn) {
				s.doc = func() (int, string) { return 200, profileCredDoc(profileTestKey, profileTestSecret, tok, exp) }
			})
			p := newTestInstanceProfile(t, up.srv.URL, InstanceProfileConfig{}, nil)
			c, err := p.Fetch(context.Background(), creds.Role{})
			if err != nil || c.SessionToken != tok {
				t.Fatalf("a %d-byte session token: got %d bytes, %v", n, len(c.SessionToken), err)
			}
		})
	}
	t.Run("an answer over the bound", func(t *testing.T) {
		up := newIPStandIn(t)
		tok := "IQoJb3JpZ2luX2Vj" + strings.Repeat("A", MaxResponseBody)
		up.set(func(s *profileStandIn) {
			s.doc = func() (int, string) { return 200, profileCredDoc(profileTestKey, profileTestSecret, tok, exp) }
		})
		p := newTestInstanceProfile(t, up.srv.URL, InstanceProfileConfig{}, nil)
		c, err := p.Fetch(context.Background(), creds.Role{})
		if e := profileClass(t, err); e.Class != ClassInvalidResponse || !c.IsZero() ||
			!strings.Contains(err.Error(), "larger than 1048576 bytes") {
			t.Fatalf("class %s: %v; want invalid_response naming the bound", e.Class, err)
		}
	})
}

func TestInstanceProfileV1Fallback(t *testing.T) {
	for _, st := range []int{403, 404, 405} {
		t.Run(strconv.Itoa(st), func(t *testing.T) {
			up := newIPStandIn(t)
			up.set(func(s *profileStandIn) { s.putStatus, s.allowV1 = st, true })
			core, logs := observer.New(zapcore.WarnLevel)
			p := newTestInstanceProfile(t, up.srv.URL, InstanceProfileConfig{}, zap.New(core))
			for i := 0; i < 3; i++ {
				c, err := p.Fetch(context.Background(), creds.Role{})
				if err != nil {
					t.Fatalf("fetch %d: %v", i, err)
				}
				if c.AccessKeyID != profileTestKey || c.AccountID != "111111111111" {
					t.Fatalf("credentials %v", c)
				}
			}
			puts, tokenless, _ := up.stats()
			if tokenless == 0 {
				t.Error("no IMDSv1 request")
			}
			// One refusal by the IMDSv2-only client, one by the SDK's
			// fallback client (which then stays on IMDSv1).
			if puts > 2 {
				t.Errorf("%d token requests; the fallback should be sticky", puts)
			}
			if n := logs.FilterMessageSnippet("IMDSv1").Len(); n != 1 {
				t.Errorf("%d warnings about IMDSv1, want 1", n)
			}
		})
	}
}

// Only 403/404/405 on the token request lead to IMDSv1; 5xx, 400 and
// timeouts do not.
func TestInstanceProfileNoV1Fallback(t *testing.T) {
	for _, tc := range []struct {
		name      string
		putStatus int
		putDelay  time.Duration
		class     string
	}{
		{"500", 500, 0, ClassServer},
		{"503", 503, 0, ClassServer},
		{"400", 400, 0, ClassOther},
		{"slow", 0, 5 * time.Second, ClassTimeout},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			up := newIPStandIn(t)
			up.set(func(s *profileStandIn) { s.putStatus, s.putDelay, s.allowV1 = tc.putStatus, tc.putDelay, true })
			// Long enough for the SDK's retries of a refused PUT with their
			// jittered backoff, even on a loaded machine (1.5 s was not: the
			// fetch timed out before the last answer and was class timeout);
			// the slow case times out at 1.5 s.
			timeout := 15 * time.Second
			if tc.putDelay > 0 {
				timeout = 1500 * time.Millisecond
			}
			p := newTestInstanceProfile(t, up.srv.URL, InstanceProfileConfig{Timeout: timeout}, nil)
			_, err := p.Fetch(context.Background(), creds.Role{})
			if e := profileClass(t, err); e.Class != tc.class || e.Permanent() {
				t.Fatalf("class %s (want %s) permanent %v: %v", e.Class, tc.class, e.Permanent(), err)
			}
			if _, tokenless, _ := up.stats(); tokenless != 0 {
				t.Errorf("%d IMDSv1 requests", tokenless)
			}
		})
	}
}

func TestInstanceProfileHTTPErrors(t *testing.T) {
	t.Parallel()
	t.Run("slow credentials", func(t *testing.T) {
		up := newIPStandIn(t)
		up.set(func(s *profileStandIn) { s.docDelay = 3 * time.Second })
		p := newTestInstanceProfile(t, up.srv.URL, InstanceProfileConfig{Timeout: 300 * time.Millisecond}, nil)
		start := time.Now()
		_, err := p.Fetch(context.Background(), creds.Role{})
		if e := profileClass(t, err); e.Class != ClassTimeout {
			t.Fatalf("class %s: %v", e.Class, err)
		}
		if d := time.Since(start); d > 2*time.Second {
			t.Fatalf("Fetch took %v with a 300ms timeout", d)
		}
	})
	t.Run("5xx", func(t *testing.T) {
		up := newIPStandIn(t)
		up.set(func(s *profileStandIn) { s.doc = func() (int, string) { return 500, "oops" } })
		p := newTestInstanceProfile(t, up.srv.URL, InstanceProfileConfig{}, nil)
		_, err := p.Fetch(context.Background(), creds.Role{})
		if e := profileClass(t, err); e.Class != ClassServer || e.HTTPStatus != 500 {
			t.Fatalf("class %s status %d: %v", e.Class, e.HTTPStatus, err)
		}
	})
	t.Run("429", func(t *testing.T) {
		up := newIPStandIn(t)
		up.set(func(s *profileStandIn) { s.doc = func() (int, string) { return 429, "" } })
		p := newTestInstanceProfile(t, up.srv.URL, InstanceProfileConfig{}, nil)
		_, err := p.Fetch(context.Background(), creds.Role{})
		if e := profileClass(t, err); e.Class != ClassThrottling {
			t.Fatalf("class %s: %v", e.Class, err)
		}
	})
	t.Run("404 forgets the role", func(t *testing.T) {
		up := newIPStandIn(t)
		p := newTestInstanceProfile(t, up.srv.URL, InstanceProfileConfig{}, nil)
		if _, err := p.Fetch(context.Background(), creds.Role{}); err != nil {
			t.Fatal(err)
		}
		up.set(func(s *profileStandIn) { s.listing = "new-role" })
		_, err := p.Fetch(context.Background(), creds.Role{})
		if e := profileClass(t, err); e.HTTPStatus != 404 || e.Class != ClassOther || e.Permanent() {
			t.Fatalf("class %s status %d: %v", e.Class, e.HTTPStatus, err)
		}
		// The error names the role upstream lists now.
		if !strings.Contains(err.Error(), "new-role") || !strings.Contains(err.Error(), profileTestRole) {
			t.Fatalf("404 error does not name the old and the new role: %v", err)
		}
		c, err := p.Fetch(context.Background(), creds.Role{})
		if err != nil || c.RoleARN != "arn:aws:iam::111111111111:role/new-role" {
			t.Fatalf("after re-listing: %v %v", c, err)
		}
	})
	t.Run("network", func(t *testing.T) {
		up := newIPStandIn(t)
		up.srv.Close()
		p := newTestInstanceProfile(t, up.srv.URL, InstanceProfileConfig{}, nil)
		_, err := p.Fetch(context.Background(), creds.Role{})
		if e := profileClass(t, err); e.Class != ClassNetwork {
			t.Fatalf("class %s: %v", e.Class, err)
		}
	})
	t.Run("huge body", func(t *testing.T) {
		up := newIPStandIn(t)
		up.set(func(s *profileStandIn) {
			s.doc = func() (int, string) { return 200, `{"Token":"` + strings.Repeat("A", 1<<20) + `"}` }
		})
		p := newTestInstanceProfile(t, up.srv.URL, InstanceProfileConfig{}, nil)
		_, err := p.Fetch(context.Background(), creds.Role{})
		if e := profileClass(t, err); e.Class != ClassInvalidResponse {
			t.Fatalf("class %s: %v", e.Class, err)
		}
	})
}

// A token the upstream no longer knows gets 401; the SDK fetches a new one
// and retries. An upstream that refuses every token is a classified error.
func TestInstanceProfile401(t *testing.T) {
	t.Parallel()
	up := newIPStandIn(t)
	p := newTestInstanceProfile(t, up.srv.URL, InstanceProfileConfig{}, nil)
	if _, err := p.Fetch(context.Background(), creds.Role{}); err != nil {
		t.Fatal(err)
	}
	up.invalidateTokens()
	if _, err := p.Fetch(context.Background(), creds.Role{}); err != nil {
		t.Fatalf("after the upstream forgot its tokens: %v", err)
	}
	if _, _, rejected := up.stats(); rejected == 0 {
		t.Fatal("the stand-in never answered 401")
	}

	// Tokens are issued but never accepted.
	bad := newIPStandIn(t)
	bad.srv.Config.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodPut {
			w.Header().Set("X-aws-ec2-metadata-token-ttl-seconds", "300")
			_, _ = w.Write([]byte("useless"))
			return
		}
		http.Error(w, "401 - Unauthorized", http.StatusUnauthorized)
	})
	p = newTestInstanceProfile(t, bad.srv.URL, InstanceProfileConfig{}, nil)
	_, err := p.Fetch(context.Background(), creds.Role{})
	if e := profileClass(t, err); e.HTTPStatus != 401 || e.Class != ClassOther || e.Permanent() {
		t.Fatalf("class %s status %d: %v", e.Class, e.HTTPStatus, err)
	}
}

// Secrets never reach errors or logs, on success or failure, at debug.
func TestInstanceProfileNoSecrets(t *testing.T) {
	core, logs := observer.New(zapcore.DebugLevel)
	up := newIPStandIn(t)
	p := newTestInstanceProfile(t, up.srv.URL, InstanceProfileConfig{Timeout: 10 * time.Second}, zap.New(core))
	ctx := context.Background()
	c, err := p.Fetch(ctx, creds.Role{})
	if err != nil {
		t.Fatal(err)
	}
	profileAssertClean(t, "credentials formatted", fmt.Sprintf("%v %+v %#v %s %q", c, c, c, c, c))
	for _, body := range []string{
		`{"Code":"Success","AccessKeyId":"` + profileTestKey + `","SecretAccessKey":"` + profileTestSecret + `","Token":"` + profileTestToken + `","Expiration":"bad"}`,
		`{"Code":"Success","AccessKeyId":"` + profileTestKey + `","SecretAccessKey":"` + profileTestSecret + `","Token":"` + profileTestToken + `"}`,
		`{"Code":"Success","AccessKeyId":"` + profileTestKey + `","SecretAccessKey":"` + profileTestSecret + `","Token":"` + profileTestToken + `\n","Expiration":"2099-01-01T00:00:00Z"}`,
		`{"Code":"Nope","Message":"` + profileTestToken + `","Token":"` + profileTestToken + `"}`,
		`{"Code":"Success","SecretAccessKey":"` + profileTestSecret + `",`,
	} {
		up.set(func(s *profileStandIn) { s.doc = func() (int, string) { return 200, body } })
		_, err := p.Fetch(ctx, creds.Role{})
		profileClass(t, err)
	}
	up.set(func(s *profileStandIn) { s.doc = func() (int, string) { return 500, profileTestSecret } })
	profileClass(t, func() error { _, err := p.Fetch(ctx, creds.Role{}); return err }())
	profileAssertLogsClean(t, logs)
	if logs.Len() == 0 {
		t.Fatal("nothing logged at debug")
	}
}

func TestNewInstanceProfileValidation(t *testing.T) {
	for _, cfg := range []InstanceProfileConfig{
		{IMDSBase: ""},
		{IMDSBase: "169.254.169.254"},
		{IMDSBase: "ftp://169.254.169.254"},
		{IMDSBase: "http://169.254.169.254/latest"},
		{IMDSBase: "http://169.254.169.254", RoleName: "a/b"},
		{IMDSBase: "http://169.254.169.254", Timeout: -1},
	} {
		if _, err := NewInstanceProfile(cfg, nil); err == nil {
			t.Errorf("%+v accepted", cfg)
		}
	}
	if _, err := NewInstanceProfile(InstanceProfileConfig{IMDSBase: "http://[fd00:ec2::254]"}, nil); err != nil {
		t.Error(err)
	}
}

// TestInstanceProfileFetchesHandedRole: Fetch reads the document of the role
// it is handed (also over a configured role name), the discovered role when
// handed none, refuses a name that is not a role name without a request,
// and a 404 for the handed role names the role upstream lists.
func TestInstanceProfileFetchesHandedRole(t *testing.T) {
	const otherKey = "ASIABATCHROLEEXAMPL1"
	exp := time.Now().Add(time.Hour)
	for _, configured := range []string{"", profileTestRole} {
		t.Run("configured="+configured, func(t *testing.T) {
			up := newIPStandIn(t)
			up.set(func(s *profileStandIn) {
				s.extra = map[string]func() (int, string){
					"batch-role": func() (int, string) { return 200, profileCredDoc(otherKey, profileTestSecret, profileTestToken, exp) },
				}
			})
			p := newTestInstanceProfile(t, up.srv.URL, InstanceProfileConfig{RoleName: configured}, nil)
			ctx := context.Background()

			c, err := p.Fetch(ctx, creds.Role{Name: "batch-role"})
			if err != nil {
				t.Fatal(err)
			}
			if c.AccessKeyID != otherKey || c.RoleARN != "arn:aws:iam::111111111111:role/batch-role" || !c.ValidAt(time.Now()) {
				t.Fatalf("handed batch-role, got %s of %q", c.AccessKeyID, c.RoleARN)
			}
			if up.count("iam/security-credentials/batch-role") != 1 || up.count("iam/security-credentials/"+profileTestRole) != 0 ||
				up.count("iam/security-credentials/") != 0 {
				t.Fatalf("reads: batch-role %d, %s %d, listing %d", up.count("iam/security-credentials/batch-role"), profileTestRole,
					up.count("iam/security-credentials/"+profileTestRole), up.count("iam/security-credentials/"))
			}

			for _, role := range []creds.Role{{}, {Name: profileTestRole}} {
				c, err = p.Fetch(ctx, role)
				if err != nil {
					t.Fatal(err)
				}
				if c.AccessKeyID != profileTestKey || c.RoleARN != "arn:aws:iam::111111111111:role/"+profileTestRole {
					t.Fatalf("handed %q, got %s of %q", role.Name, c.AccessKeyID, c.RoleARN)
				}
			}
			if n := up.count("iam/security-credentials/" + profileTestRole); n != 2 {
				t.Fatalf("%s read %d times, want 2", profileTestRole, n)
			}

			// A name that is not an IAM role name: no request at all.
			before := up.total()
			for _, name := range []string{"../info", "a/b", "role with spaces", strings.Repeat("r", 65)} {
				_, err := p.Fetch(ctx, creds.Role{Name: name})
				if e := profileClass(t, err); e.Class != ClassValidation || !e.Permanent() {
					t.Fatalf("%q: class %s permanent %v: %v", name, e.Class, e.Permanent(), err)
				}
			}
			if n := up.total() - before; n != 0 {
				t.Fatalf("%d requests for invalid role names", n)
			}

			// A role upstream does not have: 404, naming the listed role.
			_, err = p.Fetch(ctx, creds.Role{Name: "gone-role"})
			e := profileClass(t, err)
			if e.HTTPStatus != 404 || e.Permanent() || up.count("iam/security-credentials/gone-role") != 1 {
				t.Fatalf("class %s status %d: %v", e.Class, e.HTTPStatus, err)
			}
			if configured == "" && !strings.Contains(e.Message, profileTestRole) {
				t.Errorf("404 error does not name the role upstream lists (%s): %v", profileTestRole, err)
			}
			// The discovered role is still served.
			if c, err := p.Fetch(ctx, creds.Role{}); err != nil || c.AccessKeyID != profileTestKey {
				t.Fatalf("after the 404: %v %v", c.AccessKeyID, err)
			}
		})
	}
}
