package peer

import (
	"bufio"
	"context"
	"errors"
	"io"
	"io/fs"
	"math/bits"
	"os"
	"path"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Limits of the cgroup id map.
const (
	// DefaultCgroupWalkInterval is the least time between two walks of the
	// cgroup2 tree: a lookup of an unknown id waits (within its context)
	// for the next walk rather than walking at once, so a flood of
	// connections from new or removed cgroups costs at most one walk per
	// interval. The interval grows to walkDutyCycle times the last walk's
	// duration, so walks of a huge tree take at most a tenth of a CPU.
	DefaultCgroupWalkInterval = 50 * time.Millisecond
	walkDutyCycle             = 10
	// maxCgroups bounds a walk, breadth first (shallow cgroups, where
	// system units are, first), and half the map.
	maxCgroups = 1 << 15
	// maxDeadIDs bounds the set of ids known to be gone; it is emptied
	// when full.
	maxDeadIDs = 4096
	// maxProcsBytes bounds the read of one cgroup.procs file (about 100k
	// pids).
	maxProcsBytes = 1 << 20
	mountinfoPath = "/proc/self/mountinfo"
	// is32bit: a 32-bit kernel's cgroup id carries a generation in its
	// high 32 bits and the inode number in its low 32 bits (assumed from
	// the word size of this program).
	is32bit = bits.UintSize == 32
)

// cgroupEntry is where a cgroup id was found.
type cgroupEntry struct {
	rel  string // directory under the cgroup2 mount point, "/" for its root
	path string // the cgroup's path in the hierarchy (as /proc/<pid>/cgroup's 0:: line)
}

// cgroupMap maps cgroup v2 ids to paths by walking the cgroup2 file
// system, where a cgroup's id is the inode number of its directory (on
// 64-bit kernels; the low 32 bits on 32-bit ones). Ids are never reused
// while the kernel runs, so a mapping, once found, stays true: a complete
// walk replaces the map only to forget removed cgroups, and one cut short
// at the limit keeps what earlier walks found. An id that a complete walk,
// begun after the socket existed, did not find is remembered as gone. It is
// safe for concurrent use; walks are serialised and rate limited.
type cgroupMap struct {
	// locate returns the cgroup2 mount point and the mount's root inside
	// the hierarchy ("/" unless mounted from a cgroup namespace or a bind
	// mount); mount "" means there is no cgroup2 file system.
	locate   func() (mount, root string, err error)
	interval time.Duration
	limit    int // most cgroups walked (maxCgroups); the map holds up to twice as many

	once   sync.Once
	mount  string
	prefix string

	mu    sync.RWMutex
	paths map[uint64]string // id -> rel, as of the last walk
	dead  map[uint64]bool   // ids a walk that began after they were asked for did not find

	walkTok  chan struct{} // a token held by the walker
	walkedAt time.Time     // start of the last walk; guarded by walkTok
	walkTook time.Duration // duration of the last walk; guarded by walkTok
	complete bool          // the last walk saw every cgroup; guarded by walkTok
	walks    int           // number of walks; guarded by walkTok
}

// newCgroupMap returns a map that finds the cgroup2 mount with locate on
// first use and walks it at most once per interval.
func newCgroupMap(locate func() (string, string, error), interval time.Duration) *cgroupMap {
	return &cgroupMap{locate: locate, interval: interval, limit: maxCgroups, walkTok: make(chan struct{}, 1)}
}

// locateCgroup2 finds the cgroup2 mount in /proc/self/mountinfo.
func locateCgroup2() (mount, root string, err error) {
	f, err := os.Open(mountinfoPath)
	if err != nil {
		return "", "", err
	}
	defer f.Close()
	mount, root = parseCgroup2Mount(f)
	return mount, root, nil
}

func (m *cgroupMap) init() {
	mount, root, err := m.locate()
	if err != nil || mount == "" {
		return
	}
	m.mount = strings.TrimSuffix(mount, "/")
	m.prefix = path.Clean("/" + root)
}

// available reports whether a cgroup2 file system was found.
func (m *cgroupMap) available() bool {
	m.once.Do(m.init)
	return m.mount != ""
}

// lookup returns where the cgroup with the given id is. On a miss it walks
// the tree again, or waits within ctx for the next walk allowed by the
// interval; ok is false when the cgroup is gone (or was created and removed
// between walks), when ctx ends first, or when there is no cgroup2 mount.
func (m *cgroupMap) lookup(ctx context.Context, id uint64) (e cgroupEntry, ok bool) {
	if !m.available() {
		return cgroupEntry{}, false
	}
	start := time.Now()
	if rel, found, dead := m.cached(id); found || dead {
		return m.entry(rel), found
	}
	select {
	case m.walkTok <- struct{}{}:
	case <-ctx.Done():
		return cgroupEntry{}, false
	}
	defer func() { <-m.walkTok }()
	if rel, found, dead := m.cached(id); found || dead {
		return m.entry(rel), found
	}
	if !m.walkedAt.Before(start) {
		// A walk began after this lookup did, and so after the socket's
		// cgroup was made, and did not find it: it is gone (if the walk
		// saw everything).
		if m.complete {
			m.markDead(id)
		}
		return cgroupEntry{}, false
	}
	if wait := time.Until(m.walkedAt.Add(max(m.interval, walkDutyCycle*m.walkTook))); wait > 0 {
		if dl, ok := ctx.Deadline(); ok && wait > time.Until(dl)/2 {
			// Waiting would use up most of the lookup's budget, which
			// the /proc fallback needs: a miss now.
			return cgroupEntry{}, false
		}
		t := time.NewTimer(wait)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return cgroupEntry{}, false
		}
	}
	m.walkedAt = time.Now()
	m.walks++
	paths, complete := walkCgroups(ctx, m.mount, m.limit)
	m.walkTook, m.complete = time.Since(m.walkedAt), complete
	m.mu.Lock()
	if !complete {
		// Ids are never reused: what an earlier walk found and this one
		// did not reach is still true. Keep up to as many again.
		for id, rel := range m.paths {
			if len(paths) >= 2*m.limit {
				break
			}
			if _, ok := paths[id]; !ok {
				paths[id] = rel
			}
		}
	}
	m.paths = paths
	m.mu.Unlock()
	rel, found, _ := m.cached(id)
	if !found {
		if complete {
			m.markDead(id)
		}
		return cgroupEntry{}, false
	}
	return m.entry(rel), true
}

