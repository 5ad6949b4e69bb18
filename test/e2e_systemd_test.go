package test

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/imdsproxy/imdsproxy/test/e2e"
)

// TestSystemdUnits boots Debian's systemd as PID 1 of a systemd-nspawn
// container (root on tmpfs, the host's /usr read-only, a private network with
// only lo) and runs the packaged units of systemd/ in it, exactly as
// `make install` lays them out: imdsproxy.socket and imdsproxy-admin.socket
// hold the listeners, imdsproxy.service (Type=notify, the hardening of the
// unit, ExecStartPre=+… intercept install) serves the workload role, user
// imdsproxy comes from imdsproxy.sysusers and /run/imdsproxy from
// imdsproxy.tmpfiles. The stand-ins are units too: the fake OIDC issuer and
// STS (test/fakes/cmd/fakests, writing the token file the daemon reads) and
// amazon-ec2-metadata-mock as the real IMDS on 169.254.169.254:80.
//
// It checks what docs/deploy.md promises: readiness, the credentials at
// 127.0.0.1:8169 and [::1]:8169 and at the intercepted 169.254.169.254 and
// [fd00:ec2::254] for any uid but the daemon's own, the AWS CLI, the process's privileges, the
// "Memory" drop-in (GOGC 200 by default, 100 after it), reload, a restart
// under load that drops no request and keeps IMDSv2 tokens valid, that
// stopping the service keeps the rules (socket activation then brings it
// back), that stopping the sockets too refuses rather than leaks, that
// `intercept remove` gives the real IMDS back, the container credentials
// endpoint set up as the document says (its drop-in and commands taken from
// it; e2e_systemd_container_test.go), and that the journal holds no
// secret.
func TestSystemdUnits(t *testing.T) {
	ct := bootSystemdContainer(t)
	ctx, cancel := context.WithTimeout(context.Background(), 150*time.Second)
	defer cancel()

	// --- Boot: the sockets and the service (READY=1) are active.
	ct.waitActive(t, 45*time.Second, "imdsproxy.service")
	for _, u := range []string{"imdsproxy.socket", "imdsproxy-admin.socket", "imdsproxy.service", "fakests.service", "aemm.service"} {
		if out, err := ct.run(ctx, "systemctl", "is-active", u); err != nil || strings.TrimSpace(out) != "active" {
			t.Fatalf("%s is %q (%v)\n%s", u, strings.TrimSpace(out), err, ct.journal(ctx, ""))
		}
	}
	cl := ct.httpClient(10 * time.Second)
	if code, body, err := e2e.IMDSGet(ctx, cl, "http://127.0.0.1:8170", "/readyz", ""); err != nil || code != http.StatusOK {
		t.Fatalf("/readyz via the admin socket: %d %q %v", code, body, err)
	}
	mainPID := ct.mainPID(t, ctx)
	t.Logf("imdsproxy.service active, MainPID %d (pid namespace of the container)", mainPID)

	var secretsMu sync.Mutex
	var served []e2e.CredDoc
	remember := func(d e2e.CredDoc) {
		secretsMu.Lock()
		served = append(served, d)
		secretsMu.Unlock()
	}

	// --- Credentials for root (in-process client in the container's network
	// namespace) at the listener and at the intercepted address.
	for _, base := range []string{"http://127.0.0.1:8169", "http://169.254.169.254"} {
		d, err := ctFetchCreds(ctx, cl, base, "")
		if err != nil {
			t.Fatalf("root at %s: %v", base, err)
		}
		remember(d)
		ct.checkIssuedByFake(t, ctx, "root at "+base, d)
	}

	// --- Another uid (nobody), with curl inside the container; IPv6 too
	// (intercept.ipv6: [fd00:ec2::254]:80 to [::1]:8169 of imdsproxy.socket).
	for _, base := range []string{"http://127.0.0.1:8169", "http://169.254.169.254", "http://[::1]:8169", "http://[fd00:ec2::254]"} {
		d := ct.curlCreds(t, ctx, "65534", base)
		remember(d)
		ct.checkIssuedByFake(t, ctx, "uid 65534 at "+base, d)
	}

	// --- The daemon's own uid is exempt: it reaches the real IMDS (aemm),
	// whose role is not the workload role.
	uid := strings.TrimSpace(ct.must(t, ctx, "id", "-u", "imdsproxy"))
	if roles := ct.curlRoles(t, ctx, uid, "http://169.254.169.254"); roles == e2e.RoleName || roles == "" {
		t.Errorf("uid %s (imdsproxy) at 169.254.169.254 lists roles %q; want the real IMDS's instance profile, not %q", uid, roles, e2e.RoleName)
	} else {
		t.Logf("uid %s (imdsproxy, exempt) reaches the real IMDS: instance profile %q", uid, roles)
	}

	// --- The AWS CLI (the real SDK), no endpoint setting for IMDS: the
	// rules bring it to the daemon. --endpoint-url because Debian's CLI
	// ignores AWS_ENDPOINT_URL_STS.
	for _, who := range []string{"0", "65534"} {
		out, err := ct.runAs(ctx, who, []string{"HOME=/tmp", "AWS_REGION=us-east-1",
			"AWS_CONFIG_FILE=/nonexistent/config", "AWS_SHARED_CREDENTIALS_FILE=/nonexistent/credentials"},
			awsCLIPath, "sts", "get-caller-identity", "--endpoint-url", "http://127.0.0.1:8190", "--output", "json")
		if err != nil {
			t.Fatalf("aws sts get-caller-identity as uid %s: %v\n%s\n%s", who, err, out, ct.journal(ctx, "fakests.service"))
		}
		var id struct{ Arn string }
		if err := json.Unmarshal([]byte(out), &id); err != nil || !strings.Contains(id.Arn, ":assumed-role/"+e2e.RoleName+"/") {
			t.Fatalf("aws sts get-caller-identity as uid %s: %q (%v); want the assumed role %s", who, out, err, e2e.RoleName)
		}
		t.Logf("aws sts get-caller-identity as uid %s: %s", who, id.Arn)
	}

	// --- The process: user, capabilities, no_new_privs, no core dumps.
	status := ct.must(t, ctx, "cat", fmt.Sprintf("/proc/%d/status", mainPID))
	if f := procField(status, "Uid"); len(f) < 2 || f[0] != uid || f[1] != uid {
		t.Errorf("daemon Uid: %v; want %s (imdsproxy)", f, uid)
	}
	if f := procField(status, "CapEff"); len(f) != 1 || f[0] != "0000000000001000" {
		t.Errorf("daemon CapEff: %v; want 0000000000001000 (CAP_NET_ADMIN only)", f)
	}
	if f := procField(status, "NoNewPrivs"); len(f) != 1 || f[0] != "1" {
		t.Errorf("daemon NoNewPrivs: %v; want 1", f)
	}
	limits := ct.must(t, ctx, "cat", fmt.Sprintf("/proc/%d/limits", mainPID))
	if !regexp.MustCompile(`(?m)^Max core file size\s+0\s+0\s`).MatchString(limits) {
		t.Errorf("daemon core file size limit is not 0:\n%s", limits)
	}
	if got := strings.TrimSpace(ct.must(t, ctx, "stat", "-c", "%a %U %G", "/run/imdsproxy")); got != "711 imdsproxy imdsproxy" {
		t.Errorf("/run/imdsproxy: %q; want \"711 imdsproxy imdsproxy\" (each user reaches what is theirs, nobody lists it)", got)
	}

	// --- docs/deploy.md, "Memory": GOGC 200 by default, 100 after the
	// document's drop-in and restart.
	ct.memoryAsDocumented(t, ctx)
	mainPID = ct.mainPID(t, ctx)

	// --- systemctl reload: SIGHUP, same process, still serving.
	ct.must(t, ctx, "systemctl", "reload", "imdsproxy.service")
	waitFor(t, 15*time.Second, "the daemon to log the reload", func() bool {
		return strings.Contains(ct.journal(ctx, "imdsproxy.service"), "configuration reloaded")
	})
	if pid := ct.mainPID(t, ctx); pid != mainPID {
		t.Errorf("MainPID after reload: %d; want %d (the same process)", pid, mainPID)
	}
	if d, err := ctFetchCreds(ctx, cl, "http://169.254.169.254", ""); err != nil {
		t.Errorf("after reload: %v", err)
	} else {
		remember(d)
	}

	// --- systemctl restart under load: no request lost, tokens survive.
	tok, err := e2e.IMDSToken(ctx, cl, "http://169.254.169.254", 21600)
	if err != nil {
		t.Fatalf("token before restart: %v", err)
	}
	var okN, failN atomic.Int64
	var failMu sync.Mutex
	var failures []string
	loopCtx, stopLoop := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer func() { stopLoop(); wg.Wait() }() // also when a check below fails
	for i, base := range []string{"http://127.0.0.1:8169", "http://169.254.169.254", "http://127.0.0.1:8169", "http://169.254.169.254"} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			lc := ct.httpClient(30 * time.Second) // one connection per request
			for loopCtx.Err() == nil {
				d, err := ctFetchCreds(loopCtx, lc, base, "")
				if loopCtx.Err() != nil {
					return
				}
				if err != nil {
					failN.Add(1)
					failMu.Lock()
					failures = append(failures, fmt.Sprintf("client %d %s: %v", i, base, err))
					failMu.Unlock()
					continue
				}
				okN.Add(1)
				if okN.Load()%50 == 1 {
					remember(d)
				}
			}
		}()
	}
	waitFor(t, 10*time.Second, "the client loop to get answers", func() bool { return okN.Load() >= 20 })
	before := okN.Load()
	start := time.Now()
	ct.must(t, ctx, "systemctl", "restart", "imdsproxy.service")
	restartTook := time.Since(start)
	newPID := ct.mainPID(t, ctx)
	afterRestart := okN.Load()
	waitFor(t, 10*time.Second, "answers after the restart", func() bool { return okN.Load() >= afterRestart+20 })
	stopLoop()
	wg.Wait()
	t.Logf("restart: took %v; client loop: %d answers (%d before the restart, %d during it), %d failures",
		restartTook.Round(time.Millisecond), okN.Load(), before, afterRestart-before, failN.Load())
	if n := failN.Load(); n != 0 {
		failMu.Lock()
		t.Errorf("%d requests failed across `systemctl restart imdsproxy` (want 0): %s", n, strings.Join(failures[:min(len(failures), 5)], "; "))
		failMu.Unlock()
	}
	if newPID == mainPID || newPID == 0 {
		t.Errorf("MainPID after restart: %d (before %d); want a new process", newPID, mainPID)
	}
	if d, err := ctCredsWithToken(ctx, cl, "http://169.254.169.254", tok); err != nil {
		t.Errorf("IMDSv2 token minted before the restart, used after it: %v (want it accepted: imds.token_key_file)", err)
	} else {
		remember(d)
	}

	// --- systemctl stop: the rules stay (docs/deploy.md, "Roll back"); a
	// connection then starts the service again through its socket.
	ct.must(t, ctx, "systemctl", "stop", "imdsproxy.service")
	if out, _ := ct.run(ctx, "systemctl", "is-active", "imdsproxy.service"); strings.TrimSpace(out) != "inactive" {
		t.Errorf("imdsproxy.service after stop: %q; want inactive", strings.TrimSpace(out))
	}
	if out, err := ct.run(ctx, "/opt/imdsproxy/bin/imdsproxy", "intercept", "status", "--config", "/etc/imdsproxy/config.yaml"); err != nil || strings.TrimSpace(out) != "present" {
		t.Errorf("intercept status after `systemctl stop imdsproxy`: %q (%v); want present (stopping the service keeps the rules)", strings.TrimSpace(out), err)
	}
	if d, err := ctFetchCreds(ctx, ct.httpClient(60*time.Second), "http://169.254.169.254", ""); err != nil {
		t.Errorf("request to 169.254.169.254 with the service stopped and its sockets up: %v; want the socket to start the service and credentials", err)
	} else {
		remember(d)
		ct.checkIssuedByFake(t, ctx, "socket-activated start", d)
	}
	if out, _ := ct.run(ctx, "systemctl", "is-active", "imdsproxy.service"); strings.TrimSpace(out) != "active" {
		t.Errorf("imdsproxy.service after a connection to its socket: %q; want active (socket activation)", strings.TrimSpace(out))
	}

	// --- The sockets stopped too: refused, never the real IMDS.
	ct.must(t, ctx, "systemctl", "stop", "imdsproxy.service", "imdsproxy.socket", "imdsproxy-admin.socket")
	if code, body, err := e2e.IMDSGet(ctx, ct.httpClient(5*time.Second), "http://169.254.169.254", "/latest/meta-data/iam/security-credentials/", ""); err == nil {
		t.Errorf("169.254.169.254 with the service and sockets stopped answered %d %q; want the connection refused", code, body)
	} else if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Errorf("169.254.169.254 with the service and sockets stopped: %v; want connection refused", err)
	}
	// `intercept remove` gives the real IMDS back.
	ct.must(t, ctx, "/opt/imdsproxy/bin/imdsproxy", "intercept", "remove", "--config", "/etc/imdsproxy/config.yaml")
	if out, _ := ct.run(ctx, "/opt/imdsproxy/bin/imdsproxy", "intercept", "status", "--config", "/etc/imdsproxy/config.yaml"); strings.TrimSpace(out) != "absent" {
		t.Errorf("intercept status after remove: %q; want absent", strings.TrimSpace(out))
	}
	if roles := ct.curlRoles(t, ctx, "65534", "http://169.254.169.254"); roles == e2e.RoleName || roles == "" {
		t.Errorf("after intercept remove, uid 65534 at 169.254.169.254 lists %q; want the real IMDS's instance profile", roles)
	}

	// --- The container credentials endpoint, set up as docs/deploy.md says
	// (last: with a workload in the config, the plan decides by client, and
	// this test's own requests come from outside the container's cgroups).
	workloadToken := ct.containerEndpointAsDocumented(t, ctx)

	// --- The container endpoint across a restart (docs/deploy.md,
	// "Restarts drop nothing"): every request on 127.0.0.1:8171, whose
	// socket systemd holds, gets an answer. This test's requests come from
	// outside the workload's unit, so the answer is a refusal; what counts
	// is that none is dropped.
	{
		var answered, dropped atomic.Int64
		var mu sync.Mutex
		statuses := map[int]int{}
		var drops []string
		loopCtx, stop := context.WithCancel(ctx)
		var wg sync.WaitGroup
		for i := range 4 {
			wg.Go(func() {
				lc := ct.httpClient(30 * time.Second) // one connection per request
				for loopCtx.Err() == nil {
					req, _ := http.NewRequestWithContext(loopCtx, http.MethodGet, "http://127.0.0.1:8171/v1/credentials", nil)
					req.Header.Set("Authorization", workloadToken)
					resp, err := lc.Do(req)
					if loopCtx.Err() != nil {
						return
					}
					mu.Lock()
					if err != nil {
						dropped.Add(1)
						drops = append(drops, fmt.Sprintf("client %d: %v", i, err))
					} else {
						answered.Add(1)
						statuses[resp.StatusCode]++
						resp.Body.Close()
					}
					mu.Unlock()
				}
			})
		}
		waitFor(t, 10*time.Second, "the container endpoint loop to get answers", func() bool { return answered.Load() >= 20 })
		ct.must(t, ctx, "systemctl", "restart", "imdsproxy.service")
		after := answered.Load()
		waitFor(t, 30*time.Second, "container endpoint answers after the restart", func() bool { return answered.Load() >= after+20 })
		stop()
		wg.Wait()
		t.Logf("container endpoint across a restart: %d answers %v, %d dropped", answered.Load(), statuses, dropped.Load())
		if n := dropped.Load(); n != 0 {
			t.Errorf("%d container endpoint requests dropped across `systemctl restart imdsproxy` (want 0): %s", n, strings.Join(drops[:min(len(drops), 5)], "; "))
		}
	}

	// --- No secret in the journal (the whole journal, not only the unit's).
	jwt := strings.TrimSpace(ct.must(t, ctx, "cat", "/run/fakests/token.jwt"))
	journal := ct.journal(ctx, "")
	if !strings.Contains(journal, "configuration reloaded") {
		t.Fatalf("journal does not hold the daemon's log:\n%s", e2e.TailLines(journal, 40))
	}
	// systemd accepted every setting of the units: one it does not know or
	// cannot parse is logged by PID 1 (and skipped) when it loads the units;
	// at boot that is before journald runs, hence the daemon-reload.
	ct.must(t, ctx, "systemctl", "daemon-reload")
	journal = ct.journal(ctx, "")
	for _, l := range strings.Split(journal, "\n") {
		if strings.Contains(l, " systemd[1]: ") && strings.Contains(l, "imdsproxy") &&
			regexp.MustCompile(`(?i)unknown|ignoring|not supported|failed|invalid`).MatchString(l) {
			t.Errorf("systemd about the units: %s", l)
		}
	}
	secrets := map[string]string{"the JWT": jwt}
	if k := strings.LastIndexByte(jwt, '.'); k > 0 {
		secrets["the JWT's signature"] = jwt[k+1:]
	}
	secretsMu.Lock()
	for i, d := range served {
		secrets[fmt.Sprintf("SecretAccessKey #%d", i)] = d.SecretAccessKey
		secrets[fmt.Sprintf("SessionToken #%d", i)] = d.Token
	}
	secretsMu.Unlock()
	secrets["IMDSv2 session token"] = tok
	secrets["the container endpoint's token of "+ctWorkloadUnit] = workloadToken
	for name, s := range secrets {
		if s != "" && strings.Contains(journal, s) {
			t.Errorf("the journal contains %s", name)
		}
	}
	if t.Failed() {
		t.Logf("journal (tail):\n%s", e2e.TailLines(journal, 80))
	}
}

