package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.uber.org/zap"

	"github.com/imdsproxy/imdsproxy/test/fakes/oidc"
	"github.com/imdsproxy/imdsproxy/test/fakes/sts"
)

// syncBuffer is a goroutine-safe log sink.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

type testDaemon struct {
	d       *daemon
	sts     *sts.Server
	issuer  *oidc.Issuer
	cfgPath string
	logs    *syncBuffer
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
	for _, k := range []string{"AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"} {
		t.Setenv(k, "")
	}
	t.Setenv("AWS_CONFIG_FILE", filepath.Join(dir, "none"))
	t.Setenv("AWS_SHARED_CREDENTIALS_FILE", filepath.Join(dir, "none"))
	t.Setenv("AWS_REGION", "us-east-1")
	t.Setenv("AWS_ENDPOINT_URL_STS", fake.URL)
	cfgPath := filepath.Join(dir, "config.yaml")
	cfgText := fmt.Sprintf(`listen: 127.0.0.1:0
admin_listen: 127.0.0.1:1
upstream: %s
role: {arn: "arn:aws:iam::222222222222:role/app", session_name: test-host}
identity: {jwt_file: %s}
cache: {backoff_initial: 100ms, backoff_max: 1s, expiry_margin: 2s}
%s`, upstream.URL, tokenPath, extra)
	if err := os.WriteFile(cfgPath, []byte(cfgText), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := loadConfig(cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	logs := &syncBuffer{}
	log, _ := newLogger("json", "debug", logs)
	d, err := newDaemon(context.Background(), cfgPath, cfg, log, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = d.cache.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	return &testDaemon{d: d, sts: fake, issuer: issuer, cfgPath: cfgPath, logs: logs, admin: d.adminHandler()}
}

func (td *testDaemon) get(t *testing.T, path string) (int, string) {
	t.Helper()
	rec := httptest.NewRecorder()
	td.admin.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, path, nil))
	b, _ := io.ReadAll(rec.Result().Body)
	return rec.Code, string(b)
}

func TestDaemonMetricsLintAndAdmin(t *testing.T) {
	td := startDaemon(t, "")
	if code, body := td.get(t, "/readyz"); code != http.StatusServiceUnavailable || !strings.Contains(body, "not fetched yet") {
		t.Fatalf("readyz before prefetch = %d %q", code, body)
	}
	if err := td.d.cache.Prefetch(context.Background(), "app"); err != nil {
		t.Fatal(err)
	}
	if code, body := td.get(t, "/readyz"); code != http.StatusOK || !strings.Contains(body, "ready: credentials for role app") {
		t.Fatalf("readyz = %d %q", code, body)
	}
	if code, _ := td.get(t, "/healthz"); code != http.StatusOK {
		t.Fatalf("healthz = %d", code)
	}
	// One credential request through the IMDS handler, so request metrics exist.
	h := td.d.proxy.Handler()
	put := httptest.NewRequest(http.MethodPut, "/latest/api/token", nil)
	put.Header.Set("X-aws-ec2-metadata-token-ttl-seconds", "60")
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, put)
	get := httptest.NewRequest(http.MethodGet, "/latest/meta-data/iam/security-credentials/app", nil)
	get.Header.Set("X-aws-ec2-metadata-token", rec.Body.String())
	rec = httptest.NewRecorder()
	h.ServeHTTP(rec, get)
	issued, _ := td.sts.Last()
	if rec.Code != http.StatusOK || !strings.Contains(rec.Body.String(), issued.AccessKeyID) {
		t.Fatalf("credentials = %d %s", rec.Code, rec.Body.String())
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
	data, err := os.ReadFile("../../docs/metrics.md")
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
		t.Fatalf("docs/metrics.md documents only %d metrics", len(names))
	}
	return names
}

