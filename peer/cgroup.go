package peer

import (
	"bufio"
	"context"
	"io"
	"math/bits"
	"os"
	"path"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Limits of the cgroup id map.
const (
	// DefaultMissWait is how long a lookup of a cgroup id the map does not
	// hold waits, at most, for the watcher to report it (see
	// Options.MissWait). The wait ends as soon as the watcher has applied
	// every change made before the lookup began, which takes a wake-up, not
	// a walk.
	DefaultMissWait = 20 * time.Millisecond
	// maxCgroups bounds the map (and the inotify watches): beyond it new
	// cgroups are not mapped, and the tree is walked again in the
	// background from time to time. Of it, the directories below units'
	// own (delegated subtrees: anyone the unit runs as may make them) may
	// take half, and those below one unit maxCgroupsPerUnit (cgroupLimits).
	maxCgroups        = 1 << 16
	maxCgroupsPerUnit = 1 << 12
	// maxDeadIDs bounds the set of ids known to be removed; it is emptied
	// when full (a forgotten id is then a miss, answered after one
	// catch-up of the watcher).
	maxDeadIDs = 4096
	// maxProcsBytes bounds the read of one cgroup.procs file, and so its
	// time (the kernel lists the cgroup's processes as they are read): about
	// 9,000 pids. Of a larger cgroup (a host whose processes all sit in the
	// root) the rest is not searched.
	maxProcsBytes = 64 << 10
	mountinfoPath = "/proc/self/mountinfo"
	// is32bit: a 32-bit kernel's cgroup id carries a generation in its
	// high 32 bits and the inode number in its low 32 bits (assumed from
	// the word size of this program).
	is32bit = bits.UintSize == 32
)

// cgroupLimits bound the directories a cgroup watcher maps and watches.
// The cgroups of units and slices are made by systemd (root), one per unit:
// only total bounds them. Below a unit's own directory anyone the unit runs
// as may make cgroups (a user in user@UID.service, a service with
// Delegate=yes), as many as they like: those count against inner, for all
// units together, and perUnit, for one unit, so that a flood below one
// unit leaves the units started after it mapped at once (no walk needed)
// and takes at most perUnit from the other units' subtrees. What a flood
// leaves unmapped is its own unit's processes' (their lookups miss: unit
// unknown).
type cgroupLimits struct {
	total, inner, perUnit int
}

var defaultCgroupLimits = cgroupLimits{total: maxCgroups, inner: maxCgroups / 2, perUnit: maxCgroupsPerUnit}

// unitDirOf returns the directory of the outermost unit on the path rel
// (as unitFromPath names it), or "", and whether rel is below it.
func unitDirOf(rel string) (unit string, inner bool) {
	for i := 0; i < len(rel); {
		end := strings.IndexByte(rel[i:], '/')
		if end < 0 {
			end = len(rel)
		} else {
			end += i
		}
		if isUnitName(rel[i:end]) {
			return rel[:end], end < len(rel)
		}
		i = end + 1
	}
	return "", false
}

// cgroupEntry is where a cgroup id was found.
type cgroupEntry struct {
	rel  string // directory under the cgroup2 mount point, "/" for its root
	path string // the cgroup's path in the hierarchy (as /proc/<pid>/cgroup's 0:: line)
}

// cgroupState is what the map knows of an id.
type cgroupState int

const (
	cgroupUnknown cgroupState = iota // not (yet) in the map
	cgroupFound
	cgroupGone // seen removed
)

// cgroupMap maps cgroup v2 ids to their directories under the cgroup2
// mount. On cgroup2 a cgroup's id is the inode number of its directory (on
// 64-bit kernels; the low 32 bits on 32-bit ones); ids are never reused
// while the kernel runs, so an id, once removed, never resolves again. The
// map is filled and kept current by a watcher (see startCgroupWatcher);
// lookups only read it, and wait, boundedly, for the watcher to catch up
// with changes made before they began. It is safe for concurrent use.
type cgroupMap struct {
	mount  string // cgroup2 mount point, without a trailing slash
	prefix string // the mount's root inside the hierarchy, "/" unless a namespace or bind mount

	mu    sync.RWMutex
	paths map[uint64]string   // id -> rel
	dead  map[uint64]struct{} // ids of cgroups seen removed
	// caughtUp: every change of the tree made before it is in paths. Its
	// monotonic reading is what counts.
	caughtUp time.Time
	changed  chan struct{} // closed, and replaced, whenever paths or caughtUp change

	// nudge asks the watcher to catch up now; nil without a watcher.
	nudge func()
	// walks counts full walks of the tree (the first one included).
	walks atomic.Int64
	// Kept by the watcher for CgroupStats: directories mapped below units'
	// own, and directories not mapped, by reason.
	belowUnits atomic.Int64
	refused    [numRefusals]atomic.Int64
}

// Reasons a watcher did not map a directory (cgroupLimits).
const (
	refusedLimit      = iota // total
	refusedUnitShare         // perUnit
	refusedUnitsShare        // inner
	numRefusals
)

func newCgroupMap(mount, root string) *cgroupMap {
	return &cgroupMap{
		mount:   strings.TrimSuffix(mount, "/"),
		prefix:  path.Clean("/" + root),
		paths:   make(map[uint64]string),
		dead:    make(map[uint64]struct{}),
		changed: make(chan struct{}),
	}
}

// locateCgroup2 finds the cgroup2 mount in /proc/self/mountinfo: mount ""
// when there is none.
func locateCgroup2() (mount, root string, err error) {
	f, err := os.Open(mountinfoPath)
	if err != nil {
		return "", "", err
	}
	defer f.Close()
	mount, root = parseCgroup2Mount(f)
	return mount, root, nil
}

// lookup returns where the cgroup with the given id is, from the map. When
// the map holds neither it nor its removal, lookup asks the watcher to
// catch up and waits until the watcher has applied every change made
// before the lookup began (then the answer is final), for at most wait, or
// until ctx ends. ok is false when the cgroup is gone, unknown in time, or
// outside the mount.
func (m *cgroupMap) lookup(ctx context.Context, id uint64, wait time.Duration) (e cgroupEntry, ok bool) {
	rel, st, _, _ := m.state(id)
	if st != cgroupUnknown || wait <= 0 || m.nudge == nil {
		return m.entry(rel), st == cgroupFound
	}
	start := time.Now()
	t := time.NewTimer(wait)
	defer t.Stop()
	m.nudge()
	for {
		rel, st, caughtUp, changed := m.state(id)
		if st != cgroupUnknown || caughtUp.After(start) {
			return m.entry(rel), st == cgroupFound
		}
		select {
		case <-changed:
		case <-t.C:
			return cgroupEntry{}, false
		case <-ctx.Done():
			return cgroupEntry{}, false
		}
	}
}

// state is what the map knows of id, when the watcher last caught up, and
// the channel closed at its next change.
func (m *cgroupMap) state(id uint64) (rel string, st cgroupState, caughtUp time.Time, changed <-chan struct{}) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	rel, ok := m.paths[id]
	if !ok && is32bit {
		rel, ok = m.paths[id&0xffffffff]
	}
	if ok {
		return rel, cgroupFound, m.caughtUp, m.changed
	}
	if _, dead := m.dead[id]; dead {
		st = cgroupGone
	}
	return "", st, m.caughtUp, m.changed
}

