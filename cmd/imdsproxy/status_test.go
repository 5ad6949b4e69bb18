package main

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

const statusReadyCanary = `{"ready": true, "ready_reason": "ready: credentials for role app valid until 2026-11-25T13:00:00Z",
 "version": "1.4.0", "source": "web-identity", "role_arn": "arn:aws:iam::222222222222:role/app", "role_name": "app",
 "rollout": {"enabled": true, "stage": "canary", "percent": 10, "group": "api-asg", "group_source": "tag", "bucket": 734,
             "serve": "instance-profile", "shadow": false, "kill_switch": false,
             "reason": "group api-asg is canary 10%; bucket 734 is outside it", "fallback": "instance-profile",
             "policy": {"source": "s3://fleet-config/imdsproxy/rollout.yaml", "version": "2026-11-25.1",
                        "last_load": "2026-11-25T12:00:00Z", "last_success": "2026-11-25T12:00:00Z", "last_error": ""},
             "shadow_status": {"last_check": "2026-11-25T11:58:00Z", "last_result": "success",
                               "last_arn": "arn:aws:sts::222222222222:assumed-role/app/i-0aaaabbbbccccdddd", "last_error": ""},
             "workloads": {"configured": 2, "active": false}},
 "served_role_name": "instance-role", "served_kind": "instance-profile",
 "config": {"path": "/etc/imdsproxy/config.yaml", "generation": 7, "last_reload": "2026-11-25T11:00:00Z", "last_reload_ok": true},
 "doors": [{"door": "imds", "listen": ["127.0.0.1:8169", "[::1]:8169"]},
           {"door": "container", "listen": ["127.0.0.1:8171"], "url": "http://127.0.0.1:8171/v1/credentials", "tokens": 2,
            "last_rotation": "2026-11-25T11:30:00Z", "rotate_interval": "1h0m0s", "rotate_overlap": "5m0s"},
           {"door": "process", "listen": ["/run/imdsproxy/credentials.sock"]}],
 "cache": [ {"key": "app", "access_key_id": "ASIAWORKLOAD", "expires": "2026-11-25T13:00:00Z", "next_refresh": "2026-11-25T12:30:00Z", "last_error": "", "error_class": "", "valid": true},
            {"key": "instance-profile", "access_key_id": "ASIAINSTANCE", "expires": "2026-11-25T18:00:00Z", "next_refresh": "2026-11-25T15:00:00Z", "last_error": "", "error_class": "", "valid": true} ]}
`

const statusNotReady = `{"ready": false, "ready_reason": "not ready: no valid credentials for role app: server: InternalFailure",
 "version": "1.4.0", "source": "web-identity", "role_arn": "arn:aws:iam::222222222222:role/app", "role_name": "app",
 "rollout": {"enabled": true, "stage": "on", "percent": 100, "group": "batch-asg", "group_source": "config", "bucket": 12,
             "serve": "workload", "shadow": false, "kill_switch": true, "reason": "kill switch", "fallback": "none",
             "policy": {"source": "/etc/imdsproxy/rollout.yaml", "version": "2026-11-25.2",
                        "last_load": "2026-11-25T12:01:00Z", "last_success": "2026-11-25T12:00:00Z", "last_error": "rollout: policy: line 3: unknown stage \"maybe\""},
             "shadow_status": {"last_check": "2026-11-25T11:59:00Z", "last_result": "failure", "last_arn": "", "last_error": "sts: InvalidClientTokenId"},
             "workloads": {"configured": 1, "active": true}},
 "served_role_name": "app", "served_kind": "workload",
 "config": {"path": "/etc/imdsproxy/config.yaml", "generation": 3, "last_reload": "2026-11-25T11:00:00Z", "last_reload_ok": false,
            "last_reload_error": "[listen] changed: these take effect only at a restart", "restart_needed": ["listen"]},
 "cache": [ {"key": "app", "access_key_id": "", "expires": "", "next_refresh": "2026-11-25T12:00:05Z", "last_error": "InternalFailure: An internal error occurred.", "error_class": "server", "valid": false} ]}
`

const statusRolloutOff = `{"ready": true, "ready_reason": "ready: credentials for role app valid until 2026-11-25T13:00:00Z",
 "version": "devel", "source": "web-identity", "role_arn": "arn:aws:iam::222222222222:role/app", "role_name": "app",
 "rollout": {"enabled": false}, "served_role_name": "app", "served_kind": "workload",
 "cache": [ {"key": "app", "access_key_id": "ASIAWORKLOAD", "expires": "2026-11-25T13:00:00Z", "next_refresh": "2026-11-25T12:30:00Z", "last_error": "", "error_class": "", "valid": true} ]}
`

// adminServing starts an admin stand-in serving doc at /debug/status and
// returns its host:port.
func adminServing(t *testing.T, doc string) string {
	t.Helper()
	mux := http.NewServeMux()
	mux.HandleFunc("GET /debug/status", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_, _ = fmt.Fprint(w, doc)
	})
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	return strings.TrimPrefix(srv.URL, "http://")
}

