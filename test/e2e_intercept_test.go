package test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/imdsproxy/imdsproxy/test/e2e"
)

// The interception end-to-end test: two network namespaces of its own.
//
//	ns "imds"  169.254.169.254 and fd00:ec2::254 on lo, amazon-ec2-metadata-mock
//	           on both at port 80 (the real IMDS)
//	   │ veth 169.254.0.1/30 ─ 169.254.0.2/30, fd00:ec2:1::1/64 ─ ::2/64
//	ns "host"  routes to both metadata addresses via the veth; the fake STS
//	           and issuer on its 127.0.0.1; the daemon as uid 65534 with
//	           table inet imdsproxy installed; the SDK clients, run as root with
//	           no endpoint setting at all
//
// The test holds the daemon's listening sockets (created inside the host
// namespace) and hands them to each daemon process as systemd does
// (LISTEN_FDS, LISTEN_FDNAMES, LISTEN_PID), and reads READY=1 from a
// NOTIFY_SOCKET of its own, so a restart is a hand-off: start the new
// process, wait for READY, SIGTERM the old one.

const (
	icUID        = 65534 // the daemon's uid (nobody)
	icIMDSPort   = 8169
	icAdminPort  = 8170
	icInstanceID = e2e.AEMMInstanceID
)

var icSeq atomic.Int64

type icEnv struct {
	t          *testing.T
	host, imds string // namespace names
	dir        string // 0755, owned by icUID
	bin        string
	client     string // imdsclient binary
	config     string
	emptyFile  string
	sts        *e2e.LockedBuffer // fakests log
	files      []*os.File        // the listening sockets handed to daemons
	fdNames    []string          // their LISTEN_FDNAMES
	gen        int
}

// icSocket is one listening socket handed to daemons and its name in
// LISTEN_FDNAMES, as a systemd socket unit would give it.
type icSocket struct{ name, addr string }

