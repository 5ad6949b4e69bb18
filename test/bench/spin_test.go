package bench

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"runtime"
	"slices"
	"strconv"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/imdsproxy/imdsproxy/test/e2e"
)

// The spin generator: the open-loop schedule of runPaced without the
// generator's own scheduling noise. runPaced's 50 workers each sleep in
// nanosleep until their next send, and the wake-up lag of those sleeps
// (p99 0.3–0.6 ms on the 2-vCPU VM of docs/benchmarks.md) is part of every
// latency it measures. With -paced.spin, BenchmarkIMDSPaced instead drives
// all connections from one goroutine locked to its OS thread, which never
// sleeps: it reads the monotonic clock, writes each connection's request
// when its scheduled time has come, and polls the connections with
// epoll_wait(timeout 0), parsing just enough HTTP/1.1 (status line, headers,
// Content-Length) to know when each response is complete. It is meant for
// -pin 0/1, where that thread has the client CPU to itself; it keeps that CPU
// 100% busy for the whole run.

var pacedSpin = flag.Bool("paced.spin", false, "BenchmarkIMDSPaced: drive the connections from one spinning thread with non-blocking sockets instead of sleeping workers (use with -pin 0/1; it keeps one CPU busy)")

// spinReq is one request of a spin operation.
type spinReq int

const (
	spinPut     spinReq = iota // PUT a token; its answer is the token of the rest of the operation
	spinListing                // GET the role listing; the answer must be the role
	spinCreds                  // GET the role's credentials
)

func (r spinReq) String() string {
	switch r {
	case spinPut:
		return "PUT " + e2e.TokenPath
	case spinListing:
		return "GET " + e2e.CredentialsPath
	case spinCreds:
		return "GET " + e2e.CredentialsPath + "ROLE"
	}
	return "request " + strconv.Itoa(int(r))
}

// spinPlans are the scenarios' operations as the spin generator sends them,
// by scenario name: the same requests as (*worker).getCreds and
// (*worker).flow, one at a time on the connection.
var spinPlans = map[string][]spinReq{
	"creds-get":   {spinCreds},
	"imdsv2-flow": {spinPut, spinListing, spinCreds},
}

// tokenMark stands for the token in the request templates.
const tokenMark = "SPIN-TOKEN-PLACEHOLDER"

// spinTemplates holds the wire bytes of each request, as net/http's client
// writes them for the worker's prebuilt requests, split around the token.
type spinTemplates struct {
	pre, post [3][]byte // by spinReq; post is nil when the request has no token
}

// newSpinTemplates builds the templates from the requests newWorker builds,
// serialised by (*http.Request).Write, the same code the Transport writes
// them with (with compression disabled the Transport adds no header of its
// own; TestSpinRequestBytes compares the two).
func newSpinTemplates(base, role string) (*spinTemplates, error) {
	w, err := newWorker(endpoint{base: base, role: role}, tokenMark)
	if err != nil {
		return nil, err
	}
	t := &spinTemplates{}
	for i, req := range []*http.Request{w.put, w.listing, w.creds} {
		var b bytes.Buffer
		if err := req.Write(&b); err != nil {
			return nil, err
		}
		raw := b.Bytes()
		if pre, post, ok := bytes.Cut(raw, []byte(tokenMark)); ok {
			t.pre[i], t.post[i] = pre, post
		} else {
			t.pre[i] = raw
		}
	}
	return t, nil
}

// appendReq appends request r with token tok to dst.
func (t *spinTemplates) appendReq(dst []byte, r spinReq, tok []byte) []byte {
	dst = append(dst, t.pre[r]...)
	if t.post[r] != nil {
		dst = append(append(dst, tok...), t.post[r]...)
	}
	return dst
}

// Limits on what the spin generator accepts from a server.
const (
	spinMaxHeader = 16 << 10
	spinMaxBody   = 1 << 20
)

// errSpinNeedMore means the response is not complete yet.
var errSpinNeedMore = errors.New("need more bytes")