// ---------------------------------------------------------------------------
// The container.

type systemdContainer struct {
	t      *testing.T
	name   string
	dir    string
	nspawn *exec.Cmd
	out    *e2e.LockedBuffer
	done   chan struct{}
	pid1   int
	netns  *os.File
	dials  sync.WaitGroup // dials in flight use netns
}

// bootSystemdContainer prepares /etc with the units and boots the container;
// it returns once the container's PID 1 is known. Skips (loudly) when the
// machine cannot do it.
// systemdTestLock is held while TestSystemdUnits' container runs.
const systemdTestLock = "/run/lock/imdsproxy-e2e-systemd.lock"

// acquireFileLock takes an exclusive flock on path (created if missing),
// waiting at most wait; onWait runs once if it has to wait. release drops
// the lock (the kernel drops it too if the process dies).
func acquireFileLock(path string, wait time.Duration, onWait func()) (release func(), err error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, err
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|syscall.O_CLOEXEC, 0o600)
	if err != nil {
		return nil, err
	}
	deadline := time.Now().Add(wait)
	for waited := false; ; {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			return func() { _ = f.Close() }, nil // closing the last descriptor drops the lock
		}
		if !errors.Is(err, unix.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("flock %s: %w", path, err)
		}
		if time.Now().After(deadline) {
			f.Close()
			return nil, fmt.Errorf("%s still locked after %v: another run holds it", path, wait)
		}
		if !waited && onWait != nil {
			onWait()
		}
		waited = true
		time.Sleep(250 * time.Millisecond)
	}
}

