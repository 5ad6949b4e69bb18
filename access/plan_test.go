package access

import (
	"context"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/imdsproxy/imdsproxy/config"
	"github.com/imdsproxy/imdsproxy/creds"
	"github.com/imdsproxy/imdsproxy/peer"
)

// via is a stand-in exchange: keys of different vias are different keys.
type via struct{ name string }

func (v *via) Fetch(context.Context, creds.Role) (creds.Credentials, error) {
	return creds.Credentials{}, nil
}

var (
	src     = &via{"workload"}
	profv   = &via{"ip"}
	t0      = time.Date(2026, 12, 7, 12, 0, 0, 0, time.UTC)
	host    = creds.Key{Kind: creds.KindWorkload, Role: creds.Role{Name: "app", ARN: "arn:aws:iam::222222222222:role/app"}, Via: src}
	profile = creds.Key{Kind: creds.KindInstanceProfile, Role: creds.Role{Name: "instance-role"}, Via: profv}
)

func wkey(name string) creds.Key {
	return creds.Key{Kind: creds.KindWorkload, Role: creds.Role{Name: name, ARN: "arn:aws:iam::333333333333:role/" + name}, Via: src}
}

func uid(u int) *int { return &u }

// workloads: billing for uid 1001, backup.service for the unit, reports
// for uid 1003 (listed after the unit: a process of both matches the unit).
var workloads = []Workload{
	{UID: uid(1001), Role: config.Role{Name: "billing"}},
	{Unit: "backup.service", Role: config.Role{Name: "backup"}},
	{UID: uid(1003), Role: config.Role{Name: "reports"}},
}

func wkeys() []creds.Key { return []creds.Key{wkey("billing"), wkey("backup"), wkey("reports")} }

func local(u int, unit string) Client {
	return Client{Local: true, Info: peer.Info{UID: u, Unit: unit}}
}

