package peer

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// sock_diag wire format (linux/inet_diag.h). golang.org/x/sys/unix has the
// constants but not the structures, so they are encoded by hand.
const (
	sizeofNlMsghdr    = 16
	sizeofInetDiagReq = 56 // struct inet_diag_req_v2
	sizeofInetDiagMsg = 72 // struct inet_diag_msg
	sizeofNlAttr      = 4  // struct nlattr
	nlaAlignTo        = 4  // NLA_ALIGNTO
	nlaTypeMask       = 0x3fff
	inetDiagCgroupID  = 21 // INET_DIAG_CGROUP_ID: u64, Linux >= 5.7
	inetDiagNoCookie  = ^uint32(0)
	allTCPStates      = ^uint32(0)
	netlinkTimeout    = time.Second
	soOriginalDst     = 80 // SO_ORIGINAL_DST, linux/netfilter_ipv4.h
	ip6tSoOriginalDst = 80 // IP6T_SO_ORIGINAL_DST, linux/netfilter_ipv6/ip6_tables.h
	sizeofSockaddrIn6 = 28
)

// Bounds of Process's search of the socket cgroup's processes (the
// fallback of ModeEBPF, all of ModeCgroupProcs): the newest processes
// first, so that its cost does not grow with the cgroup, let alone the
// host. A readlink of /proc/<pid>/fd/N costs a few µs: about 2 ms at
// most.
const (
	maxSearchProcs     = 16  // processes whose fds are read
	maxSearchFDs       = 512 // fd links read in all
	socketLinkPrefix   = "socket:["
	maxProcFileBytes   = 64 << 10 // /proc/<pid>/cgroup, /proc/<pid>/stat
	userHZ             = 100      // USER_HZ: the unit of /proc/<pid>/stat times
	nsPerUserHZTick    = uint64(time.Second) / userHZ
	procStatStartField = 22 // starttime, proc(5)
)

// lookup asks sock_diag about the socket at remote connected to local and
// maps its cgroup (not for lookupUID); for lookupDecide, a cgroup whose
// directory is gone (or made again) makes the unit unknown
// (cgroupMap.current).
func (r *Resolver) lookup(ctx context.Context, ns uint64, local, remote *net.TCPAddr, how lookupHow) (Info, error) {
	d, err := sockDiag(ctx, ns, remote, local)
	if err != nil {
		return Info{}, err
	}
	info := Info{UID: int(d.uid), sock: sockRef{cookie: d.cookie, inode: d.inode}}
	if how == lookupUID || !d.hasCgroup || r.cgroups == nil {
		return info, nil
	}
	// The socket's cgroup, as the kernel recorded it at creation.
	cg, ok := r.cgroups.lookup(ctx, d.cgroupID, r.missWait)
	if !ok || how == lookupDecide && !r.cgroups.current(d.cgroupID, cg.rel) {
		info.UnitUnknown = true
		return info, nil
	}
	info.Cgroup, info.sock.cgroupRel = cg.path, cg.rel
	if cg.rel != "/" {
		// The root tells nothing (see Info.Cgroup): Unit stays "".
		info.Unit = unitFromPath(cg.path)
	}
	return info, nil
}

