package proxy

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/imdsproxy/imdsproxy/access"
	"github.com/imdsproxy/imdsproxy/creds"
	"github.com/imdsproxy/imdsproxy/peer"
)

// Distinct credentials per role of the plan tests.
var (
	hostCreds    = credsFor(testRole, "222222222222", "ASIAHOST0000000000000")
	billingCreds = credsFor("billing", "111122223333", "ASIABILLING000000000")
	reportsCreds = credsFor("reports", "444455556666", "ASIAREPORTS000000000")
	ipCreds      = credsFor(testIPRole, "222222222222", "ASIAINSTANCEPROFILE0")
)

// setRoleCreds makes e's source answer each role with its own credentials
// and any other key with an error, as the daemon's cache refuses a key it
// does not keep.
func setRoleCreds(e *testEnv) {
	e.src.set(creds.Credentials{}, errors.New("key not kept"))
	e.src.setRole(testRole, hostCreds, nil)
	e.src.setRole("billing", billingCreds, nil)
	e.src.setRole("reports", reportsCreds, nil)
	e.src.setRole(testIPRole, ipCreds, nil)
}

// twoWorkloads maps uid 1001 to billing and uid 1002 to reports; audit is
// on (the section's default).
func twoWorkloads() access.PlanConfig {
	return withWorkloads(access.PlanConfig{}, uidWorkload(1001, "billing"), uidWorkload(1002, "reports"))
}

const hostProfile = "arn:aws:iam::222222222222:instance-profile/host-profile"

// TestRolesPerPeer: with a workloads: mapping each client process is
// listed and served only its own role; an unmatched client, or one that is
// not a process of this host (a container on a bridge), the host role;
// every other role name is a 404 like an unknown role. The source is asked
// for the decided key itself.
func TestRolesPerPeer(t *testing.T) {
	for _, tc := range []struct {
		name    string
		who     peer.Info
		err     error
		role    string // served role
		key     string // its access key id
		profile string // iam/info InstanceProfileArn
	}{
		{"workload billing", peer.Info{UID: 1001}, nil, "billing", "ASIABILLING000000000",
			"arn:aws:iam::111122223333:instance-profile/billing"},
		{"workload reports", peer.Info{UID: 1002, Unit: "reports.service"}, nil, "reports", "ASIAREPORTS000000000",
			"arn:aws:iam::444455556666:instance-profile/reports"},
		{"unmatched", peer.Info{UID: 1003}, nil, testRole, "ASIAHOST0000000000000", hostProfile},
		{"not local", peer.Info{}, peer.ErrNotFound, testRole, "ASIAHOST0000000000000", hostProfile},
	} {
		t.Run(tc.name, func(t *testing.T) {
			core, logs := observer.New(zapcore.InfoLevel)
			e := newEnvLog(t, Config{Plan: planOf(t, twoWorkloads()), InstanceProfileARN: hostProfile}, zap.New(core))
			setRoleCreds(e)
			e.id.set(tc.who, tc.err)
			base, client := serveEnv(t, e)
			iam := base + "/latest/meta-data/iam/"
			for _, list := range []string{"security-credentials/", "security-credentials-extended/"} {
				if code, body := get(t, client, iam+list); code != 200 || body != tc.role {
					t.Errorf("listing %s = %d %q, want %q", list, code, body, tc.role)
				}
			}
			for _, name := range []string{testRole, "billing", "reports", "unknown"} {
				for _, p := range []string{"security-credentials/", "security-credentials-extended/"} {
					code, body := get(t, client, iam+p+name)
					want := http.StatusNotFound
					if name == tc.role {
						want = http.StatusOK
					}
					if code != want {
						t.Errorf("GET %s%s = %d, want %d", p, name, code, want)
						continue
					}
					if want == http.StatusNotFound {
						if body != "Not Found" {
							t.Errorf("GET %s%s: body %q, want the unknown-role 404", p, name, body)
						}
						continue
					}
					if !strings.Contains(body, `"AccessKeyId" : "`+tc.key+`"`) {
						t.Errorf("GET %s%s served another role's document: %q", p, name, body)
					}
				}
			}
			code, body := get(t, client, iam+"info")
			if code != 200 || !strings.Contains(body, `"InstanceProfileArn" : "`+tc.profile+`"`) {
				t.Errorf("iam/info = %d %q, want profile %s", code, body, tc.profile)
			}
			var handouts int
			for _, l := range logs.FilterMessage("credentials served").All() {
				m := l.ContextMap()
				if m["role_name"] != tc.role || m["access_key_id"] != tc.key {
					t.Errorf("audit role_name %v access_key_id %v, want %s %s", m["role_name"], m["access_key_id"], tc.role, tc.key)
				}
				if _, ok := m["requested_role_name"]; ok {
					t.Errorf("audit requested_role_name = %v for the role listed", m["requested_role_name"])
				}
				if m["route"] == routeCredentials || m["route"] == routeCredentialsExtended {
					handouts++
				}
			}
			if handouts != 1 {
				t.Errorf("%d audit lines of credential documents, want 1 (the first hand-out; the second is a counted repeat)", handouts)
			}
			want := roleKey(tc.role)
			for _, k := range e.src.askedKeys() {
				if k != want {
					t.Errorf("the source was asked for %+v, want the decided key %+v", k, want)
				}
			}
			if n := e.id.calls.Load(); n != 1 {
				t.Errorf("Identifier called %d times on one connection, want 1", n)
			}
		})
	}
}

