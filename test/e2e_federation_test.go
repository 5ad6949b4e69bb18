package test

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials/ec2rolecreds"
	"github.com/aws/aws-sdk-go-v2/feature/ec2/imds"

	"github.com/imdsproxy/imdsproxy/test/e2e"
	"github.com/imdsproxy/imdsproxy/test/fakes/federation"
	"github.com/imdsproxy/imdsproxy/test/fakes/issuer"
	"github.com/imdsproxy/imdsproxy/test/fakes/oidc"
)

// Tests of the identity sources beyond jwt_file: source federation,
// identity.jwt_command and identity.jwt_url (docs/federation.md).

// fedEnv is a daemon with source federation in front of the fake
// federation endpoint, which trusts the harness's OIDC issuer.
type fedEnv struct {
	*daemonEnv
	fed *federation.Server
}

func startFederationDaemon(t *testing.T, opts envOptions, sessionLength time.Duration, mode federation.Mode) *fedEnv {
	t.Helper()
	fe := &fedEnv{}
	opts.identityYAML = func(e *daemonEnv) string {
		fe.fed = federation.Start(e.t, federation.Config{
			Issuer: e.issuer, Audience: oidc.DefaultAudience, Subject: "host-1",
			RoleARN: e2e.RoleARN, SessionLength: sessionLength,
		})
		fe.fed.SetMode(mode)
		ca := fe.fed.WriteCAFile(e.t, e.dir, "federation-ca.pem")
		return fmt.Sprintf(`role: {arn: %q, name: %s, duration: 1h}
source: federation
identity:
  jwt_file: %q
federation:
  url: %s
  ca_file: %q
`, e2e.RoleARN, e2e.RoleName, e.tokenFile, fe.fed.URL, ca)
	}
	opts.extraSecrets = func() map[string]string {
		out := map[string]string{}
		if fe.fed == nil {
			return out
		}
		for i, is := range fe.fed.Issued() {
			out[fmt.Sprintf("federation SecretAccessKey #%d", i)] = is.SecretAccessKey
			out[fmt.Sprintf("federation SessionToken #%d", i)] = is.SessionToken
		}
		return out
	}
	fe.daemonEnv = startDaemon(t, opts)
	return fe
}

// assertFederationIssued checks that a client got exactly the credentials
// the federation fake issued last.
func (fe *fedEnv) assertFederationIssued(t *testing.T, client string, got clientCreds) {
	t.Helper()
	last, ok := fe.fed.Last()
	if !ok {
		t.Fatalf("%s: the federation fake issued nothing", client)
	}
	if got.AccessKeyId != last.AccessKeyID {
		t.Fatalf("%s got access key id %q, the federation endpoint issued %q", client, got.AccessKeyId, last.AccessKeyID)
	}
	if got.SecretAccessKey != last.SecretAccessKey || got.SessionToken != last.SessionToken {
		t.Fatalf("%s got a different secret or session token than the federation endpoint issued", client)
	}
	if got.Expiration != "" {
		exp, err := time.Parse(time.RFC3339, got.Expiration)
		if err != nil {
			t.Fatalf("%s: Expiration %q: %v", client, got.Expiration, err)
		}
		if exp.After(last.Expiration.Add(time.Second)) {
			t.Fatalf("%s: Expiration %s is after the issued %s", client, exp, last.Expiration)
		}
	}
	if sts := fe.sts.Calls(); sts != 0 {
		t.Fatalf("source federation called STS %d times", sts)
	}
}

