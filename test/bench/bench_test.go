package bench

import (
	"fmt"
	"io"
	"slices"
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
	if len(results) == 0 && flood == nil && len(coldStarts) == 0 {
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