// TestRolesNoIdentifier: without an Identifier a plan with workloads sees
// the zero Client: every client is served the host role.
func TestRolesNoIdentifier(t *testing.T) {
	e := newEnvWith(t, Config{Plan: planOf(t, twoWorkloads())}, envOpts{noID: true})
	setRoleCreds(e)
	base, client := serveEnv(t, e)
	if code, body := get(t, client, base+"/latest/meta-data/iam/security-credentials/"); code != 200 || body != testRole {
		t.Errorf("listing = %d %q, want %q", code, body, testRole)
	}
	if code, _ := get(t, client, base+"/latest/meta-data/iam/security-credentials/billing"); code != 404 {
		t.Errorf("a workload's role: %d, want 404", code)
	}
}

// TestRolesUnresolved: with workloads, a client that could not be
// identified (an error other than peer.ErrNotFound: a timeout, a failed
// lookup) is told to retry on every credential route, never given the host
// role; it is identified again on its next request, and served its role
// once identified.
func TestRolesUnresolved(t *testing.T) {
	for _, tc := range []struct {
		name string
		err  error
	}{
		{"timeout", errTimeout},
		{"lookup failed", errors.New("sock_diag: interrupted")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			core, logs := observer.New(zapcore.InfoLevel)
			e := newEnvLog(t, Config{Plan: planOf(t, twoWorkloads())}, zap.New(core))
			setRoleCreds(e)
			e.id.set(peer.Info{UID: 1001}, tc.err)
			base, client := serveEnv(t, e)
			iam := base + "/latest/meta-data/iam/"
			paths := []string{"security-credentials/", "security-credentials-extended/", "security-credentials/billing",
				"security-credentials/" + testRole, "security-credentials-extended/unknown", "info"}
			for _, p := range paths {
				r := fetch(t, client, http.MethodGet, iam+p, "")
				if r.code != http.StatusServiceUnavailable || r.hdr.Get("Retry-After") != "1" || r.body != retryBody {
					t.Errorf("GET %s = %d %q (Retry-After %q), want 503 with Retry-After: 1", p, r.code, r.body, r.hdr.Get("Retry-After"))
				}
			}
			if n := e.id.calls.Load(); n != int32(len(paths)) {
				t.Errorf("Identifier called %d times for %d requests: an unresolved client must not be remembered", n, len(paths))
			}
			if got := metricValue(t, e.reg, "imdsproxy_access_refused_total", map[string]string{"outcome": "retry", "reason": "unresolved"}); got != float64(len(paths)) {
				t.Errorf("refused{retry,unresolved} = %v, want %d", got, len(paths))
			}
			if got := metricValue(t, e.reg, "imdsproxy_access_refused_total", map[string]string{"outcome": "deny", "reason": "not_allowed"}); got != 0 {
				t.Errorf("a retry counted as denied: %v", got)
			}
			if n := e.src.callCount(); n != 0 || logs.FilterMessage("credentials served").Len() != 0 {
				t.Errorf("an unresolved client reached the source (%d calls) or the audit", n)
			}

			// Identified on the next request of the same connection.
			e.id.set(peer.Info{UID: 1001}, nil)
			if code, body := get(t, client, iam+"security-credentials/"); code != 200 || body != "billing" {
				t.Fatalf("listing once identified: %d %q", code, body)
			}
			if code, body := get(t, client, iam+"security-credentials/billing"); code != 200 || !strings.Contains(body, "ASIABILLING") {
				t.Fatalf("credentials once identified: %d %q", code, body)
			}
			if n := e.id.calls.Load(); n != int32(len(paths))+1 {
				t.Errorf("Identifier called %d times, want %d (an identified client is remembered)", n, len(paths)+1)
			}
		})
	}
}

