package issuer

import (
	"context"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	awssts "github.com/aws/aws-sdk-go-v2/service/sts"
	"github.com/prometheus/client_golang/prometheus/testutil"

	fakeec2 "github.com/imdsproxy/imdsproxy/test/fakes/ec2"
	"github.com/imdsproxy/imdsproxy/test/fakes/oidc"
	fakests "github.com/imdsproxy/imdsproxy/test/fakes/sts"
)

const iamYAML = `listen: 127.0.0.1:0
issuer: https://oidc.example.com/imds
signing:
  keys:
    - {file: "KEY1"}
attestation:
  aws_iam:
    sts_endpoints: ["STSURL"]
  ec2: {endpoint: "EC2"}
policy:
  - name: tagged
    match: {regions: [us-east-1], tags: {team: billing}}
    subjects: [billing]
    principal_tags: {region: "{region}"}
  - name: by-profile
    match: {instance_profiles: [app-host], methods: [aws_iam]}
    subjects: [app]
    principal_tags: {region: "r{region}", host: "{instanceId}"}
`

// instanceCredentials has the fake STS issue credentials for role/session
// as an instance profile's (role session name = the instance id).
func instanceCredentials(t *testing.T, fake *fakests.Server, iss *oidc.Issuer, role, session string) aws.Credentials {
	t.Helper()
	out, err := awssts.New(awssts.Options{Region: "us-east-1", BaseEndpoint: aws.String(fake.URL)}).AssumeRoleWithWebIdentity(context.Background(),
		&awssts.AssumeRoleWithWebIdentityInput{RoleArn: aws.String("arn:aws:iam::111111111111:role/" + role),
			RoleSessionName: aws.String(session), WebIdentityToken: aws.String(iss.Mint(oidc.Claims{}))})
	if err != nil {
		t.Fatal(err)
	}
	c := out.Credentials
	return aws.Credentials{AccessKeyID: *c.AccessKeyId, SecretAccessKey: *c.SecretAccessKey, SessionToken: *c.SessionToken}
}

func TestIAM(t *testing.T) {
	iss := oidc.Start(t)
	sts := fakests.Start(t, fakests.Config{Issuer: iss})
	e := newEnv(t, strings.Replace(iamYAML, "STSURL", sts.URL, 1))
	const issuerURL = "https://oidc.example.com/imds"
	creds := instanceCredentials(t, sts, iss, "app-host", testInstance)
	other := instanceCredentials(t, sts, iss, "app-host", "alice")
	now := time.Now()
	e.ec2.Put(testRegion, fakeec2.Instance{ID: testInstance, State: "running", LaunchTime: now.Add(-time.Hour)})

	unsignedHeader := signGCI(t, sts.URL, "", creds, now)
	unsignedHeader.Headers[HeaderIssuer] = []string{issuerURL}
	badSig := signGCI(t, sts.URL, issuerURL, creds, now)
	badSig.Headers["Authorization"] = []string{strings.Replace(badSig.Headers["Authorization"][0], "Signature=", "Signature=00", 1)}
	otherAction := signGCI(t, sts.URL, issuerURL, creds, now)
	otherAction.Body = "Action=AssumeRole&Version=2011-06-15&RoleArn=arn:aws:iam::111111111111:role/admin"
	wrongHost := signGCI(t, "http://127.0.0.1:1/", issuerURL, creds, now)
	stale := signGCI(t, sts.URL, issuerURL, creds, now.Add(-time.Hour))

	for _, tc := range []struct {
		name   string
		sr     *STSRequest
		region string
		status int
		code   string
		sub    string
		tags   map[string]string
	}{
		{"instance profile session, by role name", signGCI(t, sts.URL, issuerURL, creds, now), "", 200, "", "app",
			map[string]string{"region": "r", "host": testInstance}},
		{"claimed region is not proven without EC2", signGCI(t, sts.URL, issuerURL, creds, now), "eu-west-1", 200, "", "app",
			map[string]string{"region": "r"}},
		{"issuer header not signed", unsignedHeader, "", 403, reasonIssuerHeader, "", nil},
		{"no issuer header", signGCI(t, sts.URL, "", creds, now), "", 403, reasonIssuerHeader, "", nil},
		{"another issuer's request", signGCI(t, sts.URL, "https://other.example.com", creds, now), "", 403, reasonIssuerHeader, "", nil},
		{"signature refused by STS", badSig, "", 403, reasonSTSDenied, "", nil},
		{"not GetCallerIdentity", otherAction, "", 400, reasonMalformed, "", nil},
		{"signed for another endpoint", wrongHost, "", 403, reasonSTSEndpoint, "", nil},
		{"signed an hour ago", stale, "", 403, reasonSTSDenied, "", nil},
		{"not an instance profile session", signGCI(t, sts.URL, issuerURL, other, now), "", 403, reasonNotInstance, "", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			status, out := e.post(map[string]any{"method": "aws_iam", "sts_request": tc.sr, "region": tc.region})
			if status != tc.status || out["code"] != tc.code {
				t.Fatalf("status %d %v; want %d %q", status, out, tc.status, tc.code)
			}
			if status != 200 {
				return
			}
			_, c := e.verifyToken(out["token"])
			if c["sub"] != tc.sub {
				t.Fatalf("sub %v", c["sub"])
			}
			pt := c[TagsClaim].(map[string]any)["principal_tags"].(map[string]any)
			for k, v := range tc.tags {
				if got := pt[k].([]any)[0]; got != v {
					t.Fatalf("tag %s = %v, want %s", k, got, v)
				}
			}
		})
	}

	t.Run("EC2 proves the region and the tags", func(t *testing.T) {
		e.ec2.Put(testRegion, fakeec2.Instance{ID: testInstance, State: "running", LaunchTime: now, Tags: map[string]string{"team": "billing"}})
		status, out := e.post(map[string]any{"method": "aws_iam", "sts_request": signGCI(t, sts.URL, issuerURL, creds, now), "region": testRegion})
		if status != 200 {
			t.Fatalf("status %d %v", status, out)
		}
		_, c := e.verifyToken(out["token"])
		if c["sub"] != "billing" || c[TagsClaim].(map[string]any)["principal_tags"].(map[string]any)["region"].([]any)[0] != testRegion {
			t.Fatalf("claims %v", c)
		}
	})
	t.Run("STS unavailable", func(t *testing.T) {
		sts.SetMode(fakests.ModeFail5xx)
		defer sts.SetMode(fakests.ModeOK)
		status, out := e.post(map[string]any{"method": "aws_iam", "sts_request": signGCI(t, sts.URL, issuerURL, creds, now)})
		if status != http.StatusServiceUnavailable || out["code"] != reasonSTSUnavailable {
			t.Fatalf("status %d %v", status, out)
		}
	})
}