func TestInterceptNetns(t *testing.T) {
	aemm := requireNetnsTest(t, "the interception end-to-end test", "network namespaces and nftables rules")
	e := newIcEnv(t, aemm, "")

	// Rules first (ExecStartPre), twice: one set of rules.
	for range 2 {
		e.nsRun(e.host, nil, e.bin, "intercept", "install", "--config", e.config)
	}
	table := e.nsMust(e.host, nil, "nft", "list", "table", "inet", "imdsproxy")
	if n := strings.Count(table, "redirect to :8169"); n != 2 {
		t.Fatalf("after installing twice nft lists %d redirects, want 2 (IPv4 + IPv6):\n%s", n, table)
	}
	e.nsMust(e.host, nil, e.bin, "intercept", "status", "--config", e.config)

	e.openSockets()
	d1 := e.startDaemon()

	t.Run("SDKs get the workload credentials with no setting", func(t *testing.T) { e.checkClients(t) })
	t.Run("IPv6", func(t *testing.T) {
		if got := e.nsMust(e.host, nil, e.client, "get", "-base", "http://[fd00:ec2::254]", "/latest/meta-data/iam/security-credentials/"); got != e2e.RoleName {
			t.Errorf("role listing over [fd00:ec2::254]: %q, want %q", got, e2e.RoleName)
		}
		env := append(e.clientEnv(), "AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE=IPv6")
		e.checkIssued(t, "boto3 (IPv6 endpoint mode)", e.nsMust(e.host, env, python3Path, "-c", botoScript))
	})
	t.Run("other paths pass through unchanged", func(t *testing.T) {
		if got := e.nsMust(e.host, nil, e.client, "get", "/latest/meta-data/instance-id"); got != icInstanceID {
			t.Errorf("instance-id through the daemon: %q, want %q", got, icInstanceID)
		}
	})
	t.Run("the daemon's uid reaches the real IMDS", func(t *testing.T) {
		got := e.nsMust(e.host, nil, "setpriv", "--reuid", fmt.Sprint(icUID), "--regid", fmt.Sprint(icUID), "--clear-groups",
			e.client, "get", "/latest/meta-data/iam/security-credentials/")
		if got == "" || got == e2e.RoleName {
			t.Errorf("uid %d got role listing %q: want the real IMDS's instance profile, not %q", icUID, got, e2e.RoleName)
		}
	})
	t.Run("rules deleted behind the daemon's back are repaired", func(t *testing.T) {
		e.nsMust(e.host, nil, "nft", "delete", "table", "inet", "imdsproxy")
		waitFor(t, 5*time.Second, "the keeper to reinstall the rules", func() bool {
			_, err := e.nsOutput(e.host, nil, e.bin, "intercept", "status", "--config", e.config)
			return err == nil
		})
		text := e.nsMust(e.host, nil, "curl", "-s", "-m", "2", fmt.Sprintf("http://127.0.0.1:%d/metrics", icAdminPort))
		m, err := e2e.ParseMetrics(text)
		present, _ := m.Value("imdsproxy_intercept_rules_present", nil)
		repairs, _ := m.Value("imdsproxy_intercept_repairs_total", nil)
		if err != nil || present != 1 || repairs < 1 {
			t.Errorf("metrics after a repair (%v):\n%s", err, e2e.GrepLines(text, "imdsproxy_intercept_"))
		}
		if !strings.Contains(d1.log.String(), "interception rules were missing or altered; reinstalled") {
			t.Errorf("no repair log line")
		}
	})
	t.Run("zero-drop restart under load", func(t *testing.T) {
		load := exec.Command("ip", "netns", "exec", e.host, e.client, "load", "-n", "4", "-duration", "6s")
		var out, errb bytes.Buffer
		load.Stdout, load.Stderr = &out, &errb
		icMust(t, load.Start())
		defer func() { _ = load.Process.Kill() }()
		cur := d1
		for range 2 {
			time.Sleep(1500 * time.Millisecond)
			next := e.startDaemon()
			if code := cur.stop(); code != 0 {
				t.Errorf("old daemon exited %d on SIGTERM", code)
			}
			cur = next
		}
		d1 = cur
		err := load.Wait()
		var res struct {
			OK, Failed int
			Errors     []string
		}
		_ = json.Unmarshal(out.Bytes(), &res)
		t.Logf("load across two restarts: %d rounds ok, %d failed", res.OK, res.Failed)
		if err != nil || res.Failed != 0 || res.OK < 50 {
			t.Fatalf("load: %v, %d ok, %d failed: %q\n%s", err, res.OK, res.Failed, res.Errors, errb.String())
		}
	})
	t.Run("remove restores direct access", func(t *testing.T) {
		if code := d1.stop(); code != 0 {
			t.Errorf("daemon exited %d on SIGTERM", code)
		}
		e.nsMust(e.host, nil, e.bin, "intercept", "remove", "--config", e.config)
		if out, err := e.nsOutput(e.host, nil, e.bin, "intercept", "status", "--config", e.config); err == nil || !strings.Contains(out, "absent") {
			t.Errorf("status after remove: %q, %v; want absent and a non-zero exit", out, err)
		}
		if rs := e.nsMust(e.host, nil, "nft", "list", "ruleset"); strings.Contains(rs, "imdsproxy") {
			t.Errorf("ruleset still names imdsproxy:\n%s", rs)
		}
		got := e.nsMust(e.host, nil, e.client, "get", "/latest/meta-data/iam/security-credentials/")
		if got == "" || got == e2e.RoleName {
			t.Errorf("after remove root got role listing %q: want the real IMDS's", got)
		}
	})
}

