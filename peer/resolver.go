package peer

import (
	"context"
	"errors"
	"net"
	"sync"
	"syscall"
	"time"
)

// DefaultInodeTTL is how long a Resolver trusts what a /proc scan found.
const DefaultInodeTTL = 2 * time.Second

// Resolver looks up the process behind connections, caching what the
// expensive /proc scan found for a short time. Create it with NewResolver.
// It is safe for concurrent use; /proc scans are serialised, so concurrent
// lookups of new connections share one scan.
type Resolver struct {
	ttl  time.Duration
	proc string           // mount point of procfs
	now  func() time.Time // replaced by tests

	mu        sync.Mutex     // serialises scans; guards the fields below
	scannedAt time.Time      // start of the last scan
	owners    map[uint64]int // socket inode -> pid, as of scannedAt
}

// NewResolver returns a Resolver whose inode cache entries live for ttl
// (zero: DefaultInodeTTL).
func NewResolver(ttl time.Duration) *Resolver {
	if ttl <= 0 {
		ttl = DefaultInodeTTL
	}
	return &Resolver{ttl: ttl, proc: "/proc", now: time.Now}
}

// Lookup returns the process whose TCP socket has local address remote and
// remote address local — the other end of a connection whose own addresses
// are local and remote. Both must be *net.TCPAddr of the same family (an
// IPv4-mapped IPv6 address counts as IPv4).
//
// Lookup fails with ErrNotFound when no socket in the caller's network
// namespace has those addresses, and with ErrUnsupported for other address
// types or platforms. On success Info.UID is set; PID, Exe and Unit are best
// effort (see the package doc). ctx bounds the /proc scan.
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
// 0. Processes owned by uid are searched first.
func (r *Resolver) pidOf(ctx context.Context, inode uint64, uid int) int {
	start := r.now()
	r.mu.Lock()
	defer r.mu.Unlock()
	fresh := start.Sub(r.scannedAt) < r.ttl
	if pid, ok := r.owners[inode]; ok && fresh {
		return pid
	}
	if !r.scannedAt.Before(start) {
		// A scan began after this lookup did and did not see the socket:
		// another scan would not either.
		return 0
	}
	if !fresh || r.owners == nil {
		r.owners = make(map[uint64]int)
	}
	r.scannedAt = r.now()
	return scanProc(ctx, r.proc, inode, uid, r.owners)
}