func TestDaemonReload(t *testing.T) {
	td := startDaemon(t, "")
	ctx := context.Background()
	if err := td.d.cache.Prefetch(ctx, "app"); err != nil {
		t.Fatal(err)
	}
	orig, _ := os.ReadFile(td.cfgPath)

	// A bad file is refused and nothing changes.
	if err := os.WriteFile(td.cfgPath, []byte("imds: {tokens: sometimes}\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := td.d.reload(ctx); err == nil || !strings.Contains(err.Error(), "imds.tokens") {
		t.Fatalf("bad reload: %v", err)
	}
	if td.d.config().IMDS.Tokens != "required" {
		t.Fatal("bad reload changed the config")
	}

	// A good file with a new role name swaps the listing and refetches.
	next := strings.Replace(string(orig), "session_name: test-host}", "session_name: test-host, name: renamed}", 1)
	if err := os.WriteFile(td.cfgPath, []byte(next), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := td.d.reload(ctx); err != nil {
		t.Fatalf("good reload: %v", err)
	}
	if got := *td.d.roleName.Load(); got != "renamed" {
		t.Fatalf("role name after reload = %q", got)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		if ok, _ := td.d.readiness(); ok {
			break
		}
		if time.Now().After(deadline) {
			_, why := td.d.readiness()
			t.Fatalf("not ready after reload: %s", why)
		}
		time.Sleep(20 * time.Millisecond)
	}
	rec := httptest.NewRecorder()
	put := httptest.NewRequest(http.MethodPut, "/latest/api/token", nil)
	put.Header.Set("X-aws-ec2-metadata-token-ttl-seconds", "60")
	td.d.proxy.Handler().ServeHTTP(rec, put)
	list := httptest.NewRequest(http.MethodGet, "/latest/meta-data/iam/security-credentials/", nil)
	list.Header.Set("X-aws-ec2-metadata-token", rec.Body.String())
	rec = httptest.NewRecorder()
	td.d.proxy.Handler().ServeHTTP(rec, list)
	if rec.Body.String() != "renamed" {
		t.Fatalf("listing after reload = %q", rec.Body.String())
	}
}

func TestReadinessReportsPermanentErrors(t *testing.T) {
	td := startDaemon(t, "")
	td.sts.SetMode(sts.ModeAccessDenied)
	err := td.d.cache.Prefetch(context.Background(), "app")
	if err == nil {
		t.Fatal("prefetch succeeded against a denying STS")
	}
	ok, why := td.d.readiness()
	if ok || !strings.Contains(why, "access_denied") {
		t.Fatalf("readiness = %v %q, want not ready naming access_denied", ok, why)
	}
	_ = zap.NewNop()
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
// listed and served, a rewritten policy re-read on reload switches it, and
// the rollout metrics are exported and lint-clean.
func TestDaemonRollout(t *testing.T) {
	policy := filepath.Join(t.TempDir(), "rollout.yaml")
	if err := os.WriteFile(policy, []byte("version: v1\ndefault: off\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	td := startDaemonWith(t, fmt.Sprintf("rollout: {policy: %s, poll_interval: 1h}\n", policy), standInIMDS(t))
	ctx := context.Background()
	if !td.d.startServing(ctx) {
		t.Fatal("instance-profile credentials not cached for stage off")
	}
	list := func() string {
		put := httptest.NewRequest(http.MethodPut, "/latest/api/token", nil)
		put.Header.Set("X-aws-ec2-metadata-token-ttl-seconds", "60")
		rec := httptest.NewRecorder()
		td.d.proxy.Handler().ServeHTTP(rec, put)
		get := httptest.NewRequest(http.MethodGet, "/latest/meta-data/iam/security-credentials/", nil)
		get.Header.Set("X-aws-ec2-metadata-token", rec.Body.String())
		rec2 := httptest.NewRecorder()
		td.d.proxy.Handler().ServeHTTP(rec2, get)
		return rec2.Body.String()
	}
	if got := list(); got != "ip-role" {
		t.Fatalf("stage off lists %q, want the instance profile's role", got)
	}
	if ok, why := td.d.readiness(); !ok {
		t.Fatalf("not ready in stage off: %s", why)
	}

	if err := os.WriteFile(policy, []byte("version: v2\ndefault: off\ngroups: {api-asg: on}\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	td.d.reloadRolloutPolicy(ctx)
	if !td.d.applyRollout(ctx) {
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
	if strings.Contains(td.logs.String(), "ipsecret") || strings.Contains(metrics, "ipsecret") {
		t.Fatal("the instance profile's secret reached the logs or metrics")
	}
}
