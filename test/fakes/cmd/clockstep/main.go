//go:build linux

// Command clockstep steps the machine's wall clock (CLOCK_REALTIME) by -step
// for a bounded time and always steps it back, for the end-to-end drill
// TestClockStepReal (test/e2e_clockstep_test.go). It needs CAP_SYS_TIME.
//
// It records CLOCK_REALTIME and CLOCK_BOOTTIME, sets CLOCK_REALTIME to the
// recorded wall time plus the boot time elapsed plus -step, and prints
// "stepped <step>" on stdout. It then waits for the first of: a line or end
// of file on stdin (the test writes a line when done; if the test process
// dies, the kernel closes the pipe), SIGINT, SIGTERM or SIGHUP, or -hold
// elapsed on the monotonic clock. Then it sets CLOCK_REALTIME to where it
// would be had it never been stepped (the recorded wall time plus the boot
// time elapsed since), prints "restored <residual>" and exits 0.
//
// Start it in its own session (setsid), so that a signal sent to the test's
// process group (go test's timeout, a Ctrl-C) does not kill it before it has
// restored the clock; it restores on such signals itself. Only SIGKILL of
// clockstep itself can leave the clock stepped, and even then by no more
// than -step: `date -s` or NTP puts it right.
//
// Exit status: 0 stepped and restored; 1 the restore failed (the clock is
// wrong and must be fixed by hand); 2 bad usage; 3 the step failed (EPERM
// without CAP_SYS_TIME; the clock was not changed).
package main

import (
	"bufio"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Limits on the flags: a mistyped value must not send the clock years away
// or keep it stepped for long.
const (
	maxStep = 48 * time.Hour
	maxHold = 10 * time.Minute
)

func main() {
	os.Exit(run(os.Args[1:], os.Stdin, os.Stdout, os.Stderr))
}

func run(args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("clockstep", flag.ContinueOnError)
	fs.SetOutput(stderr)
	step := fs.Duration("step", time.Hour, "how far to step CLOCK_REALTIME (negative: back); at most 48h either way")
	hold := fs.Duration("hold", time.Minute, "restore after this long (monotonic) even if not told to; at most 10m")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if fs.NArg() != 0 || *step == 0 || *step > maxStep || *step < -maxStep || *hold <= 0 || *hold > maxHold {
		fmt.Fprintf(stderr, "clockstep: want -step non-zero within ±%s and -hold in (0, %s], no arguments\n", maxStep, maxHold)
		return 2
	}

	// Signals are caught from before the step, so none can end the process
	// between the step and the restore. SIGPIPE is caught so that a write to
	// a closed stdout fails instead of killing the process.
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	signal.Notify(make(chan os.Signal, 1), syscall.SIGPIPE)

	real0, boot0, err := readClocks()
	if err != nil {
		fmt.Fprintf(stderr, "clockstep: %v\n", err)
		return 3
	}
	if err := setRealtime(real0, boot0, *step); err != nil {
		fmt.Fprintf(stderr, "clockstep: step CLOCK_REALTIME by %s: %v (needs CAP_SYS_TIME)\n", *step, err)
		return 3
	}
	fmt.Fprintf(stdout, "stepped %s\n", *step)

	told := make(chan string, 1)
	go func() {
		if _, err := bufio.NewReader(stdin).ReadString('\n'); err != nil {
			told <- "stdin closed"
			return
		}
		told <- "told to"
	}()
	var why string
	select {
	case why = <-told:
	case s := <-sigs:
		why = "signal " + s.String()
	case <-time.After(*hold):
		why = fmt.Sprintf("held for %s", *hold)
	}

	if err := setRealtime(real0, boot0, 0); err != nil {
		fmt.Fprintf(stderr, "clockstep: RESTORE FAILED, CLOCK_REALTIME is still about %s off: %v\n", *step, err)
		return 1
	}
	real1, boot1, err := readClocks()
	if err != nil {
		fmt.Fprintf(stderr, "clockstep: restored, but cannot read the clocks back: %v\n", err)
		return 1
	}
	residual := real1.Sub(real0) - boot1.Sub(boot0)
	fmt.Fprintf(stdout, "restored %s (%s)\n", residual, why)
	fmt.Fprintf(stderr, "clockstep: CLOCK_REALTIME stepped by %s and restored (%s), residual %s\n", *step, why, residual)
	return 0
}

// readClocks returns CLOCK_REALTIME and CLOCK_BOOTTIME read together. Boot
// time is read on both sides of the wall clock and averaged, so the pair is
// consistent to about a microsecond. BOOTTIME, unlike MONOTONIC, keeps
// counting while the machine is suspended, so a restore after a suspend is
// still right.
func readClocks() (real, boot time.Time, err error) {
	var b1, r, b2 unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_BOOTTIME, &b1); err != nil {
		return time.Time{}, time.Time{}, fmt.Errorf("read CLOCK_BOOTTIME: %w", err)
	}
	if err := unix.ClockGettime(unix.CLOCK_REALTIME, &r); err != nil {
		return time.Time{}, time.Time{}, fmt.Errorf("read CLOCK_REALTIME: %w", err)
	}
	if err := unix.ClockGettime(unix.CLOCK_BOOTTIME, &b2); err != nil {
		return time.Time{}, time.Time{}, fmt.Errorf("read CLOCK_BOOTTIME: %w", err)
	}
	t1, t2 := time.Unix(b1.Unix()), time.Unix(b2.Unix())
	return time.Unix(r.Unix()), t1.Add(t2.Sub(t1) / 2), nil
}

// setRealtime sets CLOCK_REALTIME to real0 plus the boot time elapsed since
// boot0 plus offset.
func setRealtime(real0, boot0 time.Time, offset time.Duration) error {
	var b unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_BOOTTIME, &b); err != nil {
		return fmt.Errorf("read CLOCK_BOOTTIME: %w", err)
	}
	target := real0.Add(time.Unix(b.Unix()).Sub(boot0) + offset)
	ts, err := unix.TimeToTimespec(target)
	if err != nil {
		return err
	}
	return unix.ClockSettime(unix.CLOCK_REALTIME, &ts)
}
