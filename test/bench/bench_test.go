package bench

import (
	"flag"
	"fmt"
	"io"
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

var connCounts = []int{1, 50}

// results holds the last (largest) run of every load benchmark, by
// "scenario/conns/target", for the ratio and the report.
var (
	resultsMu sync.Mutex
	results   = map[string]loadResult{}
)

func resultKey(sc string, conns int, target string) string {
	return fmt.Sprintf("%s/%d/%s", sc, conns, target)
}

// BenchmarkIMDS measures the ceiling and then the daemon for each scenario
// at 1 and 50 keep-alive connections. One b.N is one operation (one request
// for creds-get, three for imdsv2-flow); p50_us and p99_us are per operation,
// req/s and cpu_ms/1k count HTTP requests.
func BenchmarkIMDS(b *testing.B) {
	env := getEnv(b)
	for _, sc := range scenarios {
		for _, conns := range connCounts {
			for _, target := range []string{"ceiling", "daemon"} {
				b.Run(fmt.Sprintf("%s/conns=%d/%s", sc.name, conns, target), func(b *testing.B) {
					srv, tok := env.ceiling, env.ceilingToken
					if target == "daemon" {
						srv, tok = env.daemon, env.daemonToken
					}
					b.StopTimer()
					res, err := runLoad(srv.base, roleName, tok, srv.pid, conns, b.N, sc.reqsPerOp, sc.op,
						func() { b.ResetTimer(); b.StartTimer() }, b.StopTimer)
					if err != nil {
						b.Fatalf("%s: %v; server output:\n%s", target, err, srv.out)
					}
					if srv.exited() {
						b.Fatalf("%s exited during the run; output:\n%s", target, srv.out)
					}
					if res.Errors > 0 {
						b.Errorf("%s: %d of %d operations failed; first: %v", target, res.Errors, res.Ops, res.FirstErr)
					}
					b.ReportMetric(us(res.P50), "p50_us")
					b.ReportMetric(us(res.P99), "p99_us")
					b.ReportMetric(res.ReqPerSec, "req/s")
					b.ReportMetric(res.CPUPer1k(), "cpu_ms/1k")
					b.ReportMetric(mb(res.RSSMaxKB), "rss_MB")
					resultsMu.Lock()
					results[resultKey(sc.name, conns, target)] = res
					ceil, ok := results[resultKey(sc.name, conns, "ceiling")]
					resultsMu.Unlock()
					if target == "daemon" && ok && ceil.ReqPerSec > 0 {
						b.ReportMetric(res.ReqPerSec/ceil.ReqPerSec, "ratio_to_ceiling")
					}
				})
			}
		}
	}
}

// Open-loop parameters: go test ./test/bench/ -bench Paced -paced.rate 2000,4000
// runs the paced benchmarks at each listed offered load.
var (
	pacedRates    = flag.String("paced.rate", "2000", "offered loads of BenchmarkIMDSPaced, total HTTP requests per second, comma-separated")
	pacedDuration = flag.Duration("paced.duration", 5*time.Second, "length of each BenchmarkIMDSPaced run")
)

const pacedConns = 50

// paced holds every open-loop run, by "scenario/conns/rate/target". A paced
// run is timed, not b.N-driven: it runs once per process and later calls of
// the same sub-benchmark report the same numbers (like the token flood).
var (
	pacedMu  sync.Mutex
	paced    = map[string]*pacedResult{}
	pacedErr = map[string]error{}
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
			for _, target := range []string{"ceiling", "daemon"} {
				b.Run(fmt.Sprintf("%s/conns=%d/rate=%d/%s", sc.name, pacedConns, rate, target), func(b *testing.B) {
					srv, tok := env.ceiling, env.ceilingToken
					if target == "daemon" {
						srv, tok = env.daemon, env.daemonToken
					}
					key := pacedKey(sc.name, pacedConns, rate, target)
					pacedMu.Lock()
					res, done := paced[key]
					err := pacedErr[key]
					pacedMu.Unlock()
					if !done && err == nil {
						time.Sleep(250 * time.Millisecond) // let the previous run's connections close
						var r pacedResult
						r, err = runPaced(srv.base, roleName, tok, srv.pid, pacedConns, float64(rate), *pacedDuration, sc.reqsPerOp, sc.op)
						pacedMu.Lock()
						if err != nil {
							pacedErr[key] = err
						} else {
							res = &r
							paced[key] = res
						}
						pacedMu.Unlock()
					}
					if err != nil {
						b.Fatalf("%s: %v; server output:\n%s", target, err, srv.out)
					}
					if srv.exited() {
						b.Fatalf("%s exited during the run; output:\n%s", target, srv.out)
					}
					if res.Errors > 0 {
						b.Errorf("%s: %d of %d operations failed; first: %v", target, res.Errors, res.Ops, res.FirstErr)
					}
					b.ReportMetric(0, "ns/op")
					b.ReportMetric(us(res.P50), "p50_us")
					b.ReportMetric(us(res.P99), "p99_us")
					b.ReportMetric(us(res.P999), "p999_us")
					b.ReportMetric(us(res.Max), "max_us")
					b.ReportMetric(res.ReqPerSec, "req/s")
					b.ReportMetric(res.CPUPer1k(), "cpu_ms/1k")
					b.ReportMetric(mb(res.RSSMaxKB), "rss_MB")
					b.ReportMetric(float64(res.Late), "late_ops")
					b.ReportMetric(us(res.WakeP99), "wake_p99_us")
				})
			}
		}
	}
}

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
		if workers[i], err = newWorker(d.base, roleName, env.daemonToken); err != nil {
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

func us(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }
func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
func mb(kb int64) float64        { return float64(kb) / 1024 }

// printReport writes the markdown tables for docs/benchmarks.md.
func printReport(w io.Writer) {
	resultsMu.Lock()
	defer resultsMu.Unlock()
	pacedMu.Lock()
	npaced := len(paced)
	pacedMu.Unlock()
	if len(results) == 0 && npaced == 0 && flood == nil && len(coldStarts) == 0 {
		return
	}
	fmt.Fprintln(w, "\n<!-- imdsproxy bench report: paste into docs/benchmarks.md -->")
	if envVal != nil {
		fmt.Fprintf(w, "\nLoad average (1/5/15 min) at start: %s; at end: %s.\n", envVal.loadAtStart, loadAvg())
	}
	if len(results) > 0 {
		fmt.Fprintln(w, "\n| scenario | conns | server | p50 µs | p99 µs | req/s | CPU ms / 1k req | RSS MB | daemon ÷ ceiling |")
		fmt.Fprintln(w, "|---|---:|---|---:|---:|---:|---:|---:|---:|")
		for _, sc := range scenarios {
			for _, conns := range connCounts {
				ceil, okC := results[resultKey(sc.name, conns, "ceiling")]
				for _, target := range []string{"ceiling", "daemon"} {
					r, ok := results[resultKey(sc.name, conns, target)]
					if !ok {
						continue
					}
					ratio := ""
					if target == "daemon" && okC && ceil.ReqPerSec > 0 {
						ratio = fmt.Sprintf("%.0f%%", 100*r.ReqPerSec/ceil.ReqPerSec)
					}
					fmt.Fprintf(w, "| %s | %d | %s | %.0f | %.0f | %.0f | %.1f | %.1f | %s |\n",
						sc.name, conns, target, us(r.P50), us(r.P99), r.ReqPerSec, r.CPUPer1k(), mb(r.RSSMaxKB), ratio)
				}
			}
		}
		fmt.Fprintln(w, "\nLatency is per operation (one request for creds-get, three for imdsv2-flow); req/s and CPU count HTTP requests.")
	}
	printPaced(w)
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

// printPaced writes the open-loop table.
func printPaced(w io.Writer) {
	pacedMu.Lock()
	defer pacedMu.Unlock()
	if len(paced) == 0 {
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
			for _, target := range []string{"ceiling", "daemon"} {
				r, ok := paced[pacedKey(sc.name, pacedConns, rate, target)]
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
}