// spinResponse is the framing of one complete response.
type spinResponse struct {
	status    int
	bodyStart int // offset of the body in the buffer
	end       int // offset just past the body
}

// parseSpinResponse frames the HTTP/1.1 response at the start of buf. It
// returns errSpinNeedMore while the response is incomplete, and an error for
// anything the spin generator cannot frame: no Content-Length (chunked or
// close-delimited bodies), a 1xx, a server that closes the connection, an
// oversized header or body, or a malformed status line or header.
func parseSpinResponse(buf []byte) (spinResponse, error) {
	hdrEnd := bytes.Index(buf, []byte("\r\n\r\n"))
	if hdrEnd < 0 {
		if len(buf) > spinMaxHeader {
			return spinResponse{}, fmt.Errorf("response header longer than %d bytes", spinMaxHeader)
		}
		return spinResponse{}, errSpinNeedMore
	}
	if hdrEnd > spinMaxHeader {
		return spinResponse{}, fmt.Errorf("response header longer than %d bytes", spinMaxHeader)
	}
	lines := bytes.Split(buf[:hdrEnd], []byte("\r\n"))
	sl := lines[0]
	// "HTTP/1.1 200 OK" (the reason phrase may be empty, and so may its space).
	if len(sl) < 12 || !bytes.HasPrefix(sl, []byte("HTTP/1.1 ")) || (len(sl) > 12 && sl[12] != ' ') {
		return spinResponse{}, fmt.Errorf("malformed status line %.100q", sl)
	}
	status, err := strconv.Atoi(string(sl[9:12]))
	if err != nil || status < 100 || status > 599 {
		return spinResponse{}, fmt.Errorf("malformed status line %.100q", sl)
	}
	if status < 200 {
		return spinResponse{}, fmt.Errorf("informational response %d not supported", status)
	}
	cl := int64(-1)
	for _, l := range lines[1:] {
		name, value, ok := bytes.Cut(l, []byte(":"))
		if !ok || len(name) == 0 || bytes.ContainsAny(name, " \t") {
			return spinResponse{}, fmt.Errorf("malformed header line %.100q", l)
		}
		value = bytes.TrimSpace(value)
		switch {
		case bytes.EqualFold(name, []byte("Content-Length")):
			n, err := strconv.ParseInt(string(value), 10, 64)
			if err != nil || n < 0 || value[0] == '+' {
				return spinResponse{}, fmt.Errorf("bad Content-Length %.50q", value)
			}
			if cl >= 0 && n != cl {
				return spinResponse{}, fmt.Errorf("conflicting Content-Length headers %d and %d", cl, n)
			}
			cl = n
		case bytes.EqualFold(name, []byte("Transfer-Encoding")):
			return spinResponse{}, fmt.Errorf("Transfer-Encoding %.50q not supported: the spin generator frames responses by Content-Length", value)
		case bytes.EqualFold(name, []byte("Connection")):
			if bytes.Contains(bytes.ToLower(value), []byte("close")) {
				return spinResponse{}, fmt.Errorf("server closes the connection (Connection: %.50s)", value)
			}
		}
	}
	if cl < 0 {
		if status != http.StatusNoContent && status != http.StatusNotModified {
			return spinResponse{}, fmt.Errorf("status %d without Content-Length not supported", status)
		}
		cl = 0
	}
	if cl > spinMaxBody {
		return spinResponse{}, fmt.Errorf("Content-Length %d over the %d-byte limit", cl, spinMaxBody)
	}
	r := spinResponse{status: status, bodyStart: hdrEnd + 4, end: hdrEnd + 4 + int(cl)}
	if len(buf) < r.end {
		return spinResponse{}, errSpinNeedMore
	}
	if len(buf) > r.end {
		return spinResponse{}, fmt.Errorf("%d bytes after the response, with no request in flight", len(buf)-r.end)
	}
	return r, nil
}

