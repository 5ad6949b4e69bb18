package token

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	awssts "github.com/aws/aws-sdk-go-v2/service/sts"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/imdsproxy/imdsproxy/issuer"
	fakeissuer "github.com/imdsproxy/imdsproxy/test/fakes/issuer"
	"github.com/imdsproxy/imdsproxy/test/fakes/oidc"
	fakests "github.com/imdsproxy/imdsproxy/test/fakes/sts"
)

func TestURLForCachesPerSubject(t *testing.T) {
	_, imdsURL := startIMDS(t)
	is := fakeissuer.Start(t, fakeissuer.Config{Issuer: newTestIssuer(t)})
	reg := prometheus.NewPedanticRegistry()
	core, logs := newObserver()
	u, err := NewURL(is.URL, URLOptions{IMDSBase: imdsURL}, core, reg)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if mustFor(t, u, "app") != mustFor(t, u, "app") || mustFor(t, u, "") != u || mustFor(t, u, "app") == u {
		t.Fatal("For does not return one URL per subject")
	}
	for _, bad := range []string{"-app", "a b", strings.Repeat("a", MaxWorkloadSubject+1), "app\n"} {
		if _, err := u.For(bad); err == nil {
			t.Fatalf("For(%q) accepted", bad)
		}
	}
	if _, err := mustFor(t, u, "app").For("billing"); err == nil {
		t.Fatal("For on a subject's URL accepted")
	}
	subOf := func(tok string) string { c, _ := ParseClaims(tok); return c.Subject }
	var toks []string
	for i := 0; i < 2; i++ {
		a, err := mustFor(t, u, "app").Token(ctx)
		if err != nil {
			t.Fatal(err)
		}
		b, err := mustFor(t, u, "billing").Token(ctx)
		if err != nil {
			t.Fatal(err)
		}
		d, err := u.Token(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if subOf(a) != "app" || subOf(b) != "billing" || subOf(d) != "i-1234567890abcdef0" {
			t.Fatalf("subjects %s %s %s", subOf(a), subOf(b), subOf(d))
		}
		toks = append(toks, a, b, d)
	}
	if is.Calls() != 3 {
		t.Fatalf("issuer calls %d; want 3 (one per subject, then cached)", is.Calls())
	}
	reqs := is.Requests()
	if reqs[0].Workload != "app" || reqs[1].Workload != "billing" || reqs[2].Workload != "" {
		t.Fatalf("workloads sent: %q %q %q", reqs[0].Workload, reqs[1].Workload, reqs[2].Workload)
	}
	if mustFor(t, u, "").Subject() != "" || mustFor(t, u, "app").Subject() != "app" {
		t.Fatal("Subject()")
	}
	// Forget drops only that subject's token.
	mustFor(t, u, "app").Forget(toks[0])
	if _, err := mustFor(t, u, "app").Token(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := mustFor(t, u, "billing").Token(ctx); err != nil {
		t.Fatal(err)
	}
	if is.Calls() != 4 {
		t.Fatalf("issuer calls %d after Forget(app); want 4", is.Calls())
	}
	// The default subject is the same cache through For("").
	mustFor(t, u, "").Forget(toks[2])
	if _, err := u.Token(ctx); err != nil || is.Calls() != 5 {
		t.Fatalf("default subject after Forget: %v, calls %d", err, is.Calls())
	}
	if v := testutil.ToFloat64(u.jwt.fetches.WithLabelValues("url", "ok")); v != 5 {
		t.Fatalf("fetches ok = %v; want 5 (all subjects)", v)
	}
	if problems, err := testutil.GatherAndLint(reg); err != nil || len(problems) > 0 {
		t.Fatalf("lint: %v %v", problems, err)
	}
	// A subject's errors name it.
	is.SetMode(fakeissuer.ModeFail5xx)
	mustFor(t, u, "app").Forget(mustToken(t, mustFor(t, u, "app")))
	var te *Error
	if _, err := mustFor(t, u, "app").Token(ctx); !errors.As(err, &te) || te.Workload != "app" || !strings.Contains(err.Error(), "(workload app)") {
		t.Fatalf("error of subject app: %v", err)
	}
	for _, tok := range toks {
		if strings.Contains(logText(logs), tok) {
			t.Fatal("token logged")
		}
	}
}

func mustToken(t *testing.T, u *URL) string {
	t.Helper()
	tok, err := u.Token(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

func mustFor(t *testing.T, u *URL, subject string) *URL {
	t.Helper()
	su, err := u.For(subject)
	if err != nil {
		t.Fatal(err)
	}
	return su
}

func TestURLForRefreshNearExpiry(t *testing.T) {
	_, imdsURL := startIMDS(t)
	is := fakeissuer.Start(t, fakeissuer.Config{Issuer: newTestIssuer(t)})
	clock := newTestClock(time.Now())
	u, err := NewURL(is.URL, URLOptions{IMDSBase: imdsURL, Now: clock.Now}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, step := range []time.Duration{0, 50 * time.Minute, 5 * time.Minute} {
		clock.Add(step)
		if _, err := mustFor(t, u, "app").Token(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
	// 1 h tokens are reused until exp - 6 min: fetched at 0 and at 55 min.
	if is.Calls() != 2 {
		t.Fatalf("issuer calls %d, want 2", is.Calls())
	}
}

func TestURLOptionsIAM(t *testing.T) {
	for _, tc := range []struct {
		name string
		opts URLOptions
		ok   bool
	}{
		{"iam without issuer", URLOptions{Method: URLMethodIAM}, false},
		{"unknown method", URLOptions{Method: "gcp"}, false},
		{"iam", URLOptions{Method: URLMethodIAM, IAM: URLIAMOptions{Issuer: "https://oidc.example.com"}}, true},
		{"bad endpoint", URLOptions{Method: URLMethodIAM, IAM: URLIAMOptions{Issuer: "x", STSEndpoint: "ftp://x"}}, false},
	} {
		_, err := NewURL("https://issuer.example.com/v1/token", tc.opts, nil, nil)
		if (err == nil) != tc.ok {
			t.Errorf("%s: err %v", tc.name, err)
		}
	}
	u, _ := NewURL("https://issuer.example.com/v1/token", URLOptions{Method: URLMethodIAM,
		IAM: URLIAMOptions{Issuer: "x", STSEndpoint: "https://sts.eu-west-1.amazonaws.com"}}, nil, nil)
	if u.iam.Region != "eu-west-1" {
		t.Fatalf("region from endpoint: %q", u.iam.Region)
	}
}

// iamIMDS serves an instance profile's credentials and the region, as
// IMDS does, with IMDSv2.
type iamIMDS struct {
	creds atomic.Value // string: the credentials document
}

func startIAMIMDS(t *testing.T, creds aws.Credentials) string {
	t.Helper()
	f := &iamIMDS{}
	doc, _ := json.Marshal(map[string]string{"Code": "Success", "Type": "AWS-HMAC", "AccessKeyId": creds.AccessKeyID,
		"SecretAccessKey": creds.SecretAccessKey, "Token": creds.SessionToken,
		"Expiration": time.Now().Add(time.Hour).UTC().Format(time.RFC3339)})
	f.creds.Store(string(doc))
	mux := http.NewServeMux()
	mux.HandleFunc("PUT /latest/api/token", func(w http.ResponseWriter, r *http.Request) { _, _ = io.WriteString(w, "t") })
	check := func(h http.HandlerFunc) http.HandlerFunc {
		return func(w http.ResponseWriter, r *http.Request) {
			if r.Header.Get("X-aws-ec2-metadata-token") != "t" {
				http.Error(w, "", http.StatusUnauthorized)
				return
			}
			h(w, r)
		}
	}
	mux.HandleFunc("GET /latest/meta-data/iam/security-credentials/", check(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.WriteString(w, "app-host")
	}))
	mux.HandleFunc("GET /latest/meta-data/iam/security-credentials/app-host", check(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.WriteString(w, f.creds.Load().(string))
	}))
	mux.HandleFunc("GET /latest/meta-data/placement/region", check(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.WriteString(w, "us-east-1")
	}))
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	return srv.URL
}

// TestURLAWSIAM runs the aws_iam method against the real issuer (package
// issuer, in process) and the STS fake: the daemon signs
// sts:GetCallerIdentity with the instance profile's credentials from IMDS,
// the issuer forwards it to STS and mints the workload's token.
func TestURLAWSIAM(t *testing.T) {
	iss := oidc.Start(t)
	sts := fakests.Start(t, fakests.Config{Issuer: iss})
	out, err := awssts.New(awssts.Options{Region: "us-east-1", BaseEndpoint: aws.String(sts.URL)}).AssumeRoleWithWebIdentity(context.Background(),
		&awssts.AssumeRoleWithWebIdentityInput{RoleArn: aws.String("arn:aws:iam::111111111111:role/app-host"),
			RoleSessionName: aws.String("i-0123456789abcdef0"), WebIdentityToken: aws.String(iss.Mint(oidc.Claims{}))})
	if err != nil {
		t.Fatal(err)
	}
	creds := aws.Credentials{AccessKeyID: *out.Credentials.AccessKeyId, SecretAccessKey: *out.Credentials.SecretAccessKey,
		SessionToken: *out.Credentials.SessionToken}

	dir := t.TempDir()
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	der, _ := x509.MarshalPKCS8PrivateKey(k)
	keyFile := filepath.Join(dir, "k.pem")
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := issuer.ParseConfig([]byte(`listen: 127.0.0.1:0
issuer: https://oidc.example.com/imds
signing: {keys: [{file: "` + keyFile + `"}]}
attestation:
  aws_iam: {sts_endpoints: ["` + sts.URL + `"]}
policy:
  - match: {accounts: ["111111111111"], instance_profiles: [app-host]}
    subjects: [app, billing]
`))
	if err != nil {
		t.Fatal(err)
	}
	srv, err := issuer.New(context.Background(), cfg, issuer.Options{Registerer: prometheus.NewRegistry(),
		AWSConfig: func(context.Context) (aws.Config, error) { return aws.Config{Region: "us-east-1"}, nil }})
	if err != nil {
		t.Fatal(err)
	}
	hs := httptest.NewServer(srv.Handler())
	t.Cleanup(hs.Close)

	core, logs := newObserver()
	u, err := NewURL(hs.URL+issuer.PathToken, URLOptions{IMDSBase: startIAMIMDS(t, creds), Method: URLMethodIAM,
		IAM: URLIAMOptions{Issuer: "https://oidc.example.com/imds", STSEndpoint: sts.URL}}, core, nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"app", "billing"} {
		src := u // the rule's first subject
		if want != "app" {
			src = mustFor(t, u, want)
		}
		tok, err := src.Token(context.Background())
		if err != nil {
			t.Fatalf("%s: %v", want, err)
		}
		if c, _ := ParseClaims(tok); c.Subject != want {
			t.Fatalf("sub %q, want %s", c.Subject, want)
		}
	}
	if n := sts.CallCount(fakests.ActionGetCallerIdentity); n != 2 {
		t.Fatalf("GetCallerIdentity calls %d", n)
	}

	// An issuer identifier other than the issuer's: refused, and the error
	// quotes no credential.
	u2, _ := NewURL(hs.URL+issuer.PathToken, URLOptions{IMDSBase: startIAMIMDS(t, creds), Method: URLMethodIAM,
		IAM: URLIAMOptions{Issuer: "https://elsewhere.example.com", STSEndpoint: sts.URL}}, core, nil)
	_, err = u2.Token(context.Background())
	if err == nil || !strings.Contains(err.Error(), "issuer_header") {
		t.Fatalf("wrong issuer identifier: %v", err)
	}
	for _, secret := range []string{creds.SecretAccessKey, creds.SessionToken[:40]} {
		if strings.Contains(err.Error(), secret) || strings.Contains(logText(logs), secret) {
			t.Fatal("a credential was quoted")
		}
	}
}
