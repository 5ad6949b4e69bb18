package test

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/credentials/ec2rolecreds"

	"github.com/imdsproxy/imdsproxy/test/e2e"
	"github.com/imdsproxy/imdsproxy/test/fakes/sts"
)

// The upstream instance profile of these tests.
const (
	ipUpstreamRole       = "instance-role"
	ipUpstreamInstanceID = "i-0aaaabbbbccccdddd"
	ipUpstreamAccount    = "111111111111"
)

// ipUpstream is a stand-in for the real IMDS that serves VALID
// instance-profile credentials (amazon-ec2-metadata-mock's expired in 2020):
// IMDSv2 only, the role listing, the credential document, iam/info and the
// instance id.
type ipUpstream struct {
	url     string
	key     string
	secret  string
	token   string
	expires time.Time

	mu        sync.Mutex
	tokens    map[string]time.Time
	credReads int
}

func startIPUpstream(t *testing.T) *ipUpstream {
	t.Helper()
	u := &ipUpstream{
		key:     "ASIAE2E" + strings.ToUpper(arRandB64(t, 12)[:13]),
		secret:  arRandB64(t, 30),
		token:   "IQoJb3JpZ2luX2VjEInstanceProfile" + arRandB64(t, 300),
		expires: time.Now().Add(6 * time.Hour).UTC().Truncate(time.Second),
		tokens:  map[string]time.Time{},
	}
	u.key = strings.NewReplacer("+", "A", "/", "B", "=", "C", "-", "D", "_", "E").Replace(u.key)
	mux := http.NewServeMux()
	mux.HandleFunc("PUT /latest/api/token", func(w http.ResponseWriter, r *http.Request) {
		ttl, err := strconv.Atoi(r.Header.Get("X-aws-ec2-metadata-token-ttl-seconds"))
		if err != nil || ttl < 1 || ttl > 21600 {
			http.Error(w, "bad ttl", http.StatusBadRequest)
			return
		}
		tok := arRandB64(t, 24)
		u.mu.Lock()
		u.tokens[tok] = time.Now().Add(time.Duration(ttl) * time.Second)
		u.mu.Unlock()
		w.Header().Set("X-aws-ec2-metadata-token-ttl-seconds", strconv.Itoa(ttl))
		_, _ = io.WriteString(w, tok)
	})
	serve := func(body func() string) http.HandlerFunc {
		return func(w http.ResponseWriter, r *http.Request) {
			u.mu.Lock()
			exp, ok := u.tokens[r.Header.Get("X-aws-ec2-metadata-token")]
			u.mu.Unlock()
			if !ok || time.Now().After(exp) {
				http.Error(w, "401 - Unauthorized", http.StatusUnauthorized)
				return
			}
			_, _ = io.WriteString(w, body())
		}
	}
	const p = "GET /latest/meta-data/"
	mux.HandleFunc(p+"iam/security-credentials/", serve(func() string { return ipUpstreamRole }))
	mux.HandleFunc(p+"iam/security-credentials/"+ipUpstreamRole, serve(func() string {
		u.mu.Lock()
		u.credReads++
		u.mu.Unlock()
		return ipCredentialDocument(u.key, u.secret, u.token, u.expires)
	}))
	mux.HandleFunc(p+"iam/info", serve(func() string {
		return ipInfoDocument()
	}))
	mux.HandleFunc(p+"instance-id", serve(func() string { return ipUpstreamInstanceID }))
	mux.HandleFunc(p+"placement/region", serve(func() string { return "us-east-1" }))
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	u.url = srv.URL
	return u
}

func arRandB64(t testing.TB, n int) string {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return base64.StdEncoding.EncodeToString(b)
}

func (u *ipUpstream) secrets() map[string]string {
	return map[string]string{
		"instance-profile SecretAccessKey": u.secret,
		"instance-profile Token":           u.token,
		"instance-profile Token (middle)":  u.token[len(u.token)/2-16 : len(u.token)/2+16],
	}
}

// arGoSDKCreds retrieves credentials through the daemon with aws-sdk-go-v2's
// default chain, in process.
func arGoSDKCreds(t *testing.T, e *daemonEnv) clientCreds {
	t.Helper()
	ctx := context.Background()
	cfg, err := config.LoadDefaultConfig(ctx,
		config.WithRegion("us-east-1"),
		config.WithEC2IMDSEndpoint(e.imdsURL),
		config.WithSharedConfigFiles([]string{e.emptyFile}),
		config.WithSharedCredentialsFiles([]string{e.emptyFile}),
	)
	if err != nil {
		t.Fatal(err)
	}
	c, err := cfg.Credentials.Retrieve(ctx)
	if err != nil {
		t.Fatalf("Retrieve: %v", err)
	}
	if c.Source != ec2rolecreds.ProviderName {
		t.Fatalf("credentials came from %q, not from IMDS", c.Source)
	}
	return clientCreds{c.AccessKeyID, c.SecretAccessKey, c.SessionToken, ""}
}