// validToken reports whether tok can be sent back in a header: visible
// ASCII only, as IMDS tokens are (it comes from the server; a CR or LF would
// split the next request).
func validToken(tok []byte) bool {
	if len(tok) == 0 || len(tok) > 4096 {
		return false
	}
	for _, c := range tok {
		if c <= ' ' || c >= 0x7f {
			return false
		}
	}
	return true
}

// spinConn is one connection of the spin generator and its current operation.
type spinConn struct {
	id      int // its index in spinRun.conns
	fd      int
	out     []byte // request bytes not yet written
	in      []byte // response bytes received so far
	tok     []byte // the token the operation's GETs carry
	step    int    // request of the operation in flight; -1: idle
	k       int    // the operation in flight or next due
	offset  int64  // ns after t0 of this connection's first operation
	opErr   error  // first error of the operation in flight
	nextReq int64  // ns after t0 the next operation is due
}

// spinRun is one run of the spin generator over its connections.
type spinRun struct {
	conns    []*spinConn
	tpl      *spinTemplates
	role     []byte
	baseTok  []byte
	plan     []spinReq
	epfd     int
	events   []unix.EpollEvent
	start    time.Time // clock origin of the ns offsets below
	interval int64     // ns between two operations of one connection
	perConn  int       // operations per connection

	lat, send []time.Duration // by operation (i×perConn+k); send −1: late
	late      int
	errs      int
	firstErr  error
	lastEnd   int64 // ns after start of the last answer
	done      int   // operations finished
}

// spinResult is a pacedResult whose generator lateness is the send lag:
// write time minus scheduled time over the operations not late.
type spinResult struct {
	pacedResult
	SendP50, SendP99, SendMax time.Duration
	Sent                      int // operations the send lag is over
	Pinned                    string
}

// dialRaw opens a blocking TCP connection to addr (an IPv4 literal and
// port), sets TCP_NODELAY as net.Dial does, then makes it non-blocking.
func dialRaw(addr *net.TCPAddr) (int, error) {
	ip4 := addr.IP.To4()
	if ip4 == nil {
		return -1, fmt.Errorf("spin: %s: only IPv4 addresses are supported", addr)
	}
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("spin: socket: %w", err)
	}
	sa := &unix.SockaddrInet4{Port: addr.Port}
	copy(sa.Addr[:], ip4)
	for {
		err = unix.Connect(fd, sa)
		if err != unix.EINTR {
			break
		}
	}
	if err == nil {
		err = unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1)
	}
	if err == nil {
		err = unix.SetNonblock(fd, true)
	}
	if err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("spin: connect %s: %w", addr, err)
	}
	return fd, nil
}

// spinAddr resolves the base URL of ep to a TCP address. The spin generator
// dials in this process's network namespace only.
func spinAddr(ep endpoint) (*net.TCPAddr, error) {
	if ep.dial != nil {
		return nil, errors.New("spin: endpoints with their own dialer (network namespaces) are not supported")
	}
	u, err := url.Parse(ep.base)
	if err != nil {
		return nil, fmt.Errorf("spin: %w", err)
	}
	if u.Scheme != "http" || u.Port() == "" {
		return nil, fmt.Errorf("spin: base %q: want http://IP:PORT", ep.base)
	}
	return net.ResolveTCPAddr("tcp4", u.Host)
}

// now is nanoseconds since r.start, from the monotonic clock.
func (r *spinRun) now() int64 { return int64(time.Since(r.start)) }

// begin starts the operation due on c: its first request.
func (r *spinRun) begin(c *spinConn) {
	c.step, c.opErr = 0, nil
	if r.plan[0] != spinPut {
		c.tok = append(c.tok[:0], r.baseTok...)
	}
	c.out = r.tpl.appendReq(c.out[:0], r.plan[0], c.tok)
}

