//go:build linux

package token

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"strconv"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// The processes a Command's run leaves behind.
//
// A run's program may start processes that leave its process group and
// session (setsid, daemon(3), a double fork): killing the group misses
// them, and when their parent exits they are re-parented away from the
// daemon. To find them all without privileges:
//
//   - the daemon makes itself a child subreaper (prctl
//     PR_SET_CHILD_SUBREAPER, Linux 3.4+, unprivileged): every process
//     orphaned below it is re-parented to the daemon instead of init, so
//     every descendant of a run stays a descendant of the daemon;
//   - each run's environment holds runIDEnv=<random id>, which its
//     descendants inherit, so that an orphan is attributed to its run even
//     while runs overlap;
//   - when a run ends (the program exited, or it timed out and its group
//     was killed), sweep walks /proc: the daemon's children that are not a
//     run's program, with their whole subtrees, belonging to this run (by
//     the id in their environment, or by having been seen as this run's
//     before) are killed with SIGKILL and reaped, pass after pass until none
//     is left (a process forking while it is killed only adds a pass).
//     Processes whose environment has no run id (a program that cleared it)
//     and that started after the run's program are killed by the run that
//     ends while no other run is in flight (when runs overlap, the last to
//     end); processes of a run that already ended are killed by the next
//     sweep.
//
// Signals go through a pidfd opened after checking the process's start
// time, so a pid reused meanwhile is never signalled; only the daemon's own
// children are reaped (they cannot be reused before that), and never a
// run's program, which os/exec reaps. The daemon must start no other child
// processes than Commands' (it starts none): a child started elsewhere
// would be taken for an orphan without a run id.

// runIDEnv names the environment variable holding a run's id.
const runIDEnv = "IMDSPROXY_RUN_ID"

// sweepBudget bounds one sweep; what is left (a process stuck in
// uninterruptible sleep) is killed by a later run's sweep.
const sweepBudget = 2 * time.Second

var subreaper struct {
	once sync.Once
	err  error
}

// becomeSubreaper makes the calling process a child subreaper, once.
func becomeSubreaper() error {
	subreaper.once.Do(func() {
		if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
			subreaper.err = fmt.Errorf("prctl(PR_SET_CHILD_SUBREAPER): %w", err)
		}
	})
	return subreaper.err
}

// liveRuns registers the runs in flight: id → pid of the run's program (0
// until it started).
var liveRuns = struct {
	mu   sync.Mutex
	live map[string]int
}{live: map[string]int{}}

// procRun is one run's view of its processes. Not safe for concurrent use,
// except that kill may run (from os/exec's Cancel) while the run waits.
type procRun struct {
	id           string
	programStart uint64 // start time of the run's program, once started
	mu           sync.Mutex
	mine         map[int]uint64 // pid → start time of every process seen as this run's
}

// beginRun registers a new run; call end when it is over.
func beginRun() *procRun {
	var b [12]byte
	_, _ = rand.Read(b[:])
	r := &procRun{id: hex.EncodeToString(b[:]), mine: map[int]uint64{}}
	liveRuns.mu.Lock()
	liveRuns.live[r.id] = 0
	liveRuns.mu.Unlock()
	return r
}

// env returns the run's environment entry.
func (r *procRun) env() string { return runIDEnv + "=" + r.id }

// started records the pid of the run's program.
func (r *procRun) started(pid int) {
	if p, ok := readProc(pid); ok {
		r.mu.Lock()
		r.programStart = p.start
		r.mu.Unlock()
	}
	liveRuns.mu.Lock()
	liveRuns.live[r.id] = pid
	liveRuns.mu.Unlock()
}

// end unregisters the run.
func (r *procRun) end() {
	liveRuns.mu.Lock()
	delete(liveRuns.live, r.id)
	liveRuns.mu.Unlock()
}

// proc is what sweep reads of a process from /proc/<pid>/stat.
type proc struct {
	pid, ppid int
	zombie    bool
	start     uint64 // clock ticks after boot
}

// sweep kills and reaps every process of the run that is left (see above).
// program is the pid of the run's program while it may still run (from
// Cancel: its descendants are killed, not the program itself, which its
// group kill and os/exec take care of), 0 once os/exec reaped it. It
// returns how many processes it could not get rid of within sweepBudget,
// or an error when /proc cannot be read.
func (r *procRun) sweep(program int) (int, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	self := os.Getpid()
	deadline := time.Now().Add(sweepBudget)
	pause := time.Millisecond
	for {
		procs, err := scanProcs()
		if err != nil {
			return 0, err
		}
		victims := r.victims(procs, self, program)
		if len(victims) == 0 {
			return 0, nil
		}
		for _, p := range victims {
			r.mine[p.pid] = p.start
			switch {
			case !p.zombie:
				signalKill(p)
			case p.ppid == self:
				var ws unix.WaitStatus
				_, _ = unix.Wait4(p.pid, &ws, unix.WNOHANG, nil)
			}
		}
		if time.Now().After(deadline) {
			return len(victims), nil
		}
		time.Sleep(pause)
		pause = min(2*pause, 20*time.Millisecond)
	}
}