// process is Process on Linux.
func (r *Resolver) process(ctx context.Context, info Info) Info {
	s := info.sock
	pid, start, cached := 0, uint64(0), false
	var entry procEntry
	if r.bpf != nil && s.cookie != 0 {
		if rec, ok := r.bpf.lookup(s.cookie); ok {
			tgid, created := int(rec.TGID), rec.Created/nsPerUserHZTick
			// starttime is rounded down to a tick: a process started within
			// the tick after the socket's creation passes, one started
			// later (a pid reused since) does not.
			if e, ok := r.procs.get(tgid, time.Now()); ok {
				if e.start <= created {
					pid, info.Exe, cached, entry = tgid, e.exe, true, e
				}
			} else if st, ok := r.startTime(tgid); ok && st <= created {
				pid, start = tgid, st
			}
		}
	}
	if pid == 0 && s.inode != 0 && s.cgroupRel != "" && (r.allFDs || info.UID == r.euid) {
		pid = r.searchCgroup(ctx, s.cgroupRel, s.inode)
	}
	if pid == 0 {
		return info
	}
	info.PID = pid
	base := r.proc + "/" + strconv.Itoa(pid)
	if !cached {
		if exe, err := r.fs.Readlink(base + "/exe"); err == nil {
			info.Exe = exe
		}
		entry = procEntry{start: start, exe: info.Exe}
	}
	if info.Cgroup == "" || info.Cgroup == "/" || info.UnitUnknown {
		// The kernel's record tells nothing: the process's cgroup now.
		if cached && entry.unitRead {
			info.Unit, info.UnitUnknown = entry.unit, false
		} else if cg, err := r.fs.ReadFile(base+"/cgroup", maxProcFileBytes); err == nil {
			info.Unit, info.UnitUnknown = unitFromCgroup(string(cg)), false
			entry.unit, entry.unitRead = info.Unit, true
			cached = false // store the unit too
		}
	}
	if !cached && entry.start != 0 {
		r.procs.put(pid, entry, time.Now())
	}
	return info
}

// madeBy reports whether pid is alive and started no later than created
// (CLOCK_BOOTTIME, ns): not a later process that reused the pid of a
// socket's creator.
func (r *Resolver) madeBy(pid int, created uint64) bool {
	start, ok := r.startTime(pid)
	// starttime is rounded down to a tick: a process started within the
	// tick after the socket's creation passes, one started later does not.
	return ok && start <= created/nsPerUserHZTick
}

// startTime is the start time of the live process pid (clock ticks after
// boot), to tell a socket's creator from a later process that reused its
// pid. /proc/<pid>/stat is readable by everyone.
func (r *Resolver) startTime(pid int) (uint64, bool) {
	data, err := r.fs.ReadFile(r.proc+"/"+strconv.Itoa(pid)+"/stat", maxProcFileBytes)
	if err != nil {
		return 0, false
	}
	return parseStartTime(data)
}

// parseStartTime returns the starttime field (clock ticks after boot) of
// a /proc/<pid>/stat file.
func parseStartTime(stat []byte) (uint64, bool) {
	// The command (field 2) is in parentheses and may hold anything,
	// parentheses and spaces included: the fields after it follow the
	// last ')'.
	i := bytes.LastIndexByte(stat, ')')
	if i < 0 {
		return 0, false
	}
	f := strings.Fields(string(stat[i+1:]))
	if len(f) < procStatStartField-2 {
		return 0, false
	}
	v, err := strconv.ParseUint(f[procStatStartField-3], 10, 64)
	return v, err == nil
}

// searchCgroup returns a process of the cgroup whose directory is rel
// that holds the socket inode open, or 0. It reads the fds of at most
// maxSearchProcs of the cgroup's processes, newest first, and at most
// maxSearchFDs fd links in all: never the fds of processes outside the
// cgroup.
func (r *Resolver) searchCgroup(ctx context.Context, rel string, inode uint64) int {
	want := socketLinkPrefix + strconv.FormatUint(inode, 10) + "]"
	budget := maxSearchFDs
	for _, pid := range r.cgroups.procs(r.fs, rel, maxSearchProcs) {
		if budget <= 0 || ctx.Err() != nil {
			return 0
		}
		dir := r.proc + "/" + strconv.Itoa(pid) + "/fd"
		fds, err := r.fs.ReadDirNames(dir, budget)
		if err != nil {
			continue // exited, or not ours to read
		}
		for _, fd := range fds {
			budget--
			if link, err := r.fs.Readlink(dir + "/" + fd); err == nil && link == want {
				return pid
			}
		}
	}
	return 0
}