func (m *cgroupMap) entry(rel string) cgroupEntry {
	if rel == "" {
		return cgroupEntry{}
	}
	return cgroupEntry{rel: rel, path: path.Join(m.prefix, rel)}
}

// set records that the cgroup id is the directory rel. Callers hold no
// lock; the change is published by the next publish.
func (m *cgroupMap) set(id uint64, rel string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.paths[id] = rel
	delete(m.dead, id)
}

// remove records that the cgroup id was removed.
func (m *cgroupMap) remove(id uint64) {
	m.mu.Lock()
	defer m.mu.Unlock()
	delete(m.paths, id)
	m.markDeadLocked(id)
}

func (m *cgroupMap) markDeadLocked(id uint64) {
	if len(m.dead) >= maxDeadIDs {
		clear(m.dead)
	}
	m.dead[id] = struct{}{}
}

// replace swaps in the map of a complete walk: every id it lacks is gone.
func (m *cgroupMap) replace(paths map[uint64]string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for id := range m.paths {
		if _, ok := paths[id]; !ok {
			m.markDeadLocked(id)
		}
	}
	for id := range paths {
		delete(m.dead, id)
	}
	m.paths = paths
}

// publish records that every change made before t is applied, and wakes
// the lookups waiting for it.
func (m *cgroupMap) publish(t time.Time) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if t.After(m.caughtUp) {
		m.caughtUp = t
	}
	close(m.changed)
	m.changed = make(chan struct{})
}