// readyzBody waits until /readyz answers 503 with a body containing want,
// and returns the body.
func (e *daemonEnv) waitNotReady(t *testing.T, want string, timeout time.Duration) string {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var st int
	var body string
	for time.Now().Before(deadline) {
		var err error
		st, body, err = e2e.GetURL(e.adminURL + "/readyz")
		if err == nil && st == 503 && strings.Contains(body, want) {
			return body
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("/readyz = %d %q, want 503 containing %q\n%s", st, body, want, e.logTail(40))
	return ""
}

func TestFederationClients(t *testing.T) {
	t.Parallel()
	fe := startFederationDaemon(t, envOptions{}, 0, federation.ModeOK)
	ctx := context.Background()

	t.Run("GoSDK", func(t *testing.T) {
		client := imds.New(imds.Options{Endpoint: fe.imdsURL, EnableFallback: aws.FalseTernary})
		p := aws.NewCredentialsCache(ec2rolecreds.New(func(o *ec2rolecreds.Options) { o.Client = client }))
		c, err := p.Retrieve(ctx)
		if err != nil {
			t.Fatalf("Retrieve: %v", err)
		}
		fe.assertFederationIssued(t, "aws-sdk-go-v2 ec2rolecreds", clientCreds{c.AccessKeyID, c.SecretAccessKey, c.SessionToken, ""})
		if c.AccountID != "" && c.AccountID != "222222222222" {
			t.Fatalf("AccountID %q", c.AccountID)
		}
	})

	t.Run("AWSCLI", func(t *testing.T) {
		requireClient(t, awsCLIPath, "AWS CLI v2 (Debian package awscli)")
		out, err := runVersion(awsCLIPath)
		if err != nil {
			t.Fatalf("%s --version: %v", awsCLIPath, err)
		}
		var got clientCreds
		if strings.HasPrefix(out, "aws-cli/2.") {
			b := runClient(t, fe.dir, fe.clientEnviron(), awsCLIPath, "configure", "export-credentials", "--format", "process")
			if err := json.Unmarshal(b, &got); err != nil {
				t.Fatalf("aws configure export-credentials printed %q: %v", redactOutput(b), err)
			}
		} else {
			got = runBotocore(t, fe.daemonEnv)
		}
		fe.assertFederationIssued(t, "AWS CLI", got)
	})

	t.Run("Bearer", func(t *testing.T) {
		last, _ := fe.fed.Last()
		if last.Subject != "host-1" || !strings.Contains(strings.Join(fe.jwtsWritten(), "\n"), last.BearerToken) {
			t.Fatalf("the federation endpoint did not get the token file's JWT (sub %q)", last.Subject)
		}
	})
}

func (e *daemonEnv) jwtsWritten() []string {
	e.mu.Lock()
	defer e.mu.Unlock()
	return append([]string(nil), e.jwts...)
}

// TestFederationOutageKeepsCachedCredentials: with short sessions, when the
// endpoint starts failing, clients keep getting the last good credentials.
func TestFederationOutageKeepsCachedCredentials(t *testing.T) {
	t.Parallel()
	const session = 30 * time.Second
	fe := startFederationDaemon(t, envOptions{}, session, federation.ModeOK)
	first, ok := fe.fed.Last()
	if !ok {
		t.Fatal("ready without issued credentials")
	}
	fe.fed.SetMode(federation.ModeFail5xx)
	before := fe.fed.Calls()
	deadline := time.Now().Add(session - 8*time.Second)
	for time.Now().Before(deadline) {
		d, err := fe.fetchCreds(context.Background())
		if err != nil {
			t.Fatalf("credentials not served during the outage: %v", err)
		}
		if d.AccessKeyId != first.AccessKeyID || d.SecretAccessKey != first.SecretAccessKey || d.Token != first.SessionToken {
			t.Fatalf("served %s during the outage, want the cached %s", d.AccessKeyId, first.AccessKeyID)
		}
		time.Sleep(250 * time.Millisecond)
	}
	if fe.fed.Calls() == before {
		t.Fatalf("no refresh attempt during %v of a %v session", session-8*time.Second, session)
	}
	dc, _ := fe.debugCache(t)
	if len(dc.Entries) != 1 || dc.Entries[0].ErrorClass != "server" || !dc.Entries[0].Valid {
		t.Fatalf("/debug/cache during the outage: %+v, want a valid entry with error class server", dc.Entries)
	}
}

func TestFederationFailuresNotReady(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		mode federation.Mode
		want string
	}{
		{"500", federation.ModeFail5xx, "server InternalError (HTTP 500)"},
		{"HTML", federation.ModeHTML, "answered text/html"},
		{"403", federation.ModeDenied, "access_denied AccessDenied (HTTP 403)"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			fe := startFederationDaemon(t, envOptions{noWaitReady: true}, 0, tc.mode)
			fe.waitNotReady(t, tc.want, 10*time.Second)
			if d, err := fe.fetchCreds(context.Background()); err == nil || d.SecretAccessKey != "" {
				t.Fatalf("credentials served while the endpoint fails: %v", err)
			}
			fe.fed.SetMode(federation.ModeOK)
			fe.waitReady(t, 15*time.Second)
			d, err := fe.fetchCreds(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			fe.assertFederationIssued(t, "IMDS client", clientCreds{d.AccessKeyId, d.SecretAccessKey, d.Token, d.Expiration})
		})
	}
}

// ---------------------------------------------------------------------------
// identity.jwt_command

// writeScript writes an executable /bin/sh script into dir.
func writeScript(t *testing.T, dir, name, body string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte("#!/bin/sh\n"+body+"\n"), 0o700); err != nil {
		t.Fatal(err)
	}
	return p
}

