package main

import (
	"context"
	"net/http"
	"net/http/httptest"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap/zapcore"

	"github.com/imdsproxy/imdsproxy/proxy"
)

const workloadsBase = `role: {arn: "arn:aws:iam::222222222222:role/app"}
identity: {jwt_file: /run/imdsproxy/token.jwt}
`

func TestWorkloadsConfig(t *testing.T) {
	billing := `{arn: "arn:aws:iam::111122223333:role/billing"}`
	for _, tc := range []struct{ name, yaml, err string }{
		{"none", "", ""},
		{"empty list", "workloads: []\n", ""},
		{"unit and uid", "workloads:\n- {unit: billing.service, role: " + billing + "}\n" +
			"- {uid: 1001, role: {arn: \"arn:aws:iam::444455556666:role/reports\", name: reports, duration: 2h, session_name: rep}}\n", ""},
		{"uid 0", "workloads: [{uid: 0, role: " + billing + "}]\n", ""},
		{"scope", "workloads: [{unit: run-1.scope, role: " + billing + "}]\n", ""},
		{"same arn, two names", "workloads:\n- {uid: 1, role: {arn: \"arn:aws:iam::222222222222:role/app\", name: app2}}\n", ""},
		{"assume-role", "role: {arn: \"arn:aws:iam::222222222222:role/app\"}\nsource: assume-role\n" +
			"workloads: [{uid: 1, role: " + billing + "}]\n", ""},

		{"both matchers", "workloads: [{unit: a.service, uid: 1, role: " + billing + "}]\n", "workloads[0]: set only one of unit and uid"},
		{"no matcher", "workloads: [{role: " + billing + "}]\n", "workloads[0]: set one of unit"},
		{"null uid", "workloads: [{uid: null, role: " + billing + "}]\n", "workloads[0]: set one of unit"},
		{"bad unit", "workloads: [{unit: billing, role: " + billing + "}]\n", "workloads[0].unit"},
		{"unit with slash", "workloads: [{unit: a/b.service, role: " + billing + "}]\n", "workloads[0].unit"},
		{"negative uid", "workloads: [{uid: -1, role: " + billing + "}]\n", "workloads[0].uid: -1 is not a uid"},
		{"uid too large", "workloads: [{uid: 4294967295, role: " + billing + "}]\n", "workloads[0].uid"},
		{"uid not a number", "workloads: [{uid: www, role: " + billing + "}]\n", "workloads[0].uid"},
		{"duplicate uid", "workloads:\n- {uid: 7, role: " + billing + "}\n- {uid: 7, role: {arn: \"arn:aws:iam::1:role/x\"}}\n", "workloads[1]"},
		{"duplicate uid exact", "workloads:\n- {uid: 7, role: " + billing + "}\n- {uid: 7, role: {arn: \"arn:aws:iam::444455556666:role/x\"}}\n",
			"workloads[1].uid: 7 is already matched by workloads[0]"},
		{"duplicate unit", "workloads:\n- {unit: a.service, role: " + billing + "}\n- {unit: a.service, role: {arn: \"arn:aws:iam::444455556666:role/x\"}}\n",
			"workloads[1].unit: a.service is already matched by workloads[0]"},
		{"no role", "workloads: [{uid: 1}]\n", "workloads[0].role.arn"},
		{"bad arn", "workloads: [{uid: 1, role: {arn: \"arn:aws:iam::1:user/x\"}}]\n", "workloads[0].role.arn"},
		{"bad name", "workloads: [{uid: 1, role: {arn: \"arn:aws:iam::444455556666:role/x\", name: \"a b\"}}]\n", "workloads[0].role.name"},
		{"bad session", "workloads: [{uid: 1, role: {arn: \"arn:aws:iam::444455556666:role/x\", session_name: x}}]\n", "workloads[0].role.session_name"},
		{"short duration", "workloads: [{uid: 1, role: {arn: \"arn:aws:iam::444455556666:role/x\", duration: 5m}}]\n", "workloads[0].role.duration"},
		{"long duration", "workloads: [{uid: 1, role: {arn: \"arn:aws:iam::444455556666:role/x\", duration: 13h}}]\n", "workloads[0].role.duration"},
		{"margin", "cache: {expiry_margin: 10m}\nworkloads: [{uid: 1, role: {arn: \"arn:aws:iam::444455556666:role/x\", duration: 15m}}]\n",
			"workloads[0].role.duration: cache.expiry_margin"},
		{"name of the host role", "workloads: [{uid: 1, role: {arn: \"arn:aws:iam::444455556666:role/app\"}}]\n",
			`workloads[0].role.name: "app" is already used by role.name`},
		{"name of another workload", "workloads:\n- {uid: 1, role: " + billing + "}\n- {uid: 2, role: {arn: \"arn:aws:iam::444455556666:role/billing\"}}\n",
			`workloads[1].role.name: "billing" is already used by workloads[0].role.name`},
		{"unknown key", "workloads: [{uid: 1, group: x, role: " + billing + "}]\n", "unknown key workloads[0].group"},
		{"not a list", "workloads: {uid: 1}\n", "workloads: must be a list"},
		{"federation", "source: federation\nfederation: {url: https://creds.internal/v1}\nworkloads: [{uid: 1, role: " + billing + "}]\n",
			"workloads: not supported with source federation"},
		{"instance-profile", "source: instance-profile\nidentity: {}\nworkloads: [{uid: 1, role: " + billing + "}]\n",
			"workloads: not supported with source instance-profile"},
		{"with rollout", "rollout: {policy: /etc/imdsproxy/rollout.yaml, fallback: instance-profile}\nworkloads: [{uid: 1, role: " + billing + "}]\n", ""},
		{"with rollout, name of the host role", "rollout: {policy: /etc/imdsproxy/rollout.yaml}\nworkloads: [{uid: 1, role: {arn: \"arn:aws:iam::444455556666:role/app\"}}]\n",
			`workloads[0].role.name: "app" is already used by role.name`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			yaml := workloadsBase + tc.yaml
			if strings.HasPrefix(tc.yaml, "role:") {
				yaml = tc.yaml
			} else if strings.HasPrefix(tc.yaml, "source: instance-profile") {
				yaml = tc.yaml
			}
			cfg, err := parseConfig([]byte(yaml))
			switch {
			case tc.err == "" && err != nil:
				t.Fatalf("%v", err)
			case tc.err != "" && (err == nil || !strings.HasPrefix(err.Error(), "config: ") || !strings.Contains(err.Error(), tc.err)):
				t.Fatalf("error %v, want a config error with %q", err, tc.err)
			case err == nil:
				for i, w := range cfg.Workloads {
					if w.Role.Name == "" || w.Role.Duration.D() < 15*time.Minute {
						t.Errorf("workloads[%d]: defaults not applied: %+v", i, w.Role)
					}
				}
			}
		})
	}
}

