package test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/imdsproxy/imdsproxy/test/e2e"
)

// The client identification end-to-end test: the daemon, as in production,
// runs as an unprivileged uid (icUID) with CAP_NET_ADMIN only, intercepts
// 169.254.169.254:80 in the "host" network namespace of the interception
// test (see e2e_intercept_test.go) and has an access: section. Clients run
// in that namespace as other uids, some in cgroups of their own named like
// transient systemd scopes, and reach the daemon through the nftables
// redirect (SO_ORIGINAL_DST) or directly. The daemon must name each client's
// uid and unit (from the kernel's sock_diag: the socket's cgroup v2) in its
// audit and access lines and apply allow_uids and allow_units by them,
// without CAP_SYS_PTRACE; pid and exe are empty then, and found once the
// operator adds CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH.
//
// The daemon is started with nsenter --net rather than ip netns exec, which
// remounts /sys and so hides the cgroup2 file system from the daemon.

const (
	pdAllowedUID = 4242 // in allow_uids
	pdOtherUID   = 4343 // not in allow_uids
)

func TestPeerIdentityIntercepted(t *testing.T) {
	aemm := requireNetnsTest(t, "the client identification end-to-end test", "network namespaces, nftables rules and cgroups")
	cgMount := pdCgroup2Mount(t)
	if cgMount == "" {
		t.Skip("SKIPPED (LOUDLY): no cgroup2 file system is mounted: units cannot be told from the kernel")
	}

	// Two cgroups named like transient scopes: one allowed, one not.
	allowed, other := pdCgroup(t, cgMount), pdCgroup(t, cgMount)

	e := pdSetup(t, aemm, fmt.Sprintf("{allow_uids: [%d], allow_units: [%s], audit: true}", pdAllowedUID, allowed.unit))
	d := pdStartDaemon(e, false)
	logs := []*e2e.LockedBuffer{d.log}
	own := pdOwnUnit(t) // clients run without a cgroup of their own are in the test's

	// run runs imdsclient get PATH in the host namespace as uid, in cg
	// (nil: the test's own cgroup), and returns its pid, stdout and error.
	run := func(t *testing.T, uid int, cg *pdCgroupDir, base, path string) (int, string, error) {
		t.Helper()
		args := []string{"netns", "exec", e.host, "setpriv", "--reuid", fmt.Sprint(uid), "--regid", fmt.Sprint(uid), "--clear-groups",
			e.client, "get"}
		if base != "" {
			args = append(args, "-base", base)
		}
		ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
		defer cancel()
		cmd := exec.CommandContext(ctx, "ip", append(args, path)...)
		cmd.Env, cmd.Dir = e.clientEnv(), e.dir
		if cg != nil {
			// Born in the cgroup (clone3 CLONE_INTO_CGROUP): ip and setpriv
			// exec the client, so every socket is made there.
			cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(cg.f.Fd())}
		}
		var out, errb bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &errb
		if err := cmd.Start(); err != nil {
			t.Fatalf("start client: %v", err)
		}
		err := cmd.Wait()
		if err != nil {
			err = fmt.Errorf("%v: %s", err, strings.TrimSpace(errb.String()))
		}
		return cmd.Process.Pid, out.String(), err
	}
	var served []e2e.CredDoc // every document handed out, to check the log against
	credsOK := func(t *testing.T, who, out string, err error) {
		t.Helper()
		if err != nil {
			t.Fatalf("%s: credentials: %v", who, err)
		}
		e.checkIssued(t, who, out)
		var doc e2e.CredDoc
		if err := json.Unmarshal([]byte(out), &doc); err != nil || doc.SecretAccessKey == "" || doc.Token == "" {
			t.Fatalf("%s: not a credential document (%v)", who, err)
		}
		served = append(served, doc)
	}
	forbidden := func(t *testing.T, who string, err error) {
		t.Helper()
		if err == nil || !strings.Contains(err.Error(), "403") {
			t.Errorf("%s: credentials: %v, want 403", who, err)
		}
	}

	t.Run("allowed uid through the redirect is audited by uid", func(t *testing.T) {
		pid, out, err := run(t, pdAllowedUID, nil, "", credPath)
		credsOK(t, "uid 4242", out, err)
		a := d.waitLine(t, "credentials served", func(l map[string]any) bool { return l["uid"] == float64(pdAllowedUID) })
		// No CAP_SYS_PTRACE: pid and exe of another uid are not read.
		pdExpect(t, a, map[string]any{"logger": "audit", "identified": true, "pid": float64(0), "exe": "", "unit": own, "route": "credentials"})
		t.Logf("client pid %d; audit line %v", pid, a)
	})
	t.Run("allowed unit through the redirect is audited by unit", func(t *testing.T) {
		_, out, err := run(t, pdOtherUID, allowed, "", credPath)
		credsOK(t, "uid 4343 in "+allowed.unit, out, err)
		a := d.waitLine(t, "credentials served", func(l map[string]any) bool { return l["unit"] == allowed.unit })
		pdExpect(t, a, map[string]any{"logger": "audit", "identified": true, "uid": float64(pdOtherUID), "pid": float64(0), "exe": ""})
	})
	t.Run("allowed unit connecting directly", func(t *testing.T) {
		// The same client identity and key id as through the redirect: the
		// audit counts the hand-out as a repeat (access/audit.go) under
		// the unit's label instead of writing a second line.
		handouts := func() float64 {
			text := e.nsMust(e.host, nil, "curl", "-s", "-m", "2", fmt.Sprintf("http://127.0.0.1:%d/metrics", icAdminPort))
			m, err := e2e.ParseMetrics(text)
			if err != nil {
				t.Fatal(err)
			}
			v, _ := m.Value("imdsproxy_audit_handouts_total", map[string]string{"client": allowed.unit})
			return v
		}
		before, lines := handouts(), d.count("credentials served")
		_, out, err := run(t, pdOtherUID, allowed, fmt.Sprintf("http://127.0.0.1:%d", icIMDSPort), credPath)
		credsOK(t, "uid 4343 in "+allowed.unit+" (direct)", out, err)
		if after := handouts(); after != before+1 {
			t.Errorf("imdsproxy_audit_handouts_total{client=%q} went from %v to %v, want one more", allowed.unit, before, after)
		}
		if n := d.count("credentials served"); n != lines {
			t.Errorf("%d new audit lines for a repeat hand-out, want none", n-lines)
		}
	})
	t.Run("another unit is refused credentials, not metadata", func(t *testing.T) {
		_, _, err := run(t, pdOtherUID, other, "", credPath)
		forbidden(t, "uid 4343 in "+other.unit, err)
		l := d.waitLine(t, "credential request refused", func(l map[string]any) bool { return l["unit"] == other.unit })
		pdExpect(t, l, map[string]any{"identified": true, "uid": float64(pdOtherUID)})
		if _, out, err := run(t, pdOtherUID, other, "", "/latest/meta-data/instance-id"); err != nil || out != icInstanceID {
			t.Errorf("instance-id: %q, %v; want %q", out, err, icInstanceID)
		}
	})
	t.Run("another uid through the redirect is refused credentials, not metadata", func(t *testing.T) {
		// The identity document too: imds.passthrough (identity: auto)
		// refuses it through interception as on the listener.
		for _, p := range []string{credPath, "/latest/meta-data/iam/security-credentials/", "/latest/meta-data/iam/info",
			"/latest/dynamic/instance-identity/document"} {
			_, _, err := run(t, pdOtherUID, nil, "", p)
			forbidden(t, "uid 4343 "+p, err)
		}
		l := d.waitLine(t, "credential request refused", func(l map[string]any) bool { return l["uid"] == float64(pdOtherUID) && l["unit"] == own })
		pdExpect(t, l, map[string]any{"identified": true, "pid": float64(0)})
		if _, out, err := run(t, pdOtherUID, nil, "", "/latest/meta-data/instance-id"); err != nil || out != icInstanceID {
			t.Errorf("instance-id: %q, %v; want %q", out, err, icInstanceID)
		}
	})
	for _, l := range d.lines() {
		if l["logger"] == "audit" && l["uid"] == float64(pdOtherUID) && l["unit"] != allowed.unit {
			t.Errorf("audit line for a refused client: %v", l)
		}
	}

	t.Run("with CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH pid and exe are found", func(t *testing.T) {
		next := pdStartDaemon(e, true)
		if code := d.stop(); code != 0 {
			t.Errorf("old daemon exited %d on SIGTERM", code)
		}
		d = next
		logs = append(logs, d.log)
		pid, out, err := run(t, pdOtherUID, allowed, "", credPath)
		credsOK(t, "uid 4343 in "+allowed.unit, out, err)
		a := d.waitLine(t, "credentials served", func(l map[string]any) bool { return l["unit"] == allowed.unit })
		pdExpect(t, a, map[string]any{"uid": float64(pdOtherUID), "pid": float64(pid), "exe": e.client})
	})
	for _, doc := range served {
		for _, l := range logs {
			if strings.Contains(l.String(), doc.SecretAccessKey) || strings.Contains(l.String(), doc.Token) {
				t.Error("the daemon's log holds a secret it served")
			}
		}
	}
}

