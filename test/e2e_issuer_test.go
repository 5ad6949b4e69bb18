package test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	awssts "github.com/aws/aws-sdk-go-v2/service/sts"
	"github.com/aws/smithy-go"

	"github.com/imdsproxy/imdsproxy/test/e2e"
	fakeec2 "github.com/imdsproxy/imdsproxy/test/fakes/ec2"
	"github.com/imdsproxy/imdsproxy/test/fakes/instance"
	fakes3 "github.com/imdsproxy/imdsproxy/test/fakes/s3"
	"github.com/imdsproxy/imdsproxy/test/fakes/sts"
)

// The whole chain of the issuer model, every piece a real process but STS
// and EC2: the daemon (bin/imdsproxy, identity.jwt_url) attests a stand-in
// instance (test/fakes/instance, served by amazon-ec2-metadata-mock) to
// bin/imdsproxy-issuer, which mints a token per workload; the fake STS
// verifies each token as AWS STS does, fetching the discovery document and
// JWKS from where `imdsproxy-issuer publish` put them (a public bucket of
// the S3 fake, standing for the CDN), checking kid, alg, signature, iss,
// aud and exp, and applying a trust policy per role (sub, sts:TagSession);
// real clients (AWS CLI, boto3, aws-sdk-go-v2) get what it issued.

// subjects and the roles trusting exactly one of them each. The host's own
// role (e2e.RoleARN, served to every process no workload matches) trusts
// the issuer's default subject, hostSubject.
const hostSubject = "app"

// The issuer's own AWS credentials (EC2, KMS, S3 publishing): dummies the
// fakes accept.
const (
	issuerKeyID  = "AKIAISSUEREXAMPLE000"
	issuerSecret = "issuer-dummy-secret-key"
)

var chainTrust = map[string]string{e2e.RoleARN: hostSubject, billingARN: "billing", reportsARN: "reports"}

// chainOptions configure startChain.
type chainOptions struct {
	// attestation is identity.attestation: aws_iid (the default) or aws_iam.
	attestation string
	// keys are the signing.keys entries, YAML flow mappings; nil is one
	// ES256 file key generated for the test.
	keys []string
	// issuerEnv is added to the issuer's environment.
	issuerEnv []string
	// tokenTTL is tokens.ttl; 0 is 1h.
	tokenTTL time.Duration
	// ec2CacheTTL is attestation.ec2.cache_ttl and negative_cache_ttl; 0
	// leaves the defaults.
	ec2CacheTTL time.Duration
	// sessionLength makes the fake STS issue sessions this long.
	sessionLength time.Duration
	// noWorkloads leaves workloads: out of the daemon's config; else
	// billing (billingUID) and reports (reportsUID) with their subjects.
	noWorkloads bool
}

// chain is one daemon → issuer → STS chain.
type chain struct {
	*daemonEnv
	t    *testing.T
	o    chainOptions
	inst *e2e.Instance
	ec2  *fakeec2.Server
	s3   *fakes3.Server // the "CDN" the issuer publishes to
	iss  *issuerProc
	// workloads is the daemon's workloads: section (SIGHUP re-renders).
	workloads string
}

// issuerProc is a running bin/imdsproxy-issuer. Its documents are
// published (imdsproxy-issuer publish) to a public bucket of the S3 fake,
// which stands for the CDN: the issuer identifier (iss) is that bucket's
// URL, and STS reads the discovery document and JWKS from there.
type issuerProc struct {
	// addr and listen are the listener (host:port, http://host:port): the
	// token endpoint. id is the issuer identifier, the published URL.
	dir, addr, listen, id, cfgPath string
	env                            []string
	render                         func(keys []string) string
	proc                           *e2e.Process
	log                            *e2e.LockedBuffer
	keyPEMs                        [][]byte // private keys of file keys: never to be logged
}

// newES256KeyFile writes a new P-256 key, PKCS #8 PEM, mode 0600.
func newES256KeyFile(t *testing.T, dir, name string) (string, []byte) {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		t.Fatal(err)
	}
	b := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return p, b
}

