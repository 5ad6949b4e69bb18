package test

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/imdsproxy/imdsproxy/test/e2e"
)

// uids of the identity tests' clients (none needs to exist in /etc/passwd).
const (
	idWorkloadUID = 64121 // a workload's uid
	idAllowedUID  = 64122 // on imds.passthrough.allow_uids
	idRefusedUID  = 64123 // on no list: refused credentials
	idOtherUID    = 64124 // on access.allow_uids: the host's role
)

// pathsScript GETs each path with an IMDSv2 token, as the uid it runs as,
// and prints {path: status} as JSON (never a body).
const pathsScript = `import json, sys, urllib.request, urllib.error
base, paths = sys.argv[1], sys.argv[2:]
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
print(json.dumps({p: req("GET", p, {"X-aws-ec2-metadata-token": tok})[0] for p in paths}))
`

// identityPaths are the instance's identity material: whoever holds the
// signed document can trade it at a token issuer for the host's identity.
var identityPaths = []string{
	"/latest/dynamic/instance-identity/document",
	"/latest/dynamic/instance-identity/pkcs7",
	"/latest/dynamic/instance-identity/signature",
	"/latest/dynamic/instance-identity/rsa2048",
	"/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
}

// TestIdentityMaterialRefused (issue 16, items 1 and 4): with access: and
// workloads: set, the instance's identity material and the paths of
// imds.passthrough.deny are refused to every local process — a refused one,
// a workload and a process served the host's role alike — except the uids
// of imds.passthrough.allow_uids, through the built binary with real uids;
// the rest of the metadata still passes through for everyone.
func TestIdentityMaterialRefused(t *testing.T) {
	e := startDaemon(t, envOptions{
		imds: fmt.Sprintf("passthrough: {deny: [user-data], allow_uids: [%d]}", idAllowedUID),
		identityYAML: func(e *daemonEnv) string {
			e.sts.AllowRoles(billingARN)
			return e.defaultIdentity() + fmt.Sprintf(`access: {allow_uids: [%d, %d]}
workloads:
  - uid: %d
    role: {arn: %q, name: billing}
`, idOtherUID, idAllowedUID, idWorkloadUID, billingARN)
		},
	})
	homes := newUIDHomes(t)
	paths := append([]string{"/latest/meta-data/instance-id", "/latest/user-data", credPath}, identityPaths...)
	probe := func(uid int) map[string]int {
		out, err := homes.runAs(t, e, uid, python3Path, append([]string{"-c", pathsScript, e.imdsURL}, paths...)...)
		if err != nil {
			t.Fatal(err)
		}
		got := map[string]int{}
		if err := json.Unmarshal(out, &got); err != nil {
			t.Fatalf("uid %d printed %q: %v", uid, out, err)
		}
		return got
	}
	refusedBefore := e.scrape(t).Sum("imdsproxy_passthrough_refused_total", map[string]string{"outcome": "deny"})
	refused := 0
	for _, c := range []struct {
		name  string
		uid   int
		creds int // the status of the host role's credentials
	}{
		{"refused uid", idRefusedUID, 403},
		{"workload", idWorkloadUID, 404}, // sees only its own role
		{"served the host's role", idOtherUID, 200},
	} {
		got := probe(c.uid)
		for _, p := range append([]string{"/latest/user-data"}, identityPaths...) {
			if got[p] != 403 {
				t.Errorf("%s (uid %d): GET %s = %d, want 403", c.name, c.uid, p, got[p])
			}
			refused++
		}
		if got["/latest/meta-data/instance-id"] != 200 {
			t.Errorf("%s: instance-id = %d, want 200 (the rest passes through)", c.name, got["/latest/meta-data/instance-id"])
		}
		if got[credPath] != c.creds {
			t.Errorf("%s: %s = %d, want %d", c.name, credPath, got[credPath], c.creds)
		}
	}
	// The allowed uid reads the identity document (and whatever else the
	// stand-in serves) like the real IMDS answers it.
	got := probe(idAllowedUID)
	if got["/latest/dynamic/instance-identity/document"] != 200 {
		t.Errorf("allowed uid: the identity document = %d, want 200", got["/latest/dynamic/instance-identity/document"])
	}
	for _, p := range append([]string{"/latest/user-data"}, identityPaths...) {
		if got[p] == 403 {
			t.Errorf("allowed uid: GET %s = 403", p)
		}
	}
	after := e.scrape(t).Sum("imdsproxy_passthrough_refused_total", map[string]string{"outcome": "deny"})
	if int(after-refusedBefore) != refused {
		t.Errorf("imdsproxy_passthrough_refused_total{outcome=deny} rose by %v, want %d", after-refusedBefore, refused)
	}
}

