package peer

import (
	"bufio"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// diagMsg builds a SOCK_DIAG_BY_FAMILY payload: an inet_diag_msg with the
// given ports, uid and inode (and the cookie testCookie), followed by attrs
// (already encoded).
func diagMsg(sport, dport uint16, uid, inode uint32, attrs ...[]byte) []byte {
	d := make([]byte, sizeofInetDiagMsg)
	d[0], d[1] = syscall.AF_INET, 1 // family, state
	binary.BigEndian.PutUint16(d[4:], sport)
	binary.BigEndian.PutUint16(d[6:], dport)
	binary.NativeEndian.PutUint32(d[44:], uint32(testCookie&0xffffffff))
	binary.NativeEndian.PutUint32(d[48:], uint32(testCookie>>32))
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

const testCookie = 0x0000_0123_89ab_cdef

func TestParseDiagMsg(t *testing.T) {
	const id = 0x1_0000_2a3b
	shutdown := nlattr(8, []byte{0}, false) // INET_DIAG_SHUTDOWN, padded to 8
	for _, tc := range []struct {
		name    string
		msg     []byte
		want    diagAnswer
		wantErr string
	}{
		{"no attributes (kernel < 5.7)", diagMsg(40000, 80, 1000, 777), diagAnswer{uid: 1000, inode: 777, cookie: testCookie}, ""},
		{"cgroup id", diagMsg(40000, 80, 1000, 777, nlattr(inetDiagCgroupID, u64(id), false)),
			diagAnswer{uid: 1000, inode: 777, cookie: testCookie, cgroupID: id, hasCgroup: true}, ""},
		{"cgroup id after other attributes and a pad", diagMsg(40000, 80, 0, 1,
			shutdown, nlattr(14, nil, false), nlattr(inetDiagCgroupID, u64(id), false), nlattr(22, []byte{1, 2}, false)),
			diagAnswer{uid: 0, inode: 1, cookie: testCookie, cgroupID: id, hasCgroup: true}, ""},
		{"type flags masked", diagMsg(1, 2, 3, 4, nlattr(inetDiagCgroupID|0x8000, u64(id), false)),
			diagAnswer{uid: 3, inode: 4, cookie: testCookie, cgroupID: id, hasCgroup: true}, ""},
		{"last attribute unpadded", diagMsg(1, 2, 3, 4, nlattr(inetDiagCgroupID, u64(id), false), nlattr(8, []byte{1}, true)),
			diagAnswer{uid: 3, inode: 4, cookie: testCookie, cgroupID: id, hasCgroup: true}, ""},
		{"trailing bytes shorter than an attribute", append(diagMsg(1, 2, 3, 4), 0, 0),
			diagAnswer{uid: 3, inode: 4, cookie: testCookie}, ""},
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
	d, err := sockDiag(t.Context(), 0, rm, l)
	if err != nil {
		t.Fatal(err)
	}
	if !d.hasCgroup {
		t.Fatal("the kernel sent no INET_DIAG_CGROUP_ID (Linux >= 5.7 with CONFIG_SOCK_CGROUP_DATA has it)")
	}
	own := ownCgroup(t)
	info, err := newTestResolver(t, Options{BPF: BPFOff}).LookupConn(t.Context(), server)
	if err != nil {
		t.Fatal(err)
	}
	if info.Cgroup != own {
		t.Errorf("Cgroup = %q, want %q (own 0:: line)", info.Cgroup, own)
	}
	if want := unitFromPath(own); info.Unit != want && own != "/" || info.UnitUnknown {
		t.Errorf("Lookup = %+v, want unit %q", info, want)
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
	dir    string // the cgroup's directory
	exe    string // the helper's executable
	pid    int
	server net.Conn // the test's end of the helper's connection
	stop   func()   // ends the helper and waits for it; idempotent
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
	c.dir = dir
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Skipf("SKIPPED: cannot create a cgroup: %v", err)
	}
	t.Cleanup(func() { removeCgroup(t, dir) })
	cg, err := os.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer cg.Close()

	c.exe = copyTestBinary(t) // a copy another uid may execute

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
	c.stop = sync.OnceFunc(func() { stdin.Close(); _ = cmd.Process.Kill(); _ = cmd.Wait() })
	t.Cleanup(c.stop)
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
// named by its unit and cgroup from the kernel; Process finds its pid and
// exe with eBPF, and with root's capabilities through the cgroup's
// processes, and without them leaves them unknown while the unit is known.
func TestLookupCgroupChild(t *testing.T) {
	skipIfUnsupported(t)
	bothModes(t, func(t *testing.T, r *Resolver) {
		c := startCgroupClient(t, 65534)
		info, err := r.LookupConn(t.Context(), c.server)
		if err != nil {
			t.Fatal(err)
		}
		want := Info{UID: 65534, Unit: c.unit, Cgroup: "/" + c.unit, sock: info.sock}
		if info != want {
			t.Errorf("LookupConn = %+v, want %+v", info, want)
		}
		want.PID, want.Exe = c.pid, c.exe
		if got := r.Process(t.Context(), info); got != want {
			t.Errorf("Process = %+v, want %+v", got, want)
		}
		if r.Mode() == ModeCgroupProcs {
			r.allFDs = false // as the packaged unit: no CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH
			want.PID, want.Exe = 0, ""
			if got := r.Process(t.Context(), info); got != want {
				t.Errorf("without privilege: Process = %+v, want %+v", got, want)
			}
		}
	})
}

// TestLookupUIDNeverWaits: LookupUID names the uid of a client of another
// uid from the kernel alone; it does not wait for the cgroup watcher,
// even for a cgroup the map does not hold (a connection share is decided
// in the accept loop).
func TestLookupUIDNeverWaits(t *testing.T) {
	skipIfUnsupported(t)
	r := newTestResolver(t, Options{BPF: BPFOff, MissWait: 10 * time.Second})
	c := startCgroupClient(t, 65534)
	if r.cgroups != nil {
		// A map that never catches up: a lookup of a cgroup would wait
		// out MissWait.
		stale := newCgroupMap(r.cgroups.mount, r.cgroups.prefix)
		stale.nudge = func() {}
		r.cgroups = stale
	}
	start := time.Now()
	uid, err := r.LookupUID(t.Context(), c.server)
	if err != nil || uid != 65534 {
		t.Fatalf("LookupUID = %d, %v; want 65534", uid, err)
	}
	if took := time.Since(start); took > time.Second {
		t.Errorf("LookupUID took %v", took)
	}
}

// TestNewCgroupResolvedWithoutWalk: a cgroup made after the Resolver (as
// systemd makes a unit's) is resolved from the watcher's events: no walk
// of the tree besides the first.
func TestNewCgroupResolvedWithoutWalk(t *testing.T) {
	skipIfUnsupported(t)
	r := newTestResolver(t, Options{BPF: BPFOff})
	if r.cgroups == nil {
		t.Skip("SKIPPED: no cgroup2 file system is mounted")
	}
	for range 3 {
		c := startCgroupClient(t, 65534) // makes the cgroup, then the client in it
		info, err := r.LookupConn(t.Context(), c.server)
		if err != nil {
			t.Fatal(err)
		}
		if info.Unit != c.unit || info.UnitUnknown {
			t.Errorf("LookupConn = %+v, want unit %s", info, c.unit)
		}
	}
	if n := r.cgroups.walks.Load(); n != 1 {
		t.Errorf("%d walks of the cgroup tree, want only the first", n)
	}
}

// TestRemovedCgroupStopsResolving: once the socket's cgroup is removed (its
// process moved elsewhere) the socket's cgroup id never resolves again, not
// even when a cgroup of the same path is made again (it has a new id);
// Process then names the process's unit of now.
func TestRemovedCgroupStopsResolving(t *testing.T) {
	skipIfUnsupported(t)
	bothModes(t, func(t *testing.T, r *Resolver) {
		c := startCgroupClient(t, 65534)
		info, err := r.LookupConn(t.Context(), c.server)
		if err != nil || info.Unit != c.unit {
			t.Fatalf("LookupConn = %+v, %v", info, err)
		}
		if a, err := r.LookupConnForAudit(t.Context(), c.server); err != nil || a != info {
			t.Fatalf("LookupConnForAudit = %+v, %v; want LookupConn's %+v", a, err, info)
		}
		oldID, err := inodeOf(c.dir)
		if err != nil {
			t.Fatal(err)
		}
		hold := c.dir[:len(c.dir)-len(".scope")] + "-hold.scope"
		if err := os.Mkdir(hold, 0o755); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { removeCgroup(t, hold) })
		t.Cleanup(c.stop) // before hold is removed
		if err := os.WriteFile(filepath.Join(hold, "cgroup.procs"), []byte(strconv.Itoa(c.pid)), 0); err != nil {
			t.Fatal(err)
		}
		if err := os.Remove(c.dir); err != nil {
			t.Fatal(err)
		}
		// A lookup that overtakes the watcher still has the cgroup the
		// socket was made in, as true as a moment before; once the
		// watcher read the removal (microseconds) it is gone.
		catchUp(t, r.cgroups)
		info, err = r.LookupConn(t.Context(), c.server)
		if err != nil {
			t.Fatal(err)
		}
		want := Info{UID: 65534, UnitUnknown: true, sock: info.sock}
		if info != want {
			t.Errorf("after removal: LookupConn = %+v, want %+v", info, want)
		}
		// The audit's lookup skips the stat, not the watcher's word.
		if a, err := r.LookupConnForAudit(t.Context(), c.server); err != nil || a != want {
			t.Errorf("after removal: LookupConnForAudit = %+v, %v; want %+v", a, err, want)
		}
		if err := os.Mkdir(c.dir, 0o755); err != nil {
			t.Fatal(err)
		}
		catchUp(t, r.cgroups)
		if newID, err := inodeOf(c.dir); err != nil || newID == oldID {
			t.Fatalf("made again: id %d (was %d), %v", newID, oldID, err)
		}
		if info, err = r.LookupConn(t.Context(), c.server); err != nil || info != want {
			t.Errorf("after the path was made again: LookupConn = %+v, %v; want %+v", info, err, want)
		}
		// Only eBPF finds the process: its socket's cgroup, which the
		// fallback would search, is gone.
		got := r.Process(t.Context(), info)
		if r.Mode() == ModeEBPF {
			want.PID, want.Exe, want.Unit, want.UnitUnknown = c.pid, c.exe, filepath.Base(hold), false
		}
		if got != want {
			t.Errorf("Process = %+v, want %+v", got, want)
		}
	})
}

// catchUp waits until the watcher of m has applied every change made
// before the call.
func catchUp(t testing.TB, m *cgroupMap) {
	t.Helper()
	start := time.Now()
	m.nudge()
	timeout := time.After(5 * time.Second)
	for {
		_, _, caughtUp, changed := m.state(0)
		if caughtUp.After(start) {
			return
		}
		select {
		case <-changed:
		case <-timeout:
			t.Fatal("the cgroup watcher did not catch up within 5s")
		}
	}
}

// TestLookupNoCgroups: without socket cgroups (no cgroup2 mount) the
// lookup knows the uid only; Process with eBPF takes the unit from
// /proc/<pid>/cgroup, and without it finds no pid (its search needs the
// socket's cgroup).
func TestLookupNoCgroups(t *testing.T) {
	skipIfUnsupported(t)
	noCgroup2 := func(e *resolverEnv) { e.locate = func() (string, string, error) { return "", "", nil } }
	r := newTestResolver(t, Options{BPF: BPFOff}, noCgroup2)
	_, server := pair(t, "tcp4", "127.0.0.1:0")
	info, err := r.LookupConn(t.Context(), server)
	if err != nil {
		t.Fatal(err)
	}
	if want := (Info{UID: os.Getuid(), sock: info.sock}); info != want {
		t.Errorf("LookupConn = %+v, want %+v", info, want)
	}
	if got := r.Process(t.Context(), info); got != info {
		t.Errorf("Process without cgroups or eBPF = %+v, want %+v", got, info)
	}

	// eBPF attaches to the cgroup2 root, so it needs the mount; here the
	// Resolver has it for eBPF and loses the map afterwards.
	er := ebpfResolver(t)
	_, server = pair(t, "tcp4", "127.0.0.1:0")
	er.cgroups = nil
	info, err = er.LookupConn(t.Context(), server)
	if err != nil {
		t.Fatal(err)
	}
	cg, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		t.Fatal(err)
	}
	want := Info{UID: os.Getuid(), PID: os.Getpid(), Exe: ownExe(t), Unit: unitFromCgroup(string(cg)), sock: info.sock}
	if got := er.Process(t.Context(), info); got != want {
		t.Errorf("eBPF Process = %+v, want %+v", got, want)
	}
}

// TestLookupUnitUnknown: the kernel names the socket's cgroup, but it cannot
// be mapped to a path (here: an empty stand-in for the cgroup2 tree): the
// unit is unknown, and Info says so instead of reporting a peer outside
// any unit. Process, when it finds the process, names its unit from /proc.
func TestLookupUnitUnknown(t *testing.T) {
	skipIfUnsupported(t)
	_, server := pair(t, "tcp4", "127.0.0.1:0")
	l, rm := server.LocalAddr().(*net.TCPAddr), server.RemoteAddr().(*net.TCPAddr)
	if d, err := sockDiag(t.Context(), 0, rm, l); err != nil || !d.hasCgroup {
		t.Skipf("SKIPPED: the kernel sends no INET_DIAG_CGROUP_ID here (%v)", err)
	}
	empty := t.TempDir()
	r := newTestResolver(t, Options{BPF: BPFOff}, func(e *resolverEnv) {
		e.locate = func() (string, string, error) { return empty, "/", nil }
	})
	start := time.Now()
	info, err := r.LookupConn(t.Context(), server)
	if err != nil {
		t.Fatal(err)
	}
	if !info.UnitUnknown || info.Unit != "" || info.Cgroup != "" || info.UID != os.Getuid() {
		t.Errorf("LookupConn = %+v, want the uid with UnitUnknown and no unit or cgroup", info)
	}
	if took := time.Since(start); took > time.Second {
		t.Errorf("the miss took %v", took)
	}
	// Process has no cgroup to search without the path; with eBPF it
	// finds the process and /proc names the unit: it is known again.
	if got := r.Process(t.Context(), info); got != info {
		t.Errorf("Process = %+v, want %+v", got, info)
	}
	er := ebpfResolver(t)
	_, server = pair(t, "tcp4", "127.0.0.1:0")
	er.cgroups = r.cgroups
	info, err = er.LookupConn(t.Context(), server)
	if err != nil || !info.UnitUnknown {
		t.Fatalf("LookupConn = %+v, %v", info, err)
	}
	if got := er.Process(t.Context(), info); got.UnitUnknown || got.PID != os.Getpid() {
		t.Errorf("Process = %+v, want the pid and UnitUnknown false", got)
	}
}

// TestEBPFChildPID: with eBPF, the pid is the process that made the
// socket — here a child in a cgroup of its own, of another uid — found
// without reading any fd, even when that process may not be searched.
func TestEBPFChildPID(t *testing.T) {
	r := ebpfResolver(t)
	rec := &recordingFS{fs: osFS{}}
	r.fs, r.allFDs = rec, false
	c := startCgroupClient(t, 65534)
	info, err := r.LookupConn(t.Context(), c.server)
	if err != nil {
		t.Fatal(err)
	}
	got := r.Process(t.Context(), info)
	if got.PID != c.pid || got.Exe != c.exe || got.Unit != c.unit {
		t.Errorf("Process = %+v, want pid %d exe %s unit %s", got, c.pid, c.exe, c.unit)
	}
	for _, op := range rec.ops() {
		if strings.Contains(op, "/fd") || strings.Contains(op, "cgroup.procs") {
			t.Errorf("eBPF mode read %s", op)
		}
	}
	// The record names the creator and its cgroup.
	if r, ok := r.bpf.lookup(info.sock.cookie); !ok || int(r.TGID) != c.pid || r.UID != 65534 {
		t.Errorf("record %+v, %v", r, ok)
	} else if id, err := inodeOf(c.dir); err != nil || r.Cgroup != id {
		t.Errorf("record cgroup %d, want %d (%v)", r.Cgroup, id, err)
	}
	// After the socket is closed, its record is deleted (Linux >= 5.9).
	cookie := info.sock.cookie
	c.stop()
	deadline := time.Now().Add(5 * time.Second)
	for {
		if _, ok := r.bpf.lookup(cookie); !ok {
			break
		}
		if time.Now().After(deadline) {
			t.Log("the record outlived its socket (no BPF_CGROUP_INET_SOCK_RELEASE program?)")
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestMadeBy: a pid counts as the socket's creator only when it started no
// later than the socket was made (not a later process that got the pid).
func TestMadeBy(t *testing.T) {
	skipIfUnsupported(t)
	r := newTestResolver(t, Options{BPF: BPFOff})
	data, err := os.ReadFile("/proc/self/stat")
	if err != nil {
		t.Fatal(err)
	}
	start, ok := parseStartTime(data)
	if !ok {
		t.Fatalf("cannot parse %q", data)
	}
	startNs := start * nsPerUserHZTick
	for _, tc := range []struct {
		created uint64
		want    bool
	}{
		{startNs, true},
		{startNs + uint64(time.Hour), true},
		{startNs + nsPerUserHZTick - 1, true},
		{startNs - 1, false},
		{0, false},
	} {
		if got := r.madeBy(os.Getpid(), tc.created); got != tc.want {
			t.Errorf("madeBy(self, start%+dns) = %v, want %v", int64(tc.created)-int64(startNs), got, tc.want)
		}
	}
	if r.madeBy(1<<30, startNs) {
		t.Error("a pid that does not exist")
	}
}

func TestParseStartTime(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want uint64
		ok   bool
	}{
		{"1 (init) S 0 1 1 0 -1 4194560 1 2 3 4 5 6 7 8 20 0 1 0 42 1000 5", 42, true},
		{"77 (a) b (c) R 1 77 77 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 12345 0 0", 12345, true},
		{"77 (two words) R 1 77 77 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 9", 9, true},
		{"77 (short) R 1 2 3", 0, false},
		{"no parenthesis", 0, false},
		{"77 (x) R 1 77 77 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 -5", 0, false},
	} {
		got, ok := parseStartTime([]byte(tc.in))
		if got != tc.want || ok != tc.ok {
			t.Errorf("parseStartTime(%q) = %d, %v; want %d, %v", tc.in, got, ok, tc.want, tc.ok)
		}
	}
}

// FuzzParseStartTime: /proc/<pid>/stat holds the process's name, which
// the process chooses (any bytes but NUL, parentheses and spaces included).
func FuzzParseStartTime(f *testing.F) {
	f.Add([]byte("1 (init) S 0 1 1 0 -1 4194560 1 2 3 4 5 6 7 8 20 0 1 0 42 1000 5"))
	f.Add([]byte("77 (a) b) R 1 77 77 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 12345 0 0"))
	f.Fuzz(func(t *testing.T, name []byte) {
		stat := append(append([]byte("77 ("), name...), ") R 1 77 77 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 31337 99 0"...)
		if v, ok := parseStartTime(stat); !ok || v != 31337 {
			t.Errorf("name %q: starttime %d, %v; want 31337", name, v, ok)
		}
		parseStartTime(name) // anything at all: no panic
	})
}

// recordingFS records every file Process reads.
type recordingFS struct {
	fs  fileSystem
	mu  sync.Mutex
	log []string
}

func (r *recordingFS) record(op string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.log = append(r.log, op)
}

func (r *recordingFS) ops() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.log...)
}

func (r *recordingFS) ReadFile(name string, max int) ([]byte, error) {
	r.record("read " + name)
	return r.fs.ReadFile(name, max)
}

func (r *recordingFS) ReadDirNames(name string, max int) ([]string, error) {
	r.record("list " + name)
	return r.fs.ReadDirNames(name, max)
}

func (r *recordingFS) Readlink(name string) (string, error) {
	r.record("readlink " + name)
	return r.fs.Readlink(name)
}

var procPath = regexp.MustCompile(`^/proc/(\d+)/`)

// TestFallbackNeverScansProc: without eBPF, Process reads the fds of
// processes of the socket's cgroup only — never /proc itself or another
// process's fds, however many there are — and at most maxSearchProcs of
// them in a crowded cgroup.
func TestFallbackNeverScansProc(t *testing.T) {
	skipIfUnsupported(t)
	rec := &recordingFS{fs: osFS{}}
	r := newTestResolver(t, Options{BPF: BPFOff}, func(e *resolverEnv) { e.fs = rec })
	others := spawnIdle(t, 100, 10, "") // in this test's cgroup, newer than it
	c := startCgroupClient(t, 65534)
	info, err := r.LookupConn(t.Context(), c.server)
	if err != nil {
		t.Fatal(err)
	}
	if got := r.Process(t.Context(), info); got.PID != c.pid || got.Exe != c.exe {
		t.Fatalf("Process = %+v, want pid %d", got, c.pid)
	}
	ops := rec.ops()
	for _, op := range ops {
		_, name, _ := strings.Cut(op, " ")
		m := procPath.FindStringSubmatch(name)
		switch {
		case name == "/proc" || name == "/proc/":
			t.Errorf("listed /proc: %s", op)
		case m != nil && m[1] != strconv.Itoa(c.pid):
			t.Errorf("read another process's files: %s", op)
		case m == nil && name != filepath.Join(c.dir, "cgroup.procs"):
			t.Errorf("read something else: %s", op)
		}
	}
	t.Logf("%d reads with %d other processes on the host: %v", len(ops), len(others), ops)

	t.Run("a crowded cgroup is searched boundedly", func(t *testing.T) {
		// The client first, then more processes than the bound in its
		// cgroup: the newest are searched, and the client is not among them.
		c := startCgroupClient(t, 65534)
		crowd := spawnIdle(t, maxSearchProcs+10, 10, c.dir)
		rec.mu.Lock()
		rec.log = nil
		rec.mu.Unlock()
		info, err := r.LookupConn(t.Context(), c.server)
		if err != nil {
			t.Fatal(err)
		}
		if got := r.Process(t.Context(), info); got.PID != 0 {
			t.Errorf("Process = %+v, want no pid: the client is older than the %d searched", got, maxSearchProcs)
		}
		searched := map[string]bool{}
		for _, op := range rec.ops() {
			if m := procPath.FindStringSubmatch(strings.SplitN(op, " ", 2)[1]); m != nil {
				searched[m[1]] = true
			}
		}
		if len(searched) > maxSearchProcs {
			t.Errorf("searched %d processes, want at most %d", len(searched), maxSearchProcs)
		}
		newest := map[string]bool{}
		for _, p := range crowd[len(crowd)-maxSearchProcs:] {
			newest[strconv.Itoa(p)] = true
		}
		for p := range searched {
			if !newest[p] {
				t.Errorf("searched pid %s, not one of the newest", p)
			}
		}
	})
}

// spawnIdle starts n idle processes (sleep) holding fds open files each
// (stdin, stdout, stderr and fds-3 more), in the cgroup directory cgroup
// ("": this process's), and kills them at the end of the test. It returns
// their pids in the order started. They die by themselves after 10
// minutes, or with this process's thread that started them.
func spawnIdle(t testing.TB, n, fds int, cgroup string) []int {
	t.Helper()
	null, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer null.Close()
	extra := make([]*os.File, max(0, fds-3))
	for i := range extra {
		extra[i] = null
	}
	attr := &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if cgroup != "" {
		cg, err := os.Open(cgroup)
		if err != nil {
			t.Fatal(err)
		}
		defer cg.Close()
		attr.UseCgroupFD, attr.CgroupFD = true, int(cg.Fd())
	}
	var cmds []*exec.Cmd
	t.Cleanup(func() {
		for _, c := range cmds {
			_ = c.Process.Kill()
		}
		for _, c := range cmds {
			_ = c.Wait()
		}
	})
	pids := make([]int, 0, n)
	for range n {
		c := exec.Command("sleep", "600")
		c.ExtraFiles, c.SysProcAttr = extra, attr
		if err := c.Start(); err != nil {
			t.Fatalf("after %d processes: %v", len(cmds), err)
		}
		cmds = append(cmds, c)
		pids = append(pids, c.Process.Pid)
	}
	return pids
}

// TestEBPFCapabilities: a process of another uid than root with only
// CAP_BPF and CAP_NET_ADMIN (what the packaged unit would need) gets
// ModeEBPF; with CAP_NET_ADMIN alone (the packaged unit as it is), or
// without eBPF permitted at all, ModeCgroupProcs and a reason.
func TestEBPFCapabilities(t *testing.T) {
	ebpfResolver(t) // skips unless root may use eBPF here
	bin := copyTestBinary(t)
	for _, tc := range []struct {
		name string
		caps []uintptr
		mode string
		why  string
	}{
		{"CAP_BPF and CAP_NET_ADMIN", []uintptr{39 /* CAP_BPF */, 12 /* CAP_NET_ADMIN */}, ModeEBPF, "ok"},
		{"CAP_NET_ADMIN", []uintptr{12}, ModeCgroupProcs, errBPFNotPermitted.Error()},
		{"none", nil, ModeCgroupProcs, errBPFNotPermitted.Error()},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cmd := exec.Command(bin, "-test.run=^$")
			cmd.Env = []string{modeHelperEnv + "=1"}
			cmd.SysProcAttr = &syscall.SysProcAttr{
				Credential:  &syscall.Credential{Uid: 65534, Gid: 65534},
				AmbientCaps: tc.caps,
			}
			out, err := cmd.CombinedOutput()
			if err != nil {
				t.Fatalf("%v: %s", err, out)
			}
			lines := strings.Split(strings.TrimSpace(string(out)), "\n")
			if len(lines) != 2 || lines[0] != tc.mode || !strings.Contains(lines[1], tc.why) {
				t.Errorf("mode and reason %q, want %s and %q", lines, tc.mode, tc.why)
			}
		})
	}
}

// copyTestBinary copies the test binary where another uid may execute it.
func copyTestBinary(t testing.TB) string {
	t.Helper()
	bin, err := os.MkdirTemp("", "imdsproxy-peer-test-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(bin) })
	if err := os.Chmod(bin, 0o755); err != nil {
		t.Fatal(err)
	}
	exe := filepath.Join(bin, "peer-client")
	src, err := os.ReadFile(ownExe(t))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(exe, src, 0o755); err != nil {
		t.Fatal(err)
	}
	return exe
}
