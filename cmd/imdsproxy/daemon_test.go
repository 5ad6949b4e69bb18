package main

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/imdsproxy/imdsproxy/admin"
	"github.com/imdsproxy/imdsproxy/creds"
	"github.com/imdsproxy/imdsproxy/test/e2e"
	"github.com/imdsproxy/imdsproxy/test/fakes/oidc"
	"github.com/imdsproxy/imdsproxy/test/fakes/rolesanywhere"
	"github.com/imdsproxy/imdsproxy/test/fakes/sts"
)

type testDaemon struct {
	d       *daemon
	sts     *sts.Server
	issuer  *oidc.Issuer
	cfgPath string
	logs    *e2e.LockedBuffer
	admin   http.Handler
}

// startDaemon wires the real daemon in process against a fake STS, with the
// given extra YAML appended to a working config.
func startDaemon(t *testing.T, extra string) *testDaemon {
	t.Helper()
	return startDaemonWith(t, extra, http.NotFoundHandler())
}

// startDaemonWith is startDaemon with imds as the real IMDS.
func startDaemonWith(t *testing.T, extra string, imds http.Handler) *testDaemon {
	t.Helper()
	issuer := oidc.Start(t)
	fake := sts.Start(t, sts.Config{Issuer: issuer})
	upstream := httptest.NewServer(imds)
	t.Cleanup(upstream.Close)
	dir := t.TempDir()
	tokenPath := filepath.Join(dir, "token.jwt")
	if err := oidc.WriteTokenFile(tokenPath, issuer.Mint(oidc.Claims{})); err != nil {
		t.Fatal(err)
	}
	isolateAWSEnv(t, dir)
	t.Setenv("AWS_ENDPOINT_URL_STS", fake.URL)
	cfgPath := filepath.Join(dir, "config.yaml")
	cfgText := fmt.Sprintf(`listen: 127.0.0.1:0
admin_listen: 127.0.0.1:1
upstream: %s
role: {arn: "arn:aws:iam::222222222222:role/app", session_name: test-host}
identity: {jwt_file: %s}
cache: {backoff_initial: 100ms, backoff_max: 1s, expiry_margin: 2s}
%s`, upstream.URL, tokenPath, extra)
	d, logs := runDaemon(t, cfgPath, cfgText)
	return &testDaemon{d: d, sts: fake, issuer: issuer, cfgPath: cfgPath, logs: logs, admin: admin.Handler(d.gatherer(), d)}
}

// isolateAWSEnv keeps the SDK of an in-process daemon from this machine's
// AWS settings: no profile, keys or endpoint, no shared files (dir has
// none), region us-east-1.
func isolateAWSEnv(t *testing.T, dir string) {
	t.Helper()
	for _, k := range []string{"AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"} {
		t.Setenv(k, "")
	}
	t.Setenv("AWS_CONFIG_FILE", filepath.Join(dir, "none"))
	t.Setenv("AWS_SHARED_CREDENTIALS_FILE", filepath.Join(dir, "none"))
	t.Setenv("AWS_REGION", "us-east-1")
}

