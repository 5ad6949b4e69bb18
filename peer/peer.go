// Package peer finds the local process at the other end of a TCP connection.
// From the kernel's record of the peer's socket (netlink sock_diag on the
// connection's exact 4-tuple) it takes the socket's uid and, on Linux 5.7 and
// later with a cgroup2 file system mounted, the cgroup v2 the socket was
// created in (INET_DIAG_CGROUP_ID), hence its systemd unit. Best effort, it
// then finds a pid (a process holding the socket's inode open, searched in
// the socket's cgroup.procs first, then in every /proc/*/fd) and that
// process's executable (/proc/<pid>/exe).
//
// The uid, cgroup and unit are authoritative: the kernel records them when
// the socket is created, the peer cannot forge them, and reading them needs
// no privilege (sock_diag answers any user; the cgroup2 tree is world
// readable). The pid and exe are read from /proc after the fact: the
// process may have exited or passed the socket on, several processes may
// share the socket (fork), and reading another user's /proc/<pid>/fd needs
// CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH (root has both), without which a
// Resolver does not even try. When they cannot be found they are left zero and Lookup still
// succeeds. The unit comes from /proc/<pid>/cgroup only when the kernel
// reports no socket cgroup (older kernels, no cgroup2 mount) or the
// cgroup has since been removed.
//
// The package is Linux-only; elsewhere Lookup returns ErrUnsupported.
// It imports nothing of the project.
package peer

import (
	"errors"
	"strings"
)

// Info describes the process behind a connection.
type Info struct {
	// UID is the owner of the peer's socket as recorded by the kernel (the
	// fsuid of the process that created it). Always set when Lookup
	// succeeds.
	UID int
	// PID is a process holding the peer's socket open, or 0 when none was
	// found (exited, hidden by /proc permissions or another pid namespace)
	// or not searched for: without CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH
	// a socket of another uid than this process's is not.
	PID int
	// Exe is the executable of PID (the target of /proc/<pid>/exe, which
	// ends in " (deleted)" when the file was replaced), or "".
	Exe string
	// Unit is the systemd unit (a *.service or *.scope) the peer runs in:
	// the outermost unit named in Cgroup, or, when Cgroup is "", in
	// PID's /proc/<pid>/cgroup; "" when neither names one. The outermost
	// unit is the one systemd's system manager runs: a unit nested inside
	// another (a user manager's units inside user@UID.service, a
	// delegated subtree) was named by that unit's processes, not by root.
	Unit string
	// Cgroup is the cgroup v2 path (as in the "0::" line of
	// /proc/<pid>/cgroup) the peer's socket was created in, from the
	// kernel; "" when the kernel does not report it (Linux < 5.7, no
	// cgroup2 mount) or the cgroup has been removed since.
	Cgroup string
	// UnitUnknown reports that the kernel named the socket's cgroup but it
	// could not be mapped to a path in time (a cgroup newer than the last
	// walk of the cgroup2 tree, or one removed since) and /proc named no
	// unit either: Unit is "" because it is unknown, not because the peer
	// runs outside any unit. A caller matching units must not take such a
	// peer for one without a unit; a later lookup may succeed.
	UnitUnknown bool
}

// Errors of Lookup; test with errors.Is.
var (
	// ErrNotFound: no local socket has the connection's addresses — the
	// peer is on another host or in another network namespace, or has
	// closed the connection.
	ErrNotFound = errors.New("peer: no local socket for the connection")
	// ErrUnsupported: the addresses are not TCP/IP, or the platform has no
	// sock_diag.
	ErrUnsupported = errors.New("peer: unsupported connection or platform")
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
		for _, suffix := range []string{".service", ".scope"} {
			if len(s) > len(suffix) && strings.HasSuffix(s, suffix) {
				return s
			}
		}
	}
	return ""
}