func TestIAMVerifyInstance(t *testing.T) {
	iss := oidc.Start(t)
	sts := fakests.Start(t, fakests.Config{Issuer: iss})
	yaml := strings.Replace(iamYAML, "    sts_endpoints:", "    verify_instance: true\n    sts_endpoints:", 1)
	yaml = strings.Replace(yaml, "STSURL", sts.URL, 1)
	e := newEnv(t, yaml)
	creds := instanceCredentials(t, sts, iss, "app-host", testInstance)
	now := time.Now()
	req := func(region string) map[string]any {
		return map[string]any{"method": "aws_iam", "region": region,
			"sts_request": signGCI(t, sts.URL, "https://oidc.example.com/imds", creds, now)}
	}
	if status, out := e.post(req("")); status != 400 || out["code"] != reasonMalformed {
		t.Fatalf("without region: %d %v", status, out)
	}
	if status, out := e.post(req(testRegion)); status != 403 || out["code"] != reasonNotRunning {
		t.Fatalf("unknown instance: %d %v", status, out)
	}
	e.ec2.Put("eu-west-1", fakeec2.Instance{ID: testInstance, State: "running", LaunchTime: now})
	status, out := e.post(req("eu-west-1"))
	if status != 200 {
		t.Fatalf("running instance: %d %v", status, out)
	}
	if _, c := e.verifyToken(out["token"]); c[TagsClaim].(map[string]any)["principal_tags"].(map[string]any)["region"].([]any)[0] != "reu-west-1" {
		t.Fatalf("claims %v", c)
	}
}

func TestSTSEndpointMatching(t *testing.T) {
	for _, tc := range []struct {
		u, e string
		ok   bool
	}{
		{"https://sts.amazonaws.com/", "https://sts.amazonaws.com", true},
		{"https://STS.amazonaws.com:443", "https://sts.amazonaws.com", true},
		{"http://sts.amazonaws.com/", "https://sts.amazonaws.com", false},
		{"https://sts.amazonaws.com.evil.example/", "https://sts.amazonaws.com", false},
		{"https://sts.amazonaws.com/x", "https://sts.amazonaws.com", false},
		{"https://sts.amazonaws.com/?Action=AssumeRole", "https://sts.amazonaws.com", false},
		{"https://user@sts.amazonaws.com/", "https://sts.amazonaws.com", false},
	} {
		u, _ := url.Parse(tc.u)
		e, _ := url.Parse(tc.e)
		if got := sameEndpoint(u, e); got != tc.ok {
			t.Errorf("sameEndpoint(%s, %s) = %v", tc.u, tc.e, got)
		}
	}
}