func bootSystemdContainer(t *testing.T) *systemdContainer {
	t.Helper()
	skip := func(why string) {
		msg := "e2e: SKIPPING TestSystemdUnits (the units under a real systemd): " + why
		fmt.Fprintln(os.Stderr, "WARNING:", msg)
		t.Skip(msg)
	}
	if os.Geteuid() != 0 {
		skip("needs root (systemd-nspawn)")
	}
	for _, p := range []string{"/usr/bin/systemd-nspawn", "/usr/bin/nsenter", "/usr/bin/setpriv", "/usr/bin/curl", awsCLIPath} {
		if _, err := os.Stat(p); err != nil {
			skip(p + " not found: scripts/test-deps.sh installs it (apt-get install systemd-container util-linux curl awscli)")
		}
	}
	if _, err := os.Stat("/lib/systemd/systemd"); err != nil {
		skip("/lib/systemd/systemd not found: apt-get install systemd")
	}
	aemm := e2e.AEMMBinary()
	if _, err := os.Stat(aemm); err != nil {
		skip(aemm + " not found: `make test` installs amazon-ec2-metadata-mock (or set AEMM_BIN)")
	}
	bin := daemonBinary(t)

	// Two containers started with --keep-unit from the same unit fight over
	// its cgroup: two `make test` runs on one machine take turns here.
	release, err := acquireFileLock(systemdTestLock, 10*time.Minute, func() {
		t.Logf("another TestSystemdUnits is running on this machine; waiting for %s", systemdTestLock)
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(release) // after c.stop (cleanups run last registered first)

	c := &systemdContainer{t: t, dir: t.TempDir(), out: &e2e.LockedBuffer{}, done: make(chan struct{})}
	fakests, imdsclient := filepath.Join(c.dir, "fakests"), filepath.Join(c.dir, "imdsclient")
	for pkg, out := range map[string]string{"./test/fakes/cmd/fakests": fakests, "./test/fakes/cmd/imdsclient": imdsclient} {
		build := exec.Command("go", "build", "-o", out, pkg)
		build.Dir = repoRoot
		if b, err := build.CombinedOutput(); err != nil {
			t.Fatalf("go build %s: %v\n%s", pkg, err, b)
		}
	}
	etc := filepath.Join(c.dir, "etc")
	c.prepareEtc(etc)

	var rnd [4]byte
	_, _ = rand.Read(rnd[:])
	c.name = "imdsproxy-e2e-" + hex.EncodeToString(rnd[:])
	c.nspawn = exec.Command("/usr/bin/systemd-nspawn", "--quiet", "--keep-unit", "--register=no",
		"--directory=/", "--volatile=yes", "--private-network", "--machine="+c.name,
		"--console=pipe",
		"--bind="+etc+":/etc",
		"--bind-ro="+bin+":/opt/imdsproxy/bin/imdsproxy",
		"--bind-ro="+fakests+":/opt/imdsproxy/bin/fakests",
		"--bind-ro="+imdsclient+":/opt/imdsproxy/bin/imdsclient", // the Go SDK, for a workload unit
		"--bind-ro="+aemm+":/opt/imdsproxy/bin/ec2-metadata-mock",
		"--boot", "systemd.firstboot=off")
	c.nspawn.Stdin = nil
	c.nspawn.Stdout, c.nspawn.Stderr = c.out, c.out
	c.nspawn.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8"}
	if err := c.nspawn.Start(); err != nil {
		t.Fatalf("start systemd-nspawn: %v", err)
	}
	go func() { _ = c.nspawn.Wait(); close(c.done) }()
	t.Cleanup(c.stop)

	waitFor(t, 20*time.Second, "the container's PID 1 (child of systemd-nspawn)", func() bool {
		select {
		case <-c.done:
			t.Fatalf("systemd-nspawn exited: %v\n%s", c.nspawn.ProcessState, e2e.TailLines(c.out.String(), 40))
		default:
		}
		c.pid1 = childOf(c.nspawn.Process.Pid)
		if c.pid1 == 0 {
			return false
		}
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", c.pid1))
		return err == nil && strings.TrimSpace(string(b)) == "systemd"
	})
	ns, err := os.Open(fmt.Sprintf("/proc/%d/ns/net", c.pid1))
	if err != nil {
		t.Fatalf("container network namespace: %v", err)
	}
	c.netns = ns
	t.Logf("container %s: systemd-nspawn pid %d, PID 1 = host pid %d", c.name, c.nspawn.Process.Pid, c.pid1)
	return c
}

// prepareEtc copies the host's /etc to dir without its enabled units, and
// adds the packaged units (as `make install` writes them, with the binary in
// /opt/imdsproxy/bin), the stand-ins' units and the config.
func (c *systemdContainer) prepareEtc(dir string) {
	t := c.t
	if out, err := exec.Command("cp", "-a", "/etc", dir).CombinedOutput(); err != nil {
		t.Fatalf("copy /etc: %v\n%s", err, out)
	}
	// Only our units: the host's enabled services have no business here.
	if err := os.RemoveAll(filepath.Join(dir, "systemd", "system")); err != nil {
		t.Fatal(err)
	}
	var id [16]byte
	_, _ = rand.Read(id[:])
	// .updated missing: systemd-sysusers.service (ConditionNeedsUpdate=/etc)
	// runs at boot and creates the user imdsproxy from imdsproxy.sysusers.
	_ = os.Remove(filepath.Join(dir, ".updated"))

	files := map[string]string{
		"machine-id": hex.EncodeToString(id[:]) + "\n",
		"fstab":      "# imdsproxy e2e container: nothing to mount\n",
		"hostname":   "imdsproxy-e2e\n",
	}
	// Every unit `make install` installs; the last two are not enabled (the
	// container endpoint's is, by its drop-in: containerEndpointAsDocumented).
	for _, u := range []string{"imdsproxy.service", "imdsproxy.socket", "imdsproxy-admin.socket", "imdsproxy-container.socket", "imdsproxy-credentials.socket"} {
		b, err := os.ReadFile(filepath.Join(repoRoot, "systemd", u))
		if err != nil {
			t.Fatal(err)
		}
		// What `make install PREFIX=/opt/imdsproxy` does.
		files["systemd/system/"+u] = strings.ReplaceAll(string(b), "/usr/local/bin/imdsproxy", "/opt/imdsproxy/bin/imdsproxy")
	}
	for src, dst := range map[string]string{"imdsproxy.sysusers": "sysusers.d/imdsproxy.conf", "imdsproxy.tmpfiles": "tmpfiles.d/imdsproxy.conf"} {
		b, err := os.ReadFile(filepath.Join(repoRoot, "systemd", src))
		if err != nil {
			t.Fatal(err)
		}
		files[dst] = string(b)
	}
	// The example config, with the identity file the fake issuer writes.
	cfg, err := os.ReadFile(filepath.Join(repoRoot, "systemd", "config.example.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(cfg, []byte("jwt_file: /run/imdsproxy/token.jwt")) {
		t.Fatalf("systemd/config.example.yaml no longer sets jwt_file: /run/imdsproxy/token.jwt; update the test")
	}
	files["imdsproxy/config.yaml"] = strings.Replace(string(cfg), "jwt_file: /run/imdsproxy/token.jwt", "jwt_file: /run/fakests/token.jwt", 1)

	files["systemd/system/imdsproxy.service.d/10-e2e.conf"] = `# e2e: the fake STS and the real IMDS stand-in come first.
[Unit]
Wants=fakests.service aemm.service
After=fakests.service aemm.service

[Service]
Environment=AWS_REGION=us-east-1 AWS_ENDPOINT_URL_STS=http://127.0.0.1:8190
`
	// The token agent runs as the daemon's user: the file it writes is 0600.
	files["systemd/system/fakests.service"] = `[Unit]
Description=fake OIDC issuer and STS (imdsproxy e2e)
After=systemd-sysusers.service

[Service]
Type=exec
User=imdsproxy
RuntimeDirectory=fakests
RuntimeDirectoryMode=0700
ExecStart=/opt/imdsproxy/bin/fakests -sts-listen 127.0.0.1:8190 -issuer-listen 127.0.0.1:8191 -token-file /run/fakests/token.jwt
ExecStartPost=/bin/sh -c 'for i in $(seq 200); do [ -s /run/fakests/token.jwt ] && exit 0; sleep 0.05; done; exit 1'

[Install]
WantedBy=multi-user.target
`
	files["systemd/system/aemm.service"] = `[Unit]
Description=amazon-ec2-metadata-mock as the real IMDS (imdsproxy e2e)

[Service]
Type=exec
Environment=HOME=/run/aemm
RuntimeDirectory=aemm
WorkingDirectory=/run/aemm
ExecStartPre=/usr/sbin/ip addr replace 169.254.169.254/32 dev lo
# The IPv6 metadata address, only for the rules to redirect (aemm is IPv4).
ExecStartPre=/usr/sbin/ip addr replace fd00:ec2::254/128 dev lo nodad
ExecStart=/opt/imdsproxy/bin/ec2-metadata-mock -n 169.254.169.254 -p 80 -I
ExecStartPost=/bin/sh -c 'for i in $(seq 200); do /usr/bin/curl -sf -o /dev/null -X PUT -H "X-aws-ec2-metadata-token-ttl-seconds: 60" http://169.254.169.254/latest/api/token && exit 0; sleep 0.05; done; exit 1'

[Install]
WantedBy=multi-user.target
`
	for name, content := range files {
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	// `systemctl enable` of the [Install] sections.
	links := map[string]string{
		"multi-user.target.wants/imdsproxy.service":   "imdsproxy.service",
		"multi-user.target.wants/fakests.service":     "fakests.service",
		"multi-user.target.wants/aemm.service":        "aemm.service",
		"sockets.target.wants/imdsproxy.socket":       "imdsproxy.socket",
		"sockets.target.wants/imdsproxy-admin.socket": "imdsproxy-admin.socket",
	}
	for l, u := range links {
		p := filepath.Join(dir, "systemd", "system", l)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink("/etc/systemd/system/"+u, p); err != nil {
			t.Fatal(err)
		}
	}
}

// stop powers the container off (SIGTERM to systemd-nspawn makes it ask
// PID 1 for a clean shutdown), then kills what is left.
func (c *systemdContainer) stop() {
	if c.netns != nil {
		c.dials.Wait() // an abandoned request's dial may still run
		c.netns.Close()
	}
	select {
	case <-c.done:
		return
	default:
	}
	_ = c.nspawn.Process.Signal(syscall.SIGTERM)
	select {
	case <-c.done:
		return
	case <-time.After(20 * time.Second):
	}
	c.t.Logf("container %s did not power off within 20s; killing it", c.name)
	if c.pid1 > 0 {
		_ = syscall.Kill(c.pid1, syscall.SIGKILL) // ends the whole pid namespace
	}
	_ = c.nspawn.Process.Kill()
	<-c.done
}

// childOf returns a child pid of pid (0 if none yet).
func childOf(pid int) int {
	tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/children", pid))
	for _, f := range tasks {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		for _, s := range strings.Fields(string(b)) {
			if n, err := strconv.Atoi(s); err == nil {
				return n
			}
		}
	}
	return 0
}

// run runs a command in all the container's namespaces, as root, with a
// clean environment; it returns stdout (stderr too on failure).
func (c *systemdContainer) run(ctx context.Context, args ...string) (string, error) {
	return c.runAs(ctx, "0", nil, args...)
}

// runAs is run as uid (and its primary group), with env added.
func (c *systemdContainer) runAs(ctx context.Context, uid string, env []string, args ...string) (string, error) {
	argv := []string{"--target", strconv.Itoa(c.pid1), "--all", "--",
		"/usr/bin/env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8", "SYSTEMD_PAGER=", "NO_PROXY=*", "no_proxy=*"}
	argv = append(argv, env...)
	if uid != "0" {
		argv = append(argv, "/usr/bin/setpriv", "--reuid="+uid, "--regid="+uid, "--clear-groups", "--")
	}
	argv = append(argv, args...)
	cmd := exec.CommandContext(ctx, "/usr/bin/nsenter", argv...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	if err != nil {
		return stdout.String() + stderr.String(), fmt.Errorf("%s: %w", strings.Join(args, " "), err)
	}
	return stdout.String(), nil
}

func (c *systemdContainer) must(t *testing.T, ctx context.Context, args ...string) string {
	t.Helper()
	out, err := c.run(ctx, args...)
	if err != nil {
		t.Fatalf("in the container: %v\n%s\n%s", err, out, e2e.TailLines(c.journal(ctx, ""), 60))
	}
	return out
}

// journal returns the journal of unit (all of it when unit is "").
func (c *systemdContainer) journal(ctx context.Context, unit string) string {
	args := []string{"journalctl", "--no-pager", "-b", "-o", "short-monotonic"}
	if unit != "" {
		args = append(args, "-u", unit)
	}
	out, err := c.run(ctx, args...)
	if err != nil {
		return fmt.Sprintf("(journalctl: %v)\n%s\nsystemd-nspawn output:\n%s", err, out, e2e.TailLines(c.out.String(), 40))
	}
	return out
}

func (c *systemdContainer) mainPID(t *testing.T, ctx context.Context) int {
	t.Helper()
	out := c.must(t, ctx, "systemctl", "show", "-P", "MainPID", "imdsproxy.service")
	n, err := strconv.Atoi(strings.TrimSpace(out))
	if err != nil {
		t.Fatalf("MainPID %q: %v", out, err)
	}
	return n
}

// waitActive waits until unit is active; it fails at once if it failed.
func (c *systemdContainer) waitActive(t *testing.T, d time.Duration, unit string) {
	t.Helper()
	ctx := context.Background()
	deadline := time.Now().Add(d)
	var last string
	for time.Now().Before(deadline) {
		out, _ := c.run(ctx, "systemctl", "is-active", unit)
		last = strings.TrimSpace(out)
		switch last {
		case "active":
			return
		case "failed":
			t.Fatalf("%s failed:\n%s", unit, e2e.TailLines(c.journal(ctx, ""), 80))
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Fatalf("%s not active within %v (state %q):\n%s", unit, d, last, e2e.TailLines(c.journal(ctx, ""), 80))
}

// httpClient returns a client whose connections are made in the container's
// network namespace, as root, one connection per request.
func (c *systemdContainer) httpClient(timeout time.Duration) *http.Client {
	return &http.Client{
		Timeout: timeout,
		Transport: &http.Transport{
			Proxy:             nil,
			DisableKeepAlives: true,
			DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
				return c.dial(ctx, network, addr)
			},
		},
	}
}

// dial creates the socket on a thread switched into the container's network
// namespace; the socket stays there once the thread switches back.
func (c *systemdContainer) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	type result struct {
		conn net.Conn
		err  error
	}
	ch := make(chan result, 1)
	c.dials.Add(1)
	go func() {
		defer c.dials.Done()
		runtime.LockOSThread()
		self, err := os.Open(fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid()))
		if err != nil {
			runtime.UnlockOSThread()
			ch <- result{err: err}
			return
		}
		defer self.Close()
		if err := unix.Setns(int(c.netns.Fd()), unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			ch <- result{err: fmt.Errorf("setns: %w", err)}
			return
		}
		var d net.Dialer
		conn, err := d.DialContext(ctx, network, addr)
		if unix.Setns(int(self.Fd()), unix.CLONE_NEWNET) == nil {
			runtime.UnlockOSThread()
		} // else: the thread stays locked and exits with the goroutine
		ch <- result{conn, err}
	}()
	r := <-ch
	return r.conn, r.err
}

// curl runs curl as uid inside the container.
func (c *systemdContainer) curl(ctx context.Context, uid string, args ...string) (string, error) {
	return c.runAs(ctx, uid, nil, append([]string{"/usr/bin/curl", "-sS", "--fail-with-body", "--max-time", "10"}, args...)...)
}

func (c *systemdContainer) curlToken(t *testing.T, ctx context.Context, uid, base string) string {
	t.Helper()
	tok, err := c.curl(ctx, uid, "-X", "PUT", "-H", "X-aws-ec2-metadata-token-ttl-seconds: 60", base+"/latest/api/token")
	if err != nil || tok == "" {
		t.Fatalf("uid %s: token PUT at %s: %v %q", uid, base, err, tok)
	}
	return tok
}

func (c *systemdContainer) curlRoles(t *testing.T, ctx context.Context, uid, base string) string {
	t.Helper()
	tok := c.curlToken(t, ctx, uid, base)
	out, err := c.curl(ctx, uid, "-H", "X-aws-ec2-metadata-token: "+tok, base+"/latest/meta-data/iam/security-credentials/")
	if err != nil {
		t.Fatalf("uid %s: role list at %s: %v %q", uid, base, err, out)
	}
	return strings.TrimSpace(out)
}

func (c *systemdContainer) curlCreds(t *testing.T, ctx context.Context, uid, base string) e2e.CredDoc {
	t.Helper()
	if roles := c.curlRoles(t, ctx, uid, base); roles != e2e.RoleName {
		t.Fatalf("uid %s at %s lists roles %q; want %q", uid, base, roles, e2e.RoleName)
	}
	tok := c.curlToken(t, ctx, uid, base)
	out, err := c.curl(ctx, uid, "-H", "X-aws-ec2-metadata-token: "+tok, base+credPath)
	if err != nil {
		t.Fatalf("uid %s: credentials at %s: %v", uid, base, err)
	}
	var d e2e.CredDoc
	if err := json.Unmarshal([]byte(out), &d); err != nil {
		t.Fatalf("uid %s: credentials at %s: %v", uid, base, err)
	}
	return d
}

// checkIssuedByFake checks that d is a set of credentials the fake STS issued
// (its journal logs each issued access key id, never the secret).
func (c *systemdContainer) checkIssuedByFake(t *testing.T, ctx context.Context, who string, d e2e.CredDoc) {
	t.Helper()
	if d.Code != "Success" || d.AccessKeyId == "" || d.SecretAccessKey == "" || d.Token == "" {
		t.Fatalf("%s: credential document %+v", who, e2e.CredDoc{Code: d.Code, AccessKeyId: d.AccessKeyId, Expiration: d.Expiration})
	}
	// The fake logs after it answered, and journald takes it from a pipe.
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(c.journal(ctx, "fakests.service"), "access_key_id="+d.AccessKeyId+" ") {
		if time.Now().After(deadline) {
			t.Errorf("%s: access key id %s was not issued by the fake STS", who, d.AccessKeyId)
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// ctFetchCreds does what an SDK does: PUT a token (unless tok is given), GET
// the credential document of the role.
func ctFetchCreds(ctx context.Context, cl *http.Client, base, tok string) (e2e.CredDoc, error) {
	if tok == "" {
		var err error
		if tok, err = e2e.IMDSToken(ctx, cl, base, 21600); err != nil {
			return e2e.CredDoc{}, err
		}
	}
	return ctCredsWithToken(ctx, cl, base, tok)
}

func ctCredsWithToken(ctx context.Context, cl *http.Client, base, tok string) (e2e.CredDoc, error) {
	code, body, err := e2e.IMDSGet(ctx, cl, base, credPath, tok)
	if err != nil {
		return e2e.CredDoc{}, err
	}
	if code != http.StatusOK {
		return e2e.CredDoc{}, fmt.Errorf("GET %s: %d %s", credPath, code, body)
	}
	var d e2e.CredDoc
	if err := json.Unmarshal([]byte(body), &d); err != nil {
		return e2e.CredDoc{}, fmt.Errorf("GET %s: %w", credPath, err)
	}
	if d.Code != "Success" || d.AccessKeyId == "" {
		return e2e.CredDoc{}, fmt.Errorf("GET %s: code %q, access key id %q", credPath, d.Code, d.AccessKeyId)
	}
	return d, nil
}

// procField returns the fields of the line "key:" of a /proc status file.
func procField(status, key string) []string {
	for _, l := range strings.Split(status, "\n") {
		if k, v, ok := strings.Cut(l, ":"); ok && k == key {
			return strings.Fields(v)
		}
	}
	return nil
}

// TestAcquireFileLock: the lock TestSystemdUnits takes is exclusive, a
// second taker waits (and says so) and gives up after its bound, and the
// lock is free again once released.
func TestAcquireFileLock(t *testing.T) {
	path := filepath.Join(t.TempDir(), "lock")
	release, err := acquireFileLock(path, time.Second, nil)
	if err != nil {
		t.Fatal(err)
	}
	waited := 0
	if _, err := acquireFileLock(path, 300*time.Millisecond, func() { waited++ }); err == nil || !strings.Contains(err.Error(), "still locked") {
		t.Fatalf("second taker while held: %v", err)
	}
	if waited != 1 {
		t.Errorf("onWait ran %d times, want 1", waited)
	}
	release()
	release2, err := acquireFileLock(path, time.Second, func() { t.Error("waited for a free lock") })
	if err != nil {
		t.Fatalf("after release: %v", err)
	}
	release2()
}
