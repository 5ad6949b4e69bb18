package test

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/kms"
	kmstypes "github.com/aws/aws-sdk-go-v2/service/kms/types"
	awssts "github.com/aws/aws-sdk-go-v2/service/sts"
	lkms "github.com/nsmithuk/local-kms/src"
	lkmsconfig "github.com/nsmithuk/local-kms/src/config"
	lkmsdata "github.com/nsmithuk/local-kms/src/data"

	"github.com/imdsproxy/imdsproxy/test/e2e"
	"github.com/imdsproxy/imdsproxy/test/fakes/instance"
	"github.com/imdsproxy/imdsproxy/test/fakes/sts"
)

// Drills of the issuer chain (e2e_issuer_test.go): key rotation under load,
// a KMS key, replayed identity documents.

// setKeys rewrites the issuer's signing.keys, sends SIGHUP and waits until
// the JWKS lists n keys with the first one first (first: "" for any).
func (c *chain) setKeys(t *testing.T, keys []string, n int, first string) []string {
	t.Helper()
	writeFile(t, c.iss.cfgPath, c.iss.render(keys), 0o600)
	if err := c.iss.proc.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	var kids []string
	waitFor(t, 15*time.Second, fmt.Sprintf("the JWKS to list %d keys after SIGHUP", n), func() bool {
		kids = c.jwksKids(t)
		return len(kids) == n && (first == "" || kids[0] == first)
	})
	return kids
}

// rotationLoad is clients using the chain while keys rotate: IMDS clients
// of the daemon (PUT token, GET the document, check it is exactly what
// STS issued), and a direct client that gets a token from the issuer and
// trades it with STS, as any relying party does.
type rotationLoad struct {
	mu                sync.Mutex
	imdsOK, directOK  int
	failures          []string
	stop              chan struct{}
	wg                sync.WaitGroup
	imdsRate, dirRate time.Duration
}

func (l *rotationLoad) fail(format string, args ...any) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.failures = append(l.failures, fmt.Sprintf(format, args...))
}

func (l *rotationLoad) counts() (imds, direct int, failures []string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.imdsOK, l.directOK, append([]string(nil), l.failures...)
}

func startRotationLoad(c *chain) *rotationLoad {
	l := &rotationLoad{stop: make(chan struct{}), imdsRate: 50 * time.Millisecond, dirRate: 150 * time.Millisecond}
	every := func(d time.Duration, f func()) {
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			t := time.NewTicker(d)
			defer t.Stop()
			for {
				f()
				select {
				case <-l.stop:
					return
				case <-t.C:
				}
			}
		}()
	}
	for range 2 {
		every(l.imdsRate, func() {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			d, err := c.fetchCreds(ctx)
			if err == nil {
				err = c.checkServed(d)
			}
			if err != nil {
				l.fail("IMDS client: %v", err)
				return
			}
			l.mu.Lock()
			l.imdsOK++
			l.mu.Unlock()
		})
	}
	client := c.stsClient()
	every(l.dirRate, func() {
		st, tok, err := postToken(c.iss.listen, c.inst.Document, c.inst.PKCS7, "billing")
		if err != nil || st != http.StatusOK {
			l.fail("issuer: %d %v %s", st, err, tok)
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if _, err := client.AssumeRoleWithWebIdentity(ctx, &awssts.AssumeRoleWithWebIdentityInput{
			RoleArn: aws.String(billingARN), RoleSessionName: aws.String("rotation"), WebIdentityToken: aws.String(tok)}); err != nil {
			l.fail("STS refused a fresh token: %s", apiErrorCode(err))
			return
		}
		l.mu.Lock()
		l.directOK++
		l.mu.Unlock()
	})
	return l
}

func (l *rotationLoad) end() { close(l.stop); l.wg.Wait() }

// issuedSince returns the web identity issues after t by role.
func issuedSince(c *chain, since time.Time) (daemon, direct []sts.Issued) {
	for _, is := range c.sts.Issued() {
		if is.Action != sts.ActionAssumeRoleWithWebIdentity || is.IssuedAt.Before(since) {
			continue
		}
		if is.RoleARN == billingARN {
			direct = append(direct, is)
		} else {
			daemon = append(daemon, is)
		}
	}
	return daemon, direct
}

func kidsOf(list []sts.Issued) []string {
	var out []string
	for _, is := range list {
		if !slices.Contains(out, is.TokenKID) {
			out = append(out, is.TokenKID)
		}
	}
	return out
}