// victims returns the processes of procs that belong to the run and must
// go: the descendants of program (when not 0), and the daemon's children
// that are no run's program and belong to this run, with their subtrees.
func (r *procRun) victims(procs map[int]proc, self, program int) []proc {
	children := map[int][]int{}
	for _, p := range procs {
		children[p.ppid] = append(children[p.ppid], p.pid)
	}
	liveRuns.mu.Lock()
	programs := map[int]bool{}
	others := 0
	owners := map[string]bool{}
	for id, pid := range liveRuns.live {
		owners[id] = true
		if id != r.id {
			others++
			if pid != 0 {
				programs[pid] = true
			}
		}
	}
	liveRuns.mu.Unlock()

	var roots []int
	if p, ok := procs[program]; ok && program != 0 && p.start == r.programStart {
		roots = append(roots, children[program]...)
	}
	for _, c := range children[self] {
		p := procs[c]
		if c == program || programs[c] {
			continue
		}
		if start, ok := r.mine[c]; ok && start == p.start {
			roots = append(roots, c)
			continue
		}
		owner := runIDOf(c)
		switch {
		case owner == r.id, owner != "" && !owners[owner]:
			roots = append(roots, c)
		case owner == "" && others == 0 && r.programStart != 0 && p.start >= r.programStart:
			// No run id (a program that cleared its environment, or a
			// zombie): this run's if no other is in flight and it started
			// after this run's program did.
			roots = append(roots, c)
		}
	}
	var out []proc
	seen := map[int]bool{}
	for len(roots) > 0 {
		pid := roots[len(roots)-1]
		roots = roots[:len(roots)-1]
		if seen[pid] {
			continue
		}
		seen[pid] = true
		out = append(out, procs[pid])
		roots = append(roots, children[pid]...)
	}
	return out
}

// runIDOf returns the run id in the environment pid started with, "" when
// there is none or it cannot be read (another user's process, a zombie).
func runIDOf(pid int) string {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/environ")
	if err != nil {
		return ""
	}
	key := []byte(runIDEnv + "=")
	for _, kv := range bytes.Split(b, []byte{0}) {
		if v, ok := bytes.CutPrefix(kv, key); ok {
			return string(v)
		}
	}
	return ""
}

// signalKill sends SIGKILL to p through a pidfd, after checking that the
// pid still names the process that was scanned (same start time).
func signalKill(p proc) {
	fd, err := unix.PidfdOpen(p.pid, 0)
	if err != nil {
		if errors.Is(err, unix.ENOSYS) { // before Linux 5.3
			if q, ok := readProc(p.pid); ok && q.start == p.start {
				_ = unix.Kill(p.pid, unix.SIGKILL)
			}
		}
		return
	}
	defer unix.Close(fd)
	if q, ok := readProc(p.pid); ok && q.start == p.start {
		_ = unix.PidfdSendSignal(fd, unix.SIGKILL, nil, 0)
	}
}

// scanProcs reads every process of /proc.
func scanProcs() (map[int]proc, error) {
	d, err := os.Open("/proc")
	if err != nil {
		return nil, err
	}
	names, err := d.Readdirnames(-1)
	d.Close()
	if err != nil {
		return nil, err
	}
	procs := make(map[int]proc, len(names))
	for _, n := range names {
		pid, err := strconv.Atoi(n)
		if err != nil {
			continue
		}
		if p, ok := readProc(pid); ok {
			procs[pid] = p
		}
	}
	return procs, nil
}

// readProc reads /proc/<pid>/stat; false when the process is gone.
func readProc(pid int) (proc, bool) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return proc{}, false
	}
	return parseStat(pid, b)
}

// parseStat parses /proc/<pid>/stat: "pid (comm) state ppid pgrp session
// tty_nr tpgid flags minflt cminflt majflt cmajflt utime stime cutime
// cstime priority nice num_threads itrealvalue starttime …". comm may hold
// spaces and parentheses: the fields start after the last ')'.
func parseStat(pid int, b []byte) (proc, bool) {
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return proc{}, false
	}
	f := bytes.Fields(b[i+1:])
	if len(f) < 20 {
		return proc{}, false
	}
	ppid, err := strconv.Atoi(string(f[1]))
	if err != nil {
		return proc{}, false
	}
	start, err := strconv.ParseUint(string(f[19]), 10, 64)
	if err != nil {
		return proc{}, false
	}
	return proc{pid: pid, ppid: ppid, zombie: len(f[0]) == 1 && (f[0][0] == 'Z' || f[0][0] == 'X'), start: start}, true
}
