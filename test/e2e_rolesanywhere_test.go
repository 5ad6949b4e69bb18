package test

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/credentials/ec2rolecreds"

	"github.com/imdsproxy/imdsproxy/test/e2e"
	"github.com/imdsproxy/imdsproxy/test/fakes/rolesanywhere"
)

// The Roles Anywhere resources of the daemon's config.
const (
	raTrustAnchorARN = "arn:aws:rolesanywhere:us-east-1:222222222222:trust-anchor/0b8c3f1e-1111-2222-3333-444455556666"
	raProfileARN     = "arn:aws:rolesanywhere:us-east-1:222222222222:profile/7c9a1b2c-1111-2222-3333-444455556666"
)

// raEnv is a daemon with source roles-anywhere in front of the fake.
type raEnv struct {
	*daemonEnv
	ca   *rolesanywhere.CA
	fake *rolesanywhere.Server
	dir  string // holds cert.pem, key.pem, chain.pem

	mu     sync.Mutex
	leaves []*rolesanywhere.Leaf // every identity written, for the secret scan
}

type raOptions struct {
	key           rolesanywhere.KeyType
	sessionLength time.Duration // fake's session override; 0: durationSeconds
	expiryMargin  time.Duration
}

// startRAFake starts the fake Roles Anywhere trusting a new CA, with the
// trust anchor, profile and role of these tests, and returns both.
func startRAFake(t *testing.T) (*rolesanywhere.CA, *rolesanywhere.Server) {
	t.Helper()
	ca, err := rolesanywhere.NewCA()
	if err != nil {
		t.Fatal(err)
	}
	return ca, rolesanywhere.Start(t, rolesanywhere.Config{
		Roots: ca.Pool(), TrustAnchorARN: raTrustAnchorARN, ProfileARN: raProfileARN, RoleARN: e2e.RoleARN,
	})
}

// startRolesAnywhere starts the fake (trusting a new CA), writes an identity
// issued by that CA and starts the daemon with source roles-anywhere.
func startRolesAnywhere(t *testing.T, o raOptions) *raEnv {
	t.Helper()
	ca, fake := startRAFake(t)
	r := &raEnv{ca: ca, dir: t.TempDir(), fake: fake}
	r.fake.SetSessionLength(o.sessionLength)
	r.writeIdentity(t, o.key)
	r.daemonEnv = startDaemon(t, envOptions{
		expiryMargin: o.expiryMargin,
		identityYAML: func(e *daemonEnv) string {
			return fmt.Sprintf(`role: {arn: %q, name: %s, duration: 1h}
source: roles-anywhere
identity:
  x509: {cert: %q, key: %q, chain: %q}
roles_anywhere:
  trust_anchor_arn: %s
  profile_arn: %s
`, e2e.RoleARN, e2e.RoleName, r.path("cert.pem"), r.path("key.pem"), r.path("chain.pem"), raTrustAnchorARN, raProfileARN)
		},
		extraEnv:     []string{"AWS_ENDPOINT_URL_ROLESANYWHERE=" + r.fake.URL},
		extraSecrets: r.secrets,
	})
	return r
}

func (r *raEnv) path(name string) string { return filepath.Join(r.dir, name) }

// writeIdentity issues a new leaf and writes its files atomically (key
// first, so a reader never pairs the new certificate with the old key for
// long).
func (r *raEnv) writeIdentity(t testing.TB, kt rolesanywhere.KeyType) *rolesanywhere.Leaf {
	t.Helper()
	l, err := r.ca.Issue(rolesanywhere.LeafOptions{Key: kt})
	if err != nil {
		t.Fatal(err)
	}
	r.mu.Lock()
	r.leaves = append(r.leaves, l)
	r.mu.Unlock()
	if _, _, _, err := l.WriteFiles(r.dir); err != nil {
		t.Fatal(err)
	}
	return l
}

