package proxy

import (
	"context"
	"errors"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/imdsproxy/imdsproxy/creds"
)

// peerAccess is a hand-written AccessControl that identifies every
// connection as who (or fails with err) and allows everyone.
type peerAccess struct {
	who Peer
	err error
}

func (p peerAccess) Identify(context.Context, net.Conn) (Peer, error) { return p.who, p.err }
func (p peerAccess) Allow(Peer) bool                                  { return true }

// uidRoles is a hand-written RoleMapper: known uids to role names.
type uidRoles map[int]string

func (m uidRoles) RoleFor(p Peer) (string, bool) {
	if !p.Known {
		return "", false
	}
	n, ok := m[p.UID]
	return n, ok
}

// roleCreds is a CredentialSource holding distinct credentials per role; an
// unknown role is an error, as the daemon's fetcher refuses it.
type roleCreds struct {
	mu    sync.Mutex
	m     map[string]creds.Credentials
	roles []string // every role asked for
}

func (r *roleCreds) Credentials(_ context.Context, role string) (creds.Credentials, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.roles = append(r.roles, role)
	c, ok := r.m[role]
	if !ok {
		return creds.Credentials{}, errors.New("role not configured")
	}
	return c, nil
}

func (r *roleCreds) asked() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.roles...)
}

// credsFor returns valid credentials of role in account, with a key id of
// its own.
func credsFor(role, account, keyID string) creds.Credentials {
	c := testCreds()
	c.AccessKeyID = keyID
	c.SecretAccessKey = "secret-of-" + role
	c.SessionToken = "token-of-" + role
	c.AccountID = account
	c.RoleARN = "arn:aws:sts::" + account + ":assumed-role/" + role + "/host"
	c.Expires = time.Now().Add(time.Hour)
	return c
}

func newRolesServer(t *testing.T, cfg Config, src CredentialSource, log *zap.Logger) (string, *http.Client) {
	t.Helper()
	s, err := New(cfg, src, log, prometheus.NewRegistry())
	if err != nil {
		t.Fatal(err)
	}
	return serveEnv(t, &testEnv{s: s})
}

