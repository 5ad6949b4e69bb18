package test

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/imdsproxy/imdsproxy/test/e2e"
	"github.com/imdsproxy/imdsproxy/test/fakes/sts"
)

// TestAdminEndpoints checks /healthz, /readyz, /debug/cache and the metric
// names the docs promise.
func TestAdminEndpoints(t *testing.T) {
	t.Parallel()
	e := startDaemon(t, envOptions{})
	if _, err := e.fetchCreds(context.Background()); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{"/healthz", "/readyz"} {
		if st, body, err := e2e.GetURL(e.adminURL + p); err != nil || st != 200 {
			t.Errorf("GET %s: %d %q %v", p, st, body, err)
		}
	}
	dc, _ := e.debugCache(t)
	last, _ := e.sts.Last()
	if len(dc.Entries) != 1 {
		t.Fatalf("/debug/cache has %d entries, want 1", len(dc.Entries))
	}
	en := dc.Entries[0]
	if en.Key != e2e.RoleName || en.AccessKeyID != last.AccessKeyID || !en.Valid || en.Permanent || en.ConsecutiveFailures != 0 || en.LastError != "" {
		t.Errorf("/debug/cache entry %+v", en)
	}
	if exp, err := time.Parse(time.RFC3339, en.Expires); err != nil || exp.Sub(last.Expiration).Abs() > time.Second {
		t.Errorf("/debug/cache expires %q, STS issued %s", en.Expires, last.Expiration)
	}

	m := e.metrics(t)
	for _, re := range []string{
		`(?m)^imdsproxy_build_info\{.*\} 1$`,
		`(?m)^imdsproxy_cache_refreshes_total\{.*\} [1-9]`,
		`(?m)^imdsproxy_cache_requests_total\{.*result=.*\} [1-9]`,
		`(?m)^imdsproxy_http_requests_total\{.*code="200".*\} [1-9]`,
		`(?m)^imdsproxy_http_requests_total\{.*route=.*\} `,
		`(?m)^imdsproxy_imds_tokens_outstanding(\{.*\})? `,
		`(?m)^imdsproxy_cache_credentials_remaining_seconds\{.*key="app".*\} [1-9]`,
	} {
		if !regexp.MustCompile(re).MatchString(m) {
			t.Errorf("/metrics has no line matching %s", re)
		}
	}
	if strings.Contains(m, last.AccessKeyID) {
		t.Errorf("/metrics has the access key id as a label value (unbounded label)")
	}
}

// TestNotReadyWithoutCredentials: while STS denies access /readyz is 503 with
// a reason, no credentials are served, and readiness follows STS recovering.
func TestNotReadyWithoutCredentials(t *testing.T) {
	t.Parallel()
	e := startDaemon(t, envOptions{stsMode: sts.ModeAccessDenied, noWaitReady: true})
	deadline := time.Now().Add(5 * time.Second)
	for e.sts.Calls() == 0 && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	time.Sleep(300 * time.Millisecond)
	st, body, err := e2e.GetURL(e.adminURL + "/readyz")
	if err != nil || st != 503 || strings.TrimSpace(body) == "" {
		t.Errorf("/readyz while STS denies: %d %q %v, want 503 with a reason", st, body, err)
	}
	d, err := e.fetchCreds(context.Background())
	if err == nil || d.AccessKeyId != "" || d.SecretAccessKey != "" {
		t.Errorf("credentials served while STS denies: %+v err %v", d.AccessKeyId, err)
	} else {
		t.Logf("credential request while STS denies: %v", err)
	}
	dc, _ := e.debugCache(t)
	if len(dc.Entries) != 1 || dc.Entries[0].Valid || !dc.Entries[0].Permanent || dc.Entries[0].ErrorClass != "access_denied" {
		t.Errorf("/debug/cache while STS denies: %+v, want one invalid entry, permanent, class access_denied", dc.Entries)
	}

	e.sts.SetMode(sts.ModeOK)
	e.waitReady(t, 15*time.Second)
	d, err = e.fetchCreds(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if err := e.checkServed(d); err != nil {
		t.Fatal(err)
	}
}

func TestSIGTERM(t *testing.T) {
	t.Parallel()
	e := startDaemon(t, envOptions{})
	if _, err := e.fetchCreds(context.Background()); err != nil {
		t.Fatal(err)
	}
	began := time.Now()
	if code := e.stop(); code != 0 {
		t.Fatalf("exit code %d on SIGTERM, want 0: %v", code, e.proc.Err())
	}
	t.Logf("exited 0 %v after SIGTERM", time.Since(began).Round(time.Millisecond))
	if c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", e.imdsPort), time.Second); err == nil {
		c.Close()
		t.Error("IMDS port still accepting after exit")
	}
}