// flush writes what is pending on c. A short write leaves the rest for the
// next turn of the loop.
func (c *spinConn) flush() error {
	for len(c.out) > 0 {
		n, err := unix.Write(c.fd, c.out)
		switch {
		case err == unix.EINTR:
			continue
		case err == unix.EAGAIN:
			return nil
		case err != nil:
			return err
		}
		c.out = c.out[n:]
	}
	return nil
}

// readable reads what c's socket holds and, when that completes the
// response in flight, checks it and moves to the next request of the
// operation. It returns finished=true when the operation is complete, at
// time end (ns after r.start); a non-nil error means the connection is
// unusable.
func (r *spinRun) readable(c *spinConn) (finished bool, end int64, err error) {
	if len(c.in) == cap(c.in) {
		if cap(c.in) >= spinMaxHeader+spinMaxBody+4 {
			return false, 0, errors.New("response too long")
		}
		c.in = slices.Grow(c.in, cap(c.in))
	}
	n, err := unix.Read(c.fd, c.in[len(c.in):cap(c.in)])
	end = r.now()
	switch {
	case err == unix.EAGAIN || err == unix.EINTR:
		return false, 0, nil
	case err != nil:
		return false, 0, fmt.Errorf("read: %w", err)
	case n == 0:
		return false, 0, errors.New("server closed the connection")
	}
	c.in = c.in[:len(c.in)+n]
	if c.step < 0 {
		return false, 0, fmt.Errorf("%d unexpected bytes with no request in flight: %.100q", n, c.in)
	}
	resp, err := parseSpinResponse(c.in)
	if err == errSpinNeedMore {
		return false, 0, nil
	}
	req := r.plan[c.step]
	if err != nil {
		return false, 0, fmt.Errorf("%s: %w", req, err)
	}
	body := c.in[resp.bodyStart:resp.end]
	var opErr error
	switch {
	case resp.status != http.StatusOK:
		opErr = fmt.Errorf("%s: status %d: %.200q", req, resp.status, body)
	case len(body) == 0:
		opErr = fmt.Errorf("%s: empty body", req)
	case req == spinPut && !validToken(body):
		opErr = fmt.Errorf("%s: token of %d bytes is not visible ASCII", req, len(body))
	case req == spinListing && !bytes.Equal(body, r.role):
		opErr = fmt.Errorf("listing: got %.100q, want %q", body, r.role)
	}
	if opErr == nil && req == spinPut {
		c.tok = append(c.tok[:0], body...)
	}
	c.in = c.in[:0]
	if opErr != nil || c.step == len(r.plan)-1 {
		// Like (*worker).flow, an error ends the operation.
		c.opErr, c.step = opErr, -1
		return true, end, nil
	}
	c.step++
	c.out = r.tpl.appendReq(c.out[:0], r.plan[c.step], c.tok)
	return false, 0, c.flush()
}

// poll runs epoll_wait without blocking (timeout 0, or ms when warming up)
// and handles every readable connection; fin is called for each finished
// operation.
func (r *spinRun) poll(timeoutMs int, fin func(c *spinConn, end int64)) error {
	n, err := unix.EpollWait(r.epfd, r.events, timeoutMs)
	if err == unix.EINTR {
		return nil
	}
	if err != nil {
		return fmt.Errorf("spin: epoll_wait: %w", err)
	}
	for _, ev := range r.events[:n] {
		i := int(ev.Fd)
		c := r.conns[i]
		finished, end, err := r.readable(c)
		if err != nil {
			return fmt.Errorf("spin: connection %d: %w", i, err)
		}
		if finished {
			fin(c, end)
		}
	}
	return nil
}

// close closes every connection and the epoll instance.
func (r *spinRun) close() {
	for _, c := range r.conns {
		if c != nil && c.fd >= 0 {
			unix.Close(c.fd)
		}
	}
	if r.epfd >= 0 {
		unix.Close(r.epfd)
	}
}

