package bench

import (
	"bufio"
	"bytes"
	"cmp"
	"flag"
	"fmt"
	"io"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/imdsproxy/imdsproxy/test/e2e"
)

// Saturation: the cached credential GET at 50 keep-alive connections from
// wrk(1), a load generator written in C that needs far less CPU per request
// than any server here, pinned to the client CPU while the server runs
// alone on the server CPU (-pin). A generator that shares the server's CPUs
// saturates first: the server then looks as fast as the generator lets it,
// and its own cost per request disappears from the throughput. Pinned, the
// server's CPU is busy the whole run and wrk's is not (both are reported),
// so the server is the bottleneck and req/s measures it.
//
// The servers run one after the other in alternating rounds (ceiling,
// daemon, daemon-noaudit, the -other.bin daemon, AEMM; then again), so that
// a slow spell of the VM does not fall on one server only. The report gives
// each server's median over the rounds and the median of its per-round
// ratios to the ceiling run just before it.

var (
	satDuration = flag.Duration("sat.duration", 4*time.Second, "length of each wrk run of BenchmarkSaturation")
	satRounds   = flag.Int("sat.rounds", 5, "alternating rounds of BenchmarkSaturation")
	otherBin    = flag.String("other.bin", "", "also measure this imdsproxy binary (an older build, say) with the default daemon's config, in BenchmarkSaturation and BenchmarkColdFlow")
	otherName   = flag.String("other.name", "other", "name of the -other.bin daemon in the report (daemon-NAME)")
	satPerf     = flag.String("sat.perf", "", "BenchmarkSaturation and BenchmarkColdFlow: record each server with `perf record -g` into this directory during its runs (NAME-ROUND.data, cold-HOST-CLIENTS-NAME.data; perf's sampling costs the servers CPU, so read the profiles, not that run's numbers)")
)

// satConns is wrk's connection count (-c), wrk's threads are 1 (-t1).
const satConns = 50

// wrkRun is one wrk run against one server.
type wrkRun struct {
	ReqPerSec     float64
	P50, P90, P99 time.Duration
	Requests      int64
	Non2xx        int64
	SocketErrors  string        // wrk's "Socket errors" line, "" when none
	Elapsed       time.Duration // wall time of the wrk process
	ServerCPU     time.Duration // the server's user+system time during it
	GenCPU        time.Duration // wrk's user+system time
}

// ServerBusy is the server's CPU time over the run, in percent of one CPU.
func (r wrkRun) ServerBusy() float64 { return 100 * float64(r.ServerCPU) / float64(r.Elapsed) }

// GenBusy is wrk's CPU time over the run, in percent of one CPU.
func (r wrkRun) GenBusy() float64 { return 100 * float64(r.GenCPU) / float64(r.Elapsed) }

// CPUPerReq is the server's CPU time per request answered, in µs.
func (r wrkRun) CPUPerReq() float64 {
	if r.Requests == 0 {
		return 0
	}
	return us(r.ServerCPU) / float64(r.Requests)
}

// satTarget is one server of BenchmarkSaturation.
type satTarget struct {
	name string
	srv  *server
	skip string // why it is not measured
}

// targets are the servers of BenchmarkSaturation and BenchmarkColdFlow in
// the order of a round.
func (e *benchEnv) targets() []satTarget {
	ts := []satTarget{{name: "ceiling", srv: e.ceiling}, {name: "raw", srv: e.raw, skip: e.rawSkip}, {name: "daemon", srv: e.daemon},
		{name: "daemon-noaudit", srv: e.noaudit, skip: e.noauditSkip}}
	if *otherBin != "" {
		ts = append(ts, satTarget{name: "daemon-" + *otherName, srv: e.other, skip: e.otherSkip})
	}
	return append(ts, satTarget{name: "ra-helper", srv: e.rah, skip: e.rahSkip}, satTarget{name: "aemm", srv: e.aemm, skip: e.aemmSkip})
}

