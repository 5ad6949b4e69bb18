package exchange

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/imdsproxy/imdsproxy/creds"
)

// Test secrets; no log line or error may contain them.
const (
	testJWT          = "eyJhbGciOiJSUzI1NiIsImtpZCI6InRlc3QifQ.eyJzdWIiOiJob3N0LWEiLCJleHAiOjE5MDAwMDAwMDB9.U0VDUkVUU0lHTkFUVVJFVkFMVUU"
	testJWT2         = "eyJhbGciOiJSUzI1NiIsImtpZCI6InRlc3QifQ.eyJzdWIiOiJob3N0LWIiLCJleHAiOjE5MDAwMDAwMDF9.U0VDT05EU0lHTkFUVVJFVkFMVUU"
	testAccessKey    = "ASIAIOSFODNN7EXAMPLE"
	testSecretKey    = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEKEY"
	testSessionToken = "AQoDYXdzEE0a8ANXXXXXXXXNO1ewxE5TijQyp+IEXAMPLEsessiontoken=="
	testRoleARN      = "arn:aws:iam::222222222222:role/app"
	testAssumedARN   = "arn:aws:sts::222222222222:assumed-role/app/i-0123456789abcdef0"
)

// testRole is the role most tests fetch: testRoleARN with an instance id as
// session name and STS's default duration.
var testRole = creds.Role{Name: "app", ARN: testRoleARN, SessionName: "i-0123456789abcdef0"}

// withDuration returns testRole asking for d.
func withDuration(d time.Duration) creds.Role {
	r := testRole
	r.Duration = d
	return r
}

// successXML is a real-shaped STS AssumeRoleWithWebIdentity response.
func successXML(exp time.Time) string {
	return fmt.Sprintf(`<AssumeRoleWithWebIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <AssumeRoleWithWebIdentityResult>
    <SubjectFromWebIdentityToken>host-a</SubjectFromWebIdentityToken>
    <Audience>sts.amazonaws.com</Audience>
    <AssumedRoleUser>
      <Arn>%s</Arn>
      <AssumedRoleId>AROACLKWSDQRAOEXAMPLE:i-0123456789abcdef0</AssumedRoleId>
    </AssumedRoleUser>
    <Credentials>
      <SessionToken>%s</SessionToken>
      <SecretAccessKey>%s</SecretAccessKey>
      <Expiration>%s</Expiration>
      <AccessKeyId>%s</AccessKeyId>
    </Credentials>
    <SourceIdentity>host-a</SourceIdentity>
    <Provider>https://issuer.internal</Provider>
  </AssumeRoleWithWebIdentityResult>
  <ResponseMetadata>
    <RequestId>ad4156e9-bce1-11e2-82e6-6b6efEXAMPLE</RequestId>
  </ResponseMetadata>
</AssumeRoleWithWebIdentityResponse>`, testAssumedARN, testSessionToken, testSecretKey,
		exp.UTC().Format(time.RFC3339), testAccessKey)
}

// errorXML is a real-shaped STS (AWS Query) error document.
func errorXML(typ, code, msg string) string {
	return fmt.Sprintf(`<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <Error>
    <Type>%s</Type>
    <Code>%s</Code>
    <Message>%s</Message>
  </Error>
  <RequestId>c6104cbe-af31-11e0-8154-cbc7ccf896c7</RequestId>
</ErrorResponse>`, typ, code, msg)
}

type response struct {
	status int
	body   string
	delay  time.Duration // wait this long (or until the client gives up) first
}

type recorded struct {
	method string
	path   string
	form   url.Values
	header http.Header
}

// stsResultXML is a real-shaped success answer of the STS action (AssumeRole,
// AssumeRoleWithWebIdentity) for the assumed-role ARN assumed.
func stsResultXML(action, assumed string, exp time.Time) string {
	return fmt.Sprintf(`<%[1]sResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <%[1]sResult>
    <AssumedRoleUser>
      <Arn>%[2]s</Arn>
      <AssumedRoleId>AROACLKWSDQRAOEXAMPLE:session</AssumedRoleId>
    </AssumedRoleUser>
    <Credentials>
      <SessionToken>%[3]s</SessionToken>
      <SecretAccessKey>%[4]s</SecretAccessKey>
      <Expiration>%[5]s</Expiration>
      <AccessKeyId>%[6]s</AccessKeyId>
    </Credentials>
  </%[1]sResult>
  <ResponseMetadata>
    <RequestId>ad4156e9-bce1-11e2-82e6-6b6efEXAMPLE</RequestId>
  </ResponseMetadata>
</%[1]sResponse>`, action, assumed, testSessionToken, testSecretKey, exp.UTC().Format(time.RFC3339), testAccessKey)
}