// pdCgroupDir is a cgroup of the test, named like a transient scope.
type pdCgroupDir struct {
	unit string
	f    *os.File // the open directory, for CLONE_INTO_CGROUP
}

// pdCgroup creates imdsproxy-e2e-<random>.scope under the cgroup2 mount; a
// cleanup removes it once its processes have gone.
func pdCgroup(t *testing.T, mount string) *pdCgroupDir {
	t.Helper()
	var b [6]byte
	_, _ = rand.Read(b[:])
	c := &pdCgroupDir{unit: "imdsproxy-e2e-" + hex.EncodeToString(b[:]) + ".scope"}
	dir := filepath.Join(mount, c.unit)
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Skipf("SKIPPED (LOUDLY): cannot create a cgroup under %s: %v", mount, err)
	}
	var err error
	if c.f, err = os.Open(dir); err != nil {
		os.Remove(dir)
		t.Fatal(err)
	}
	t.Cleanup(func() {
		c.f.Close()
		deadline := time.Now().Add(10 * time.Second)
		for {
			err := os.Remove(dir)
			if err == nil || errors.Is(err, os.ErrNotExist) {
				return
			}
			if time.Now().After(deadline) {
				t.Errorf("cannot remove cgroup %s: %v", dir, err)
				return
			}
			time.Sleep(50 * time.Millisecond)
		}
	})
	return c
}

