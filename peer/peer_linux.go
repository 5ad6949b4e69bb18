package peer

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// sock_diag wire format (linux/inet_diag.h). golang.org/x/sys/unix has the
// constants but not the structures, so they are encoded by hand.
const (
	sizeofNlMsghdr     = 16
	sizeofInetDiagReq  = 56 // struct inet_diag_req_v2
	sizeofInetDiagMsg  = 72 // struct inet_diag_msg
	sizeofNlAttr       = 4  // struct nlattr
	nlaAlignTo         = 4  // NLA_ALIGNTO
	nlaTypeMask        = 0x3fff
	inetDiagCgroupID   = 21 // INET_DIAG_CGROUP_ID: u64, Linux >= 5.7
	inetDiagNoCookie   = ^uint32(0)
	allTCPStates       = ^uint32(0)
	netlinkTimeout     = time.Second
	soOriginalDst      = 80 // SO_ORIGINAL_DST, linux/netfilter_ipv4.h
	ip6tSoOriginalDst  = 80 // IP6T_SO_ORIGINAL_DST, linux/netfilter_ipv6/ip6_tables.h
	sizeofSockaddrIn6  = 28
	maxFDsPerProcess   = 1 << 16 // a process with more open files is skipped
	socketLinkPrefix   = "socket:["
	maxSocketLinkBytes = 32
)

func (r *Resolver) lookup(ctx context.Context, local, remote *net.TCPAddr) (Info, error) {
	d, err := sockDiag(ctx, remote, local)
	if err != nil {
		return Info{}, err
	}
	info := Info{UID: int(d.uid)}
	// The socket's cgroup, as the kernel recorded it at creation: the unit
	// comes from there whenever the id can be mapped to a path.
	var cg cgroupEntry
	fromKernel := false
	if d.hasCgroup && r.cgroups != nil && r.cgroups.available() {
		cg, fromKernel = r.cgroups.lookup(ctx, d.cgroupID)
		switch {
		case fromKernel && cg.rel == "/":
			// The root cgroup tells nothing: a socket made before its
			// process was moved into a unit, or a kernel (5.7-5.14 with
			// net_cls/net_prio in use) that reports the root for every
			// socket. The unit comes from /proc below.
			info.Cgroup = cg.path
			fromKernel = false
		case fromKernel:
			info.Cgroup = cg.path
			info.Unit = unitFromPath(cg.path)
		default:
			info.UnitUnknown = true // unless /proc names it below
		}
	}
	if d.inode == 0 {
		return info, nil // a socket without a file (orphaned): no process
	}
	if !r.mayScan(info.UID) {
		return info, nil
	}
	var group []int
	if fromKernel && cg.rel != "/" {
		group = r.cgroups.procs(cg.rel)
	}
	info.PID = r.pidOf(ctx, d.inode, info.UID, group)
	if info.PID == 0 {
		return info, nil
	}
	base := r.proc + "/" + strconv.Itoa(info.PID)
	if exe, err := os.Readlink(base + "/exe"); err == nil {
		info.Exe = exe
	}
	if !fromKernel {
		if cg, err := os.ReadFile(base + "/cgroup"); err == nil {
			info.Unit = unitFromCgroup(string(cg))
			info.UnitUnknown = false
		}
	}
	return info, nil
}

// diagAnswer is what sock_diag says about one socket.
type diagAnswer struct {
	uid       uint32 // socket owner (fsuid of its creator)
	inode     uint64 // socket inode, 0 for a socket without a file
	cgroupID  uint64 // cgroup v2 id of the creator (INET_DIAG_CGROUP_ID)
	hasCgroup bool   // the kernel sent INET_DIAG_CGROUP_ID (Linux >= 5.7)
}

