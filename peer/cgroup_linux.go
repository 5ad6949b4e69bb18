package peer

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"
	"strings"
	"sync"
	"time"
	"unsafe"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

const (
	// watchMask: the changes of a cgroup directory that matter. Cgroups
	// are made and removed only by mkdir(2) and rmdir(2) (cgroup2 has no
	// rename), whose inotify events the VFS queues before the call
	// returns: a cgroup exists, and its IN_CREATE is queued, before any
	// process can run, or make a socket, in it.
	watchMask = unix.IN_CREATE | unix.IN_DELETE | unix.IN_MOVED_FROM | unix.IN_MOVED_TO |
		unix.IN_ONLYDIR | unix.IN_DONT_FOLLOW
	// rewalkInterval is the least time between the background walks of a
	// watcher that cannot watch every directory (the inotify watch limit,
	// maxCgroups); it grows to walkDutyCycle times the last walk.
	rewalkInterval = 2 * time.Second
	walkDutyCycle  = 10
	// sizeofInotifyEvent is struct inotify_event without its name.
	sizeofInotifyEvent = int(unsafe.Sizeof(unix.InotifyEvent{}))
)

// cgroupWatcher keeps a cgroupMap current from inotify events on every
// directory of the cgroup2 tree. One goroutine owns it; lookups talk to it
// only through the map and an eventfd (nudge).
type cgroupWatcher struct {
	m      *cgroupMap
	log    *zap.Logger
	limits cgroupLimits

	ifd  int      // inotify, non-blocking
	efd  int      // eventfd: a nudge or Close
	wake *os.File // efd, written by nudge (safe after close)
	done chan struct{}

	closeOnce sync.Once
	closing   chan struct{}

	// Owned by the watcher goroutine (and by startCgroupWatcher before it).
	wds     map[int32]string  // watch descriptor -> rel
	ids     map[string]uint64 // rel -> id
	inner   int               // of ids, directories below a unit's own (cgroupLimits)
	perUnit map[string]int    // unit directory -> directories of ids below it
	// Shares that refused a directory since the last walk: the tree needs
	// walking again only once one of them has room again (forget), not
	// while the flood that filled it stays.
	fullUnits map[string]bool
	innerFull bool
	complete  bool // every directory is mapped and watched
	walkedAt  time.Time
	walkTook  time.Duration
	warned    map[string]bool // messages of incomplete already logged
	buf       []byte
}

// startCgroupWatcher maps the cgroup2 tree of m (one walk, watching each
// directory before listing it, so that no cgroup made meanwhile is
// missed) and keeps m current in the background until Close. Without
// inotify (no instance left: fs.inotify.max_user_instances) it walks the
// tree in the background instead, periodically and when a lookup misses,
// at most once per rewalkInterval.
func startCgroupWatcher(m *cgroupMap, log *zap.Logger, limits cgroupLimits) (*cgroupWatcher, error) {
	efd, err := unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("peer: eventfd: %w", err)
	}
	wakeFD, err := unix.Dup(efd)
	if err != nil {
		unix.Close(efd)
		return nil, fmt.Errorf("peer: eventfd: %w", err)
	}
	unix.CloseOnExec(wakeFD)
	w := &cgroupWatcher{
		m: m, log: log, limits: limits, ifd: -1, efd: efd,
		wake:      os.NewFile(uintptr(wakeFD), "peer-cgroup-nudge"),
		done:      make(chan struct{}),
		closing:   make(chan struct{}),
		wds:       make(map[int32]string),
		ids:       make(map[string]uint64),
		perUnit:   make(map[string]int),
		fullUnits: make(map[string]bool),
		warned:    make(map[string]bool),
		buf:       make([]byte, 64<<10),
	}
	if w.ifd, err = unix.InotifyInit1(unix.IN_NONBLOCK | unix.IN_CLOEXEC); err != nil {
		w.ifd = -1
		log.Warn("cgroup watcher: no inotify; new cgroups are found by background walks", zap.Error(err))
	}
	start := time.Now()
	w.walk()
	m.publish(start)
	m.nudge = w.nudge
	go w.run()
	return w, nil
}

// nudge asks the watcher to catch up now.
func (w *cgroupWatcher) nudge() {
	var one [8]byte
	binary.NativeEndian.PutUint64(one[:], 1)
	_, _ = w.wake.Write(one[:]) // EAGAIN: the counter is full, a wake-up is pending anyway
}

// Close stops the watcher and waits for it.
func (w *cgroupWatcher) Close() error {
	w.closeOnce.Do(func() {
		close(w.closing)
		w.nudge()
		<-w.done
		w.wake.Close()
	})
	return nil
}

