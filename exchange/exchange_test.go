package exchange

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/imdsproxy/imdsproxy/creds"
)

func newTestWebIdentity(t testing.TB, endpoint string, cfg WebIdentityConfig, tokens TokenSource, log *zap.Logger) *WebIdentity {
	t.Helper()
	isolateAWSEnv(t)
	t.Setenv("AWS_ENDPOINT_URL_STS", endpoint)
	w, err := NewWebIdentity(context.Background(), cfg, tokens, log)
	if err != nil {
		t.Fatal(err)
	}
	w.retryDelay = time.Millisecond
	return w
}

func TestFetchSuccess(t *testing.T) {
	exp := time.Now().Add(time.Hour).Truncate(time.Second).UTC()
	fake := newFakeSTS(t, response{status: 200, body: successXML(exp)})
	tokens := &tokenSource{tokens: []string{testJWT}}
	w := newTestWebIdentity(t, fake.srv.URL, WebIdentityConfig{}, tokens, nil)

	before := time.Now()
	c, err := w.Fetch(context.Background(), withDuration(2*time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	want := creds.Credentials{
		AccessKeyID: testAccessKey, SecretAccessKey: testSecretKey, SessionToken: testSessionToken,
		Expires: exp, AccountID: "222222222222", RoleARN: testAssumedARN, Source: "web-identity",
	}
	got := c
	got.LastUpdated = time.Time{}
	if got != want {
		t.Errorf("credentials = %#v\nwant %#v", got, want)
	}
	if c.LastUpdated.Before(before.Add(-time.Second)) || c.LastUpdated.After(time.Now()) {
		t.Errorf("LastUpdated = %v, want about now", c.LastUpdated)
	}
	if !c.Complete() {
		t.Error("credentials not Complete")
	}

	calls := fake.calls()
	if len(calls) != 1 {
		t.Fatalf("STS calls = %d, want 1", len(calls))
	}
	r := calls[0]
	if r.method != http.MethodPost || r.path != "/" {
		t.Errorf("request %s %s, want POST /", r.method, r.path)
	}
	if ct := r.header.Get("Content-Type"); !strings.HasPrefix(ct, "application/x-www-form-urlencoded") {
		t.Errorf("Content-Type = %q", ct)
	}
	for k, v := range map[string]string{
		"Action":           "AssumeRoleWithWebIdentity",
		"Version":          "2011-06-15",
		"RoleArn":          testRoleARN,
		"RoleSessionName":  "i-0123456789abcdef0",
		"WebIdentityToken": testJWT,
		"DurationSeconds":  "7200",
	} {
		if got := r.form.Get(k); got != v {
			t.Errorf("form %s = %q, want %q", k, got, v)
		}
	}
	for _, h := range []string{"Authorization", "X-Amz-Security-Token"} {
		if _, ok := r.header[h]; ok {
			t.Errorf("header %s sent: %q (the call must be unsigned)", h, r.header.Get(h))
		}
	}
	if tokens.count() != 1 {
		t.Errorf("token reads = %d, want 1", tokens.count())
	}
}

func TestFetchDefaultDurationOmitted(t *testing.T) {
	fake := newFakeSTS(t, response{status: 200, body: successXML(time.Now().Add(time.Hour))})
	w := newTestWebIdentity(t, fake.srv.URL, WebIdentityConfig{}, &tokenSource{tokens: []string{testJWT}}, nil)
	if _, err := w.Fetch(context.Background(), testRole); err != nil {
		t.Fatal(err)
	}
	if f := fake.calls()[0].form; f.Has("DurationSeconds") {
		t.Errorf("DurationSeconds sent (%q) although Duration is 0", f.Get("DurationSeconds"))
	}
}

// TestEndpointFromEnv: AWS_ENDPOINT_URL_STS and AWS_ENDPOINT_URL (alone) both
// redirect the STS client; AWS_ENDPOINT_URL_STS wins over AWS_ENDPOINT_URL.
func TestEndpointFromEnv(t *testing.T) {
	ok := response{status: 200, body: successXML(time.Now().Add(time.Hour))}
	for _, tc := range []struct {
		name     string
		sts, all bool
	}{{"AWS_ENDPOINT_URL_STS", true, false}, {"AWS_ENDPOINT_URL", false, true}, {"both", true, true}} {
		t.Run(tc.name, func(t *testing.T) {
			isolateAWSEnv(t)
			good := newFakeSTS(t, ok)
			bad := newFakeSTS(t, response{status: 403, body: errorXML("Sender", "AccessDenied", "wrong endpoint")})
			switch {
			case tc.sts && tc.all:
				t.Setenv("AWS_ENDPOINT_URL_STS", good.srv.URL)
				t.Setenv("AWS_ENDPOINT_URL", bad.srv.URL)
			case tc.sts:
				t.Setenv("AWS_ENDPOINT_URL_STS", good.srv.URL)
			default:
				t.Setenv("AWS_ENDPOINT_URL", good.srv.URL)
			}
			w, err := NewWebIdentity(context.Background(), WebIdentityConfig{}, &tokenSource{tokens: []string{testJWT}}, nil)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := w.Fetch(context.Background(), creds.Role{Name: "app", ARN: testRoleARN, SessionName: "s1"}); err != nil {
				t.Fatal(err)
			}
			if len(good.calls()) != 1 || len(bad.calls()) != 0 {
				t.Errorf("calls: good %d, bad %d", len(good.calls()), len(bad.calls()))
			}
		})
	}
}

// newIMDS is a minimal IMDSv2 on loopback that serves instance-id and counts
// requests.
func newIMDS(t *testing.T, instanceID string, calls *atomic.Int32) *httptest.Server {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls.Add(1)
		switch {
		case r.Method == http.MethodPut && r.URL.Path == "/latest/api/token":
			w.Header().Set("X-Aws-Ec2-Metadata-Token-Ttl-Seconds", r.Header.Get("X-Aws-Ec2-Metadata-Token-Ttl-Seconds"))
			_, _ = w.Write([]byte("tok"))
		case r.Method == http.MethodGet && r.URL.Path == "/latest/meta-data/instance-id":
			if r.Header.Get("X-Aws-Ec2-Metadata-Token") != "tok" {
				w.WriteHeader(http.StatusUnauthorized)
				return
			}
			_, _ = w.Write([]byte(instanceID))
		default:
			http.NotFound(w, r)
		}
	}))
	t.Cleanup(srv.Close)
	return srv
}

