package bench

import (
	"bytes"
	"cmp"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// The cold flow: what an SDK does when a process starts and asks the IMDS
// for credentials — PUT a token, GET the role listing, GET the role's
// credentials — each request on a new connection (botocore and the AWS CLI
// open one per request), one request at a time. It is the path on which the
// daemon identifies the client (once per connection, on its first
// credential request: the listing and the credentials here), which no
// keep-alive benchmark sees.
//
// A client is one OS thread making blocking system calls (socket, connect,
// write, read, close) with the request bytes net/http would write
// (spinTemplates), so the generator adds no scheduler hop of its own. It
// closes each connection after reading the response, as a client that does
// not keep connections alive does. One client runs the flows sequentially
// (latency at rest); eight run concurrently (each a closed loop, so the
// server, on its own CPU with -pin, is busy).
//
// The host has about a hundred processes at rest. For the crowded rounds
// the bench starts -cold.procs more (2,000: sleep(1), each holding 50 open
// files, in the bench's own cgroup, which is the client's), measures the
// same flows, and kills and reaps them; they sleep for at most
// coldCrowdBound, and the kernel kills them if the bench dies (PDEATHSIG).
// Idle and crowded rounds alternate twice, and each figure pools both.

var (
	coldFlowsFlag = flag.Int("cold.flows", 1000, "flows per server and round of BenchmarkColdFlow from one client; the 8-client runs make twice as many")
	coldProcsFlag = flag.Int("cold.procs", 2000, "idle processes (50 open files each) BenchmarkColdFlow adds to the host for its crowded rounds")
)

const (
	coldClients    = 8
	coldRounds     = 2 // of each host condition, alternating
	coldCrowdFDs   = 50
	coldCrowdBound = 3 * time.Minute // a crowd process's longest life
)

// coldModes are the client counts, coldHosts the host conditions.
var (
	coldModes = []int{1, coldClients}
	coldHosts = []string{"idle", "crowded"}
)

type coldKey struct {
	target  string
	clients int
	host    string
}

// coldRun is the pooled result of one coldKey.
type coldRun struct {
	lat     []time.Duration // per flow, sorted at the end
	elapsed time.Duration   // summed wall time of the runs
	cpu     time.Duration   // the server's CPU time during them
}

var (
	flowMu      sync.Mutex
	flowOnce    sync.Once
	flowErr     error
	coldResults = map[coldKey]*coldRun{}
	coldSkip    = map[string]string{}
	coldProcs   [2]int // processes on the host: idle, crowded (last round)
	coldMode    string // the daemon's client identification mode, from its log
)

// benchColdFlow is BenchmarkColdFlow: every round once per process, then
// one sub-benchmark per server, clients and host reporting p50 and p99.
func benchColdFlow(b *testing.B) {
	env := getEnv(b)
	flowOnce.Do(func() { flowErr = runColdFlows(env) })
	if flowErr != nil {
		b.Fatal(flowErr)
	}
	for _, host := range coldHosts {
		for _, n := range coldModes {
			for _, t := range env.targets() {
				b.Run(fmt.Sprintf("%s/clients=%d/%s", host, n, t.name), func(b *testing.B) {
					flowMu.Lock()
					r, skip := coldResults[coldKey{t.name, n, host}], coldSkip[t.name]
					ceil := coldResults[coldKey{"ceiling", n, host}]
					flowMu.Unlock()
					if r == nil || len(r.lat) == 0 {
						b.Skipf("SKIPPED (LOUDLY): %s: %s", t.name, cmp.Or(skip, t.skip))
					}
					b.ReportMetric(0, "ns/op")
					b.ReportMetric(us(percentile(r.lat, 0.5)), "p50_us")
					b.ReportMetric(us(percentile(r.lat, 0.99)), "p99_us")
					if ceil != nil && len(ceil.lat) > 0 && t.name != "ceiling" {
						b.ReportMetric(float64(percentile(r.lat, 0.5))/float64(percentile(ceil.lat, 0.5)), "p50_ratio_to_ceiling")
					}
				})
			}
		}
	}
}

// runColdFlows runs the rounds: idle, crowded, idle, crowded.
func runColdFlows(env *benchEnv) error {
	coldMode = identificationMode(env.daemon.out.String())
	for range coldRounds {
		for _, host := range coldHosts {
			var c *crowd
			if host == "crowded" {
				var err error
				if c, err = startCrowd(*coldProcsFlag, coldCrowdFDs, coldCrowdBound); err != nil {
					return err
				}
			}
			n := countProcs()
			flowMu.Lock()
			coldProcs[slices.Index(coldHosts, host)] = n
			flowMu.Unlock()
			err := coldRound(env, host)
			if c != nil {
				c.stop()
			}
			if err != nil {
				return err
			}
		}
	}
	for _, r := range coldResults {
		slices.Sort(r.lat)
	}
	return nil
}

// coldRound measures every server, one client then eight, on the host as
// it is now.
func coldRound(env *benchEnv, host string) error {
	for _, t := range env.targets() {
		srv := t.srv
		if t.name == "aemm" {
			srv = env.aemm // restarted after a crash
		}
		if srv == nil || srv.exited() {
			flowMu.Lock()
			coldSkip[t.name] = cmp.Or(t.skip, "not running")
			flowMu.Unlock()
			continue
		}
		for _, n := range coldModes {
			time.Sleep(250 * time.Millisecond)
			flows := *coldFlowsFlag
			if n > 1 {
				flows *= 2
			}
			cpu0, err := procCPU(srv.pid)
			if err != nil {
				return err
			}
			stopPerf := startPerf(srv, fmt.Sprintf("cold-%s-%d-%s", host, n, t.name))
			lat, elapsed, err := coldFlows(srv.ep(), n, flows)
			cpu1, cerr := procCPU(srv.pid)
			stopPerf()
			if t.name == "aemm" && srv.exited() {
				// AEMM's token store is a map without a lock: concurrent
				// token PUTs can crash it. Record it, restart it, go on.
				reason := fmt.Sprintf("crashed during the cold flow with %d clients (%s)", n, srv.state())
				fmt.Fprintf(os.Stderr, "\n*** amazon-ec2-metadata-mock %s; end of its output:\n%s\n", reason, tail(srv.out.String(), 2000))
				flowMu.Lock()
				coldSkip[t.name] = reason
				flowMu.Unlock()
				env.aemm, env.aemmSkip = env.startAEMM()
				break
			}
			if err != nil {
				return fmt.Errorf("cold flow, %s host, %d clients, %s: %w; end of its output:\n%s", host, n, t.name, err, tail(srv.out.String(), 3000))
			}
			if cerr != nil {
				return cerr
			}
			k := coldKey{t.name, n, host}
			flowMu.Lock()
			r := coldResults[k]
			if r == nil {
				r = &coldRun{}
				coldResults[k] = r
			}
			r.lat = append(r.lat, lat...)
			r.elapsed += elapsed
			r.cpu += cpu1 - cpu0
			flowMu.Unlock()
			s := slices.Sorted(slices.Values(lat))
			fmt.Fprintf(os.Stderr, "cold flow %-7s clients=%d %-16s %5d flows  p50 %6.0f µs  p99 %6.0f µs  %6.0f flows/s\n",
				host, n, t.name, len(lat), us(percentile(s, 0.5)), us(percentile(s, 0.99)), float64(len(lat))/elapsed.Seconds())
		}
	}
	return nil
}

// coldFlows runs total flows against ep from clients concurrent clients
// and returns each flow's latency (PUT start to the end of the
// credentials' body) and the wall time.
func coldFlows(ep endpoint, clients, total int) ([]time.Duration, time.Duration, error) {
	addr, err := spinAddr(ep)
	if err != nil {
		return nil, 0, err
	}
	tpl, err := newSpinTemplates(ep.base, ep.role)
	if err != nil {
		return nil, 0, err
	}
	lat := make([]time.Duration, total)
	var next atomic.Int64
	var firstErr atomic.Pointer[error]
	var wg sync.WaitGroup
	t0 := time.Now()
	for range clients {
		wg.Go(func() {
			runtime.LockOSThread()
			defer runtime.UnlockOSThread()
			c := &coldClient{addr: addr, tpl: tpl, role: []byte(ep.role),
				in: make([]byte, 0, 16<<10), out: make([]byte, 0, 1024)}
			for {
				i := next.Add(1) - 1
				if i >= int64(total) || firstErr.Load() != nil {
					return
				}
				s := time.Now()
				if err := c.flow(); err != nil {
					err = fmt.Errorf("flow %d: %w", i, err)
					firstErr.CompareAndSwap(nil, &err)
					return
				}
				lat[i] = time.Since(s)
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(t0)
	if p := firstErr.Load(); p != nil {
		return nil, 0, *p
	}
	return lat, elapsed, nil
}

// coldClient is one client of the cold flow.
type coldClient struct {
	addr    *net.TCPAddr
	tpl     *spinTemplates
	role    []byte
	in, out []byte
	tok     []byte
}

// flow is one cold flow: three requests, three connections.
func (c *coldClient) flow() error {
	body, err := c.request(spinPut, nil)
	if err != nil {
		return err
	}
	if !validToken(body) {
		return fmt.Errorf("%s: token of %d bytes is not visible ASCII", spinPut, len(body))
	}
	c.tok = append(c.tok[:0], body...)
	if body, err = c.request(spinListing, c.tok); err != nil {
		return err
	}
	if !bytes.Equal(body, c.role) {
		return fmt.Errorf("listing: got %.100q, want %q", body, c.role)
	}
	if body, err = c.request(spinCreds, c.tok); err != nil {
		return err
	}
	if !bytes.Contains(body, []byte(`"AccessKeyId"`)) {
		return fmt.Errorf("credentials: %.200q", body)
	}
	return nil
}

// request sends r on a new blocking connection, reads its response and
// closes the connection; it returns the body (valid until the next call)
// of a 200, else an error.
func (c *coldClient) request(r spinReq, tok []byte) ([]byte, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("socket: %w", err)
	}
	defer unix.Close(fd)
	sa := &unix.SockaddrInet4{Port: c.addr.Port}
	copy(sa.Addr[:], c.addr.IP.To4())
	for {
		if err = unix.Connect(fd, sa); err != unix.EINTR {
			break
		}
	}
	if err != nil {
		return nil, fmt.Errorf("%s: connect: %w", r, err)
	}
	if err := unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1); err != nil {
		return nil, err
	}
	c.out = c.tpl.appendReq(c.out[:0], r, tok)
	for out := c.out; len(out) > 0; {
		n, err := unix.Write(fd, out)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("%s: write: %w", r, err)
		}
		out = out[n:]
	}
	c.in = c.in[:0]
	for {
		if len(c.in) == cap(c.in) {
			if cap(c.in) > spinMaxHeader+spinMaxBody {
				return nil, fmt.Errorf("%s: response too long", r)
			}
			c.in = slices.Grow(c.in, cap(c.in))
		}
		n, err := unix.Read(fd, c.in[len(c.in):cap(c.in)])
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("%s: read: %w", r, err)
		}
		if n == 0 {
			return nil, fmt.Errorf("%s: connection closed after %d bytes: %.200q", r, len(c.in), c.in)
		}
		c.in = c.in[:len(c.in)+n]
		resp, err := parseSpinResponse(c.in)
		if err == errSpinNeedMore {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("%s: %w", r, err)
		}
		body := c.in[resp.bodyStart:resp.end]
		if resp.status != 200 {
			return nil, fmt.Errorf("%s: status %d: %.200q", r, resp.status, body)
		}
		return body, nil
	}
}

// crowd is a set of idle processes holding open files.
type crowd struct {
	cmds []*exec.Cmd
	null *os.File
}

// startCrowd starts n sleep(1) processes, each with fds more open files
// (/dev/null as fds 3…), killed by the kernel if this process dies and
// sleeping at most bound.
func startCrowd(n, fds int, bound time.Duration) (*crowd, error) {
	sleep, err := exec.LookPath("sleep")
	if err != nil {
		return nil, err
	}
	c := &crowd{}
	if c.null, err = os.Open(os.DevNull); err != nil {
		return nil, err
	}
	extra := make([]*os.File, fds)
	for i := range extra {
		extra[i] = c.null
	}
	t0 := time.Now()
	for range n {
		cmd := exec.Command(sleep, strconv.Itoa(int(bound.Seconds())))
		cmd.ExtraFiles = extra
		cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
		if err := cmd.Start(); err != nil {
			c.stop()
			return nil, fmt.Errorf("crowd: started %d of %d processes: %w", len(c.cmds), n, err)
		}
		c.cmds = append(c.cmds, cmd)
	}
	fmt.Fprintf(os.Stderr, "cold flow: started %d idle processes with %d open files each in %s\n", n, fds, time.Since(t0).Round(time.Millisecond))
	return c, nil
}

// stop kills and reaps every process of c.
func (c *crowd) stop() {
	for _, cmd := range c.cmds {
		_ = cmd.Process.Kill()
	}
	for _, cmd := range c.cmds {
		_ = cmd.Wait()
	}
	c.cmds = nil
	if c.null != nil {
		c.null.Close()
	}
}

// countProcs counts the processes on the host (the numeric entries of /proc).
func countProcs() int {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return -1
	}
	n := 0
	for _, e := range ents {
		if _, err := strconv.Atoi(e.Name()); err == nil {
			n++
		}
	}
	return n
}