// diagAnswer is what sock_diag says about one socket.
type diagAnswer struct {
	uid       uint32 // socket owner (fsuid of its creator)
	inode     uint64 // socket inode, 0 for a socket without a file
	cookie    uint64 // socket cookie (idiag_cookie)
	cgroupID  uint64 // cgroup v2 id of the creator (INET_DIAG_CGROUP_ID)
	hasCgroup bool   // the kernel sent INET_DIAG_CGROUP_ID (Linux >= 5.7)
}

// parseDiagMsg decodes the payload of a SOCK_DIAG_BY_FAMILY answer: a
// struct inet_diag_msg (of which uid, inode and cookie are kept) followed
// by netlink attributes, of which only INET_DIAG_CGROUP_ID is kept. It reports the answer's source and
// destination ports (host order) for the caller to check.
func parseDiagMsg(d []byte) (a diagAnswer, sport, dport uint16, err error) {
	if len(d) < sizeofInetDiagMsg {
		return diagAnswer{}, 0, 0, errors.New("peer: sock_diag: short answer")
	}
	ne := binary.NativeEndian
	sport, dport = binary.BigEndian.Uint16(d[4:]), binary.BigEndian.Uint16(d[6:])
	a.uid, a.inode = ne.Uint32(d[64:]), uint64(ne.Uint32(d[68:]))
	// idiag_cookie: two u32, the low half first (sock_diag_save_cookie).
	a.cookie = uint64(ne.Uint32(d[44:])) | uint64(ne.Uint32(d[48:]))<<32
	for attrs := d[sizeofInetDiagMsg:]; len(attrs) >= sizeofNlAttr; {
		l := int(ne.Uint16(attrs[0:]))
		typ := ne.Uint16(attrs[2:]) & nlaTypeMask
		if l < sizeofNlAttr || l > len(attrs) {
			return diagAnswer{}, 0, 0, fmt.Errorf("peer: sock_diag: bad attribute length %d", l)
		}
		if typ == inetDiagCgroupID {
			if l != sizeofNlAttr+8 {
				return diagAnswer{}, 0, 0, fmt.Errorf("peer: sock_diag: cgroup id attribute of %d bytes", l)
			}
			a.cgroupID, a.hasCgroup = ne.Uint64(attrs[sizeofNlAttr:]), true
		}
		next := (l + nlaAlignTo - 1) &^ (nlaAlignTo - 1)
		if next >= len(attrs) {
			break
		}
		attrs = attrs[next:]
	}
	return a, sport, dport, nil
}

// diagBufs holds the receive buffers of sockDiag (one answer is an
// inet_diag_msg and a few attributes, well within diagBufSize) and of
// readFile.
const diagBufSize = 8192

var diagBufs = sync.Pool{New: func() any { return new([diagBufSize]byte) }}

// diagSockets keeps a few NETLINK_SOCK_DIAG sockets for reuse: making and
// closing one costs more than the query itself, and a daemon queries once
// per new connection. A netlink socket answers about its own network
// namespace, so each is kept with that namespace's cookie
// (SO_NETNS_COOKIE) and reused only for a connection of the same
// namespace. diagSeq numbers the queries, so an answer is never taken for
// another's.
var (
	diagSockets = make(chan diagSocket, 4)
	diagSeq     atomic.Uint32
)

// diagSocket is a sock_diag socket and the cookie of its network
// namespace (0: unknown, never pooled).
type diagSocket struct {
	fd int
	ns uint64
}

// netnsCookie is the network namespace cookie of the socket fd, 0 when the
// kernel cannot tell (before Linux 5.14).
func netnsCookie(fd int) uint64 {
	v, err := unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
	if err != nil {
		return 0
	}
	return v
}