// arBoto3Creds retrieves credentials through the daemon with boto3.
func arBoto3Creds(t *testing.T, e *daemonEnv) clientCreds {
	t.Helper()
	const script = `import boto3, json
c = boto3.Session().get_credentials()
if c is None:
    raise SystemExit("boto3 found no credentials")
f = c.get_frozen_credentials()
print(json.dumps({"AccessKeyId": f.access_key, "SecretAccessKey": f.secret_key,
                  "SessionToken": f.token, "Method": c.method}))`
	b := runClient(t, e.dir, e.clientEnviron(), python3Path, "-c", script)
	var got struct {
		clientCreds
		Method string
	}
	if err := json.Unmarshal(b, &got); err != nil {
		t.Fatalf("boto3 printed %q: %v", redactOutput(b), err)
	}
	if got.Method != "iam-role" {
		t.Fatalf("boto3 credential method %q, want iam-role (IMDS)", got.Method)
	}
	return got.clientCreds
}

// arListing GETs the daemon's role listing.
func (e *daemonEnv) arListing(t *testing.T) string {
	t.Helper()
	ctx := context.Background()
	tok, err := e2e.IMDSToken(ctx, e2e.Client, e.imdsURL, 300)
	if err != nil {
		t.Fatal(err)
	}
	st, body, err := e2e.IMDSGet(ctx, e2e.Client, e.imdsURL, "/latest/meta-data/iam/security-credentials/", tok)
	if err != nil || st != http.StatusOK {
		t.Fatalf("listing: %d %v", st, err)
	}
	return body
}

// TestAssumeRoleFromInstanceProfile: the daemon signs sts:AssumeRole with the
// upstream's instance-profile credentials (SigV4, verified by the fake with
// the secret) and serves the assumed role's credentials to real clients.
func TestAssumeRoleFromInstanceProfile(t *testing.T) {
	t.Parallel()
	up := startIPUpstream(t)
	e := startDaemon(t, envOptions{
		upstreamURL: up.url,
		identityYAML: func(e *daemonEnv) string {
			// The fake STS must know the base key before the daemon's first
			// exchange.
			e.sts.AllowBaseSession(up.key, up.secret, up.token)
			e.sts.RequireExternalID("ext-123")
			return fmt.Sprintf(`role: {arn: %q, name: %s, duration: 1h}
source: assume-role
assume_role:
  base: instance-profile
  external_id: "ext-123"
  source_identity: "host-1"
  tags: {team: payments, env: prod}
`, e2e.RoleARN, e2e.RoleName)
		},
		extraSecrets: up.secrets,
	})

	t.Run("aws-sdk-go-v2", func(t *testing.T) {
		e.assertExactlyIssued(t, "aws-sdk-go-v2 default chain", arGoSDKCreds(t, e))
	})
	t.Run("boto3", func(t *testing.T) {
		requireClient(t, python3Path, "python3 with boto3 (Debian package python3-boto3)")
		e.assertExactlyIssued(t, "boto3", arBoto3Creds(t, e))
	})

	if got := e.arListing(t); got != e2e.RoleName {
		t.Errorf("listing %q, want %q", got, e2e.RoleName)
	}
	last, _ := e.sts.Last()
	if last.Action != sts.ActionAssumeRole || last.BaseAccessKeyID != up.key || last.ExternalID != "ext-123" ||
		last.SourceIdentity != "host-1" || len(last.Tags) != 2 || last.Tags["team"] != "payments" || last.Tags["env"] != "prod" ||
		last.RoleARN != e2e.RoleARN || last.DurationSeconds != 3600 {
		t.Errorf("STS issued %+v", arRedactIssued(last))
	}
	if last.RoleSessionName != ipUpstreamInstanceID {
		t.Errorf("RoleSessionName %q, want the upstream's instance id %q", last.RoleSessionName, ipUpstreamInstanceID)
	}
	calls := e.sts.CallLog()
	if len(calls) == 0 {
		t.Fatal("no STS call")
	}
	for _, c := range calls {
		if c.Action != sts.ActionAssumeRole || c.AccessKeyID != up.key || !c.SignatureValid || c.Status != http.StatusOK {
			t.Errorf("STS call %+v: want a valid AssumeRole signed by the instance-profile key %s", c, up.key)
		}
	}
}

