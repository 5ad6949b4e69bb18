package test

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/imdsproxy/imdsproxy/test/e2e"
)

// TestSwitchConsistency flips the rollout decision (on, off, on, … every
// 150 ms, each a SIGHUP re-reading the policy) while a workload process and
// an unmatched one, each a separate uid, run SDK-shaped credential fetches
// on new connections (PUT token, GET listing, GET iam/info, GET the listed
// role's document). Every fetch must succeed and agree with itself: iam/info
// names the listed role's instance profile, and the document holds that
// role's credentials — never the listing of one role and the credentials of
// another (access.Plan, "Consistency across a switch").
func TestSwitchConsistency(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("running clients as other uids needs root")
	}
	up := startRolloutUpstream(t)
	policy := filepath.Join(t.TempDir(), "rollout.yaml")
	writePolicyFile(t, policy, roPolicy("sw-0", "on"))
	e := startDaemon(t, envOptions{
		upstreamURL:  up.url,
		extraSecrets: up.secrets,
		identityYAML: func(e *daemonEnv) string {
			e.sts.AllowRoles(billingARN)
			return e.defaultIdentity() + fmt.Sprintf(`rollout: {policy: %q, poll_interval: 1h, group_tag: %q, group: ""}
workloads:
- {uid: %d, role: {arn: %q, name: billing, duration: 1h}}
`, policy, roGroupTag, billingUID, billingARN)
		},
	})
	homes := newUIDHomes(t)
	client := filepath.Join(homes.root, "imdsclient")
	build := exec.Command("go", "build", "-o", client, "./test/fakes/cmd/imdsclient")
	build.Dir = repoRoot
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build imdsclient: %v\n%s", err, out)
	}
	waitKind(t, e, up, "workload", 10*time.Second)

	const run = 6 * time.Second
	stop := make(chan struct{})
	var flips int
	var wg sync.WaitGroup
	wg.Go(func() {
		for i := 1; ; i++ {
			select {
			case <-stop:
				return
			case <-time.After(150 * time.Millisecond):
			}
			stage := "off"
			if i%2 == 0 {
				stage = "on"
			}
			writePolicyFile(t, policy, roPolicy(fmt.Sprintf("sw-%d", i), stage))
			e.signal(t, syscall.SIGHUP)
			flips++
		}
	})
	type report struct {
		Fetches map[string]int
		Failed  int
		Errors  []string
	}
	results := map[int]*report{}
	var mu sync.Mutex
	var clients sync.WaitGroup
	for _, uid := range []int{billingUID, unmatchedUID} {
		clients.Go(func() {
			out, err := homes.runAs(t, e, uid, client, "fetches", "-base", e.imdsURL, "-n", "3", "-duration", run.String())
			r := &report{}
			if err == nil {
				err = json.Unmarshal(out, r)
			}
			if err != nil {
				t.Errorf("uid %d: %v", uid, err)
			}
			mu.Lock()
			results[uid] = r
			mu.Unlock()
		})
	}
	clients.Wait()
	close(stop)
	wg.Wait()

	servedAs := func(key, name string) bool {
		if name == ipUpstreamRole {
			return key == up.key
		}
		is, ok := e.sts.Find(key)
		return ok && strings.HasSuffix(is.RoleARN, ":role/"+name)
	}
	for uid, own := range map[int]string{billingUID: "billing", unmatchedUID: e2e.RoleName} {
		r := results[uid]
		if r == nil {
			continue
		}
		if r.Failed != 0 {
			t.Errorf("uid %d: %d fetches failed across the switches: %v", uid, r.Failed, r.Errors)
		}
		kinds := map[string]int{}
		total := 0
		for seen, n := range r.Fetches {
			total += n
			f := strings.Fields(seen)
			if len(f) != 3 {
				t.Errorf("uid %d: malformed fetch %q", uid, seen)
				continue
			}
			listed, profile, key := f[0], f[1], f[2]
			switch {
			case listed != own && listed != ipUpstreamRole:
				t.Errorf("uid %d: %d fetches listed %q, neither its role %s nor the instance profile's", uid, n, listed, own)
			case !strings.HasSuffix(profile, ":instance-profile/"+listed):
				t.Errorf("uid %d: %d fetches listed %s but iam/info named %s", uid, n, listed, profile)
			case !servedAs(key, listed):
				t.Errorf("uid %d: %d fetches listed %s but got the credentials %s of another role", uid, n, listed, key)
			}
			kinds[listed] += n
		}
		t.Logf("uid %d: %d fetches across %d switches: %v", uid, total, flips, kinds)
		if kinds[own] == 0 || kinds[ipUpstreamRole] == 0 {
			t.Errorf("uid %d never saw both sides of the switches (%v): the test did not test them", uid, kinds)
		}
	}
	e.assertNoSecrets(t, "daemon log", e.log.String())
}
