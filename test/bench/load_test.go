package bench

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/imdsproxy/imdsproxy/test/e2e"
)

// This file is the load generator and the /proc readers. It has two modes,
// both with a fixed number of workers, each with its own http.Client and
// exactly one keep-alive connection:
//
//   - closed loop (runLoad): each worker issues its next operation as soon as
//     the previous one is answered, so the server runs at saturation and
//     latency is mostly queueing;
//   - open loop (runPaced): each worker issues its operations on a fixed
//     schedule, and latency is measured from the scheduled send time, so a
//     stall delays and counts against every operation scheduled behind it
//     (no coordinated omission).
//
// Latencies go into one preallocated slice, indexed by the operation number,
// so recording costs no allocation and no lock.

// requestedTTL is the session token lifetime every PUT asks for (paths
// and headers of the IMDS API, WIRE.md §1–§2, are package e2e's).
const requestedTTL = "21600" // what botocore, JS and Java ask for

// dialFunc opens a connection; nil means an ordinary net.Dialer in this
// process's network namespace.
type dialFunc func(ctx context.Context, network, addr string) (net.Conn, error)

// endpoint is where the load generator sends its requests: the server's
// base URL, the role it serves, and how to dial it.
type endpoint struct {
	base string // http://HOST:PORT
	role string
	dial dialFunc
}

// newClient returns a client that keeps exactly one connection to the server
// and never goes through a proxy.
func newClient() *http.Client { return newClientDial(nil) }

func newClientDial(dial dialFunc) *http.Client {
	if dial == nil {
		dial = (&net.Dialer{Timeout: 2 * time.Second, KeepAlive: 30 * time.Second}).DialContext
	}
	return &http.Client{
		Timeout: 10 * time.Second,
		Transport: &http.Transport{
			Proxy:               nil,
			DialContext:         dial,
			MaxIdleConns:        256,
			MaxIdleConnsPerHost: 256,
			MaxConnsPerHost:     1,
			IdleConnTimeout:     5 * time.Minute,
			DisableCompression:  true,
			ForceAttemptHTTP2:   false,
		},
	}
}

// worker is one load-generating connection: its client, prebuilt requests
// and a read buffer, reused by every operation.
type worker struct {
	c       *http.Client
	put     *http.Request
	listing *http.Request
	creds   *http.Request
	role    []byte
	buf     bytes.Buffer
}

func newWorker(ep endpoint, tok string) (*worker, error) {
	base, role := ep.base, ep.role
	w := &worker{c: newClientDial(ep.dial), role: []byte(role)}
	var err error
	if w.put, err = http.NewRequest(http.MethodPut, base+e2e.TokenPath, nil); err != nil {
		return nil, err
	}
	w.put.Header.Set(e2e.TTLHeader, requestedTTL)
	if w.listing, err = http.NewRequest(http.MethodGet, base+e2e.CredentialsPath, nil); err != nil {
		return nil, err
	}
	if w.creds, err = http.NewRequest(http.MethodGet, base+e2e.CredentialsPath+role, nil); err != nil {
		return nil, err
	}
	w.setToken(tok)
	return w, nil
}

func (w *worker) setToken(tok string) {
	w.listing.Header[e2e.TokenHeader] = []string{tok}
	w.creds.Header[e2e.TokenHeader] = []string{tok}
}

// do sends req, reads the whole body into w.buf and checks for 200.
func (w *worker) do(req *http.Request) error {
	resp, err := w.c.Do(req)
	if err != nil {
		return err
	}
	w.buf.Reset()
	_, err = w.buf.ReadFrom(resp.Body)
	resp.Body.Close()
	if err != nil {
		return fmt.Errorf("%s %s: read body: %w", req.Method, req.URL.Path, err)
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s %s: status %d: %.200q", req.Method, req.URL.Path, resp.StatusCode, w.buf.Bytes())
	}
	if w.buf.Len() == 0 {
		return fmt.Errorf("%s %s: empty body", req.Method, req.URL.Path)
	}
	return nil
}

// getCreds is scenario (a): one cached-credential GET with a valid token.
func (w *worker) getCreds() error { return w.do(w.creds) }

// flow is scenario (b): what every SDK does per credential fetch — PUT a
// token, GET the role listing with it, GET the credentials of the listed role.
func (w *worker) flow() error {
	if err := w.do(w.put); err != nil {
		return err
	}
	w.setToken(w.buf.String())
	if err := w.do(w.listing); err != nil {
		return err
	}
	if !bytes.Equal(w.buf.Bytes(), w.role) {
		return fmt.Errorf("listing: got %.100q, want %q", w.buf.Bytes(), w.role)
	}
	return w.do(w.creds)
}