func TestWorkloadsTooMany(t *testing.T) {
	var b strings.Builder
	b.WriteString(workloadsBase + "workloads:\n")
	for i := range maxWorkloads + 1 {
		b.WriteString("- {uid: " + strconv.Itoa(1000+i) + `, role: {arn: "arn:aws:iam::444455556666:role/r` + strconv.Itoa(i) + `"}}` + "\n")
	}
	if _, err := parseConfig([]byte(b.String())); err == nil || !strings.Contains(err.Error(), "config: workloads: 65 entries, at most 64") {
		t.Fatalf("error %v", err)
	}
}

func TestWorkloadDefaults(t *testing.T) {
	cfg, err := parseConfig([]byte(workloadsBase + "workloads: [{unit: billing.service, role: {arn: \"arn:aws:iam::111122223333:role/path/billing\"}}]\n"))
	if err != nil {
		t.Fatal(err)
	}
	r := cfg.Workloads[0].Role
	if r.Name != "billing" || r.Duration.D() != time.Hour || r.SessionName != "" {
		t.Errorf("defaults: %+v, want name billing (last part of the ARN), duration 1h, no session name", r)
	}
}

// TestWorkloadMatching: list order decides between a unit and a uid entry;
// an unidentified client or an unknown unit match by nothing or uid only.
func TestWorkloadMatching(t *testing.T) {
	uid := func(u int) *int { return &u }
	w := newWorkloadRoles([]WorkloadCfg{
		{Unit: "billing.service", Role: RoleConfig{Name: "billing"}},
		{UID: uid(1001), Role: RoleConfig{Name: "reports"}},
		{Unit: "batch.service", Role: RoleConfig{Name: "batch"}},
		{UID: uid(0), Role: RoleConfig{Name: "rootjobs"}},
	})
	for _, tc := range []struct {
		name string
		p    proxy.Peer
		want string // "" = unmatched
	}{
		{"unit", proxy.Peer{Known: true, UID: 2000, Unit: "billing.service"}, "billing"},
		{"unit before uid", proxy.Peer{Known: true, UID: 1001, Unit: "billing.service"}, "billing"},
		{"uid before unit", proxy.Peer{Known: true, UID: 1001, Unit: "batch.service"}, "reports"},
		{"uid, unit unknown", proxy.Peer{Known: true, UID: 1001}, "reports"},
		{"uid, other unit", proxy.Peer{Known: true, UID: 1001, Unit: "other.service"}, "reports"},
		{"uid 0", proxy.Peer{Known: true, UID: 0}, "rootjobs"},
		{"unit of uid 0", proxy.Peer{Known: true, UID: 0, Unit: "batch.service"}, "batch"},
		{"unmatched", proxy.Peer{Known: true, UID: 2000, Unit: "other.service"}, ""},
		{"unidentified", proxy.Peer{}, ""},
		// The kernel named a cgroup the daemon could not map in time: a
		// unit entry might match, so no uid entry may (host role).
		{"unit unknown, uid entry", proxy.Peer{Known: true, UID: 1001, UnitUnknown: true}, ""},
		{"unit unknown, uid 0", proxy.Peer{Known: true, UID: 0, UnitUnknown: true}, ""},
		{"unidentified with stale fields", proxy.Peer{UID: 1001, Unit: "billing.service"}, ""},
	} {
		got, ok := w.RoleFor(tc.p)
		if got != tc.want || ok != (tc.want != "") {
			t.Errorf("%s: RoleFor(%+v) = %q, %v; want %q", tc.name, tc.p, got, ok, tc.want)
		}
	}
	// With uid entries only, an unknown unit changes nothing.
	onlyUIDs := newWorkloadRoles([]WorkloadCfg{{UID: uid(1001), Role: RoleConfig{Name: "reports"}}})
	if got, ok := onlyUIDs.RoleFor(proxy.Peer{Known: true, UID: 1001, UnitUnknown: true}); !ok || got != "reports" {
		t.Errorf("uid entries only, unit unknown: RoleFor = %q, %v; want reports", got, ok)
	}
	if newWorkloadRoles(nil) != nil {
		t.Error("no workloads built a matcher")
	}
}

