package test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/imdsproxy/imdsproxy/test/e2e"
)

// Workload roles of the end-to-end test, each trusted by the host's JWT.
const (
	billingARN = "arn:aws:iam::111122223333:role/billing"
	reportsARN = "arn:aws:iam::444455556666:role/reports"

	// uids the clients run as: none is the daemon's (root) and none needs
	// to exist in /etc/passwd.
	billingUID   = 64101
	reportsUID   = 64102
	unmatchedUID = 64103
)

// probeScript does what an SDK does, as the uid it runs as: PUT a token,
// read the role listing, then GET the credential document of every role
// name given and iam/info. It prints the status codes, listing, the
// AccessKeyId and Code of each document and the InstanceProfileArn (never
// a secret).
const probeScript = `import json, sys, urllib.request, urllib.error
base, names = sys.argv[1], sys.argv[2:]
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
def req(method, path, hdr):
    r = urllib.request.Request(base + path, method=method, headers=hdr)
    try:
        with opener.open(r, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
code, tok = req("PUT", "/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": "300"})
if code != 200:
    raise SystemExit("token PUT: %d" % code)
h = {"X-aws-ec2-metadata-token": tok}
out = {"docs": {}}
out["listing_code"], out["listing"] = req("GET", "/latest/meta-data/iam/security-credentials/", h)
code, body = req("GET", "/latest/meta-data/iam/info", h)
out["info_code"], out["profile"] = code, (json.loads(body).get("InstanceProfileArn", "") if code == 200 else "")
for n in names:
    code, body = req("GET", "/latest/meta-data/iam/security-credentials/" + n, h)
    d = {"status": code}
    if code == 200:
        doc = json.loads(body)
        d["code"], d["key"] = doc.get("Code", ""), doc.get("AccessKeyId", "")
    out["docs"][n] = d
print(json.dumps(out))
`

type probeResult struct {
	ListingCode int    `json:"listing_code"`
	Listing     string `json:"listing"`
	InfoCode    int    `json:"info_code"`
	Profile     string `json:"profile"`
	Docs        map[string]struct {
		Status int    `json:"status"`
		Code   string `json:"code"`
		Key    string `json:"key"`
	} `json:"docs"`
}

// uidHomes gives each client uid a home directory of its own outside the
// test's private (0700) temporary directory, with an empty AWS config.
type uidHomes struct {
	root string
	mu   sync.Mutex
	dirs map[int]string
}