// runDaemon writes cfgText to cfgPath and builds the daemon of that file in
// process, logging at debug level into the returned buffer; its cache runs
// until the test ends. Nothing listens: tests call its parts.
func runDaemon(t *testing.T, cfgPath, cfgText string) (*daemon, *e2e.LockedBuffer) {
	t.Helper()
	if err := os.WriteFile(cfgPath, []byte(cfgText), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := loadConfig(cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	logs := &e2e.LockedBuffer{}
	log, _ := newLogger("json", "debug", logs)
	d, err := newDaemon(context.Background(), cfgPath, cfg, log, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = d.cache.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	return d, logs
}

// hostKey is the key of the daemon's own role in force.
func (td *testDaemon) hostKey() creds.Key { return td.d.snap.Load().gen.hostKey }

// ready waits until the daemon reports ready, at most 10s.
func (td *testDaemon) ready(t *testing.T) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		st := td.d.Status()
		if st.Ready {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("not ready: %s", st.ReadyReason)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// imds sends one request through the IMDS handler with a fresh session
// token; it returns the status and the body.
func (td *testDaemon) imds(t *testing.T, path string) (int, string) {
	t.Helper()
	h := td.d.proxy.Handler()
	put := httptest.NewRequest(http.MethodPut, "/latest/api/token", nil)
	put.Header.Set("X-aws-ec2-metadata-token-ttl-seconds", "60")
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, put)
	get := httptest.NewRequest(http.MethodGet, path, nil)
	get.Header.Set("X-aws-ec2-metadata-token", rec.Body.String())
	rec = httptest.NewRecorder()
	h.ServeHTTP(rec, get)
	return rec.Code, rec.Body.String()
}

// rewrite replaces old with new in the config file and reloads; it returns
// the reload's error.
func (td *testDaemon) rewrite(t *testing.T, old, new string) error {
	t.Helper()
	data, err := os.ReadFile(td.cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(data), old) {
		t.Fatalf("config has no %q:\n%s", old, data)
	}
	if err := os.WriteFile(td.cfgPath, []byte(strings.Replace(string(data), old, new, 1)), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err = td.d.tryReload(context.Background())
	return err
}

func (td *testDaemon) get(t *testing.T, path string) (int, string) {
	t.Helper()
	rec := httptest.NewRecorder()
	req := httptest.NewRequest(http.MethodGet, path, nil)
	req.Host = "127.0.0.1:8170"
	td.admin.ServeHTTP(rec, req)
	b, _ := io.ReadAll(rec.Result().Body)
	return rec.Code, string(b)
}

func TestDaemonMetricsLintAndAdmin(t *testing.T) {
	td := startDaemon(t, "")
	if code, body := td.get(t, "/readyz"); code != http.StatusServiceUnavailable || !strings.Contains(body, "not fetched yet") {
		t.Fatalf("readyz before prefetch = %d %q", code, body)
	}
	if err := td.d.cache.Prefetch(context.Background(), td.hostKey()); err != nil {
		t.Fatal(err)
	}
	if code, body := td.get(t, "/readyz"); code != http.StatusOK || !strings.Contains(body, "ready: credentials for role app") {
		t.Fatalf("readyz = %d %q", code, body)
	}
	if code, _ := td.get(t, "/healthz"); code != http.StatusOK {
		t.Fatalf("healthz = %d", code)
	}
	// DNS rebinding: a request naming another host is refused.
	rebound := httptest.NewRequest(http.MethodGet, "/debug/status", nil)
	rebound.Host = "attacker.example:8170"
	rec := httptest.NewRecorder()
	td.admin.ServeHTTP(rec, rebound)
	if rec.Code != http.StatusForbidden {
		t.Fatalf("admin request with Host attacker.example = %d, want 403", rec.Code)
	}
	// One credential request through the IMDS handler, so request metrics exist.
	code, body := td.imds(t, "/latest/meta-data/iam/security-credentials/app")
	issued, _ := td.sts.Last()
	if code != http.StatusOK || !strings.Contains(body, issued.AccessKeyID) {
		t.Fatalf("credentials = %d %s", code, body)
	}

	problems, err := testutil.GatherAndLint(td.d.gatherer())
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("promlint: %s: %s", p.Metric, p.Text)
	}
	_, metrics := td.get(t, "/metrics")
	// Exported only with other identity sources than this test's jwt_file;
	// the token package's tests lint them.
	otherSources := map[string]bool{
		"imdsproxy_identity_token_fetches_total":                  true,
		"imdsproxy_identity_certificate_loads_total":              true,
		"imdsproxy_identity_certificate_expiry_timestamp_seconds": true,
	}
	for _, name := range documentedMetrics(t) {
		if strings.HasPrefix(name, "imdsproxy_rollout_") {
			continue // exported with a rollout policy: TestDaemonRollout
		}
		if strings.HasPrefix(name, "imdsproxy_container_") || strings.HasPrefix(name, "imdsproxy_process_") {
			continue // exported with the front doors enabled: TestDaemonFrontDoors
		}
		if !otherSources[name] && !strings.Contains(metrics, name) {
			t.Errorf("documented metric %s is not exported", name)
		}
	}
	code, status := td.get(t, "/debug/status")
	if code != http.StatusOK || !strings.Contains(status, `"ready": true`) || !strings.Contains(status, issued.AccessKeyID) ||
		!strings.Contains(status, `"enabled": false`) || strings.Contains(status, issued.SecretAccessKey) || strings.Contains(status, issued.SessionToken) {
		t.Fatalf("debug/status = %d %s", code, status)
	}
	_, dbg := td.get(t, "/debug/cache")
	if !strings.Contains(dbg, issued.AccessKeyID) || strings.Contains(dbg, issued.SecretAccessKey) || strings.Contains(dbg, issued.SessionToken) {
		t.Fatalf("debug/cache must show the key id and no secret: %s", dbg)
	}
	for _, secret := range []string{issued.SecretAccessKey, issued.SessionToken} {
		if strings.Contains(td.logs.String(), secret) || strings.Contains(metrics, secret) {
			t.Fatal("a secret reached the logs or the metrics")
		}
	}
}

// documentedMetrics lists every metric name docs/metrics.md documents.
func documentedMetrics(t *testing.T) []string {
	t.Helper()
	return documentedMetricsIn(t, "docs/metrics.md")
}

// documentedMetricsIn lists every metric name the tables of doc (a path
// relative to the repository root) document: the rows starting with
// | `imdsproxy_.
func documentedMetricsIn(t *testing.T, doc string) []string {
	t.Helper()
	data, err := os.ReadFile("../../" + doc)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, line := range strings.Split(string(data), "\n") {
		if !strings.HasPrefix(line, "| `imdsproxy_") {
			continue
		}
		name := strings.TrimPrefix(line, "| `")
		name = name[:strings.IndexByte(name, '`')]
		if i := strings.IndexByte(name, '{'); i >= 0 {
			name = name[:i]
		}
		names = append(names, name)
	}
	if len(names) < 10 {
		t.Fatalf("%s documents only %d metrics", doc, len(names))
	}
	return names
}

// TestDaemonReload: a bad file is refused and changes nothing; a good one
// applies whole (a new role name is listed and its credentials fetched); a
// file changing a restart-only setting is refused, says so, and applies
// nothing else.
func TestDaemonReload(t *testing.T) {
	td := startDaemon(t, "")
	td.d.warm(context.Background())
	td.ready(t)
	orig, _ := os.ReadFile(td.cfgPath)

	if err := os.WriteFile(td.cfgPath, []byte("imds: {tokens: sometimes}\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	td.d.reloadConfig(context.Background())
	st := td.d.Status()
	if st.Config.LastReloadOK || !strings.Contains(st.Config.LastReloadError, "imds.tokens") {
		t.Fatalf("bad reload not reported: %+v", st.Config)
	}
	if v := metricValue(t, td.d.reg, "imdsproxy_config_last_reload_successful"); v != 0 {
		t.Fatalf("imdsproxy_config_last_reload_successful = %v after a refused reload", v)
	}
	if td.d.snap.Load().gen.cfg.IMDS.Tokens != "required" {
		t.Fatal("bad reload changed the config")
	}
	if err := os.WriteFile(td.cfgPath, orig, 0o600); err != nil {
		t.Fatal(err)
	}

	if err := td.rewrite(t, "session_name: test-host}", "session_name: test-host, name: renamed}"); err != nil {
		t.Fatalf("good reload: %v", err)
	}
	td.d.warm(context.Background())
	td.ready(t)
	if _, got := td.imds(t, "/latest/meta-data/iam/security-credentials/"); got != "renamed" {
		t.Fatalf("listing after reload = %q", got)
	}

	gen := td.d.snap.Load().plan.Gen()
	err := td.rewrite(t, "listen: 127.0.0.1:0", "listen: 127.0.0.1:2")
	if err == nil || !strings.Contains(err.Error(), "listen") || !strings.Contains(err.Error(), "restart") {
		t.Fatalf("reload changing listen = %v, want a refusal naming listen and the restart", err)
	}
	td.d.reload.Record(err, []string{"listen"})
	if g := td.d.snap.Load().plan.Gen(); g != gen {
		t.Fatalf("a refused reload published generation %d", g)
	}
	st = td.d.Status()
	if len(st.Config.RestartNeeded) != 1 || st.Config.RestartNeeded[0] != "listen" || metricValue(t, td.d.reg, "imdsproxy_config_restart_required") != 1 {
		t.Fatalf("restart needed not reported: %+v", st.Config)
	}
	var out bytes.Buffer
	admin.PrintStatus(&out, "x", st, time.Now())
	if !strings.Contains(out.String(), "restart") || !strings.Contains(out.String(), "NEEDED: listen") {
		t.Fatalf("imdsproxy status does not say a restart is needed:\n%s", out.String())
	}
}

// TestDaemonReloadKeepsCredentials: a reload that does not touch the
// identity keeps the exchanges, so the cached credentials stay and nothing
// is fetched anew.
func TestDaemonReloadKeepsCredentials(t *testing.T) {
	td := startDaemon(t, "")
	td.d.warm(context.Background())
	td.ready(t)
	calls := td.sts.Calls()
	if err := td.rewrite(t, "backoff_max: 1s", "backoff_max: 2s"); err != nil {
		t.Fatal(err)
	}
	td.d.warm(context.Background())
	if n := td.sts.Calls(); n != calls {
		t.Fatalf("a reload of cache settings called STS %d more times", n-calls)
	}
	if e, ok := td.d.cache.Lookup(td.hostKey()); !ok || !e.Valid {
		t.Fatal("the cached credentials were dropped by the reload")
	}
}

// TestDaemonReloadAddsWorkload: docs/configuration.md (Workloads): a
// reload that adds a workload fetches its role at once, and the roles that
// did not change keep their cached credentials (nothing is fetched anew for
// them).
func TestDaemonReloadAddsWorkload(t *testing.T) {
	td := startDaemon(t, `workloads:
  - {uid: 1001, role: {arn: "arn:aws:iam::222222222222:role/w1", name: w1}}
`)
	ctx := context.Background()
	keyOf := func(name string) creds.Key {
		t.Helper()
		for _, k := range td.d.snap.Load().gen.workloadKeys {
			if k.Role.Name == name {
				return k
			}
		}
		t.Fatalf("no workload key %s", name)
		return creds.Key{}
	}
	validWithin := func(k creds.Key) creds.Credentials {
		t.Helper()
		for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(20 * time.Millisecond) {
			if cr, err := td.d.cache.GetWithin(ctx, k, time.Nanosecond); err == nil {
				return cr
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s not fetched", k)
			}
		}
	}
	td.d.warm(ctx)
	host, w1 := validWithin(td.hostKey()), validWithin(keyOf("w1"))
	calls := td.sts.Calls()

	if err := td.rewrite(t, "name: w1}}\n", "name: w1}}\n  - {uid: 1002, role: {arn: \"arn:aws:iam::222222222222:role/w2\", name: w2}}\n"); err != nil {
		t.Fatal(err)
	}
	td.d.warm(ctx) // what reloadConfig runs after a reload
	validWithin(keyOf("w2"))
	if n := td.sts.Calls() - calls; n != 1 {
		t.Errorf("the reload adding one workload called STS %d times, want 1 (the new role only)", n)
	}
	if cr := validWithin(td.hostKey()); cr.AccessKeyID != host.AccessKeyID {
		t.Errorf("the host's credentials changed across the reload: %s, was %s", cr.AccessKeyID, host.AccessKeyID)
	}
	if cr := validWithin(keyOf("w1")); cr.AccessKeyID != w1.AccessKeyID {
		t.Errorf("the unchanged workload's credentials changed across the reload: %s, was %s", cr.AccessKeyID, w1.AccessKeyID)
	}
}

// TestDaemonReloadForgetsDurationCap: docs/configuration.md (role.duration):
// when STS refuses the configured duration as longer than the role's
// MaxSessionDuration the daemon asks for 1h "until the next reload or
// restart". The operator raises MaxSessionDuration and reloads (a reload
// that keeps the exchange): the next fetch asks for the configured duration
// again.
func TestDaemonReloadForgetsDurationCap(t *testing.T) {
	td := startDaemon(t, "")
	td.sts.SetMaxSessionDuration(time.Hour)
	if err := td.rewrite(t, "session_name: test-host}", "session_name: test-host, duration: 2h}"); err != nil {
		t.Fatal(err)
	}
	asked := func() []int {
		t.Helper()
		if err := td.d.cache.Prefetch(context.Background(), td.hostKey()); err != nil {
			t.Fatal(err)
		}
		var ds []int
		for _, c := range td.sts.CallLog() {
			ds = append(ds, c.DurationSeconds)
		}
		return ds
	}
	if got := asked(); !slices.Equal(got[len(got)-2:], []int{7200, 3600}) {
		t.Fatalf("DurationSeconds asked %v; want 7200 refused, then 3600", got)
	}
	if got := asked(); got[len(got)-1] != 3600 {
		t.Fatalf("DurationSeconds asked %v; want the cap (3600) kept before the reload", got)
	}
	td.sts.SetMaxSessionDuration(12 * time.Hour)
	if err := td.rewrite(t, "backoff_max: 1s", "backoff_max: 2s"); err != nil {
		t.Fatal(err)
	}
	if got := asked(); got[len(got)-1] != 7200 {
		t.Fatalf("DurationSeconds asked %v; want the configured 7200 after the reload", got)
	}
}

// TestBuildWarnsAboutIAMAttestation: the daemon warns, as check-config
// does, whenever it builds a generation (start, every reload) of a config
// where aws_iam attestation, workload subjects and a rollout meet
// (docs/security.md, "Workload tokens and the instance profile"); not for
// the running config without them.
func TestBuildWarnsAboutIAMAttestation(t *testing.T) {
	td := startDaemonWith(t, "", standInIMDS(t))
	if strings.Contains(td.logs.String(), "identity.attestation aws_iam") {
		t.Fatal("warned about aws_iam attestation for a config without it")
	}
	cfg, err := loadConfig("testdata/good/iam-subjects-rollout.yaml")
	if err != nil {
		t.Fatal(err)
	}
	cfg.Upstream = td.d.snap.Load().gen.cfg.Upstream // the stand-in, on loopback
	if _, err := td.d.build(context.Background(), cfg, nil); err != nil {
		t.Fatalf("build: %v", err)
	}
	warned := false
	for line := range strings.Lines(td.logs.String()) {
		var e struct{ Level, Msg string }
		if json.Unmarshal([]byte(line), &e) == nil && e.Level == "warn" && e.Msg == iamAttestationWarning {
			warned = true
		}
	}
	if !warned {
		t.Fatalf("no warning about aws_iam attestation with subjects and a rollout; logs:\n%s", td.logs.String())
	}
}

func TestReadinessReportsPermanentErrors(t *testing.T) {
	td := startDaemon(t, "")
	td.sts.SetMode(sts.ModeAccessDenied)
	if err := td.d.cache.Prefetch(context.Background(), td.hostKey()); err == nil {
		t.Fatal("prefetch succeeded against a denying STS")
	}
	st := td.d.Status()
	if st.Ready || !strings.Contains(st.ReadyReason, "access_denied") {
		t.Fatalf("readiness = %v %q, want not ready naming access_denied", st.Ready, st.ReadyReason)
	}
}

// The Roles Anywhere resources of the in-process roles-anywhere daemon.
const (
	raTrustAnchor = "arn:aws:rolesanywhere:us-east-1:222222222222:trust-anchor/0b8c3f1e-1111-2222-3333-444455556666"
	raProfile     = "arn:aws:rolesanywhere:us-east-1:222222222222:profile/7c9a1b2c-1111-2222-3333-444455556666"
)

// raDaemon is an in-process daemon with source roles-anywhere in front of
// the fake Roles Anywhere, and the CreateSession bodies it sent.
type raDaemon struct {
	*testDaemon
	fake *rolesanywhere.Server

	mu     sync.Mutex
	bodies [][]byte
}

// sent returns the CreateSession request bodies so far.
func (r *raDaemon) sent() [][]byte {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([][]byte(nil), r.bodies...)
}

// startRolesAnywhereDaemon wires the real daemon in process with source
// roles-anywhere against the fake Roles Anywhere (trusting a new CA that
// issued the host's certificate) and standInIMDS as the real IMDS (so the
// instance id is known); roleExtra is appended inside the role: mapping.
func startRolesAnywhereDaemon(t *testing.T, roleExtra string) *raDaemon {
	t.Helper()
	ca, err := rolesanywhere.NewCA()
	if err != nil {
		t.Fatal(err)
	}
	fake := rolesanywhere.Start(t, rolesanywhere.Config{
		Roots: ca.Pool(), TrustAnchorARN: raTrustAnchor, ProfileARN: raProfile, RoleARN: "arn:aws:iam::222222222222:role/app",
	})
	rd := &raDaemon{fake: fake}
	// In front of the fake: records each body as sent.
	front := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		rd.mu.Lock()
		rd.bodies = append(rd.bodies, b)
		rd.mu.Unlock()
		r.Body = io.NopCloser(bytes.NewReader(b))
		fake.Handler().ServeHTTP(w, r)
	}))
	t.Cleanup(front.Close)
	upstream := httptest.NewServer(standInIMDS(t))
	t.Cleanup(upstream.Close)

	dir := t.TempDir()
	leaf, err := ca.Issue(rolesanywhere.LeafOptions{Key: rolesanywhere.ECP256})
	if err != nil {
		t.Fatal(err)
	}
	certPath, keyPath, chainPath, err := leaf.WriteFiles(dir)
	if err != nil {
		t.Fatal(err)
	}
	isolateAWSEnv(t, dir)
	t.Setenv("AWS_ENDPOINT_URL_ROLESANYWHERE", front.URL)
	cfgPath := filepath.Join(dir, "config.yaml")
	cfgText := fmt.Sprintf(`listen: 127.0.0.1:0
admin_listen: 127.0.0.1:1
upstream: %s
role: {arn: "arn:aws:iam::222222222222:role/app"%s}
source: roles-anywhere
identity:
  x509: {cert: %q, key: %q, chain: %q}
roles_anywhere: {trust_anchor_arn: %s, profile_arn: %s}
cache: {backoff_initial: 100ms, backoff_max: 1s, expiry_margin: 2s}
workloads:
  - {uid: 1001, role: {arn: "arn:aws:iam::222222222222:role/app", name: w1}}
  - {uid: 1002, role: {arn: "arn:aws:iam::222222222222:role/app", name: w2, session_name: own-name}}
`, upstream.URL, roleExtra, certPath, keyPath, chainPath, raTrustAnchor, raProfile)
	d, logs := runDaemon(t, cfgPath, cfgText)
	rd.testDaemon = &testDaemon{d: d, cfgPath: cfgPath, logs: logs, admin: admin.Handler(d.gatherer(), d)}
	return rd
}

// TestRolesAnywhereSessionNameOnlyWhenConfigured: CreateSession carries
// roleSessionName only when role.session_name is configured (WIRE.md §10:
// "plus roleSessionName only when asked for"; §5.2: it needs the profile's
// acceptRoleSessionName). The daemon's default session name, the instance
// id (or the host name), is never sent to Roles Anywhere; a workload's
// defaults to the host's configured one (docs/configuration.md).
func TestRolesAnywhereSessionNameOnlyWhenConfigured(t *testing.T) {
	const instanceID = "i-0123456789abcdef0" // standInIMDS's
	for _, tc := range []struct {
		name      string
		roleExtra string
		want      string // roleSessionName sent; "" none
	}{
		{"not configured", "", ""},
		{"configured", ", session_name: ops-session", "ops-session"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rd := startRolesAnywhereDaemon(t, tc.roleExtra)
			gen := rd.d.snap.Load().gen
			if rd.d.instanceID != instanceID || gen.session != cmp.Or(tc.want, instanceID) {
				t.Fatalf("instance id %q, daemon session name %q; want %q and %q", rd.d.instanceID, gen.session, instanceID, cmp.Or(tc.want, instanceID))
			}
			if got := rd.hostKey().Role.SessionName; got != tc.want {
				t.Fatalf("host key session name %q, want %q", got, tc.want)
			}
			if got := gen.workloadKeys[0].Role.SessionName; got != tc.want {
				t.Errorf("a workload without a session name of its own: %q, want the host's configured %q", got, tc.want)
			}
			if got := gen.workloadKeys[1].Role.SessionName; got != "own-name" {
				t.Errorf("a workload with its own session name: %q, want own-name", got)
			}
			code, body := rd.imds(t, "/latest/meta-data/iam/security-credentials/app")
			if code != http.StatusOK || !strings.Contains(body, `"Code" : "Success"`) {
				t.Fatalf("credentials: %d %q\ncalls: %+v", code, body, rd.fake.CallLog())
			}
			sent := rd.sent()
			if len(sent) == 0 {
				t.Fatal("no CreateSession sent")
			}
			for i, b := range sent {
				var req map[string]any
				if err := json.Unmarshal(b, &req); err != nil {
					t.Fatalf("CreateSession %d body %q: %v", i, b, err)
				}
				got, present := req["roleSessionName"]
				switch {
				case tc.want == "" && present:
					t.Errorf("CreateSession %d sent roleSessionName %v, want none: %s", i, got, b)
				case tc.want != "" && got != tc.want:
					t.Errorf("CreateSession %d sent roleSessionName %v, want %q: %s", i, got, tc.want, b)
				}
				if _, ok := req["sessionName"]; ok {
					t.Errorf("CreateSession %d sent the deprecated sessionName: %s", i, b)
				}
			}
		})
	}
}

// standInIMDS is an IMDSv2 stand-in with an instance id, a group tag and
// valid instance-profile credentials.
func standInIMDS(t *testing.T) http.Handler {
	t.Helper()
	mux := http.NewServeMux()
	mux.HandleFunc("PUT /latest/api/token", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("X-aws-ec2-metadata-token-ttl-seconds", "21600")
		_, _ = w.Write([]byte("upstream-token"))
	})
	text := func(body string) http.HandlerFunc {
		return func(w http.ResponseWriter, r *http.Request) {
			if r.Header.Get("X-aws-ec2-metadata-token") != "upstream-token" {
				w.WriteHeader(http.StatusUnauthorized)
				return
			}
			_, _ = w.Write([]byte(body))
		}
	}
	mux.HandleFunc("GET /latest/meta-data/instance-id", text("i-0123456789abcdef0"))
	mux.HandleFunc("GET /latest/meta-data/tags/instance/{key}", text("api-asg"))
	mux.HandleFunc("GET /latest/meta-data/iam/security-credentials/", text("ip-role"))
	mux.HandleFunc("GET /latest/meta-data/iam/info", text(`{"Code":"Success","LastUpdated":"2026-01-01T00:00:00Z","InstanceProfileArn":"arn:aws:iam::111111111111:instance-profile/ip-role","InstanceProfileId":"AIPAEXAMPLE"}`))
	mux.HandleFunc("GET /latest/meta-data/iam/security-credentials/ip-role", func(w http.ResponseWriter, r *http.Request) {
		text(fmt.Sprintf(`{"Code":"Success","LastUpdated":"2026-01-01T00:00:00Z","Type":"AWS-HMAC","AccessKeyId":"ASIAINSTANCEPROFILE1","SecretAccessKey":"ipsecret","Token":"iptoken","Expiration":%q}`,
			time.Now().Add(6*time.Hour).UTC().Format(time.RFC3339)))(w, r)
	})
	return mux
}

