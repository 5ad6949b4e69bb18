package peer

import (
	"context"
	"errors"
	"net"
	"os"
	"sync"
	"syscall"
	"time"
)

// DefaultInodeTTL is how long a Resolver trusts what a /proc scan found.
const DefaultInodeTTL = 2 * time.Second

// Resolver looks up the process behind connections, caching what the
// expensive /proc scan found for a short time and the paths of cgroup ids.
// Create it with NewResolver. It is safe for concurrent use; /proc scans
// are serialised, so concurrent lookups of new connections share one scan.
type Resolver struct {
	ttl     time.Duration
	proc    string           // mount point of procfs
	now     func() time.Time // replaced by tests
	cgroups *cgroupMap       // nil: socket cgroups are not used
	allFDs  bool             // may read every process's fds (see canReadAllFDs)
	euid    int              // whose fds are readable without it

	mu         sync.Mutex     // serialises scans; guards the fields below
	ownersAt   time.Time      // when owners was started
	fullScanAt time.Time      // start of the last scan of every process
	owners     map[uint64]int // socket inode -> pid, valid until ownersAt+ttl
}

// NewResolver returns a Resolver whose inode cache entries live for ttl
// (zero: DefaultInodeTTL). It finds the cgroup2 mount on first use.
func NewResolver(ttl time.Duration) *Resolver {
	if ttl <= 0 {
		ttl = DefaultInodeTTL
	}
	return &Resolver{
		ttl: ttl, proc: "/proc", now: time.Now,
		cgroups: newCgroupMap(locateCgroup2, DefaultCgroupWalkInterval),
		allFDs:  canReadAllFDs(), euid: os.Geteuid(),
	}
}

// Lookup returns the process whose TCP socket has local address remote and
// remote address local — the other end of a connection whose own addresses
// are local and remote. Both must be *net.TCPAddr of the same family (an
// IPv4-mapped IPv6 address counts as IPv4).
//
// Lookup fails with ErrNotFound when no socket in the caller's network
// namespace has those addresses, and with ErrUnsupported for other address
// types or platforms. On success Info.UID is set; PID, Exe and Unit are best
// effort (see the package doc); Unit and Cgroup are authoritative when the
// kernel reports the socket's cgroup. ctx bounds the whole lookup.
func (r *Resolver) Lookup(ctx context.Context, local, remote net.Addr) (Info, error) {
	l, ok1 := local.(*net.TCPAddr)
	rm, ok2 := remote.(*net.TCPAddr)
	if !ok1 || !ok2 {
		return Info{}, ErrUnsupported
	}
	return r.lookup(ctx, l, rm)
}

// LookupConn is Lookup of c's addresses. When c was redirected to this host
// by NAT (nftables/iptables REDIRECT, as transparent interception does), the
// peer's socket is addressed to the original destination, not to c's local
// address: LookupConn then retries with the original destination recorded
// by conntrack (SO_ORIGINAL_DST).
func (r *Resolver) LookupConn(ctx context.Context, c net.Conn) (Info, error) {
	local, ok1 := c.LocalAddr().(*net.TCPAddr)
	remote, ok2 := c.RemoteAddr().(*net.TCPAddr)
	if !ok1 || !ok2 {
		return Info{}, ErrUnsupported
	}
	info, err := r.lookup(ctx, local, remote)
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
	return r.lookup(ctx, orig, remote)
}

// pidOf returns a process holding the socket with the given inode open, or
// 0. The processes of group (the socket's cgroup) are searched first, then,
// when the socket is not found there, every process: those owned by uid
// first, those of other uids only with CAP_SYS_PTRACE and
// CAP_DAC_READ_SEARCH. Without them a socket of another uid than ours is not
// searched for at all: its owner's fds cannot be read.
func (r *Resolver) pidOf(ctx context.Context, inode uint64, uid int, group []int) int {
	if !r.mayScan(uid) {
		return 0
	}
	start := r.now()
	r.mu.Lock()
	defer r.mu.Unlock()
	fresh := start.Sub(r.ownersAt) < r.ttl
	if pid, ok := r.owners[inode]; ok && fresh {
		return pid
	}
	if !fresh || r.owners == nil {
		r.owners = make(map[uint64]int)
		r.ownersAt = start
	}
	if pid := scanPIDs(ctx, r.proc, group, inode, r.owners); pid != 0 {
		return pid
	}
	if !r.fullScanAt.Before(start) && !r.fullScanAt.Before(r.ownersAt) {
		// A full scan began after this lookup did, recorded into owners,
		// and did not see the socket: another would not either.
		return 0
	}
	r.fullScanAt = r.now()
	return scanProc(ctx, r.proc, inode, uid, r.allFDs, r.owners)
}

// mayScan reports whether the fds of uid's processes can be read.
func (r *Resolver) mayScan(uid int) bool { return r.allFDs || uid == r.euid }
