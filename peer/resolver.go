package peer

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"runtime"
	"sync"
	"syscall"
	"time"

	"go.uber.org/zap"
)

// BPFPolicy says whether a Resolver may use eBPF to find pids (ModeEBPF).
type BPFPolicy int

const (
	// BPFAuto (the zero value) uses eBPF when the process has the
	// capabilities for it (CAP_BPF and CAP_NET_ADMIN, or CAP_SYS_ADMIN)
	// and the kernel supports it, and falls back to ModeCgroupProcs
	// otherwise. It never fails NewResolver.
	BPFAuto BPFPolicy = iota
	// BPFOff never loads a program: ModeCgroupProcs.
	BPFOff
	// BPFRequired makes NewResolver fail when eBPF cannot be used.
	BPFRequired
)

// Options configure a Resolver. The zero value is the default.
type Options struct {
	// BPF says whether pids may be found with eBPF; see BPFPolicy.
	BPF BPFPolicy
	// MissWait bounds how long a lookup waits for the cgroup watcher when
	// the kernel names a cgroup the map does not hold (a cgroup made an
	// instant ago): the wait ends as soon as the watcher has applied every
	// change made before the lookup began. Zero means DefaultMissWait; a
	// negative value, no wait (a miss is UnitUnknown at once).
	MissWait time.Duration
	// Log receives what the Resolver has to say of itself (the mode chosen
	// and why, trouble of the cgroup watcher); nil logs nothing.
	Log *zap.Logger
}

// Resolver identifies the processes behind connections. Make it with
// NewResolver and Close it when done. It is safe for concurrent use.
//
// It keeps a map of the cgroup2 tree current in the background (one walk
// when made, then inotify), and in ModeEBPF a table of socket creators in
// the kernel; lookups read both and never walk or scan.
type Resolver struct {
	missWait time.Duration
	proc     string     // mount point of procfs
	fs       fileSystem // file access of Process
	cgroups  *cgroupMap // nil: socket cgroups are not mapped (no cgroup2 mount)
	watcher  *cgroupWatcher
	bpf      *bpfSockets // nil: not ModeEBPF
	allFDs   bool        // may read every process's fds (see canReadAllFDs)
	euid     int         // whose fds are readable without it
	mode     string
	procs    procCache // ModeEBPF: the start time and exe of recent socket creators
	users    *Users    // the users of subordinate uids (UserOf)

	closeOnce sync.Once
	closeErr  error
	cleanup   runtime.Cleanup
}

// resolverEnv is what a Resolver takes from its host; tests replace it.
type resolverEnv struct {
	proc string
	fs   fileSystem
	// subuid and passwd are the files of Users ("": the host's).
	subuid, passwd string
	locate         func() (mount, root string, err error) // the cgroup2 mount; "" when none
	allFDs         bool
	euid           int
}

func hostEnv() resolverEnv {
	return resolverEnv{proc: "/proc", fs: osFS{}, locate: locateCgroup2, allFDs: canReadAllFDs(), euid: os.Geteuid()}
}

// NewResolver makes a Resolver: it finds the cgroup2 mount, maps it (one
// walk) and starts watching it, and, as opts.BPF allows, loads and
// attaches the eBPF socket table. It fails only when opts.BPF is
// BPFRequired and eBPF cannot be used, or when the process is out of file
// descriptors.
func NewResolver(opts Options) (*Resolver, error) {
	return newResolver(opts, hostEnv())
}

func newResolver(opts Options, env resolverEnv) (*Resolver, error) {
	log := opts.Log
	if log == nil {
		log = zap.NewNop()
	}
	r := &Resolver{missWait: opts.MissWait, proc: env.proc, fs: env.fs, allFDs: env.allFDs, euid: env.euid,
		users: NewUsers(env.subuid, env.passwd, log)}
	if r.missWait == 0 {
		r.missWait = DefaultMissWait
	}
	mount, root, err := env.locate()
	if err != nil {
		log.Warn("cannot find the cgroup2 mount; units come from /proc only", zap.Error(err))
	}
	if mount != "" {
		r.cgroups = newCgroupMap(mount, root)
		if r.watcher, err = startCgroupWatcher(r.cgroups, log, defaultCgroupLimits); err != nil {
			return nil, err
		}
	}
	r.mode = ModeCgroupProcs
	reason := ""
	switch {
	case opts.BPF == BPFOff:
		reason = "turned off"
	case mount == "":
		reason = "no cgroup2 mount"
	default:
		if r.bpf, err = loadBPF(mount); err != nil {
			reason = err.Error()
		} else {
			r.mode = ModeEBPF
		}
	}
	if opts.BPF == BPFRequired && r.mode != ModeEBPF {
		r.Close()
		return nil, fmt.Errorf("peer: eBPF socket table: %s", reason)
	}
	if r.mode == ModeCgroupProcs && runtime.GOOS != "linux" {
		r.mode = ModeNone
	}
	fields := []zap.Field{zap.String("mode", r.mode), zap.String("cgroup2", mount),
		zap.Bool("read_all_fds", r.allFDs), zap.Int("subuid_ranges", r.users.Ranges())}
	if reason != "" {
		fields = append(fields, zap.String("ebpf", reason))
	}
	log.Info("client identification", fields...)
	// A Resolver dropped without Close still detaches its programs and
	// stops its watcher, once collected.
	r.cleanup = runtime.AddCleanup(r, func(c resolverParts) { c.close() }, resolverParts{r.watcher, r.bpf})
	return r, nil
}

