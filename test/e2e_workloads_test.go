package test

import (
	"bytes"
	"context"
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
	out, err := h.runAs(t, e, uid, python3Path, "-c", probeScript, e.imdsURL, roleName, "billing", "reports")
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
			if d.Status != 404 {
				t.Errorf("uid %d: GET security-credentials/%s = %d, want 404 (another role's)", uid, name, d.Status)
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
		return fmt.Sprintf(`role: {arn: %q, name: %s, session_name: "", duration: 1h}
source: web-identity
identity: {jwt_file: %q}
workloads:
%s- {uid: %d, role: {arn: %q, name: reports}}
`, roleARN, roleName, e.tokenFile, billing, reportsUID, reportsARN)
	}
	e := startDaemon(t, envOptions{identityYAML: identity})
	homes := newUIDHomes(t)

	clients := []struct {
		uid       int
		role, arn string
	}{
		{billingUID, "billing", billingARN},
		{reportsUID, "reports", reportsARN},
		{unmatchedUID, roleName, roleARN},
	}
	for _, c := range clients {
		checkProbe(t, e, c.uid, homes.probe(t, e, c.uid), c.role, c.arn)
		if arn := homes.callerIdentity(t, e, c.uid); !strings.Contains(arn, ":assumed-role/"+c.role+"/") {
			t.Errorf("uid %d: aws sts get-caller-identity = %s, want an assumed-role ARN of %s", c.uid, arn, c.role)
		}
	}

	// Every audit line names the role its uid is served.
	want := map[float64]string{billingUID: "billing", reportsUID: "reports", unmatchedUID: roleName}
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
		if r.Listing == roleName {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("billing still listed %q after SIGHUP\n%s", r.Listing, e.logTail(30))
		}
		time.Sleep(100 * time.Millisecond)
	}
	checkProbe(t, e, billingUID, r, roleName, roleARN)
	checkProbe(t, e, reportsUID, homes.probe(t, e, reportsUID), "reports", reportsARN)
	if arn := homes.callerIdentity(t, e, billingUID); !strings.Contains(arn, ":assumed-role/"+roleName+"/") {
		t.Errorf("after removal, uid %d: aws sts get-caller-identity = %s, want the host's role", billingUID, arn)
	}
	for _, l := range e.logLines() {
		if l["logger"] == "cache" && l["key"] == "billing" && l["level"] == "warn" {
			t.Errorf("the removed role is still refreshed: %v", l)
		}
	}
	e.assertNoSecrets(t, "daemon log", e.log.String())
}
