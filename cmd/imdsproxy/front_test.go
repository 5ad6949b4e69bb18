package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/imdsproxy/imdsproxy/credproc"
)

// TestFrontDoorConfig: the container: and credential_process: sections,
// validated by their packages, named in errors, and restart-only where
// they open sockets or add addresses.
func TestFrontDoorConfig(t *testing.T) {
	cfg, err := loadConfig("testdata/good/front.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if !cfg.Container.Enabled || cfg.Container.Path != "/v1/credentials" || cfg.Container.TokenDir != "/run/imdsproxy/container" ||
		cfg.CredProcess.Socket != "/run/imdsproxy/credentials.sock" || cfg.CredProcess.SocketMode != "0660" {
		t.Errorf("defaults and values: %+v %+v", cfg.Container, cfg.CredProcess)
	}
	base := "role: {arn: \"arn:aws:iam::222222222222:role/app\"}\nidentity: {jwt_file: /run/t.jwt}\n"
	wl := "workloads: [{uid: 1001, role: {arn: \"arn:aws:iam::444455556666:role/reports\"}}]\n"
	for _, tc := range []struct{ yaml, key string }{
		{base + "container: {enabled: true}\n", "container.enabled"},
		{base + wl + "container: {enabled: true, listen: [\"0.0.0.0:80\"]}\n", "container.listen[0]"},
		{base + wl + "container: {path: v1}\n", "container.path"},
		{base + wl + "container: {rotate_interval: 1s}\n", "container.rotate_interval"},
		{base + wl + "container: {token_owners: {web.service: 1}}\n", "container.token_owners"},
		{base + wl + "container: {nope: 1}\n", "container.nope"},
		{base + "credential_process: {socket: relative.sock}\n", "credential_process.socket"},
		{base + "credential_process: {socket_mode: \"0888\"}\n", "credential_process.socket_mode"},
	} {
		if _, err := parseConfig([]byte(tc.yaml)); err == nil || !strings.Contains(err.Error(), tc.key) {
			t.Errorf("config %q: error %v, want one naming %s", tc.yaml, err, tc.key)
		}
	}
	for _, tc := range []struct {
		change  func(*Config)
		restart []string
	}{
		{func(c *Config) { c.Container.Path = "/creds" }, nil},
		{func(c *Config) { c.Container.RotateInterval *= 2 }, nil},
		{func(c *Config) { c.Container.TokenOwners = nil }, nil},
		{func(c *Config) { c.Workloads = c.Workloads[:1] }, nil},
		{func(c *Config) { c.Container.Enabled = false }, []string{"container.enabled"}},
		{func(c *Config) { c.Container.Listen = c.Container.Listen[:1] }, []string{"container.listen"}},
		{func(c *Config) { c.Container.Link = "imdsproxy0" }, []string{"container.link"}},
		{func(c *Config) { c.Container.TokenDir = "/run/x" }, []string{"container.token_dir"}},
		{func(c *Config) { c.CredProcess.SocketMode = "0666" }, []string{"credential_process"}},
	} {
		next, _ := loadConfig("testdata/good/front.yaml")
		tc.change(&next)
		if got := cfg.restartOnly(next); !slices.Equal(got, tc.restart) {
			t.Errorf("restartOnly = %v, want %v", got, tc.restart)
		}
	}
}

// TestFrontDoorCommands: `imdsproxy workload env` and `imdsproxy
// credential-process` as a user runs them.
func TestFrontDoorCommands(t *testing.T) {
	noSocket := filepath.Join(t.TempDir(), "none.sock")
	for _, tc := range []struct {
		name             string
		args             []string
		code             int
		wantOut, wantErr string
	}{
		{"drop-in by unit", []string{"workload", "env", "--config", "testdata/good/front.yaml", "billing.service"}, exitOK,
			"Environment=AWS_CONTAINER_CREDENTIALS_FULL_URI=http://127.0.0.1:8171/v1/credentials\nEnvironment=AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE=/run/imdsproxy/container/billing.service/token\n", ""},
		{"drop-in by role name", []string{"workload", "env", "--config", "testdata/good/front.yaml", "reports"}, exitOK,
			"/run/imdsproxy/container/uid-1001/token", ""},
		{"docker", []string{"workload", "env", "--docker", "--config", "testdata/good/front.yaml", "uid:1001"}, exitOK,
			"--env AWS_CONTAINER_CREDENTIALS_FULL_URI=http://169.254.170.23/v1/credentials \\\n", ""},
		{"not enabled", []string{"workload", "env", "--config", "testdata/good/workloads.yaml", "billing.service"}, exitOK,
			"[Service]", "container.enabled is false"},
		{"unknown workload", []string{"workload", "env", "--config", "testdata/good/front.yaml", "web.service"}, exitConfig, "", "web.service"},
		{"no name", []string{"workload", "env", "--config", "testdata/good/front.yaml"}, exitUsage, "", "Usage: imdsproxy workload env"},
		{"no verb", []string{"workload"}, exitUsage, "", "Usage: imdsproxy workload env"},
		{"bad config", []string{"workload", "env", "--config", "testdata/bad/bad-tokens.yaml", "x"}, exitConfig, "", "imds.tokens"},
		{"no daemon", []string{"credential-process", "--socket", noSocket, "--timeout", "1s"}, exitError, "", "cannot reach the daemon at " + noSocket},
		{"bad role", []string{"credential-process", "--role", "a/b"}, exitUsage, "", "--role"},
		{"stray argument", []string{"credential-process", "x"}, exitUsage, "", "Usage: imdsproxy credential-process"},
		{"help", []string{"credential-process", "--help"}, exitOK, "", "credential_process = "},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var out, errOut bytes.Buffer
			code := run(context.Background(), tc.args, &out, &errOut)
			if code != tc.code || !strings.Contains(out.String(), tc.wantOut) || !strings.Contains(errOut.String(), tc.wantErr) {
				t.Fatalf("exit %d, want %d\nstdout: %s\nstderr: %s", code, tc.code, out.String(), errOut.String())
			}
			if tc.args[0] == "credential-process" && code != exitOK {
				if out.Len() != 0 || strings.Count(strings.TrimSuffix(errOut.String(), "\n"), "\n") != 0 && tc.code == exitError {
					t.Errorf("a failed credential-process must print nothing on stdout and one line on stderr: %q %q", out.String(), errOut.String())
				}
			}
		})
	}
	for _, cmd := range []string{"credential-process", "workload env", "SIGUSR1"} {
		if !strings.Contains(usageText, cmd) {
			t.Errorf("usage text does not mention %s", cmd)
		}
	}
}

