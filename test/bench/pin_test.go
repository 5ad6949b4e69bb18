package bench

import (
	"flag"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// CPU pinning. On a small machine the load generator and the server it
// measures compete for the same cores, and the server's tail latency is then
// mostly the generator's scheduling. -pin SERVER/CLIENT (CPU lists as taskset
// takes them, e.g. -pin 0/1) runs every server subprocess (daemon, ceiling,
// AEMM) on the SERVER CPUs, through taskset(1), and this process (the load
// generator and the fakes) on the CLIENT CPUs. Go sizes GOMAXPROCS from the
// affinity mask, so a server pinned to one CPU runs with GOMAXPROCS=1.
var pinFlag = flag.String("pin", "", "run servers on these CPUs and the load generator on those, as SERVER/CLIENT cpu lists (e.g. 0/1); empty: no pinning")

// pinning is the parsed -pin, zero when unset.
type pinning struct {
	server, client string // the lists as given, for taskset and the report
	clientSet      unix.CPUSet
}

// parsePin parses s ("0/1", "0-1/2,3"). Every CPU must exist and be allowed
// now, and the two lists must not overlap.
func parsePin(s string) (pinning, error) {
	srv, cli, ok := strings.Cut(s, "/")
	if !ok {
		return pinning{}, fmt.Errorf("-pin %q: want SERVER/CLIENT cpu lists, such as 0/1", s)
	}
	var allowed unix.CPUSet
	if err := unix.SchedGetaffinity(0, &allowed); err != nil {
		return pinning{}, fmt.Errorf("-pin: sched_getaffinity: %w", err)
	}
	var sets [2]unix.CPUSet
	for i, list := range []string{srv, cli} {
		cpus, err := parseCPUList(list)
		if err != nil {
			return pinning{}, fmt.Errorf("-pin %q: %w", s, err)
		}
		for _, c := range cpus {
			if !allowed.IsSet(c) {
				return pinning{}, fmt.Errorf("-pin %q: CPU %d is not available to this process", s, c)
			}
			if i == 1 && sets[0].IsSet(c) {
				return pinning{}, fmt.Errorf("-pin %q: CPU %d is in both lists", s, c)
			}
			sets[i].Set(c)
		}
	}
	return pinning{server: srv, client: cli, clientSet: sets[1]}, nil
}

// parseCPUList parses a taskset/cpuset list: "0", "0,2", "0-3".
func parseCPUList(list string) ([]int, error) {
	var out []int
	for part := range strings.SplitSeq(list, ",") {
		lo, hi, isRange := strings.Cut(part, "-")
		a, err := strconv.Atoi(lo)
		b := a
		if err == nil && isRange {
			b, err = strconv.Atoi(hi)
		}
		if err != nil || a < 0 || b < a || b >= 1024 {
			return nil, fmt.Errorf("bad CPU list %q", list)
		}
		for c := a; c <= b; c++ {
			out = append(out, c)
		}
	}
	return out, nil
}

// activePin is the pinning in force, set by applyPin.
var activePin pinning

// applyPin parses -pin and pins every thread of this process to the client
// CPUs. Threads the Go runtime starts later inherit the mask of the thread
// that creates them, so pinning all current threads pins the process.
func applyPin() error {
	if *pinFlag == "" {
		return nil
	}
	p, err := parsePin(*pinFlag)
	if err != nil {
		return err
	}
	if _, err := exec.LookPath("taskset"); err != nil {
		return fmt.Errorf("-pin needs taskset(1) (util-linux): %w", err)
	}
	// Twice: a thread created from a not-yet-pinned thread during the first
	// pass is caught by the second.
	for range 2 {
		tasks, err := os.ReadDir("/proc/self/task")
		if err != nil {
			return err
		}
		for _, t := range tasks {
			tid, err := strconv.Atoi(t.Name())
			if err != nil {
				continue
			}
			if err := unix.SchedSetaffinity(tid, &p.clientSet); err != nil && err != unix.ESRCH {
				return fmt.Errorf("-pin: sched_setaffinity(%d): %w", tid, err)
			}
		}
	}
	activePin = p
	return nil
}

// pinned returns the argv that runs argv on the server CPUs: unchanged
// without -pin, else through taskset.
func pinned(argv ...string) []string {
	if activePin.server == "" {
		return argv
	}
	return append([]string{"taskset", "-c", activePin.server}, argv...)
}

// pinnedCommand is exec.Command(name, args...) run on the server CPUs.
func pinnedCommand(name string, args ...string) *exec.Cmd {
	argv := pinned(append([]string{name}, args...)...)
	return exec.Command(argv[0], argv[1:]...)
}
