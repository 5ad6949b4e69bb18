package issuer

import (
	"bytes"
	"context"
	"net/http"
	"strings"
	"testing"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials"
	awssts "github.com/aws/aws-sdk-go-v2/service/sts"

	fakes3 "github.com/imdsproxy/imdsproxy/test/fakes/s3"
	fakests "github.com/imdsproxy/imdsproxy/test/fakes/sts"
)

func TestPublish(t *testing.T) {
	s3 := fakes3.Start(t)
	s3.CreateBucket("oidc-docs")
	s3.AllowSigned("AKIAPUBLISHER0000000", "publisher-secret", "")
	yaml := strings.Replace(baseYAML, `    - {file: "KEY1"}`, "    - {file: \"KEY1\"}\n    - {file: \"RSAKEY\"}", 1) +
		"publish: {bucket: oidc-docs, prefix: /imds/, region: us-east-1, endpoint: \"" + s3.URL + "\", path_style: true, cache_control: \"public, max-age=60\"}\n"
	e := newEnv(t, yaml)
	creds := func(ctx context.Context) (aws.Config, error) {
		c, _ := testAWSConfig("")(ctx)
		c.Credentials = credentials.NewStaticCredentialsProvider("AKIAPUBLISHER0000000", "publisher-secret", "")
		return c, nil
	}
	out, err := PublishDocuments(context.Background(), e.cfg, creds)
	if err != nil {
		t.Fatal(err)
	}
	if len(out) != 2 || out[0].Key != "imds/.well-known/jwks.json" || out[1].Key != "imds/.well-known/openid-configuration" {
		t.Fatalf("published %+v", out)
	}
	for _, p := range []string{PathJWKS, PathDiscovery} {
		o, ok := s3.Object("oidc-docs", S3Key("/imds/", p))
		_, served := e.get(p)
		if !ok || !bytes.Equal(o.Body, served) || o.ContentType != "application/json" || o.CacheControl != "public, max-age=60" {
			t.Fatalf("%s: stored %q (%s, %s), served %q", p, o.Body, o.ContentType, o.CacheControl, served)
		}
	}
	for _, c := range s3.CallLog() {
		if c.Method != http.MethodPut || !c.SignatureValid || c.Status != http.StatusOK {
			t.Fatalf("S3 call %+v", c)
		}
	}
	// A token minted now verifies with the published JWKS.
	_, res := e.post(iidRequest(t, ""))
	o, _ := s3.Object("oidc-docs", "imds/.well-known/jwks.json")
	verifyWithJWKS(t, res["token"], o.Body)

	// Credentials S3 refuses: an error naming the object.
	bad := func(ctx context.Context) (aws.Config, error) {
		c, _ := testAWSConfig("")(ctx)
		c.Credentials = credentials.NewStaticCredentialsProvider("AKIAPUBLISHER0000000", "wrong", "")
		return c, nil
	}
	if _, err := PublishDocuments(context.Background(), e.cfg, bad); err == nil || !strings.Contains(err.Error(), "s3://oidc-docs/imds/.well-known/jwks.json") {
		t.Fatalf("publish with a wrong secret: %v", err)
	}
}

func TestS3Key(t *testing.T) {
	for _, tc := range []struct{ prefix, want string }{
		{"", ".well-known/jwks.json"}, {"imds", "imds/.well-known/jwks.json"}, {"/a/b/", "a/b/.well-known/jwks.json"},
	} {
		if got := S3Key(tc.prefix, PathJWKS); got != tc.want {
			t.Errorf("S3Key(%q) = %q, want %q", tc.prefix, got, tc.want)
		}
	}
}

// TestSTSTrustsPublishedIssuer is the whole federation: the issuer
// publishes its discovery document and JWKS to S3 (served publicly, as a
// CDN would), STS finds them from the token's iss, verifies the token,
// applies each workload role's trust policy and passes the session tags.
func TestSTSTrustsPublishedIssuer(t *testing.T) {
	s3 := fakes3.Start(t)
	s3.CreateBucket("oidc")
	s3.SetPublicRead("oidc", true)
	s3.AllowSigned("AKIAPUBLISHER0000000", "publisher-secret", "")
	issuerURL := s3.URL + "/oidc/imds"
	yaml := strings.Replace(baseYAML, "https://oidc.example.com/imds", issuerURL, 1) +
		"publish: {bucket: oidc, prefix: imds, region: us-east-1, endpoint: \"" + s3.URL + "\", path_style: true}\n"
	e := newEnv(t, yaml)
	creds := func(ctx context.Context) (aws.Config, error) {
		c, _ := testAWSConfig("")(ctx)
		c.Credentials = credentials.NewStaticCredentialsProvider("AKIAPUBLISHER0000000", "publisher-secret", "")
		return c, nil
	}
	if _, err := PublishDocuments(context.Background(), e.cfg, creds); err != nil {
		t.Fatal(err)
	}
	sts := fakests.Start(t, fakests.Config{IssuerURL: issuerURL})
	appRole, billingRole := "arn:aws:iam::222222222222:role/app", "arn:aws:iam::222222222222:role/billing"
	sts.SetTrust(appRole, fakests.Trust{Subjects: []string{"app"}, TagSession: true})
	sts.SetTrust(billingRole, fakests.Trust{Subjects: []string{"billing"}, TagSession: true})
	client := awssts.New(awssts.Options{Region: "us-east-1", BaseEndpoint: aws.String(sts.URL)})
	assume := func(role, workload string) error {
		status, out := e.post(iidRequest(t, workload))
		if status != 200 {
			t.Fatalf("mint %s: %d %v", workload, status, out)
		}
		_, err := client.AssumeRoleWithWebIdentity(context.Background(), &awssts.AssumeRoleWithWebIdentityInput{
			RoleArn: aws.String(role), RoleSessionName: aws.String(testInstance), WebIdentityToken: aws.String(out["token"])})
		return err
	}
	if err := assume(appRole, "app"); err != nil {
		t.Fatalf("app role with the app token: %v", err)
	}
	if err := assume(billingRole, "billing"); err != nil {
		t.Fatalf("billing role with the billing token: %v", err)
	}
	if err := assume(billingRole, "app"); err == nil || !strings.Contains(err.Error(), "AccessDenied") {
		t.Fatalf("billing role with the app token: %v", err)
	}
	last, _ := sts.Last()
	if last.Subject != "billing" || last.Tags["team"] != "billing" || last.Tags["host"] != testInstance ||
		last.Tags["workload"] != "billing" || len(last.TransitiveTagKeys) != 1 {
		t.Fatalf("issued %+v", last)
	}
}