// setupNetwork creates both namespaces and the veth between them; a cleanup
// kills what runs in them and deletes them (the veth goes with them).
func (e *icEnv) setupNetwork() {
	t := e.t
	t.Cleanup(func() {
		for _, ns := range []string{e.host, e.imds} {
			if out, err := exec.Command("ip", "netns", "pids", ns).Output(); err == nil {
				for _, p := range strings.Fields(string(out)) {
					var pid int
					if _, err := fmt.Sscan(p, &pid); err == nil && pid > 1 {
						_ = syscall.Kill(pid, syscall.SIGKILL)
					}
				}
			}
			_ = exec.Command("ip", "netns", "del", ns).Run()
		}
	})
	// veth names: at most 15 bytes, unique per test process and run
	vh, vi := fmt.Sprintf("ich%d-%d", os.Getpid()%100000, icSeq.Load()), fmt.Sprintf("ici%d-%d", os.Getpid()%100000, icSeq.Load())
	steps := [][]string{
		{"netns", "add", e.host},
		{"netns", "add", e.imds},
		{"link", "add", vh, "netns", e.host, "type", "veth", "peer", "name", vi, "netns", e.imds},
		{"-n", e.host, "link", "set", "lo", "up"},
		{"-n", e.imds, "link", "set", "lo", "up"},
		{"-n", e.host, "addr", "add", "169.254.0.2/30", "dev", vh},
		{"-n", e.imds, "addr", "add", "169.254.0.1/30", "dev", vi},
		{"-n", e.host, "addr", "add", "fd00:ec2:1::2/64", "dev", vh, "nodad"},
		{"-n", e.imds, "addr", "add", "fd00:ec2:1::1/64", "dev", vi, "nodad"},
		{"-n", e.imds, "addr", "add", "169.254.169.254/32", "dev", "lo"},
		{"-n", e.imds, "addr", "add", "fd00:ec2::254/128", "dev", "lo", "nodad"},
		{"-n", e.host, "link", "set", vh, "up"},
		{"-n", e.imds, "link", "set", vi, "up"},
		{"-n", e.host, "route", "add", "169.254.169.254/32", "via", "169.254.0.1"},
		{"-n", e.host, "-6", "route", "add", "fd00:ec2::254/128", "via", "fd00:ec2:1::1"},
	}
	for _, s := range steps {
		if out, err := exec.Command("ip", s...).CombinedOutput(); err != nil {
			t.Fatalf("ip %s: %v: %s", strings.Join(s, " "), err, out)
		}
	}
}

// requireNetnsTest skips t, loudly, unless it runs as root with ip (and
// working ip netns), nft, setpriv, nsenter, curl, python3 and
// amazon-ec2-metadata-mock, which the tests built on newIcEnv use; what
// names the test and needs what root is for, in the messages. It returns
// the path of amazon-ec2-metadata-mock.
func requireNetnsTest(t *testing.T, what, needs string) (aemm string) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skipf("SKIPPED (LOUDLY): %s needs root to create %s; CI runs it as root", what, needs)
	}
	for _, tool := range []string{"ip", "nft", "setpriv", "nsenter", "curl", "python3"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("SKIPPED (LOUDLY): %s is not installed; %s needs iproute2, nftables, util-linux, curl and python3 (`make test-deps`)", tool, what)
		}
	}
	if out, err := exec.Command("ip", "netns", "list").CombinedOutput(); err != nil {
		t.Skipf("SKIPPED (LOUDLY): `ip netns` is unavailable: %v: %s", err, out)
	}
	aemm = e2e.AEMMBinary()
	requireClient(t, aemm, "amazon-ec2-metadata-mock (the real IMDS inside the namespace)")
	return aemm
}