func writeFile(t *testing.T, path, content string, mode os.FileMode) {
	t.Helper()
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(content), mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

// startChain starts the fake STS and EC2, the stand-in instance, the
// issuer and the daemon, and waits until the daemon is ready.
func startChain(t *testing.T, o chainOptions) *chain {
	t.Helper()
	requireAEMMBinary(t)
	if o.attestation == "" {
		o.attestation = "aws_iid"
	}
	if o.tokenTTL == 0 {
		o.tokenTTL = time.Hour
	}
	c := &chain{t: t, o: o, iss: &issuerProc{dir: t.TempDir(), log: &e2e.LockedBuffer{}}}
	port, err := e2e.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	c.iss.addr = fmt.Sprintf("127.0.0.1:%d", port)
	c.iss.listen = "http://" + c.iss.addr
	c.s3 = fakes3.Start(t)
	c.s3.CreateBucket("oidc")
	c.s3.SetPublicRead("oidc", true)
	c.s3.AllowSigned(issuerKeyID, issuerSecret, "")
	c.iss.id = c.s3.URL + "/oidc/imds"

	// STS trusts the issuer by its URL, as an IAM OIDC provider does, and
	// each role exactly one subject.
	fake := sts.Start(t, sts.Config{IssuerURL: c.iss.id, RoleARN: e2e.RoleARN})
	for role, sub := range chainTrust {
		fake.SetTrust(role, sts.Trust{Subjects: []string{sub}, TagSession: true})
	}
	c.inst, err = e2e.StartInstance(fake, instance.Options{}, 12*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.inst.Stop)
	c.ec2 = fakeec2.Start(t)
	c.ec2.Put(c.inst.Region, fakeec2.Instance{ID: c.inst.InstanceID, State: "running", LaunchTime: c.inst.PendingTime,
		InstanceProfileARN: c.inst.InstanceProfileARN(), AvailabilityZone: c.inst.AvailabilityZone})

	ca := filepath.Join(c.iss.dir, "iid-ca.pem")
	if err := c.inst.CA.WriteCert(ca); err != nil {
		t.Fatal(err)
	}
	keys := o.keys
	if keys == nil {
		p, b := newES256KeyFile(t, c.iss.dir, "signing-1.pem")
		c.iss.keyPEMs = append(c.iss.keyPEMs, b)
		keys = []string{fmt.Sprintf("{file: %q}", p)}
	}
	ec2Cache := ""
	if o.ec2CacheTTL > 0 {
		ec2Cache = fmt.Sprintf("\n    cache_ttl: %s\n    negative_cache_ttl: %s", o.ec2CacheTTL, o.ec2CacheTTL)
	}
	c.iss.render = func(keys []string) string {
		return fmt.Sprintf(`listen: %s
issuer: %s
signing:
  keys:
    - %s
attestation:
  aws_iid:
    certificates: [%q]
    verify_instance: true
    max_instance_age: 24h
  aws_iam:
    sts_endpoints: [%q]
    verify_instance: true
  ec2:
    endpoint: %s%s
tokens: {audience: sts.amazonaws.com, ttl: %s}
policy:
  - name: hosts
    match: {accounts: [%q], regions: [%s], instance_profiles: [%s]}
    subjects: [%s, billing, reports]
    principal_tags: {workload: "{workload}", instance: "{instanceId}", account: "{accountId}", region: "{region}"}
    transitive_tag_keys: [workload]
rate_limit: {per_host_per_minute: 0}
publish: {bucket: oidc, prefix: imds, region: us-east-1, endpoint: %q, path_style: true}
`, c.iss.addr, c.iss.id, strings.Join(keys, "\n    - "), ca, fake.URL, c.ec2.URL, ec2Cache, o.tokenTTL,
			c.inst.AccountID, c.inst.Region, c.inst.ProfileRole, hostSubject, c.s3.URL)
	}
	c.iss.cfgPath = filepath.Join(c.iss.dir, "issuer.yaml")
	writeFile(t, c.iss.cfgPath, c.iss.render(keys), 0o600)
	empty := filepath.Join(c.iss.dir, "empty")
	writeFile(t, empty, "", 0o600)
	c.iss.env = append(append(e2e.Environ("HOME"), "HOME="+c.iss.dir, "NO_PROXY=*", "no_proxy=*",
		// Credentials of the issuer itself (EC2, KMS, S3): dummies the fakes accept.
		"AWS_REGION=us-east-1", "AWS_ACCESS_KEY_ID="+issuerKeyID, "AWS_SECRET_ACCESS_KEY="+issuerSecret,
		"AWS_EC2_METADATA_DISABLED=true", "AWS_CONFIG_FILE="+empty, "AWS_SHARED_CREDENTIALS_FILE="+empty), o.issuerEnv...)
	c.publish(t)
	c.iss.proc, err = e2e.StartIssuer(e2e.IssuerOptions{Config: c.iss.cfgPath, Addr: c.iss.addr, Dir: c.iss.dir,
		Env: c.iss.env, Out: c.iss.log})
	if err != nil {
		t.Fatalf("%v\n%s", err, c.iss.log)
	}
	t.Cleanup(func() { c.stopIssuer(t) })

	if !o.noWorkloads {
		c.workloads = fmt.Sprintf(`workloads:
  - {uid: %d, subject: billing, role: {arn: %q, name: billing, duration: 1h}}
  - {uid: %d, subject: reports, role: {arn: %q, name: reports, duration: 1h}}
`, billingUID, billingARN, reportsUID, reportsARN)
	}
	c.daemonEnv = startDaemon(t, envOptions{sts: fake, sessionLength: o.sessionLength, upstreamURL: c.inst.AEMM.URL,
		identityYAML: c.identityYAML, extraSecrets: c.secrets})
	return c
}

// identityYAML is the daemon's role:, source:, identity: and workloads:.
func (c *chain) identityYAML(*daemonEnv) string {
	issuer := ""
	if c.o.attestation == "aws_iam" {
		issuer = "\n  issuer: " + c.iss.id
	}
	return fmt.Sprintf(`role: {arn: %q, name: %s, duration: 1h}
source: web-identity
identity:
  jwt_url: %s/v1/token
  attestation: %s%s
  insecure_http: true
  timeout: 5s
%s`, e2e.RoleARN, e2e.RoleName, c.iss.listen, c.o.attestation, issuer, c.workloads)
}

// secrets are the chain's secrets beyond the daemon's own: the instance
// profile's credentials (issued by the fake too, so also among the daemon's)
// and the issuer's private keys.
func (c *chain) secrets() map[string]string {
	out := map[string]string{}
	for i, k := range c.iss.keyPEMs {
		block, _ := pem.Decode(k)
		out[fmt.Sprintf("signing key #%d", i)] = base64.StdEncoding.EncodeToString(block.Bytes)[16:64]
	}
	return out
}

// stopIssuer stops the issuer (it must exit 0 on SIGTERM) and checks its
// log holds no secret.
func (c *chain) stopIssuer(t *testing.T) {
	if code := c.iss.proc.Stop(10 * time.Second); code != 0 {
		t.Errorf("imdsproxy-issuer exited %d on SIGTERM", code)
	}
	log := c.iss.log.String()
	if c.daemonEnv != nil {
		c.assertNoSecrets(t, "issuer log", log)
	}
	for i, tok := range c.sts.WebIdentityTokens() {
		if strings.Contains(log, tok[strings.LastIndexByte(tok, '.')+1:]) {
			t.Errorf("issuer log holds the token #%d presented to STS", i)
		}
	}
	if strings.Contains(log, strings.Join(strings.Fields(c.inst.PKCS7), "")[40:120]) {
		t.Error("issuer log holds the pkcs7 signature")
	}
	if t.Failed() {
		t.Logf("issuer log (tail):\n%s", e2e.TailLines(log, 60))
	}
}

// requireAEMMBinary fails (or skips with IMDSPROXY_E2E_ALLOW_MISSING=1)
// without amazon-ec2-metadata-mock, the stand-in instance's server.
func requireAEMMBinary(t *testing.T) {
	t.Helper()
	if _, err := os.Stat(e2e.AEMMBinary()); err == nil {
		return
	}
	msg := "amazon-ec2-metadata-mock serves the stand-in instance; `make test` installs it"
	if os.Getenv("IMDSPROXY_E2E_ALLOW_MISSING") == "1" {
		t.Skip(msg)
	}
	t.Fatal(msg)
}

// issuerToken asks the issuer directly for a token for workload ("": the
// default subject), attesting with a signed document, as a process holding
// a copy of the stand-in's could. It returns the status and the token or
// the error body.
func (c *chain) issuerToken(t *testing.T, doc, pkcs7, workload string) (int, string) {
	t.Helper()
	st, body, err := postToken(c.iss.listen, doc, pkcs7, workload)
	if err != nil {
		t.Fatal(err)
	}
	return st, body
}

// postToken is issuerToken for any goroutine: errors are returned.
func postToken(issuerURL, doc, pkcs7, workload string) (int, string, error) {
	req := map[string]string{"document": doc, "pkcs7": strings.Join(strings.Fields(pkcs7), "")}
	if workload != "" {
		req["workload"] = workload
	}
	b, _ := json.Marshal(req)
	resp, err := e2e.Client.Post(issuerURL+"/v1/token", "application/json", bytes.NewReader(b))
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return 0, "", err
	}
	if resp.StatusCode != http.StatusOK {
		return resp.StatusCode, string(body), nil
	}
	var out struct{ Token string }
	if err := json.Unmarshal(body, &out); err != nil || out.Token == "" {
		return 0, "", errors.New("issuer answered 200 without a token")
	}
	return resp.StatusCode, out.Token, nil
}