// runSpin is the spin counterpart of runPaced, with the same schedule: conns
// connections together offer rate HTTP requests per second for about d,
// each starting an operation (the requests of plan, one after another) every
// Interval = conns × len(plan) ÷ rate, the connections' first operations
// spread evenly over one Interval. Latency counts from the scheduled time to
// the moment the read completing the operation's last response returned. An
// operation due while its connection is still busy is sent as soon as the
// previous one ends, and counted late. The CPU and RSS of the server process
// pid are read before and after the run (no sampler runs during it).
func runSpin(ep endpoint, tok string, pid, conns int, rate float64, d time.Duration, plan []spinReq) (spinResult, error) {
	if conns < 1 || rate <= 0 || len(plan) == 0 {
		return spinResult{}, fmt.Errorf("spin: conns %d, rate %g, %d requests per operation", conns, rate, len(plan))
	}
	addr, err := spinAddr(ep)
	if err != nil {
		return spinResult{}, err
	}
	tpl, err := newSpinTemplates(ep.base, ep.role)
	if err != nil {
		return spinResult{}, err
	}
	reqsPerOp := len(plan)
	interval := time.Duration(float64(conns*reqsPerOp) / rate * float64(time.Second))
	if interval <= 0 {
		return spinResult{}, fmt.Errorf("spin: rate %g too high", rate)
	}
	perConn := max(int(d/interval), 1)
	r := &spinRun{
		tpl: tpl, role: []byte(ep.role), baseTok: []byte(tok), plan: plan, epfd: -1,
		events: make([]unix.EpollEvent, conns), interval: int64(interval), perConn: perConn,
		lat: make([]time.Duration, conns*perConn), send: make([]time.Duration, conns*perConn),
	}
	defer r.close()
	if r.epfd, err = unix.EpollCreate1(unix.EPOLL_CLOEXEC); err != nil {
		return spinResult{}, fmt.Errorf("spin: epoll_create1: %w", err)
	}
	for i := range conns {
		fd, err := dialRaw(addr)
		if err != nil {
			return spinResult{}, err
		}
		c := &spinConn{id: i, fd: fd, step: -1, in: make([]byte, 0, 16<<10), out: make([]byte, 0, 1024), tok: make([]byte, 0, 256),
			offset: int64(interval) * int64(i) / int64(conns)}
		r.conns = append(r.conns, c)
		// Level-triggered: a connection with bytes left is reported again.
		if err := unix.EpollCtl(r.epfd, unix.EPOLL_CTL_ADD, fd, &unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(i)}); err != nil {
			return spinResult{}, fmt.Errorf("spin: epoll_ctl: %w", err)
		}
	}

	runtime.LockOSThread()
	defer runtime.UnlockOSThread()

	// Warm up, untimed: one operation on every connection, all at once.
	r.start = time.Now()
	for _, c := range r.conns {
		r.begin(c)
		if err := c.flush(); err != nil {
			return spinResult{}, fmt.Errorf("spin: warm-up write: %w", err)
		}
	}
	var warmErrs []error
	for pending := conns; pending > 0; {
		if r.now() > int64(10*time.Second) {
			return spinResult{}, fmt.Errorf("spin: warm-up: %d of %d connections unanswered after 10 s", pending, conns)
		}
		for _, c := range r.conns {
			if err := c.flush(); err != nil {
				return spinResult{}, fmt.Errorf("spin: warm-up write: %w", err)
			}
		}
		if err := r.poll(10, func(c *spinConn, _ int64) {
			pending--
			if c.opErr != nil {
				warmErrs = append(warmErrs, c.opErr)
			}
		}); err != nil {
			return spinResult{}, fmt.Errorf("warm-up: %w", err)
		}
	}
	if err := errors.Join(warmErrs...); err != nil {
		return spinResult{}, fmt.Errorf("warm-up: %w", err)
	}

	rss0, err := procRSSKB(pid)
	if err != nil {
		return spinResult{}, err
	}
	cpu0, err := procCPU(pid)
	if err != nil {
		return spinResult{}, err
	}
	// The schedule starts 1 ms from now; everything above is done.
	r.start = time.Now().Add(time.Millisecond)
	for _, c := range r.conns {
		c.k, c.nextReq = 0, c.offset
	}
	total := conns * perConn
	deadline := int64(perConn)*int64(interval) + int64(30*time.Second)
	fin := func(c *spinConn, end int64) {
		j := r.index(c)
		r.lat[j] = time.Duration(end - c.nextReq)
		if c.opErr != nil {
			r.errs++
			if r.firstErr == nil {
				r.firstErr = c.opErr
			}
		}
		r.done++
		r.lastEnd = max(r.lastEnd, end)
		c.k++
		if c.k < perConn {
			c.nextReq = c.offset + int64(c.k)*r.interval
			if end >= c.nextReq { // due while busy: send at once, late
				r.send[r.index(c)] = -1
				r.late++
				r.begin(c)
			}
		}
	}
	for r.done < total {
		now := r.now()
		if now > deadline {
			return spinResult{}, fmt.Errorf("spin: %d of %d operations unanswered 30 s after the end of the schedule", total-r.done, total)
		}
		for i, c := range r.conns {
			if c.step < 0 && c.k < perConn && now >= c.nextReq {
				r.begin(c)
				r.send[r.index(c)] = time.Duration(r.now() - c.nextReq)
			}
			if len(c.out) > 0 {
				if err := c.flush(); err != nil {
					return spinResult{}, fmt.Errorf("spin: connection %d: write: %w", i, err)
				}
			}
		}
		if err := r.poll(0, fin); err != nil {
			return spinResult{}, err
		}
	}
	cpu1, err := procCPU(pid)
	if err != nil {
		return spinResult{}, err
	}
	rss1, err := procRSSKB(pid)
	if err != nil {
		return spinResult{}, err
	}

	res := spinResult{pacedResult: pacedResult{
		Conns:       conns,
		OfferedRate: rate,
		Interval:    interval,
		Ops:         total,
		Requests:    total * reqsPerOp,
		Elapsed:     time.Duration(r.lastEnd),
		CPU:         cpu1 - cpu0,
		RSSMaxKB:    max(rss0, rss1),
		Errors:      r.errs,
		FirstErr:    r.firstErr,
		Late:        r.late,
	}}
	if activePin.server != "" {
		res.Pinned = activePin.server + "/" + activePin.client
	}
	if res.Elapsed > 0 {
		res.ReqPerSec = float64(res.Requests) / res.Elapsed.Seconds()
	}
	slices.Sort(r.lat)
	res.P50, res.P99, res.P999 = percentile(r.lat, 0.50), percentile(r.lat, 0.99), percentile(r.lat, 0.999)
	res.Max = r.lat[len(r.lat)-1]
	send := slices.DeleteFunc(r.send, func(d time.Duration) bool { return d < 0 })
	slices.Sort(send)
	res.Sent = len(send)
	if len(send) > 0 {
		res.SendP50, res.SendP99, res.SendMax = percentile(send, 0.50), percentile(send, 0.99), send[len(send)-1]
	}
	return res, nil
}