// TestIssuerKeyRotation is the rotation procedure of docs/issuer.md run
// under load: add the new key second (SIGHUP and publish; the published
// JWKS has both, the old key still signs), then move it first (SIGHUP; new
// tokens carry its kid). The daemon refreshes every few seconds with a
// fresh token each time (one-minute tokens, eight-second sessions) and a
// direct client trades a fresh token with STS every 150 ms: no client
// request and no STS call fails throughout. (The waits of the procedure
// are left out: the STS fake reads the published JWKS on every call and
// caches nothing.) Last, to show STS really reads the published keys, a
// third key moved first without publishing is refused until published.
func TestIssuerKeyRotation(t *testing.T) {
	t.Parallel()
	c := startChain(t, chainOptions{noWorkloads: true, tokenTTL: time.Minute, sessionLength: 8 * time.Second})
	k1 := fmt.Sprintf("{file: %q}", filepath.Join(c.iss.dir, "signing-1.pem"))
	p2, pem2 := newES256KeyFile(t, c.iss.dir, "signing-2.pem")
	c.iss.keyPEMs = append(c.iss.keyPEMs, pem2)
	k2 := fmt.Sprintf("{file: %q}", p2)
	kid1 := c.jwksKids(t)[0]

	load := startRotationLoad(c)
	stopped := false
	defer func() {
		if !stopped {
			load.end()
		}
	}()
	// waitIssues waits until both paths have had n issues since t0 and
	// returns them.
	waitIssues := func(what string, t0 time.Time, n int, kid string) ([]sts.Issued, []sts.Issued) {
		t.Helper()
		var daemon, direct []sts.Issued
		waitFor(t, 45*time.Second, what, func() bool {
			daemon, direct = issuedSince(c, t0)
			count := func(l []sts.Issued) int {
				k := 0
				for _, is := range l {
					if kid == "" || is.TokenKID == kid {
						k++
					}
				}
				return k
			}
			return count(daemon) >= n && count(direct) >= n
		})
		return daemon, direct
	}
	waitIssues("exchanges with the first key", time.Time{}, 2, kid1)

	// 1. Add the new key second and publish: the old one still signs.
	kids := c.setKeys(t, []string{k1, k2}, 2, kid1)
	kid2 := kids[1]
	c.publish(t)
	if got := c.publishedKids(t); !slices.Equal(got, []string{kid1, kid2}) {
		t.Fatalf("published JWKS %v, want %v", got, []string{kid1, kid2})
	}
	published := time.Now()
	daemon, direct := waitIssues("exchanges after publishing the second key", published, 2, "")
	if k := kidsOf(append(daemon, direct...)); !slices.Equal(k, []string{kid1}) {
		t.Fatalf("after publishing the second key, tokens were signed by %v; want only the first key %s", k, kid1)
	}
	if m := issuerMetrics(t, c); m.Sum("imdsproxy_issuer_published_keys", nil) != 2 ||
		m.Sum("imdsproxy_issuer_config_last_reload_successful", nil) != 1 {
		t.Fatalf("published keys %v, reload successful %v", m.Sum("imdsproxy_issuer_published_keys", nil), m.Sum("imdsproxy_issuer_config_last_reload_successful", nil))
	}

	// 2. Move it first: new tokens carry its kid; the old key stays
	// published for the tokens it signed.
	c.setKeys(t, []string{k2, k1}, 2, kid2)
	moved := time.Now()
	waitIssues("exchanges with the new key", moved, 2, kid2)

	load.end()
	stopped = true
	imdsOK, directOK, failures := load.counts()
	t.Logf("rotation: %d IMDS client fetches and %d direct token exchanges, %d failed", imdsOK, directOK, len(failures))
	if len(failures) > 0 {
		t.Fatalf("%d requests failed during the rotation, first: %s", len(failures), failures[0])
	}
	for _, call := range c.sts.CallLog() {
		if call.Action == sts.ActionAssumeRoleWithWebIdentity && call.Code != "" {
			t.Errorf("STS refused an exchange during the rotation: %s %s", call.RoleARN, call.Code)
		}
	}
	if imdsOK < 20 || directOK < 5 {
		t.Errorf("too little load to call it a drill: %d fetches, %d exchanges", imdsOK, directOK)
	}

	// A key that signs before it is published: STS cannot find its kid.
	p3, pem3 := newES256KeyFile(t, c.iss.dir, "signing-3.pem")
	c.iss.keyPEMs = append(c.iss.keyPEMs, pem3)
	kid3 := c.setKeys(t, []string{fmt.Sprintf("{file: %q}", p3), k2, k1}, 3, "")[0]
	exchange := func() error {
		st, tok := c.issuerToken(t, c.inst.Document, c.inst.PKCS7, "billing")
		if st != http.StatusOK {
			t.Fatalf("issuer: %d %s", st, tok)
		}
		_, err := c.stsClient().AssumeRoleWithWebIdentity(context.Background(), &awssts.AssumeRoleWithWebIdentityInput{
			RoleArn: aws.String(billingARN), RoleSessionName: aws.String("unpublished"), WebIdentityToken: aws.String(tok)})
		return err
	}
	if err := exchange(); apiErrorCode(err) != "InvalidIdentityToken" {
		t.Fatalf("a token of the unpublished key %s: %v, want InvalidIdentityToken", kid3, err)
	}
	c.publish(t)
	if err := exchange(); err != nil {
		t.Fatalf("a token of the key %s once published: %v", kid3, err)
	}
}

