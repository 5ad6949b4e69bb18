package peer

import (
	"crypto/rand"
	"encoding/hex"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"
)

// isolate starts cmd in a cgroup of its own under the cgroup2 mount, when
// the test may make one (root), so that the cgroup-procs search, which
// looks at the newest processes of the socket's cgroup, finds it whatever
// else the test's cgroup runs (go test's other packages, a busy CI host).
// Without that permission cmd stays in the test's cgroup.
func isolate(t *testing.T, cmd *exec.Cmd) {
	t.Helper()
	mount, _, err := locateCgroup2()
	if err != nil || mount == "" {
		return
	}
	var b [6]byte
	_, _ = rand.Read(b[:])
	dir := filepath.Join(mount, "imdsproxy-peer-test-"+hex.EncodeToString(b[:])+".scope")
	if err := os.Mkdir(dir, 0o755); err != nil {
		return
	}
	f, err := os.Open(dir)
	if err != nil {
		os.Remove(dir)
		return
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(f.Fd())}
	t.Cleanup(func() {
		f.Close()
		for deadline := time.Now().Add(10 * time.Second); os.Remove(dir) != nil && time.Now().Before(deadline); {
			time.Sleep(20 * time.Millisecond)
		}
	})
}