// jwksKids lists the kids of the JWKS the issuer serves, in order.
func (c *chain) jwksKids(t testing.TB) []string {
	t.Helper()
	return kidsAt(t, c.iss.listen+"/.well-known/jwks.json")
}

// publishedKids lists the kids of the published JWKS (what STS reads).
func (c *chain) publishedKids(t testing.TB) []string {
	t.Helper()
	return kidsAt(t, c.iss.id+"/.well-known/jwks.json")
}

func kidsAt(t testing.TB, url string) []string {
	t.Helper()
	st, body, err := e2e.GetURL(url)
	if err != nil || st != http.StatusOK {
		t.Fatalf("GET %s: %d %v", url, st, err)
	}
	var set struct{ Keys []struct{ Kid string } }
	if err := json.Unmarshal([]byte(body), &set); err != nil {
		t.Fatal(err)
	}
	var kids []string
	for _, k := range set.Keys {
		kids = append(kids, k.Kid)
	}
	return kids
}

// publish runs `imdsproxy-issuer publish` with the issuer's config and
// environment: the JWKS and the discovery document go to the bucket.
func (c *chain) publish(t *testing.T) {
	t.Helper()
	bin, err := e2e.IssuerBinary()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, "publish", "--config", c.iss.cfgPath)
	cmd.Dir, cmd.Env = c.iss.dir, c.iss.env
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("imdsproxy-issuer publish: %v\n%s", err, out)
	}
}