// deadCgroupScript connects to the daemon, says so, waits for a line on
// stdin (meanwhile the test moves it to another cgroup and removes the one
// its socket was made in), then asks for credentials on that connection and
// on a new one, and prints both statuses.
const deadCgroupScript = `import http.client, json, sys
host, port, role = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def creds(c):
    c.request("PUT", "/latest/api/token", headers={"X-aws-ec2-metadata-token-ttl-seconds": "300"})
    r = c.getresponse(); tok = r.read().decode()
    if r.status != 200:
        return r.status, ""
    c.request("GET", "/latest/meta-data/iam/security-credentials/" + role, headers={"X-aws-ec2-metadata-token": tok})
    r = c.getresponse(); body = r.read().decode()
    return r.status, (json.loads(body).get("AccessKeyId", "") if r.status == 200 else r.getheader("Retry-After", ""))
old = http.client.HTTPConnection(host, port, timeout=10)
old.connect()
print("connected", flush=True)
sys.stdin.readline()
s1, k1 = creds(old)
s2, k2 = creds(http.client.HTTPConnection(host, port, timeout=10))
print(json.dumps({"old": s1, "old_detail": k1, "new": s2, "new_key": k2}))
`

// TestDeadCgroupNeverHostRole (issue 16, item 3): a workload process makes
// its socket in a cgroup, leaves it and removes it, so that the daemon
// cannot tell the socket's unit. With a unit entry in workloads: its
// request gets 503 with Retry-After (the SDK retries) — never the host's
// role, which the uid entry would otherwise have been skipped for. A new
// connection from the same process, made in a cgroup that exists, gets its
// own role. Through the built binary as a real uid; the daemon runs as root,
// so /proc would tell it the process's current unit: the decision must not
// use it.
func TestDeadCgroupNeverHostRole(t *testing.T) {
	mount := pdCgroup2Mount(t)
	if mount == "" {
		t.Skip("SKIPPED (LOUDLY): no cgroup2 mount")
	}
	e := startDaemon(t, envOptions{identityYAML: func(e *daemonEnv) string {
		e.sts.AllowRoles(billingARN, reportsARN)
		return e.defaultIdentity() + fmt.Sprintf(`workloads:
  - unit: billing.service
    role: {arn: %q, name: billing}
  - uid: %d
    role: {arn: %q, name: reports}
`, billingARN, idWorkloadUID, reportsARN)
	}})
	born, moved := pdCgroup(t, mount), pdCgroup(t, mount)
	homes := newUIDHomes(t)
	home := homes.home(t, idWorkloadUID)
	port := strings.TrimPrefix(e.imdsURL, "http://127.0.0.1:")

	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, python3Path, "-c", deadCgroupScript, "127.0.0.1", port, "reports")
	cmd.Dir, cmd.Env = home, []string{"PATH=/usr/bin:/bin", "HOME=" + home, "LANG=C.UTF-8"}
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Credential:  &syscall.Credential{Uid: idWorkloadUID, Gid: idWorkloadUID},
		UseCgroupFD: true, CgroupFD: int(born.f.Fd()), // its sockets are made in born
	}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr e2e.LockedBuffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = cmd.Wait() }()
	lines := bufio.NewScanner(stdout)
	if !lines.Scan() || lines.Text() != "connected" {
		t.Fatalf("client: %q %v; stderr: %s", lines.Text(), lines.Err(), stderr.String())
	}
	// Move the client out and remove the cgroup its socket was made in.
	if err := os.WriteFile(filepath.Join(mount, moved.unit, "cgroup.procs"), []byte(fmt.Sprint(cmd.Process.Pid)), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(filepath.Join(mount, born.unit)); err != nil {
		t.Fatalf("remove the client's first cgroup: %v", err)
	}
	if _, err := io.WriteString(stdin, "go\n"); err != nil {
		t.Fatal(err)
	}
	if !lines.Scan() {
		t.Fatalf("client printed nothing more: %v; stderr: %s", lines.Err(), stderr.String())
	}
	var r struct {
		Old       int    `json:"old"`
		OldDetail string `json:"old_detail"`
		New       int    `json:"new"`
		NewKey    string `json:"new_key"`
	}
	if err := json.Unmarshal(lines.Bytes(), &r); err != nil {
		t.Fatalf("client printed %q: %v", lines.Text(), err)
	}
	if r.Old != 503 || r.OldDetail != "1" {
		t.Errorf("request on the socket of the removed cgroup = %d (%q), want 503 with Retry-After: 1", r.Old, r.OldDetail)
	}
	if is, ok := e.sts.Find(r.NewKey); r.New != 200 || !ok || is.RoleARN != reportsARN {
		t.Errorf("request on a new connection = %d, key issued for %q; want the workload's own role %s", r.New, is.RoleARN, reportsARN)
	}
	for _, l := range e.logLines() {
		if l["logger"] == "audit" && l["uid"] == float64(idWorkloadUID) && l["role_name"] != "reports" {
			t.Errorf("the workload's uid was handed another role: %v", l)
		}
	}
	m := e.scrape(t)
	if v, _ := m.Value("imdsproxy_access_refused_total", map[string]string{"door": "imds", "outcome": "retry", "reason": "unresolved"}); v < 1 {
		t.Errorf("imdsproxy_access_refused_total{door=imds,outcome=retry,reason=unresolved} = %v, want at least 1:\n%s", v, m.Select("imdsproxy_access_refused_total", nil))
	}
}
