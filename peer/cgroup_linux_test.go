package peer

import (
	"context"
	"encoding/binary"
	"fmt"
	"maps"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"
	"golang.org/x/sys/unix"
)

func TestParseCgroup2Mount(t *testing.T) {
	const v1 = `25 30 0:23 / /sys type sysfs rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
33 25 0:28 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
34 33 0:29 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:10 - cgroup cgroup rw,xattr,name=systemd
35 33 0:30 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,memory
`
	for _, tc := range []struct{ name, in, mount, root string }{
		{"pure v2", "30 1 0:26 / / rw - ext4 /dev/vda1 rw\n" +
			"35 24 0:30 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot\n",
			"/sys/fs/cgroup", "/"},
		{"hybrid (this VM)", v1 + "40 30 0:37 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n",
			"/sys/fs/cgroup/unified", "/"},
		{"hybrid with optional fields", v1 + "36 33 0:31 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:12 master:3 - cgroup2 cgroup2 rw,nsdelegate\n",
			"/sys/fs/cgroup/unified", "/"},
		{"v1 only", v1, "", ""},
		{"empty", "", "", ""},
		{"escaped mount point", `40 30 0:37 / /run/my\040cgroup\134x rw - cgroup2 none rw` + "\n", `/run/my cgroup\x`, "/"},
		{"bind mount of a subtree listed first", "50 30 0:37 /system.slice /srv/cg rw - cgroup2 cgroup2 rw\n" +
			"40 30 0:37 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n", "/sys/fs/cgroup", "/"},
		{"only a subtree", "50 30 0:37 /system.slice /srv/cg rw - cgroup2 cgroup2 rw\n", "/srv/cg", "/system.slice"},
		{"malformed lines", "garbage\n1 2 - cgroup2\n1 2 3 / /x rw cgroup2\n40 30 0:37 / relative rw - cgroup2 c rw\n", "", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mount, root := parseCgroup2Mount(strings.NewReader(tc.in))
			if mount != tc.mount || root != tc.root {
				t.Errorf("parseCgroup2Mount = %q, %q; want %q, %q", mount, root, tc.mount, tc.root)
			}
		})
	}
}