// TestRolesUnitUnknown: when the kernel named the client's cgroup but its
// unit could not be told, a plan with a unit entry cannot decide (the unit
// entry might match): 503, asked again next time. A plan matching by uid
// only decides by the uid.
func TestRolesUnitUnknown(t *testing.T) {
	unknown := peer.Info{UID: 1001, Cgroup: "/system.slice/billing.service", UnitUnknown: true}
	t.Run("unit entry", func(t *testing.T) {
		pc := withWorkloads(access.PlanConfig{}, unitWorkload("billing.service", "billing"))
		e := newEnv(t, Config{Plan: planOf(t, pc)})
		setRoleCreds(e)
		e.id.set(unknown, nil)
		base, client := serveEnv(t, e)
		for _, p := range []string{"security-credentials/", "security-credentials/" + testRole, "security-credentials/billing"} {
			r := fetch(t, client, http.MethodGet, base+"/latest/meta-data/iam/"+p, "")
			if r.code != http.StatusServiceUnavailable || r.hdr.Get("Retry-After") != "1" {
				t.Errorf("GET %s = %d %q, want 503 with Retry-After", p, r.code, r.body)
			}
		}
		known := unknown
		known.Unit, known.UnitUnknown = "billing.service", false
		e.id.set(known, nil)
		if code, body := get(t, client, base+"/latest/meta-data/iam/security-credentials/"); code != 200 || body != "billing" {
			t.Errorf("listing once the unit is known: %d %q", code, body)
		}
		if n := e.id.calls.Load(); n != 4 {
			t.Errorf("Identifier called %d times, want 4", n)
		}
	})
	t.Run("uid entries only", func(t *testing.T) {
		e := newEnv(t, Config{Plan: planOf(t, twoWorkloads())})
		setRoleCreds(e)
		e.id.set(unknown, nil)
		base, client := serveEnv(t, e)
		if code, body := get(t, client, base+"/latest/meta-data/iam/security-credentials/"); code != 200 || body != "billing" {
			t.Errorf("listing = %d %q, want billing (matched by uid)", code, body)
		}
	})
}

