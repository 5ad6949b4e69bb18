package proxy

import (
	"bytes"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/imdsproxy/imdsproxy/access"
	"github.com/imdsproxy/imdsproxy/creds"
	"github.com/imdsproxy/imdsproxy/peer"
)

// Consistency across a switch (access/plan.go): a request whose session
// token was minted under plan generation G is answered by G's plan while it
// is retained; a credential request naming a role a retained plan listed to
// the client is answered with what that name stood for; whether the client
// may read credentials at all is always the current plan's.

// billingPlan maps uid 1001 to billing (nobody audited).
func billingPlan() access.PlanConfig {
	return withWorkloads(access.PlanConfig{Access: noAudit()}, uidWorkload(1001, "billing"))
}

// TestSwitchConsistency: an SDK that minted its token under G1, where it
// was listed billing, keeps getting billing's listing, instance profile and
// credentials after G2 changed what it is served; a session started under
// G2 is listed G2's role, and the old name is still answered for
// access.Grace, then a 404.
func TestSwitchConsistency(t *testing.T) {
	for _, tc := range []struct {
		name    string
		g2      access.PlanConfig
		role    string // listed to the client under G2
		key     string // its access key id
		profile string // its iam/info InstanceProfileArn
	}{
		{"to the host role", // the workload entry now names another uid
			withWorkloads(access.PlanConfig{Access: noAudit()}, uidWorkload(1002, "reports")),
			testRole, "ASIAHOST0000000000000", hostProfile},
		{"to the instance profile", // a rollout switched the host to the instance profile
			func() access.PlanConfig {
				pc := billingPlan()
				pc.Serve, pc.InstanceProfile = creds.KindInstanceProfile, ipKey()
				return pc
			}(),
			testIPRole, "ASIAINSTANCEPROFILE0", hostProfile},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := Config{TokensRequired: true, InstanceProfileARN: hostProfile}
			cfg.Plan = planOf(t, billingPlan())
			e := newEnv(t, cfg)
			setRoleCreds(e)
			e.id.set(peer.Info{UID: 1001, Unit: "billing.service"}, nil)
			base, client := serveEnv(t, e)
			iam := base + "/latest/meta-data/iam/"
			put := func() string {
				t.Helper()
				r := fetch(t, client, http.MethodPut, base+"/latest/api/token", "")
				if r.code != 200 {
					t.Fatalf("token PUT: %d %q", r.code, r.body)
				}
				return r.body
			}
			check := func(label, tok, path string, code int, contains string) {
				t.Helper()
				r := fetch(t, client, http.MethodGet, iam+path, tok)
				if r.code != code || !strings.Contains(r.body, contains) {
					t.Errorf("%s: GET %s = %d %q, want %d with %q", label, path, r.code, r.body, code, contains)
				}
			}
			listing := func(label, tok, want string) {
				t.Helper()
				for _, p := range []string{"security-credentials/", "security-credentials-extended/"} {
					if r := fetch(t, client, http.MethodGet, iam+p, tok); r.code != 200 || r.body != want {
						t.Errorf("%s: listing %s = %d %q, want %q", label, p, r.code, r.body, want)
					}
				}
			}

			tok1 := put()
			listing("G1", tok1, "billing")

			g2 := e.publish(t, Config{TokensRequired: true, InstanceProfileARN: hostProfile}, tc.g2)
			if g2.Gen() != 2 {
				t.Fatalf("G2 is generation %d", g2.Gen())
			}
			tok2 := put()
			if st, gen := e.s.minter.verify(tok1, e.clock.now()); st != tokenValid || gen != 1 {
				t.Fatalf("G1 token pins %d (%d), want 1", gen, st)
			}
			if st, gen := e.s.minter.verify(tok2, e.clock.now()); st != tokenValid || gen != 2 {
				t.Fatalf("G2 token pins %d (%d), want 2", gen, st)
			}

			// The session of G1 sees G1's answers, every step.
			listing("G1 token after the switch", tok1, "billing")
			check("G1 token", tok1, "info", 200, `"InstanceProfileArn" : "arn:aws:iam::111122223333:instance-profile/billing"`)
			check("G1 token", tok1, "security-credentials/billing", 200, `"AccessKeyId" : "ASIABILLING000000000"`)
			check("G1 token", tok1, "security-credentials-extended/billing", 200, `"AccountId" : "111122223333"`)

			// A session of G2 sees G2's; the old name is still answered.
			listing("G2 token", tok2, tc.role)
			check("G2 token", tok2, "info", 200, `"InstanceProfileArn" : "`+tc.profile+`"`)
			check("G2 token", tok2, "security-credentials/"+tc.role, 200, `"AccessKeyId" : "`+tc.key+`"`)
			check("G2 token within Grace", tok2, "security-credentials/billing", 200, `"AccessKeyId" : "ASIABILLING000000000"`)
			check("G2 token", tok2, "security-credentials/reports", 404, "Not Found")

			e.clock.add(access.Grace - time.Second)
			check("G2 token just before Grace ends", tok2, "security-credentials/billing", 200, "ASIABILLING")

			e.clock.add(2 * time.Second)
			check("G2 token after Grace", tok2, "security-credentials/billing", 404, "Not Found")
			listing("G1 token after Grace", tok1, tc.role)
			check("G1 token after Grace", tok1, "security-credentials/billing", 404, "Not Found")
			check("G1 token after Grace", tok1, "security-credentials/"+tc.role, 200, tc.key)
		})
	}
}

