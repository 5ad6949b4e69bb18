package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/imdsproxy/imdsproxy/creds"
	"github.com/imdsproxy/imdsproxy/proxy"
	"github.com/imdsproxy/imdsproxy/rollout"
)

// uidAccess is a hand-written AccessControl that identifies a connection by
// its local port: each test client dials from a port registered for a uid.
type uidAccess struct {
	mu    sync.Mutex
	byKey map[string]int // client address → uid
}

func (a *uidAccess) Identify(_ context.Context, conn net.Conn) (proxy.Peer, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	uid, ok := a.byKey[conn.RemoteAddr().String()]
	if !ok {
		return proxy.Peer{}, errors.New("unknown client")
	}
	return proxy.Peer{Known: true, UID: uid}, nil
}

func (a *uidAccess) Allow(proxy.Peer) bool { return true }

// keyCreds is a rollout.Source with credentials per cache key.
type keyCreds struct {
	mu sync.Mutex
	m  map[string]creds.Credentials
}

func (k *keyCreds) Credentials(_ context.Context, key string) (creds.Credentials, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	c, ok := k.m[key]
	if !ok {
		return creds.Credentials{}, fmt.Errorf("nothing valid cached for %s", key)
	}
	return c, nil
}

func (k *keyCreds) drop(key string) { k.mu.Lock(); delete(k.m, key); k.mu.Unlock() }

func credsWithKey(id string) creds.Credentials {
	return creds.Credentials{
		AccessKeyID: id, SecretAccessKey: "secret", SessionToken: "token",
		Expires: time.Now().Add(time.Hour), LastUpdated: time.Now(),
		AccountID: "222222222222", RoleARN: "arn:aws:sts::222222222222:assumed-role/x/s",
	}
}