func (w *cgroupWatcher) run() {
	defer close(w.done)
	defer unix.Close(w.efd)
	fds := []unix.PollFd{{Fd: int32(w.efd), Events: unix.POLLIN}}
	if w.ifd >= 0 {
		defer unix.Close(w.ifd)
		fds = append(fds, unix.PollFd{Fd: int32(w.ifd), Events: unix.POLLIN})
	}
	for {
		timeout := -1
		if !w.complete {
			timeout = int(max(0, time.Until(w.nextWalk())/time.Millisecond)) + 1
		}
		if _, err := unix.Poll(fds, timeout); err != nil && !errors.Is(err, unix.EINTR) {
			w.log.Error("cgroup watcher: poll failed; cgroups made from now on are not mapped", zap.Error(err))
			<-w.closing
			return
		}
		select {
		case <-w.closing:
			return
		default:
		}
		var cnt [8]byte
		_, _ = unix.Read(w.efd, cnt[:])
		// Every event queued before now is read by drain, which reads
		// until the queue is empty.
		now := time.Now()
		overflow := w.drain()
		switch {
		case overflow:
			w.log.Warn("cgroup watcher: inotify queue overflowed; walking the cgroup tree again")
			w.walk()
		case !w.complete && !time.Now().Before(w.nextWalk()):
			// Periodically, or for a lookup that missed (it nudged), once
			// the interval is over: a cgroup in a directory that is not
			// watched is found only so.
			w.walk()
		}
		w.m.publish(now)
	}
}

// nextWalk is when an incomplete watcher walks the tree again.
func (w *cgroupWatcher) nextWalk() time.Time {
	return w.walkedAt.Add(max(rewalkInterval, walkDutyCycle*w.walkTook))
}

// drain reads and applies every queued event; it reports an overflow of
// the queue (events were lost).
func (w *cgroupWatcher) drain() (overflow bool) {
	if w.ifd < 0 {
		return false
	}
	for {
		n, err := unix.Read(w.ifd, w.buf)
		if err != nil {
			if !errors.Is(err, unix.EAGAIN) && !errors.Is(err, unix.EINTR) {
				w.log.Warn("cgroup watcher: read failed", zap.Error(err))
				return true
			}
			if errors.Is(err, unix.EINTR) {
				continue
			}
			return overflow
		}
		for b := w.buf[:n]; len(b) >= sizeofInotifyEvent; {
			ev := (*unix.InotifyEvent)(unsafe.Pointer(&b[0]))
			size := sizeofInotifyEvent + int(ev.Len)
			if size > len(b) {
				break
			}
			name := cString(b[sizeofInotifyEvent:size])
			b = b[size:]
			switch {
			case ev.Mask&unix.IN_Q_OVERFLOW != 0:
				overflow = true
			case ev.Mask&unix.IN_IGNORED != 0:
				delete(w.wds, ev.Wd)
			case ev.Mask&unix.IN_ISDIR == 0 || name == "":
			default:
				parent, ok := w.wds[ev.Wd]
				if !ok {
					continue
				}
				rel := path.Join(parent, name)
				switch {
				case ev.Mask&(unix.IN_CREATE|unix.IN_MOVED_TO) != 0:
					w.add(rel)
				case ev.Mask&unix.IN_MOVED_FROM != 0:
					w.removed(rel, true)
				default:
					// rmdir(2) removes only an empty directory: whatever
					// was below rel had its own IN_DELETE before.
					w.removed(rel, false)
				}
			}
		}
	}
}

// cString is b up to its first NUL.
func cString(b []byte) string {
	for i, c := range b {
		if c == 0 {
			return string(b[:i])
		}
	}
	return string(b)
}

// add maps and watches the directory rel and everything below it
// (breadth first): each directory is watched before it is listed.
func (w *cgroupWatcher) add(rel string) {
	queue := []string{rel}
	for len(queue) > 0 {
		rel, queue = queue[0], queue[1:]
		subs, ok := w.watch(rel)
		if !ok {
			continue
		}
		for _, s := range subs {
			queue = append(queue, path.Join(rel, s))
		}
	}
}