// TestSwitchWorkloadsRemovedAuditOff is TestSwitchConsistency when G2 no
// longer needs the client identified (no workloads, no access lists, audit
// off): the retained G1 must still decide for the client G1 identified.
func TestSwitchWorkloadsRemovedAuditOff(t *testing.T) {
	e := newEnv(t, Config{TokensRequired: true, Plan: planOf(t, billingPlan())})
	setRoleCreds(e)
	e.id.set(peer.Info{UID: 1001}, nil)
	base, client := serveEnv(t, e)
	iam := base + "/latest/meta-data/iam/security-credentials/"
	tok1 := fetch(t, client, http.MethodPut, base+"/latest/api/token", "").body
	if r := fetch(t, client, http.MethodGet, iam, tok1); r.body != "billing" {
		t.Fatalf("G1 listing %d %q", r.code, r.body)
	}
	e.publish(t, Config{TokensRequired: true}, defaultPlanConfig())
	if r := fetch(t, client, http.MethodGet, iam, tok1); r.code != 200 || r.body != "billing" {
		t.Errorf("G1 token after a switch to a plan that identifies nobody: listing %d %q, want billing", r.code, r.body)
	}
	if r := fetch(t, client, http.MethodGet, iam+"billing", tok1); r.code != 200 || !strings.Contains(r.body, "ASIABILLING") {
		t.Errorf("G1 token: GET billing = %d %q", r.code, r.body)
	}
}

// TestSwitchAccessIsCurrent: a deny added, or an allow removed, in G2
// applies at once, even to a session whose token G1 minted.
func TestSwitchAccessIsCurrent(t *testing.T) {
	for _, tc := range []struct {
		name   string
		g1, g2 access.PlanConfig
	}{
		{"deny added",
			billingPlan(),
			func() access.PlanConfig { pc := billingPlan(); pc.Access.DenyUIDs = []int{1001}; return pc }()},
		{"allow removed",
			access.PlanConfig{Access: access.Section{AllowUIDs: []int{1001}}},
			access.PlanConfig{Access: access.Section{AllowUIDs: []int{2000}}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, Config{TokensRequired: true, Plan: planOf(t, tc.g1)})
			setRoleCreds(e)
			e.id.set(peer.Info{UID: 1001}, nil)
			base, client := serveEnv(t, e)
			iam := base + "/latest/meta-data/iam/"
			tok1 := fetch(t, client, http.MethodPut, base+"/latest/api/token", "").body
			r := fetch(t, client, http.MethodGet, iam+"security-credentials/", tok1)
			if r.code != 200 {
				t.Fatalf("G1 listing: %d %q", r.code, r.body)
			}
			listed := r.body
			e.publish(t, Config{TokensRequired: true}, tc.g2)
			for _, p := range []string{"security-credentials/", "security-credentials/" + listed,
				"security-credentials-extended/" + listed, "info"} {
				if r := fetch(t, client, http.MethodGet, iam+p, tok1); r.code != 403 || r.body != accessDeniedBody {
					t.Errorf("G1 token after %s: GET %s = %d %q, want 403", tc.name, p, r.code, r.body)
				}
			}
			if n := e.src.callCount(); n != 0 {
				t.Errorf("the source was asked %d times for a denied client", n)
			}
		})
	}
}

