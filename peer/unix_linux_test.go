package peer

import (
	"bufio"
	"crypto/rand"
	"encoding/hex"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"
)

// unixHelperEnv makes TestUnixHelperProcess act as a client: it connects
// to the unix socket named in the variable, prints "connected" and waits
// for stdin to close.
const unixHelperEnv = "PEER_TEST_UNIX_HELPER"

func TestUnixHelperProcess(t *testing.T) {
	path := os.Getenv(unixHelperEnv)
	if path == "" {
		t.Skip("a helper process of the unix socket tests")
	}
	c, err := net.Dial("unix", path)
	if err != nil {
		os.Exit(3)
	}
	os.Stdout.WriteString("connected\n")
	_, _ = io.Copy(io.Discard, os.Stdin)
	c.Close()
	os.Exit(0)
}

// unixServer listens on a fresh socket and returns its path and listener.
func unixServer(t *testing.T) (string, *net.UnixListener) {
	t.Helper()
	dir, err := os.MkdirTemp("", "peer-unix-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "s.sock")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path, 0o666); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return path, ln
}

// startUnixHelper starts a copy of the test binary as the helper, as uid
// (-1: this process's uid) in the cgroup dir (nil: this process's), and
// returns it once connected, with the server's end of its connection.
func startUnixHelper(t *testing.T, path string, ln *net.UnixListener, uid int, cgroup *os.File) (*exec.Cmd, io.WriteCloser, *net.UnixConn) {
	t.Helper()
	bin, err := os.MkdirTemp("", "peer-unix-bin-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(bin) })
	exe := filepath.Join(bin, "peer-unix-client")
	src, err := os.ReadFile(ownExe(t))
	if err == nil {
		err = os.WriteFile(exe, src, 0o755)
	}
	if err == nil {
		err = os.Chmod(bin, 0o755)
	}
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(exe, "-test.run=^TestUnixHelperProcess$")
	cmd.Env = []string{unixHelperEnv + "=" + path}
	cmd.SysProcAttr = &syscall.SysProcAttr{}
	if uid >= 0 {
		cmd.SysProcAttr.Credential = &syscall.Credential{Uid: uint32(uid), Gid: uint32(uid)}
	}
	if cgroup != nil {
		cmd.SysProcAttr.UseCgroupFD, cmd.SysProcAttr.CgroupFD = true, int(cgroup.Fd())
	}
	stdin, _ := cmd.StdinPipe()
	stdout, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { stdin.Close(); _ = cmd.Process.Kill(); _ = cmd.Wait() })
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil || line != "connected\n" {
		t.Fatalf("helper: %q %v", line, err)
	}
	_ = ln.SetDeadline(time.Now().Add(5 * time.Second))
	c, err := ln.AcceptUnix()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return cmd, stdin, c
}

// testScope creates a cgroup named like a systemd scope under the cgroup2
// root, or returns nil when that cannot be done (not root, no cgroup2).
func testScope(t *testing.T) (*os.File, string) {
	t.Helper()
	if os.Geteuid() != 0 {
		return nil, ""
	}
	mount := ""
	for _, m := range []string{"/sys/fs/cgroup", "/sys/fs/cgroup/unified"} { // unified, or a hybrid host's
		if _, err := os.Stat(m + "/cgroup.controllers"); err == nil {
			mount = m
			break
		}
	}
	if mount == "" {
		return nil, ""
	}
	var rnd [4]byte
	_, _ = rand.Read(rnd[:])
	unit := "imdsproxy-peer-unix-" + hex.EncodeToString(rnd[:]) + ".scope"
	dir := filepath.Join(mount, unit)
	if err := os.Mkdir(dir, 0o755); err != nil {
		return nil, ""
	}
	f, err := os.Open(dir)
	if err != nil {
		os.Remove(dir)
		return nil, ""
	}
	t.Cleanup(func() {
		f.Close()
		for range 50 { // the helper's exit empties it shortly after Wait
			if os.Remove(dir) == nil {
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
	})
	return f, unit
}

func TestLookupUnixSelf(t *testing.T) {
	path, ln := unixServer(t)
	client, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	c, err := ln.AcceptUnix()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	info, err := LookupUnix(c)
	if err != nil {
		t.Fatal(err)
	}
	own, _ := os.ReadFile("/proc/self/cgroup")
	want := Info{UID: os.Getuid(), PID: os.Getpid(), Exe: ownExe(t), Unit: unitFromCgroup(string(own)), Cgroup: unifiedPath(string(own))}
	if info != want {
		t.Errorf("LookupUnix = %+v\nwant %+v", info, want)
	}
}

// TestLookupUnixChild: another process, as another uid and in a scope of
// its own when root; once it has exited, its unit is unknown (never
// another process's).
func TestLookupUnixChild(t *testing.T) {
	path, ln := unixServer(t)
	uid, wantUID := -1, os.Getuid()
	if os.Geteuid() == 0 {
		uid, wantUID = 64201, 64201
	}
	cg, scope := testScope(t)
	cmd, stdin, c := startUnixHelper(t, path, ln, uid, cg)
	info, err := LookupUnix(c)
	if err != nil {
		t.Fatal(err)
	}
	if info.UID != wantUID || info.PID != cmd.Process.Pid || info.UnitUnknown {
		t.Errorf("LookupUnix = %+v, want uid %d pid %d", info, wantUID, cmd.Process.Pid)
	}
	if scope != "" && (info.Unit != scope || info.Cgroup != "/"+scope) {
		t.Errorf("unit %q cgroup %q, want the helper's scope %s", info.Unit, info.Cgroup, scope)
	}
	if scope == "" {
		t.Log("not root or no cgroup2: the helper runs in the test's own cgroup")
	}
	stdin.Close()
	if err := cmd.Wait(); err != nil {
		t.Fatal(err)
	}
	info, err = LookupUnix(c)
	if err != nil {
		t.Fatal(err)
	}
	if info.UID != wantUID || !info.UnitUnknown || info.Unit != "" || info.Cgroup != "" {
		t.Errorf("after the peer exited: %+v, want uid %d and the unit unknown", info, wantUID)
	}
}

// TestLookupUnixProc: the unit and cgroup come from the pid's cgroup file.
func TestLookupUnixProc(t *testing.T) {
	path, ln := unixServer(t)
	client, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	c, err := ln.AcceptUnix()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	proc := t.TempDir()
	pidDir := filepath.Join(proc, strconv.Itoa(os.Getpid()))
	if err := os.Mkdir(pidDir, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ file, unit, cgroup string }{
		{"0::/system.slice/billing.service\n", "billing.service", "/system.slice/billing.service"},
		{"0::/user.slice/user-1000.slice/user@1000.service/app.slice/backup.service\n", "user@1000.service",
			"/user.slice/user-1000.slice/user@1000.service/app.slice/backup.service"},
		{"12:pids:/\n1:name=systemd:/system.slice/cron.service\n0::/\n", "cron.service", "/"},
		{"", "", ""},
	} {
		if err := os.WriteFile(filepath.Join(pidDir, "cgroup"), []byte(tc.file), 0o644); err != nil {
			t.Fatal(err)
		}
		info, err := lookupUnix(c, proc)
		if err != nil {
			t.Fatal(err)
		}
		if info.Unit != tc.unit || info.Cgroup != tc.cgroup || info.UnitUnknown {
			t.Errorf("cgroup file %q: unit %q cgroup %q unknown %v, want %q %q", tc.file, info.Unit, info.Cgroup, info.UnitUnknown, tc.unit, tc.cgroup)
		}
	}
	os.Remove(filepath.Join(pidDir, "cgroup"))
	if info, _ := lookupUnix(c, proc); !info.UnitUnknown || info.UID != os.Getuid() {
		t.Errorf("unreadable cgroup file: %+v, want the uid and the unit unknown", info)
	}
}