func TestNewWebIdentityRegion(t *testing.T) {
	isolateAWSEnv(t)
	unsetenv(t, "AWS_REGION")
	// An IMDS that would answer if asked: it must not be asked.
	var imdsCalls atomic.Int32
	srv := newIMDS(t, "i-0abc", &imdsCalls)
	t.Setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", srv.URL)
	cfg := WebIdentityConfig{}
	_, err := NewWebIdentity(context.Background(), cfg, &tokenSource{tokens: []string{testJWT}}, nil)
	if !errors.Is(err, ErrNoRegion) {
		t.Fatalf("err = %v, want ErrNoRegion", err)
	}
	if n := imdsCalls.Load(); n != 0 {
		t.Errorf("IMDS was asked %d times while loading the config", n)
	}
	cfg.Region = "us-west-2"
	if _, err := NewWebIdentity(context.Background(), cfg, &tokenSource{tokens: []string{testJWT}}, nil); err != nil {
		t.Fatalf("explicit region: %v", err)
	}
	// AWS_REGION alone also works; no credentials exist anywhere.
	t.Setenv("AWS_REGION", "ap-southeast-2")
	cfg.Region = ""
	done := make(chan error, 1)
	go func() {
		_, err := NewWebIdentity(context.Background(), cfg, &tokenSource{tokens: []string{testJWT}}, nil)
		done <- err
	}()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("NewWebIdentity hangs without credentials")
	}
}