// newIcEnv builds the interception tests' two namespaces, the real IMDS
// (AEMM on 169.254.169.254 and fd00:ec2::254 in the imds namespace) and the
// fake STS and issuer, builds the test client, and writes the daemon's
// config, with the given flow-style access: section when not "". It installs
// no rules and opens no sockets.
func newIcEnv(t *testing.T, aemm, access string) *icEnv {
	accessLine := ""
	if access != "" {
		accessLine = "access: " + access + "\n"
	}
	e := &icEnv{t: t, bin: daemonBinary(t), sts: &e2e.LockedBuffer{}}
	id := fmt.Sprintf("%d-%d", os.Getpid(), icSeq.Add(1))
	e.host, e.imds = "imdsproxy-e2e-"+id+"-host", "imdsproxy-e2e-"+id+"-imds"
	var err error
	e.dir, err = os.MkdirTemp("", "imdsproxy-e2e-ic-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(e.dir) })
	icMust(t, os.Chmod(e.dir, 0o755))
	icMust(t, os.Chown(e.dir, icUID, icUID))

	bins := t.TempDir()
	e.client = filepath.Join(e.dir, "imdsclient")
	fakests := filepath.Join(bins, "fakests")
	for pkg, out := range map[string]string{"./test/fakes/cmd/imdsclient": e.client, "./test/fakes/cmd/fakests": fakests} {
		cmd := exec.Command("go", "build", "-o", out, pkg)
		cmd.Dir = repoRoot
		if b, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("go build %s: %v\n%s", pkg, err, b)
		}
	}
	icMust(t, os.Chmod(e.client, 0o755))

	e.setupNetwork()

	// The real IMDS, on both addresses, inside the imds namespace.
	aemmHome := filepath.Join(e.dir, "aemm")
	icMust(t, os.Mkdir(aemmHome, 0o700))
	for _, host := range []string{"169.254.169.254", "[fd00:ec2::254]"} {
		e.startBackground("aemm "+host, e.imds, nil, aemmHome, []string{"HOME=" + aemmHome, "PATH=/usr/bin:/bin"},
			aemm, "-n", host, "-p", "80")
	}
	// The fake STS and issuer, on the host namespace's loopback, as icUID so
	// the token file it writes is the daemon's.
	tokenFile := filepath.Join(e.dir, "token.jwt")
	e.startBackground("fakests", e.host, e.sts, e.dir, []string{"PATH=/usr/bin:/bin"},
		"setpriv", "--reuid", fmt.Sprint(icUID), "--regid", fmt.Sprint(icUID), "--clear-groups",
		fakests, "-sts-listen", "127.0.0.1:8190", "-issuer-listen", "127.0.0.1:8191", "-token-file", tokenFile)
	waitFor(t, 10*time.Second, "the token file", func() bool { _, err := os.Stat(tokenFile); return err == nil })
	waitFor(t, 10*time.Second, "the real IMDS from the host namespace", func() bool {
		out, err := e.nsOutput(e.host, nil, "curl", "-s", "-m", "1", "http://169.254.169.254/latest/meta-data/instance-id")
		return err == nil && out == icInstanceID
	})

	e.emptyFile = filepath.Join(e.dir, "empty")
	icMust(t, os.WriteFile(e.emptyFile, nil, 0o644))
	e.config = filepath.Join(e.dir, "config.yaml")
	icMust(t, os.WriteFile(e.config, []byte(fmt.Sprintf(`listen: 127.0.0.1:%d
admin_listen: 127.0.0.1:%d
upstream: http://169.254.169.254
imds: {tokens: required, hop_limit: 1, token_key_file: %s}
role: {arn: %q, name: %s, duration: 1h}
source: web-identity
identity: {jwt_file: %s}
intercept: {enabled: true, ipv6: true, check_interval: 1s, exempt_uid: %d}
%s`, icIMDSPort, icAdminPort, filepath.Join(e.dir, "token.key"), e2e.RoleARN, e2e.RoleName, tokenFile, icUID, accessLine)), 0o644))
	return e
}

// openSockets creates the daemon's listening sockets inside the host
// namespace, as systemd's imdsproxy.socket would.
func (e *icEnv) openSockets() {
	e.openSocketsAt([]icSocket{
		{"imds", fmt.Sprintf("127.0.0.1:%d", icIMDSPort)},
		{"imds6", fmt.Sprintf("[::1]:%d", icIMDSPort)},
		{"admin", fmt.Sprintf("127.0.0.1:%d", icAdminPort)},
	})
}

// openSocketsAt creates socks inside the host namespace and adds them to the
// sockets handed to daemons. The thread that enters the namespace returns to
// its own before it is unlocked: a locked thread that stayed in the
// namespace would, were it the main thread (which never exits), keep the
// test process listed by `ip netns pids` for the namespace, and
// setupNetwork's cleanup would kill it.
func (e *icEnv) openSocketsAt(socks []icSocket) {
	t := e.t
	ns, err := os.Open("/run/netns/" + e.host)
	icMust(t, err)
	defer ns.Close()
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		self, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			runtime.UnlockOSThread()
			done <- err
			return
		}
		defer self.Close()
		if err := unix.Setns(int(ns.Fd()), unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			done <- err
			return
		}
		defer func() {
			// Back home, the thread may serve other goroutines; if it
			// cannot go back it stays locked and exits with this one.
			if unix.Setns(int(self.Fd()), unix.CLONE_NEWNET) == nil {
				runtime.UnlockOSThread()
			}
		}()
		for _, sock := range socks {
			ln, err := net.Listen("tcp", sock.addr)
			if err != nil {
				done <- err
				return
			}
			f, err := ln.(*net.TCPListener).File()
			ln.Close()
			if err != nil {
				done <- err
				return
			}
			e.files = append(e.files, f)
			e.fdNames = append(e.fdNames, sock.name)
		}
		done <- nil
	}()
	icMust(t, <-done)
	t.Cleanup(func() {
		for _, f := range e.files {
			f.Close()
		}
	})
}