// TestWorkloadAccess: workloads force identification; an entry of
// workloads: is an allow of its own, deny_uids still wins, and the allow
// lists decide who gets the host's role.
func TestWorkloadAccess(t *testing.T) {
	off := false
	uid := func(u int) *int { return &u }
	wl := []WorkloadCfg{{UID: uid(1001), Role: RoleConfig{Name: "billing"}}, {Unit: "r.service", Role: RoleConfig{Name: "reports"}}}
	if ac, rm := proxyAccess(Config{Access: AccessConfig{Audit: &off}}, nil); ac != nil || rm != nil {
		t.Fatal("identification without lists, audit or workloads")
	}
	if ac, rm := proxyAccess(Config{Access: AccessConfig{DenyUIDs: []int{1}}}, nil); ac == nil || rm != nil {
		t.Fatal("lists without workloads: want an AccessControl and no RoleMapper")
	}
	ac, rm := proxyAccess(Config{Access: AccessConfig{Audit: &off}, Workloads: wl}, nil)
	if ac == nil || rm == nil {
		t.Fatal("workloads with audit off: clients must still be identified")
	}
	if n, ok := rm.RoleFor(proxy.Peer{Known: true, UID: 1001}); !ok || n != "billing" {
		t.Errorf("RoleFor = %q %v", n, ok)
	}

	app := proxy.Peer{Known: true, UID: 1000}
	billing := proxy.Peer{Known: true, UID: 1001}
	reports := proxy.Peer{Known: true, UID: 1002, Unit: "r.service"}
	other := proxy.Peer{Known: true, UID: 2000}
	for _, tc := range []struct {
		name string
		a    AccessConfig
		want [5]bool // app, billing, reports, other, unknown
	}{
		{"no lists", AccessConfig{}, [5]bool{true, true, true, true, true}},
		{"host role for 1000 only", AccessConfig{AllowUIDs: []int{1000}}, [5]bool{true, true, true, false, false}},
		{"deny wins over a workload", AccessConfig{DenyUIDs: []int{1001}}, [5]bool{true, false, true, true, false}},
	} {
		ac, _ := proxyAccess(Config{Access: tc.a, Workloads: wl}, nil)
		for i, p := range []proxy.Peer{app, billing, reports, other, {}} {
			if got := ac.Allow(p); got != tc.want[i] {
				t.Errorf("%s: Allow(%+v) = %v, want %v", tc.name, p, got, tc.want[i])
			}
		}
	}
}