// putToken is one token PUT (the flood).
func (w *worker) putToken() error { return w.do(w.put) }

// loadResult is what one measured run produced.
type loadResult struct {
	Ops       int
	Requests  int           // HTTP requests (Ops × requests per op)
	Elapsed   time.Duration // wall time of the measured part
	P50, P99  time.Duration // per operation
	CPU       time.Duration // server process user+system time during the run
	RSSMaxKB  int64         // highest VmRSS of the server sampled during the run
	Errors    int
	FirstErr  error
	ReqPerSec float64
}

// CPUPer1k is the server's CPU time per 1,000 HTTP requests, in milliseconds.
func (r loadResult) CPUPer1k() float64 {
	if r.Requests == 0 {
		return 0
	}
	return float64(r.CPU) / float64(time.Millisecond) * 1000 / float64(r.Requests)
}

// runLoad runs ops operations over conns workers against the server pid at
// base and measures them. ready is called (with the timer running state up
// to the caller) just before the measured part starts and done just after it
// ends, so a benchmark can start and stop its timer there.
func runLoad(ep endpoint, tok string, pid, conns, ops, reqsPerOp int,
	op func(*worker) error, ready, done func()) (loadResult, error) {
	if ops < 1 {
		ops = 1
	}
	workers := make([]*worker, conns)
	for i := range workers {
		w, err := newWorker(ep, tok)
		if err != nil {
			return loadResult{}, err
		}
		workers[i] = w
	}
	defer func() {
		for _, w := range workers {
			w.c.CloseIdleConnections()
		}
	}()
	// Warm up: open every connection and run one operation on it, untimed.
	var wg sync.WaitGroup
	warmErr := make([]error, conns)
	for i, w := range workers {
		wg.Go(func() { warmErr[i] = op(w) })
	}
	wg.Wait()
	if err := errors.Join(warmErr...); err != nil {
		return loadResult{}, fmt.Errorf("warm-up: %w", err)
	}

	lat := make([]time.Duration, ops)
	var next atomic.Int64
	var nerr atomic.Int64
	var firstErr atomic.Pointer[error]
	start := make(chan struct{})
	for _, w := range workers {
		wg.Go(func() {
			<-start
			for {
				i := next.Add(1) - 1
				if i >= int64(ops) {
					return
				}
				t0 := time.Now()
				err := op(w)
				lat[i] = time.Since(t0)
				if err != nil {
					nerr.Add(1)
					firstErr.CompareAndSwap(nil, &err)
				}
			}
		})
	}
	rss := newRSSSampler(pid, 50*time.Millisecond)
	cpu0, err := procCPU(pid)
	if err != nil {
		return loadResult{}, err
	}
	ready()
	t0 := time.Now()
	close(start)
	wg.Wait()
	elapsed := time.Since(t0)
	done()
	cpu1, err := procCPU(pid)
	if err != nil {
		return loadResult{}, err
	}
	res := loadResult{
		Ops:      ops,
		Requests: ops * reqsPerOp,
		Elapsed:  elapsed,
		CPU:      cpu1 - cpu0,
		RSSMaxKB: rss.stop(),
		Errors:   int(nerr.Load()),
	}
	if p := firstErr.Load(); p != nil {
		res.FirstErr = *p
	}
	res.ReqPerSec = float64(res.Requests) / elapsed.Seconds()
	slices.Sort(lat)
	res.P50, res.P99 = percentile(lat, 0.50), percentile(lat, 0.99)
	return res, nil
}

// percentile returns the nearest-rank p-quantile of sorted.
func percentile(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	i := int(float64(len(sorted))*p+0.999999) - 1
	return sorted[min(max(i, 0), len(sorted)-1)]
}

// rssSampler reads VmRSS of a process periodically and keeps the highest.
type rssSampler struct {
	pid  int
	max  atomic.Int64
	quit chan struct{}
	wg   sync.WaitGroup
}

func newRSSSampler(pid int, every time.Duration) *rssSampler {
	s := &rssSampler{pid: pid, quit: make(chan struct{})}
	s.sample()
	s.wg.Go(func() {
		t := time.NewTicker(every)
		defer t.Stop()
		for {
			select {
			case <-s.quit:
				return
			case <-t.C:
				s.sample()
			}
		}
	})
	return s
}

func (s *rssSampler) sample() {
	kb, err := procRSSKB(s.pid)
	if err != nil {
		return
	}
	for {
		old := s.max.Load()
		if kb <= old || s.max.CompareAndSwap(old, kb) {
			return
		}
	}
}

// peak is the highest VmRSS in KiB sampled so far.
func (s *rssSampler) peak() int64 { return s.max.Load() }