// stsClient is an aws-sdk-go-v2 STS client of the fake, anonymous (as
// AssumeRoleWithWebIdentity is), without retries.
func (c *chain) stsClient() *awssts.Client {
	return awssts.New(awssts.Options{Region: "us-east-1", BaseEndpoint: aws.String(c.sts.URL),
		RetryMaxAttempts: 1, HTTPClient: e2e.Client})
}

func apiErrorCode(err error) string {
	var ae smithy.APIError
	if errors.As(err, &ae) {
		return ae.ErrorCode()
	}
	return ""
}

// credDigest is what test clients print instead of the secret and the
// session token (imdsclient creds, the boto3 script).
func credDigest(secret, token string) string {
	sum := sha256.Sum256([]byte(secret + "\x00" + token))
	return hex.EncodeToString(sum[:])
}

// botoDigestScript prints the AccessKeyId boto3's default chain resolves and the
// digest of its secret and session token.
const botoDigestScript = `import boto3, hashlib, json
c = boto3.session.Session().get_credentials().get_frozen_credentials()
print(json.dumps({"AccessKeyId": c.access_key,
                  "SecretDigest": hashlib.sha256((c.secret_key + "\0" + c.token).encode()).hexdigest()}))
`

// clientGot is what one client resolved.
type clientGot struct {
	client, key, digest string
}