func TestWorkloadRolesChanged(t *testing.T) {
	uid := func(u int) *int { return &u }
	a := WorkloadCfg{UID: uid(1), Role: RoleConfig{ARN: "arn:aws:iam::1:role/a", Name: "a", Duration: Duration(time.Hour)}}
	b := WorkloadCfg{Unit: "b.service", Role: RoleConfig{ARN: "arn:aws:iam::1:role/b", Name: "b", Duration: Duration(time.Hour)}}
	moved := a
	moved.UID = uid(2)
	longer := a
	longer.Role.Duration = Duration(2 * time.Hour)
	for _, tc := range []struct {
		name       string
		prev, next []WorkloadCfg
		want       bool
	}{
		{"same", []WorkloadCfg{a, b}, []WorkloadCfg{a, b}, false},
		{"reordered", []WorkloadCfg{a, b}, []WorkloadCfg{b, a}, false},
		{"matcher only", []WorkloadCfg{a, b}, []WorkloadCfg{moved, b}, false},
		{"removed", []WorkloadCfg{a, b}, []WorkloadCfg{a}, true},
		{"added", nil, []WorkloadCfg{a}, true},
		{"role changed", []WorkloadCfg{a, b}, []WorkloadCfg{longer, b}, true},
	} {
		if got := workloadRolesChanged(tc.prev, tc.next); got != tc.want {
			t.Errorf("%s: %v, want %v", tc.name, got, tc.want)
		}
	}
}

const workloadsYAML = `workloads:
- {uid: 1001, role: {arn: "arn:aws:iam::111122223333:role/billing", session_name: billing-session}}
- {unit: reports.service, role: {arn: "arn:aws:iam::444455556666:role/reports", name: reports, duration: 2h}}
`

// TestDaemonWorkloadFetcher: the daemon's fetcher sends each role name to
// the exchange of that role, on the one identity token.
func TestDaemonWorkloadFetcher(t *testing.T) {
	td := startDaemon(t, workloadsYAML)
	ctx := context.Background()
	for key, want := range map[string]struct{ arn, session string }{
		"app":     {"arn:aws:iam::222222222222:role/app", "test-host"},
		"billing": {"arn:aws:iam::111122223333:role/billing", "billing-session"},
		"reports": {"arn:aws:iam::444455556666:role/reports", "test-host"},
	} {
		c, err := td.d.cache.Get(ctx, key)
		if err != nil {
			t.Fatalf("%s: %v", key, err)
		}
		is, ok := td.sts.Find(c.AccessKeyID)
		if !ok || is.RoleARN != want.arn || is.RoleSessionName != want.session {
			t.Errorf("%s: served credentials issued for %+v, want role %s session %s", key, is, want.arn, want.session)
		}
		if !strings.Contains(c.RoleARN, ":assumed-role/"+strings.TrimPrefix(want.arn[strings.LastIndex(want.arn, "/"):], "/")+"/") {
			t.Errorf("%s: credentials of %s", key, c.RoleARN)
		}
	}
	if _, err := td.d.fetcher.Fetch(ctx, "unknown"); err == nil || !strings.Contains(err.Error(), `no role named "unknown"`) {
		t.Errorf("unknown key: %v", err)
	}
	for _, call := range td.sts.CallLog() {
		if call.Action == "AssumeRoleWithWebIdentity" && call.RoleARN == "arn:aws:iam::444455556666:role/reports" && call.DurationSeconds != 7200 {
			t.Errorf("reports asked for %d seconds, want 7200", call.DurationSeconds)
		}
	}
}