func TestNewWebIdentityValidation(t *testing.T) {
	isolateAWSEnv(t)
	tokens := &tokenSource{tokens: []string{testJWT}}
	for name, cfg := range map[string]WebIdentityConfig{
		"neg attempts": {MaxAttempts: -1},
		"neg timeout":  {Timeout: -1},
	} {
		if _, err := NewWebIdentity(context.Background(), cfg, tokens, nil); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	if _, err := NewWebIdentity(context.Background(), WebIdentityConfig{}, nil, nil); err == nil {
		t.Error("nil token source accepted")
	}
}

// TestWebIdentityFetchRefusesBadRole: a role STS cannot be asked for (what
// the constructor refused before roles were handed to Fetch) is a permanent
// validation error of Fetch, before the token is read or STS is called. A
// session name that is merely unusual is sanitized and sent.
func TestWebIdentityFetchRefusesBadRole(t *testing.T) {
	fake := newFakeSTS(t, response{status: 200, body: successXML(time.Now().Add(time.Hour))})
	tokens := &tokenSource{tokens: []string{testJWT}}
	w := newTestWebIdentity(t, fake.srv.URL, WebIdentityConfig{}, tokens, nil)
	for _, tc := range badRoles(true) {
		t.Run(tc.name, func(t *testing.T) {
			c, err := w.Fetch(context.Background(), tc.role)
			assertBadRole(t, err, c, "AssumeRoleWithWebIdentity", tc)
		})
	}
	if n := len(fake.calls()); n != 0 {
		t.Errorf("STS called %d times for invalid roles", n)
	}
	if n := tokens.count(); n != 0 {
		t.Errorf("token read %d times for invalid roles", n)
	}

	role := testRole
	role.SessionName = "bad name!"
	if _, err := w.Fetch(context.Background(), role); err != nil {
		t.Fatal(err)
	}
	if got := fake.calls()[0].form.Get("RoleSessionName"); got != "bad-name-" {
		t.Errorf("RoleSessionName = %q, want sanitized", got)
	}
}

// badRole is a role no STS call can be made for.
type badRole struct {
	name string
	role creds.Role
	want string // in the message
}

// badRoles lists roles checkRole refuses; needSession adds blank session
// names (required by STS AssumeRole*, optional for Roles Anywhere).
func badRoles(needSession bool) []badRole {
	with := func(mut func(r *creds.Role)) creds.Role {
		r := testRole
		mut(&r)
		return r
	}
	roles := []badRole{
		{"no role", with(func(r *creds.Role) { r.ARN = "" }), "invalid role ARN"},
		{"bad role", with(func(r *creds.Role) { r.ARN = "role/app" }), "invalid role ARN"},
		{"not a role", with(func(r *creds.Role) { r.ARN = "arn:aws:iam::222222222222:user/app" }), "invalid role ARN"},
		{"short duration", with(func(r *creds.Role) { r.Duration = time.Minute }), "duration"},
		{"just too short", with(func(r *creds.Role) { r.Duration = MinDuration - time.Second }), "duration"},
		{"long duration", with(func(r *creds.Role) { r.Duration = 13 * time.Hour }), "duration"},
		{"just too long", with(func(r *creds.Role) { r.Duration = MaxDuration + time.Second }), "duration"},
		{"negative duration", with(func(r *creds.Role) { r.Duration = -time.Hour }), "duration"},
	}
	if needSession {
		roles = append(roles,
			badRole{"no session", with(func(r *creds.Role) { r.SessionName = "" }), "session name"},
			badRole{"blank session", with(func(r *creds.Role) { r.SessionName = " \t" }), "session name"})
	}
	return roles
}

// assertBadRole checks the error of a Fetch for an invalid role: a
// permanent validation *Error of op naming the role, and no credentials.
func assertBadRole(t *testing.T, err error, c creds.Credentials, op string, tc badRole) {
	t.Helper()
	var e *Error
	if !errors.As(err, &e) {
		t.Fatalf("Fetch(%+v) = %v, %v; want a validation *Error", tc.role, c, err)
	}
	if !c.IsZero() || e.Class != ClassValidation || !e.Permanent() || e.Op != op || e.Role != tc.role.ARN ||
		!strings.Contains(e.Message, tc.want) {
		t.Errorf("Fetch(%+v): class %q permanent %v op %q role %q: %v; want permanent validation of %s mentioning %q",
			tc.role, e.Class, e.Permanent(), e.Op, e.Role, err, op, tc.want)
	}
	if class, permanent := creds.Classify(err); class != ClassValidation || !permanent {
		t.Errorf("creds.Classify = %q, %v", class, permanent)
	}
}

func TestClassification(t *testing.T) {
	tests := []struct {
		name      string
		status    int
		body      string
		class     string
		code      string
		permanent bool
	}{
		{"Throttling", 400, errorXML("Sender", "Throttling", "Rate exceeded"), ClassThrottling, "Throttling", false},
		{"ThrottlingException", 400, errorXML("Sender", "ThrottlingException", "Rate exceeded"), ClassThrottling, "ThrottlingException", false},
		{"RequestLimitExceeded", 400, errorXML("Sender", "RequestLimitExceeded", "Request limit exceeded."), ClassThrottling, "RequestLimitExceeded", false},
		{"429 without code", 429, "Too Many Requests", ClassThrottling, "", false},
		{"500 InternalFailure", 500, errorXML("Receiver", "InternalFailure", "internal error"), ClassServer, "InternalFailure", false},
		{"503 ServiceUnavailable", 503, errorXML("Receiver", "ServiceUnavailable", "Service unavailable"), ClassServer, "ServiceUnavailable", false},
		{"502 HTML", 502, "<html><body>Bad Gateway</body></html>", ClassServer, "", false},
		{"IDPCommunicationError", 400, errorXML("Sender", "IDPCommunicationError", "Couldn't retrieve verification key from your identity provider"), ClassIDP, "IDPCommunicationError", false},
		{"InvalidIdentityToken", 400, errorXML("Sender", "InvalidIdentityToken", "Incorrect token audience"), ClassInvalidToken, "InvalidIdentityToken", false},
		{"ExpiredTokenException", 400, errorXML("Sender", "ExpiredTokenException", "Token expired: current date/time 1900000001 must be before the expiration date/time1900000000"), ClassExpiredToken, "ExpiredTokenException", true},
		{"AccessDenied", 403, errorXML("Sender", "AccessDenied", "Not authorized to perform sts:AssumeRoleWithWebIdentity"), ClassAccessDenied, "AccessDenied", true},
		{"ValidationError", 400, errorXML("Sender", "ValidationError", "1 validation error detected: Value at 'durationSeconds' failed to satisfy constraint"), ClassValidation, "ValidationError", true},
		{"MalformedPolicyDocument", 400, errorXML("Sender", "MalformedPolicyDocument", "Syntax errors in policy."), ClassValidation, "MalformedPolicyDocument", true},
		{"PackedPolicyTooLarge", 400, errorXML("Sender", "PackedPolicyTooLarge", "Packed policy consumes 120% of allotted space"), ClassValidation, "PackedPolicyTooLarge", true},
		{"IDPRejectedClaim", 403, errorXML("Sender", "IDPRejectedClaim", "The claim was rejected"), ClassValidation, "IDPRejectedClaim", true},
		{"RegionDisabledException", 403, errorXML("Sender", "RegionDisabledException", "STS is not activated in this region for account:222222222222."), ClassRegionDisabled, "RegionDisabledException", true},
		{"unknown code", 400, errorXML("Sender", "SomethingNew", "new"), ClassOther, "SomethingNew", false},
		{"200 garbage", 200, "this is not xml", ClassInvalidResponse, "", false},
		{"200 no credentials", 200, `<AssumeRoleWithWebIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><AssumeRoleWithWebIdentityResult></AssumeRoleWithWebIdentityResult></AssumeRoleWithWebIdentityResponse>`, ClassInvalidResponse, "", false},
		{"200 no session token", 200, strings.Replace(successXML(time.Now().Add(time.Hour)), "<SessionToken>"+testSessionToken+"</SessionToken>", "", 1), ClassInvalidResponse, "", false},
		{"200 expired credentials", 200, successXML(time.Now().Add(-time.Minute)), ClassInvalidResponse, "", false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			fake := newFakeSTS(t, response{status: tc.status, body: tc.body})
			w := newTestWebIdentity(t, fake.srv.URL, WebIdentityConfig{MaxAttempts: 1}, &tokenSource{tokens: []string{testJWT}}, nil)
			c, err := w.Fetch(context.Background(), testRole)
			if err == nil {
				t.Fatalf("no error; credentials %v", c)
			}
			if !c.IsZero() {
				t.Errorf("credentials returned with an error: %v", c)
			}
			var e *Error
			if !errors.As(err, &e) {
				t.Fatalf("error %T %v is not *exchange.Error", err, err)
			}
			if e.Class != tc.class || e.ErrorClass() != tc.class || e.Code != tc.code || e.Permanent() != tc.permanent {
				t.Errorf("class %q code %q permanent %v; want %q %q %v (%v)", e.Class, e.Code, e.Permanent(),
					tc.class, tc.code, tc.permanent, err)
			}
			if tc.status != 200 && e.HTTPStatus != tc.status {
				t.Errorf("HTTPStatus = %d, want %d", e.HTTPStatus, tc.status)
			}
			if e.Role != testRoleARN || e.Op != "AssumeRoleWithWebIdentity" {
				t.Errorf("Op, Role = %q, %q", e.Op, e.Role)
			}
			if tc.code != "" && !strings.Contains(err.Error(), tc.code) {
				t.Errorf("Error() = %q lacks the code", err.Error())
			}
			if tc.class == ClassInvalidToken {
				if n := len(fake.calls()); n != 2 {
					t.Errorf("InvalidIdentityToken: STS calls = %d, want 2 (one retry)", n)
				}
			}
		})
	}
}