// resolveAll runs the AWS CLI, boto3 and aws-sdk-go-v2 (imdsclient) as uid
// against the daemon.
func (c *chain) resolveAll(t *testing.T, homes *uidHomes, uid int) []clientGot {
	t.Helper()
	var got []clientGot
	out, err := homes.runAs(t, c.daemonEnv, uid, awsCLIPath, "configure", "export-credentials", "--format", "process")
	if err != nil {
		t.Fatal(err)
	}
	var cli struct{ AccessKeyId, SecretAccessKey, SessionToken string } //nolint:revive // wire names
	if err := json.Unmarshal(out, &cli); err != nil {
		t.Fatalf("aws configure export-credentials as uid %d printed something else: %v", uid, err)
	}
	got = append(got, clientGot{"AWS CLI", cli.AccessKeyId, credDigest(cli.SecretAccessKey, cli.SessionToken)})
	imdsclient, err := e2e.Tool("./test/fakes/cmd/imdsclient")
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range []struct{ name, bin string }{{"boto3", python3Path}, {"aws-sdk-go-v2", imdsclient}} {
		args := []string{"creds"}
		if p.name == "boto3" {
			args = []string{"-c", botoDigestScript}
		}
		out, err := homes.runAs(t, c.daemonEnv, uid, p.bin, args...)
		if err != nil {
			t.Fatal(err)
		}
		var r struct{ AccessKeyId, SecretDigest string } //nolint:revive // wire names
		if err := json.Unmarshal(out, &r); err != nil {
			t.Fatalf("%s as uid %d printed %q: %v", p.name, uid, out, err)
		}
		got = append(got, clientGot{p.name, r.AccessKeyId, r.SecretDigest})
	}
	return got
}

// checkIssued checks that every client got exactly a credential the fake
// STS issued for role, assumed with a token of subject sub signed by a key
// the issuer published, carrying the policy's session tags.
func (c *chain) checkIssued(t *testing.T, got []clientGot, role, sub string) {
	t.Helper()
	kids := c.publishedKids(t)
	for _, g := range got {
		is, ok := c.sts.Find(g.key)
		switch {
		case !ok:
			t.Errorf("%s got access key id %q, which STS never issued", g.client, g.key)
			continue
		case credDigest(is.SecretAccessKey, is.SessionToken) != g.digest:
			t.Errorf("%s got %s with another secret or session token than STS issued", g.client, g.key)
		case is.Action != sts.ActionAssumeRoleWithWebIdentity || is.RoleARN != role || is.Subject != sub:
			t.Errorf("%s got %s: %s of %s for sub %q, want %s for sub %q", g.client, g.key, is.Action, is.RoleARN, is.Subject, role, sub)
		case !slices.Contains(kids, is.TokenKID) || is.TokenAlg != "ES256" && is.TokenAlg != "RS256":
			t.Errorf("%s got %s assumed with a token of kid %q alg %s; the issuer publishes %v", g.client, g.key, is.TokenKID, is.TokenAlg, kids)
		}
		want := map[string]string{"workload": sub, "instance": c.inst.InstanceID, "account": c.inst.AccountID, "region": c.inst.Region}
		if fmt.Sprint(is.Tags) != fmt.Sprint(want) || !slices.Equal(is.TransitiveTagKeys, []string{"workload"}) {
			t.Errorf("%s: session tags %v transitive %v, want %v transitive [workload]", g.client, is.Tags, is.TransitiveTagKeys, want)
		}
	}
}

