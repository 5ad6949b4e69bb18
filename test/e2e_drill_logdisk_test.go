package test

// The drill of the log disk full.

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/imdsproxy/imdsproxy/test/e2e"
	"github.com/imdsproxy/imdsproxy/test/fakes/sts"
)

// logWriteErrors counts the log lines the daemon could not write.
const logWriteErrors = "imdsproxy_log_write_errors_total"

// drillLogDiskFull: the daemon's stdout and stderr go to a file on a
// 64 KiB tmpfs that is full. Logging fails (ENOSPC) on every line; the daemon
// must keep serving, refresh, fail over to the cache through an STS outage
// (which logs warnings), recover, and exit 0 on SIGTERM. logWriteErrors is 0
// while the log is written (the harness's daemon, before the fault) and
// counts the failed lines once the disk is full. Needs root (mount); skipped
// loudly otherwise.
func drillLogDiskFull(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("SKIPPED LOUDLY: the log-disk-full drill needs root to mount a 64 KiB tmpfs; run `make test` as root (CI does)")
	}
	mnt := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", mnt).CombinedOutput(); err != nil {
		t.Skipf("SKIPPED LOUDLY: cannot mount a tmpfs (%v: %s)", err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("umount", "-l", mnt).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v: %s", mnt, err, out)
		}
	})

	// The harness's daemon sets up everything; it is then replaced by one
	// writing to the full disk, on the same config and ports.
	e := startDaemon(t, drillOptions())
	// Before the fault every line was written: nothing is counted.
	if n, ok := e.scrape(t).Value(logWriteErrors, nil); !ok || n != 0 {
		t.Errorf("%s = %v (present %v) with every log line written, want 0", logWriteErrors, n, ok)
	}
	if code := e.stop(); code != 0 {
		t.Fatalf("first daemon exited %d", code)
	}
	logPath := filepath.Join(mnt, "imdsproxy.log")
	logFile, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer logFile.Close()
	filler, err := os.Create(filepath.Join(mnt, "filler"))
	if err != nil {
		t.Fatal(err)
	}
	chunk := make([]byte, 4096)
	for {
		if _, err := filler.Write(chunk); err != nil {
			if !errors.Is(err, syscall.ENOSPC) {
				t.Fatalf("filling the tmpfs: %v", err)
			}
			break
		}
	}
	filler.Close()
	if _, err := logFile.WriteString("x"); !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("the tmpfs is not full: write: %v", err)
	}

	d, err := e2e.StartDaemon(e2e.DaemonOptions{
		Bin: daemonBinary(t), Config: e.configPath, Args: []string{"--log-format", "json", "--log-level", "debug"},
		Dir: e.dir, Env: e.daemonEnviron(), Out: logFile,
	})
	if err != nil {
		t.Fatal(err)
	}
	exitedEarly := func() error {
		if d.Exited() {
			return fmt.Errorf("daemon exited: %v", d.Err())
		}
		return nil
	}
	defer func() {
		if code := d.Stop(stopTimeout); code == -1 {
			t.Errorf("daemon on a full log disk did not exit within %v of SIGTERM", stopTimeout)
		} else if code != 0 {
			t.Errorf("daemon on a full log disk exited %d on SIGTERM (want 0): %v", code, d.Err())
		}
		if b, err := os.ReadFile(logPath); err == nil {
			e.assertNoSecrets(t, "log on the full disk", string(b))
		}
	}()

	if err := e2e.WaitOK(e2e.Client, e.adminURL+"/readyz", readyTimeout, 50*time.Millisecond, d); err != nil {
		t.Fatalf("daemon writing to a full disk not ready within %v: %v", readyTimeout, err)
	}
	// Starting up logged lines, and each failed.
	atReady := waitMetric(t, e, logWriteErrors, nil, func(v float64) bool { return v > 0 }, 10*time.Second)
	first, _ := e.sts.Last()
	validUntil := first.Expiration.Add(-drillMargin)

	// An STS outage makes the daemon log warnings (which fail) while it
	// serves from the cache.
	e.sts.SetMode(sts.ModeFail5xx)
	// End the phase 2 s before the credentials stop being servable: the
	// clients, the /readyz checks and the daemon all need their moment on a
	// loaded 2-core machine, and nothing in this phase may race the expiry.
	s := e.drillServe(t, validUntil.Add(-2*time.Second), drillClients{wantAK: first.AccessKeyID})
	s.check(t, "log disk full, STS failing")
	if n := e.refreshFailures(t, "server"); n < 1 {
		t.Errorf(`imdsproxy_cache_refreshes_total{result="failure",class="server"} = %v, want >= 1`, n)
	}
	if err := exitedEarly(); err != nil {
		t.Fatal(err)
	}
	// So did the warnings of the outage and the lines of its requests.
	afterOutage, _ := e.scrape(t).Value(logWriteErrors, nil)
	if afterOutage <= atReady {
		t.Errorf("%s = %v after the STS outage, want more than the %v at ready", logWriteErrors, afterOutage, atReady)
	}
	t.Logf("%s: 0 before the fault, %v at ready, %v after the outage", logWriteErrors, atReady, afterOutage)
	e.sts.SetMode(sts.ModeOK)
	took := e.drillWaitFresh(t, first.AccessKeyID, drillRecoverWithin)
	t.Logf("fresh credentials %v after STS recovered, with every log write failing", took.Round(time.Millisecond))
	if st, _ := logFile.Stat(); st != nil && st.Size() != 0 {
		t.Logf("note: %d bytes of log made it to the full disk", st.Size())
	}
	if err := exitedEarly(); err != nil {
		t.Fatal(err)
	}
}