func (m *cgroupMap) entry(rel string) cgroupEntry {
	if rel == "" {
		return cgroupEntry{}
	}
	return cgroupEntry{rel: rel, path: path.Join(m.prefix, rel)}
}

func (m *cgroupMap) cached(id uint64) (rel string, found, dead bool) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	if rel, ok := m.paths[id]; ok {
		return rel, true, false
	}
	if rel, ok := m.paths[id&0xffffffff]; ok && is32bit {
		return rel, true, false
	}
	return "", false, m.dead[id]
}

func (m *cgroupMap) markDead(id uint64) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.dead == nil || len(m.dead) >= maxDeadIDs {
		m.dead = make(map[uint64]bool)
	}
	m.dead[id] = true
}

// procs returns the pids in the cgroup whose directory is rel, newest
// (highest) first, or nil when they cannot be read.
func (m *cgroupMap) procs(rel string) []int {
	if !m.available() {
		return nil
	}
	f, err := os.Open(m.mount + path.Clean("/"+rel) + "/cgroup.procs")
	if err != nil {
		return nil
	}
	defer f.Close()
	var pids []int
	sc := bufio.NewScanner(io.LimitReader(f, maxProcsBytes))
	for sc.Scan() {
		if pid, err := strconv.Atoi(sc.Text()); err == nil && pid > 0 {
			pids = append(pids, pid)
		}
	}
	slices.Sort(pids)
	slices.Reverse(pids)
	return pids
}

// walkCgroups maps the inode number of the directories under mount to
// their paths relative to mount ("/" for mount itself), breadth first, at
// most limit of them. complete is true only when the walk saw every
// directory: it is false when it stopped at the limit or because ctx ended,
// dropped a directory, or could not read one (EMFILE, a directory it may
// not read). Directories that vanish during the walk are skipped and do not
// make it incomplete.
func walkCgroups(ctx context.Context, mount string, limit int) (paths map[uint64]string, complete bool) {
	paths = make(map[uint64]string)
	queue := []string{"/"}
	complete = true
	for len(queue) > 0 {
		if len(paths) >= limit || len(paths)%256 == 255 && ctx.Err() != nil {
			return paths, false
		}
		rel := queue[0]
		queue = queue[1:]
		dir := mount + rel
		ino, err := inodeOf(dir)
		if err != nil {
			complete = complete && errors.Is(err, fs.ErrNotExist)
			continue
		}
		paths[ino] = rel
		d, err := os.Open(dir)
		if err != nil {
			complete = complete && errors.Is(err, fs.ErrNotExist)
			continue
		}
		ents, err := d.ReadDir(limit) // a directory of more than limit entries: the rest is not walked
		d.Close()
		if err != nil && !errors.Is(err, io.EOF) {
			complete = complete && errors.Is(err, fs.ErrNotExist)
		}
		if len(ents) == limit {
			complete = false
		}
		for _, e := range ents {
			if !e.IsDir() {
				continue
			}
			if len(queue) >= limit {
				complete = false
				break
			}
			queue = append(queue, path.Join(rel, e.Name()))
		}
	}
	return paths, complete
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