// index is the slot of c's current operation in lat and send.
func (r *spinRun) index(c *spinConn) int {
	return c.id*r.perConn + c.k
}

// spinRuns holds every spin run by pacedKey, with the daemon's histogram of
// its spin runs, under pacedMu. Like the paced runs, each runs once per
// process.
var spinRuns = newPacedRuns[spinResult]()

// benchSpin is one sub-benchmark of BenchmarkIMDSPaced with -paced.spin.
func benchSpin(b *testing.B, env *benchEnv, sc scenario, rate int, target string) {
	srv := env.target(b, target)
	plan, ok := spinPlans[sc.name]
	if !ok {
		b.Fatalf("spin: no plan for scenario %q", sc.name)
	}
	key := pacedKey(sc.name, pacedConns, rate, target)
	res, side, err := spinRuns.once(key, srv, func() (spinResult, error) {
		return runSpin(srv.ep(), srv.tok, srv.pid, pacedConns, float64(rate), *pacedDuration, plan)
	})
	var common *pacedResult
	if res != nil {
		common = &res.pacedResult
	}
	checkPaced(b, env, srv, target, key, common, err)
	b.ReportMetric(us(res.SendP50), "send_lag_p50_us")
	b.ReportMetric(us(res.SendP99), "send_lag_p99_us")
	reportSide(b, side)
}