// TestDaemonRollout wires a rollout in process: the policy decides what is
// listed and served; a rewritten policy re-read on reload switches it; every
// rollout setting applies on reload (policy source, fallback), and the
// rollout can be turned off and on again; the rollout metrics are exported
// and lint-clean.
func TestDaemonRollout(t *testing.T) {
	dir := t.TempDir()
	policy := filepath.Join(dir, "rollout.yaml")
	if err := os.WriteFile(policy, []byte("version: v1\ndefault: off\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	td := startDaemonWith(t, fmt.Sprintf("rollout: {policy: %s, poll_interval: 1h}\n", policy), standInIMDS(t))
	ctx := context.Background()
	if !td.d.warm(ctx) {
		t.Fatal("instance-profile credentials not cached for stage off")
	}
	list := func() string {
		_, body := td.imds(t, "/latest/meta-data/iam/security-credentials/")
		return body
	}
	if got := list(); got != "ip-role" {
		t.Fatalf("stage off lists %q, want the instance profile's role", got)
	}

	if err := os.WriteFile(policy, []byte("version: v2\ndefault: off\ngroups: {api-asg: on}\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	td.d.reloadConfig(ctx) // SIGHUP re-reads the policy
	if !td.d.warm(ctx) {
		t.Fatal("workload credentials not cached for stage on")
	}
	if got := list(); got != "app" {
		t.Fatalf("stage on lists %q, want the workload role", got)
	}
	_, status := td.get(t, "/debug/status")
	for _, want := range []string{`"enabled": true`, `"stage": "on"`, `"group": "api-asg"`, `"version": "v2"`} {
		if !strings.Contains(status, want) {
			t.Errorf("debug/status lacks %s:\n%s", want, status)
		}
	}

	// The emergency rollback of docs/rollout.md: point rollout.policy at a
	// local file with the kill switch, and reload.
	kill := filepath.Join(dir, "kill.yaml")
	if err := os.WriteFile(kill, []byte("version: emergency\nkill_switch: true\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := td.rewrite(t, "policy: "+policy, "policy: "+kill); err != nil {
		t.Fatal(err)
	}
	if got := list(); got != "ip-role" {
		t.Fatalf("after the kill switch the listing is %q, want the instance profile's role", got)
	}
	st := td.d.Status()
	if !st.Rollout.KillSwitch || st.Rollout.Policy.Source != kill || st.ServedKind != "instance-profile" {
		t.Fatalf("status after the kill switch: %+v", st.Rollout)
	}

	// rollout.fallback applies on reload.
	if err := os.WriteFile(kill, []byte("version: v3\ndefault: on\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := td.rewrite(t, "poll_interval: 1h}", "poll_interval: 1h, fallback: instance-profile}"); err != nil {
		t.Fatal(err)
	}
	td.sts.SetMode(sts.ModeFail5xx)
	td.d.cache.Keep(nil) // forget the workload credentials: the next request must fall back
	td.d.mu.Lock()
	_ = td.d.republishLocked()
	td.d.mu.Unlock()
	code, body := td.imds(t, "/latest/meta-data/iam/security-credentials/app")
	if code != http.StatusOK || !strings.Contains(body, "ASIAINSTANCEPROFILE1") {
		t.Fatalf("with rollout.fallback: instance-profile and STS failing: %d %s", code, body)
	}
	td.sts.SetMode(sts.ModeOK)

	problems, err := testutil.GatherAndLint(td.d.gatherer())
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("promlint: %s: %s", p.Metric, p.Text)
	}
	_, metrics := td.get(t, "/metrics")
	for _, name := range documentedMetrics(t) {
		if strings.HasPrefix(name, "imdsproxy_rollout_") && !strings.Contains(metrics, name) {
			t.Errorf("documented metric %s is not exported under a rollout", name)
		}
	}

	// No rollout any more: the configured role, and the rollout reported off.
	if err := td.rewrite(t, fmt.Sprintf("rollout: {policy: %s, poll_interval: 1h, fallback: instance-profile}", kill), ""); err != nil {
		t.Fatal(err)
	}
	if got := list(); got != "app" {
		t.Fatalf("without a rollout the listing is %q", got)
	}
	if st := td.d.Status(); st.Rollout.Enabled || st.ServedKind != "workload" {
		t.Fatalf("status without a rollout: %+v", st.Rollout)
	}
	if strings.Contains(td.logs.String(), "ipsecret") || strings.Contains(metrics, "ipsecret") {
		t.Fatal("the instance profile's secret reached the logs or metrics")
	}
}

// metricValue is the value of an unlabelled gauge of reg.
func metricValue(t *testing.T, reg prometheus.Gatherer, name string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name && len(mf.GetMetric()) == 1 {
			return mf.GetMetric()[0].GetGauge().GetValue()
		}
	}
	t.Fatalf("no metric %s", name)
	return 0
}
