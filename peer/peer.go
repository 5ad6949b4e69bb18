// Package peer finds the local process at the other end of a TCP connection:
// its uid from the kernel (netlink sock_diag on the connection's exact
// 4-tuple), and, best effort, its pid (the process holding the socket's inode
// open, found by scanning /proc/*/fd), executable (/proc/<pid>/exe) and
// systemd unit (/proc/<pid>/cgroup).
//
// Only the uid is authoritative: the kernel records it when the socket is
// created and it cannot be forged by the peer. The pid, exe and unit are read
// from /proc after the fact: the process may have exited or passed the
// socket on, several processes may share the socket (fork), and reading
// another user's /proc/<pid>/fd or exe needs CAP_SYS_PTRACE (or root). When
// they cannot be found they are left zero and Lookup still succeeds.
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
	// found (exited, hidden by /proc permissions or another pid namespace).
	PID int
	// Exe is the executable of PID (the target of /proc/<pid>/exe, which
	// ends in " (deleted)" when the file was replaced), or "".
	Exe string
	// Unit is the systemd unit (a *.service or *.scope) whose cgroup holds
	// PID, or "".
	Unit string
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
// /proc/<pid>/cgroup file: the last path component ending in .service or
// .scope. The unified hierarchy (0::) is preferred over the v1 name=systemd
// hierarchy.
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

func unitFromPath(path string) string {
	segs := strings.Split(path, "/")
	for i := len(segs) - 1; i >= 0; i-- {
		s := segs[i]
		for _, suffix := range []string{".service", ".scope"} {
			if len(s) > len(suffix) && strings.HasSuffix(s, suffix) {
				return s
			}
		}
	}
	return ""
}