// watch watches, maps and lists the directory rel; ok is false when it is
// gone or not mapped (the limit).
func (w *cgroupWatcher) watch(rel string) (subdirs []string, ok bool) {
	_, known := w.ids[rel]
	unit, inner := unitDirOf(rel)
	switch {
	case known:
	case len(w.ids) >= w.limits.total:
		w.m.refused[refusedLimit].Add(1)
		w.incomplete("cgroup watcher: more cgroups than the limit; the rest are found by periodic walks", nil, rel)
		return nil, false
	case inner && w.perUnit[unit] >= w.limits.perUnit:
		w.fullUnits[unit] = true
		w.m.refused[refusedUnitShare].Add(1)
		w.warnOnce("cgroup watcher: more cgroups below a unit than its share; the rest of them resolve to no unit", nil, rel)
		return nil, false
	case inner && w.inner >= w.limits.inner:
		w.innerFull = true
		w.m.refused[refusedUnitsShare].Add(1)
		w.warnOnce("cgroup watcher: more cgroups below units than their share; the rest of them resolve to no unit", nil, rel)
		return nil, false
	}
	dir := w.m.mount + rel
	wd, err := -1, error(unix.EBADF)
	if w.ifd >= 0 {
		wd, err = unix.InotifyAddWatch(w.ifd, dir, watchMask)
	}
	switch {
	case errors.Is(err, unix.ENOENT), errors.Is(err, unix.ENOTDIR):
		return nil, false
	case w.ifd < 0:
		w.complete = false // logged at start
	case err != nil:
		// ENOSPC: fs.inotify.max_user_watches; mapped anyway, and walked
		// again later.
		w.incomplete("cgroup watcher: cannot watch a cgroup directory; raise fs.inotify.max_user_watches", err, rel)
	default:
		w.wds[int32(wd)] = rel
	}
	var st unix.Stat_t
	if err := unix.Lstat(dir, &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFDIR {
		return nil, false
	}
	if old, ok := w.ids[rel]; ok && old != st.Ino {
		w.m.remove(old) // re-created with a new id
	}
	w.ids[rel] = st.Ino
	if !known && inner {
		w.inner++
		w.perUnit[unit]++
		w.m.belowUnits.Store(int64(w.inner))
	}
	w.m.set(st.Ino, rel)
	d, err := os.Open(dir)
	if err != nil {
		if !errors.Is(err, fs.ErrNotExist) {
			w.incomplete("cgroup watcher: cannot list a cgroup directory", err, rel)
		}
		return nil, true
	}
	defer d.Close()
	ents, err := d.ReadDir(-1)
	if err != nil {
		w.incomplete("cgroup watcher: cannot list a cgroup directory", err, rel)
	}
	for _, e := range ents {
		if e.IsDir() {
			subdirs = append(subdirs, e.Name())
		}
	}
	return subdirs, true
}

// removed forgets the directory rel, and with subtree everything mapped
// below it (a directory moved away: cgroup2 cannot rename, other file
// systems can), unless rel is still there with the same id (an event older
// than a re-creation already seen).
func (w *cgroupWatcher) removed(rel string, subtree bool) {
	id, ok := w.ids[rel]
	if !ok {
		return
	}
	var st unix.Stat_t
	if unix.Lstat(w.m.mount+rel, &st) == nil && st.Ino == id {
		return
	}
	w.forget(rel, id)
	if !subtree {
		return
	}
	prefix := rel + "/"
	for r, id := range w.ids {
		if strings.HasPrefix(r, prefix) {
			w.forget(r, id)
		}
	}
}

// forget unmaps the directory rel, whose id was id, and gives its place
// back to its unit's share.
func (w *cgroupWatcher) forget(rel string, id uint64) {
	delete(w.ids, rel)
	w.m.remove(id)
	if unit, inner := unitDirOf(rel); inner {
		w.inner--
		w.m.belowUnits.Store(int64(w.inner))
		if w.perUnit[unit]--; w.perUnit[unit] <= 0 {
			delete(w.perUnit, unit)
		}
		if w.innerFull || w.fullUnits[unit] {
			// What the full share refused is found by the next walk.
			w.complete = false
		}
	}
}

// walk maps the whole tree again (at start, after an overflow, and
// periodically when not every directory could be watched); every id it
// does not find is gone.
func (w *cgroupWatcher) walk() {
	w.walkedAt = time.Now()
	w.complete = true
	old := w.ids
	w.ids = make(map[string]uint64, len(old))
	w.inner, w.innerFull = 0, false
	clear(w.perUnit)
	clear(w.fullUnits)
	w.add("/")
	w.m.belowUnits.Store(int64(w.inner))
	paths := make(map[uint64]string, len(w.ids))
	for rel, id := range w.ids {
		paths[id] = rel
	}
	w.m.replace(paths)
	w.m.walks.Add(1)
	w.walkTook = time.Since(w.walkedAt)
}

// incomplete records that a directory is not watched or not listed, so
// that the tree is walked again later; it logs each kind of trouble once.
func (w *cgroupWatcher) incomplete(msg string, err error, rel string) {
	w.warnOnce(msg, err, rel)
	w.complete = false
}

// warnOnce logs each kind of trouble once.
func (w *cgroupWatcher) warnOnce(msg string, err error, rel string) {
	if !w.warned[msg] {
		w.warned[msg] = true
		w.log.Warn(msg, zap.String("cgroup", rel), zap.Error(err))
	}
}

// current reports whether the cgroup id is still the directory rel, with
// one stat of it: the watcher learns of a removal a moment after rmdir
// (when it reads the event), and in that moment the map still holds the
// id. A cgroup found gone here is recorded as removed at once, so no
// lookup after rmdir returns returns the removed cgroup's unit.
func (m *cgroupMap) current(id uint64, rel string) bool {
	var st unix.Stat_t
	if err := unix.Stat(m.mount+rel, &st); err != nil {
		if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENOTDIR) {
			m.remove(id)
			return false
		}
		return true // cannot tell (EACCES, say): the watcher's word stands
	}
	if st.Ino == id || is32bit && st.Ino&0xffffffff == id&0xffffffff {
		return true
	}
	m.remove(id) // the path was made again: another cgroup, another id
	return false
}