func mustPlan(t *testing.T, pc PlanConfig, prev *Plan, now time.Time) *Plan {
	t.Helper()
	p, err := NewPlan(pc, prev, now)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func TestDecide(t *testing.T) {
	off := false
	base := PlanConfig{Host: host, InstanceProfile: profile, Serve: creds.KindWorkload, Access: Section{Audit: &off}}
	withWL := base
	withWL.Workloads, withWL.WorkloadKeys = workloads, wkeys()
	lists := withWL
	lists.Access = Section{AllowUIDs: []int{0, 1002}, AllowUnits: []string{"web.service"}, DenyUIDs: []int{1004}}
	profileServe := withWL
	profileServe.Serve = creds.KindInstanceProfile
	fallback := withWL
	fallback.Fallback = true

	for _, tc := range []struct {
		name     string
		pc       PlanConfig
		c        Client
		outcome  Outcome
		key      creds.Key
		fallback creds.Key
		why      string
	}{
		{"no identification: host role", base, Client{}, Serve, host, creds.Key{}, ""},
		{"workload by uid", withWL, local(1001, ""), Serve, wkey("billing"), creds.Key{}, ""},
		{"workload by unit", withWL, local(500, "backup.service"), Serve, wkey("backup"), creds.Key{}, ""},
		{"unit entry before a later uid entry", withWL, local(1003, "backup.service"), Serve, wkey("backup"), creds.Key{}, ""},
		{"uid entry before a later unit entry", withWL, local(1001, "backup.service"), Serve, wkey("billing"), creds.Key{}, ""},
		{"unmatched: host role", withWL, local(1500, "web.service"), Serve, host, creds.Key{}, ""},
		{"not local (bridge): host role", withWL, Client{}, Serve, host, creds.Key{}, ""},
		{"unresolved with workloads: retry", withWL, Client{Unresolved: true}, Retry, creds.Key{}, creds.Key{}, "unresolved"},
		{"unknown unit with a unit entry: retry, not the host role", withWL,
			Client{Local: true, Info: peer.Info{UID: 1001, UnitUnknown: true}}, Retry, creds.Key{}, creds.Key{}, "unresolved"},
		{"unknown unit, no unit entry: by uid", PlanConfig{Host: host, Serve: creds.KindWorkload, Access: Section{Audit: &off},
			Workloads: workloads[:1], WorkloadKeys: wkeys()[:1]},
			Client{Local: true, Info: peer.Info{UID: 1001, UnitUnknown: true}}, Serve, wkey("billing"), creds.Key{}, ""},
		{"lists: allowed uid", lists, local(1002, ""), Serve, host, creds.Key{}, ""},
		{"lists: allowed unit", lists, local(1500, "web.service"), Serve, host, creds.Key{}, ""},
		{"lists: a workload is allowed by itself", lists, local(1001, ""), Serve, wkey("billing"), creds.Key{}, ""},
		{"lists: denied uid", lists, local(1004, ""), Deny, creds.Key{}, creds.Key{}, "denied_uid"},
		{"lists: not allowed", lists, local(1500, ""), Deny, creds.Key{}, creds.Key{}, "not_allowed"},
		{"lists: not local", lists, Client{}, Deny, creds.Key{}, creds.Key{}, "not_local"},
		{"lists: unresolved", lists, Client{Unresolved: true}, Retry, creds.Key{}, creds.Key{}, "unresolved"},
		{"lists: unknown unit that might be allowed", lists, Client{Local: true, Info: peer.Info{UID: 1500, UnitUnknown: true}},
			Retry, creds.Key{}, creds.Key{}, "unresolved"},
		{"instance profile served: to workloads too", profileServe, local(1001, ""), Serve, profile, creds.Key{}, ""},
		{"instance profile served: unresolved is fine", profileServe, Client{Unresolved: true}, Serve, profile, creds.Key{}, ""},
		{"fallback on the host role", fallback, local(1500, ""), Serve, host, profile, ""},
		{"fallback on a workload role", fallback, local(1001, ""), Serve, wkey("billing"), profile, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := mustPlan(t, tc.pc, nil, t0)
			d := p.Decide(tc.c, 0, t0)
			if d.Outcome != tc.outcome || d.Key != tc.key || d.Fallback != tc.fallback || d.Why != tc.why {
				t.Fatalf("Decide = %+v\nwant outcome %v key %v fallback %v why %q", d, tc.outcome, tc.key, tc.fallback, tc.why)
			}
			if d.Outcome == Serve && (d.Name != tc.key.Role.Name || d.Host != (tc.key == host || tc.key == profile)) {
				t.Fatalf("Decide = %+v: name or host flag wrong", d)
			}
			if d.Gen != 1 {
				t.Errorf("generation %d, want 1", d.Gen)
			}
		})
	}
}