// TestRolesUpdate: a new plan applies to the next request of an open
// connection. A role removed from the mapping is no longer listed, its
// name is still answered (with its credentials) for access.Grace to the
// client it was listed to, then it is a 404.
func TestRolesUpdate(t *testing.T) {
	e := newEnv(t, Config{Plan: planOf(t, withWorkloads(access.PlanConfig{}, uidWorkload(1001, "billing")))})
	setRoleCreds(e)
	e.id.set(peer.Info{UID: 1001}, nil)
	base, client := serveEnv(t, e)
	list := base + "/latest/meta-data/iam/security-credentials/"
	if code, body := get(t, client, list+"billing"); code != 200 || !strings.Contains(body, "ASIABILLING") {
		t.Fatalf("before: %d %q", code, body)
	}
	e.publish(t, Config{}, access.PlanConfig{}) // no workloads; audit on
	if code, body := get(t, client, list); code != 200 || body != testRole {
		t.Errorf("listing after removal: %d %q", code, body)
	}
	if code, body := get(t, client, list+"billing"); code != 200 || !strings.Contains(body, "ASIABILLING") {
		t.Errorf("removed workload role within Grace: %d %q, want its credentials", code, body)
	}
	if code, body := get(t, client, list+testRole); code != 200 || !strings.Contains(body, "ASIAHOST") {
		t.Errorf("host role after removal: %d %q", code, body)
	}
	e.clock.add(access.Grace + time.Second)
	if code, _ := get(t, client, list+"billing"); code != 404 {
		t.Errorf("removed workload role after Grace: %d, want 404", code)
	}
	if code, body := get(t, client, list); code != 200 || body != testRole {
		t.Errorf("listing after Grace: %d %q", code, body)
	}
}

// TestCredentialBodyPerRole: the memo of rendered documents is kept per
// role and never serves one role's document for another's credentials.
func TestCredentialBodyPerRole(t *testing.T) {
	e := newEnv(t, Config{})
	a := credsFor("a", "111122223333", "ASIAAAAAAAAAAAAAAAAA")
	b := credsFor("b", "444455556666", "ASIABBBBBBBBBBBBBBBB")
	now := t0
	da := e.s.credentialBody("a", a, now, false)
	db := e.s.credentialBody("b", b, now, true)
	if !strings.Contains(string(da), "ASIAAAAA") || strings.Contains(string(da), "ASIABBBB") {
		t.Fatalf("document of a: %s", da)
	}
	if !strings.Contains(string(db), "ASIABBBB") || !strings.Contains(string(db), `"AccountId" : "444455556666"`) {
		t.Fatalf("document of b: %s", db)
	}
	// Both memos survive the other role's rendering: the same bytes again.
	if again := e.s.credentialBody("a", a, now, false); &again[0] != &da[0] {
		t.Error("role a's document was rendered again after role b's")
	}
	if again := e.s.credentialBody("b", b, now, true); &again[0] != &db[0] {
		t.Error("role b's document was rendered again")
	}
	// Another role's credentials under a memoised name are rendered, not
	// served from the memo.
	if d := e.s.credentialBody("a", b, now, false); !strings.Contains(string(d), "ASIABBBB") {
		t.Errorf("credentials of b under name a got %s", d)
	}
	// Update drops every memo (names may no longer be served).
	if err := e.s.Update(Config{Plan: e.plan}); err != nil {
		t.Fatal(err)
	}
	if e.s.docs.Load() != nil {
		t.Error("Update kept the memos")
	}
}

// fallbackPlan serves the host role, with the instance profile's
// credentials when the host role's are unavailable.
func fallbackPlan() access.PlanConfig {
	return access.PlanConfig{Fallback: true, InstanceProfile: ipKey()}
}