func newUIDHomes(t *testing.T) *uidHomes {
	t.Helper()
	root, err := os.MkdirTemp("", "imdsproxy-workloads-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(root) })
	if err := os.Chmod(root, 0o755); err != nil {
		t.Fatal(err)
	}
	return &uidHomes{root: root, dirs: map[int]string{}}
}

func (h *uidHomes) home(t *testing.T, uid int) string {
	t.Helper()
	h.mu.Lock()
	defer h.mu.Unlock()
	if d, ok := h.dirs[uid]; ok {
		return d
	}
	d := filepath.Join(h.root, fmt.Sprint(uid))
	if err := os.Mkdir(d, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(d, "empty"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{d, filepath.Join(d, "empty")} {
		if err := os.Chown(p, uid, uid); err != nil {
			t.Fatal(err)
		}
	}
	h.dirs[uid] = d
	return d
}

// runAs runs a client program as uid (and gid uid) with a hermetic
// environment pointed at the daemon and the fake STS, returning stdout.
func (h *uidHomes) runAs(t *testing.T, e *daemonEnv, uid int, name string, args ...string) ([]byte, error) {
	t.Helper()
	home := h.home(t, uid)
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = home
	cmd.Env = []string{
		"PATH=/usr/bin:/bin", "HOME=" + home, "LANG=C.UTF-8",
		"NO_PROXY=*", "no_proxy=*",
		"AWS_REGION=us-east-1",
		"AWS_CONFIG_FILE=" + filepath.Join(home, "empty"),
		"AWS_SHARED_CREDENTIALS_FILE=" + filepath.Join(home, "empty"),
		"AWS_EC2_METADATA_SERVICE_ENDPOINT=" + e.imdsURL + "/",
		"AWS_ENDPOINT_URL_STS=" + e.sts.URL,
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(uid)}}
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("%s as uid %d: %v\nstderr:\n%s", name, uid, err, stderr.String())
	}
	return stdout.Bytes(), nil
}

func (h *uidHomes) probe(t *testing.T, e *daemonEnv, uid int) probeResult {
	t.Helper()
	out, err := h.runAs(t, e, uid, python3Path, "-c", probeScript, e.imdsURL, e2e.RoleName, "billing", "reports")
	if err != nil {
		t.Fatal(err)
	}
	var r probeResult
	if err := json.Unmarshal(out, &r); err != nil {
		t.Fatalf("probe as uid %d printed %q: %v", uid, out, err)
	}
	return r
}

// checkProbe asserts that the client sees exactly one role, want: listed,
// served with a Success document issued for that role, iam/info naming it,
// and every other role name a 404.
func checkProbe(t *testing.T, e *daemonEnv, uid int, r probeResult, want, wantARN string) {
	t.Helper()
	if r.ListingCode != 200 || r.Listing != want {
		t.Errorf("uid %d: listing %d %q, want %q", uid, r.ListingCode, r.Listing, want)
	}
	if r.InfoCode != 200 || !strings.HasSuffix(r.Profile, ":instance-profile/"+want) {
		t.Errorf("uid %d: iam/info %d %q, want the instance profile of %s", uid, r.InfoCode, r.Profile, want)
	}
	for name, d := range r.Docs {
		if name != want {
			// Another role's name: 404; or, within the grace period of
			// a switch, what that name stood for for this client
			// (access.Grace) — never another role's credentials.
			if d.Status == 404 {
				continue
			}
			if is, ok := e.sts.Find(d.Key); d.Status != 200 || !ok || !strings.HasSuffix(is.RoleARN, ":role/"+name) {
				t.Errorf("uid %d: GET security-credentials/%s = %d, key issued for %q: want 404 or that name's own role", uid, name, d.Status, is.RoleARN)
			}
			continue
		}
		if d.Status != 200 || d.Code != "Success" {
			t.Errorf("uid %d: GET security-credentials/%s = %d %q", uid, name, d.Status, d.Code)
			continue
		}
		is, ok := e.sts.Find(d.Key)
		if !ok || is.RoleARN != wantARN {
			t.Errorf("uid %d: served key %s issued for %q, want %s", uid, d.Key, is.RoleARN, wantARN)
		}
	}
}

// callerIdentity runs `aws sts get-caller-identity` as uid against the fake
// STS with the credentials the daemon serves that uid, and returns the Arn.
func (h *uidHomes) callerIdentity(t *testing.T, e *daemonEnv, uid int) string {
	t.Helper()
	// Debian's CLI (2.9) predates AWS_ENDPOINT_URL_STS: name the endpoint.
	out, err := h.runAs(t, e, uid, awsCLIPath, "sts", "get-caller-identity", "--output", "json", "--endpoint-url", e.sts.URL)
	if err != nil {
		t.Fatal(err)
	}
	var id struct{ Arn string }
	if err := json.Unmarshal(out, &id); err != nil {
		t.Fatalf("aws sts get-caller-identity as uid %d printed %q: %v", uid, out, err)
	}
	return id.Arn
}

// TestWorkloadsByUID: two workloads matched by uid and an unmatched client
// each get their own role's credentials through the AWS CLI, see only their
// own role, are audited under it, and a SIGHUP that removes a workload stops
// serving its role.
func TestWorkloadsByUID(t *testing.T) {
	requireClient(t, awsCLIPath, "AWS CLI v2 (Debian package awscli)")
	requireClient(t, python3Path, "python3")
	if os.Geteuid() != 0 {
		t.Skip("running clients as other uids needs root")
	}
	var mu sync.Mutex
	withBilling := true
	identity := func(e *daemonEnv) string {
		// The workload roles trust the host's JWT too (the fake knows
		// only the host's role by default).
		e.sts.AllowRoles(billingARN, reportsARN)
		mu.Lock()
		defer mu.Unlock()
		billing := ""
		if withBilling {
			billing = fmt.Sprintf("- {uid: %d, role: {arn: %q, duration: 1h}}\n", billingUID, billingARN)
		}
		return e.defaultIdentity() + fmt.Sprintf(`workloads:
%s- {uid: %d, role: {arn: %q, name: reports}}
`, billing, reportsUID, reportsARN)
	}
	e := startDaemon(t, envOptions{identityYAML: identity})
	homes := newUIDHomes(t)

	clients := []struct {
		uid       int
		role, arn string
	}{
		{billingUID, "billing", billingARN},
		{reportsUID, "reports", reportsARN},
		{unmatchedUID, e2e.RoleName, e2e.RoleARN},
	}
	for _, c := range clients {
		checkProbe(t, e, c.uid, homes.probe(t, e, c.uid), c.role, c.arn)
		if arn := homes.callerIdentity(t, e, c.uid); !strings.Contains(arn, ":assumed-role/"+c.role+"/") {
			t.Errorf("uid %d: aws sts get-caller-identity = %s, want an assumed-role ARN of %s", c.uid, arn, c.role)
		}
	}

	// Every audit line names the role its uid is served.
	want := map[float64]string{billingUID: "billing", reportsUID: "reports", unmatchedUID: e2e.RoleName}
	seen := map[float64]int{}
	deadline := time.Now().Add(5 * time.Second)
	for len(seen) < len(want) && time.Now().Before(deadline) {
		seen = map[float64]int{}
		for _, l := range e.logLines() {
			if l["logger"] != "audit" {
				continue
			}
			uid, _ := l["uid"].(float64)
			if w, ok := want[uid]; ok {
				seen[uid]++
				if l["role_name"] != w {
					t.Errorf("audit line of uid %v names role %v, want %s", uid, l["role_name"], w)
				}
			}
		}
		if len(seen) < len(want) {
			time.Sleep(50 * time.Millisecond)
		}
	}
	if len(seen) != len(want) {
		t.Errorf("audit lines per uid %v, want lines for each of %v", seen, want)
	}

	// SIGHUP without the billing workload: its role is no longer served;
	// its uid is now unmatched and gets the host's role.
	mu.Lock()
	withBilling = false
	mu.Unlock()
	e.writeConfig(t, e.config())
	e.signal(t, syscall.SIGHUP)
	deadline = time.Now().Add(15 * time.Second)
	var r probeResult
	for {
		r = homes.probe(t, e, billingUID)
		if r.Listing == e2e.RoleName {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("billing still listed %q after SIGHUP\n%s", r.Listing, e.logTail(30))
		}
		time.Sleep(100 * time.Millisecond)
	}
	checkProbe(t, e, billingUID, r, e2e.RoleName, e2e.RoleARN)
	checkProbe(t, e, reportsUID, homes.probe(t, e, reportsUID), "reports", reportsARN)
	// After the grace period the removed role's name is a 404 for its
	// former uid, like any role it was never listed.
	deadline = time.Now().Add(switchGrace)
	for {
		r = homes.probe(t, e, billingUID)
		if d, ok := r.Docs["billing"]; ok && d.Status == 404 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("uid %d: security-credentials/billing still answered %+v after the grace period", billingUID, r.Docs["billing"])
		}
		time.Sleep(500 * time.Millisecond)
	}
	if arn := homes.callerIdentity(t, e, billingUID); !strings.Contains(arn, ":assumed-role/"+e2e.RoleName+"/") {
		t.Errorf("after removal, uid %d: aws sts get-caller-identity = %s, want the host's role", billingUID, arn)
	}
	for _, l := range e.logLines() {
		if l["logger"] == "cache" && l["key"] == "billing" && l["level"] == "warn" {
			t.Errorf("the removed role is still refreshed: %v", l)
		}
	}
	e.assertNoSecrets(t, "daemon log", e.log.String())
}

