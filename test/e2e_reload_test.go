package test

import (
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/imdsproxy/imdsproxy/test/e2e"
	"github.com/imdsproxy/imdsproxy/test/fakes/s3"
)

// cliCreds runs the AWS CLI (Debian's, the real client) against the daemon
// and returns the access key id it obtained.
func cliCreds(t *testing.T, e *daemonEnv) string {
	t.Helper()
	out := runClient(t, e.dir, e.clientEnviron(), awsCLIPath, "configure", "export-credentials", "--format", "process")
	var c struct{ AccessKeyId string }
	if err := json.Unmarshal(out, &c); err != nil || c.AccessKeyId == "" {
		t.Fatalf("aws configure export-credentials printed %q: %v", out, err)
	}
	return c.AccessKeyId
}

// reloadAndWait rewrites the config and SIGHUPs the daemon, then polls until
// cond holds (at most 15s).
func reloadAndWait(t *testing.T, e *daemonEnv, cfg, what string, cond func() bool) {
	t.Helper()
	e.writeConfig(t, cfg)
	e.signal(t, syscall.SIGHUP)
	deadline := time.Now().Add(15 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			out, _ := runStatusCommand(t, e)
			t.Fatalf("%s: not applied after SIGHUP\nstatus:\n%s\nlog:\n%s", what, out, e.logTail(30))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestEmergencyRollback follows docs/rollout.md, "Rolling back", "The
// policy source itself is broken", to the letter, with the AWS CLI: a host
// on the workload role whose central policy (in S3) is broken is forced
// back to the instance profile by pointing rollout.policy at a local file
// with kill_switch: true and reloading; `imdsproxy status` says so. Then the
// second way: remove rollout:, identity: and workloads:, set source:
// instance-profile, reload.
func TestEmergencyRollback(t *testing.T) {
	requireClient(t, awsCLIPath, "AWS CLI v2 (Debian package awscli)")
	up := startRolloutUpstream(t)
	fake := s3.Start(t)
	fake.Put(roBucketName, roObjectKey, []byte(roPolicy("central-1", "on")))
	central := "s3://" + roBucketName + "/" + roObjectKey
	e := startRolloutDaemon(t, up, roOptions{policy: central, s3: fake})
	waitKind(t, e, up, "workload", 10*time.Second)
	if k := cliCreds(t, e); kindOf(e, up, k) != "workload" {
		t.Fatalf("before the rollback the CLI got %s (%s), want the workload role's", k, kindOf(e, up, k))
	}

	// The central policy breaks: hosts keep the last good one (on).
	fake.Delete(roBucketName, roObjectKey)
	e.signal(t, syscall.SIGHUP)
	waitMetric(t, e, "imdsproxy_rollout_policy_last_load_successful", nil, func(v float64) bool { return v == 0 }, 15*time.Second)
	if k := cliCreds(t, e); kindOf(e, up, k) != "workload" {
		t.Fatalf("a broken central policy changed what is served: %s", kindOf(e, up, k))
	}

	// The documented step: a local file with the kill switch, SIGHUP.
	kill := filepath.Join(e.dir, "emergency-rollout.yaml")
	if err := os.WriteFile(kill, []byte("version: \"emergency-1\"\nkill_switch: true\ndefault: off\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg := strings.Replace(e.config(), fmt.Sprintf("policy: %q", central), fmt.Sprintf("policy: %q", kill), 1)
	if cfg == e.config() {
		t.Fatal("the config has no rollout.policy line to replace")
	}
	reloadAndWait(t, e, cfg, "the kill switch file", func() bool {
		s, err := e.roFetch(t.Context())
		return err == nil && kindOf(e, up, s.doc.AccessKeyId) == "instance-profile"
	})
	if k := cliCreds(t, e); kindOf(e, up, k) != "instance-profile" {
		t.Fatalf("after the emergency rollback the CLI got %s credentials", kindOf(e, up, k))
	}
	out, code := runStatusCommand(t, e)
	for _, want := range []string{"kill switch:   ON", "version emergency-1 from " + kill, "instance-profile credentials"} {
		if !strings.Contains(out, want) {
			t.Errorf("imdsproxy status after the rollback lacks %q:\n%s", want, out)
		}
	}
	if code != 0 {
		t.Errorf("imdsproxy status exited %d", code)
	}
	if v, _ := e.scrape(t).Value("imdsproxy_rollout_kill_switch", nil); v != 1 {
		t.Error("imdsproxy_rollout_kill_switch is not 1")
	}

	// The other documented way: no rollout at all, source instance-profile.
	ipOnly := fmt.Sprintf(`listen: 127.0.0.1:%d
admin_listen: 127.0.0.1:%d
upstream: %s
source: instance-profile
`, e.imdsPort, e.adminPort, up.url)
	reloadAndWait(t, e, ipOnly, "source instance-profile", func() bool {
		st, body, err := e2e.GetURL(e.adminURL + "/debug/status")
		return err == nil && st == http.StatusOK && strings.Contains(body, `"source": "instance-profile"`)
	})
	if k := cliCreds(t, e); kindOf(e, up, k) != "instance-profile" {
		t.Fatalf("with source instance-profile the CLI got %s credentials", kindOf(e, up, k))
	}
	out, _ = runStatusCommand(t, e)
	for _, want := range []string{"rollout:       disabled", "instance-profile credentials", "via instance-profile"} {
		if !strings.Contains(out, want) {
			t.Errorf("imdsproxy status with source instance-profile lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "stage:") {
		t.Errorf("imdsproxy status still reports a rollout stage:\n%s", out)
	}
	e.assertNoSecrets(t, "daemon log", e.log.String())
}

// TestReloadEverySetting changes the settings a reload applies, one SIGHUP
// each, and checks each took effect for a real client (the AWS CLI for the
// credentials); a restart-only setting refuses the reload and says so.
func TestReloadEverySetting(t *testing.T) {
	requireClient(t, awsCLIPath, "AWS CLI v2 (Debian package awscli)")
	if os.Geteuid() != 0 {
		t.Skip("identifying the CLI's uid needs the daemon to read sock_diag as root here")
	}
	otherARN := "arn:aws:iam::333333333333:role/other-app"
	extra, role := "", fmt.Sprintf("role: {arn: %q, name: %s, duration: 1h}", e2e.RoleARN, e2e.RoleName)
	e := startDaemon(t, envOptions{identityYAML: func(e *daemonEnv) string {
		e.sts.AllowRoles(otherARN)
		return fmt.Sprintf("%s\nsource: web-identity\nidentity: {jwt_file: %q}\n%s", role, e.tokenFile, extra)
	}})
	issuedFor := func(key string) string {
		is, _ := e.sts.Find(key)
		return is.RoleARN
	}
	listing := func() string {
		tok, err := e2e.IMDSToken(t.Context(), e2e.Client, e.imdsURL, 60)
		if err != nil {
			t.Fatal(err)
		}
		_, body, _ := e2e.IMDSGet(t.Context(), e2e.Client, e.imdsURL, "/latest/meta-data/iam/security-credentials/", tok)
		return body
	}
	if got := issuedFor(cliCreds(t, e)); got != e2e.RoleARN {
		t.Fatalf("start: the CLI got credentials of %q", got)
	}

	// role.name and role.arn.
	role = fmt.Sprintf("role: {arn: %q, name: renamed, duration: 1h}", otherARN)
	reloadAndWait(t, e, e.config(), "role.name", func() bool { return listing() == "renamed" })
	if got := issuedFor(cliCreds(t, e)); got != otherARN {
		t.Fatalf("after role.arn changed the CLI got credentials of %q", got)
	}

	// access: deny the CLI's uid (root), then allow it again.
	extra = "access: {deny_uids: [0]}\n"
	reloadAndWait(t, e, e.config(), "access.deny_uids", func() bool {
		tok, _ := e2e.IMDSToken(t.Context(), e2e.Client, e.imdsURL, 60)
		st, _, _ := e2e.IMDSGet(t.Context(), e2e.Client, e.imdsURL, "/latest/meta-data/iam/security-credentials/", tok)
		return st == http.StatusForbidden
	})
	extra = ""
	reloadAndWait(t, e, e.config(), "access removed", func() bool { return listing() == "renamed" })

	// workloads: root's processes get a role of their own.
	extra = fmt.Sprintf("workloads:\n- {uid: 0, role: {arn: %q, name: root-app, duration: 1h}}\n", e2e.RoleARN)
	reloadAndWait(t, e, e.config(), "workloads", func() bool { return listing() == "root-app" })
	if got := issuedFor(cliCreds(t, e)); got != e2e.RoleARN {
		t.Fatalf("as a workload the CLI got credentials of %q", got)
	}

	// imds.tokens optional: an IMDSv1 GET is answered.
	extra = ""
	v1 := func() int {
		req, _ := http.NewRequestWithContext(t.Context(), http.MethodGet, e.imdsURL+"/latest/meta-data/iam/security-credentials/", nil)
		resp, err := e2e.Client.Do(req)
		if err != nil {
			return 0
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	if v1() != http.StatusUnauthorized {
		t.Fatal("an IMDSv1 GET was answered with imds.tokens required")
	}
	e.opts.tokens = "optional"
	reloadAndWait(t, e, e.config(), "imds.tokens optional", func() bool { return v1() == http.StatusOK })
	e.opts.tokens = "required"

	// cache settings apply without refetching.
	calls := e.sts.Calls()
	e.opts.backoffMax = 7 * time.Second
	reloadAndWait(t, e, e.config(), "cache.backoff_max", func() bool {
		st, body, err := e2e.GetURL(e.adminURL + "/debug/status")
		return err == nil && st == 200 && strings.Contains(body, `"last_reload_ok": true`) && v1() == http.StatusUnauthorized
	})
	if n := e.sts.Calls(); n != calls {
		t.Errorf("a reload of cache settings called STS %d more times", n-calls)
	}

	// A restart-only setting: refused whole, and said.
	bad := strings.Replace(e.config(), fmt.Sprintf("listen: 127.0.0.1:%d", e.imdsPort), "listen: 127.0.0.1:1", 1)
	e.writeConfig(t, bad)
	e.signal(t, syscall.SIGHUP)
	waitMetric(t, e, "imdsproxy_config_restart_required", nil, func(v float64) bool { return v == 1 }, 15*time.Second)
	out, _ := runStatusCommand(t, e)
	if !strings.Contains(out, "restart:       NEEDED: listen") {
		t.Errorf("imdsproxy status does not say a restart is needed:\n%s", out)
	}
	if got := issuedFor(cliCreds(t, e)); got != otherARN {
		t.Errorf("a refused reload changed what is served: %q", got)
	}
	e.writeConfig(t, e.config())
	e.assertNoSecrets(t, "daemon log", e.log.String())
}