// TestRetryableRetriedBySDK: with MaxAttempts 2 a 5xx and an
// IDPCommunicationError are retried within one Fetch; AccessDenied is not.
func TestRetryableRetriedBySDK(t *testing.T) {
	ok := response{status: 200, body: successXML(time.Now().Add(time.Hour))}
	for _, tc := range []struct {
		name  string
		first response
		calls int
		fail  bool
	}{
		{"500", response{status: 500, body: errorXML("Receiver", "InternalFailure", "x")}, 2, false},
		{"IDPCommunicationError", response{status: 400, body: errorXML("Sender", "IDPCommunicationError", "x")}, 2, false},
		{"AccessDenied", response{status: 403, body: errorXML("Sender", "AccessDenied", "x")}, 1, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fake := newFakeSTS(t, tc.first, ok)
			w := newTestWebIdentity(t, fake.srv.URL, WebIdentityConfig{}, &tokenSource{tokens: []string{testJWT}}, nil)
			_, err := w.Fetch(context.Background(), testRole)
			if (err != nil) != tc.fail || len(fake.calls()) != tc.calls {
				t.Errorf("err = %v, STS calls = %d; want fail=%v calls=%d", err, len(fake.calls()), tc.fail, tc.calls)
			}
		})
	}
}

func TestInvalidIdentityTokenRereadsToken(t *testing.T) {
	exp := time.Now().Add(time.Hour)
	fake := newFakeSTS(t,
		response{status: 400, body: errorXML("Sender", "InvalidIdentityToken", "Couldn't retrieve verification key")},
		response{status: 200, body: successXML(exp)})
	tokens := &tokenSource{tokens: []string{testJWT, testJWT2}}
	w := newTestWebIdentity(t, fake.srv.URL, WebIdentityConfig{}, tokens, nil)
	c, err := w.Fetch(context.Background(), testRole)
	if err != nil {
		t.Fatal(err)
	}
	if !c.Complete() {
		t.Fatal("incomplete credentials")
	}
	if tokens.count() != 2 {
		t.Errorf("token source calls = %d, want 2", tokens.count())
	}
	calls := fake.calls()
	if len(calls) != 2 || calls[0].form.Get("WebIdentityToken") != testJWT || calls[1].form.Get("WebIdentityToken") != testJWT2 {
		t.Errorf("STS calls = %d; the retry must send the re-read token", len(calls))
	}
}