// printSpin writes the spin generator's table and the daemon-side table of
// its runs. The caller holds resultsMu (for aemmCrashes).
func printSpin(w io.Writer) {
	pacedMu.Lock()
	defer pacedMu.Unlock()
	if len(spinRuns.res) == 0 {
		return
	}
	rates, err := parseRates(*pacedRates)
	if err != nil {
		return
	}
	pin := "**not pinned** (the spinning generator shares the CPUs with the servers)"
	if activePin.server != "" {
		pin = fmt.Sprintf("pinned (`-pin %s/%s`: servers on CPU %s, the generator on CPU %s)", activePin.server, activePin.client, activePin.server, activePin.client)
	}
	fmt.Fprintf(w, "\nOpen loop, spin generator, %s: %d connections driven by one spinning thread, %s per run; latency from the scheduled send time.\n\n", pin, pacedConns, *pacedDuration)
	fmt.Fprintln(w, "| scenario | offered req/s | server | p50 µs | p99 µs | p99.9 µs | max µs | achieved req/s | CPU ms / 1k req | CPU % of a core | RSS MB | late ops | send lag p50 / p99 / max µs |")
	fmt.Fprintln(w, "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
	for _, sc := range scenarios {
		for _, rate := range rates {
			for _, target := range targets {
				key := pacedKey(sc.name, pacedConns, rate, target)
				r, ok := spinRuns.res[key]
				if crash, crashed := aemmCrashes[key]; crashed && target == "aemm" {
					fmt.Fprintf(w, "| %s | %d | %s | crashed: %s | | | | | | | | | |\n", sc.name, rate, target, crash)
					continue
				}
				if !ok {
					continue
				}
				fmt.Fprintf(w, "| %s | %d | %s | %.0f | %.0f | %.0f | %.0f | %.0f | %.1f | %.1f | %.1f | %d of %d | %.1f / %.1f / %.0f |\n",
					sc.name, rate, target, us(r.P50), us(r.P99), us(r.P999), us(r.Max), r.ReqPerSec,
					r.CPUPer1k(), r.CPUPercent(), mb(r.RSSMaxKB), r.Late, r.Ops, us(r.SendP50), us(r.SendP99), us(r.SendMax))
			}
		}
	}
	fmt.Fprintln(w, "\nLatency is per operation (one request for creds-get, three for imdsv2-flow), from its scheduled send time to the read that completed its last response. Send lag is the time from the scheduled time to the write of the operation's first request, over the operations not late; RSS is the larger of the server's RSS before and after the run (no sampler runs during it).")
	var sides []string
	for _, sc := range scenarios {
		for _, rate := range rates {
			if side := spinRuns.side[pacedKey(sc.name, pacedConns, rate, "daemon")]; side != nil {
				sides = append(sides, fmt.Sprintf("| %s | %d | %.0f | %s |", sc.name, rate, side.Count, fmtServerSide(side)))
			}
		}
	}
	if len(sides) > 0 {
		fmt.Fprintln(w, "\nThe daemon's own view of the spin runs (its `imdsproxy_http_request_duration_seconds` histogram for the credential GETs, scraped before and after each run):")
		fmt.Fprintln(w)
		fmt.Fprintln(w, "| scenario | offered req/s | credential GETs | daemon-side p99 µs (upper bound: smallest bucket holding 99%) |")
		fmt.Fprintln(w, "|---|---:|---:|---|")
		for _, l := range sides {
			fmt.Fprintln(w, l)
		}
	}
}
