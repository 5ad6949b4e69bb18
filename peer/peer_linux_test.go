package peer

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// BenchmarkLookup measures one lookup of a new connection: sock_diag plus a
// full /proc scan (cold), and one answered from the inode cache (warm,
// sock_diag plus exe and cgroup reads), a scan of every process that does
// not find the socket (the worst case), and sock_diag alone.
func BenchmarkLookup(b *testing.B) {
	skipIfUnsupported(b)
	_, server := pair(b, "tcp4", "127.0.0.1:0")
	ctx := context.Background()
	b.Run("cold", func(b *testing.B) {
		for b.Loop() {
			if _, err := NewResolver(0).LookupConn(ctx, server); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("warm", func(b *testing.B) {
		r := NewResolver(time.Hour)
		for b.Loop() {
			if _, err := r.LookupConn(ctx, server); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("full_scan", func(b *testing.B) {
		for b.Loop() {
			scanProc(ctx, "/proc", 0, -1, true, map[uint64]int{})
		}
	})
	b.Run("sock_diag", func(b *testing.B) {
		l, rm := server.LocalAddr().(*net.TCPAddr), server.RemoteAddr().(*net.TCPAddr)
		for b.Loop() {
			if _, err := sockDiag(ctx, rm, l); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkLookupConn measures the lookup of a new connection (the inode
// cache never answers) from a long-running client: a root process in a
// cgroup of its own, as a systemd service or scope is, with newerProcs
// processes started after it (a scan goes newest first). It compares the pid
// found by a scan of every process (full_scan: the Resolver without socket
// cgroups, as before) with the scan of the socket's cgroup.procs first
// (cgroup_first), and times a Resolver without the privilege to read other
// users' fds looking up a client of another uid (unprivileged: uid, cgroup
// and unit, no scan). It needs root and a cgroup2 mount.
func BenchmarkLookupConn(b *testing.B) {
	skipIfUnsupported(b)
	const newerProcs = 40
	c := startCgroupClient(b, 0)
	for range newerProcs {
		p := exec.Command("sleep", "600")
		if err := p.Start(); err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { _ = p.Process.Kill(); _ = p.Wait() })
	}
	ctx := context.Background()
	run := func(name string, r *Resolver, wantPID bool) {
		b.Run(name, func(b *testing.B) {
			for b.Loop() {
				info, err := r.LookupConn(ctx, c.server)
				if err != nil {
					b.Fatal(err)
				}
				if (info.PID == c.pid) != wantPID || info.Unit != c.unit && r.cgroups != nil {
					b.Fatalf("%+v, want pid found=%v (%d), unit %s", info, wantPID, c.pid, c.unit)
				}
			}
		})
	}
	full := NewResolver(time.Nanosecond)
	full.cgroups = nil
	run("full_scan", full, true)
	run("cgroup_first", NewResolver(time.Nanosecond), true)
	unpriv := NewResolver(time.Nanosecond)
	unpriv.allFDs, unpriv.euid = false, 65534
	run("unprivileged", unpriv, false)
}

// diagMsg builds a SOCK_DIAG_BY_FAMILY payload: an inet_diag_msg with the
// given ports, uid and inode, followed by attrs (already encoded).
func diagMsg(sport, dport uint16, uid, inode uint32, attrs ...[]byte) []byte {
	d := make([]byte, sizeofInetDiagMsg)
	d[0], d[1] = syscall.AF_INET, 1 // family, state
	binary.BigEndian.PutUint16(d[4:], sport)
	binary.BigEndian.PutUint16(d[6:], dport)
	binary.NativeEndian.PutUint32(d[64:], uid)
	binary.NativeEndian.PutUint32(d[68:], inode)
	for _, a := range attrs {
		d = append(d, a...)
	}
	return d
}

// nlattr encodes one netlink attribute, padded to 4 bytes unless unpadded.
func nlattr(typ uint16, payload []byte, unpadded bool) []byte {
	a := make([]byte, sizeofNlAttr, sizeofNlAttr+len(payload)+3)
	binary.NativeEndian.PutUint16(a[0:], uint16(sizeofNlAttr+len(payload)))
	binary.NativeEndian.PutUint16(a[2:], typ)
	a = append(a, payload...)
	for !unpadded && len(a)%4 != 0 {
		a = append(a, 0)
	}
	return a
}

func u64(v uint64) []byte { return binary.NativeEndian.AppendUint64(nil, v) }

func TestParseDiagMsg(t *testing.T) {
	const id = 0x1_0000_2a3b
	shutdown := nlattr(8, []byte{0}, false) // INET_DIAG_SHUTDOWN, padded to 8
	for _, tc := range []struct {
		name    string
		msg     []byte
		want    diagAnswer
		wantErr string
	}{
		{"no attributes (kernel < 5.7)", diagMsg(40000, 80, 1000, 777), diagAnswer{uid: 1000, inode: 777}, ""},
		{"cgroup id", diagMsg(40000, 80, 1000, 777, nlattr(inetDiagCgroupID, u64(id), false)),
			diagAnswer{uid: 1000, inode: 777, cgroupID: id, hasCgroup: true}, ""},
		{"cgroup id after other attributes and a pad", diagMsg(40000, 80, 0, 1,
			shutdown, nlattr(14, nil, false), nlattr(inetDiagCgroupID, u64(id), false), nlattr(22, []byte{1, 2}, false)),
			diagAnswer{uid: 0, inode: 1, cgroupID: id, hasCgroup: true}, ""},
		{"type flags masked", diagMsg(1, 2, 3, 4, nlattr(inetDiagCgroupID|0x8000, u64(id), false)),
			diagAnswer{uid: 3, inode: 4, cgroupID: id, hasCgroup: true}, ""},
		{"last attribute unpadded", diagMsg(1, 2, 3, 4, nlattr(inetDiagCgroupID, u64(id), false), nlattr(8, []byte{1}, true)),
			diagAnswer{uid: 3, inode: 4, cgroupID: id, hasCgroup: true}, ""},
		{"trailing bytes shorter than an attribute", append(diagMsg(1, 2, 3, 4), 0, 0),
			diagAnswer{uid: 3, inode: 4}, ""},
		{"short message", diagMsg(1, 2, 3, 4)[:sizeofInetDiagMsg-1], diagAnswer{}, "short answer"},
		{"attribute length below its header", append(diagMsg(1, 2, 3, 4), 2, 0, 21, 0), diagAnswer{}, "bad attribute length"},
		{"attribute longer than the message", diagMsg(1, 2, 3, 4, nlattr(inetDiagCgroupID, u64(id), false)[:8]), diagAnswer{}, "bad attribute length"},
		{"cgroup id of 4 bytes", diagMsg(1, 2, 3, 4, nlattr(inetDiagCgroupID, []byte{1, 2, 3, 4}, false)), diagAnswer{}, "cgroup id attribute of 8 bytes"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, sport, dport, err := parseDiagMsg(tc.msg)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err = %v, want %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got != tc.want {
				t.Errorf("parseDiagMsg = %+v, want %+v", got, tc.want)
			}
			if wantS := binary.BigEndian.Uint16(tc.msg[4:]); sport != wantS || dport != binary.BigEndian.Uint16(tc.msg[6:]) {
				t.Errorf("ports %d %d", sport, dport)
			}
		})
	}
}

func FuzzParseDiagMsg(f *testing.F) {
	f.Add(diagMsg(1, 2, 3, 4))
	f.Add(diagMsg(1, 2, 3, 4, nlattr(inetDiagCgroupID, u64(99), false)))
	f.Add(diagMsg(1, 2, 3, 4, nlattr(8, []byte{1}, true)))
	f.Fuzz(func(t *testing.T, d []byte) {
		a, _, _, err := parseDiagMsg(d)
		if err != nil && a != (diagAnswer{}) {
			t.Errorf("error %v with a non-zero answer %+v", err, a)
		}
		if err == nil && len(d) < sizeofInetDiagMsg {
			t.Errorf("accepted %d bytes", len(d))
		}
	})
}

// TestLookupOwnCgroup: a loopback connection made by this process
// resolves to this process's own cgroup (the 0:: line of /proc/self/cgroup),
// which the kernel reports for the socket.
func TestLookupOwnCgroup(t *testing.T) {
	skipIfUnsupported(t)
	if mount, _, err := locateCgroup2(); err != nil || mount == "" {
		t.Skipf("SKIPPED: no cgroup2 file system is mounted (%v): socket cgroups cannot be mapped to paths", err)
	}
	_, server := pair(t, "tcp4", "127.0.0.1:0")
	l, rm := server.LocalAddr().(*net.TCPAddr), server.RemoteAddr().(*net.TCPAddr)
	d, err := sockDiag(t.Context(), rm, l)
	if err != nil {
		t.Fatal(err)
	}
	if !d.hasCgroup {
		t.Fatal("the kernel sent no INET_DIAG_CGROUP_ID (Linux >= 5.7 with CONFIG_SOCK_CGROUP_DATA has it)")
	}
	own := ownCgroup(t)
	info, err := NewResolver(0).LookupConn(t.Context(), server)
	if err != nil {
		t.Fatal(err)
	}
	if info.Cgroup != own {
		t.Errorf("Cgroup = %q, want %q (own 0:: line)", info.Cgroup, own)
	}
	if info.Unit != unitFromPath(own) || info.PID != os.Getpid() {
		t.Errorf("Lookup = %+v, want unit %q pid %d", info, unitFromPath(own), os.Getpid())
	}
}

// ownCgroup is the path on the 0:: line of /proc/self/cgroup.
func ownCgroup(t testing.TB) string {
	t.Helper()
	data, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		t.Fatal(err)
	}
	for line := range strings.SplitSeq(string(data), "\n") {
		if p, ok := strings.CutPrefix(line, "0::"); ok {
			return p
		}
	}
	t.Fatalf("no 0:: line in /proc/self/cgroup:\n%s", data)
	return ""
}

// cgroupClient is a client process (this test binary as the helper) started
// directly in a new cgroup, connected to a listener of the test.
type cgroupClient struct {
	unit   string // the cgroup's name, a *.scope
	exe    string // the helper's executable
	pid    int
	server net.Conn // the test's end of the helper's connection
}

// startCgroupClient creates a cgroup named like a transient scope under the
// cgroup2 mount, starts a copy of the test binary in it (clone3
// CLONE_INTO_CGROUP, so its first socket is created there) as uid, and
// accepts its connection. Everything is removed at the end of the test. It
// skips unless the test runs as root with a cgroup2 mount.
func startCgroupClient(t testing.TB, uid int) *cgroupClient {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("SKIPPED: creating a cgroup and running a client as another uid needs root")
	}
	mount, _, err := locateCgroup2()
	if err != nil || mount == "" {
		t.Skipf("SKIPPED: no cgroup2 file system is mounted (%v)", err)
	}
	var rnd [6]byte
	_, _ = rand.Read(rnd[:])
	c := &cgroupClient{unit: "imdsproxy-peer-test-" + hex.EncodeToString(rnd[:]) + ".scope"}
	dir := filepath.Join(mount, c.unit)
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Skipf("SKIPPED: cannot create a cgroup: %v", err)
	}
	t.Cleanup(func() { removeCgroup(t, dir) })
	cg, err := os.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer cg.Close()

	// A copy another uid may execute.
	bin, err := os.MkdirTemp("", "imdsproxy-peer-test-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(bin) })
	if err := os.Chmod(bin, 0o755); err != nil {
		t.Fatal(err)
	}
	c.exe = filepath.Join(bin, "peer-client")
	src, err := os.ReadFile(ownExe(t))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(c.exe, src, 0o755); err != nil {
		t.Fatal(err)
	}

	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	cmd := exec.Command(c.exe, "-test.run=^$")
	cmd.Env = []string{helperEnv + "=" + ln.Addr().String()}
	cmd.SysProcAttr = &syscall.SysProcAttr{
		UseCgroupFD: true, CgroupFD: int(cg.Fd()),
		Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(uid)},
	}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		if errors.Is(err, syscall.ENOSYS) || errors.Is(err, syscall.EINVAL) {
			t.Skipf("SKIPPED: cannot start a process in a new cgroup (clone3 CLONE_INTO_CGROUP, Linux >= 5.7): %v", err)
		}
		t.Fatal(err)
	}
	c.pid = cmd.Process.Pid
	t.Cleanup(func() { stdin.Close(); _ = cmd.Process.Kill(); _ = cmd.Wait() })
	if line, err := bufio.NewReader(stdout).ReadString('\n'); err != nil || line != "connected\n" {
		t.Fatalf("helper: %q, %v", line, err)
	}
	if c.server, err = ln.Accept(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.server.Close() })
	return c
}

// removeCgroup removes an empty cgroup directory, waiting for its exited
// processes to leave it.
func removeCgroup(t testing.TB, dir string) {
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
		time.Sleep(20 * time.Millisecond)
	}
}

// TestLookupCgroupChild: a client of another uid in a scope of its own is
// named by its unit and cgroup from the kernel; with root's capabilities
// its pid and exe are found through the cgroup's process list, and without
// them the unit is still known while pid and exe are not searched for.
func TestLookupCgroupChild(t *testing.T) {
	skipIfUnsupported(t)
	c := startCgroupClient(t, 65534)
	r := NewResolver(time.Nanosecond)
	info, err := r.LookupConn(t.Context(), c.server)
	if err != nil {
		t.Fatal(err)
	}
	want := Info{UID: 65534, PID: c.pid, Exe: c.exe, Unit: c.unit, Cgroup: "/" + c.unit}
	if info != want {
		t.Errorf("LookupConn = %+v, want %+v", info, want)
	}

	unpriv := NewResolver(0)
	unpriv.allFDs = false
	info, err = unpriv.LookupConn(t.Context(), c.server)
	if err != nil {
		t.Fatal(err)
	}
	want.PID, want.Exe = 0, ""
	if info != want {
		t.Errorf("without privilege: LookupConn = %+v, want %+v", info, want)
	}
}

// TestLookupNoCgroups: without socket cgroups (the kernel reports none) the
// unit comes from the process's /proc/<pid>/cgroup.
func TestLookupNoCgroups(t *testing.T) {
	skipIfUnsupported(t)
	_, server := pair(t, "tcp4", "127.0.0.1:0")
	r := NewResolver(0)
	r.cgroups = nil
	info, err := r.LookupConn(t.Context(), server)
	if err != nil {
		t.Fatal(err)
	}
	cg, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		t.Fatal(err)
	}
	want := Info{UID: os.Getuid(), PID: os.Getpid(), Exe: ownExe(t), Unit: unitFromCgroup(string(cg))}
	if info != want {
		t.Errorf("LookupConn = %+v, want %+v", info, want)
	}
}

// TestLookupUnitUnknown: the kernel names the socket's cgroup, but it cannot
// be mapped to a path (here: an empty stand-in for the cgroup2 tree) and no
// process is found to read /proc/<pid>/cgroup from: the unit is unknown,
// and Info says so instead of reporting a peer outside any unit.
func TestLookupUnitUnknown(t *testing.T) {
	skipIfUnsupported(t)
	_, server := pair(t, "tcp4", "127.0.0.1:0")
	l, rm := server.LocalAddr().(*net.TCPAddr), server.RemoteAddr().(*net.TCPAddr)
	if d, err := sockDiag(t.Context(), rm, l); err != nil || !d.hasCgroup {
		t.Skipf("SKIPPED: the kernel sends no INET_DIAG_CGROUP_ID here (%v)", err)
	}
	empty := t.TempDir()
	r := NewResolver(0)
	r.cgroups = newCgroupMap(func() (string, string, error) { return empty, "/", nil }, time.Hour)
	r.proc = t.TempDir() // no process to be found
	info, err := r.LookupConn(t.Context(), server)
	if err != nil {
		t.Fatal(err)
	}
	if !info.UnitUnknown || info.Unit != "" || info.Cgroup != "" || info.UID != os.Getuid() {
		t.Errorf("LookupConn = %+v, want the uid with UnitUnknown and no unit or cgroup", info)
	}
	// With the process found, /proc names the unit: it is known again.
	r.proc = "/proc"
	info, err = r.LookupConn(t.Context(), server)
	if err != nil {
		t.Fatal(err)
	}
	if info.UnitUnknown || info.PID != os.Getpid() {
		t.Errorf("LookupConn with /proc = %+v, want the pid and UnitUnknown false", info)
	}
}