func TestExpiredTokenRetriedOnlyWithNewToken(t *testing.T) {
	expired := response{status: 400, body: errorXML("Sender", "ExpiredTokenException", "Token expired")}
	ok := response{status: 200, body: successXML(time.Now().Add(time.Hour))}

	// Same token on re-read: no second STS call.
	fake := newFakeSTS(t, expired, ok)
	tokens := &tokenSource{tokens: []string{testJWT}}
	w := newTestWebIdentity(t, fake.srv.URL, WebIdentityConfig{}, tokens, nil)
	_, err := w.Fetch(context.Background(), testRole)
	var e *Error
	if !errors.As(err, &e) || e.Class != ClassExpiredToken || !e.Permanent() {
		t.Fatalf("err = %v, want expired_token", err)
	}
	if len(fake.calls()) != 1 || tokens.count() != 2 {
		t.Errorf("STS calls %d, token reads %d; want 1, 2", len(fake.calls()), tokens.count())
	}

	// Rotated token on re-read: retried and succeeds.
	fake = newFakeSTS(t, expired, ok)
	tokens = &tokenSource{tokens: []string{testJWT, testJWT2}}
	w = newTestWebIdentity(t, fake.srv.URL, WebIdentityConfig{}, tokens, nil)
	if _, err := w.Fetch(context.Background(), testRole); err != nil {
		t.Fatal(err)
	}
	if len(fake.calls()) != 2 {
		t.Errorf("STS calls %d, want 2", len(fake.calls()))
	}
}

// rememberingSource stands in for token.Command: it hands out its current
// token until told to forget it, then the next one.
type rememberingSource struct {
	tokenSource
	forgot []string
}

func (s *rememberingSource) Token(ctx context.Context) (string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.n++
	return s.tokens[min(len(s.forgot), len(s.tokens)-1)], nil
}

func (s *rememberingSource) Forget(tok string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if tok == s.tokens[min(len(s.forgot), len(s.tokens)-1)] {
		s.forgot = append(s.forgot, tok)
	}
}

// TestRefusedTokenForgotten: a source that remembers tokens (jwt_command,
// jwt_url) is told to forget the one STS refused, so the retry carries a
// new token instead of the remembered one the local clock still trusts.
func TestRefusedTokenForgotten(t *testing.T) {
	for _, refusal := range []response{
		{status: 400, body: errorXML("Sender", "ExpiredTokenException", "Token expired")},
		{status: 400, body: errorXML("Sender", "InvalidIdentityToken", "Couldn't retrieve verification key")},
	} {
		fake := newFakeSTS(t, refusal, response{status: 200, body: successXML(time.Now().Add(time.Hour))})
		tokens := &rememberingSource{tokenSource: tokenSource{tokens: []string{testJWT, testJWT2}}}
		w := newTestWebIdentity(t, fake.srv.URL, WebIdentityConfig{}, tokens, nil)
		if _, err := w.Fetch(context.Background(), testRole); err != nil {
			t.Fatal(err)
		}
		calls := fake.calls()
		if len(tokens.forgot) != 1 || tokens.forgot[0] != testJWT || len(calls) != 2 ||
			calls[1].form.Get("WebIdentityToken") != testJWT2 {
			t.Errorf("forgot %d tokens, %d STS calls; want the refused token forgotten and the retry with a new one", len(tokens.forgot), len(calls))
		}
	}
}

// classedErr stands in for *token.Error (exchange must not import token).
type classedErr struct{ permanent bool }

func (e *classedErr) Error() string      { return "token: /run/t.jwt: expired: exp is past" }
func (e *classedErr) ErrorClass() string { return "identity" }
func (e *classedErr) Permanent() bool    { return e.permanent }

func TestTokenErrorKeepsClass(t *testing.T) {
	fake := newFakeSTS(t)
	inner := &classedErr{permanent: true}
	w := newTestWebIdentity(t, fake.srv.URL, WebIdentityConfig{}, &tokenSource{err: inner}, nil)
	_, err := w.Fetch(context.Background(), testRole)
	var got *classedErr
	if !errors.As(err, &got) || got != inner {
		t.Fatalf("err = %v; the token error must stay reachable", err)
	}
	var classed interface {
		ErrorClass() string
		Permanent() bool
	}
	if !errors.As(err, &classed) || classed.ErrorClass() != "identity" || !classed.Permanent() {
		t.Errorf("class lost: %v", err)
	}
	if len(fake.calls()) != 0 {
		t.Error("STS called without a token")
	}

	// A token source error without a class becomes class identity.
	w = newTestWebIdentity(t, fake.srv.URL, WebIdentityConfig{}, &tokenSource{err: errors.New("boom")}, nil)
	_, err = w.Fetch(context.Background(), testRole)
	var e *Error
	if !errors.As(err, &e) || e.Class != ClassIdentity || e.Permanent() {
		t.Errorf("err = %v, want class identity, not permanent", err)
	}
}