// secrets are the credentials the fake issued and every private key written.
func (r *raEnv) secrets() map[string]string {
	out := map[string]string{}
	for i, is := range r.fake.Issued() {
		out[fmt.Sprintf("Roles Anywhere SecretAccessKey #%d", i)] = is.SecretAccessKey
		out[fmt.Sprintf("Roles Anywhere SessionToken #%d", i)] = is.SessionToken
		mid := len(is.SessionToken) / 2
		out[fmt.Sprintf("Roles Anywhere SessionToken #%d (middle)", i)] = is.SessionToken[mid-16 : mid+16]
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	for i, l := range r.leaves {
		for j, line := range strings.Split(string(l.KeyPEM), "\n") {
			if len(line) >= 32 && !strings.HasPrefix(line, "-----") {
				out[fmt.Sprintf("private key #%d line %d", i, j)] = line
			}
		}
	}
	return out
}

// assertIssuedByFake checks that a client got exactly the credentials the
// fake issued last.
func (r *raEnv) assertIssuedByFake(t *testing.T, client string, got clientCreds) {
	t.Helper()
	last, ok := r.fake.Last()
	if !ok {
		t.Fatalf("%s: the fake Roles Anywhere issued nothing (calls: %+v)", client, r.fake.CallLog())
	}
	if got.AccessKeyId != last.AccessKeyID {
		t.Fatalf("%s got access key id %q, Roles Anywhere issued %q", client, got.AccessKeyId, last.AccessKeyID)
	}
	if got.SecretAccessKey != last.SecretAccessKey || got.SessionToken != last.SessionToken {
		t.Fatalf("%s got a different secret or session token than Roles Anywhere issued", client)
	}
}

// checkServedByFake is checkServed for credentials issued by the fake.
func (r *raEnv) checkServedByFake(d e2e.CredDoc) (rolesanywhere.Issued, error) {
	is, ok := r.fake.Find(d.AccessKeyId)
	if !ok {
		return is, fmt.Errorf("served access key id %q was never issued by Roles Anywhere", d.AccessKeyId)
	}
	if d.SecretAccessKey != is.SecretAccessKey || d.Token != is.SessionToken {
		return is, fmt.Errorf("served secret/token for %s differ from the issued ones", d.AccessKeyId)
	}
	if !wireTime.MatchString(d.Expiration) || d.Type != "AWS-HMAC" {
		return is, fmt.Errorf("document: Expiration %q Type %q", d.Expiration, d.Type)
	}
	if exp, _ := time.Parse(time.RFC3339, d.Expiration); exp.After(is.Expiration) {
		return is, fmt.Errorf("served Expiration %s is after the real one %s", exp, is.Expiration)
	}
	return is, nil
}

func TestRolesAnywhereClients(t *testing.T) {
	t.Parallel()
	for _, kt := range []rolesanywhere.KeyType{rolesanywhere.RSA2048, rolesanywhere.ECP256} {
		t.Run(string(kt), func(t *testing.T) {
			t.Parallel()
			r := startRolesAnywhere(t, raOptions{key: kt})
			ctx := context.Background()

			t.Run("go-sdk", func(t *testing.T) {
				cfg, err := config.LoadDefaultConfig(ctx,
					config.WithRegion("us-east-1"),
					config.WithEC2IMDSEndpoint(r.imdsURL),
					config.WithSharedConfigFiles([]string{r.emptyFile}),
					config.WithSharedCredentialsFiles([]string{r.emptyFile}),
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
				r.assertIssuedByFake(t, "aws-sdk-go-v2", clientCreds{c.AccessKeyID, c.SecretAccessKey, c.SessionToken, ""})
			})

			t.Run("boto3", func(t *testing.T) {
				requireClient(t, python3Path, "python3 with boto3 (Debian package python3-boto3)")
				const script = `import boto3, json
c = boto3.Session().get_credentials()
if c is None:
    raise SystemExit("boto3 found no credentials")
f = c.get_frozen_credentials()
print(json.dumps({"AccessKeyId": f.access_key, "SecretAccessKey": f.secret_key,
                  "SessionToken": f.token, "Method": c.method}))`
				b := runClient(t, r.daemonEnv.dir, r.clientEnviron(), python3Path, "-c", script)
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
				r.assertIssuedByFake(t, "boto3", got.clientCreds)
			})

			// One CreateSession served everything; it used this identity.
			issued := r.fake.Issued()
			if len(issued) != 1 || issued[0].Serial != r.leaves[0].Cert.SerialNumber.String() ||
				issued[0].DurationSeconds != 3600 || issued[0].RoleARN != e2e.RoleARN {
				t.Errorf("fake issued %+v", issued)
			}
			wantAlg := map[rolesanywhere.KeyType]string{rolesanywhere.RSA2048: "AWS4-X509-RSA-SHA256", rolesanywhere.ECP256: "AWS4-X509-ECDSA-SHA256"}[kt]
			if len(issued) > 0 && issued[0].Algorithm != wantAlg {
				t.Errorf("algorithm %s, want %s", issued[0].Algorithm, wantAlg)
			}
			if m := r.scrape(t); len(m.Select("imdsproxy_identity_certificate_expiry_timestamp_seconds", nil)) == 0 {
				t.Errorf("/metrics lacks imdsproxy_identity_certificate_expiry_timestamp_seconds")
			}
		})
	}
}

// TestRolesAnywhereRotation: a new certificate and key written while the
// daemon runs are used for the next CreateSession, without a restart.
func TestRolesAnywhereRotation(t *testing.T) {
	t.Parallel()
	r := startRolesAnywhere(t, raOptions{key: rolesanywhere.RSA2048, sessionLength: 20 * time.Second})
	pid := r.proc.Pid()
	ctx := context.Background()
	d, err := r.fetchCreds(ctx)
	if err != nil {
		t.Fatal(err)
	}
	is, err := r.checkServedByFake(d)
	if err != nil {
		t.Fatal(err)
	}
	old := r.leaves[0].Cert.SerialNumber.String()
	if is.Serial != old {
		t.Fatalf("first session from serial %s, want %s", is.Serial, old)
	}

	l2 := r.writeIdentity(t, rolesanywhere.ECP384)
	newSerial := l2.Cert.SerialNumber.String()
	deadline := time.Now().Add(40 * time.Second)
	var served rolesanywhere.Issued
	for {
		d, err := r.fetchCreds(ctx)
		if err == nil {
			if served, err = r.checkServedByFake(d); err != nil {
				t.Fatal(err)
			}
			if served.Serial == newSerial {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no credentials from the rotated certificate after 40s (last served from %s, err %v); calls: %+v",
				served.Serial, err, r.fake.CallLog())
		}
		time.Sleep(250 * time.Millisecond)
	}
	if served.Algorithm != "AWS4-X509-ECDSA-SHA256" {
		t.Errorf("rotated identity signed with %s", served.Algorithm)
	}
	if r.exited() || r.proc.Pid() != pid {
		t.Fatal("the daemon restarted")
	}
	for _, c := range r.fake.CallLog() {
		if c.Status != 201 {
			t.Errorf("a CreateSession failed during rotation: %+v", c)
		}
	}
	m := r.scrape(t)
	if loads, _ := m.Value("imdsproxy_identity_certificate_loads_total", map[string]string{"result": "ok"}); loads < 2 {
		t.Errorf("/metrics does not count two good certificate loads:\n%s", m.Select("imdsproxy_identity_certificate_loads_total", nil))
	}
}

// TestRolesAnywhereBadIdentity: an identity that goes bad while the daemon
// runs makes /readyz 503 with the reason, while the cached credentials keep
// being served; fixing the files makes it ready again.
func TestRolesAnywhereBadIdentity(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name   string
		break_ func(t *testing.T, r *raEnv)
		fix    func(t *testing.T, r *raEnv)
		want   string
	}{
		{
			name:   "world-readable key",
			break_: func(t *testing.T, r *raEnv) { raChmod(t, r.path("key.pem"), 0o644) },
			fix:    func(t *testing.T, r *raEnv) { raChmod(t, r.path("key.pem"), 0o600) },
			want:   "key_permissions",
		},
		{
			name: "mismatched key",
			break_: func(t *testing.T, r *raEnv) {
				other, err := r.ca.Issue(rolesanywhere.LeafOptions{Key: rolesanywhere.RSA2048})
				if err != nil {
					t.Fatal(err)
				}
				r.mu.Lock()
				r.leaves = append(r.leaves, other)
				r.mu.Unlock()
				if err := rolesanywhere.WriteFileAtomic(r.path("key.pem"), other.KeyPEM, 0o600); err != nil {
					t.Fatal(err)
				}
			},
			fix: func(t *testing.T, r *raEnv) {
				if err := rolesanywhere.WriteFileAtomic(r.path("key.pem"), r.leaves[0].KeyPEM, 0o600); err != nil {
					t.Fatal(err)
				}
			},
			want: "key_mismatch",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			// 40s sessions: a refresh at about 20s, which fails, leaves ~18s
			// of cached credentials to serve.
			r := startRolesAnywhere(t, raOptions{key: rolesanywhere.ECP256, sessionLength: 40 * time.Second})
			ctx := context.Background()
			d, err := r.fetchCreds(ctx)
			if err != nil {
				t.Fatal(err)
			}
			first, err := r.checkServedByFake(d)
			if err != nil {
				t.Fatal(err)
			}
			tc.break_(t, r)

			deadline := time.Now().Add(35 * time.Second)
			var st int
			var body string
			for {
				st, body, err = e2e.GetURL(r.adminURL + "/readyz")
				if err == nil && st == 503 {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("/readyz still %d %q after the identity went bad", st, body)
				}
				time.Sleep(200 * time.Millisecond)
			}
			if !strings.Contains(body, tc.want) {
				t.Errorf("/readyz %q does not name %s", body, tc.want)
			}
			if len(r.fake.Issued()) != 1 {
				t.Errorf("the fake issued %d sessions; a bad identity must not reach it", len(r.fake.Issued()))
			}
			// The cached credentials are still served.
			d, err = r.fetchCreds(ctx)
			if err != nil {
				t.Fatalf("cached credentials not served while the identity is bad: %v", err)
			}
			if d.AccessKeyId != first.AccessKeyID {
				t.Fatalf("served %s, want the cached %s", d.AccessKeyId, first.AccessKeyID)
			}
			dc, _ := r.debugCache(t)
			if len(dc.Entries) != 1 || dc.Entries[0].ErrorClass != "identity" || !dc.Entries[0].Permanent ||
				!strings.Contains(dc.Entries[0].LastError, tc.want) {
				t.Errorf("/debug/cache %+v, want class identity, permanent, naming %s", dc.Entries, tc.want)
			}

			tc.fix(t, r)
			r.waitReady(t, 20*time.Second)
			d, err = r.fetchCreds(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := r.checkServedByFake(d); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// TestRolesAnywhereAccessDenied: a refused CreateSession keeps the daemon
// unready with the class in /readyz and serves no credentials.
func TestRolesAnywhereAccessDenied(t *testing.T) {
	t.Parallel()
	ca, err := rolesanywhere.NewCA()
	if err != nil {
		t.Fatal(err)
	}
	other, err := rolesanywhere.NewCA() // the fake trusts another CA
	if err != nil {
		t.Fatal(err)
	}
	fake := rolesanywhere.Start(t, rolesanywhere.Config{
		Roots: other.Pool(), TrustAnchorARN: raTrustAnchorARN, ProfileARN: raProfileARN, RoleARN: e2e.RoleARN,
	})
	r := &raEnv{ca: ca, dir: t.TempDir(), fake: fake}
	r.writeIdentity(t, rolesanywhere.RSA2048)
	r.daemonEnv = startDaemon(t, envOptions{
		noWaitReady: true,
		identityYAML: func(e *daemonEnv) string {
			return fmt.Sprintf("role: {arn: %q, name: %s, duration: 1h}\nsource: roles-anywhere\nidentity:\n  x509: {cert: %q, key: %q, chain: %q}\nroles_anywhere: {trust_anchor_arn: %s, profile_arn: %s}\n",
				e2e.RoleARN, e2e.RoleName, r.path("cert.pem"), r.path("key.pem"), r.path("chain.pem"), raTrustAnchorARN, raProfileARN)
		},
		extraEnv:     []string{"AWS_ENDPOINT_URL_ROLESANYWHERE=" + fake.URL},
		extraSecrets: r.secrets,
	})
	deadline := time.Now().Add(10 * time.Second)
	for fake.Calls() == 0 && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	time.Sleep(300 * time.Millisecond)
	st, body, err := e2e.GetURL(r.adminURL + "/readyz")
	if err != nil || st != 503 || !strings.Contains(body, "access_denied") {
		t.Errorf("/readyz %d %q %v, want 503 naming access_denied", st, body, err)
	}
	if calls := fake.CallLog(); len(calls) == 0 || calls[0].Code != "AccessDeniedException" ||
		!strings.Contains(calls[0].Reason, "untrusted certificate") {
		t.Errorf("fake calls %+v", calls)
	}
	if _, err := r.fetchCreds(context.Background()); err == nil {
		t.Error("credentials served although Roles Anywhere refused")
	}
}

func raChmod(t *testing.T, path string, mode os.FileMode) {
	t.Helper()
	if err := os.Chmod(path, mode); err != nil {
		t.Fatal(err)
	}
}