// resolverParts is what Close releases.
type resolverParts struct {
	watcher *cgroupWatcher
	bpf     *bpfSockets
}

func (p resolverParts) close() error {
	var errs []error
	if p.watcher != nil {
		errs = append(errs, p.watcher.Close())
	}
	if p.bpf != nil {
		errs = append(errs, p.bpf.Close())
	}
	return errors.Join(errs...)
}

// Close stops the cgroup watcher and detaches the eBPF programs. Call it
// after the last Process call has returned (a Process racing with Close
// may read a closed map's descriptor). Lookups after Close still answer,
// from a map no longer kept current; Process falls back to
// ModeCgroupProcs.
func (r *Resolver) Close() error {
	r.closeOnce.Do(func() {
		r.cleanup.Stop()
		r.closeErr = resolverParts{r.watcher, r.bpf}.close()
	})
	return r.closeErr
}

// UserOf is the uid of the user uid belongs to (Users.Of): the user a
// subordinate uid is delegated to, else uid itself. It never waits.
func (r *Resolver) UserOf(uid uint32) uint32 { return r.users.Of(uid) }

// Users is the Resolver's table of subordinate uids, for a front door that
// finds its clients' uids itself (the credential_process socket).
// A nil Resolver has none.
func (r *Resolver) Users() *Users {
	if r == nil {
		return nil
	}
	return r.users
}

// CgroupStats is what the cgroup watcher has mapped, and not mapped, of
// the cgroup2 tree; all zero without a cgroup2 mount.
type CgroupStats struct {
	Mapped     int64 // cgroups mapped now
	BelowUnits int64 // of those, below a unit's own cgroup (delegated subtrees)
	Walks      int64 // walks of the whole tree, the first one included
	// Directories not mapped, each time one was met: beyond the limit of
	// all (65,536), beyond its unit's share (4,096), beyond all units'
	// share (32,768).
	RefusedLimit, RefusedUnitShare, RefusedUnitsShare int64
}

// CgroupStats reports the cgroup watcher's counts (for metrics).
func (r *Resolver) CgroupStats() CgroupStats {
	m := r.cgroups
	if m == nil {
		return CgroupStats{}
	}
	return CgroupStats{
		Mapped:            int64(m.size()),
		BelowUnits:        m.belowUnits.Load(),
		Walks:             m.walks.Load(),
		RefusedLimit:      m.refused[refusedLimit].Load(),
		RefusedUnitShare:  m.refused[refusedUnitShare].Load(),
		RefusedUnitsShare: m.refused[refusedUnitsShare].Load(),
	}
}

// Mode is how Process finds pids: ModeEBPF, ModeCgroupProcs or ModeNone.
// It does not change over the Resolver's life (Close aside).
func (r *Resolver) Mode() string { return r.mode }

// Lookup returns the uid, cgroup and unit of the process whose TCP socket
// has local address remote and remote address local — the other end of a
// connection whose own addresses are local and remote. Both must be
// *net.TCPAddr of the same family (an IPv4-mapped IPv6 address counts as
// IPv4).
//
// Lookup fails with ErrNotFound when no socket in the caller's network
// namespace has those addresses, and with ErrUnsupported for other address
// types or platforms. On success Info.UID is set, and Cgroup and Unit when
// the kernel reports the socket's cgroup (else UnitUnknown, see Info);
// PID and Exe are left zero (see Process). Its cost does not depend on the
// number of processes or cgroups: one netlink round trip and a map read,
// plus, for a cgroup made an instant ago, a wait of at most
// Options.MissWait. ctx bounds the whole lookup.
func (r *Resolver) Lookup(ctx context.Context, local, remote net.Addr) (Info, error) {
	l, ok1 := local.(*net.TCPAddr)
	rm, ok2 := remote.(*net.TCPAddr)
	if !ok1 || !ok2 {
		return Info{}, ErrUnsupported
	}
	return r.lookup(ctx, 0, l, rm, lookupDecide)
}

// LookupConn is Lookup of c's addresses. When c was redirected to this host
// by NAT (nftables/iptables REDIRECT, as transparent interception does), the
// peer's socket is addressed to the original destination, not to c's local
// address: LookupConn then retries with the original destination recorded
// by conntrack (SO_ORIGINAL_DST).
func (r *Resolver) LookupConn(ctx context.Context, c net.Conn) (Info, error) {
	return r.lookupConn(ctx, c, lookupDecide)
}