func TestSTSEndpointsFromEnvironment(t *testing.T) {
	t.Setenv("AWS_ENDPOINT_URL_STS", "http://127.0.0.1:4566")
	eps, err := stsEndpoints(&IAMConfig{})
	if err != nil || len(eps) != 1 || eps[0].Host != "127.0.0.1:4566" {
		t.Fatalf("endpoints %v %v", eps, err)
	}
	eps, _ = stsEndpoints(&IAMConfig{STSEndpoints: []string{"https://sts.eu-west-1.amazonaws.com"}})
	if eps[0].Host != "sts.eu-west-1.amazonaws.com" {
		t.Fatal("the configured endpoints must win over the environment")
	}
	t.Setenv("AWS_ENDPOINT_URL_STS", "")
	if eps, _ := stsEndpoints(&IAMConfig{}); eps[0].String() != DefaultSTSEndpoint {
		t.Fatalf("default %v", eps[0])
	}
}

// TestIAMMaxInFlight: at attestation.aws_iam.max_in_flight requests
// waiting on STS, another is refused at once with sts_busy (503,
// Retry-After: 1) and never reaches STS; once they are answered, the next
// one is forwarded again. The in-flight gauge follows.
func TestIAMMaxInFlight(t *testing.T) {
	iss := oidc.Start(t)
	real := fakests.Start(t, fakests.Config{Issuer: iss})
	creds := instanceCredentials(t, real, iss, "app-host", testInstance)
	var reached atomic.Int32
	release := make(chan struct{})
	stalled := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		reached.Add(1)
		<-release
		http.Error(w, "<ErrorResponse><Error><Code>SignatureDoesNotMatch</Code></Error></ErrorResponse>", http.StatusForbidden)
	}))
	defer stalled.Close()
	yaml := strings.Replace(iamYAML, `sts_endpoints: ["STSURL"]`, `sts_endpoints: ["`+stalled.URL+`"]
    max_in_flight: 2`, 1)
	e := newEnv(t, yaml)
	const issuerURL = "https://oidc.example.com/imds"
	body := func() map[string]any {
		return map[string]any{"method": "aws_iam", "sts_request": signGCI(t, stalled.URL, issuerURL, creds, time.Now())}
	}
	type answer struct {
		status int
		code   string
	}
	answers := make(chan answer, 2)
	for range 2 {
		go func() {
			status, out := e.post(body())
			answers <- answer{status, out["code"]}
		}()
	}
	deadline := time.Now().Add(5 * time.Second)
	for reached.Load() < 2 {
		if time.Now().After(deadline) {
			close(release)
			t.Fatal("the first two requests did not reach STS")
		}
		time.Sleep(5 * time.Millisecond)
	}
	if v := testutil.ToFloat64(e.srv.metrics.stsInFlight); v != 2 {
		t.Errorf("imdsproxy_issuer_sts_requests_in_flight = %v, want 2", v)
	}
	rec := e.postRecorder(body())
	if rec.Code != http.StatusServiceUnavailable || !strings.Contains(rec.Body.String(), `"code":"`+reasonSTSBusy+`"`) ||
		rec.Header().Get("Retry-After") != "1" {
		t.Errorf("the third request: %d %q (Retry-After %q), want 503 sts_busy with Retry-After 1", rec.Code, rec.Body.String(), rec.Header().Get("Retry-After"))
	}
	if n := reached.Load(); n != 2 {
		t.Errorf("%d requests reached STS, want 2: the refused one was sent", n)
	}
	close(release)
	for range 2 {
		if a := <-answers; a.status != http.StatusForbidden || a.code != reasonSTSDenied {
			t.Errorf("a stalled request: %d %q, want 403 %s", a.status, a.code, reasonSTSDenied)
		}
	}
	if v := testutil.ToFloat64(e.srv.metrics.stsInFlight); v != 0 {
		t.Errorf("imdsproxy_issuer_sts_requests_in_flight = %v after the answers, want 0", v)
	}
	if status, out := e.post(body()); status != http.StatusForbidden || out["code"] != reasonSTSDenied || reached.Load() != 3 {
		t.Errorf("after the answers: %d %v (%d reached STS), want it forwarded again", status, out, reached.Load())
	}
	if v := testutil.ToFloat64(e.srv.metrics.failures.WithLabelValues(MethodIAM, reasonSTSBusy)); v != 1 {
		t.Errorf("failures{aws_iam,sts_busy} = %v, want 1", v)
	}
}