// TestIssuerChain: with either attestation method, each workload's clients
// (the AWS CLI, boto3 and aws-sdk-go-v2, run as the workload's uid) get
// exactly the credentials the fake STS issued for the workload's role,
// assumed with a token of the workload's own subject whose session tags
// reached STS; every other process gets the host's role. One workload's
// token cannot assume another's role: a direct call with it is refused, and
// so is a daemon misconfigured to use it.
func TestIssuerChain(t *testing.T) {
	requireClient(t, awsCLIPath, "AWS CLI v2 (Debian package awscli)")
	requireClient(t, python3Path, "python3 with boto3 (Debian package python3-boto3)")
	if os.Geteuid() != 0 {
		t.Skip("running clients as other uids needs root")
	}
	t.Parallel()
	for _, method := range []string{"aws_iid", "aws_iam"} {
		t.Run(method, func(t *testing.T) {
			t.Parallel()
			c := startChain(t, chainOptions{attestation: method})
			homes := newUIDHomes(t)

			for _, w := range []struct {
				uid       int
				role, sub string
			}{
				{billingUID, billingARN, "billing"},
				{reportsUID, reportsARN, "reports"},
				{unmatchedUID, e2e.RoleARN, hostSubject},
			} {
				c.checkIssued(t, c.resolveAll(t, homes, w.uid), w.role, w.sub)
			}
			// The test process itself matches no workload either.
			d, err := c.fetchCreds(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			if err := c.checkServed(d); err != nil {
				t.Fatal(err)
			}
			c.checkIssued(t, []clientGot{{"IMDS client (host role)", d.AccessKeyId, credDigest(d.SecretAccessKey, d.Token)}}, e2e.RoleARN, hostSubject)

			// How the host proved itself: the issuer's metrics and, for
			// aws_iam, STS's GetCallerIdentity of the instance profile.
			m := issuerMetrics(t, c)
			for _, sub := range []string{hostSubject, "billing", "reports"} {
				if v, _ := m.Value("imdsproxy_issuer_tokens_minted_total", map[string]string{"subject": sub, "rule": "hosts"}); v < 1 {
					t.Errorf("no token minted for %s: %v", sub, v)
				}
			}
			gci := 0
			for _, call := range c.sts.CallLog() {
				if call.Action == sts.ActionGetCallerIdentity && call.Code == "" && call.SignatureValid &&
					call.AccessKeyID == c.inst.Credentials.AccessKeyID {
					gci++
				}
			}
			if method == "aws_iam" && gci < 3 {
				t.Errorf("aws_iam: %d GetCallerIdentity calls signed with the instance profile's credentials, want one per subject", gci)
			}
			if method == "aws_iid" && gci != 0 {
				t.Errorf("aws_iid: %d GetCallerIdentity calls", gci)
			}

			t.Run("a workload's token cannot assume another's role", func(t *testing.T) {
				st, tok := c.issuerToken(t, c.inst.Document, c.inst.PKCS7, "reports")
				if st != http.StatusOK {
					t.Fatalf("issuer: %d %s", st, tok)
				}
				_, err := c.stsClient().AssumeRoleWithWebIdentity(context.Background(), &awssts.AssumeRoleWithWebIdentityInput{
					RoleArn: aws.String(billingARN), RoleSessionName: aws.String("cross"), WebIdentityToken: aws.String(tok)})
				if code := apiErrorCode(err); code != "AccessDenied" {
					t.Fatalf("billing's role with reports' token: %v (code %q), want AccessDenied", err, code)
				}
				out, err := c.stsClient().AssumeRoleWithWebIdentity(context.Background(), &awssts.AssumeRoleWithWebIdentityInput{
					RoleArn: aws.String(reportsARN), RoleSessionName: aws.String("own"), WebIdentityToken: aws.String(tok)})
				if err != nil {
					t.Fatalf("reports' own role with its token: %v", err)
				}
				if is, _ := c.sts.Find(aws.ToString(out.Credentials.AccessKeyId)); is.Subject != "reports" {
					t.Fatalf("issued for sub %q", is.Subject)
				}
			})

			t.Run("a workload mapped to another's subject gets nothing", func(t *testing.T) {
				c.workloads = fmt.Sprintf("workloads:\n  - {uid: %d, subject: reports, role: {arn: %q, name: billing, duration: 1h}}\n", billingUID, billingARN)
				c.writeConfig(t, c.config())
				c.signal(t, syscall.SIGHUP)
				waitFor(t, 20*time.Second, "STS refusing billing's role to reports' token", func() bool {
					for _, call := range c.sts.CallLog() {
						if call.RoleARN == billingARN && call.Code == "AccessDenied" {
							return true
						}
					}
					return false
				})
				r := homes.probe(t, c.daemonEnv, billingUID)
				if d := r.Docs["billing"]; r.Listing != "billing" || d.Status != http.StatusOK || d.Code == "Success" || d.Key != "" {
					t.Fatalf("misconfigured billing: listing %q, document %+v; want billing listed and an error document", r.Listing, d)
				}
			})
		})
	}
}

// issuerMetrics scrapes the issuer's /metrics.
func issuerMetrics(t *testing.T, c *chain) e2e.Metrics {
	t.Helper()
	st, body, err := e2e.GetURL(c.iss.listen + "/metrics")
	if err != nil || st != http.StatusOK {
		t.Fatalf("issuer /metrics: %d %v", st, err)
	}
	m, err := e2e.ParseMetrics(body)
	if err != nil {
		t.Fatal(err)
	}
	return m
}