// parseDiagMsg decodes the payload of a SOCK_DIAG_BY_FAMILY answer: a
// struct inet_diag_msg followed by netlink attributes, of which only
// INET_DIAG_CGROUP_ID is kept. It reports the answer's source and
// destination ports (host order) for the caller to check.
func parseDiagMsg(d []byte) (a diagAnswer, sport, dport uint16, err error) {
	if len(d) < sizeofInetDiagMsg {
		return diagAnswer{}, 0, 0, errors.New("peer: sock_diag: short answer")
	}
	ne := binary.NativeEndian
	sport, dport = binary.BigEndian.Uint16(d[4:]), binary.BigEndian.Uint16(d[6:])
	a.uid, a.inode = ne.Uint32(d[64:]), uint64(ne.Uint32(d[68:]))
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

// sockDiag asks the kernel for the uid, inode and cgroup of the TCP socket
// whose local address is src and remote address is dst (an exact lookup,
// not a dump).
func sockDiag(ctx context.Context, src, dst *net.TCPAddr) (diagAnswer, error) {
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
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, unix.NETLINK_SOCK_DIAG)
	if err != nil {
		return diagAnswer{}, fmt.Errorf("peer: sock_diag socket: %w", err)
	}
	defer unix.Close(fd)
	timeout := netlinkTimeout
	if dl, ok := ctx.Deadline(); ok {
		timeout = min(timeout, time.Until(dl))
	}
	if timeout <= 0 {
		return diagAnswer{}, context.DeadlineExceeded
	}
	tv := unix.NsecToTimeval(timeout.Nanoseconds())
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		return diagAnswer{}, fmt.Errorf("peer: sock_diag timeout: %w", err)
	}

	const seq = 1
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
	if err := unix.Sendto(fd, req[:], 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return diagAnswer{}, fmt.Errorf("peer: sock_diag send: %w", err)
	}

	buf := make([]byte, 4096)
	for {
		n, _, err := unix.Recvfrom(fd, buf, 0)
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
					return diagAnswer{}, ErrNotFound
				}
				return diagAnswer{}, fmt.Errorf("peer: sock_diag: %w", unix.Errno(errno))
			case unix.SOCK_DIAG_BY_FAMILY:
				a, sport, dport, err := parseDiagMsg(m.Data)
				if err != nil {
					return diagAnswer{}, err
				}
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

// scanProc searches proc/*/fd for the socket inode, processes owned by uid
// first and newest (highest pid) first within each group, recording every
// socket inode it reads into owners. Processes of other uids are searched
// only when others is set (reading their fds needs privilege, see
// canReadAllFDs). It
// returns the pid found or 0. It stops early when found or when ctx is done.
func scanProc(ctx context.Context, proc string, inode uint64, uid int, others bool, owners map[uint64]int) int {
	d, err := os.Open(proc)
	if err != nil {
		return 0
	}
	names, err := d.Readdirnames(-1)
	d.Close()
	if err != nil {
		return 0
	}
	pids := make([]int, 0, len(names))
	for _, n := range names {
		if pid, err := strconv.Atoi(n); err == nil && pid > 0 {
			pids = append(pids, pid)
		}
	}
	// Newest first: a client asking for credentials is often a process
	// that has just started.
	slices.Sort(pids)
	slices.Reverse(pids)
	var rest []int
	for _, pid := range pids {
		var st unix.Stat_t
		if unix.Stat(proc+"/"+strconv.Itoa(pid), &st) != nil {
			continue
		}
		if int(st.Uid) != uid {
			if others {
				rest = append(rest, pid)
			}
			continue
		}
		if ctx.Err() != nil {
			return 0
		}
		if scanFDs(proc, pid, owners, inode) {
			return pid
		}
	}
	return scanPIDs(ctx, proc, rest, inode, owners)
}

// scanPIDs searches the fds of pids, in order, for the socket inode,
// recording every socket inode it reads into owners. It returns the pid
// found or 0.
func scanPIDs(ctx context.Context, proc string, pids []int, inode uint64, owners map[uint64]int) int {
	for _, pid := range pids {
		if ctx.Err() != nil {
			return 0
		}
		if scanFDs(proc, pid, owners, inode) {
			return pid
		}
	}
	return 0
}

// canReadAllFDs reports whether this process may read every process's
// /proc/<pid>/fd: listing the directory (mode 0500, owned by the process's
// uid) needs CAP_DAC_READ_SEARCH or CAP_DAC_OVERRIDE, and reading its links
// CAP_SYS_PTRACE, all in the effective set (root has them).
func canReadAllFDs() bool {
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return false
	}
	has := func(c int) bool { return data[c/32].Effective&(1<<(c%32)) != 0 }
	return has(unix.CAP_SYS_PTRACE) && (has(unix.CAP_DAC_READ_SEARCH) || has(unix.CAP_DAC_OVERRIDE))
}

// scanFDs records the socket inodes pid has open into owners and reports
// whether want is among them.
func scanFDs(proc string, pid int, owners map[uint64]int, want uint64) bool {
	dir := proc + "/" + strconv.Itoa(pid) + "/fd"
	d, err := os.Open(dir)
	if err != nil {
		return false // exited, or not ours to read
	}
	fds, err := d.Readdirnames(maxFDsPerProcess)
	d.Close()
	if err != nil {
		return false
	}
	found := false
	var buf [maxSocketLinkBytes]byte
	for _, fd := range fds {
		n, err := unix.Readlink(dir+"/"+fd, buf[:])
		if err != nil || n <= len(socketLinkPrefix) || n == len(buf) {
			continue
		}
		link := string(buf[:n])
		if !strings.HasPrefix(link, socketLinkPrefix) || link[n-1] != ']' {
			continue
		}
		ino, err := strconv.ParseUint(link[len(socketLinkPrefix):n-1], 10, 64)
		if err != nil {
			continue
		}
		if _, seen := owners[ino]; !seen {
			owners[ino] = pid
		}
		if ino == want {
			found = true
		}
	}
	return found
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