// connNetns is the network namespace cookie of the connection c, 0 when
// unknown: the one c carries (NetnsConn, known from its listener without
// a system call), else asked of its socket.
func connNetns(c net.Conn) uint64 {
	if nc, ok := c.(NetnsConn); ok {
		if ns := nc.NetnsCookie(); ns != 0 {
			return ns
		}
	}
	return socketNetns(c)
}

// socketNetns asks the kernel for the network namespace cookie of the
// socket of c (a net.Conn or a net.Listener), 0 when unknown.
func socketNetns(c any) uint64 {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return 0
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return 0
	}
	var ns uint64
	if rc.Control(func(fd uintptr) { ns = netnsCookie(int(fd)) }) != nil {
		return 0
	}
	return ns
}

// ListenerNetns is the network namespace cookie of ln's socket, which is
// that of every connection ln accepts (the kernel makes an accepted
// socket in its listener's namespace); 0 when unknown.
func ListenerNetns(ln net.Listener) uint64 { return socketNetns(ln) }

// getDiagSocket returns a pooled sock_diag socket of the network namespace
// whose cookie is ns, else a new socket (in the calling thread's namespace,
// where the socket asked about lives).
func getDiagSocket(ns uint64) (diagSocket, error) {
	if ns != 0 {
		select {
		case d := <-diagSockets:
			if d.ns == ns {
				return d, nil
			}
			putDiagSocket(d, true) // another namespace's: leave it for its own
		default:
		}
	}
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, unix.NETLINK_SOCK_DIAG)
	if err != nil {
		return diagSocket{fd: -1}, fmt.Errorf("peer: sock_diag socket: %w", err)
	}
	return diagSocket{fd: fd, ns: netnsCookie(fd)}, nil
}

// putDiagSocket returns d to the pool when reuse is true, its namespace is
// known and the pool has room, else closes it.
func putDiagSocket(d diagSocket, reuse bool) {
	if reuse && d.ns != 0 {
		select {
		case diagSockets <- d:
			return
		default:
		}
	}
	unix.Close(d.fd)
}