// TestSwitchHostRole: the same rules for a client that is never identified
// (the host role changed by a reload): the listing follows the token's
// generation, an IMDSv1 request (no token) the current plan, and the old
// name is answered for Grace.
func TestSwitchHostRole(t *testing.T) {
	e := newEnv(t, Config{Plan: planOf(t, access.PlanConfig{Host: roleKey("old-role"), Access: noAudit()})})
	e.src.set(creds.Credentials{}, errTimeout)
	e.src.setRole("old-role", credsFor("old-role", "111111111111", "ASIAOLDROLE000000000"), nil)
	e.src.setRole(testRole, hostCreds, nil)
	tok1 := e.token(t, "300")
	e.publish(t, Config{}, defaultPlanConfig())
	tok2 := e.token(t, "300")
	list := "/latest/meta-data/iam/security-credentials/"
	for _, tc := range []struct {
		name, tok, want string
	}{
		{"G1 token", tok1, "old-role"},
		{"G2 token", tok2, testRole},
		{"IMDSv1", "", testRole},
	} {
		hdr := map[string]string{}
		if tc.tok != "" {
			hdr[headerToken] = tc.tok
		}
		if w := e.do(http.MethodGet, list, hdr); w.Code != 200 || w.Body.String() != tc.want {
			t.Errorf("%s: listing %d %q, want %q", tc.name, w.Code, w.Body.String(), tc.want)
		}
		if w := e.do(http.MethodGet, list+"old-role", hdr); w.Code != 200 || !strings.Contains(w.Body.String(), "ASIAOLDROLE") {
			t.Errorf("%s: old name within Grace: %d %q", tc.name, w.Code, w.Body.String())
		}
	}
	e.clock.add(access.Grace)
	for _, tok := range []string{tok1, tok2} {
		hdr := map[string]string{headerToken: tok}
		if w := e.do(http.MethodGet, list, hdr); w.Body.String() != testRole {
			t.Errorf("listing after Grace: %q", w.Body.String())
		}
		if w := e.do(http.MethodGet, list+"old-role", hdr); w.Code != 404 {
			t.Errorf("old name after Grace: %d, want 404", w.Code)
		}
	}
}

// TestSwitchTokenOfAnotherProcess: a token of another process sharing the
// token key (a restart) is valid but pins nothing: it is answered by the
// current plan even when a plan of its generation number is retained here.
func TestSwitchTokenOfAnotherProcess(t *testing.T) {
	key := bytes.Repeat([]byte{7}, TokenKeySize)
	other := newEnv(t, Config{TokenKey: key, Plan: planOf(t, access.PlanConfig{Host: roleKey("old-role"), Access: noAudit()})})
	foreign := other.token(t, "300") // generation 1 of the other process

	e := newEnv(t, Config{TokenKey: key, Plan: planOf(t, access.PlanConfig{Host: roleKey("old-role"), Access: noAudit()})})
	own := e.token(t, "300") // generation 1 here
	e.publish(t, Config{}, defaultPlanConfig())
	if st, gen := e.s.minter.verify(foreign, e.clock.now()); st != tokenValid || gen != 0 {
		t.Fatalf("foreign token: status %d pin %d, want valid and no pin", st, gen)
	}
	list := "/latest/meta-data/iam/security-credentials/"
	if w := e.do(http.MethodGet, list, map[string]string{headerToken: own}); w.Body.String() != "old-role" {
		t.Errorf("own G1 token: listing %q, want old-role", w.Body.String())
	}
	if w := e.do(http.MethodGet, list, map[string]string{headerToken: foreign}); w.Code != 200 || w.Body.String() != testRole {
		t.Errorf("foreign token: listing %d %q, want %q (the current plan)", w.Code, w.Body.String(), testRole)
	}
}

// TestSwitchPlanPerRequest: a request uses the plan it loaded first; one
// that overlaps an Update is answered wholly by one plan (run with -race).
func TestSwitchPlanPerRequest(t *testing.T) {
	e := newEnv(t, Config{})
	e.src.setRole("old-role", credsFor("old-role", "111111111111", "ASIAOLDROLE000000000"), nil)
	// Chained plans, built up front: Update is what races with requests.
	var plans []*access.Plan
	prev := e.plan
	for i := range 100 {
		pc := defaultPlanConfig()
		if i%2 == 0 {
			pc.Host = roleKey("old-role")
		}
		p, err := access.NewPlan(pc, prev, t0)
		if err != nil {
			t.Fatal(err)
		}
		plans, prev = append(plans, p), p
	}
	if err := e.s.Update(Config{Plan: plans[0]}); err != nil { // old-role listed from now on
		t.Fatal(err)
	}
	errc := make(chan error, 1)
	go func() {
		for _, p := range plans[1:] {
			if err := e.s.Update(Config{Plan: p}); err != nil {
				errc <- err
				return
			}
		}
		errc <- nil
	}()
	for {
		select {
		case err := <-errc:
			if err != nil {
				t.Fatal(err)
			}
			return
		default:
		}
		w := e.do(http.MethodGet, "/latest/meta-data/iam/security-credentials/", nil)
		if b := w.Body.String(); b != testRole && b != "old-role" {
			t.Fatalf("listing %q", b)
		}
		if w := e.do(http.MethodGet, "/latest/meta-data/iam/security-credentials/old-role", nil); w.Code != 200 {
			t.Fatalf("old-role within Grace: %d", w.Code)
		}
	}
}