var identMode = regexp.MustCompile(`"msg":"client identification"[^\n]*"mode":"([a-z-]+)"`)

// identificationMode is the client identification mode the daemon logged
// at start (package peer: ebpf, cgroup-procs, none), "unknown" if absent.
func identificationMode(log string) string {
	if m := identMode.FindStringSubmatch(log); m != nil {
		return m[1]
	}
	return "unknown"
}

// printColdFlow writes BenchmarkColdFlow's table.
func printColdFlow(w io.Writer) {
	flowMu.Lock()
	defer flowMu.Unlock()
	if len(coldResults) == 0 || envVal == nil {
		return
	}
	fmt.Fprintf(w, "\nCold flow: PUT token, GET listing, GET credentials, each on a new connection, one at a time per client; %d flows per server and round from 1 client, %d from %d clients; %d rounds of each host condition, alternating, pooled. Host processes: %d idle, %d crowded (%d more, %d open files each). The daemon's client identification: %s. Generator on CPU %s, servers on CPU %s.\n\n",
		*coldFlowsFlag, 2**coldFlowsFlag, coldClients, coldRounds, coldProcs[0], coldProcs[1], *coldProcsFlag, coldCrowdFDs, coldMode, activePin.client, activePin.server)
	fmt.Fprintln(w, "| host | clients | server | flows | p50 µs | p99 µs | × ceiling p50 | × ceiling p99 | flows/s | server CPU µs / flow | crowded ÷ idle p50 |")
	fmt.Fprintln(w, "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
	for _, host := range coldHosts {
		for _, n := range coldModes {
			ceil := coldResults[coldKey{"ceiling", n, host}]
			for _, t := range envVal.targets() {
				r := coldResults[coldKey{t.name, n, host}]
				if r == nil || len(r.lat) == 0 {
					continue
				}
				p50, p99 := percentile(r.lat, 0.5), percentile(r.lat, 0.99)
				r50, r99, crowdRatio := "", "", ""
				if ceil != nil && len(ceil.lat) > 0 && t.name != "ceiling" {
					r50 = fmt.Sprintf("%.2f", float64(p50)/float64(percentile(ceil.lat, 0.5)))
					r99 = fmt.Sprintf("%.2f", float64(p99)/float64(percentile(ceil.lat, 0.99)))
				}
				if idle := coldResults[coldKey{t.name, n, "idle"}]; host == "crowded" && idle != nil && len(idle.lat) > 0 {
					crowdRatio = fmt.Sprintf("%.2f", float64(p50)/float64(percentile(idle.lat, 0.5)))
				}
				fmt.Fprintf(w, "| %s | %d | %s | %d | %.0f | %.0f | %s | %s | %.0f | %.0f | %s |\n",
					host, n, t.name, len(r.lat), us(p50), us(p99), r50, r99,
					float64(len(r.lat))/r.elapsed.Seconds(), us(r.cpu)/float64(len(r.lat)), crowdRatio)
			}
		}
	}
	for name, why := range coldSkip {
		fmt.Fprintf(w, "\n%s: %s\n", name, firstLine(why))
	}
}