// satResults are BenchmarkSaturation's runs, by server name, one per round
// (under satMu); satSkip says why a server has none.
var (
	satMu      sync.Mutex
	satOnce    sync.Once
	satResults = map[string][]wrkRun{}
	satRatios  = map[string][]float64{} // req/s over the same round's ceiling
	satP99     = map[string][]float64{} // p99 over the same round's ceiling's
	satCPU     = map[string][]float64{} // the same round's ceiling's CPU per request over this server's
	satRoundOf = map[string][]int{}     // the round (0-based) of each of satRatios' entries
	satSkip    = map[string]string{}
	satErr     error
	// satCeilClose is one more ceiling run after the last round: with the
	// ceiling's run at the start of every round it brackets each round,
	// so the report can say how far the host moved during it (hostDrift).
	satCeilClose *wrkRun
)

// driftLimit is how far the ceiling's req/s may move between the start of
// a round and the start of the next (the host changing speed under the
// round) for the round to count as steady in the report.
const driftLimit = 0.10

// benchSaturation is BenchmarkSaturation: every round once per process,
// then one sub-benchmark per server reporting its medians.
func benchSaturation(b *testing.B) {
	env := getEnv(b)
	if activePin.server == "" {
		b.Skip("SKIPPED (LOUDLY): BenchmarkSaturation needs -pin SERVER/CLIENT: a load generator sharing the server's CPUs saturates before the server does and hides its cost")
	}
	wrk, err := exec.LookPath("wrk")
	if err != nil {
		b.Skipf("SKIPPED (LOUDLY): wrk is not installed (apt-get install wrk; make bench installs it): %v", err)
	}
	satOnce.Do(func() { satErr = runSaturation(env, wrk) })
	if satErr != nil {
		b.Fatal(satErr)
	}
	for _, t := range env.targets() {
		b.Run(t.name, func(b *testing.B) {
			satMu.Lock()
			runs, skip := satResults[t.name], satSkip[t.name]
			ratios, p99s := satRatios[t.name], satP99[t.name]
			satMu.Unlock()
			if len(runs) == 0 {
				b.Skipf("SKIPPED (LOUDLY): %s: %s", t.name, skip)
			}
			m := medianRun(runs)
			b.ReportMetric(0, "ns/op")
			b.ReportMetric(m.ReqPerSec, "req/s")
			b.ReportMetric(us(m.P50), "p50_us")
			b.ReportMetric(us(m.P99), "p99_us")
			if len(ratios) > 0 {
				b.ReportMetric(median(ratios), "ratio_to_ceiling")
				b.ReportMetric(median(p99s), "p99_ratio_to_ceiling")
			}
			satMu.Lock()
			cpu := satCPU[t.name]
			satMu.Unlock()
			if len(cpu) > 0 {
				b.ReportMetric(median(cpu), "cpu_ratio_to_ceiling")
			}
		})
	}
}

// runSaturation runs satRounds rounds over every server.
func runSaturation(env *benchEnv, wrk string) error {
	for round := range *satRounds {
		var ceil *wrkRun
		for _, t := range env.targets() {
			srv := t.srv
			if t.name == "aemm" {
				srv = env.aemm // restarted after a crash
			}
			if srv == nil || srv.exited() {
				satMu.Lock()
				if satSkip[t.name] == "" {
					satSkip[t.name] = cmp.Or(t.skip, "not running")
				}
				satMu.Unlock()
				continue
			}
			time.Sleep(250 * time.Millisecond) // let the previous run's connections close
			stopPerf := startPerf(srv, fmt.Sprintf("%s-%d", t.name, round+1))
			r, err := runWrk(wrk, srv, *satDuration)
			stopPerf()
			if err != nil {
				return fmt.Errorf("saturation round %d, %s: %w; end of its output:\n%s", round+1, t.name, err, tail(srv.out.String(), 3000))
			}
			if srv.exited() {
				return fmt.Errorf("saturation round %d: %s exited during the run (%s); end of its output:\n%s", round+1, t.name, srv.state(), tail(srv.out.String(), 3000))
			}
			satMu.Lock()
			satResults[t.name] = append(satResults[t.name], r)
			if t.name == "ceiling" {
				ceil = &r
			} else if ceil != nil && ceil.ReqPerSec > 0 && ceil.P99 > 0 {
				satRatios[t.name] = append(satRatios[t.name], r.ReqPerSec/ceil.ReqPerSec)
				satRoundOf[t.name] = append(satRoundOf[t.name], round)
				satP99[t.name] = append(satP99[t.name], float64(r.P99)/float64(ceil.P99))
				if r.CPUPerReq() > 0 {
					satCPU[t.name] = append(satCPU[t.name], ceil.CPUPerReq()/r.CPUPerReq())
				}
			}
			satMu.Unlock()
			fmt.Fprintf(os.Stderr, "saturation round %d %-16s %8.0f req/s  p50 %6.0f µs  p99 %6.0f µs  server CPU %3.0f%% (%.1f µs/req)  wrk CPU %3.0f%%\n",
				round+1, t.name, r.ReqPerSec, us(r.P50), us(r.P99), r.ServerBusy(), r.CPUPerReq(), r.GenBusy())
		}
	}
	if env.ceiling != nil && !env.ceiling.exited() {
		time.Sleep(250 * time.Millisecond)
		r, err := runWrk(wrk, env.ceiling, *satDuration)
		if err != nil {
			return fmt.Errorf("saturation: the closing ceiling run: %w", err)
		}
		satMu.Lock()
		satCeilClose = &r
		satMu.Unlock()
		fmt.Fprintf(os.Stderr, "saturation closing    ceiling          %8.0f req/s\n", r.ReqPerSec)
	}
	return nil
}