// TestRolesPerPeer: with a RoleMapper each client process is listed and
// served only its own role; an AlsoServe name is answered to every client
// with its own role's credentials; every other name is a 404 like an
// unknown role.
func TestRolesPerPeer(t *testing.T) {
	src := &roleCreds{m: map[string]creds.Credentials{
		testRole:  credsFor(testRole, "222222222222", "ASIAHOST0000000000000"),
		"billing": credsFor("billing", "111122223333", "ASIABILLING000000000"),
		"reports": credsFor("reports", "444455556666", "ASIAREPORTS000000000"),
	}}
	roles := uidRoles{1001: "billing", 1002: "reports"}
	const old = "previous" // a rollout's AlsoServe name: an alias of the served role
	for _, tc := range []struct {
		name    string
		access  peerAccess
		role    string // served role
		key     string // its access key id
		profile string // iam/info InstanceProfileArn
	}{
		{"workload billing", peerAccess{who: Peer{Known: true, UID: 1001}}, "billing", "ASIABILLING000000000",
			"arn:aws:iam::111122223333:instance-profile/billing"},
		{"workload reports", peerAccess{who: Peer{Known: true, UID: 1002, Unit: "reports.service"}}, "reports", "ASIAREPORTS000000000",
			"arn:aws:iam::444455556666:instance-profile/reports"},
		{"unmatched", peerAccess{who: Peer{Known: true, UID: 1003}}, testRole, "ASIAHOST0000000000000",
			"arn:aws:iam::222222222222:instance-profile/host-profile"},
		{"unidentified", peerAccess{err: errors.New("gone")}, testRole, "ASIAHOST0000000000000",
			"arn:aws:iam::222222222222:instance-profile/host-profile"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			core, logs := observer.New(zapcore.InfoLevel)
			base, client := newRolesServer(t, Config{
				RoleName: testRole, AlsoServe: []string{old}, Access: tc.access, Roles: roles,
				InstanceProfileARN: "arn:aws:iam::222222222222:instance-profile/host-profile",
			}, src, zap.New(core))
			iam := base + "/latest/meta-data/iam/"
			for _, list := range []string{"security-credentials/", "security-credentials-extended/"} {
				if code, body := get(t, client, iam+list); code != 200 || body != tc.role {
					t.Errorf("listing %s = %d %q, want %q", list, code, body, tc.role)
				}
			}
			for _, name := range []string{testRole, "billing", "reports", old, "unknown"} {
				for _, p := range []string{"security-credentials/", "security-credentials-extended/"} {
					code, body := get(t, client, iam+p+name)
					want := http.StatusNotFound
					if name == tc.role || name == old {
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
			for _, l := range logs.FilterMessage("credentials served").All() {
				if got := l.ContextMap()["role_name"]; got != tc.role {
					t.Errorf("audit role_name = %v, want %s", got, tc.role)
				}
				if got, ok := l.ContextMap()["requested_role_name"]; ok && got != old {
					t.Errorf("audit requested_role_name = %v, want %s (only for an alias)", got, old)
				}
				if got := l.ContextMap()["access_key_id"]; got != tc.key {
					t.Errorf("audit access_key_id = %v, want %s", got, tc.key)
				}
			}
			want := 4 // one per served document: legacy and extended, by name and by the AlsoServe alias
			if n := logs.FilterMessage("credentials served").Len(); n != want {
				t.Errorf("%d audit lines, want %d", n, want)
			}
		})
	}
	for _, r := range src.asked() {
		if r == "unknown" || r == old {
			t.Errorf("the credential source was asked for %q, a role nobody is served", r)
		}
	}
}

// TestRolesNeedAccess: a RoleMapper without an AccessControl could not tell
// clients apart; New and Update refuse it.
func TestRolesNeedAccess(t *testing.T) {
	cfg := Config{RoleName: testRole, Roles: uidRoles{}}
	if _, err := New(cfg, &fakeSource{}, nil, nil); err == nil || !strings.Contains(err.Error(), "Roles needs Access") {
		t.Fatalf("New without Access: %v", err)
	}
	e := newEnv(t, Config{})
	if err := e.s.Update(cfg); err == nil {
		t.Fatal("Update accepted Roles without Access")
	}
}

// TestRolesUpdate: a new mapping applies to the next request of an open
// connection; a role removed from the mapping is no longer served.
func TestRolesUpdate(t *testing.T) {
	src := &roleCreds{m: map[string]creds.Credentials{
		testRole:  credsFor(testRole, "222222222222", "ASIAHOST0000000000000"),
		"billing": credsFor("billing", "111122223333", "ASIABILLING000000000"),
	}}
	access := peerAccess{who: Peer{Known: true, UID: 1001}}
	s, err := New(Config{RoleName: testRole, Access: access, Roles: uidRoles{1001: "billing"}}, src, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	base, client := serveEnv(t, &testEnv{s: s})
	creds := base + "/latest/meta-data/iam/security-credentials/"
	if code, body := get(t, client, creds+"billing"); code != 200 || !strings.Contains(body, "ASIABILLING") {
		t.Fatalf("before: %d %q", code, body)
	}
	if err := s.Update(Config{RoleName: testRole, Access: access}); err != nil {
		t.Fatal(err)
	}
	if code, _ := get(t, client, creds+"billing"); code != 404 {
		t.Errorf("removed workload role: %d, want 404", code)
	}
	if code, body := get(t, client, creds); code != 200 || body != testRole {
		t.Errorf("listing after removal: %d %q", code, body)
	}
	if code, body := get(t, client, creds+testRole); code != 200 || !strings.Contains(body, "ASIAHOST") {
		t.Errorf("host role after removal: %d %q", code, body)
	}
}

// TestCredentialBodyPerRole: the memo of rendered documents is kept per
// role and never serves one role's document for another's credentials.
func TestCredentialBodyPerRole(t *testing.T) {
	e := newEnv(t, Config{})
	a := credsFor("a", "111122223333", "ASIAAAAAAAAAAAAAAAAA")
	b := credsFor("b", "444455556666", "ASIABBBBBBBBBBBBBBBB")
	now := time.Now()
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
	if err := e.s.Update(Config{RoleName: testRole}); err != nil {
		t.Fatal(err)
	}
	if e.s.docs.Load() != nil {
		t.Error("Update kept the memos")
	}
}

// peerSource is a CredentialSource recording the Peer PeerFromContext finds
// in each request's context.
type peerSource struct {
	mu    sync.Mutex
	peers []Peer
	found []bool
}

func (p *peerSource) Credentials(ctx context.Context, _ string) (creds.Credentials, error) {
	who, ok := PeerFromContext(ctx)
	p.mu.Lock()
	defer p.mu.Unlock()
	p.peers, p.found = append(p.peers, who), append(p.found, ok)
	return credsFor(testRole, "222222222222", "ASIAHOST0000000000000"), nil
}

// TestPeerFromContext: the CredentialSource finds the identified client in
// the request's context; an unidentified one or no AccessControl gives
// false.
func TestPeerFromContext(t *testing.T) {
	for _, tc := range []struct {
		name   string
		access AccessControl
		want   bool
	}{
		{"identified", peerAccess{who: Peer{Known: true, UID: 1001, Unit: "billing.service"}}, true},
		{"unidentified", peerAccess{err: errors.New("gone")}, false},
		{"no access control", nil, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			src := &peerSource{}
			base, client := newRolesServer(t, Config{RoleName: testRole, Access: tc.access}, src, nil)
			if code, _ := get(t, client, base+"/latest/meta-data/iam/security-credentials/"+testRole); code != 200 {
				t.Fatalf("GET = %d", code)
			}
			src.mu.Lock()
			defer src.mu.Unlock()
			if len(src.found) != 1 || src.found[0] != tc.want {
				t.Fatalf("PeerFromContext found %v, want [%v]", src.found, tc.want)
			}
			if tc.want && (src.peers[0].UID != 1001 || src.peers[0].Unit != "billing.service") {
				t.Errorf("PeerFromContext = %+v", src.peers[0])
			}
		})
	}
	if _, ok := PeerFromContext(context.Background()); ok {
		t.Error("a context without a connection has a peer")
	}
}
