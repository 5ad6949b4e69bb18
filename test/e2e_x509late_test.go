package test

// The X.509 identity files written only after the daemon started (issue 6):
// a certificate agent (SPIFFE, ACME, …) often comes up after imdsproxy. The
// daemon must start anyway, say in /readyz which file it waits for, and
// serve credentials as soon as the files are there, without a restart.

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/imdsproxy/imdsproxy/test/e2e"
	"github.com/imdsproxy/imdsproxy/test/fakes/rolesanywhere"
)

func TestX509FilesWrittenLate(t *testing.T) {
	t.Parallel()
	ca, fake := startRAFake(t)
	r := &raEnv{ca: ca, dir: t.TempDir(), fake: fake}
	// No cert.pem, key.pem or chain.pem yet.
	r.daemonEnv = startDaemon(t, envOptions{
		noWaitReady: true,
		identityYAML: func(e *daemonEnv) string {
			return fmt.Sprintf("role: {arn: %q, name: %s, duration: 1h}\nsource: roles-anywhere\nidentity:\n  x509: {cert: %q, key: %q, chain: %q}\nroles_anywhere: {trust_anchor_arn: %s, profile_arn: %s}\n",
				e2e.RoleARN, e2e.RoleName, r.path("cert.pem"), r.path("key.pem"), r.path("chain.pem"), raTrustAnchorARN, raProfileARN)
		},
		extraEnv:     []string{"AWS_ENDPOINT_URL_ROLESANYWHERE=" + fake.URL},
		extraSecrets: r.secrets,
	})
	pid := r.proc.Pid()

	// Not ready, naming the file it waits for; no credentials; nothing sent
	// to Roles Anywhere without an identity.
	body := r.drillWaitReadyz(t, http.StatusServiceUnavailable, 10*time.Second,
		"no valid credentials", ": identity: ", r.path("cert.pem"), "missing")
	t.Logf("/readyz without the files: %s", strings.TrimSpace(body))
	if d, err := r.fetchCreds(context.Background()); err == nil || d.AccessKeyId != "" {
		t.Errorf("credentials served without an identity: %v", err)
	}
	if !r.drillLogged("X.509 identity files not there yet; they are loaded when they appear", map[string]any{"path": r.path("cert.pem")}) {
		t.Errorf("no start-up log line naming the missing certificate\n%s", r.logTail(30))
	}
	if n := r.scrape(t).Sum("imdsproxy_identity_certificate_loads_total", map[string]string{"result": "missing"}); n < 1 {
		t.Errorf(`imdsproxy_identity_certificate_loads_total{result="missing"} = %v, want >= 1`, n)
	}

	// The agent writes the certificate and chain first (each atomically):
	// now the key is what is missing.
	l, err := ca.Issue(rolesanywhere.LeafOptions{Key: rolesanywhere.ECP256})
	if err != nil {
		t.Fatal(err)
	}
	r.mu.Lock()
	r.leaves = append(r.leaves, l)
	r.mu.Unlock()
	for _, f := range []struct {
		name string
		b    []byte
	}{{"cert.pem", l.CertPEM}, {"chain.pem", l.ChainPEM}} {
		if err := rolesanywhere.WriteFileAtomic(r.path(f.name), f.b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	r.drillWaitReadyz(t, http.StatusServiceUnavailable, 10*time.Second, r.path("key.pem"), "missing")
	if n := fake.Calls(); n != 0 {
		t.Errorf("Roles Anywhere called %d times before the identity was complete", n)
	}

	// Then the key: ready and serving, same process.
	written := time.Now()
	if err := rolesanywhere.WriteFileAtomic(r.path("key.pem"), l.KeyPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	r.waitReady(t, 15*time.Second)
	t.Logf("ready %v after the key was written", time.Since(written).Round(time.Millisecond))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	d, err := r.fetchCreds(ctx)
	if err != nil {
		t.Fatalf("no credentials after the files appeared: %v", err)
	}
	is, err := r.checkServedByFake(d)
	if err != nil {
		t.Fatal(err)
	}
	if is.Serial != l.Cert.SerialNumber.String() {
		t.Errorf("session created with certificate serial %s, want the one written (%s)", is.Serial, l.Cert.SerialNumber)
	}
	if r.exited() || r.proc.Pid() != pid {
		t.Errorf("the daemon restarted or exited")
	}
	if n := r.scrape(t).Sum("imdsproxy_identity_certificate_loads_total", map[string]string{"result": "ok"}); n != 1 {
		t.Errorf(`imdsproxy_identity_certificate_loads_total{result="ok"} = %v, want 1`, n)
	}
}