// jwtCommandYAML is a web-identity config whose token comes from a script
// that prints the token file, hangs or prints garbage according to
// <dir>/mode.
func jwtCommandYAML(mode string) func(e *daemonEnv) string {
	return func(e *daemonEnv) string {
		modeFile := filepath.Join(e.dir, "mode")
		if err := os.WriteFile(modeFile, []byte(mode), 0o600); err != nil {
			e.t.Fatal(err)
		}
		cmd := writeScript(e.t, e.dir, "mint-token", fmt.Sprintf(`case "$(cat %q)" in
hang) sleep 300 ;;
garbage) echo "<html>not a token</html>" ;;
fail) echo "mint-token: cannot reach the agent" >&2; exit 4 ;;
*) cat %q ;;
esac`, modeFile, e.tokenFile))
		return fmt.Sprintf(`role: {arn: %q, name: %s, duration: 1h}
source: web-identity
identity:
  jwt_command: [%q, --aud, sts.amazonaws.com]
  timeout: 1s
`, e2e.RoleARN, e2e.RoleName, cmd)
	}
}

func TestJWTCommandWebIdentity(t *testing.T) {
	t.Parallel()
	e := startDaemon(t, envOptions{identityYAML: jwtCommandYAML("ok")})
	d, err := e.fetchCreds(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if err := e.checkServed(d); err != nil {
		t.Fatal(err)
	}
	last, _ := e.sts.Last()
	if last.Subject != "host-1" {
		t.Fatalf("STS saw sub %q", last.Subject)
	}
	m := e.scrape(t)
	if v, _ := m.Value("imdsproxy_identity_token_fetches_total", map[string]string{"result": "ok", "source": "command"}); v != 1 {
		t.Errorf("metrics lack one ok command fetch:\n%s", m.Select("imdsproxy_identity_token_fetches_total", nil))
	}
}

func TestJWTCommandFailures(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct{ mode, want string }{
		{"hang", "command_timeout"},
		{"garbage", "malformed"},
		{"fail", "command_failed"},
	} {
		t.Run(tc.mode, func(t *testing.T) {
			t.Parallel()
			e := startDaemon(t, envOptions{identityYAML: jwtCommandYAML(tc.mode), noWaitReady: true})
			body := e.waitNotReady(t, tc.want, 15*time.Second)
			t.Logf("/readyz: %s", strings.TrimSpace(body))
			if e.sts.Calls() != 0 {
				t.Fatalf("STS called %d times without a token", e.sts.Calls())
			}
			if tc.mode == "fail" && !strings.Contains(e.log.String(), "cannot reach the agent") {
				t.Errorf("the command's stderr was not logged")
			}
			// Recovery: the command works again.
			if err := os.WriteFile(filepath.Join(e.dir, "mode"), []byte("ok"), 0o600); err != nil {
				t.Fatal(err)
			}
			e.waitReady(t, 20*time.Second)
		})
	}
}

// ---------------------------------------------------------------------------
// identity.jwt_url

// requireAEMM makes sure the shared upstream serves the identity document
// and its pkcs7 signature (amazon-ec2-metadata-mock does; the httptest
// stand-in does not).
func requireAEMM(t *testing.T) {
	t.Helper()
	up := sharedUpstream(t)
	if strings.HasPrefix(up.Kind, "amazon-ec2-metadata-mock") {
		return
	}
	msg := "jwt_url needs amazon-ec2-metadata-mock as the upstream IMDS (instance identity pkcs7); `make test` installs it"
	if os.Getenv("IMDSPROXY_E2E_ALLOW_MISSING") == "1" {
		t.Skip(msg)
	}
	t.Fatal(msg)
}

type urlEnv struct {
	*daemonEnv
	iss *issuer.Server
}

func startJWTURLDaemon(t *testing.T, opts envOptions, cfg issuer.Config, mode issuer.Mode, source string) *urlEnv {
	t.Helper()
	requireAEMM(t)
	ue := &urlEnv{}
	var fed *federation.Server
	opts.identityYAML = func(e *daemonEnv) string {
		cfg.Issuer = e.issuer
		ue.iss = issuer.Start(e.t, cfg)
		ue.iss.SetMode(mode)
		if source == "federation" {
			fed = federation.Start(e.t, federation.Config{Issuer: e.issuer, RoleARN: e2e.RoleARN})
			return fmt.Sprintf(`role: {arn: %q, name: %s, duration: 1h}
source: federation
identity: {jwt_url: %s, timeout: 2s, insecure_http: true}
federation: {url: %s, ca_file: %q}
`, e2e.RoleARN, e2e.RoleName, ue.iss.URL, fed.URL, fed.WriteCAFile(e.t, e.dir, "fed-ca.pem"))
		}
		return fmt.Sprintf(`role: {arn: %q, name: %s, duration: 1h}
source: web-identity
identity:
  jwt_url: %s
  timeout: 2s
  insecure_http: true
`, e2e.RoleARN, e2e.RoleName, ue.iss.URL)
	}
	opts.extraSecrets = func() map[string]string {
		out := map[string]string{}
		if ue.iss != nil {
			for i, j := range ue.iss.Minted() {
				out[fmt.Sprintf("issuer JWT #%d", i)] = j
				out[fmt.Sprintf("issuer JWT #%d signature", i)] = j[strings.LastIndexByte(j, '.')+1:]
			}
		}
		if fed != nil {
			for i, is := range fed.Issued() {
				out[fmt.Sprintf("federation SecretAccessKey #%d", i)] = is.SecretAccessKey
				out[fmt.Sprintf("federation SessionToken #%d", i)] = is.SessionToken
			}
		}
		return out
	}
	ue.daemonEnv = startDaemon(t, opts)
	return ue
}

func TestJWTURLWebIdentity(t *testing.T) {
	t.Parallel()
	for _, format := range []issuer.Format{issuer.FormatJSON, issuer.FormatText} {
		t.Run(map[issuer.Format]string{issuer.FormatJSON: "json", issuer.FormatText: "text"}[format], func(t *testing.T) {
			t.Parallel()
			e := startJWTURLDaemon(t, envOptions{}, issuer.Config{Format: format}, issuer.ModeOK, "web-identity")
			d, err := e.fetchCreds(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			if err := e.checkServed(d); err != nil {
				t.Fatal(err)
			}
			last, _ := e.sts.Last()
			minted := e.iss.Minted()
			if len(minted) == 0 || last.WebIdentityToken != minted[len(minted)-1] {
				t.Fatal("STS did not get the issuer's token")
			}
			if last.Subject != "i-1234567890abcdef0" {
				t.Fatalf("sub %q, want the instance id of the identity document", last.Subject)
			}
			if r := e.iss.Requests()[0]; r.PKCS7 == "" || strings.ContainsAny(r.PKCS7, "\n ") {
				t.Fatalf("pkcs7 posted: %q", r.PKCS7)
			}
		})
	}
}

func TestJWTURLFederation(t *testing.T) {
	t.Parallel()
	e := startJWTURLDaemon(t, envOptions{}, issuer.Config{}, issuer.ModeOK, "federation")
	d, err := e.fetchCreds(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if d.AccessKeyId == "" || e.sts.Calls() != 0 {
		t.Fatalf("federation through jwt_url: %q, STS calls %d", d.AccessKeyId, e.sts.Calls())
	}
}

func TestJWTURLFailures(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		mode issuer.Mode
		want string
	}{
		{"HTML", issuer.ModeHTML, "issuer answered text/html, not a token"},
		{"500", issuer.ModeFail5xx, "issuer answered HTTP 500"},
		{"hang", issuer.ModeHang, "issuer_timeout"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			e := startJWTURLDaemon(t, envOptions{noWaitReady: true}, issuer.Config{}, tc.mode, "web-identity")
			body := e.waitNotReady(t, tc.want, 15*time.Second)
			t.Logf("/readyz: %s", strings.TrimSpace(body))
			if e.sts.Calls() != 0 {
				t.Fatalf("STS called %d times without a token", e.sts.Calls())
			}
			e.iss.SetMode(issuer.ModeOK)
			e.waitReady(t, 20*time.Second)
		})
	}
}

// TestJWTURLOutageKeepsCachedCredentials: short-lived tokens and sessions;
// when the issuer starts failing, the still-valid credentials keep being
// served.
func TestJWTURLOutageKeepsCachedCredentials(t *testing.T) {
	t.Parallel()
	const session = 30 * time.Second
	// A 70 s token is reused for 10 s only (exp − 60 s), so the refresh at
	// about half the session needs a new token from the failing issuer.
	e := startJWTURLDaemon(t, envOptions{sessionLength: session}, issuer.Config{Lifetime: 70 * time.Second}, issuer.ModeOK, "web-identity")
	first, ok := e.sts.Last()
	if !ok {
		t.Fatal("ready without issued credentials")
	}
	e.iss.SetMode(issuer.ModeFail5xx)
	before := e.iss.Calls()
	deadline := time.Now().Add(session - 8*time.Second)
	for time.Now().Before(deadline) {
		d, err := e.fetchCreds(context.Background())
		if err != nil {
			t.Fatalf("credentials not served while the issuer fails: %v", err)
		}
		if d.AccessKeyId != first.AccessKeyID {
			t.Fatalf("served %s, want the cached %s", d.AccessKeyId, first.AccessKeyID)
		}
		time.Sleep(250 * time.Millisecond)
	}
	if e.iss.Calls() == before {
		t.Fatal("the issuer was not asked again during the outage")
	}
	if e.sts.Calls() != 1 {
		t.Fatalf("STS called %d times; without a token it must not be called", e.sts.Calls())
	}
	dc, _ := e.debugCache(t)
	if len(dc.Entries) != 1 || !dc.Entries[0].Valid || !strings.Contains(dc.Entries[0].LastError, "issuer answered HTTP 500") {
		t.Fatalf("/debug/cache: %+v", dc.Entries)
	}
}