// LookupConnForAudit is LookupConn for a caller that decides nothing by
// the answer and only records it (an audit line): it skips the one check
// only decisions need, that the socket's cgroup still exists (a stat of
// its directory; a socket whose cgroup was removed a moment ago, before
// the watcher read the removal, is then reported with the unit it was
// made in, which is what it is).
func (r *Resolver) LookupConnForAudit(ctx context.Context, c net.Conn) (Info, error) {
	return r.lookupConn(ctx, c, lookupAudit)
}

// LookupUID is the uid of LookupConn alone: no cgroup is mapped, so it
// never waits for the cgroup watcher. One sock_diag query (for a
// connection redirected by NAT, two and a conntrack lookup).
func (r *Resolver) LookupUID(ctx context.Context, c net.Conn) (int, error) {
	info, err := r.lookupConn(ctx, c, lookupUID)
	return info.UID, err
}

// What a lookup is for, and so what it does.
type lookupHow int

const (
	lookupDecide lookupHow = iota // uid, cgroup and unit, the cgroup checked current
	lookupAudit                   // uid, cgroup and unit (LookupConnForAudit)
	lookupUID                     // uid only (LookupUID)
)

func (r *Resolver) lookupConn(ctx context.Context, c net.Conn, how lookupHow) (Info, error) {
	local, ok1 := c.LocalAddr().(*net.TCPAddr)
	remote, ok2 := c.RemoteAddr().(*net.TCPAddr)
	if !ok1 || !ok2 {
		return Info{}, ErrUnsupported
	}
	ns := connNetns(c)
	info, err := r.lookup(ctx, ns, local, remote, how)
	if !errors.Is(err, ErrNotFound) {
		return info, err
	}
	sc, ok := c.(syscall.Conn)
	if !ok {
		return info, err
	}
	orig, oerr := originalDst(sc, local.IP.To4() != nil)
	if oerr != nil || orig == nil || (orig.IP.Equal(local.IP) && orig.Port == local.Port) {
		return info, err
	}
	return r.lookup(ctx, ns, orig, remote, how)
}

// Process returns info, an Info from Lookup or LookupConn of this
// Resolver, with PID and Exe of the process behind the socket when it can
// be found, best effort (info unchanged otherwise; an Info made by hand
// has nothing to go by). Call it only when they are needed (an audit
// line): it reads /proc. Its cost does not grow with the number of
// processes on the host:
//
//   - ModeEBPF: the process that created the socket, as recorded at
//     socket(2), if it is still alive and its pid was not reused since;
//     for a socket made before the Resolver, or whose creator has
//     exited, as in ModeCgroupProcs.
//   - ModeCgroupProcs: a process holding the socket open among the newest
//     processes of the socket's cgroup (at most 16 of them and 512 fds
//     read): only for sockets of this process's uid, or of any uid with
//     CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH. Only these processes' fds are
//     read, never those of the host's other processes.
//
// Exe needs CAP_SYS_PTRACE for another uid's process. When a PID is found
// and the kernel's record of the socket's cgroup tells nothing (Cgroup ""
// or "/", or UnitUnknown), Unit is taken from the PID's /proc/<pid>/cgroup
// and UnitUnknown cleared. ctx bounds the search.
func (r *Resolver) Process(ctx context.Context, info Info) Info {
	if info.PID != 0 || info.sock == (sockRef{}) {
		return info
	}
	return r.process(ctx, info)
}

// procCacheTTL is how long Process trusts what it read of a process (its
// start time and executable) for the next sockets the same pid made. A
// client opens one connection per request (the SDK's cold flow: token,
// listing, credentials), and reading /proc/<pid>/stat and /proc/<pid>/exe
// costs more than the rest of the identification. Within a second, the
// pid cannot have been reused (the kernel hands pids out in a cycle of
// pid_max) and an exec is reported a second late at most: both fields are
// best effort and never used in decisions.
const procCacheTTL = time.Second

// maxProcCache bounds procCache; a full cache is emptied.
const maxProcCache = 1024

// procEntry is what Process read of one process.
type procEntry struct {
	start    uint64 // starttime, clock ticks after boot
	exe      string
	unit     string // from /proc/<pid>/cgroup, when unitRead
	unitRead bool
	at       time.Time
}

// procCache maps pids to procEntry, for procCacheTTL; safe for concurrent
// use, the zero value empty.
type procCache struct {
	mu sync.Mutex
	m  map[int]procEntry
}

func (c *procCache) get(pid int, now time.Time) (procEntry, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.m[pid]
	if !ok || now.Sub(e.at) >= procCacheTTL || now.Before(e.at) {
		return procEntry{}, false
	}
	return e, true
}

func (c *procCache) put(pid int, e procEntry, now time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.m == nil || len(c.m) >= maxProcCache {
		c.m = make(map[int]procEntry)
	}
	if e.at.IsZero() { // an entry updated (its unit added) keeps the time of its first read
		e.at = now
	}
	c.m[pid] = e
}
