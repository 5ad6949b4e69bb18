package peer

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// cpuLoop runs f b.N times (b.Loop) and reports, besides the mean wall
// time, two figures less sensitive to a shared machine, whose other
// processes hold the CPUs at times: the CPU time (user and system, all
// threads) this process spent per iteration, and the 10th percentile of
// the wall time per iteration over batches of batchSize iterations — the
// cost when undisturbed.
func cpuLoop(b *testing.B, f func()) {
	const batchSize = 50
	var before, after unix.Rusage
	_ = unix.Getrusage(unix.RUSAGE_SELF, &before)
	var batches []time.Duration
	n := 0
	start := time.Now()
	for b.Loop() {
		f()
		n++
		if n%batchSize == 0 {
			now := time.Now()
			batches = append(batches, now.Sub(start))
			start = now
		}
	}
	_ = unix.Getrusage(unix.RUSAGE_SELF, &after)
	cpu := time.Duration(after.Utime.Nano() + after.Stime.Nano() - before.Utime.Nano() - before.Stime.Nano())
	b.ReportMetric(float64(cpu.Nanoseconds())/float64(n), "cpu-ns/op")
	if len(batches) >= 10 {
		slices.Sort(batches)
		b.ReportMetric(float64(batches[len(batches)/10].Nanoseconds())/batchSize, "p10-ns/op")
	}
}

// benchProcs is the numbers of extra idle processes BenchmarkIdentify runs
// with: PEER_BENCH_PROCS (comma separated), default 0 and 2000.
func benchProcs(b *testing.B) []int {
	s := os.Getenv("PEER_BENCH_PROCS")
	if s == "" {
		return []int{0, 2000}
	}
	var ns []int
	for f := range strings.SplitSeq(s, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 0 {
			b.Fatalf("PEER_BENCH_PROCS=%q", s)
		}
		ns = append(ns, n)
	}
	return ns
}

// BenchmarkIdentify measures the identification of a connection's client
// on an idle host and with extra idle processes (sleep, 50 open files
// each, in this process's cgroup, children of a shell: not of this process,
// whose heap and fd table they would grow, as they do not the daemon's),
// which must not change it:
//
//   - lookup: LookupConn alone — uid, cgroup and unit, what access
//     decisions need (sock_diag and the cgroup map);
//   - ebpf: LookupConn and Process in ModeEBPF (pid, exe);
//   - cgroup_procs: LookupConn and Process in ModeCgroupProcs, allowed to
//     read every process's fds (root);
//
// for a root client in a cgroup of its own, as a systemd service or scope
// is; and new_conn/*: a new connection from this process each time (dial,
// accept, identify, close; baseline without identifying), where
// ModeCgroupProcs searches this process's cgroup, crowded with the extra
// processes — at most maxSearchProcs of them. It needs root and a cgroup2
// mount.
func BenchmarkIdentify(b *testing.B) {
	skipIfUnsupported(b)
	ctx := context.Background()
	for _, procs := range benchProcs(b) {
		b.Run(fmt.Sprintf("procs=%d", procs), func(b *testing.B) {
			spawnIdleShell(b, procs, 50)
			fallback := newTestResolver(b, Options{BPF: BPFOff})
			var ebpf *Resolver
			if r, err := newResolver(Options{BPF: BPFRequired}, hostEnv()); err != nil {
				b.Logf("eBPF not available: %v", err)
			} else {
				ebpf = r
				b.Cleanup(func() { r.Close() })
			}
			c := startCgroupClient(b, 0) // after the Resolvers: the eBPF table sees its socket
			identify := func(name string, r *Resolver, process bool) {
				b.Run(name, func(b *testing.B) {
					if r == nil {
						b.Skip("SKIPPED: eBPF is not available")
					}
					cpuLoop(b, func() {
						info, err := r.LookupConn(ctx, c.server)
						if err != nil {
							b.Fatal(err)
						}
						if process {
							info = r.Process(ctx, info)
						}
						if info.Unit != c.unit || process && info.PID != c.pid {
							b.Fatalf("%+v, want unit %s pid %d", info, c.unit, c.pid)
						}
					})
				})
			}
			identify("lookup", fallback, false)
			identify("ebpf", ebpf, true)
			identify("cgroup_procs", fallback, true)

			ln, err := net.Listen("tcp4", "127.0.0.1:0")
			if err != nil {
				b.Fatal(err)
			}
			defer ln.Close()
			newConn := func(name string, r *Resolver, process bool) {
				b.Run("new_conn/"+name, func(b *testing.B) {
					if name == "ebpf" && r == nil {
						b.Skip("SKIPPED: eBPF is not available")
					}
					cpuLoop(b, func() {
						client, err := net.Dial("tcp4", ln.Addr().String())
						if err != nil {
							b.Fatal(err)
						}
						server, err := ln.Accept()
						if err != nil {
							b.Fatal(err)
						}
						if r != nil {
							info, err := r.LookupConn(ctx, server)
							if err != nil {
								b.Fatal(err)
							}
							if process {
								info = r.Process(ctx, info)
							}
							if name == "ebpf" && info.PID != os.Getpid() {
								b.Fatalf("%+v, want pid %d", info, os.Getpid())
							}
						}
						server.Close()
						client.Close()
					})
				})
			}
			newConn("baseline", nil, false)
			newConn("lookup", fallback, false)
			newConn("ebpf", ebpf, true)
			newConn("cgroup_procs", fallback, true)
		})
	}
}

// BenchmarkSocketCreate measures what ModeEBPF costs every other process
// on the host: socket(2) and close(2) of a TCP socket, without and with the
// programs attached (the create program's map update, the release
// program's delete).
func BenchmarkSocketCreate(b *testing.B) {
	skipIfUnsupported(b)
	create := func(b *testing.B) {
		for b.Loop() {
			fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
			if err != nil {
				b.Fatal(err)
			}
			unix.Close(fd)
		}
	}
	b.Run("without_programs", create)
	b.Run("with_programs", func(b *testing.B) {
		ebpfResolver(b)
		create(b)
	})
}

// idleShell starts $N sleeps holding $F open files each (0, 1, 2 and 3..F-1
// on /dev/null), says "ready", and on SIGTERM kills and reaps them.
const idleShell = `for ((fd = 3; fd < F; fd++)); do eval "exec $fd</dev/null"; done
trap 'kill $(jobs -p) 2>/dev/null; wait; exit 0' TERM
for ((i = 0; i < N; i++)); do sleep 600 & done
echo ready
wait`

// spawnIdleShell starts n idle processes holding fds open files each, as
// children of a bash (in a process group of its own) rather than of this
// process, and at the end of the benchmark has the shell kill and reap
// them (SIGKILL to the group if it has not within 10 s). They end by
// themselves after 10 minutes.
func spawnIdleShell(b *testing.B, n, fds int) {
	b.Helper()
	if n == 0 {
		return
	}
	if _, err := exec.LookPath("bash"); err != nil {
		b.Skip("SKIPPED: bash is not installed")
	}
	cmd := exec.Command("bash", "-c", idleShell)
	cmd.Env = append(os.Environ(), "N="+strconv.Itoa(n), "F="+strconv.Itoa(fds))
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGTERM}
	out, err := cmd.StdoutPipe()
	if err != nil {
		b.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		t := time.AfterFunc(10*time.Second, func() { _ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) })
		defer t.Stop()
		_ = cmd.Wait()
	})
	if line, err := bufio.NewReader(out).ReadString('\n'); err != nil || line != "ready\n" {
		b.Fatalf("idle processes: %q, %v", line, err)
	}
}
