package connlimit

import (
	"net"
	"syscall"

	"golang.org/x/sys/unix"
)

// pendingInput reports whether c's socket holds received bytes not read
// yet (SIOCINQ), true when that cannot be told.
func pendingInput(c net.Conn) bool {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return true
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return true
	}
	var n int
	var ierr error
	if err := rc.Control(func(fd uintptr) { n, ierr = unix.IoctlGetInt(int(fd), unix.SIOCINQ) }); err != nil || ierr != nil {
		return true
	}
	return n > 0
}