// TestInstanceProfileSource: the daemon lists the upstream's role and serves
// exactly the upstream's instance-profile credentials, without STS.
func TestInstanceProfileSource(t *testing.T) {
	t.Parallel()
	up := startIPUpstream(t)
	e := startDaemon(t, envOptions{
		upstreamURL: up.url,
		identityYAML: func(e *daemonEnv) string {
			return "source: instance-profile\nrole: {name: \"\"}\n"
		},
		extraSecrets: up.secrets,
	})
	exact := func(t *testing.T, client string, got clientCreds) {
		t.Helper()
		if got.AccessKeyId != up.key || got.SecretAccessKey != up.secret || got.SessionToken != up.token {
			t.Fatalf("%s got access key id %q (upstream's is %q) or a different secret/token", client, got.AccessKeyId, up.key)
		}
	}
	t.Run("aws-sdk-go-v2", func(t *testing.T) { exact(t, "aws-sdk-go-v2", arGoSDKCreds(t, e)) })
	t.Run("boto3", func(t *testing.T) {
		requireClient(t, python3Path, "python3 with boto3 (Debian package python3-boto3)")
		exact(t, "boto3", arBoto3Creds(t, e))
	})

	if got := e.arListing(t); got != ipUpstreamRole {
		t.Errorf("listing %q, want the upstream's role %q", got, ipUpstreamRole)
	}
	ctx := context.Background()
	tok, err := e2e.IMDSToken(ctx, e2e.Client, e.imdsURL, 300)
	if err != nil {
		t.Fatal(err)
	}
	st, body, err := e2e.IMDSGet(ctx, e2e.Client, e.imdsURL, "/latest/meta-data/iam/security-credentials/"+ipUpstreamRole, tok)
	if err != nil || st != http.StatusOK {
		t.Fatalf("credential document: %d %v", st, err)
	}
	var d e2e.CredDoc
	if err := json.Unmarshal([]byte(body), &d); err != nil || d.Code != "Success" || d.AccessKeyId != up.key ||
		d.Expiration != up.expires.Format(time.RFC3339) || !wireTime.MatchString(d.LastUpdated) {
		t.Errorf("credential document Code %q key %q Expiration %q (upstream %s) LastUpdated %q: %v",
			d.Code, d.AccessKeyId, d.Expiration, up.expires.Format(time.RFC3339), d.LastUpdated, err)
	}
	st, body, err = e2e.IMDSGet(ctx, e2e.Client, e.imdsURL, "/latest/meta-data/iam/security-credentials-extended/"+ipUpstreamRole, tok)
	if err == nil && st == http.StatusOK {
		var ext struct{ AccountId string } //nolint:revive // wire name
		if json.Unmarshal([]byte(body), &ext) != nil || ext.AccountId != ipUpstreamAccount {
			t.Errorf("extended document AccountId %q, want %s (from upstream iam/info)", ext.AccountId, ipUpstreamAccount)
		}
	}
	if n := e.sts.Calls(); n != 0 {
		t.Errorf("%d STS calls for source instance-profile", n)
	}
	up.mu.Lock()
	reads := up.credReads
	up.mu.Unlock()
	if reads == 0 {
		t.Error("the upstream's credential document was never read")
	}
}

// arRedactIssued hides the secrets of an Issued for failure messages.
func arRedactIssued(is sts.Issued) sts.Issued {
	is.SecretAccessKey, is.SessionToken, is.WebIdentityToken = "<redacted>", "<redacted>", "<redacted>"
	return is
}

// ipCredentialDocument is the real IMDS's credential document of the
// instance profile, in EC2's format.
func ipCredentialDocument(key, secret, token string, expires time.Time) string {
	return fmt.Sprintf(`{
  "Code" : "Success",
  "LastUpdated" : "%s",
  "Type" : "AWS-HMAC",
  "AccessKeyId" : "%s",
  "SecretAccessKey" : "%s",
  "Token" : "%s",
  "Expiration" : "%s"
}`, time.Now().UTC().Format(time.RFC3339), key, secret, token, expires.Format(time.RFC3339))
}

// ipInfoDocument is the real IMDS's iam/info of the instance profile.
func ipInfoDocument() string {
	return `{
  "Code" : "Success",
  "LastUpdated" : "` + time.Now().UTC().Format(time.RFC3339) + `",
  "InstanceProfileArn" : "arn:aws:iam::` + ipUpstreamAccount + `:instance-profile/web",
  "InstanceProfileId" : "AIPAE2EEXAMPLEEXAMPLE"
}`
}
