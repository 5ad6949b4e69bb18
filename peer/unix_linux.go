package peer

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// maxCgroupFile bounds the read of /proc/<pid>/cgroup (a line per v1
// hierarchy and the unified one: a few hundred bytes in practice).
const maxCgroupFile = 64 << 10

// UnixUID returns the uid of the process at the other end of a unix stream
// socket, as the kernel recorded it when the peer connected (SO_PEERCRED):
// one system call, for decisions in an accept loop.
func UnixUID(c *net.UnixConn) (int, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return -1, fmt.Errorf("peer: %w", err)
	}
	var cred *unix.Ucred
	var credErr error
	if err := rc.Control(func(fd uintptr) {
		cred, credErr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return -1, fmt.Errorf("peer: %w", err)
	}
	if credErr != nil {
		return -1, fmt.Errorf("peer: SO_PEERCRED: %w", credErr)
	}
	return int(cred.Uid), nil
}

// LookupUnix returns the process at the other end of a unix stream socket.
// The uid and pid are the kernel's record of the peer when it connected
// (SO_PEERCRED), in this process's user and pid namespaces: authoritative,
// also for a client in a container that has the socket bind-mounted. The
// cgroup and unit are read from /proc/<pid>/cgroup, and the exe from
// /proc/<pid>/exe (best effort: another user's needs CAP_SYS_PTRACE).
//
// A pid can be reused once its process has exited. On Linux 6.5 and later
// the peer's pidfd (SO_PEERPIDFD) proves the process still alive after its
// cgroup was read, so the cgroup is that of the process that connected;
// when it has exited, or its cgroup cannot be read (it is gone, or in a pid
// namespace this process does not see), UnitUnknown is set and Unit is "":
// a caller matching units must fail closed. Before 6.5 a client that
// connected and exited before the read could be mistaken for the process
// that reused its pid, which needs the pid to wrap meanwhile.
//
// LookupUnix fails only when the socket has no peer credentials (not a
// connected unix socket).
func LookupUnix(c *net.UnixConn) (Info, error) { return lookupUnix(c, "/proc") }

func lookupUnix(c *net.UnixConn, proc string) (Info, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return Info{}, fmt.Errorf("peer: %w", err)
	}
	var cred *unix.Ucred
	var credErr, pidfdErr error
	pidfd := -1
	if err := rc.Control(func(fd uintptr) {
		cred, credErr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
		pidfd, pidfdErr = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PEERPIDFD)
	}); err != nil {
		return Info{}, fmt.Errorf("peer: %w", err)
	}
	if credErr != nil {
		return Info{}, fmt.Errorf("peer: SO_PEERCRED: %w", credErr)
	}
	if pidfdErr == nil {
		defer unix.Close(pidfd)
	}
	info := Info{UID: int(cred.Uid), PID: int(cred.Pid)}
	if info.PID <= 0 {
		// The peer is in a pid namespace this process does not see.
		info.PID, info.UnitUnknown = 0, true
		return info, nil
	}
	pid := strconv.Itoa(info.PID)
	data, err := readBounded(proc+"/"+pid+"/cgroup", maxCgroupFile)
	if err != nil {
		info.UnitUnknown = true
		return info, nil
	}
	info.Cgroup = unifiedPath(data)
	info.Unit = unitFromCgroup(data)
	if exe, err := os.Readlink(proc + "/" + pid + "/exe"); err == nil {
		info.Exe = exe
	}
	switch {
	case pidfdErr == nil:
		if unix.PidfdSendSignal(pidfd, 0, nil, 0) != nil {
			// Exited: what was read may be another process's.
			info.Unit, info.Cgroup, info.Exe, info.UnitUnknown = "", "", "", true
		}
	case errors.Is(pidfdErr, unix.ESRCH):
		// Exited before the lookup began.
		info.Unit, info.Cgroup, info.Exe, info.UnitUnknown = "", "", "", true
	}
	return info, nil
}

// unifiedPath is the path of the "0::" line of a /proc/<pid>/cgroup file.
func unifiedPath(data string) string {
	for line := range strings.SplitSeq(data, "\n") {
		if path, ok := strings.CutPrefix(line, "0::"); ok {
			return path
		}
	}
	return ""
}

func readBounded(path string, limit int64) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, limit))
	return string(b), err
}