// startLocalKMS serves local-kms (github.com/nsmithuk/local-kms, an
// implementation of the KMS API) in this process on loopback. Its
// configuration is global: one test of the binary may use it.
func startLocalKMS(t *testing.T) (url string, client *kms.Client) {
	t.Helper()
	lkmsconfig.AWSAccountId = "111111111111"
	lkmsconfig.AWSRegion = "us-east-1"
	lkmsconfig.DatabasePath = t.TempDir()
	db := lkmsdata.NewDatabase(lkmsconfig.DatabasePath)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { lkms.HandleRequest(w, r, db) }))
	t.Cleanup(srv.Close)
	client = kms.New(kms.Options{Region: "us-east-1", BaseEndpoint: aws.String(srv.URL), HTTPClient: e2e.Client,
		Credentials: credentials.NewStaticCredentialsProvider("AKIATESTKMSEXAMPLE00", "kms-dummy-secret", "")})
	return srv.URL, client
}

// TestIssuerKMSKey: the issuer signs with a KMS key (local-kms, over the
// KMS API, through AWS_ENDPOINT_URL_KMS); its JWKS publishes the key KMS
// holds, and the fake STS accepts the daemon's tokens with it.
func TestIssuerKMSKey(t *testing.T) {
	kmsURL, client := startLocalKMS(t)
	for _, tc := range []struct {
		spec kmstypes.KeySpec
		alg  string
	}{{kmstypes.KeySpecEccNistP256, "ES256"}, {kmstypes.KeySpecRsa2048, "RS256"}} {
		t.Run(string(tc.spec), func(t *testing.T) {
			out, err := client.CreateKey(context.Background(), &kms.CreateKeyInput{KeySpec: tc.spec, KeyUsage: kmstypes.KeyUsageTypeSignVerify})
			if err != nil {
				t.Fatal(err)
			}
			arn := aws.ToString(out.KeyMetadata.Arn)
			c := startChain(t, chainOptions{noWorkloads: true, keys: []string{fmt.Sprintf("{kms: %q}", arn)},
				issuerEnv: []string{"AWS_ENDPOINT_URL_KMS=" + kmsURL}})
			d, err := c.fetchCreds(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			if err := c.checkServed(d); err != nil {
				t.Fatal(err)
			}
			is, _ := c.sts.Find(d.AccessKeyId)
			if kids := c.jwksKids(t); len(kids) != 1 || is.TokenKID != kids[0] || is.TokenAlg != tc.alg || is.Subject != hostSubject {
				t.Fatalf("STS accepted a token of kid %q alg %s sub %q; the JWKS has %v; want %s", is.TokenKID, is.TokenAlg, is.Subject, kids, tc.alg)
			}
			st, body, err := e2e.GetURL(c.iss.listen + "/readyz")
			if err != nil || st != http.StatusOK || !strings.Contains(body, "kms") {
				t.Fatalf("/readyz %d %q %v, want ready, signing with kms", st, body, err)
			}
		})
	}
}

// TestIssuerReplayedDocument: with attestation.aws_iid.verify_instance, a
// copy of the instance's signed identity document is refused once EC2 says
// the instance is terminated, and a document of an earlier launch of the
// same instance is refused while it runs; the daemon's own attestation
// works while the instance runs.
func TestIssuerReplayedDocument(t *testing.T) {
	t.Parallel()
	c := startChain(t, chainOptions{noWorkloads: true, ec2CacheTTL: time.Second})
	if st, body := c.issuerToken(t, c.inst.Document, c.inst.PKCS7, ""); st != http.StatusOK {
		t.Fatalf("the running instance's document: %d %s", st, body)
	}
	earlier, err := instance.New(instance.Options{CA: c.inst.CA, InstanceID: c.inst.InstanceID, PendingTime: c.inst.PendingTime.Add(-16 * time.Hour)})
	if err != nil {
		t.Fatal(err)
	}
	if st, body := c.issuerToken(t, earlier.Document, earlier.PKCS7, ""); st != http.StatusForbidden || !strings.Contains(body, `"launch_mismatch"`) {
		t.Fatalf("a document of an earlier launch: %d %s, want 403 launch_mismatch", st, body)
	}

	c.ec2.SetState(c.inst.Region, c.inst.InstanceID, "terminated")
	var st int
	var body string
	waitFor(t, 10*time.Second, "the replayed document of the terminated instance to be refused", func() bool {
		st, body = c.issuerToken(t, c.inst.Document, c.inst.PKCS7, "")
		return st != http.StatusOK
	})
	if st != http.StatusForbidden || !strings.Contains(body, `"instance_not_found"`) {
		t.Fatalf("replayed document of a terminated instance: %d %s, want 403 instance_not_found", st, body)
	}
	m := issuerMetrics(t, c)
	for _, reason := range []string{"launch_mismatch", "instance_not_found"} {
		if v, _ := m.Value("imdsproxy_issuer_attestation_failures_total", map[string]string{"method": "aws_iid", "reason": reason}); v < 1 {
			t.Errorf("attestation failures %s = %v", reason, v)
		}
	}
}