// stop takes a last sample, stops the sampler and returns the highest VmRSS in KiB.
func (s *rssSampler) stop() int64 {
	close(s.quit)
	s.wg.Wait()
	s.sample()
	return s.max.Load()
}

// procRSSKB returns VmRSS of pid in KiB.
func procRSSKB(pid int) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for line := range strings.Lines(string(b)) {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			f := strings.Fields(v)
			if len(f) == 0 {
				break
			}
			return strconv.ParseInt(f[0], 10, 64)
		}
	}
	return 0, fmt.Errorf("/proc/%d/status: no VmRSS", pid)
}

// procCPU returns utime+stime of pid (all its threads) from /proc/<pid>/stat.
func procCPU(pid int) (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// The command name (field 2) is in parentheses and may hold spaces.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, fmt.Errorf("/proc/%d/stat: malformed", pid)
	}
	f := strings.Fields(s[i+1:])
	// f[0] is field 3 (state); utime and stime are fields 14 and 15.
	if len(f) < 13 {
		return 0, fmt.Errorf("/proc/%d/stat: short", pid)
	}
	ut, err1 := strconv.ParseInt(f[11], 10, 64)
	st, err2 := strconv.ParseInt(f[12], 10, 64)
	if err := errors.Join(err1, err2); err != nil {
		return 0, fmt.Errorf("/proc/%d/stat: %w", pid, err)
	}
	return time.Duration(ut+st) * time.Second / time.Duration(clockTicks()), nil
}

// clockTicks returns USER_HZ, the unit of /proc/<pid>/stat times, from the
// AT_CLKTCK entry of the auxiliary vector (100 when it cannot be read).
var clockTicks = sync.OnceValue(func() int64 {
	const atClkTck = 17
	b, err := os.ReadFile("/proc/self/auxv")
	if err != nil {
		return 100
	}
	for len(b) >= 16 {
		k, v := binary.NativeEndian.Uint64(b), binary.NativeEndian.Uint64(b[8:])
		if k == atClkTck && v > 0 {
			return int64(v)
		}
		if k == 0 {
			break
		}
		b = b[16:]
	}
	return 100
})

// drain reads and closes a response body so its connection is reused.
func drain(resp *http.Response) {
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
}

// pacedResult is what one open-loop run produced. Latencies are per
// operation, from the operation's scheduled send time to the end of its last
// response body.
type pacedResult struct {
	Conns       int
	OfferedRate float64       // HTTP requests per second asked for
	Interval    time.Duration // between two operations of one worker
	Ops         int
	Requests    int
	Elapsed     time.Duration // from the first scheduled send to the last answer
	P50, P99    time.Duration
	P999, Max   time.Duration
	CPU         time.Duration // server process user+system time during the run
	RSSMaxKB    int64
	Errors      int
	FirstErr    error
	ReqPerSec   float64 // achieved: Requests ÷ Elapsed
	// Late counts operations whose worker was still busy with the previous
	// one at their scheduled time; they were sent at once, and their latency
	// includes the wait.
	Late int
	// WakeP50 and WakeP99 are the generator's own lateness: send time minus
	// scheduled time, over the operations whose worker was idle and asleep.
	// It is part of every latency above, for the daemon and the ceiling alike.
	WakeP50, WakeP99 time.Duration
}

// CPUPer1k is the server's CPU time per 1,000 HTTP requests, in milliseconds.
func (r pacedResult) CPUPer1k() float64 {
	if r.Requests == 0 {
		return 0
	}
	return float64(r.CPU) / float64(time.Millisecond) * 1000 / float64(r.Requests)
}

// CPUPercent is the server's CPU time over the run, in percent of one core.
func (r pacedResult) CPUPercent() float64 {
	if r.Elapsed <= 0 {
		return 0
	}
	return 100 * float64(r.CPU) / float64(r.Elapsed)
}