func TestTimeout(t *testing.T) {
	fake := newFakeSTS(t, response{status: 200, body: successXML(time.Now().Add(time.Hour)), delay: 10 * time.Second})
	w := newTestWebIdentity(t, fake.srv.URL, WebIdentityConfig{Timeout: 200 * time.Millisecond}, &tokenSource{tokens: []string{testJWT}}, nil)
	start := time.Now()
	_, err := w.Fetch(context.Background(), testRole)
	var e *Error
	if !errors.As(err, &e) || e.Class != ClassTimeout || e.Permanent() {
		t.Fatalf("err = %v, want class timeout", err)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("Fetch took %v, want about the 200ms timeout", d)
	}
}

func TestConnectionRefused(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	w := newTestWebIdentity(t, "http://"+addr, WebIdentityConfig{MaxAttempts: 1}, &tokenSource{tokens: []string{testJWT}}, nil)
	_, err = w.Fetch(context.Background(), testRole)
	var e *Error
	if !errors.As(err, &e) || e.Class != ClassNetwork || e.HTTPStatus != 0 {
		t.Fatalf("err = %v, want class network", err)
	}
	if !strings.Contains(e.Message, "connection refused") {
		t.Errorf("Message = %q, want the tail of the transport error", e.Message)
	}
}

// timeoutErr is a net.Error that timed out.
type timeoutErr struct{}

func (timeoutErr) Error() string   { return "i/o timeout" }
func (timeoutErr) Timeout() bool   { return true }
func (timeoutErr) Temporary() bool { return true }

func TestClassifyErrors(t *testing.T) {
	already := &Error{Class: ClassServer}
	tests := []struct {
		name      string
		err       error
		class     string
		permanent bool
	}{
		{"deadline", fmt.Errorf("x: %w", context.DeadlineExceeded), ClassTimeout, false},
		{"net timeout", &net.OpError{Op: "read", Err: timeoutErr{}}, ClassTimeout, false},
		{"canceled", fmt.Errorf("x: %w", context.Canceled), ClassOther, false},
		{"dns", &net.DNSError{Err: "no such host", Name: "sts.example", IsNotFound: true}, ClassNetwork, false},
		{"refused", &net.OpError{Op: "dial", Err: errors.New("connection refused")}, ClassNetwork, false},
		{"classed", fmt.Errorf("w: %w", &classedErr{permanent: true}), "identity", true},
		{"plain", errors.New("boom"), ClassOther, false},
	}
	for _, tc := range tests {
		e := Classify(tc.err)
		if e.Class != tc.class || e.Permanent() != tc.permanent || !errors.Is(e, tc.err) {
			t.Errorf("%s: Classify = %q permanent %v; want %q %v", tc.name, e.Class, e.Permanent(), tc.class, tc.permanent)
		}
	}
	if Classify(nil) != nil {
		t.Error("Classify(nil) != nil")
	}
	if Classify(fmt.Errorf("w: %w", already)) != already {
		t.Error("Classify does not return an existing *Error")
	}
}

func TestErrorMessageSanitized(t *testing.T) {
	long := "line1\n\tline2\u0085\u007f" + strings.Repeat("é", 300)
	fake := newFakeSTS(t, response{status: 403, body: errorXML("Sender", "AccessDenied", long)})
	w := newTestWebIdentity(t, fake.srv.URL, WebIdentityConfig{MaxAttempts: 1}, &tokenSource{tokens: []string{testJWT}}, nil)
	_, err := w.Fetch(context.Background(), testRole)
	var e *Error
	if !errors.As(err, &e) {
		t.Fatal(err)
	}
	if len(e.Message) > 256 || strings.ContainsAny(e.Message, "\n\t\u0085\u007f") || !strings.HasSuffix(e.Message, "…") {
		t.Errorf("Message not sanitized/truncated: %q (%d bytes)", e.Message, len(e.Message))
	}
	want := "exchange: AssumeRoleWithWebIdentity " + testRoleARN + ": access_denied AccessDenied (HTTP 403): "
	if !strings.HasPrefix(err.Error(), want) {
		t.Errorf("Error() = %q, want prefix %q", err.Error(), want)
	}
}