// sockDiag asks the kernel for the uid, inode, cookie and cgroup of the TCP socket
// whose local address is src and remote address is dst (an exact lookup,
// not a dump).
//
// ns is the network namespace cookie of the socket asked about (0:
// unknown): a pooled netlink socket is used only for that namespace.
func sockDiag(ctx context.Context, ns uint64, src, dst *net.TCPAddr) (diagAnswer, error) {
	family := uint8(unix.AF_INET)
	s4, d4 := src.IP.To4(), dst.IP.To4()
	var sa, da [16]byte
	switch {
	case s4 != nil && d4 != nil:
		copy(sa[:], s4)
		copy(da[:], d4)
	case s4 == nil && d4 == nil && len(src.IP) == net.IPv6len && len(dst.IP) == net.IPv6len:
		family = unix.AF_INET6
		copy(sa[:], src.IP)
		copy(da[:], dst.IP)
	default:
		return diagAnswer{}, ErrUnsupported
	}
	ds, err := getDiagSocket(ns)
	if err != nil {
		return diagAnswer{}, err
	}
	fd := ds.fd
	// A socket goes back to the pool only after a query answered in full:
	// one that failed or timed out may still receive that query's answer.
	reuse := false
	defer func() { putDiagSocket(ds, reuse) }()
	timeout := netlinkTimeout
	if dl, ok := ctx.Deadline(); ok {
		timeout = min(timeout, time.Until(dl))
	}
	if timeout <= 0 {
		return diagAnswer{}, context.DeadlineExceeded
	}

	seq := diagSeq.Add(1)
	var req [sizeofNlMsghdr + sizeofInetDiagReq]byte
	ne := binary.NativeEndian
	ne.PutUint32(req[0:], uint32(len(req)))
	ne.PutUint16(req[4:], unix.SOCK_DIAG_BY_FAMILY)
	ne.PutUint16(req[6:], unix.NLM_F_REQUEST)
	ne.PutUint32(req[8:], seq)
	b := req[sizeofNlMsghdr:]
	b[0], b[1] = family, unix.IPPROTO_TCP
	ne.PutUint32(b[4:], allTCPStates)
	binary.BigEndian.PutUint16(b[8:], uint16(src.Port))
	binary.BigEndian.PutUint16(b[10:], uint16(dst.Port))
	copy(b[12:28], sa[:])
	copy(b[28:44], da[:])
	// b[44:48] interface: 0 (any)
	ne.PutUint32(b[48:], inetDiagNoCookie)
	ne.PutUint32(b[52:], inetDiagNoCookie)
	// An unconnected netlink socket sends to, and reads from, the kernel.
	if _, err := unix.Write(fd, req[:]); err != nil {
		return diagAnswer{}, fmt.Errorf("peer: sock_diag send: %w", err)
	}

	bp := diagBufs.Get().(*[diagBufSize]byte)
	defer diagBufs.Put(bp)
	buf := bp[:]
	blocking := false
	for {
		var n int
		var err error
		if !blocking {
			// The kernel answers an exact lookup within the send (the
			// request is handled in the sender's context), so the answer
			// is normally there: read without waiting, and set a receive
			// timeout (a system call) only when it is not.
			n, err = recvNoWait(fd, buf)
			if errors.Is(err, unix.EAGAIN) {
				tv := unix.NsecToTimeval(timeout.Nanoseconds())
				if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
					return diagAnswer{}, fmt.Errorf("peer: sock_diag timeout: %w", err)
				}
				blocking = true
				continue
			}
		} else {
			n, err = unix.Read(fd, buf)
		}
		if err != nil {
			if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) && ctx.Err() != nil {
				return diagAnswer{}, fmt.Errorf("peer: sock_diag: no answer within %s", timeout)
			}
			if errors.Is(err, unix.EINTR) {
				continue
			}
			return diagAnswer{}, fmt.Errorf("peer: sock_diag receive: %w", err)
		}
		msgs, err := syscall.ParseNetlinkMessage(buf[:n])
		if err != nil {
			return diagAnswer{}, fmt.Errorf("peer: sock_diag: %w", err)
		}
		for _, m := range msgs {
			if m.Header.Seq != seq {
				continue
			}
			switch m.Header.Type {
			case unix.NLMSG_ERROR:
				if len(m.Data) < 4 {
					return diagAnswer{}, errors.New("peer: sock_diag: short error message")
				}
				errno := -int32(ne.Uint32(m.Data))
				switch unix.Errno(errno) {
				case 0:
					continue // an ack
				case unix.ENOENT:
					reuse = true
					return diagAnswer{}, ErrNotFound
				}
				return diagAnswer{}, fmt.Errorf("peer: sock_diag: %w", unix.Errno(errno))
			case unix.SOCK_DIAG_BY_FAMILY:
				a, sport, dport, err := parseDiagMsg(m.Data)
				if err != nil {
					return diagAnswer{}, err
				}
				reuse = true
				// Make sure the kernel answered about the socket asked for.
				if sport != uint16(src.Port) || dport != uint16(dst.Port) {
					return diagAnswer{}, ErrNotFound
				}
				return a, nil
			case unix.NLMSG_DONE:
				return diagAnswer{}, ErrNotFound
			}
		}
	}
}

// recvNoWait reads one datagram from fd without blocking (MSG_DONTWAIT),
// without the allocation of unix.Recvfrom's source address.
func recvNoWait(fd int, buf []byte) (int, error) {
	n, _, errno := unix.Syscall6(unix.SYS_RECVFROM, uintptr(fd), uintptr(unsafe.Pointer(&buf[0])), uintptr(len(buf)),
		unix.MSG_DONTWAIT, 0, 0)
	if errno != 0 {
		return 0, errno
	}
	return int(n), nil
}