// TestFallback: with rollout.fallback: instance-profile, a workload key
// with nothing valid is served the instance profile's credentials under
// the name listed, counted and audited as a fallback; a key that works is
// served as is.
func TestFallback(t *testing.T) {
	core, logs := observer.New(zapcore.InfoLevel)
	e := newEnvLog(t, Config{Plan: planOf(t, fallbackPlan())}, zap.New(core)) // audit on
	setRoleCreds(e)
	fallbacks := func() float64 { return metricValue(t, e.reg, "imdsproxy_rollout_fallbacks_total", nil) }
	path := "/latest/meta-data/iam/security-credentials/" + testRole

	if w := e.do(http.MethodGet, path, nil); w.Code != 200 || !strings.Contains(w.Body.String(), "ASIAHOST") {
		t.Fatalf("working key: %d %q", w.Code, w.Body.String())
	}
	if got := fallbacks(); got != 0 {
		t.Fatalf("fallbacks = %v with a working key", got)
	}
	if got := e.src.asked(); len(got) != 1 || got[0] != testRole {
		t.Fatalf("source asked %v, want only %s", got, testRole)
	}

	e.src.setRole(testRole, creds.Credentials{}, &classErr{"server", false, "sts: 503"})
	if w := e.do(http.MethodGet, "/latest/meta-data/iam/security-credentials/", nil); w.Body.String() != testRole {
		t.Errorf("listing = %q, want the workload role's name", w.Body.String())
	}
	w := e.do(http.MethodGet, path, nil)
	if w.Code != 200 || !strings.Contains(w.Body.String(), `"AccessKeyId" : "ASIAINSTANCEPROFILE0"`) {
		t.Fatalf("failing key: %d %q, want the instance profile's credentials", w.Code, w.Body.String())
	}
	if got := fallbacks(); got != 1 {
		t.Errorf("imdsproxy_rollout_fallbacks_total = %v, want 1", got)
	}
	if got := metricValue(t, e.reg, "imdsproxy_rollout_served_total", map[string]string{"kind": string(creds.KindInstanceProfile)}); got != 1 {
		t.Errorf("served{instance-profile} = %v, want 1", got)
	}
	keys := e.src.askedKeys()
	if len(keys) != 3 || keys[1] != roleKey(testRole) || keys[2] != ipKey() {
		t.Errorf("source asked %v, want the workload key then the instance profile's", keys)
	}
	lines := logs.FilterMessage("credentials served").All()
	if len(lines) != 2 {
		t.Fatalf("%d audit lines, want 2", len(lines))
	}
	if m := lines[1].ContextMap(); m["fallback"] != true || m["role_name"] != testIPRole || m["access_key_id"] != "ASIAINSTANCEPROFILE0" {
		t.Errorf("audit of the fallback: %v", m)
	}

	// The fallback failing too: the workload key's error is served.
	e.src.setRole(testIPRole, creds.Credentials{}, errors.New("imds unreachable"))
	w = e.do(http.MethodGet, path, nil)
	if w.Code != 200 || !strings.Contains(w.Body.String(), `"Code" : "ServiceUnavailable"`) {
		t.Errorf("both failing: %d %q, want the workload error's document", w.Code, w.Body.String())
	}
	if got := fallbacks(); got != 1 {
		t.Errorf("a failed fallback was counted: %v", got)
	}
}

// TestFallbackNotOnCancel: a request cancelled by its client never falls
// back (its error is the client's going away, not the key's).
func TestFallbackNotOnCancel(t *testing.T) {
	e := newEnv(t, Config{Plan: planOf(t, access.PlanConfig{Access: noAudit(), Fallback: true, InstanceProfile: ipKey()})})
	setRoleCreds(e)
	e.src.setRole(testRole, creds.Credentials{}, context.Canceled)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	r := httptest.NewRequest(http.MethodGet, "/latest/meta-data/iam/security-credentials/"+testRole, nil).WithContext(ctx)
	w := httptest.NewRecorder()
	e.s.Handler().ServeHTTP(w, r)
	if strings.Contains(w.Body.String(), "ASIAINSTANCEPROFILE0") {
		t.Errorf("a cancelled request was served the fallback: %q", w.Body.String())
	}
	if got := e.src.asked(); len(got) != 1 || got[0] != testRole {
		t.Errorf("source asked %v, want only %s", got, testRole)
	}
	if got := metricValue(t, e.reg, "imdsproxy_rollout_fallbacks_total", nil); got != 0 {
		t.Errorf("fallbacks = %v for a cancelled request", got)
	}
}