// hostDrift is, for each round, the ceiling's req/s at the start of the
// next round (after the last: the closing run) over that at the start of
// this one; nil without a closing run. satMu must be held.
func hostDrift() []float64 {
	ceil := satResults["ceiling"]
	if satCeilClose == nil || len(ceil) == 0 {
		return nil
	}
	d := make([]float64, len(ceil))
	for i, r := range ceil {
		next := *satCeilClose
		if i+1 < len(ceil) {
			next = ceil[i+1]
		}
		if r.ReqPerSec > 0 {
			d[i] = next.ReqPerSec / r.ReqPerSec
		}
	}
	return d
}

// steady reports whether a round's drift stayed within driftLimit.
func steady(drift float64) bool { return drift > 0 && math.Abs(drift-1) <= driftLimit }

// startPerf starts `perf record -g` on srv's process when -sat.perf is set
// and returns the function that stops it (SIGINT: perf writes its file).
func startPerf(srv *server, name string) (stop func()) {
	if *satPerf == "" {
		return func() {}
	}
	cmd := exec.Command("perf", "record", "-q", "-F", "1999", "-g", "-p", strconv.Itoa(srv.pid),
		"-o", filepath.Join(*satPerf, strings.NewReplacer("/", "_", " ", "_").Replace(name)+".data"))
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Start(); err != nil {
		fmt.Fprintln(os.Stderr, "perf:", err)
		return func() {}
	}
	return func() {
		_ = cmd.Process.Signal(os.Interrupt)
		_ = cmd.Wait()
	}
}

// runWrk runs `wrk -t1 -c50 -dD --latency` for the cached credential GET of
// srv with its session token, on this process's CPUs (the client CPUs with
// -pin), and parses its report. It fails when a response was not a 2xx or
// wrk counted socket errors.
func runWrk(wrk string, srv *server, d time.Duration) (wrkRun, error) {
	url := srv.base + e2e.CredentialsPath + srv.role
	cmd := exec.Command(wrk, "-t1", "-c"+strconv.Itoa(satConns), "-d"+strconv.Itoa(int(d.Seconds()))+"s", "--latency",
		"-H", e2e.TokenHeader+": "+srv.tok, url)
	cmd.Env = []string{"PATH=/usr/bin:/bin"}
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	cpu0, err := procCPU(srv.pid)
	if err != nil {
		return wrkRun{}, err
	}
	t0 := time.Now()
	if err := cmd.Run(); err != nil {
		return wrkRun{}, fmt.Errorf("wrk: %v:\n%s", err, out.String())
	}
	elapsed := time.Since(t0)
	cpu1, err := procCPU(srv.pid)
	if err != nil {
		return wrkRun{}, err
	}
	r, err := parseWrk(&out)
	if err != nil {
		return wrkRun{}, fmt.Errorf("wrk output: %v:\n%s", err, out.String())
	}
	r.Elapsed, r.ServerCPU = elapsed, cpu1-cpu0
	if ru, ok := cmd.ProcessState.SysUsage().(*syscall.Rusage); ok {
		r.GenCPU = time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	}
	if r.Non2xx > 0 || r.SocketErrors != "" {
		return r, fmt.Errorf("wrk: %d non-2xx responses, socket errors %q:\n%s", r.Non2xx, r.SocketErrors, out.String())
	}
	return r, nil
}