// originalDst returns the pre-NAT destination of the accepted connection c
// (SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST), or an error when c was not
// redirected or conntrack does not know it.
func originalDst(c syscall.Conn, v4 bool) (*net.TCPAddr, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return nil, err
	}
	var addr *net.TCPAddr
	var serr error
	err = rc.Control(func(fd uintptr) {
		var raw [sizeofSockaddrIn6]byte
		size := uint32(len(raw))
		level, opt := unix.SOL_IP, soOriginalDst
		if !v4 {
			level, opt = unix.SOL_IPV6, ip6tSoOriginalDst
		}
		_, _, errno := unix.Syscall6(unix.SYS_GETSOCKOPT, fd, uintptr(level), uintptr(opt),
			uintptr(unsafe.Pointer(&raw[0])), uintptr(unsafe.Pointer(&size)), 0)
		if errno != 0 {
			serr = errno
			return
		}
		port := int(binary.BigEndian.Uint16(raw[2:4]))
		switch {
		case v4 && size >= 8:
			addr = &net.TCPAddr{IP: net.IP(append([]byte(nil), raw[4:8]...)), Port: port}
		case !v4 && size >= 24:
			addr = &net.TCPAddr{IP: net.IP(append([]byte(nil), raw[8:24]...)), Port: port}
		default:
			serr = errors.New("short sockaddr")
		}
	})
	if err != nil {
		return nil, err
	}
	if serr != nil {
		return nil, fmt.Errorf("peer: original destination: %w", serr)
	}
	return addr, nil
}

// canReadAllFDs reports whether this process may read every process's
// /proc/<pid>/fd: listing the directory (mode 0500, owned by the process's
// uid) needs CAP_DAC_READ_SEARCH or CAP_DAC_OVERRIDE, and reading its links
// CAP_SYS_PTRACE, all in the effective set (root has them).
func canReadAllFDs() bool {
	has := effectiveCaps()
	return has(unix.CAP_SYS_PTRACE) && (has(unix.CAP_DAC_READ_SEARCH) || has(unix.CAP_DAC_OVERRIDE))
}

// effectiveCaps returns a test of this thread's effective capabilities
// (all of a Go program's threads share them unless it changes them).
func effectiveCaps() func(c int) bool {
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return func(int) bool { return false }
	}
	return func(c int) bool { return c >= 0 && c < 64 && data[c/32].Effective&(1<<(c%32)) != 0 }
}

// readFile reads at most max bytes of the file at name with plain system
// calls (open, read until the end, close): os.Open of a /proc file costs
// twice as many. Small files are read through a pooled buffer.
func readFile(name string, max int) ([]byte, error) {
	fd, err := unix.Open(name, unix.O_RDONLY|unix.O_CLOEXEC|unix.O_NOCTTY, 0)
	for errors.Is(err, unix.EINTR) {
		fd, err = unix.Open(name, unix.O_RDONLY|unix.O_CLOEXEC|unix.O_NOCTTY, 0)
	}
	if err != nil {
		return nil, &fs.PathError{Op: "open", Path: name, Err: err}
	}
	defer unix.Close(fd)
	bp := diagBufs.Get().(*[diagBufSize]byte)
	defer diagBufs.Put(bp)
	buf := bp[:min(max, len(bp))]
	n := 0
	for n < max {
		if n == len(buf) {
			buf = append(buf, make([]byte, min(len(buf), max-len(buf)))...)
		}
		m, err := unix.Read(fd, buf[n:])
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return nil, &fs.PathError{Op: "read", Path: name, Err: err}
		}
		if m == 0 {
			break
		}
		n += m
	}
	return bytes.Clone(buf[:n]), nil
}

// inodeOf returns the inode number of the file at path (not following a
// final symbolic link).
func inodeOf(path string) (uint64, error) {
	var st unix.Stat_t
	if err := unix.Lstat(path, &st); err != nil {
		return 0, err
	}
	return st.Ino, nil
}