type icDaemon struct {
	proc *e2e.Process
	log  *e2e.LockedBuffer
}

// stop sends SIGTERM and waits for the exit; it returns the exit code (-1 if
// killed after stopTimeout).
func (d *icDaemon) stop() int { return d.proc.Stop(stopTimeout) }

// startDaemon starts a daemon process in the host namespace as icUID with
// CAP_NET_ADMIN (for the rule keeper) and the held sockets, and waits for its
// READY=1.
func (e *icEnv) startDaemon() *icDaemon { return e.startDaemonWith("+net_admin", false) }

// startDaemonWith starts a daemon in the host namespace as icUID with the
// capabilities caps (setpriv syntax), the held sockets and NOTIFY_SOCKET,
// and waits for its READY=1. With nsenter it enters the namespace with
// nsenter --net instead of ip netns exec, which remounts /sys and so hides
// the host's cgroup2 mount.
func (e *icEnv) startDaemonWith(caps string, nsenter bool) *icDaemon {
	t := e.t
	e.gen++
	sock := filepath.Join(e.dir, fmt.Sprintf("notify-%d", e.gen))
	nc, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
	icMust(t, err)
	defer nc.Close()
	icMust(t, os.Chmod(sock, 0o666))

	d := &icDaemon{log: &e2e.LockedBuffer{}}
	enter := []string{"ip", "netns", "exec", e.host}
	if nsenter {
		enter = []string{"nsenter", "--net=/run/netns/" + e.host, "--"}
	}
	cmd := exec.Command(enter[0], append(enter[1:],
		"setpriv", "--reuid", fmt.Sprint(icUID), "--regid", fmt.Sprint(icUID), "--clear-groups",
		"--inh-caps", caps, "--ambient-caps", caps,
		"/bin/sh", "-c", `LISTEN_PID=$$; export LISTEN_PID; exec "$0" "$@"`,
		e.bin, "serve", "--config", e.config, "--log-format", "json", "--log-level", "debug")...)
	cmd.Dir = e.dir
	cmd.Env = []string{
		"PATH=/usr/bin:/bin", "HOME=" + e.dir, "NO_PROXY=*",
		"AWS_REGION=us-east-1", "AWS_ENDPOINT_URL_STS=http://127.0.0.1:8190",
		"AWS_CONFIG_FILE=" + e.emptyFile, "AWS_SHARED_CREDENTIALS_FILE=" + e.emptyFile,
		fmt.Sprintf("LISTEN_FDS=%d", len(e.files)), "LISTEN_FDNAMES=" + strings.Join(e.fdNames, ":"),
		"NOTIFY_SOCKET=" + sock,
	}
	cmd.ExtraFiles = e.files
	cmd.Stdout, cmd.Stderr = d.log, d.log
	d.proc, err = e2e.Start(cmd)
	icMust(t, err)
	gen := e.gen
	t.Cleanup(func() {
		d.stop()
		if t.Failed() {
			t.Logf("daemon #%d log:\n%s", gen, e2e.TailLines(d.log.String(), 40))
		}
	})
	ready := make(chan string, 1)
	go func() {
		buf := make([]byte, 4096)
		for {
			nc.SetReadDeadline(time.Now().Add(readyTimeout))
			n, err := nc.Read(buf)
			if err != nil {
				ready <- "error: " + err.Error()
				return
			}
			if s := string(buf[:n]); strings.Contains(s, "READY=1") {
				ready <- s
				return
			}
		}
	}()
	select {
	case s := <-ready:
		if !strings.Contains(s, "READY=1") {
			t.Fatalf("daemon #%d sent no READY=1: %s\n%s", e.gen, s, e2e.TailLines(d.log.String(), 40))
		}
	case <-d.proc.Done():
		t.Fatalf("daemon #%d exited before READY=1: %v\n%s", e.gen, d.proc.Err(), e2e.TailLines(d.log.String(), 40))
	}
	return d
}