func TestUnescapeMountinfo(t *testing.T) {
	for in, want := range map[string]string{
		`/plain`:          "/plain",
		`/a\040b`:         "/a b",
		`/tab\011nl\012`:  "/tab\tnl\n",
		`/back\134slash`:  `/back\slash`,
		`/short\04`:       `/short\04`,
		`/notoctal\09x`:   `/notoctal\09x`,
		`/trailing\`:      `/trailing\`,
		`/big\777`:        `/big\777`,
		`/two\040\040end`: "/two  end",
	} {
		if got := unescapeMountinfo(in); got != want {
			t.Errorf("unescapeMountinfo(%q) = %q, want %q", in, got, want)
		}
	}
}

// fakeCgroupfs makes a directory tree standing in for a cgroup2 mount and
// returns its root and the inode (cgroup id) of each directory by path.
func fakeCgroupfs(t *testing.T, dirs ...string) (string, map[string]uint64) {
	t.Helper()
	root := t.TempDir()
	ids := map[string]uint64{}
	for _, d := range append([]string{"/"}, dirs...) {
		p := filepath.Join(root, d)
		if err := os.MkdirAll(p, 0o755); err != nil {
			t.Fatal(err)
		}
		ino, err := inodeOf(p)
		if err != nil {
			t.Fatal(err)
		}
		ids[d] = ino
	}
	// Files are not cgroups.
	if err := os.WriteFile(filepath.Join(root, "system.slice", "cgroup.procs"), []byte("1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	return root, ids
}

// startTestWatcher maps and watches the directory tree at root as if it
// were a cgroup2 mount.
func startTestWatcher(t *testing.T, root string, limits cgroupLimits) (*cgroupMap, *cgroupWatcher) {
	t.Helper()
	m := newCgroupMap(root+"/", "/")
	w, err := startCgroupWatcher(m, zaptest.NewLogger(t), limits)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { w.Close() })
	return m, w
}

func mkdirID(t *testing.T, p string) uint64 {
	t.Helper()
	if err := os.MkdirAll(p, 0o755); err != nil {
		t.Fatal(err)
	}
	id, err := inodeOf(p)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

// TestCgroupWatcher: one walk at start, then every change from inotify
// events: a directory made after the start is found without a walk, within
// the lookup's wait; a removed one stops resolving at once; a path made
// again resolves under its new id only.
func TestCgroupWatcher(t *testing.T) {
	root, ids := fakeCgroupfs(t, "/system.slice/app.service", "/system.slice/app.service/worker",
		"/user.slice/user-1000.slice/session-2.scope", "/init.scope")
	m, _ := startTestWatcher(t, root, defaultCgroupLimits)
	ctx := t.Context()
	for p, id := range ids {
		e, ok := m.lookup(ctx, id, 0)
		if !ok || e.rel != p || e.path != p {
			t.Errorf("lookup(%d) = %+v, %v; want %s", id, e, ok, p)
		}
	}
	if e, _ := m.lookup(ctx, ids["/system.slice/app.service/worker"], 0); unitFromPath(e.path) != "app.service" {
		t.Errorf("unit of %s = %q", e.path, unitFromPath(e.path))
	}
	fileID, err := inodeOf(filepath.Join(root, "system.slice", "cgroup.procs"))
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := m.lookup(ctx, fileID, DefaultMissWait); ok {
		t.Error("a file was mapped as a cgroup")
	}

	t.Run("made after the start", func(t *testing.T) {
		// Nested directories made in a burst, as systemd makes a unit's
		// cgroup and a container runtime its subtree.
		var made []string
		p := filepath.Join(root, "system.slice", "new.service")
		for _, d := range []string{"", "/a", "/a/b", "/a/b/c"} {
			made = append(made, p+d)
		}
		if err := os.MkdirAll(made[len(made)-1], 0o755); err != nil {
			t.Fatal(err)
		}
		for _, d := range made {
			id, err := inodeOf(d)
			if err != nil {
				t.Fatal(err)
			}
			rel := strings.TrimPrefix(d, root)
			if e, ok := m.lookup(ctx, id, time.Second); !ok || e.rel != rel {
				t.Errorf("lookup of %s = %+v, %v", rel, e, ok)
			}
		}
		if n := m.walks.Load(); n != 1 {
			t.Errorf("%d walks, want only the first", n)
		}
	})
	t.Run("removed stops resolving", func(t *testing.T) {
		p := filepath.Join(root, "gone.scope")
		id := mkdirID(t, p)
		if _, ok := m.lookup(ctx, id, time.Second); !ok {
			t.Fatal("not found while it exists")
		}
		if err := os.Remove(p); err != nil {
			t.Fatal(err)
		}
		// Hold the inode number, lest the file system hand it to the
		// directory made again below.
		if err := os.WriteFile(filepath.Join(root, "hold"), nil, 0o644); err != nil {
			t.Fatal(err)
		}
		// A lookup may overtake the watcher for the instant it takes to
		// read the event; not after.
		catchUp(t, m)
		start := time.Now()
		if e, ok := m.lookup(ctx, id, time.Second); ok {
			t.Fatalf("a removed directory still resolves to %+v", e)
		}
		if took := time.Since(start); took > 100*time.Millisecond {
			t.Errorf("the miss took %v; want it answered at once", took)
		}
		if _, st, _, _ := m.state(id); st != cgroupGone {
			t.Errorf("state %v, want gone", st)
		}
		again := mkdirID(t, p)
		if again == id {
			t.Skip("the file system reused the inode number")
		}
		if e, ok := m.lookup(ctx, again, time.Second); !ok || e.rel != "/gone.scope" {
			t.Errorf("made again: lookup = %+v, %v", e, ok)
		}
		if _, ok := m.lookup(ctx, id, 0); ok {
			t.Error("the old id resolves again")
		}
		if n := m.walks.Load(); n != 1 {
			t.Errorf("%d walks, want only the first", n)
		}
	})
	t.Run("moved", func(t *testing.T) {
		// cgroup2 cannot rename; other file systems can.
		from, to := filepath.Join(root, "mv.slice"), filepath.Join(root, "moved.slice")
		child := mkdirID(t, filepath.Join(from, "x.scope"))
		if _, ok := m.lookup(ctx, child, time.Second); !ok {
			t.Fatal("not found")
		}
		if err := os.Rename(from, to); err != nil {
			t.Fatal(err)
		}
		catchUp(t, m)
		if e, ok := m.lookup(ctx, child, time.Second); !ok || e.rel != "/moved.slice/x.scope" {
			t.Errorf("after the move: lookup = %+v, %v", e, ok)
		}
	})
	t.Run("an unknown id is answered without waiting out the bound", func(t *testing.T) {
		start := time.Now()
		if _, ok := m.lookup(ctx, 1<<40, 5*time.Second); ok {
			t.Fatal("found")
		}
		if took := time.Since(start); took > time.Second {
			t.Errorf("took %v", took)
		}
	})
}

// TestCgroupLookupWaitBounded: without the watcher catching up, a miss
// waits at most its bound, or until its context ends.
func TestCgroupLookupWaitBounded(t *testing.T) {
	m := newCgroupMap(t.TempDir(), "/")
	nudges := 0
	m.nudge = func() { nudges++ }
	start := time.Now()
	if _, ok := m.lookup(t.Context(), 42, DefaultMissWait); ok {
		t.Fatal("found")
	}
	if took := time.Since(start); took < DefaultMissWait || took > DefaultMissWait+time.Second {
		t.Errorf("a miss took %v, want about %v", took, DefaultMissWait)
	}
	if nudges != 1 {
		t.Errorf("%d nudges, want 1", nudges)
	}
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	start = time.Now()
	if _, ok := m.lookup(ctx, 42, time.Hour); ok || time.Since(start) > time.Second {
		t.Errorf("with its context ended: ok %v after %v", ok, time.Since(start))
	}
	if _, ok := m.lookup(t.Context(), 42, -1); ok || nudges != 2 {
		t.Errorf("no wait: ok %v, %d nudges (want no nudge)", ok, nudges)
	}
}

// TestCgroupMapReplace: a walk that does not find an id marks it gone.
func TestCgroupMapReplace(t *testing.T) {
	m := newCgroupMap("/x", "/")
	m.set(1, "/")
	m.set(7, "/a.scope")
	m.replace(map[uint64]string{1: "/", 9: "/b.scope"})
	for id, want := range map[uint64]cgroupState{1: cgroupFound, 7: cgroupGone, 9: cgroupFound, 8: cgroupUnknown} {
		if _, st, _, _ := m.state(id); st != want {
			t.Errorf("state(%d) = %v, want %v", id, st, want)
		}
	}
	m.set(7, "/a.scope") // cannot happen on cgroup2; the latest word wins
	if _, st, _, _ := m.state(7); st != cgroupFound {
		t.Errorf("state after set = %v", st)
	}
}

func TestCgroupProcs(t *testing.T) {
	root := t.TempDir()
	dir := filepath.Join(root, "a.scope")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "cgroup.procs"), []byte("1\n42\nx\n-3\n7\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	m := newCgroupMap(root, "/")
	if got := m.procs(osFS{}, "/a.scope", 10); !slices.Equal(got, []int{42, 7, 1}) {
		t.Errorf("procs = %v, want [42 7 1]", got)
	}
	if got := m.procs(osFS{}, "/a.scope", 2); !slices.Equal(got, []int{42, 7}) {
		t.Errorf("procs limited to 2 = %v, want [42 7]", got)
	}
	if got := m.procs(osFS{}, "/missing.scope", 10); got != nil {
		t.Errorf("procs of a missing cgroup = %v", got)
	}
}

// TestCgroupWatcherLimit: beyond its limit the watcher maps the shallowest
// directories (breadth first), says it is incomplete, and keeps what it
// mapped.
func TestCgroupWatcherLimit(t *testing.T) {
	root, _ := fakeCgroupfs(t, "/system.slice/a.service", "/system.slice/b.service",
		"/user.slice/user-1000.slice/user@1000.service/deep.slice/x.scope")
	m, w := startTestWatcher(t, root, cgroupLimits{total: 5, inner: 5, perUnit: 5})
	if n := m.size(); n != 5 {
		t.Fatalf("%d mapped, want 5", n)
	}
	m.mu.RLock()
	for _, p := range m.paths {
		if strings.Count(p, "/") > 2 {
			t.Errorf("reached %s before shallower directories: %v", p, m.paths)
		}
	}
	m.mu.RUnlock()
	w.Close() // complete is the watcher goroutine's
	if w.complete {
		t.Error("a watcher beyond its limit says it is complete")
	}
}

// TestCgroupWatcherDelegatedFlood: a user may make cgroups without bound
// in the subtree delegated to them (user@UID.service), and a service with
// Delegate=yes in its own. Those directories count against their unit's
// share and all units' together, never against the cgroups systemd makes
// for units: a flood below one unit cannot keep a unit started after it
// from being mapped at once, nor take more than its share from the other
// units' subtrees, and what the flood leaves unmapped resolves to nothing
// (its own processes' problem, fail closed).
func TestCgroupWatcherDelegatedFlood(t *testing.T) {
	u1000 := "/user.slice/user-1000.slice/user@1000.service"
	u1001 := "/user.slice/user-1001.slice/user@1001.service"
	root, _ := fakeCgroupfs(t, "/system.slice/a.service", u1000, u1001) // 8 directories
	limits := cgroupLimits{total: 32, inner: 12, perUnit: 8}
	start := time.Now()
	m, _ := startTestWatcher(t, root, limits)
	ctx := t.Context()

	flood := func(unit, prefix string, n int) []uint64 {
		ids := make([]uint64, n)
		for i := range ids {
			ids[i] = mkdirID(t, filepath.Join(root, unit, fmt.Sprintf("%s%d", prefix, i)))
		}
		catchUp(t, m)
		return ids
	}
	mapped := func(ids []uint64) (n int) {
		for _, id := range ids {
			if _, ok := m.lookup(ctx, id, 0); ok {
				n++
			}
		}
		return n
	}

	f := flood(u1000, "f", 40)
	if n := mapped(f); n != limits.perUnit {
		t.Errorf("user 1000's flood of 40: %d mapped, want its share, %d", n, limits.perUnit)
	}
	g := flood(u1001, "g", 10)
	if n := mapped(g); n != limits.inner-limits.perUnit {
		t.Errorf("user 1001's 10: %d mapped, want what is left of the units' share, %d", n, limits.inner-limits.perUnit)
	}
	// What operators see (CgroupStats, the imdsproxy_cgroups_* metrics).
	if n := m.belowUnits.Load(); n != int64(limits.inner) {
		t.Errorf("%d mapped below units reported, want %d", n, limits.inner)
	}
	if n := m.refused[refusedUnitShare].Load(); n != 40-int64(limits.perUnit) {
		t.Errorf("%d refused for a unit's share, want %d", n, 40-limits.perUnit)
	}
	if n := m.refused[refusedUnitsShare].Load(); n != 10-int64(limits.inner-limits.perUnit) {
		t.Errorf("%d refused for the units' share, want %d", n, 10-(limits.inner-limits.perUnit))
	}
	if n := m.refused[refusedLimit].Load(); n != 0 {
		t.Errorf("%d refused for the limit, want none", n)
	}
	for _, unit := range []string{"/system.slice/new.service", "/user.slice/user-1002.slice/session-3.scope"} {
		id := mkdirID(t, filepath.Join(root, unit))
		if e, ok := m.lookup(ctx, id, time.Second); !ok || e.rel != unit {
			t.Errorf("%s, made after the flood: lookup = %+v, %v; want it mapped at once", unit, e, ok)
		}
	}

	// A full share is no reason to walk the tree again and again (each
	// walk lists every directory mapped): the watcher stays complete while
	// the flood stays.
	time.Sleep(time.Until(start.Add(rewalkInterval + 500*time.Millisecond)))
	catchUp(t, m)
	if n := m.walks.Load(); n != 1 {
		t.Errorf("%d walks while the flood stayed, want only the first", n)
	}

	// Removing what was mapped gives the share back: what the full share
	// refused is found by a walk then, which keeps to the shares again.
	for i := range 4 {
		if err := os.Remove(filepath.Join(root, u1000, fmt.Sprintf("f%d", i))); err != nil {
			t.Fatal(err)
		}
	}
	deadline := time.Now().Add(rewalkInterval + 5*time.Second)
	for m.walks.Load() < 2 && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
		catchUp(t, m)
	}
	if n := m.walks.Load(); n != 2 {
		t.Errorf("%d walks after the share had room again, want a second", n)
	}
	checkShares(t, m, limits, u1000, u1001)

	// A walk (at start, after an overflow, periodically when incomplete)
	// keeps to the same shares and maps the units made after the flood.
	m2, _ := startTestWatcher(t, root, limits)
	checkShares(t, m2, limits, u1000, u1001)
	m2.mu.RLock()
	defer m2.mu.RUnlock()
	for _, unit := range []string{"/system.slice/new.service", "/user.slice/user-1002.slice/session-3.scope"} {
		if !slices.Contains(slices.Collect(maps.Values(m2.paths)), unit) {
			t.Errorf("a walk after the flood did not map %s", unit)
		}
	}
}

// checkShares: the directories m maps below the two flooded units fill
// the units' share, each unit at most its own.
func checkShares(t *testing.T, m *cgroupMap, limits cgroupLimits, a, b string) {
	t.Helper()
	m.mu.RLock()
	defer m.mu.RUnlock()
	below := map[string]int{}
	for _, rel := range m.paths {
		if unit, inner := unitDirOf(rel); inner {
			below[unit]++
		}
	}
	if below[a] > limits.perUnit || below[b] > limits.perUnit || below[a]+below[b] != limits.inner {
		t.Errorf("%v mapped below the units, want the shares %+v filled", below, limits)
	}
}

// TestUnitDirOf: the unit directory is the outermost .service or .scope
// component, as for the unit of a cgroup (unitFromPath).
func TestUnitDirOf(t *testing.T) {
	for _, c := range []struct {
		rel, unit string
		inner     bool
	}{
		{"/", "", false},
		{"/system.slice", "", false},
		{"/system.slice/a.service", "/system.slice/a.service", false},
		{"/system.slice/a.service/x", "/system.slice/a.service", true},
		{"/system.slice/a.service/b.service", "/system.slice/a.service", true},
		{"/init.scope", "/init.scope", false},
		{"/init.scope/x/y", "/init.scope", true},
		{"/u.slice/user@1000.service/app.slice/x.scope", "/u.slice/user@1000.service", true},
		{"/.service/x", "", false},
		{"/a.slice/b.slicex.service", "/a.slice/b.slicex.service", false},
	} {
		unit, inner := unitDirOf(c.rel)
		if unit != c.unit || inner != c.inner {
			t.Errorf("unitDirOf(%q) = %q, %v; want %q, %v", c.rel, unit, inner, c.unit, c.inner)
		}
		name := ""
		if unit != "" {
			name = path.Base(unit)
		}
		if want := unitFromPath(c.rel); name != want {
			t.Errorf("unitDirOf(%q) = %q disagrees with unitFromPath, %q", c.rel, unit, want)
		}
	}
}

// TestCgroupWatcherMountRoot: the mount's root inside the hierarchy
// prefixes the paths.
func TestCgroupWatcherMountRoot(t *testing.T) {
	root, ids := fakeCgroupfs(t, "/system.slice", "/init.scope")
	m := newCgroupMap(root, "/outer.slice")
	w, err := startCgroupWatcher(m, zaptest.NewLogger(t), defaultCgroupLimits)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	if e, ok := m.lookup(t.Context(), ids["/init.scope"], 0); !ok || e.rel != "/init.scope" || e.path != "/outer.slice/init.scope" {
		t.Errorf("lookup = %+v, %v", e, ok)
	}
}

// TestCgroupIDIsInode: on cgroup2 a cgroup's id, as the kernel reports it
// in the cgroup's file handle (name_to_handle_at, as in
// INET_DIAG_CGROUP_ID, bpf_get_current_cgroup_id), is its directory's
// inode number.
func TestCgroupIDIsInode(t *testing.T) {
	mount, _, err := locateCgroup2()
	if err != nil || mount == "" {
		t.Skipf("SKIPPED: no cgroup2 file system is mounted (%v)", err)
	}
	dirs := []string{mount}
	if os.Geteuid() == 0 {
		p := filepath.Join(mount, "imdsproxy-peer-test-id-"+strconv.Itoa(os.Getpid()))
		if err := os.Mkdir(p, 0o755); err == nil {
			t.Cleanup(func() { os.Remove(p) })
			dirs = append(dirs, p)
		}
	}
	for _, d := range dirs {
		ino, err := inodeOf(d)
		if err != nil {
			t.Fatal(err)
		}
		h, _, err := unix.NameToHandleAt(unix.AT_FDCWD, d, 0)
		if err != nil {
			t.Skipf("SKIPPED: name_to_handle_at on cgroup2: %v", err)
		}
		if b := h.Bytes(); len(b) != 8 || binary.NativeEndian.Uint64(b) != ino {
			t.Errorf("%s: file handle %x, inode %d", d, b, ino)
		}
	}
}

// TestCgroupCurrent: a mapped cgroup whose directory is gone, or was made
// again (another inode, another cgroup), is not current and is recorded as
// removed at once, before the watcher reads the event.
func TestCgroupCurrent(t *testing.T) {
	root := t.TempDir()
	dir := filepath.Join(root, "a.scope")
	ino := func() uint64 {
		var st unix.Stat_t
		if err := unix.Stat(dir, &st); err != nil {
			t.Fatal(err)
		}
		return st.Ino
	}
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	m := newCgroupMap(root, "/")
	id := ino()
	m.set(id, "/a.scope")
	if !m.current(id, "/a.scope") {
		t.Fatal("an existing cgroup is not current")
	}
	if err := os.Remove(dir); err != nil {
		t.Fatal(err)
	}
	if m.current(id, "/a.scope") {
		t.Error("a removed cgroup is current")
	}
	if _, st, _, _ := m.state(id); st != cgroupGone {
		t.Errorf("state after the check = %v, want gone", st)
	}
	// The same path made again: on cgroup2 a new id; on this test's file
	// system maybe the same inode, which proves nothing, so only checked
	// when it differs.
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if again := ino(); again != id {
		m.set(id, "/a.scope") // as if the watcher had not read the removal
		if m.current(id, "/a.scope") {
			t.Error("a cgroup made again at the same path is current under the old id")
		}
	}
}