var (
	wrkPercentile = regexp.MustCompile(`^\s*(50|90|99)(?:\.000)?%\s+([0-9.]+)(us|ms|s)\s*$`)
	wrkRequests   = regexp.MustCompile(`^\s*([0-9]+) requests in `)
	wrkRate       = regexp.MustCompile(`^Requests/sec:\s+([0-9.]+)\s*$`)
	wrkNon2xx     = regexp.MustCompile(`^\s*Non-2xx or 3xx responses:\s+([0-9]+)\s*$`)
	wrkSocketErr  = regexp.MustCompile(`^\s*Socket errors:\s+(.*)$`)
)

// parseWrk reads wrk's report (with --latency): the 50/90/99% latencies,
// the request count, Requests/sec, and the error lines when present.
func parseWrk(r io.Reader) (wrkRun, error) {
	var w wrkRun
	var have int
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		line := sc.Text()
		switch {
		case wrkPercentile.MatchString(line):
			m := wrkPercentile.FindStringSubmatch(line)
			v, err := strconv.ParseFloat(m[2], 64)
			if err != nil {
				return w, err
			}
			unit := map[string]time.Duration{"us": time.Microsecond, "ms": time.Millisecond, "s": time.Second}[m[3]]
			d := time.Duration(v * float64(unit))
			switch m[1] {
			case "50":
				w.P50 = d
			case "90":
				w.P90 = d
			case "99":
				w.P99 = d
			}
			have++
		case wrkRequests.MatchString(line):
			w.Requests, _ = strconv.ParseInt(wrkRequests.FindStringSubmatch(line)[1], 10, 64)
		case wrkRate.MatchString(line):
			v, err := strconv.ParseFloat(wrkRate.FindStringSubmatch(line)[1], 64)
			if err != nil {
				return w, err
			}
			w.ReqPerSec = v
			have++
		case wrkNon2xx.MatchString(line):
			w.Non2xx, _ = strconv.ParseInt(wrkNon2xx.FindStringSubmatch(line)[1], 10, 64)
		case wrkSocketErr.MatchString(line):
			w.SocketErrors = strings.TrimSpace(wrkSocketErr.FindStringSubmatch(line)[1])
		}
	}
	if have != 4 || w.Requests == 0 {
		return w, fmt.Errorf("no latency distribution or request rate (is it wrk 4 with --latency?)")
	}
	return w, sc.Err()
}

