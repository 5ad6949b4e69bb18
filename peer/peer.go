// Package peer finds the local process at the other end of a TCP connection,
// in two steps of different cost and trust.
//
// Resolver.LookupConn answers what an access decision needs, in constant
// time whatever the number of processes on the host: one netlink sock_diag
// query on the connection's exact 4-tuple gives the uid of the peer's socket
// and, on Linux 5.7 and later with a cgroup2 file system mounted, the cgroup
// v2 the socket was created in (INET_DIAG_CGROUP_ID); the cgroup's id is
// mapped to its path, hence its systemd unit, by a map that a background
// watcher keeps current (inotify on every directory of the cgroup2 tree; a
// cgroup's id is its directory's inode number). No file system is walked
// and no process is read on this path. These three are authoritative: the
// kernel records them when the socket is created, the peer cannot forge
// them, and reading them needs no privilege.
//
// Resolver.Process adds, only for a caller that asks (an audit line), the
// pid and executable of the process behind the socket: best effort, and in
// time independent of the number of processes too. With eBPF (see Mode) a
// program attached at socket creation on the cgroup2 root recorded the
// creating process under the socket's cookie, which the same sock_diag
// answer carries; otherwise the processes of the socket's own cgroup are
// searched, a bounded number of them, for one holding the socket open
// (reading another user's /proc/<pid>/fd needs CAP_SYS_PTRACE and
// CAP_DAC_READ_SEARCH, without which a Resolver does not try). Never is
// every process's /proc/<pid>/fd scanned.
//
// The package is Linux-only; elsewhere lookups return ErrUnsupported.
// It imports nothing of the project.
package peer

import (
	"errors"
	"net"
	"strings"
)

// Info describes the process behind a connection.
type Info struct {
	// UID is the owner of the peer's socket as recorded by the kernel (the
	// fsuid of the process that created it). Always set when a lookup
	// succeeds.
	UID int
	// PID is the process behind the peer's socket, or 0: always 0 after
	// LookupConn, and after Process when none was found (see Process).
	PID int
	// Exe is the executable of PID (the target of /proc/<pid>/exe, which
	// ends in " (deleted)" when the file was replaced), or "" when PID is
	// 0 or its /proc/<pid>/exe may not be read (another user's process
	// without CAP_SYS_PTRACE).
	Exe string
	// Unit is the systemd unit (a *.service or *.scope) the peer runs in:
	// the outermost unit named in Cgroup; or, after Process found a PID
	// and Cgroup tells nothing (it is "" or "/", or UnitUnknown), in the
	// PID's /proc/<pid>/cgroup; "" when none names one. The outermost unit
	// is the one systemd's system manager runs: a unit nested inside
	// another (a user manager's units inside user@UID.service, a delegated
	// subtree) was named by that unit's processes, not by root.
	Unit string
	// Cgroup is the cgroup v2 path (as in the "0::" line of
	// /proc/<pid>/cgroup) the peer's socket was created in, from the
	// kernel; "" when the kernel does not report it (Linux < 5.7, no
	// cgroup2 mount) or its id cannot be mapped (see UnitUnknown). "/"
	// (the root) tells nothing: a socket made before its process was moved
	// into a unit, or by a process outside every unit.
	Cgroup string
	// UnitUnknown reports that the kernel named the socket's cgroup but
	// its id could not be mapped to a path within the lookup's short wait
	// (a cgroup removed since, or newer than the watcher could report in
	// time): Unit is "" because it is unknown, not because the peer runs
	// outside any unit. A caller matching units must not take such a peer
	// for one without a unit (fail closed); a later lookup may succeed.
	UnitUnknown bool

	sock sockRef // what Process needs; zero in an Info not made by a lookup
}

// sockRef identifies the peer's socket for Process.
type sockRef struct {
	cookie    uint64 // socket cookie (sock_diag idiag_cookie), 0 if unknown
	inode     uint64 // socket inode, 0 for a socket without a file
	cgroupRel string // the socket cgroup's directory under the cgroup2 mount, "" if unknown
}

// Errors of the lookups; test with errors.Is.
var (
	// ErrNotFound: no local socket has the connection's addresses — the
	// peer is on another host or in another network namespace, or has
	// closed the connection.
	ErrNotFound = errors.New("peer: no local socket for the connection")
	// ErrUnsupported: the addresses are not TCP/IP, or the platform has no
	// sock_diag.
	ErrUnsupported = errors.New("peer: unsupported connection or platform")
)

// Modes of Process, as Resolver.Mode reports them.
const (
	// ModeEBPF: the pid is the process that created the socket, recorded
	// by an eBPF program at socket creation (needs CAP_BPF and
	// CAP_NET_ADMIN, or CAP_SYS_ADMIN, when the Resolver is made). A
	// socket the program did not see (made before it was attached) is
	// searched for as in ModeCgroupProcs.
	ModeEBPF = "ebpf"
	// ModeCgroupProcs: the pid is found among the processes of the
	// socket's cgroup (a bounded number of them) that hold the socket
	// open: for sockets of the Resolver's own uid, and of other uids with
	// CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH.
	ModeCgroupProcs = "cgroup-procs"
	// ModeNone: no pid is ever found (a platform without sock_diag).
	ModeNone = "none"
)

// unitFromCgroup returns the systemd unit named in the contents of a
// /proc/<pid>/cgroup file (see unitFromPath). The unified hierarchy (0::)
// is preferred over the v1 name=systemd hierarchy.
func unitFromCgroup(data string) string {
	var v1 string
	for line := range strings.SplitSeq(data, "\n") {
		id, rest, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		ctrl, path, ok := strings.Cut(rest, ":")
		if !ok {
			continue
		}
		switch {
		case id == "0" && ctrl == "":
			if u := unitFromPath(path); u != "" {
				return u
			}
		case ctrl == "name=systemd":
			v1 = unitFromPath(path)
		}
	}
	return v1
}

// unitFromPath returns the outermost systemd unit named in a cgroup path:
// its first component ending in .service or .scope (slices are skipped), or
// "". Below a unit the names are chosen by that unit's processes (a user's
// systemd --user creates units of any name inside user@UID.service; a
// service with Delegate=yes creates cgroups of any name), so a nested name
// is no evidence of which system unit the process belongs to.
func unitFromPath(path string) string {
	for s := range strings.SplitSeq(path, "/") {
		if isUnitName(s) {
			return s
		}
	}
	return ""
}

// isUnitName reports whether a cgroup path component names a unit (the
// units whose processes have cgroups: services and scopes).
func isUnitName(s string) bool {
	return len(s) > len(".service") && strings.HasSuffix(s, ".service") ||
		len(s) > len(".scope") && strings.HasSuffix(s, ".scope")
}

// NetnsConn is a connection that knows the network namespace cookie
// (SO_NETNS_COOKIE) of its socket, 0 when unknown: a wrapper made by a
// listener that asked once (ListenerNetns) spares LookupConn a system
// call per connection.
type NetnsConn interface {
	net.Conn
	NetnsCookie() uint64
}