func TestSIGHUP(t *testing.T) {
	t.Parallel()
	e := startDaemon(t, envOptions{})
	ctx := context.Background()
	d0, err := e.fetchCreds(ctx)
	if err != nil {
		t.Fatal(err)
	}
	errorLines := func() []string {
		var out []string
		for _, l := range e.logLines() {
			if lv, _ := l["level"].(string); strings.EqualFold(lv, "error") {
				msg, _ := l["msg"].(string)
				out = append(out, fmt.Sprintf("%s %v", msg, l["error"]))
			}
		}
		return out
	}

	t.Run("good config", func(t *testing.T) {
		before := len(errorLines())
		e.signal(t, syscall.SIGHUP)
		time.Sleep(time.Second)
		if e.exited() {
			t.Fatalf("daemon exited on SIGHUP: %v", e.proc.Err())
		}
		if n := errorLines(); len(n) != before {
			t.Errorf("error logged on a good reload: %v", n[before:])
		}
		d, err := e.fetchCreds(ctx)
		if err != nil || d.AccessKeyId != d0.AccessKeyId {
			t.Fatalf("after reload: %v %s", err, d.AccessKeyId)
		}
	})

	t.Run("broken config", func(t *testing.T) {
		good := e.config()
		before := len(errorLines())
		e.writeConfig(t, good+"no_such_key: true\nlisten: [\n")
		e.signal(t, syscall.SIGHUP)
		deadline := time.Now().Add(5 * time.Second)
		for len(errorLines()) == before && time.Now().Before(deadline) && !e.exited() {
			time.Sleep(50 * time.Millisecond)
		}
		if e.exited() {
			t.Fatalf("daemon exited on SIGHUP with a broken config: %v", e.proc.Err())
		}
		if got := errorLines(); len(got) == before {
			t.Errorf("no error logged for a broken config on SIGHUP")
		} else {
			t.Logf("logged: %v", got[before:])
		}
		d, err := e.fetchCreds(ctx)
		if err != nil || d.AccessKeyId != d0.AccessKeyId {
			t.Fatalf("not serving the same credentials after a bad reload: %v %s", err, d.AccessKeyId)
		}
		if st, _, _ := e2e.GetURL(e.adminURL + "/readyz"); st != 200 {
			t.Errorf("/readyz %d after a bad reload", st)
		}
		if v, ok := e.scrape(t).Value("imdsproxy_config_last_reload_successful", nil); !ok || v != 0 {
			t.Errorf("imdsproxy_config_last_reload_successful is not 0 after a refused reload")
		}
		out, _ := runStatusCommand(t, e)
		if !strings.Contains(out, "REFUSED") || !strings.Contains(out, "running configuration is kept") {
			t.Errorf("imdsproxy status does not say the reload was refused:\n%s", out)
		}
		e.writeConfig(t, good) // so the next test step and shutdown see a good file
	})
}

// TestSignalDrainsInFlight: SIGTERM and SIGINT let a request in flight
// finish (README.md, "Signals"). A pass-through request is held by the
// upstream halfway through its body; the signal arrives, the daemon stops
// accepting (its IMDS port refuses), and only then does the upstream send
// the rest. The client gets the whole answer and the daemon exits 0.
func TestSignalDrainsInFlight(t *testing.T) {
	t.Parallel()
	for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGINT} {
		t.Run(unix.SignalName(sig), func(t *testing.T) {
			t.Parallel()
			testSignalDrainsInFlight(t, sig)
		})
	}
}

// heldPath is the pass-through path heldIMDS holds.
const heldPath = "/latest/user-data"