// runPaced is the open-loop generator. conns workers together offer rate
// HTTP requests per second for about d: each worker starts an operation every
// Interval = conns × reqsPerOp ÷ rate (25 ms for one request per operation at
// 50 connections and 2,000 req/s), and the workers' first operations are
// staggered evenly across one Interval, so the server sees a steady stream.
// Operation k of worker i is scheduled at t0 + i×Interval/conns + k×Interval.
// A worker sleeps until that time; if it is already past (the previous
// operation was slow), it sends at once. Either way the latency counts from
// the scheduled time.
func runPaced(ep endpoint, tok string, pid, conns int, rate float64, d time.Duration, reqsPerOp int,
	op func(*worker) error) (pacedResult, error) {
	if conns < 1 || rate <= 0 || reqsPerOp < 1 {
		return pacedResult{}, fmt.Errorf("paced: conns %d, rate %g, reqsPerOp %d", conns, rate, reqsPerOp)
	}
	interval := time.Duration(float64(conns*reqsPerOp) / rate * float64(time.Second))
	perWorker := max(int(d/interval), 1)
	workers := make([]*worker, conns)
	for i := range workers {
		w, err := newWorker(ep, tok)
		if err != nil {
			return pacedResult{}, err
		}
		workers[i] = w
	}
	defer func() {
		for _, w := range workers {
			w.c.CloseIdleConnections()
		}
	}()
	// Warm up, untimed: open every connection and run one operation on it.
	var wg sync.WaitGroup
	warmErr := make([]error, conns)
	for i, w := range workers {
		wg.Go(func() { warmErr[i] = op(w) })
	}
	wg.Wait()
	if err := errors.Join(warmErr...); err != nil {
		return pacedResult{}, fmt.Errorf("warm-up: %w", err)
	}

	ops := conns * perWorker
	lat := make([]time.Duration, ops)
	wake := make([]time.Duration, ops)
	var nerr, nlate atomic.Int64
	var firstErr atomic.Pointer[error]
	var lastEnd atomic.Int64 // ns since t0 of the latest answer
	rss := newRSSSampler(pid, 50*time.Millisecond)
	cpu0, err := procCPU(pid)
	if err != nil {
		return pacedResult{}, err
	}
	// Leave the workers time to reach their first sleep before t0.
	t0 := time.Now().Add(50 * time.Millisecond)
	for i, w := range workers {
		offset := time.Duration(int64(interval) * int64(i) / int64(conns))
		wg.Go(func() {
			var late int64
			for k := range perWorker {
				j := i*perWorker + k
				due := t0.Add(offset + time.Duration(k)*interval)
				if sleepUntil(due) {
					wake[j] = time.Since(due)
				} else {
					late++
					wake[j] = -1
				}
				err := op(w)
				end := time.Now()
				lat[j] = end.Sub(due)
				if err != nil {
					nerr.Add(1)
					firstErr.CompareAndSwap(nil, &err)
				}
				if k == perWorker-1 {
					e := int64(end.Sub(t0))
					for {
						old := lastEnd.Load()
						if e <= old || lastEnd.CompareAndSwap(old, e) {
							break
						}
					}
				}
			}
			nlate.Add(late)
		})
	}
	wg.Wait()
	cpu1, err := procCPU(pid)
	if err != nil {
		return pacedResult{}, err
	}
	res := pacedResult{
		Conns:       conns,
		OfferedRate: rate,
		Interval:    interval,
		Ops:         ops,
		Requests:    ops * reqsPerOp,
		Elapsed:     time.Duration(lastEnd.Load()),
		CPU:         cpu1 - cpu0,
		RSSMaxKB:    rss.stop(),
		Errors:      int(nerr.Load()),
		Late:        int(nlate.Load()),
	}
	if p := firstErr.Load(); p != nil {
		res.FirstErr = *p
	}
	if res.Elapsed > 0 {
		res.ReqPerSec = float64(res.Requests) / res.Elapsed.Seconds()
	}
	slices.Sort(lat)
	res.P50, res.P99, res.P999 = percentile(lat, 0.50), percentile(lat, 0.99), percentile(lat, 0.999)
	res.Max = lat[len(lat)-1]
	wake = slices.DeleteFunc(wake, func(d time.Duration) bool { return d < 0 })
	slices.Sort(wake)
	res.WakeP50, res.WakeP99 = percentile(wake, 0.50), percentile(wake, 0.99)
	return res, nil
}

// sleepUntil sleeps until t and reports whether it had to (false: t has
// passed already). It parks the goroutine's thread in nanosleep(2) rather
// than using time.Sleep: when the Go scheduler is idle, timers fire from the
// netpoller's epoll_wait, whose timeout is whole milliseconds and rounds a
// wait under 1 ms up to 1 ms (runtime/netpoll_epoll.go), so time.Sleep wakes
// up to 1 ms late (p50 about 0.45-0.55 ms late on the 2-vCPU VM of
// docs/benchmarks.md, against about 0.13 ms with nanosleep). That lateness
// would be charged to the server. nanosleep uses a kernel high-resolution
// timer; what remains (the VM's wake-up time and the 50 µs default timer
// slack) is reported as the wake lag.
func sleepUntil(t time.Time) bool {
	d := time.Until(t)
	if d <= 0 {
		return false
	}
	for d > 0 {
		ts := syscall.NsecToTimespec(int64(d))
		_ = syscall.Nanosleep(&ts, nil) // EINTR: sleep again for what is left
		d = time.Until(t)
	}
	return true
}