// TestDaemonFrontDoors: a daemon with both doors serves a workload through
// each from the plan it published, reloads sync the tokens, and every
// documented metric of the doors is exported and lints.
func TestDaemonFrontDoors(t *testing.T) {
	dir := t.TempDir()
	uid := os.Getuid()
	wlARN := "arn:aws:iam::111122223333:role/front"
	sock := filepath.Join(dir, "c.sock")
	extra := fmt.Sprintf(`workloads: [{uid: %d, role: {arn: %q, name: front}}]
container: {enabled: true, link: "", token_dir: %q}
credential_process: {enabled: true, socket: %q}
`, uid, wlARN, filepath.Join(dir, "tokens"), sock)
	td := startDaemon(t, extra)
	td.sts.AllowRoles(wlARN)
	td.d.warm(context.Background())
	td.ready(t)
	tokFile := filepath.Join(dir, "tokens", fmt.Sprintf("uid-%d", uid), "token")
	tok, err := os.ReadFile(tokFile)
	if err != nil {
		t.Fatal(err)
	}
	// The container endpoint, by its handler (no connection: the token
	// decides).
	get := httptest.NewRequest(http.MethodGet, "/v1/credentials", nil)
	get.Header.Set("Authorization", string(tok))
	rec := httptest.NewRecorder()
	td.d.container.Handler().ServeHTTP(rec, get)
	var doc map[string]string
	_ = json.Unmarshal(rec.Body.Bytes(), &doc)
	if is, ok := td.sts.Find(doc["AccessKeyId"]); rec.Code != 200 || !ok || is.RoleARN != wlARN {
		t.Fatalf("container endpoint: %d, key of %q", rec.Code, is.RoleARN)
	}
	// The credential_process socket, served as run() serves it.
	ln, err := td.d.snap.Load().gen.cfg.CredProcess.Listen()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- td.d.process.Serve(ctx, ln) }()
	defer func() { cancel(); <-done }()
	cp, err := credproc.Fetch(context.Background(), credproc.Options{Socket: sock, Timeout: 10 * time.Second})
	if is, ok := td.sts.Find(cp.AccessKeyID); err != nil || !ok || is.RoleARN != wlARN {
		t.Fatalf("credential_process: %v, key of %q", err, is.RoleARN)
	}
	// A reload without the workload revokes its token and drops its file.
	if err := td.rewrite(t, fmt.Sprintf("workloads: [{uid: %d, role: {arn: %q, name: front}}]", uid, wlARN), "workloads: [{uid: 64999, role: {arn: \"arn:aws:iam::111122223333:role/other\"}}]"); err != nil {
		t.Fatal(err)
	}
	rec = httptest.NewRecorder()
	td.d.container.Handler().ServeHTTP(rec, get)
	if rec.Code != 401 {
		t.Errorf("the removed workload's token answers %d, want 401", rec.Code)
	}
	if _, err := os.Stat(tokFile); !os.IsNotExist(err) {
		t.Errorf("the removed workload's token file: %v", err)
	}
	if st := td.d.Status(); len(st.Doors) != 3 || st.Doors[1].Door != "container" || st.Doors[1].Tokens != 1 || st.Doors[2].Listen[0] != sock {
		t.Errorf("status doors %+v", st.Doors)
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
		if (strings.HasPrefix(name, "imdsproxy_container_") || strings.HasPrefix(name, "imdsproxy_process_")) && !strings.Contains(metrics, name) {
			t.Errorf("documented metric %s is not exported", name)
		}
	}
	for _, want := range []string{`imdsproxy_rollout_served_total{door="container",kind="workload"} 1`, `imdsproxy_rollout_served_total{door="process",kind="workload"} 1`} {
		if !strings.Contains(metrics, want) {
			t.Errorf("metrics lack %s", want)
		}
	}
	if strings.Contains(td.logs.String(), string(tok)) {
		t.Error("the log holds the container token")
	}
}
