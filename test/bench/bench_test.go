package bench

import (
	"flag"
	"fmt"
	"io"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// scenario is one kind of operation the load generator repeats.
type scenario struct {
	name      string
	what      string // for the report
	reqsPerOp int
	op        func(*worker) error
}

var scenarios = []scenario{
	{"creds-get", "cached credential GET", 1, (*worker).getCreds},
	{"imdsv2-flow", "IMDSv2 flow (PUT token, GET listing, GET creds)", 3, (*worker).flow},
}

// resultsMu guards intercepted and aemmCrashes.
var resultsMu sync.Mutex

func resultKey(sc string, conns int, target string) string {
	return fmt.Sprintf("%s/%d/%s", sc, conns, target)
}

// targets are the servers of BenchmarkIMDSPaced, in the order they run: the
// ceiling just before the daemon, then AEMM.
var targets = []string{"ceiling", "daemon", "aemm"}

// target returns the server called name, or skips b (AEMM missing).
func (e *benchEnv) target(b *testing.B, name string) *server {
	switch name {
	case "ceiling":
		return e.ceiling
	case "daemon":
		return e.daemon
	case "aemm":
		if e.aemm == nil {
			b.Skipf("SKIPPED (LOUDLY): amazon-ec2-metadata-mock: %s", e.aemmSkip)
		}
		if e.aemm.exited() {
			b.Fatalf("amazon-ec2-metadata-mock has exited (%s); the end of its output:\n%s", e.aemm.state(), tail(e.aemm.out.String(), 4000))
		}
		return e.aemm
	}
	b.Fatalf("unknown target %q", name)
	return nil
}

// BenchmarkSaturation is the cached credential GET at saturation: wrk
// pinned to the client CPU, each server alone on the server CPU, in
// alternating rounds (wrk_test.go). It needs -pin and wrk.
func BenchmarkSaturation(b *testing.B) { benchSaturation(b) }

// BenchmarkColdFlow is the SDK's cold flow (PUT token, GET listing, GET
// credentials, each on a new connection) from 1 and 8 clients, on the host
// at rest and with 2,000 more idle processes (coldflow_test.go).
func BenchmarkColdFlow(b *testing.B) { benchColdFlow(b) }

// aemmCrashes holds, by result or paced key, why AEMM stopped during that
// run (under resultsMu).
var aemmCrashes = map[string]string{}

// checkAEMMCrash, when srv is AEMM and it has exited, records the reason
// (the Go runtime's fatal error and the first AEMM function in its trace),
// starts a fresh AEMM for the benchmarks that follow, and skips b: a crash
// is AEMM's result, not a failure of the harness.
func (e *benchEnv) checkAEMMCrash(b *testing.B, srv *server, key string) {
	if srv.name != "aemm" || !srv.exited() {
		return
	}
	out := srv.out.String()
	reason := fmt.Sprintf("exited (%s)", srv.state())
	// AEMM logs each request on stdout, which may interleave with the
	// runtime's message on stderr: look for the message itself first.
	lines := strings.Split(out, "\n")
	at := -1
	for _, msg := range []string{"concurrent map writes", "concurrent map read and map write", "fatal error:", "panic:"} {
		for i, l := range lines {
			if j := strings.Index(l, msg); j >= 0 {
				at, reason = i, strings.TrimSpace(l[j:])
				break
			}
		}
		if at >= 0 {
			break
		}
	}
	if at >= 0 {
		for _, f := range lines[at+1:] {
			if f = strings.TrimSpace(f); strings.HasPrefix(f, "github.com/aws/amazon-ec2-metadata-mock/") {
				reason += " in " + strings.TrimPrefix(f[:strings.IndexByte(f+"(", '(')], "github.com/aws/amazon-ec2-metadata-mock/pkg/")
				break
			}
		}
	}
	resultsMu.Lock()
	aemmCrashes[key] = reason
	resultsMu.Unlock()
	fmt.Fprintf(os.Stderr, "\n*** amazon-ec2-metadata-mock CRASHED during %s: %s; end of its output:\n%s\n*** restarting it for the next benchmarks ***\n\n", b.Name(), reason, tail(out, 3000))
	if e.aemm, e.aemmSkip = e.startAEMM(); e.aemmSkip != "" {
		fmt.Fprintf(os.Stderr, "*** could not restart amazon-ec2-metadata-mock: %s ***\n", e.aemmSkip)
	}
	b.Skipf("amazon-ec2-metadata-mock crashed: %s", reason)
}

// measureClosed runs one closed-loop benchmark against srv and reports it.
func measureClosed(b *testing.B, env *benchEnv, srv *server, sc scenario, conns int, key string) loadResult {
	b.StopTimer()
	res, err := runLoad(srv.ep(), srv.tok, srv.pid, conns, b.N, sc.reqsPerOp, sc.op,
		func() { b.ResetTimer(); b.StartTimer() }, b.StopTimer)
	env.checkAEMMCrash(b, srv, key)
	if err != nil {
		b.Fatalf("%s: %v; end of server output:\n%s", srv.name, err, tail(srv.out.String(), 4000))
	}
	if srv.exited() {
		b.Fatalf("%s exited during the run (%s); end of output:\n%s", srv.name, srv.state(), tail(srv.out.String(), 4000))
	}
	if res.Errors > 0 {
		b.Errorf("%s: %d of %d operations failed; first: %v", srv.name, res.Errors, res.Ops, res.FirstErr)
	}
	b.ReportMetric(us(res.P50), "p50_us")
	b.ReportMetric(us(res.P99), "p99_us")
	b.ReportMetric(res.ReqPerSec, "req/s")
	b.ReportMetric(res.CPUPer1k(), "cpu_ms/1k")
	b.ReportMetric(mb(res.RSSMaxKB), "rss_MB")
	return res
}

// Open-loop parameters: go test ./test/bench/ -bench Paced -paced.rate 2000,4000
// runs the paced benchmarks at each listed offered load.
var (
	pacedRates    = flag.String("paced.rate", "2000", "offered loads of BenchmarkIMDSPaced, total HTTP requests per second, comma-separated")
	pacedDuration = flag.Duration("paced.duration", 5*time.Second, "length of each BenchmarkIMDSPaced run")
)

const pacedConns = 50

// sleepingRuns holds every open-loop run of the sleeping generator, by
// "scenario/conns/rate/target", with the daemon's own histogram of its runs.
// A paced run is timed, not b.N-driven: it runs once per process and later
// calls of the same sub-benchmark report the same numbers (like the token
// flood). pacedMu guards it, spinRuns and interceptPaced.
var (
	pacedMu      sync.Mutex
	sleepingRuns = newPacedRuns[pacedResult]()
)

func pacedKey(sc string, conns, rate int, target string) string {
	return fmt.Sprintf("%s/%d/%d/%s", sc, conns, rate, target)
}

func parseRates(s string) ([]int, error) {
	var rates []int
	for f := range strings.SplitSeq(s, ",") {
		r, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || r <= 0 {
			return nil, fmt.Errorf("-paced.rate %q: want positive integers separated by commas", s)
		}
		rates = append(rates, r)
	}
	return rates, nil
}

// BenchmarkIMDSPaced is the open-loop counterpart of BenchmarkIMDS: 50
// keep-alive connections offering a fixed total load (-paced.rate HTTP
// requests per second, 2,000 by default, for -paced.duration), the ceiling
// and then the daemon, with latency measured from each operation's scheduled
// send time (see runPaced). At 2,000 req/s each creds-get worker sends every
// 25 ms, and each imdsv2-flow worker starts a flow every 75 ms (about 667
// flows/s). Latencies are per operation; req/s is the achieved rate.
func BenchmarkIMDSPaced(b *testing.B) {
	rates, err := parseRates(*pacedRates)
	if err != nil {
		b.Fatal(err)
	}
	env := getEnv(b)
	for _, sc := range scenarios {
		for _, rate := range rates {
			for _, target := range targets {
				gen := "" // the default generator keeps its names
				if *pacedSpin {
					gen = "spin/"
				}
				b.Run(fmt.Sprintf("%s/conns=%d/rate=%d/%s%s", sc.name, pacedConns, rate, gen, target), func(b *testing.B) {
					if *pacedSpin {
						benchSpin(b, env, sc, rate, target)
						return
					}
					srv := env.target(b, target)
					key := pacedKey(sc.name, pacedConns, rate, target)
					res, side, err := sleepingRuns.once(key, srv, func() (pacedResult, error) {
						return runPaced(srv.ep(), srv.tok, srv.pid, pacedConns, float64(rate), *pacedDuration, sc.reqsPerOp, sc.op)
					})
					checkPaced(b, env, srv, target, key, res, err)
					b.ReportMetric(mb(res.RSSMaxKB), "rss_MB")
					b.ReportMetric(us(res.WakeP99), "wake_p99_us")
					reportSide(b, side)
				})
			}
		}
	}
}

// interceptCases are the closed-loop runs of BenchmarkIntercept.
var interceptCases = []struct {
	sc    scenario
	conns int
}{
	{scenarios[0], 1},
	{scenarios[1], 1},
}

// intercepted holds BenchmarkIntercept's runs by "scenario/conns/path".
var intercepted = map[string]loadResult{}

// BenchmarkIntercept measures the daemon in its own network namespace with
// interception enabled, from the same workers, through the nftables redirect
// (http://169.254.169.254/) and directly (http://127.0.0.1:PORT/), direct
// first. It skips, loudly, when not root or without ip netns and nft.
func BenchmarkIntercept(b *testing.B) {
	env := getEnv(b)
	for _, c := range interceptCases {
		for _, path := range []string{"direct", "redirect"} {
			b.Run(fmt.Sprintf("%s/conns=%d/%s", c.sc.name, c.conns, path), func(b *testing.B) {
				if env.ns == nil {
					b.Skipf("SKIPPED (LOUDLY): interception path: %s", env.nsSkip)
				}
				srv := env.ns.direct
				if path == "redirect" {
					srv = env.ns.redirect
				}
				res := measureClosed(b, env, srv, c.sc, c.conns, "")
				resultsMu.Lock()
				intercepted[resultKey(c.sc.name, c.conns, path)] = res
				d, ok := intercepted[resultKey(c.sc.name, c.conns, "direct")]
				resultsMu.Unlock()
				if path == "redirect" && ok {
					b.ReportMetric(us(res.P50-d.P50), "added_p50_us")
				}
			})
		}
	}
	// Open loop: creds-get at the default paced load, each path once.
	rates, err := parseRates(*pacedRates)
	if err != nil {
		b.Fatal(err)
	}
	sc, rate := scenarios[0], rates[len(rates)-1]
	for _, path := range []string{"direct", "redirect"} {
		b.Run(fmt.Sprintf("%s/conns=%d/rate=%d/%s", sc.name, pacedConns, rate, path), func(b *testing.B) {
			if env.ns == nil {
				b.Skipf("SKIPPED (LOUDLY): interception path: %s", env.nsSkip)
			}
			srv := env.ns.direct
			if path == "redirect" {
				srv = env.ns.redirect
			}
			key := pacedKey(sc.name, pacedConns, rate, path)
			pacedMu.Lock()
			res, done := interceptPaced[key]
			pacedMu.Unlock()
			if !done {
				time.Sleep(250 * time.Millisecond)
				r, err := runPaced(srv.ep(), srv.tok, srv.pid, pacedConns, float64(rate), *pacedDuration, sc.reqsPerOp, sc.op)
				if err != nil {
					b.Fatalf("%s: %v; server output:\n%s", srv.name, err, srv.out)
				}
				res = &r
				pacedMu.Lock()
				interceptPaced[key] = res
				pacedMu.Unlock()
			}
			if res.Errors > 0 {
				b.Errorf("%s: %d of %d operations failed; first: %v", srv.name, res.Errors, res.Ops, res.FirstErr)
			}
			b.ReportMetric(0, "ns/op")
			b.ReportMetric(us(res.P50), "p50_us")
			b.ReportMetric(us(res.P99), "p99_us")
			b.ReportMetric(res.ReqPerSec, "req/s")
			b.ReportMetric(res.CPUPer1k(), "cpu_ms/1k")
		})
	}
}

// interceptPaced holds BenchmarkIntercept's open-loop runs by
// "scenario/conns/rate/path", under pacedMu; like every paced run, each runs
// once per process.
var interceptPaced = map[string]*pacedResult{}

// Token flood parameters.
const (
	floodConns    = 50
	floodDuration = 10 * time.Second
	floodSettle   = 5 * time.Second
)

type floodResult struct {
	Tokens                        int64
	Errors                        int64
	FirstErr                      error
	Elapsed                       time.Duration
	CPU                           time.Duration
	RSSBefore, RSSEnd, RSSAfter   int64 // KiB
	RSSPeak                       int64 // KiB, sampled every 100 ms during the flood
	TokensPerSec, CPUPer1kTokenMs float64
}

var (
	floodOnce sync.Once
	flood     *floodResult
	floodErr  error
)

// BenchmarkTokenFlood PUTs tokens at the daemon from 50 connections for 10 s,
// as fast as they are answered, and reports its RSS before, at the end of the
// flood and 5 s later. The flood is timed, not b.N-driven: it runs once per
// process (about 15 s, so a -benchtime below that never asks for a second
// run) and later calls report the same numbers.
func BenchmarkTokenFlood(b *testing.B) {
	env := getEnv(b)
	floodOnce.Do(func() { flood, floodErr = runFlood(env) })
	if floodErr != nil {
		b.Fatalf("token flood: %v; daemon output:\n%s", floodErr, env.daemon.out)
	}
	f := flood
	if f.Errors > 0 {
		b.Errorf("token flood: %d of %d PUTs failed; first: %v", f.Errors, f.Tokens+f.Errors, f.FirstErr)
	}
	b.ReportMetric(0, "ns/op")
	b.ReportMetric(f.TokensPerSec, "tokens/s")
	b.ReportMetric(f.CPUPer1kTokenMs, "cpu_ms/1k")
	b.ReportMetric(mb(f.RSSBefore), "rss_before_MB")
	b.ReportMetric(mb(f.RSSPeak), "rss_peak_MB")
	b.ReportMetric(mb(f.RSSEnd), "rss_end_MB")
	b.ReportMetric(mb(f.RSSAfter), "rss_after5s_MB")
}

func runFlood(env *benchEnv) (*floodResult, error) {
	d := env.daemon
	f := &floodResult{}
	var err error
	if f.RSSBefore, err = procRSSKB(d.pid); err != nil {
		return nil, err
	}
	workers := make([]*worker, floodConns)
	for i := range workers {
		if workers[i], err = newWorker(d.ep(), d.tok); err != nil {
			return nil, err
		}
	}
	defer func() {
		for _, w := range workers {
			w.c.CloseIdleConnections()
		}
	}()
	var tokens, nerr atomic.Int64
	var firstErr atomic.Pointer[error]
	var wg sync.WaitGroup
	rss := newRSSSampler(d.pid, 100*time.Millisecond)
	cpu0, err := procCPU(d.pid)
	if err != nil {
		return nil, err
	}
	t0 := time.Now()
	deadline := t0.Add(floodDuration)
	for _, w := range workers {
		wg.Go(func() {
			var n, e int64
			for time.Now().Before(deadline) {
				if err := w.putToken(); err != nil {
					e++
					firstErr.CompareAndSwap(nil, &err)
					continue
				}
				n++
			}
			tokens.Add(n)
			nerr.Add(e)
		})
	}
	wg.Wait()
	f.Elapsed = time.Since(t0)
	cpu1, err := procCPU(d.pid)
	if err != nil {
		return nil, err
	}
	f.RSSPeak = rss.stop()
	if f.RSSEnd, err = procRSSKB(d.pid); err != nil {
		return nil, err
	}
	for _, w := range workers {
		w.c.CloseIdleConnections()
	}
	time.Sleep(floodSettle)
	if f.RSSAfter, err = procRSSKB(d.pid); err != nil {
		return nil, err
	}
	if d.exited() {
		return nil, fmt.Errorf("daemon exited during the flood")
	}
	f.Tokens, f.Errors, f.CPU = tokens.Load(), nerr.Load(), cpu1-cpu0
	if p := firstErr.Load(); p != nil {
		f.FirstErr = *p
	}
	f.TokensPerSec = float64(f.Tokens) / f.Elapsed.Seconds()
	if n := f.Tokens + f.Errors; n > 0 {
		f.CPUPer1kTokenMs = float64(f.CPU) / float64(time.Millisecond) * 1000 / float64(n)
	}
	return f, nil
}

// coldStarts holds the exec-to-ready times of the last BenchmarkColdStart run.
var (
	coldMu     sync.Mutex
	coldStarts []time.Duration
)

// BenchmarkColdStart measures, per iteration, the time from exec of a fresh
// daemon to its first /readyz 200 (which needs one STS exchange with the
// in-process fake), then stops it with SIGTERM (untimed).
func BenchmarkColdStart(b *testing.B) {
	env := getEnv(b)
	samples := make([]time.Duration, 0, b.N)
	b.StopTimer()
	b.ResetTimer()
	for range b.N {
		b.StartTimer()
		s, ready, err := env.startDaemon()
		b.StopTimer()
		if err != nil {
			b.Fatal(err)
		}
		s.stop()
		samples = append(samples, ready)
	}
	slices.Sort(samples)
	b.ReportMetric(ms(percentile(samples, 0.5)), "ready_ms")
	b.ReportMetric(ms(samples[len(samples)-1]), "ready_max_ms")
	coldMu.Lock()
	coldStarts = samples
	coldMu.Unlock()
}

// tail returns the last n bytes of s.
func tail(s string, n int) string { return s[max(len(s)-n, 0):] }

func us(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }
func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
func mb(kb int64) float64        { return float64(kb) / 1024 }

// printReport writes the markdown tables for docs/benchmarks.md.
func printReport(w io.Writer) {
	resultsMu.Lock()
	defer resultsMu.Unlock()
	pacedMu.Lock()
	npaced := len(sleepingRuns.res) + len(interceptPaced) + len(spinRuns.res)
	pacedMu.Unlock()
	satMu.Lock()
	nsat := len(satResults)
	satMu.Unlock()
	flowMu.Lock()
	ncold := len(coldResults)
	flowMu.Unlock()
	if nsat == 0 && ncold == 0 && len(intercepted) == 0 && npaced == 0 && flood == nil && len(coldStarts) == 0 {
		return
	}
	fmt.Fprintln(w, "\n<!-- imdsproxy bench report: paste into docs/benchmarks.md -->")
	if envVal != nil {
		fmt.Fprintf(w, "\nLoad average (1/5/15 min) at start: %s; at end: %s.\n", envVal.loadAtStart, loadAvg())
	}
	printSaturation(w)
	printColdFlow(w)
	printRSS(w)
	if envVal != nil && envVal.aemmSkip != "" {
		fmt.Fprintf(w, "\n**amazon-ec2-metadata-mock was skipped**: %s\n", envVal.aemmSkip)
	}
	if envVal != nil && envVal.rahSkip != "" {
		fmt.Fprintf(w, "\n**the Roles Anywhere credential helper was skipped**: %s\n", envVal.rahSkip)
	}
	if len(intercepted) > 0 {
		fmt.Fprintln(w, "\nInterception: the daemon in its own network namespace, the same workers through the nftables redirect and directly.")
		fmt.Fprintln(w, "\n| scenario | conns | path | p50 µs | p99 µs | req/s | CPU ms / 1k req | added p50 µs |")
		fmt.Fprintln(w, "|---|---:|---|---:|---:|---:|---:|---:|")
		for _, c := range interceptCases {
			d, okD := intercepted[resultKey(c.sc.name, c.conns, "direct")]
			for _, path := range []string{"direct", "redirect"} {
				r, ok := intercepted[resultKey(c.sc.name, c.conns, path)]
				if !ok {
					continue
				}
				added := ""
				if path == "redirect" && okD {
					added = fmt.Sprintf("%+.0f", us(r.P50-d.P50))
				}
				fmt.Fprintf(w, "| %s | %d | %s | %.0f | %.0f | %.0f | %.1f | %s |\n",
					c.sc.name, c.conns, path, us(r.P50), us(r.P99), r.ReqPerSec, r.CPUPer1k(), added)
			}
		}
	}
	printInterceptPaced(w)
	if envVal != nil && envVal.nsSkip != "" {
		fmt.Fprintf(w, "\n**The interception benchmark was skipped**: %s\n", envVal.nsSkip)
	}
	printPaced(w)
	printSpin(w)
	if f := flood; f != nil {
		fmt.Fprintf(w, "\nToken flood (%d connections, %s, daemon): %.0f tokens/s, %d errors, %.1f CPU ms / 1k tokens.\n\n",
			floodConns, floodDuration, f.TokensPerSec, f.Errors, f.CPUPer1kTokenMs)
		fmt.Fprintln(w, "| daemon RSS | MB |")
		fmt.Fprintln(w, "|---|---:|")
		fmt.Fprintf(w, "| before the flood | %.1f |\n", mb(f.RSSBefore))
		fmt.Fprintf(w, "| peak during the flood (sampled every 100 ms) | %.1f |\n", mb(f.RSSPeak))
		fmt.Fprintf(w, "| end of the flood | %.1f |\n", mb(f.RSSEnd))
		fmt.Fprintf(w, "| %s after the flood | %.1f |\n", floodSettle, mb(f.RSSAfter))
	}
	coldMu.Lock()
	defer coldMu.Unlock()
	if n := len(coldStarts); n > 0 {
		fmt.Fprintf(w, "\nCold start, exec to /readyz 200 (%d starts): p50 %.1f ms, max %.1f ms.\n",
			n, ms(percentile(coldStarts, 0.5)), ms(coldStarts[n-1]))
	}
}

// printRSS writes the highest RSS of each daemon over the whole run,
// sampled every 100 ms from its start.
func printRSS(w io.Writer) {
	if envVal == nil {
		return
	}
	var rows []string
	for _, d := range []*server{envVal.daemon, envVal.noaudit, envVal.other} {
		if d != nil && d.rss != nil {
			rows = append(rows, fmt.Sprintf("| %s | %.1f |", d.name, mb(d.rss.peak())))
		}
	}
	if len(rows) == 0 {
		return
	}
	fmt.Fprintln(w, "\nDaemon RSS, highest over the whole run (VmRSS sampled every 100 ms from the daemon's start to the report):")
	fmt.Fprintln(w, "\n| daemon | peak RSS MB |")
	fmt.Fprintln(w, "|---|---:|")
	for _, r := range rows {
		fmt.Fprintln(w, r)
	}
}

// printInterceptPaced writes BenchmarkIntercept's open-loop rows.
func printInterceptPaced(w io.Writer) {
	pacedMu.Lock()
	defer pacedMu.Unlock()
	if len(interceptPaced) == 0 {
		return
	}
	rates, err := parseRates(*pacedRates)
	if err != nil {
		return
	}
	sc, rate := scenarios[0], rates[len(rates)-1]
	fmt.Fprintf(w, "\nInterception, open loop: %s, %d connections, %d req/s offered, %s per path; latency from the scheduled send time.\n\n", sc.name, pacedConns, rate, *pacedDuration)
	fmt.Fprintln(w, "| path | p50 µs | p99 µs | p99.9 µs | achieved req/s | CPU ms / 1k req | late ops | wake lag p50 / p99 µs | added p50 µs |")
	fmt.Fprintln(w, "|---|---:|---:|---:|---:|---:|---:|---:|---:|")
	d, okD := interceptPaced[pacedKey(sc.name, pacedConns, rate, "direct")]
	for _, path := range []string{"direct", "redirect"} {
		r, ok := interceptPaced[pacedKey(sc.name, pacedConns, rate, path)]
		if !ok {
			continue
		}
		added := ""
		if path == "redirect" && okD {
			added = fmt.Sprintf("%+.0f", us(r.P50-d.P50))
		}
		fmt.Fprintf(w, "| %s | %.0f | %.0f | %.0f | %.0f | %.1f | %d of %d | %.0f / %.0f | %s |\n",
			path, us(r.P50), us(r.P99), us(r.P999), r.ReqPerSec, r.CPUPer1k(), r.Late, r.Ops, us(r.WakeP50), us(r.WakeP99), added)
	}
}

// printPaced writes the open-loop table.
func printPaced(w io.Writer) {
	pacedMu.Lock()
	defer pacedMu.Unlock()
	if len(sleepingRuns.res) == 0 {
		return
	}
	rates, err := parseRates(*pacedRates)
	if err != nil {
		return
	}
	fmt.Fprintf(w, "\nOpen loop: %d connections at a fixed offered load, %s per run; latency from the scheduled send time.\n\n", pacedConns, *pacedDuration)
	fmt.Fprintln(w, "| scenario | offered req/s | server | p50 µs | p99 µs | p99.9 µs | max µs | achieved req/s | CPU ms / 1k req | CPU % of a core | RSS MB | late ops | wake lag p50 / p99 µs |")
	fmt.Fprintln(w, "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
	for _, sc := range scenarios {
		for _, rate := range rates {
			for _, target := range targets {
				r, ok := sleepingRuns.res[pacedKey(sc.name, pacedConns, rate, target)]
				crash, crashed := aemmCrashes[pacedKey(sc.name, pacedConns, rate, target)] // the caller holds resultsMu
				if crashed && target == "aemm" {
					fmt.Fprintf(w, "| %s | %d | %s | crashed: %s | | | | | | | | | |\n", sc.name, rate, target, crash)
					continue
				}
				if !ok {
					continue
				}
				fmt.Fprintf(w, "| %s | %d | %s | %.0f | %.0f | %.0f | %.0f | %.0f | %.1f | %.1f | %.1f | %d of %d | %.0f / %.0f |\n",
					sc.name, rate, target, us(r.P50), us(r.P99), us(r.P999), us(r.Max), r.ReqPerSec,
					r.CPUPer1k(), r.CPUPercent(), mb(r.RSSMaxKB), r.Late, r.Ops, us(r.WakeP50), us(r.WakeP99))
			}
		}
	}
	fmt.Fprintln(w, "\nLatency is per operation (one request for creds-get, three for imdsv2-flow), from its scheduled send time; it includes the generator's wake lag.")
	var sides []string
	for _, sc := range scenarios {
		for _, rate := range rates {
			if side := sleepingRuns.side[pacedKey(sc.name, pacedConns, rate, "daemon")]; side != nil {
				sides = append(sides, fmt.Sprintf("| %s | %d | %.0f | %s |", sc.name, rate, side.Count, fmtServerSide(side)))
			}
		}
	}
	if len(sides) > 0 {
		fmt.Fprintln(w, "\nThe daemon's own view of the same runs: its `imdsproxy_http_request_duration_seconds` histogram for the credential GETs, scraped before and after each run (handler start to answer written; no kernel, no generator).")
		fmt.Fprintln(w)
		fmt.Fprintln(w, "| scenario | offered req/s | credential GETs | daemon-side p99 µs (upper bound: smallest bucket holding 99%) |")
		fmt.Fprintln(w, "|---|---:|---:|---|")
		for _, l := range sides {
			fmt.Fprintln(w, l)
		}
	}
}