// TestRolloutWorkloadMapping: under a rollout the decision switches the whole
// host: serving the instance profile, every client (workload or not) is
// listed and served it; serving the workload kind, each workload gets its
// role and every other client the host's. Around a switch (decision set, the
// proxy not yet updated) a client asking for the name it was listed before
// gets the credentials it is served now, never another client's role; with
// fallback instance-profile a workload whose role has nothing valid gets the
// instance profile's.
func TestRolloutWorkloadMapping(t *testing.T) {
	uid := func(u int) *int { return &u }
	cfg := Config{
		Role:      RoleConfig{Name: "app"},
		Access:    AccessConfig{},
		Workloads: []WorkloadCfg{{UID: uid(1001), Role: RoleConfig{Name: "billing"}}},
	}
	src := &keyCreds{m: map[string]creds.Credentials{
		"app": credsWithKey("ASIAHOSTROLE"), "billing": credsWithKey("ASIABILLING"),
		"instance-profile/ip-role": credsWithKey("ASIAPROFILE"),
	}}
	r := &rolloutState{workloadKey: "app", ipRole: "ip-role", ipKey: "instance-profile/ip-role",
		fallback: rollout.FallbackInstanceProfile}
	r.roles.Store(newWorkloadRoles(cfg.Workloads))
	sel, err := rollout.NewSelector(rollout.SelectorConfig{
		Workload: src, WorkloadKey: r.workloadKey, WorkloadKeyFor: r.workloadKeyFor,
		InstanceProfile: src, InstanceProfileKey: r.ipKey, Fallback: r.fallback,
	}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	r.selector = sel
	d := &daemon{rollout: r}
	name := "ip-role"
	d.roleName.Store(&name)

	access := &uidAccess{byKey: map[string]int{}}
	_, roles := proxyAccess(cfg, nil)
	pcfg := func() proxy.Config {
		return proxy.Config{RoleName: *d.roleName.Load(), Access: access, Roles: d.rolloutMapper(roles),
			AlsoServe: d.rolloutRoleNames(cfg)}
	}
	srv, err := proxy.New(pcfg(), sel, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = srv.Serve(ctx, ln) }()
	t.Cleanup(func() { cancel(); <-done })

	// get sends one request as uid, on a connection of its own.
	get := func(uid int, path string) (int, string) {
		t.Helper()
		conn, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		access.mu.Lock()
		access.byKey[conn.LocalAddr().String()] = uid
		access.mu.Unlock()
		fmt.Fprintf(conn, "GET /latest/meta-data/iam/%s HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n", path)
		resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	const workload, other = 1001, 2000
	check := func(step string, uid int, wantList string, names []string, wantKey string) {
		t.Helper()
		if code, body := get(uid, "security-credentials/"); code != 200 || body != wantList {
			t.Errorf("%s: uid %d listing = %d %q, want %q", step, uid, code, body, wantList)
		}
		for _, n := range names {
			code, body := get(uid, "security-credentials/"+n)
			if code != 200 || !strings.Contains(body, `"AccessKeyId" : "`+wantKey+`"`) {
				t.Errorf("%s: uid %d GET %s = %d %q, want the credentials of %s", step, uid, n, code, body, wantKey)
			}
		}
	}
	update := func() {
		t.Helper()
		if err := srv.Update(pcfg()); err != nil {
			t.Fatal(err)
		}
	}
	on := rollout.Decide(&rollout.Policy{Default: rollout.Rule{Stage: rollout.StageOn}}, "", 1)
	off := rollout.Decide(&rollout.Policy{}, "", 1)

	sel.Set(off)
	update()
	check("off", workload, "ip-role", []string{"ip-role"}, "ASIAPROFILE")
	check("off", other, "ip-role", []string{"ip-role"}, "ASIAPROFILE")

	// Switched on, the proxy not yet updated: the listing of the workload
	// follows at once; the old names still answer, each with its own role.
	sel.Set(on)
	check("switching on", workload, "billing", []string{"ip-role", "billing"}, "ASIABILLING")
	check("switching on", other, "ip-role", []string{"ip-role"}, "ASIAHOSTROLE")
	name = "app"
	d.roleName.Store(&name)
	update()
	check("on", workload, "billing", []string{"billing", "app", "ip-role"}, "ASIABILLING")
	check("on", other, "app", []string{"app", "ip-role", "billing"}, "ASIAHOSTROLE")
	if code, body := get(other, "security-credentials/unknown"); code != 404 {
		t.Errorf("on: unknown role = %d %q", code, body)
	}

	// Fallback instance-profile: the workload's role has nothing valid.
	src.drop("billing")
	check("on, billing not cached", workload, "billing", []string{"billing"}, "ASIAPROFILE")
	check("on, billing not cached", other, "app", []string{"app"}, "ASIAHOSTROLE")

	// Switched off, the proxy not yet updated: everyone gets the instance
	// profile, whatever name it read before.
	sel.Set(off)
	check("switching off", workload, "app", []string{"billing", "app"}, "ASIAPROFILE")
	check("switching off", other, "app", []string{"app", "billing"}, "ASIAPROFILE")
	name = "ip-role"
	d.roleName.Store(&name)
	update()
	check("off again", workload, "ip-role", []string{"ip-role", "billing"}, "ASIAPROFILE")
	check("off again", other, "ip-role", []string{"ip-role", "app"}, "ASIAPROFILE")
}

// TestRolloutRoleNames: every name a client may have been listed is
// answered, each once.
func TestRolloutRoleNames(t *testing.T) {
	uid := func(u int) *int { return &u }
	d := &daemon{rollout: &rolloutState{workloadKey: "app", ipRole: "app"}}
	name := "app"
	d.roleName.Store(&name)
	cfg := Config{Workloads: []WorkloadCfg{{UID: uid(1), Role: RoleConfig{Name: "billing"}}, {Unit: "r.service", Role: RoleConfig{Name: "reports"}}}}
	if got := d.rolloutRoleNames(cfg); !slices.Equal(got, []string{"app", "billing", "reports"}) {
		t.Errorf("rolloutRoleNames = %q", got)
	}
	if got := (&daemon{}).rolloutRoleNames(cfg); got != nil {
		t.Errorf("without a rollout: %q", got)
	}
}

// TestDaemonRolloutWorkloads: the daemon with workloads under a rollout
// fetches the workloads' roles when the host starts serving the workload
// kind and forgets them when it stops; /debug/status tells whether the
// workloads are active.
func TestDaemonRolloutWorkloads(t *testing.T) {
	policy := filepath.Join(t.TempDir(), "rollout.yaml")
	write := func(text string) {
		t.Helper()
		if err := os.WriteFile(policy, []byte(text), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write("version: v1\ndefault: off\n")
	td := startDaemonWith(t, fmt.Sprintf("rollout: {policy: %s, poll_interval: 1h}\n", policy)+
		"workloads: [{uid: 4242, role: {arn: \"arn:aws:iam::111122223333:role/billing\"}}]\n", standInIMDS(t))
	ctx := context.Background()
	keys := func() []string {
		var out []string
		for _, e := range td.d.cache.Snapshot() {
			if e.Valid {
				out = append(out, e.Key)
			}
		}
		slices.Sort(out)
		return out
	}
	waitKeys := func(step string, want ...string) {
		t.Helper()
		deadline := time.Now().Add(20 * time.Second)
		for !slices.Equal(keys(), want) {
			if time.Now().After(deadline) {
				t.Fatalf("%s: cache holds %q, want %q", step, keys(), want)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	status := func() map[string]any {
		t.Helper()
		_, body := td.get(t, "/debug/status")
		var doc struct {
			Rollout struct {
				Workloads map[string]any `json:"workloads"`
			} `json:"rollout"`
		}
		if err := json.Unmarshal([]byte(body), &doc); err != nil {
			t.Fatal(err)
		}
		return doc.Rollout.Workloads
	}
	if !td.d.startServing(ctx) {
		t.Fatal("instance-profile credentials not cached for stage off")
	}
	waitKeys("off", "instance-profile/ip-role")
	if w := status(); w["configured"] != float64(1) || w["active"] != false {
		t.Errorf("off: status workloads = %v", w)
	}

	write("version: v2\ndefault: on\n")
	td.d.reloadRolloutPolicy(ctx)
	if !td.d.applyRollout(ctx) {
		t.Fatal("host role not cached for stage on")
	}
	waitKeys("on", "app", "billing")
	if w := status(); w["active"] != true {
		t.Errorf("on: status workloads = %v", w)
	}

	write("version: v3\ndefault: off\n")
	td.d.reloadRolloutPolicy(ctx)
	if !td.d.applyRollout(ctx) {
		t.Fatal("instance profile not cached for stage off")
	}
	waitKeys("off again", "instance-profile/ip-role")
	for _, e := range td.d.cache.Snapshot() {
		if e.Key != "instance-profile/ip-role" {
			t.Errorf("off again: the cache still holds %s", e.Key)
		}
	}
}