// assumedARNOf is the assumed-role ARN STS answers for roleARN and session.
func assumedARNOf(roleARN, session string) string {
	account := creds.AccountFromARN(roleARN)
	name := roleARN[strings.LastIndexByte(roleARN, '/')+1:]
	return "arn:aws:sts::" + account + ":assumed-role/" + name + "/" + session
}

// fakeSTS serves scripted responses (the last one repeats), or the answers
// of its answer function.
type fakeSTS struct {
	t   *testing.T
	srv *httptest.Server
	// answer, when set, decides every response from the request (n counts
	// from 0); responses are then unused.
	answer func(n int, r recorded) response

	mu        sync.Mutex
	responses []response
	requests  []recorded
}

// newFakeSTSFunc is a fakeSTS whose answers are decided by answer.
func newFakeSTSFunc(t *testing.T, answer func(n int, r recorded) response) *fakeSTS {
	f := &fakeSTS{t: t, answer: answer}
	f.srv = httptest.NewServer(http.HandlerFunc(f.serve))
	t.Cleanup(f.srv.Close)
	return f
}

func newFakeSTS(t *testing.T, responses ...response) *fakeSTS {
	f := &fakeSTS{t: t, responses: responses}
	f.srv = httptest.NewServer(http.HandlerFunc(f.serve))
	t.Cleanup(f.srv.Close)
	return f
}

func (f *fakeSTS) serve(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	form, _ := url.ParseQuery(string(body))
	f.mu.Lock()
	n := len(f.requests)
	rec := recorded{method: r.Method, path: r.URL.Path, form: form, header: r.Header.Clone()}
	f.requests = append(f.requests, rec)
	resp := response{status: 500, body: errorXML("Receiver", "InternalFailure", "no scripted response")}
	if len(f.responses) > 0 {
		resp = f.responses[min(n, len(f.responses)-1)]
	}
	f.mu.Unlock()
	if f.answer != nil {
		resp = f.answer(n, rec)
	}
	if resp.delay > 0 {
		select {
		case <-r.Context().Done():
			return
		case <-time.After(resp.delay):
		}
	}
	w.Header().Set("Content-Type", "text/xml")
	w.Header().Set("X-Amzn-Requestid", "c6104cbe-af31-11e0-8154-cbc7ccf896c7")
	w.WriteHeader(resp.status)
	_, _ = io.WriteString(w, resp.body)
}

func (f *fakeSTS) calls() []recorded {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]recorded(nil), f.requests...)
}

// tokenSource hands out tokens in order (the last repeats) and counts calls.
type tokenSource struct {
	mu     sync.Mutex
	tokens []string
	err    error
	n      int
}

func (s *tokenSource) Token(ctx context.Context) (string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.n++
	if s.err != nil {
		return "", s.err
	}
	return s.tokens[min(s.n-1, len(s.tokens)-1)], nil
}

func (s *tokenSource) count() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.n
}

// isolateAWSEnv makes the SDK's default configuration hermetic: no shared
// files, no profile, no credentials, no endpoint overrides.
func isolateAWSEnv(t testing.TB) {
	t.Helper()
	dir := t.TempDir()
	for k, v := range map[string]string{
		"AWS_CONFIG_FILE":             dir + "/config",
		"AWS_SHARED_CREDENTIALS_FILE": dir + "/credentials",
		"AWS_REGION":                  "eu-west-1",
		"HOME":                        dir,
	} {
		t.Setenv(k, v)
	}
	for _, k := range []string{"AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL",
		"AWS_ENDPOINT_URL_STS", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
		"AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN", "AWS_ROLE_SESSION_NAME", "AWS_DEFAULTS_MODE",
		"AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE",
		"AWS_EC2_METADATA_SERVICE_ENDPOINT", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy",
		"AWS_CA_BUNDLE", "AWS_ENDPOINT_URL_ROLESANYWHERE", "AWS_SDK_LOAD_CONFIG"} {
		unsetenv(t, k)
	}
}

// unsetenv unsets k for the test; t.Setenv restores it afterwards.
func unsetenv(t testing.TB, k string) {
	t.Setenv(k, "")
	os.Unsetenv(k)
}