// TestSwitchConsistency is the rule of the package doc: the plan a request
// pinned answers its role while retained; a named old role is answered with
// what it stood for during Grace; access is always the current plan's.
func TestSwitchConsistency(t *testing.T) {
	off := false
	g1cfg := PlanConfig{Host: host, InstanceProfile: profile, Serve: creds.KindWorkload, Access: Section{Audit: &off},
		Workloads: workloads, WorkloadKeys: wkeys()}
	g1 := mustPlan(t, g1cfg, nil, t0)
	g2cfg := g1cfg
	g2cfg.Serve = creds.KindInstanceProfile // the rollout switched the host back
	g2 := mustPlan(t, g2cfg, g1, t0.Add(time.Second))
	if g1.Gen() != 1 || g2.Gen() != 2 {
		t.Fatalf("generations %d, %d", g1.Gen(), g2.Gen())
	}
	c := local(1001, "")
	now := t0.Add(2 * time.Second)

	// Pinned to G1: G1's answer for every step.
	if d := g2.Decide(c, g1.Gen(), now); d.Name != "billing" || d.Key != wkey("billing") {
		t.Fatalf("pinned to G1: %+v", d)
	}
	// Not pinned: G2's answer.
	if d := g2.Decide(c, 0, now); d.Name != "instance-role" || d.Key != profile {
		t.Fatalf("not pinned: %+v", d)
	}
	// A named old role within Grace: what it stood for.
	if d, ok := g2.DecideName(c, 0, "billing", now); !ok || d.Key != wkey("billing") {
		t.Fatalf("billing within Grace: %+v %v", d, ok)
	}
	// Another workload's role is never answered to this client.
	if _, ok := g2.DecideName(c, 0, "backup", now); ok {
		t.Fatal("another workload's role answered")
	}
	// After Grace: 404, and the pin is ignored.
	late := t0.Add(time.Second + Grace + time.Millisecond)
	if _, ok := g2.DecideName(c, 0, "billing", late); ok {
		t.Fatal("an old name answered after Grace")
	}
	if d := g2.Decide(c, g1.Gen(), late); d.Key != profile {
		t.Fatalf("pinned after Grace: %+v", d)
	}
	// Keys: G1's workload keys kept until Grace ends, then only G2's.
	if k := g2.Keys(now); !slices.Contains(k, wkey("billing")) || !slices.Contains(k, profile) {
		t.Fatalf("keys within Grace: %v", k)
	}
	if k := g2.Keys(late); len(k) != 1 || k[0] != profile {
		t.Fatalf("keys after Grace: %v", k)
	}
	if !g2.GraceEnds().Equal(t0.Add(time.Second + Grace)) {
		t.Fatalf("GraceEnds %v", g2.GraceEnds())
	}

	// A deny in G3 applies at once, even to a request pinned to G1.
	g3cfg := g1cfg
	g3cfg.Access = Section{DenyUIDs: []int{1001}, Audit: &off}
	g3 := mustPlan(t, g3cfg, g2, now)
	if d := g3.Decide(c, g1.Gen(), now); d.Outcome != Deny {
		t.Fatalf("deny in G3 with a G1 pin: %+v", d)
	}
	if d, ok := g3.DecideName(c, g1.Gen(), "billing", now); d.Outcome != Deny || !ok {
		t.Fatalf("named with a deny: %+v %v", d, ok)
	}
}

// TestRetainedBounded: a reload storm keeps at most maxRetired plans, and a
// retained plan does not hold its own retained plans (no chain in memory).
func TestRetainedBounded(t *testing.T) {
	pc := PlanConfig{Host: host, Serve: creds.KindWorkload}
	var p *Plan
	for i := range 20 {
		p = mustPlan(t, pc, p, t0.Add(time.Duration(i)*time.Millisecond))
	}
	if len(p.retired) != maxRetired {
		t.Fatalf("%d plans retained, want %d", len(p.retired), maxRetired)
	}
	for _, r := range p.retired {
		if r.plan.retired != nil {
			t.Fatal("a retained plan keeps its own retained plans")
		}
	}
	if p.Gen() != 20 {
		t.Fatalf("generation %d", p.Gen())
	}
}