// heldIMDS is the stand-in IMDS, except that it answers heldPath in two
// halves: the headers and the first half at once, the rest once release is
// closed. arrived is closed when the request for heldPath has come.
type heldIMDS struct {
	url              string
	body             string
	arrived, release chan struct{}
	once             sync.Once
}

func startHeldIMDS(t *testing.T) *heldIMDS {
	t.Helper()
	u := &heldIMDS{
		body:    strings.Repeat("#cloud-config: drained\n", 2048), // 46 KiB
		arrived: make(chan struct{}), release: make(chan struct{}),
	}
	inner := e2e.StandInIMDS()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != heldPath {
			inner.ServeHTTP(w, r)
			return
		}
		half := len(u.body) / 2
		w.Header().Set("Content-Length", strconv.Itoa(len(u.body)))
		_, _ = io.WriteString(w, u.body[:half])
		_ = http.NewResponseController(w).Flush()
		u.once.Do(func() { close(u.arrived) })
		select {
		case <-u.release:
		case <-r.Context().Done():
			return
		}
		_, _ = io.WriteString(w, u.body[half:])
	}))
	t.Cleanup(srv.Close)
	t.Cleanup(u.free)
	u.url = srv.URL
	return u
}

// free lets the held request finish (idempotent).
func (u *heldIMDS) free() {
	select {
	case <-u.release:
	default:
		close(u.release)
	}
}

func testSignalDrainsInFlight(t *testing.T, sig syscall.Signal) {
	up := startHeldIMDS(t)
	// The whole pass-through exchange, the held half included, must fit
	// in upstream_timeout; the drain waits longer than that.
	e := startDaemon(t, envOptions{upstreamURL: up.url, upstreamTimeout: 20 * time.Second})
	defer up.free() // on a failure, before the daemon is stopped
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	tok, err := e2e.IMDSToken(ctx, e2e.Client, e.imdsURL, 21600)
	if err != nil {
		t.Fatal(err)
	}

	type answer struct {
		status int
		body   string
		err    error
	}
	answered := make(chan answer, 1)
	go func() {
		client := &http.Client{Timeout: 60 * time.Second}
		st, body, err := e2e.IMDSGet(ctx, client, e.imdsURL, heldPath, tok)
		answered <- answer{st, body, err}
	}()
	select {
	case <-up.arrived:
	case a := <-answered:
		t.Fatalf("answered before the upstream was held: %d %v", a.status, a.err)
	case <-time.After(30 * time.Second):
		t.Fatalf("the pass-through request never reached the upstream\n%s", e.logTail(40))
	}

	began := time.Now()
	e.stopped = true // this test sends the signal and checks the exit
	e.signal(t, sig)
	// The daemon has taken the signal once its IMDS port refuses
	// connections; the request is still held.
	addr := fmt.Sprintf("127.0.0.1:%d", e.imdsPort)
	waitFor(t, 15*time.Second, "the IMDS port to refuse connections after "+unix.SignalName(sig), func() bool {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err != nil {
			return true
		}
		c.Close()
		return false
	})
	if e.exited() {
		t.Fatalf("daemon exited with a request in flight: %v", e.proc.Err())
	}
	select {
	case a := <-answered:
		t.Fatalf("answered while the upstream still held the body: %d %v", a.status, a.err)
	default:
	}
	up.free()

	select {
	case a := <-answered:
		if a.err != nil || a.status != http.StatusOK {
			t.Fatalf("the request in flight at %s: %d %v, want 200 and the whole body", unix.SignalName(sig), a.status, a.err)
		}
		if a.body != up.body {
			t.Fatalf("the request in flight at %s got %d bytes, want all %d", unix.SignalName(sig), len(a.body), len(up.body))
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("the request in flight at %s was not answered within 30s of its release", unix.SignalName(sig))
	}
	select {
	case <-e.proc.Done():
	case <-time.After(30 * time.Second):
		t.Fatalf("daemon still running 30s after the drained request")
	}
	if code := e2e.ExitCode(e.proc.Err()); code != 0 {
		t.Fatalf("exit code %d after %s, want 0: %v", code, unix.SignalName(sig), e.proc.Err())
	}
	t.Logf("answered in full and exited 0 %v after %s", time.Since(began).Round(time.Millisecond), unix.SignalName(sig))
}