// size is the number of cgroups mapped.
func (m *cgroupMap) size() int {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return len(m.paths)
}

// procs returns up to limit pids of the cgroup whose directory is rel,
// newest (highest) first, read through fsys; nil when they cannot be read.
func (m *cgroupMap) procs(fsys fileSystem, rel string, limit int) []int {
	data, err := fsys.ReadFile(m.mount+path.Clean("/"+rel)+"/cgroup.procs", maxProcsBytes)
	if err != nil {
		return nil
	}
	var pids []int
	for line := range strings.SplitSeq(string(data), "\n") {
		if pid, err := strconv.Atoi(line); err == nil && pid > 0 {
			pids = append(pids, pid)
		}
	}
	slices.Sort(pids)
	slices.Reverse(pids)
	if len(pids) > limit {
		pids = pids[:limit]
	}
	return pids
}

// parseCgroup2Mount returns the mount point and root of the first cgroup2
// mount listed in a mountinfo file (proc(5)) whose root is the hierarchy's
// root, else of the first cgroup2 mount, else "", "".
func parseCgroup2Mount(r io.Reader) (mount, root string) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 4096), 1<<20)
	for sc.Scan() {
		// 36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw
		f := strings.Fields(sc.Text())
		sep := slices.Index(f, "-")
		if sep < 6 || sep+1 >= len(f) || f[sep+1] != "cgroup2" {
			continue
		}
		mp, rt := unescapeMountinfo(f[4]), unescapeMountinfo(f[3])
		if !strings.HasPrefix(mp, "/") {
			continue
		}
		if rt == "/" {
			return mp, rt
		}
		if mount == "" {
			mount, root = mp, rt
		}
	}
	return mount, root
}

// unescapeMountinfo undoes the octal escapes (\040 for a space, \011, \012,
// \134) of a mountinfo path.
func unescapeMountinfo(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// fileSystem is the file access of Process (the /proc and cgroup.procs
// reads of the pid search); tests record it.
type fileSystem interface {
	// ReadFile reads at most max bytes of the file.
	ReadFile(name string, max int) ([]byte, error)
	// ReadDirNames lists at most max names of the directory.
	ReadDirNames(name string, max int) ([]string, error)
	// Readlink returns the target of the symbolic link.
	Readlink(name string) (string, error)
}

// osFS is the real fileSystem.
type osFS struct{}

func (osFS) ReadFile(name string, max int) ([]byte, error) { return readFile(name, max) }

func (osFS) ReadDirNames(name string, max int) ([]string, error) {
	d, err := os.Open(name)
	if err != nil {
		return nil, err
	}
	defer d.Close()
	names, err := d.Readdirnames(max)
	if err == io.EOF {
		err = nil
	}
	return names, err
}

func (osFS) Readlink(name string) (string, error) { return os.Readlink(name) }