func TestNewPlanRefuses(t *testing.T) {
	for name, pc := range map[string]PlanConfig{
		"no host":                      {Serve: creds.KindWorkload},
		"bad host name":                {Host: creds.Key{Kind: creds.KindWorkload, Role: creds.Role{Name: "a/b"}, Via: src}, Serve: creds.KindWorkload},
		"instance profile without key": {Host: host, Serve: creds.KindInstanceProfile},
		"fallback without key":         {Host: host, Serve: creds.KindWorkload, Fallback: true},
		"unknown kind":                 {Host: host, Serve: "other"},
		"keys and workloads differ":    {Host: host, Serve: creds.KindWorkload, Workloads: workloads},
	} {
		if _, err := NewPlan(pc, nil, t0); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

func TestIdentifyAndAudit(t *testing.T) {
	off := false
	for _, tc := range []struct {
		pc       PlanConfig
		identify bool
	}{
		{PlanConfig{Host: host, Serve: creds.KindWorkload, Access: Section{Audit: &off}}, false},
		{PlanConfig{Host: host, Serve: creds.KindWorkload}, true}, // audit on by default
		{PlanConfig{Host: host, Serve: creds.KindWorkload, Access: Section{Audit: &off, DenyUIDs: []int{5}}}, true},
		{PlanConfig{Host: host, Serve: creds.KindWorkload, Access: Section{Audit: &off}, Workloads: workloads, WorkloadKeys: wkeys()}, true},
	} {
		p := mustPlan(t, tc.pc, nil, t0)
		if p.Identify() != tc.identify {
			t.Errorf("%+v: Identify = %v", tc.pc.Access, p.Identify())
		}
		if d := p.Decide(Client{Local: true}, 0, t0); d.Audit != tc.pc.Access.AuditOn() {
			t.Errorf("audit %v, want %v", d.Audit, tc.pc.Access.AuditOn())
		}
	}
}

func TestConfigValidation(t *testing.T) {
	good := []Workload{{UID: uid(1001), Role: config.Role{ARN: "arn:aws:iam::333333333333:role/billing"}},
		{Unit: "backup.service", Role: config.Role{ARN: "arn:aws:iam::333333333333:role/x", Name: "backup", Duration: config.Duration(2 * time.Hour)}}}
	if err := ValidateWorkloads(good, "app", time.Minute); err != nil {
		t.Fatal(err)
	}
	if good[0].Role.Name != "billing" || good[0].Role.Duration.D() != DefaultWorkloadDuration {
		t.Errorf("defaults not filled: %+v", good[0].Role)
	}
	for _, tc := range []struct {
		list []Workload
		key  string
	}{
		{[]Workload{{Role: config.Role{ARN: "arn:aws:iam::333333333333:role/a"}}}, "workloads[0]"},
		{[]Workload{{UID: uid(1), Unit: "a.service", Role: config.Role{ARN: "arn:aws:iam::333333333333:role/a"}}}, "workloads[0]"},
		{[]Workload{{Unit: "a", Role: config.Role{ARN: "arn:aws:iam::333333333333:role/a"}}}, "workloads[0].unit"},
		{[]Workload{{UID: uid(-1), Role: config.Role{ARN: "arn:aws:iam::333333333333:role/a"}}}, "workloads[0].uid"},
		{[]Workload{{UID: uid(1), Role: config.Role{ARN: "nope"}}}, "workloads[0].role.arn"},
		{[]Workload{{UID: uid(1), Role: config.Role{ARN: "arn:aws:iam::333333333333:role/app"}}}, "workloads[0].role.name"},
		{[]Workload{{UID: uid(1), Role: config.Role{ARN: "arn:aws:iam::333333333333:role/a"}},
			{UID: uid(1), Role: config.Role{ARN: "arn:aws:iam::333333333333:role/b"}}}, "workloads[1].uid"},
		{[]Workload{{UID: uid(1), Role: config.Role{ARN: "arn:aws:iam::333333333333:role/a", Duration: config.Duration(15 * time.Minute)}}}, "workloads[0].role.duration"},
	} {
		err := ValidateWorkloads(tc.list, "app", 10*time.Minute)
		if err == nil || !strings.Contains(err.Error(), tc.key) {
			t.Errorf("%+v: %v, want an error naming %s", tc.list, err, tc.key)
		}
	}
	for _, s := range []Section{{AllowUIDs: []int{-1}}, {DenyUIDs: []int{MaxUID + 1}}, {AllowUnits: []string{"x"}}} {
		if err := s.Validate(); err == nil {
			t.Errorf("%+v accepted", s)
		}
	}
}

// TestDecideWorkload: a request authenticated as a workload by a front
// door's own credential (the container endpoint's token) is served that
// workload's role when the client is not a local process, and only when the
// plan's own decision for a local client agrees.
func TestDecideWorkload(t *testing.T) {
	off := false
	withWL := PlanConfig{Host: host, InstanceProfile: profile, Serve: creds.KindWorkload, Access: Section{Audit: &off},
		Workloads: workloads, WorkloadKeys: wkeys()}
	lists := withWL
	lists.Access = Section{AllowUIDs: []int{1002}, DenyUIDs: []int{1004}}
	profileServe := withWL
	profileServe.Serve = creds.KindInstanceProfile
	fallback := withWL
	fallback.Fallback = true
	for _, tc := range []struct {
		name     string
		pc       PlanConfig
		id       string
		c        Client
		outcome  Outcome
		key      creds.Key
		fallback creds.Key
		why      string
	}{
		{"not local (bridge): the token decides", withWL, "uid:1001", Client{}, Serve, wkey("billing"), creds.Key{}, ""},
		{"not local, a unit workload", withWL, "backup.service", Client{}, Serve, wkey("backup"), creds.Key{}, ""},
		{"not local with access lists: the token is its identity", lists, "uid:1003", Client{}, Serve, wkey("reports"), creds.Key{}, ""},
		{"local, its own workload", withWL, "uid:1001", local(1001, ""), Serve, wkey("billing"), creds.Key{}, ""},
		{"local, by unit", withWL, "backup.service", local(0, "backup.service"), Serve, wkey("backup"), creds.Key{}, ""},
		{"local, another uid with a stolen token", withWL, "uid:1001", local(1500, ""), Deny, creds.Key{}, creds.Key{}, "peer_mismatch"},
		{"local, another workload's token", withWL, "uid:1001", local(1003, ""), Deny, creds.Key{}, creds.Key{}, "peer_mismatch"},
		{"local, precedence makes it another workload", withWL, "uid:1003", local(1003, "backup.service"), Deny, creds.Key{}, creds.Key{}, "peer_mismatch"},
		{"local, denied by the lists", lists, "uid:1001", local(1004, ""), Deny, creds.Key{}, creds.Key{}, "denied_uid"},
		{"unresolved: retry", withWL, "uid:1001", Client{Unresolved: true}, Retry, creds.Key{}, creds.Key{}, "unresolved"},
		{"unit unknown: retry", withWL, "uid:1001", Client{Local: true, Info: peer.Info{UID: 1001, UnitUnknown: true}}, Retry, creds.Key{}, creds.Key{}, "unresolved"},
		{"unknown id", withWL, "uid:9", Client{}, Deny, creds.Key{}, creds.Key{}, "not_a_workload"},
		{"host role is no workload", withWL, "app", Client{}, Deny, creds.Key{}, creds.Key{}, "not_a_workload"},
		{"instance profile served to everyone", profileServe, "uid:1001", Client{}, Serve, profile, creds.Key{}, ""},
		{"instance profile served, local agrees", profileServe, "uid:1001", local(1500, ""), Serve, profile, creds.Key{}, ""},
		{"fallback carried", fallback, "uid:1001", Client{}, Serve, wkey("billing"), profile, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := mustPlan(t, tc.pc, nil, t0)
			d := p.DecideWorkload(tc.id, tc.c)
			if d.Outcome != tc.outcome || d.Key != tc.key || d.Fallback != tc.fallback || d.Why != tc.why {
				t.Fatalf("DecideWorkload = %+v\nwant outcome %v key %v fallback %v why %q", d, tc.outcome, tc.key, tc.fallback, tc.why)
			}
			if d.Outcome == Serve && (d.Name != tc.key.Role.Name || d.Host != (tc.key == profile)) {
				t.Fatalf("DecideWorkload = %+v: name or host flag wrong", d)
			}
			if d.Gen != 1 {
				t.Errorf("generation %d, want 1", d.Gen)
			}
		})
	}
}

func TestWorkloadID(t *testing.T) {
	if got := (Workload{UID: uid(1001)}).ID(); got != "uid:1001" {
		t.Errorf("uid entry ID = %q", got)
	}
	if got := (Workload{Unit: "app.service"}).ID(); got != "app.service" {
		t.Errorf("unit entry ID = %q", got)
	}
}