// TestDaemonWorkloadReload: a reload that removes a workload stops serving
// its role at once (the mapping and the fetcher), and one that adds a
// workload fetches its role.
func TestDaemonWorkloadReload(t *testing.T) {
	td := startDaemon(t, workloadsYAML)
	ctx := context.Background()
	for _, k := range []string{"app", "billing", "reports"} {
		if err := td.d.cache.Prefetch(ctx, k); err != nil {
			t.Fatal(err)
		}
	}
	mapper := func() proxy.RoleMapper { _, rm := proxyAccess(td.d.config(), nil); return rm }
	if n, ok := mapper().RoleFor(proxy.Peer{Known: true, UID: 1001}); !ok || n != "billing" {
		t.Fatalf("before reload: %q %v", n, ok)
	}
	orig, _ := os.ReadFile(td.cfgPath)
	next := strings.Replace(string(orig), "- {uid: 1001, role: {arn: \"arn:aws:iam::111122223333:role/billing\", session_name: billing-session}}\n", "", 1)
	if next == string(orig) {
		t.Fatal("test config not as expected")
	}
	if err := os.WriteFile(td.cfgPath, []byte(next), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := td.d.reload(ctx); err != nil {
		t.Fatal(err)
	}
	if n, ok := mapper().RoleFor(proxy.Peer{Known: true, UID: 1001}); ok {
		t.Errorf("removed workload still mapped to %q", n)
	}
	if _, err := td.d.fetcher.Fetch(ctx, "billing"); err == nil {
		t.Error("the fetcher still serves the removed workload's role")
	}
	for _, e := range td.d.cache.Snapshot() {
		if e.Key == "billing" {
			t.Errorf("the removed role is still cached: %+v", e)
		}
	}
	// The daemon's own proxy serves the host role to an unidentified client
	// (no connection outside Serve) and lists it.
	rec := httptest.NewRecorder()
	put := httptest.NewRequest(http.MethodPut, "/latest/api/token", nil)
	put.Header.Set("X-aws-ec2-metadata-token-ttl-seconds", "60")
	td.d.proxy.Handler().ServeHTTP(rec, put)
	for path, want := range map[string]int{
		"/latest/meta-data/iam/security-credentials/":        200,
		"/latest/meta-data/iam/security-credentials/app":     200,
		"/latest/meta-data/iam/security-credentials/reports": 404,
		"/latest/meta-data/iam/security-credentials/billing": 404,
	} {
		req := httptest.NewRequest(http.MethodGet, path, nil)
		req.Header.Set("X-aws-ec2-metadata-token", rec.Body.String())
		w := httptest.NewRecorder()
		td.d.proxy.Handler().ServeHTTP(w, req)
		if w.Code != want {
			t.Errorf("GET %s = %d, want %d", path, w.Code, want)
		}
	}
}

// TestAuditOff: access.audit false keeps audit lines out of the log even
// when clients are identified (for access lists or workloads).
func TestAuditOff(t *testing.T) {
	for _, tc := range []struct {
		extra string
		audit bool
	}{
		{"access: {allow_uids: [1000]}\n", true},
		{"access: {audit: false, allow_uids: [1000]}\n", false},
		{"access: {audit: false}\n" + workloadsYAML, false},
		{workloadsYAML, true},
	} {
		td := startDaemon(t, tc.extra)
		pc := td.d.proxyConfig(td.d.config())
		if pc.Access == nil {
			t.Fatalf("%q: clients not identified", tc.extra)
		}
		if got := pc.AuditLog.Core().Enabled(zapcore.InfoLevel); got != tc.audit {
			t.Errorf("%q: audit lines logged = %v, want %v", tc.extra, got, tc.audit)
		}
	}
}

// noRoles is a RoleMapper that maps nobody: the workloads' mapping while a
// rollout serves the instance profile.
type noRoles struct{}

func (noRoles) RoleFor(proxy.Peer) (string, bool) { return "", false }

// TestWorkloadAllowFollowsActiveMapping: a workload entry admits its
// processes past the allow lists only while the mapping is in force; under
// a rollout serving the instance profile (the mapping gated off) only the
// allow lists decide, so a workload process does not get the instance
// profile's credentials it would be refused without workloads:.
func TestWorkloadAllowFollowsActiveMapping(t *testing.T) {
	uid := 2000
	cfg := Config{
		Access:    AccessConfig{AllowUIDs: []int{1000}},
		Workloads: []WorkloadCfg{{UID: &uid, Role: RoleConfig{Name: "billing"}}},
	}
	p, _ := proxyAccess(cfg, nil)
	workload := proxy.Peer{Known: true, UID: 2000}
	if !p.Allow(workload) {
		t.Fatal("a workload process refused while its mapping is in force")
	}
	p.active = noRoles{}
	if p.Allow(workload) {
		t.Error("a workload process admitted past access.allow_uids while the mapping is not in force")
	}
	if !p.Allow(proxy.Peer{Known: true, UID: 1000}) {
		t.Error("an allowed uid refused")
	}
}
