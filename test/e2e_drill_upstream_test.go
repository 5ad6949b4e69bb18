package test

// The drill of the real IMDS down or slow (pass-through paths).

import (
	"context"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/imdsproxy/imdsproxy/test/e2e"
)

// drillIMDS is a stand-in IMDS that can be stopped (connection refused),
// restarted on the same address, and made slow.
type drillIMDS struct {
	addr  string
	slow  atomic.Bool
	hits  atomic.Int64
	mu    sync.Mutex
	srv   *http.Server
	inner http.Handler
}

func startDrillIMDS(t *testing.T) *drillIMDS {
	u := &drillIMDS{addr: "127.0.0.1:0", inner: e2e.StandInIMDS()}
	u.start(t)
	t.Cleanup(u.stop)
	return u
}

func (u *drillIMDS) url() string { return "http://" + u.addr }

func (u *drillIMDS) start(t *testing.T) {
	t.Helper()
	var ln net.Listener
	var err error
	for range 50 { // the port may linger a moment after stop
		if ln, err = net.Listen("tcp", u.addr); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		t.Fatalf("stand-in IMDS: %v", err)
	}
	u.addr = ln.Addr().String()
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		u.hits.Add(1)
		if u.slow.Load() {
			select {
			case <-r.Context().Done():
				return
			case <-time.After(10 * time.Second):
			}
		}
		u.inner.ServeHTTP(w, r)
	})}
	u.mu.Lock()
	u.srv = srv
	u.mu.Unlock()
	go func() { _ = srv.Serve(ln) }()
}

func (u *drillIMDS) stop() {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.srv != nil {
		_ = u.srv.Close()
		u.srv = nil
	}
}

// drillUpstreamIMDS: the real IMDS refuses connections, then answers
// after the upstream timeout (2 s), then recovers. Pass-through paths answer
// 502 at once and 504 within the timeout; credential paths are unaffected.
// The cause shows in imdsproxy_passthrough_errors_total{reason} and the debug
// log ("pass-through failed"); /readyz is about credentials and rightly stays
// 200.
func drillUpstreamIMDS(t *testing.T) {
	const upstreamTimeout = 2 * time.Second // the harness's upstream_timeout
	up := startDrillIMDS(t)
	opts := drillOptions()
	opts.sessionLength = 0 // one-hour credentials: only the pass-through is under test
	opts.upstreamURL = up.url()
	e := startDaemon(t, opts)
	first, _ := e.sts.Last()

	tok, err := e2e.IMDSToken(context.Background(), e2e.Client, e.imdsURL, 21600)
	if err != nil {
		t.Fatal(err)
	}
	get := func() (int, string, time.Duration) {
		start := time.Now()
		st, body, err := e2e.IMDSGet(context.Background(), e2e.Client, e.imdsURL, "/latest/meta-data/instance-id", tok)
		if err != nil {
			t.Errorf("pass-through GET: %v", err)
		}
		return st, body, time.Since(start)
	}
	if st, body, _ := get(); st != 200 || body != "i-1234567890abcdef0" {
		t.Fatalf("pass-through before the drill: %d %q", st, body)
	}

	phase := func(name string, want int, maxTook time.Duration, reason string) {
		t.Helper()
		before := e.scrape(t).Sum("imdsproxy_passthrough_errors_total", map[string]string{"reason": reason})
		hitsBefore := up.hits.Load()
		done := make(chan *drillStats)
		go func() {
			done <- e.drillServe(t, time.Now().Add(3*upstreamTimeout), drillClients{wantAK: first.AccessKeyID})
		}()
		const n = 3
		for range n {
			st, body, took := get()
			t.Logf("%s: instance-id answered %d %q in %v", name, st, body, took.Round(time.Millisecond))
			if st != want || took > maxTook {
				t.Errorf("%s: pass-through answered %d in %v, want %d within %v", name, st, took, want, maxTook)
			}
		}
		(<-done).check(t, name+": credential paths")
		after := e.scrape(t).Sum("imdsproxy_passthrough_errors_total", map[string]string{"reason": reason})
		if after-before < n {
			t.Errorf(`%s: imdsproxy_passthrough_errors_total{reason=%q} rose by %v, want %d`, name, reason, after-before, n)
		}
		if !e.drillLogged("pass-through failed", map[string]any{"reason": reason}) {
			t.Errorf(`%s: no "pass-through failed" log line with reason %q`, name, reason)
		}
		// Bounded: the daemon's own token PUT, the GET and one retry on 401.
		if hits := up.hits.Load() - hitsBefore; hits > 3*n {
			t.Errorf("%s: %d upstream requests for %d client requests", name, hits, n)
		}
		e.drillWaitReadyz(t, http.StatusOK, time.Second, "ready")
	}

	up.stop()
	phase("IMDS down", http.StatusBadGateway, 500*time.Millisecond, "unreachable")

	up.slow.Store(true)
	up.start(t)
	phase("IMDS slow", http.StatusGatewayTimeout, upstreamTimeout+time.Second, "timeout")

	up.slow.Store(false)
	deadline := time.Now().Add(drillRecoverWithin)
	for {
		st, body, _ := get()
		if st == 200 && body == "i-1234567890abcdef0" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("pass-through did not recover within %v: %d %q", drillRecoverWithin, st, body)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