// pdOwnUnit is the outermost systemd unit in the test's own cgroup v2 path
// (the 0:: line of /proc/self/cgroup), or "".
func pdOwnUnit(t *testing.T) string {
	t.Helper()
	data, err := os.ReadFile("/proc/self/cgroup")
	icMust(t, err)
	for line := range strings.SplitSeq(string(data), "\n") {
		if p, ok := strings.CutPrefix(line, "0::"); ok {
			for seg := range strings.SplitSeq(p, "/") {
				if len(seg) > len(".scope") && (strings.HasSuffix(seg, ".service") || strings.HasSuffix(seg, ".scope")) {
					return seg
				}
			}
		}
	}
	return ""
}

// pdCgroup2Mount is the test's cgroup2 mount point, or "".
func pdCgroup2Mount(t *testing.T) string {
	t.Helper()
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return ""
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		for i, s := range fields {
			if s == "-" && i >= 6 && i+1 < len(fields) && fields[i+1] == "cgroup2" && fields[3] == "/" {
				return fields[4]
			}
		}
	}
	return ""
}

// pdSetup builds the interception test's environment with the given
// access: section and installs the rules and the listening sockets.
func pdSetup(t *testing.T, aemm, access string) *icEnv {
	e := newIcEnv(t, aemm, access)
	e.nsRun(e.host, nil, e.bin, "intercept", "install", "--config", e.config)
	e.openSockets()
	return e
}

// pdDaemon is a daemon of this test and its JSON log.
type pdDaemon struct {
	*icDaemon
}

// pdStartDaemon starts a daemon in the host namespace as icUID with
// CAP_NET_ADMIN (and CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH when ptrace),
// entering the namespace with nsenter to keep the host's /sys/fs/cgroup.
func pdStartDaemon(e *icEnv, ptrace bool) *pdDaemon {
	caps := "+net_admin"
	if ptrace {
		caps += ",+sys_ptrace,+dac_read_search"
	}
	return &pdDaemon{e.startDaemonWith(caps, true)}
}

// lines returns the daemon's JSON log lines, decoded.
func (d *pdDaemon) lines() []map[string]any { return e2e.JSONLines(d.log.String()) }

// count is the number of log lines with message msg.
func (d *pdDaemon) count(msg string) int {
	n := 0
	for _, l := range d.lines() {
		if l["msg"] == msg {
			n++
		}
	}
	return n
}

// waitLine waits for the last log line with message msg that match accepts.
func (d *pdDaemon) waitLine(t *testing.T, msg string, match func(map[string]any) bool) map[string]any {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		var found map[string]any
		for _, l := range d.lines() {
			if l["msg"] == msg && match(l) {
				found = l
			}
		}
		if found != nil {
			return found
		}
		if time.Now().After(deadline) {
			t.Fatalf("no %q log line as expected; log:\n%s", msg, e2e.TailLines(d.log.String(), 20))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// pdExpect checks fields of a log line.
func pdExpect(t *testing.T, line map[string]any, want map[string]any) {
	t.Helper()
	for k, v := range want {
		if line[k] != v {
			t.Errorf("%s = %v (%T), want %v; line %v", k, line[k], line[k], v, line)
		}
	}
}