// TestNoSecretsInLogsOrErrors runs success and failure paths with Debug
// logging and checks that neither the JWT, the secret key nor the session
// token appear anywhere, even when STS echoes the token in its message.
func TestNoSecretsInLogsOrErrors(t *testing.T) {
	core, logs := observer.New(zapcore.DebugLevel)
	log := zap.New(core)
	exp := time.Now().Add(time.Hour)
	scripts := [][]response{
		{{status: 200, body: successXML(exp)}},
		{{status: 400, body: errorXML("Sender", "InvalidIdentityToken", "bad token "+testJWT)}, {status: 200, body: successXML(exp)}},
		{{status: 400, body: errorXML("Sender", "InvalidIdentityToken", "bad token "+testJWT)}},
		{{status: 403, body: errorXML("Sender", "AccessDenied", "denied for "+testJWT)}},
		{{status: 500, body: "oops " + testJWT}},
		{{status: 200, body: strings.Replace(successXML(exp), "<AccessKeyId>", "<X>", 1)}},
		{{status: 200, body: strings.Replace(successXML(exp), "<AssumedRoleUser>", "<X>", 1)}},
	}
	var errs []string
	for _, script := range scripts {
		fake := newFakeSTS(t, script...)
		w := newTestWebIdentity(t, fake.srv.URL, WebIdentityConfig{MaxAttempts: 1}, &tokenSource{tokens: []string{testJWT}}, log)
		c, err := w.Fetch(context.Background(), testRole)
		if err != nil {
			errs = append(errs, err.Error(), fmt.Sprintf("%v %+v", err, err))
		} else {
			errs = append(errs, c.String(), fmt.Sprintf("%v %+v %#v", c, c, c))
		}
	}
	var all strings.Builder
	for _, e := range logs.All() {
		all.WriteString(e.Message)
		enc := zapcore.NewMapObjectEncoder()
		for _, f := range e.Context {
			f.AddTo(enc)
		}
		fmt.Fprintf(&all, " %v\n", enc.Fields)
	}
	all.WriteString(strings.Join(errs, "\n"))
	if logs.FilterMessage("assumed role with web identity").Len() == 0 {
		t.Error("no Debug line for a successful exchange")
	}
	for _, secret := range []string{testJWT, testSecretKey, testSessionToken, strings.Split(testJWT, ".")[2]} {
		if strings.Contains(all.String(), secret) {
			t.Errorf("secret %q leaked into:\n%s", secret[:8], all.String())
		}
	}
}

// TestDurationAboveRoleMaximumFallsBack: a role.duration longer than the
// role's MaxSessionDuration must not leave the host without credentials: the
// call is repeated once with one hour, and later calls ask for one hour.
func TestDurationAboveRoleMaximumFallsBack(t *testing.T) {
	exp := time.Now().Add(time.Hour).Truncate(time.Second).UTC()
	tooLong := errorXML("Sender", "ValidationError", "The requested DurationSeconds exceeds the MaxSessionDuration set for this role.")
	fake := newFakeSTS(t, response{status: 400, body: tooLong}, response{status: 200, body: successXML(exp)})
	core, logs := observer.New(zapcore.WarnLevel)
	w := newTestWebIdentity(t, fake.srv.URL, WebIdentityConfig{}, &tokenSource{tokens: []string{testJWT}}, zap.New(core))

	for i := 0; i < 2; i++ {
		if _, err := w.Fetch(context.Background(), withDuration(6*time.Hour)); err != nil {
			t.Fatalf("fetch %d: %v", i, err)
		}
	}
	var got []string
	for _, c := range fake.calls() {
		got = append(got, c.form.Get("DurationSeconds"))
	}
	if want := []string{"21600", "3600", "3600"}; fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("DurationSeconds asked = %v, want %v", got, want)
	}
	if logs.FilterMessageSnippet("MaxSessionDuration").Len() != 1 {
		t.Fatalf("want exactly one warning naming MaxSessionDuration, got %v", logs.All())
	}
	// A reload keeping these exchanges forgets the cap (the operator may
	// have raised MaxSessionDuration): the configured duration is asked
	// for again, and STS now grants it.
	(&Sources{Workload: w}).ForgetDurationCaps()
	if _, err := w.Fetch(context.Background(), withDuration(6*time.Hour)); err != nil {
		t.Fatalf("fetch after ForgetDurationCaps: %v", err)
	}
	if calls := fake.calls(); calls[len(calls)-1].form.Get("DurationSeconds") != "21600" {
		t.Fatalf("after ForgetDurationCaps asked for %s, want the configured 21600", calls[len(calls)-1].form.Get("DurationSeconds"))
	}
}

// TestOtherValidationErrorsStayPermanent: only the duration refusal falls back.
func TestOtherValidationErrorsStayPermanent(t *testing.T) {
	bad := errorXML("Sender", "ValidationError", "1 validation error detected: Value at 'roleArn' failed to satisfy constraint")
	fake := newFakeSTS(t, response{status: 400, body: bad})
	w := newTestWebIdentity(t, fake.srv.URL, WebIdentityConfig{}, &tokenSource{tokens: []string{testJWT}}, nil)
	_, err := w.Fetch(context.Background(), withDuration(6*time.Hour))
	var e *Error
	if !errors.As(err, &e) || !e.Permanent() || e.Class != ClassValidation {
		t.Fatalf("err = %v, want a permanent validation error", err)
	}
	if n := len(fake.calls()); n != 1 {
		t.Fatalf("STS calls = %d, want 1", n)
	}
}