func (e *icEnv) clientEnv() []string {
	return []string{
		"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "HOME=" + e.dir, "LANG=C.UTF-8", "NO_PROXY=*", "no_proxy=*",
		"AWS_REGION=us-east-1", "AWS_CONFIG_FILE=" + e.emptyFile, "AWS_SHARED_CREDENTIALS_FILE=" + e.emptyFile,
		// and, deliberately, no AWS_EC2_METADATA_SERVICE_ENDPOINT
	}
}

const botoScript = `import boto3, json
c = boto3.Session().get_credentials()
print(json.dumps({"AccessKeyId": c.access_key if c else ""}))`

func (e *icEnv) checkClients(t *testing.T) {
	for _, p := range []string{awsCLIPath, python3Path, nodePath} {
		requireClient(t, p, p)
	}
	e.checkIssued(t, "AWS CLI", e.nsMust(e.host, e.clientEnv(), awsCLIPath, "configure", "export-credentials", "--format", "process"))
	e.checkIssued(t, "boto3", e.nsMust(e.host, e.clientEnv(), python3Path, "-c", botoScript))
	e.checkIssued(t, "Go SDK v2", e.nsMust(e.host, e.clientEnv(), e.client, "creds"))
	js := exec.Command("ip", "netns", "exec", e.host, nodePath, "creds.mjs", "default")
	js.Dir, js.Env = filepath.Join(repoRoot, "test", "js"), e.clientEnv()
	out, err := js.Output()
	if err != nil {
		t.Fatalf("node creds.mjs default: %v", err)
	}
	e.checkIssued(t, "JS SDK v3", string(out))
}

// checkIssued checks that out holds an AccessKeyId the fake STS issued.
func (e *icEnv) checkIssued(t *testing.T, who, out string) {
	t.Helper()
	var c struct{ AccessKeyId string }
	if err := json.Unmarshal([]byte(out), &c); err != nil || c.AccessKeyId == "" {
		t.Errorf("%s printed no access key id (%v)", who, err)
		return
	}
	if !strings.Contains(e.sts.String(), "access_key_id="+c.AccessKeyId+" ") {
		t.Errorf("%s got access key id %s, which the fake STS never issued", who, c.AccessKeyId)
	}
}

func (e *icEnv) startBackground(name, ns string, log *e2e.LockedBuffer, dir string, env []string, args ...string) {
	t := e.t
	if log == nil {
		log = &e2e.LockedBuffer{}
	}
	cmd := exec.Command("ip", append([]string{"netns", "exec", ns}, args...)...)
	cmd.Dir, cmd.Env, cmd.Stdout, cmd.Stderr = dir, env, log, log
	p, err := e2e.Start(cmd)
	icMust(t, err)
	t.Cleanup(func() {
		p.Stop(5 * time.Second)
		if t.Failed() {
			t.Logf("%s log:\n%s", name, e2e.TailLines(log.String(), 20))
		}
	})
}

func (e *icEnv) nsOutput(ns string, env []string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", ns}, args...)...)
	if env == nil {
		env = e.clientEnv()
	}
	cmd.Env, cmd.Dir = env, e.dir
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	if err != nil {
		return out.String(), fmt.Errorf("%s: %v: %s", strings.Join(args, " "), err, errb.String())
	}
	return out.String(), nil
}

func (e *icEnv) nsMust(ns string, env []string, args ...string) string {
	e.t.Helper()
	out, err := e.nsOutput(ns, env, args...)
	if err != nil {
		e.t.Fatal(err)
	}
	return out
}

func (e *icEnv) nsRun(ns string, env []string, args ...string) {
	e.t.Helper()
	e.nsMust(ns, env, args...)
}

func icMust(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}