// TestWorkloadsWithRollout: under a rollout the decision switches the whole
// host. Off, a workload uid and an unmatched uid both get the instance
// profile's credentials under its role name and the workload's role is not
// fetched; on (SIGHUP to a policy putting the host's group on), the workload
// gets its role and every other client the host's; off again, everyone gets
// the instance profile and the cache forgets both roles. A workload client
// and an unmatched one keep asking throughout: no request fails across the
// switches.
func TestWorkloadsWithRollout(t *testing.T) {
	requireClient(t, python3Path, "python3")
	if os.Geteuid() != 0 {
		t.Skip("running clients as other uids needs root")
	}
	up := startRolloutUpstream(t)
	policy := filepath.Join(t.TempDir(), "rollout.yaml")
	writePolicyFile(t, policy, roPolicy("wl-1", "off"))
	e := startDaemon(t, envOptions{
		upstreamURL:  up.url,
		extraSecrets: up.secrets,
		identityYAML: func(e *daemonEnv) string {
			e.sts.AllowRoles(billingARN)
			return e.defaultIdentity() + fmt.Sprintf(`rollout:
  policy: %q
  poll_interval: 1h
  group_tag: %q
  group: ""
  fallback: none
  shadow_interval: 1s
workloads:
- {uid: %d, role: {arn: %q, name: billing, duration: 1h}}
`, policy, roGroupTag, billingUID, billingARN)
		},
	})
	homes := newUIDHomes(t)
	names := []string{ipUpstreamRole, e2e.RoleName, "billing", "reports"}
	probe := func(uid int) (probeResult, error) {
		out, err := homes.runAs(t, e, uid, python3Path, append([]string{"-c", probeScript, e.imdsURL}, names...)...)
		if err != nil {
			return probeResult{}, err
		}
		var r probeResult
		if err := json.Unmarshal(out, &r); err != nil {
			return probeResult{}, fmt.Errorf("probe as uid %d printed %q: %v", uid, out, err)
		}
		return r, nil
	}
	// kind names the credentials of an access key id.
	kind := func(key string) string {
		if key == up.key {
			return "instance-profile"
		}
		if is, ok := e.sts.Find(key); ok {
			return is.RoleARN
		}
		return "unknown " + key
	}
	// servedAs reports whether the credentials of key are those of the
	// role named name.
	servedAs := func(key, name string) bool {
		if name == ipUpstreamRole {
			return key == up.key
		}
		is, ok := e.sts.Find(key)
		return ok && strings.HasSuffix(is.RoleARN, ":role/"+name)
	}
	// consistent checks one probe (one SDK fetch: token, listing, iam/info,
	// documents) against the rule of access.Plan: iam/info names the listed
	// role, the listed name is answered with that role's credentials, any
	// other name is a 404 or, within a switch's grace period, that name's
	// own role's credentials — never another role's; an unconfigured name
	// is a 404. It returns the listing and the kind.
	consistent := func(uid int, r probeResult) (string, string, error) {
		if r.ListingCode != 200 || r.InfoCode != 200 || !strings.HasSuffix(r.Profile, ":instance-profile/"+r.Listing) {
			return "", "", fmt.Errorf("uid %d: listing %d %q, iam/info %d %q", uid, r.ListingCode, r.Listing, r.InfoCode, r.Profile)
		}
		listed, ok := r.Docs[r.Listing]
		if !ok || listed.Status != 200 || listed.Code != "Success" {
			return "", "", fmt.Errorf("uid %d: document of the listed %s: %+v", uid, r.Listing, listed)
		}
		for name, d := range r.Docs {
			switch {
			case name == "reports" && d.Status != 404:
				return "", "", fmt.Errorf("uid %d: an unconfigured role answered %d", uid, d.Status)
			case name == r.Listing || d.Status == 404:
				// The listed name is checked above; another name is a 404
				// unless it was listed to this client just before a switch.
			case d.Status != 200 || d.Code != "Success":
				return "", "", fmt.Errorf("uid %d: GET %s = %d %q", uid, name, d.Status, d.Code)
			case !servedAs(d.Key, name):
				return "", "", fmt.Errorf("uid %d: GET %s served %s credentials of another role", uid, name, kind(d.Key))
			}
		}
		if !servedAs(listed.Key, r.Listing) {
			return "", "", fmt.Errorf("uid %d: the listed %s was served %s credentials of another role", uid, r.Listing, kind(listed.Key))
		}
		return r.Listing, kind(listed.Key), nil
	}
	// expect polls until uid is listed wantListed and served wantKind.
	expect := func(step string, uid int, wantListed, wantKind string) {
		t.Helper()
		deadline := time.Now().Add(20 * time.Second)
		for {
			r, err := probe(uid)
			if err != nil {
				t.Fatal(err)
			}
			listed, k, err := consistent(uid, r)
			if err != nil {
				t.Fatalf("%s: %v", step, err)
			}
			if listed == wantListed && k == wantKind {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: uid %d listed %q served %s, want %q served %s\n%s", step, uid, listed, k, wantListed, wantKind, e.logTail(30))
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	assumedBilling := func() int {
		n := 0
		for _, c := range e.sts.CallLog() {
			if c.RoleARN == billingARN {
				n++
			}
		}
		return n
	}

	waitKind(t, e, up, "instance-profile", 10*time.Second)
	expect("off", billingUID, ipUpstreamRole, "instance-profile")
	expect("off", unmatchedUID, ipUpstreamRole, "instance-profile")
	roWaitCacheKeys(t, e, []string{"instance-profile/" + ipUpstreamRole}, 5*time.Second)
	if n := assumedBilling(); n != 0 {
		t.Errorf("off: the workload's role was assumed %d times; the host serves the instance profile", n)
	}
	out, _ := runStatusCommand(t, e)
	if !strings.Contains(out, "workloads:     1 configured, inactive") {
		t.Errorf("imdsproxy status while off:\n%s", out)
	}

	// Clients keep asking across both switches: the unmatched test process
	// (the SDK's two requests) and the workload uid (listing, then every
	// name it may have been listed).
	loop := startClientLoop(e, up)
	homes.home(t, billingUID)
	var (
		mu       sync.Mutex
		wlFails  []string
		wlKinds  = map[string]int{}
		stopWL   = make(chan struct{})
		wlDone   = make(chan struct{})
		wlProbes int
	)
	go func() {
		defer close(wlDone)
		for {
			select {
			case <-stopWL:
				return
			default:
			}
			r, err := probe(billingUID)
			var k string
			if err == nil {
				_, k, err = consistent(billingUID, r)
			}
			mu.Lock()
			wlProbes++
			if err != nil {
				wlFails = append(wlFails, err.Error())
			} else {
				wlKinds[k]++
			}
			mu.Unlock()
		}
	}()

	writePolicyFile(t, policy, roPolicy("wl-2", "on"))
	e.signal(t, syscall.SIGHUP)
	waitKind(t, e, up, "workload", 15*time.Second)
	expect("on", billingUID, "billing", billingARN)
	expect("on", unmatchedUID, e2e.RoleName, e2e.RoleARN)
	roWaitCacheKeys(t, e, slices.Sorted(slices.Values([]string{"billing", e2e.RoleName})), switchGrace)
	out, _ = runStatusCommand(t, e)
	if !strings.Contains(out, "workloads:     1 configured, active") {
		t.Errorf("imdsproxy status while on:\n%s", out)
	}

	writePolicyFile(t, policy, roPolicy("wl-3", "off"))
	e.signal(t, syscall.SIGHUP)
	waitKind(t, e, up, "instance-profile", 15*time.Second)
	expect("off again", billingUID, ipUpstreamRole, "instance-profile")
	expect("off again", unmatchedUID, ipUpstreamRole, "instance-profile")
	time.Sleep(200 * time.Millisecond)
	close(stopWL)
	<-wlDone
	loop.finish(t, "instance-profile", "workload")
	mu.Lock()
	if len(wlFails) > 0 {
		t.Errorf("%d of %d workload probes failed across the switches; first: %s", len(wlFails), wlProbes, wlFails[0])
	}
	for k := range wlKinds {
		if k != "instance-profile" && k != billingARN {
			t.Errorf("the workload uid was served %s", k)
		}
	}
	t.Logf("workload probes: %d, %v", wlProbes, wlKinds)
	mu.Unlock()

	// Off again: only the instance profile's credentials are kept.
	roWaitCacheKeys(t, e, []string{"instance-profile/" + ipUpstreamRole}, switchGrace)
	e.assertNoSecrets(t, "daemon log", e.log.String())
}