// The exchanges that cap role.duration forget the cap on a reload
// (Sources.ForgetDurationCaps finds them by this method).
var (
	_ interface{ forgetDurationCaps() } = (*WebIdentity)(nil)
	_ interface{ forgetDurationCaps() } = (*AssumeRole)(nil)
)

// stsCapture is an http.RoundTripper that records each request and answers
// it itself with a successful AssumeRoleWithWebIdentity: nothing is sent to
// the network.
type stsCapture struct {
	mu   sync.Mutex
	reqs []capturedRequest
}

// capturedRequest is a request as the SDK handed it to the transport.
type capturedRequest struct {
	method string
	url    *url.URL
	host   string
	header http.Header
	body   string
}

func (c *stsCapture) RoundTrip(r *http.Request) (*http.Response, error) {
	var body []byte
	if r.Body != nil {
		b, err := io.ReadAll(r.Body)
		r.Body.Close()
		if err != nil {
			return nil, err
		}
		body = b
	}
	u := *r.URL
	c.mu.Lock()
	c.reqs = append(c.reqs, capturedRequest{method: r.Method, url: &u, host: r.Host, header: r.Header.Clone(), body: string(body)})
	c.mu.Unlock()
	return &http.Response{
		StatusCode: http.StatusOK, Status: "200 OK", Proto: "HTTP/1.1", ProtoMajor: 1, ProtoMinor: 1,
		Header:  http.Header{"Content-Type": {"text/xml"}},
		Body:    io.NopCloser(strings.NewReader(successXML(time.Now().Add(time.Hour)))),
		Request: r,
	}, nil
}

func (c *stsCapture) requests() []capturedRequest {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]capturedRequest(nil), c.reqs...)
}

// TestSTSRegionalEndpointUnsigned: AssumeRoleWithWebIdentity goes to the
// regional endpoint https://sts.<region>.amazonaws.com, us-east-1 included
// (never the legacy global sts.amazonaws.com), as POST / with the
// parameters in a form body, and unsigned (WIRE.md §6.1). The request is
// captured by the HTTP client's transport; nothing reaches the network.
func TestSTSRegionalEndpointUnsigned(t *testing.T) {
	for _, region := range []string{"us-east-1", "us-west-2", "eu-west-1", "ap-southeast-2"} {
		t.Run(region, func(t *testing.T) {
			isolateAWSEnv(t) // no endpoint override, no credentials
			for _, k := range []string{"AWS_USE_FIPS_ENDPOINT", "AWS_USE_DUALSTACK_ENDPOINT", "AWS_STS_REGIONAL_ENDPOINTS"} {
				unsetenv(t, k)
			}
			capture := &stsCapture{}
			w, err := NewWebIdentity(context.Background(), WebIdentityConfig{
				Region: region, HTTPClient: &http.Client{Transport: capture},
			}, &tokenSource{tokens: []string{testJWT}}, nil)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := w.Fetch(context.Background(), testRole); err != nil {
				t.Fatalf("Fetch: %v", err)
			}
			reqs := capture.requests()
			if len(reqs) != 1 {
				t.Fatalf("%d requests, want 1", len(reqs))
			}
			r := reqs[0]
			if want := "sts." + region + ".amazonaws.com"; r.url.Scheme != "https" || r.url.Host != want || (r.host != "" && r.host != want) {
				t.Errorf("request to %s://%s (Host %q), want https://%s", r.url.Scheme, r.url.Host, r.host, want)
			}
			if r.method != http.MethodPost || r.url.Path != "/" || r.url.RawQuery != "" {
				t.Errorf("request %s %s?%s, want POST / without a query", r.method, r.url.Path, r.url.RawQuery)
			}
			if ct := r.header.Get("Content-Type"); !strings.HasPrefix(ct, "application/x-www-form-urlencoded") {
				t.Errorf("Content-Type %q, want a form", ct)
			}
			form, err := url.ParseQuery(r.body)
			if err != nil {
				t.Fatalf("body is not a form: %v", err)
			}
			for k, v := range map[string]string{
				"Action": "AssumeRoleWithWebIdentity", "Version": "2011-06-15", "RoleArn": testRoleARN,
				"RoleSessionName": testRole.SessionName, "WebIdentityToken": testJWT,
			} {
				if got := form.Get(k); got != v {
					t.Errorf("form %s = %q, want %q", k, got, v)
				}
			}
			for _, h := range []string{"Authorization", "X-Amz-Security-Token"} {
				if _, ok := r.header[h]; ok {
					t.Errorf("header %s sent: the call must be unsigned", h)
				}
			}
		})
	}
}