func TestStatusCommand(t *testing.T) {
	canary := adminServing(t, statusReadyCanary)
	notReady := adminServing(t, statusNotReady)
	off := adminServing(t, statusRolloutOff)
	nf := httptest.NewServer(http.NotFoundHandler())
	t.Cleanup(nf.Close)
	notFound := strings.TrimPrefix(nf.URL, "http://")
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closed := ln.Addr().String()
	ln.Close()

	cfgPath := filepath.Join(t.TempDir(), "config.yaml")
	cfg := "admin_listen: " + canary + "\nrole: {arn: arn:aws:iam::222222222222:role/app}\nidentity: {jwt_file: /run/imdsproxy/token.jwt}\n"
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	// A config serve refuses (imds.tokens), whose admin_listen is a port no
	// one listens on (not the default 8170: a demo may be running).
	refusedPath := filepath.Join(t.TempDir(), "refused.yaml")
	refused := "admin_listen: " + closed + "\nimds: {tokens: sometimes}\nrole: {arn: arn:aws:iam::222222222222:role/app}\nidentity: {jwt_file: /run/imdsproxy/token.jwt}\n"
	if err := os.WriteFile(refusedPath, []byte(refused), 0o600); err != nil {
		t.Fatal(err)
	}

	for _, tc := range []struct {
		name     string
		args     []string
		code     int
		wantOut  []string
		wantErr  string
		exactOut string
	}{
		{name: "ready canary", args: []string{"--admin", canary}, code: exitOK, wantOut: []string{
			"ready:         yes (ready: credentials for role app valid until 2026-11-25T13:00:00Z)",
			"serving:       role instance-role (instance-profile credentials)",
			"role:          app (arn:aws:iam::222222222222:role/app) via web-identity",
			"config:        /etc/imdsproxy/config.yaml, generation 7, last load 2026-11-25T11:00:00Z (",
			"stage:         canary 10% — group api-asg is canary 10%; bucket 734 is outside it",
			"group:         api-asg (from tag)",
			"bucket:        734 of 0..9999 (canary N% takes buckets below N×100; canary percent 10)",
			"kill switch:   off",
			"fallback:      instance-profile",
			"policy:        version 2026-11-25.1 from s3://fleet-config/imdsproxy/rollout.yaml",
			"last load:   2026-11-25T12:00:00Z (",
			"shadow:        success at 2026-11-25T11:58:00Z",
			"arn:aws:sts::222222222222:assumed-role/app/i-0aaaabbbbccccdddd",
			"workloads:     2 configured, inactive: every client is served the instance profile",
			"cache app:     ASIAWORKLOAD, valid until 2026-11-25T13:00:00Z",
			"cache instance-profile: ASIAINSTANCE",
			"next refresh: 2026-11-25T12:30:00Z",
			"door imds:     127.0.0.1:8169, [::1]:8169",
			"door container: http://127.0.0.1:8171/v1/credentials; 2 workload tokens, rotated every 1h0m0s (a replaced one accepted for 5m0s), last 2026-11-25T11:30:00Z (",
			"door process:  /run/imdsproxy/credentials.sock",
		}},
		{name: "not ready", args: []string{"--admin", notReady}, code: exitStatusNotReady, wantOut: []string{
			"ready:         NO (not ready: no valid credentials for role app: server: InternalFailure)",
			"stage:         on — kill switch",
			"group:         batch-asg (from config)",
			"kill switch:   ON",
			"last error:  rollout: policy: line 3: unknown stage \"maybe\" (the last good policy stays in force)",
			"shadow:        failure at 2026-11-25T11:59:00Z (",
			"sts: InvalidClientTokenId",
			"workloads:     1 configured, active: each is served its own role",
			"cache app:     no valid credentials",
			"config:        /etc/imdsproxy/config.yaml, generation 3",
			"REFUSED: [listen] changed",
			"restart:       NEEDED: listen changed in the file",
			"last error:  server: InternalFailure: An internal error occurred.",
		}},
		{name: "rollout off", args: []string{"--admin", off}, code: exitOK, wantOut: []string{
			"rollout:       disabled (no rollout.policy",
			"serving:       role app (workload credentials)",
		}},
		{name: "json", args: []string{"--json", "--admin", notReady}, code: exitStatusNotReady, exactOut: statusNotReady},
		{name: "admin from config", args: []string{"--config", cfgPath}, code: exitOK, wantOut: []string{"canary 10%", "admin " + canary}},
		{name: "explicit admin beats config", args: []string{"--config", cfgPath, "--admin", off}, code: exitOK, wantOut: []string{"rollout:       disabled"}},
		{name: "unreachable", args: []string{"--admin", closed}, code: exitStatusUnreachable, wantErr: "the admin endpoint at " + closed + " is unreachable"},
		{name: "no status endpoint", args: []string{"--admin", notFound}, code: exitStatusUnreachable, wantErr: "404"},
		{name: "refused config still names the admin address", args: []string{"--config", refusedPath, "--json"}, code: exitStatusUnreachable, wantErr: closed},
		{name: "unreadable config", args: []string{"--config", "testdata/missing.yaml"}, code: exitConfig, wantErr: "missing.yaml"},
		{name: "stray argument", args: []string{"extra"}, code: exitUsage, wantErr: "Usage: imdsproxy status"},
		{name: "bad flag", args: []string{"--bogus"}, code: exitUsage, wantErr: "bogus"},
		{name: "bad admin", args: []string{"--admin", "localhost"}, code: exitUsage, wantErr: "--admin"},
		{name: "help", args: []string{"--help"}, code: exitOK, wantErr: "4 admin endpoint unreachable"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var out, errOut bytes.Buffer
			code := run(context.Background(), append([]string{"status"}, tc.args...), &out, &errOut)
			if code != tc.code {
				t.Fatalf("exit %d, want %d\nstdout:\n%s\nstderr:\n%s", code, tc.code, out.String(), errOut.String())
			}
			for _, want := range tc.wantOut {
				if !strings.Contains(out.String(), want) {
					t.Errorf("stdout lacks %q:\n%s", want, out.String())
				}
			}
			if tc.exactOut != "" && out.String() != tc.exactOut {
				t.Errorf("stdout is not the raw document:\n%s", out.String())
			}
			if tc.wantErr != "" && !strings.Contains(errOut.String(), tc.wantErr) {
				t.Errorf("stderr lacks %q:\n%s", tc.wantErr, errOut.String())
			}
		})
	}
}