// median is the median of xs (the mean of the middle two for an even count).
func median(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := slices.Sorted(slices.Values(xs))
	n := len(s)
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

// medianRun is the field-by-field median of runs.
func medianRun(runs []wrkRun) wrkRun {
	pick := func(f func(wrkRun) float64) float64 {
		xs := make([]float64, len(runs))
		for i, r := range runs {
			xs[i] = f(r)
		}
		return median(xs)
	}
	return wrkRun{
		ReqPerSec: pick(func(r wrkRun) float64 { return r.ReqPerSec }),
		P50:       time.Duration(pick(func(r wrkRun) float64 { return float64(r.P50) })),
		P90:       time.Duration(pick(func(r wrkRun) float64 { return float64(r.P90) })),
		P99:       time.Duration(pick(func(r wrkRun) float64 { return float64(r.P99) })),
		Elapsed:   time.Second,
		ServerCPU: time.Duration(pick(func(r wrkRun) float64 { return float64(r.ServerCPU) / float64(r.Elapsed) * float64(time.Second) })),
		GenCPU:    time.Duration(pick(func(r wrkRun) float64 { return float64(r.GenCPU) / float64(r.Elapsed) * float64(time.Second) })),
	}
}

// printSaturation writes BenchmarkSaturation's table.
func printSaturation(w io.Writer) {
	satMu.Lock()
	defer satMu.Unlock()
	if len(satResults) == 0 && len(satSkip) == 0 {
		return
	}
	fmt.Fprintf(w, "\nSaturation: cached credential GET with a valid IMDSv2 token, `wrk -t1 -c%d -d%s --latency` on CPU %s, each server alone on CPU %s; %d alternating rounds, medians (ratios: the median of each round's ratio to the ceiling run just before).\n\n",
		satConns, *satDuration, activePin.client, activePin.server, *satRounds)
	fmt.Fprintln(w, "| server | req/s | × ceiling req/s (per round) | p50 µs | p99 µs | × ceiling p99 (per round) | server CPU % | wrk CPU % | server CPU µs / req | ceiling's CPU/req ÷ this (per round) |")
	fmt.Fprintln(w, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
	if envVal == nil {
		return
	}
	for _, t := range envVal.targets() {
		runs := satResults[t.name]
		if len(runs) == 0 {
			fmt.Fprintf(w, "| %s | skipped: %s | | | | | | | | |\n", t.name, firstLine(cmp.Or(satSkip[t.name], t.skip)))
			continue
		}
		m := medianRun(runs)
		ratio, p99r, cpur := "", "", ""
		if rs := satRatios[t.name]; len(rs) > 0 {
			ratio = fmt.Sprintf("%.2f (%s)", median(rs), fmtList(rs, "%.2f"))
			p99r = fmt.Sprintf("%.2f (%s)", median(satP99[t.name]), fmtList(satP99[t.name], "%.2f"))
		}
		if cs := satCPU[t.name]; len(cs) > 0 {
			cpur = fmt.Sprintf("%.2f (%s)", median(cs), fmtList(cs, "%.2f"))
		}
		cpu := make([]float64, len(runs))
		for i, r := range runs {
			cpu[i] = r.CPUPerReq()
		}
		fmt.Fprintf(w, "| %s | %.0f | %s | %.0f | %.0f | %s | %.0f | %.0f | %.1f | %s |\n",
			t.name, m.ReqPerSec, ratio, us(m.P50), us(m.P99), p99r, m.ServerBusy(), m.GenBusy(), median(cpu), cpur)
	}
	writeDrift(w, envVal.targets())
}

// writeDrift reports how far the host moved under each round and the
// servers' median ratios over the rounds where it held still.
func writeDrift(w io.Writer, targets []satTarget) {
	drift := hostDrift()
	if drift == nil {
		return
	}
	marks := make([]string, len(drift))
	nSteady := 0
	for i, d := range drift {
		marks[i] = fmt.Sprintf("%.2f", d)
		if steady(d) {
			nSteady++
		} else {
			marks[i] += " (moved)"
		}
	}
	fmt.Fprintf(w, "\nHost drift per round (the ceiling's req/s at the start of the next round, after the last a closing ceiling run, ÷ at the start of this one): %s. A round where it moved by more than %.0f%% had the host change speed under it; its ratios compare runs made at different speeds.\n",
		strings.Join(marks, ", "), driftLimit*100)
	if nSteady == 0 {
		fmt.Fprintln(w, "\nNo round was steady.")
		return
	}
	var parts []string
	for _, t := range targets {
		rs, p99s, rounds := satRatios[t.name], satP99[t.name], satRoundOf[t.name]
		var sr, sp []float64
		for i, r := range rounds {
			if r < len(drift) && steady(drift[r]) {
				sr, sp = append(sr, rs[i]), append(sp, p99s[i])
			}
		}
		if len(sr) > 0 {
			parts = append(parts, fmt.Sprintf("%s %.2f × req/s, %.2f × p99", t.name, median(sr), median(sp)))
		}
	}
	fmt.Fprintf(w, "\nMedians over the %d steady round(s) of %d: %s.\n", nSteady, len(drift), strings.Join(parts, "; "))
}

func fmtList(xs []float64, f string) string {
	parts := make([]string, len(xs))
	for i, x := range xs {
		parts[i] = fmt.Sprintf(f, x)
	}
	return strings.Join(parts, ", ")
}

func firstLine(s string) string {
	l, _, _ := strings.Cut(s, "\n")
	return l
}
