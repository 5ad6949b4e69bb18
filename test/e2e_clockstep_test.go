package test

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/imdsproxy/imdsproxy/test/e2e"
	"github.com/imdsproxy/imdsproxy/test/fakes/oidc"
)

const (
	// clockStepEnv enables TestClockStepReal, which `make test` and
	// `make e2e` run in a serial step of their own.
	clockStepEnv = "IMDSPROXY_CLOCK_STEP"
	// clockStep is how far the machine's wall clock is stepped.
	clockStep = time.Hour
	// clockStepHold bounds how long the clock stays stepped even if the test
	// hangs (clockstep restores by itself); the test needs about 15 s.
	clockStepHold = 50 * time.Second
	// clockStepMaxSleep is cache.MaxSleep, the longest Run sleeps: stated
	// here, not imported, so that lengthening it fails this test.
	clockStepMaxSleep = 5 * time.Second
	// clockStepNotice bounds how soon after the step the daemon holds fresh
	// credentials with no client asking: Run wakes within
	// clockStepMaxSleep; if it wakes before the token agent has rewritten
	// the (now expired) JWT, one failed attempt and a retry after at most
	// backoff_initial; then one fetch (at most fetch_timeout); plus slack
	// for a loaded 2-core machine. Without the fix it is the old timer:
	// about 27 minutes.
	clockStepNotice = clockStepMaxSleep + drillBackoffInit + drillFetchTimeout + 3*time.Second
)

// TestClockStepReal steps the machine's own wall clock (CLOCK_REALTIME) an
// hour forward while the daemon serves, then back.
//
// Two drills cover a clock step (issue 6). drillClockStep
// (e2e_drills_test.go) skews the world: the fake STS runs an hour behind
// the host, so fresh credentials look already expired to the daemon; it
// checks the daemon refuses them, keeps serving what it has and recovers
// when the clocks agree. This drill steps the daemon's own clock, as an NTP
// step after a suspended host or a resumed VM does. Everything on the
// machine (daemon, fake STS, token agent) shares the clock, so after the
// step STS issues credentials valid by the new time while the daemon's
// cached ones (one hour, the default role duration) are expired by it. The
// daemon's refresh timers run on the monotonic clock, which the step does
// not move: before the fix its next refresh came about 27 minutes later.
//
// Checked: before the step credentials are cached; after it the daemon
// refreshes by itself, with no client request, within the cache's 5 s sleep
// cap plus margin (clockStepNotice); "wall clock stepped" is logged at Warn
// and imdsproxy_cache_clock_steps_total{direction="forward"} counts it;
// /debug/cache never reports credentials that are expired by the new clock
// as valid; STS calls stay bounded; /readyz returns to 200; clients (two
// IMDS pollers with the drills' checks, and the AWS CLI) get exactly the
// fresh credentials, expiring after now + margin by the new clock. Then the
// clock is stepped back (the restore): the daemon counts a backward step,
// keeps serving without calling STS, and stays ready.
//
// Safety: the step and the restore are done by a separate process in its
// own session (test/fakes/cmd/clockstep), which restores when told, when
// the test process dies (its stdin closes), on SIGINT/SIGTERM/SIGHUP, or
// after clockStepHold, whichever comes first. After it exits the test checks
// the wall clock is where it would be without the step (within 1 s).
//
// Isolation: the step disturbs anything else running on the machine that
// reads the wall clock (other tests' certificates, tokens, credentials), so
// the test runs only with IMDSPROXY_CLOCK_STEP=1, which `make test` sets in
// a serial step after the main run. It needs CAP_SYS_TIME (root).
func TestClockStepReal(t *testing.T) {
	if os.Getenv(clockStepEnv) != "1" {
		t.Skipf("steps the machine's wall clock, which would disturb tests running alongside: `make test` runs it in its own serial step (%s=1)", clockStepEnv)
	}
	if ok, why := haveCapSysTime(); !ok {
		t.Skipf("SKIPPED LOUDLY: the real clock-step drill needs CAP_SYS_TIME to step CLOCK_REALTIME (%s); run `make test` as root (CI does)", why)
	}
	requireClient(t, awsCLIPath, "AWS CLI v2 (Debian package awscli)")
	helper := buildClockStep(t)

	opts := drillOptions()
	opts.sessionLength = 0 // STS honours DurationSeconds: one hour, the role's duration
	e := startDaemon(t, opts)
	e.startTokenAgent(t)
	first, ok := e.sts.Last()
	if !ok {
		t.Fatal("ready without issued credentials")
	}
	if life := time.Until(first.Expiration); life < 55*time.Minute {
		t.Fatalf("STS issued credentials for %v, want about an hour", life)
	}
	if ent := e.clockStepEntry(t); ent.AccessKeyID != first.AccessKeyID || !ent.Valid {
		t.Fatalf("before the step /debug/cache shows %+v, want %s valid", ent, first.AccessKeyID)
	}
	m := e.scrape(t)
	if v := clockSteps(m, ""); v != 0 {
		t.Fatalf("imdsproxy_cache_clock_steps_total = %v before any step", v)
	}
	requestsBefore := m.Sum("imdsproxy_cache_requests_total", nil)
	refreshesBefore := m.Sum("imdsproxy_cache_refreshes_total", nil)
	callsBefore := e.sts.Calls()

	// The step. No client asks the daemon anything until it has refreshed.
	cs := startClockStep(t, helper, clockStep, clockStepHold)
	stepAt := time.Now()
	t.Logf("CLOCK_REALTIME stepped %v forward: now %s", clockStep, stepAt.UTC().Format(time.RFC3339))
	stop := make(chan struct{})
	rz := e.watchReadyz(stop)
	var fresh clockStepDebugEntry
	for {
		ent := e.clockStepEntry(t)
		seen := time.Now()
		if ent.Valid {
			exp, err := time.Parse(time.RFC3339, ent.Expires)
			// expires is whole seconds, the daemon read its clock just before.
			if err != nil || !exp.After(seen.Add(drillMargin-time.Second)) {
				t.Errorf("/debug/cache at %s reports %s expiring %q as valid: expired by the new clock", seen.UTC().Format(time.RFC3339), ent.AccessKeyID, ent.Expires)
			}
		}
		if ent.Valid && ent.AccessKeyID != first.AccessKeyID {
			fresh = ent
			break
		}
		if time.Since(stepAt) > clockStepNotice {
			close(stop)
			t.Fatalf("no fresh credentials %v after the step without client requests; /debug/cache: %+v\nSTS calls: %+v\n%s",
				clockStepNotice, ent, e.sts.CallLog(), e.logTail(30))
		}
		time.Sleep(100 * time.Millisecond)
	}
	took := time.Since(stepAt)
	close(stop)
	t.Logf("the daemon refreshed by itself %v after the step: %s expiring %s", took.Round(time.Millisecond), fresh.AccessKeyID, fresh.Expires)
	seen := map[string]int{}
	var order []string
	for _, s := range rz.notOK() {
		if seen[s]++; seen[s] == 1 {
			order = append(order, s)
		}
	}
	for _, s := range order {
		t.Logf("/readyz right after the step (%d samples): %s", seen[s], s)
	}

	m = e.scrape(t)
	if n := m.Sum("imdsproxy_cache_requests_total", nil); n != requestsBefore {
		t.Errorf("imdsproxy_cache_requests_total went from %v to %v: the refresh was not the daemon's own", requestsBefore, n)
	}
	if v := clockSteps(m, "forward"); v != 1 {
		t.Errorf(`imdsproxy_cache_clock_steps_total{direction="forward"} = %v, want 1`, v)
	}
	if l := e.stepLogLine("forward"); l == nil {
		t.Errorf(`no "wall clock stepped" Warn line with direction forward in the log`)
	} else if step, _ := l["step"].(float64); l["level"] != "warn" || math.Abs(step-clockStep.Seconds()) > 5 {
		t.Errorf(`"wall clock stepped" line %v: want level warn and step about %v s`, l, clockStep.Seconds())
	}
	fetches := m.Sum("imdsproxy_cache_refreshes_total", nil) - refreshesBefore
	calls := e.sts.Calls() - callsBefore
	t.Logf("after the step: %v upstream fetches, %d STS calls", fetches, calls)
	if bound := drillMaxFetches(time.Since(stepAt), 0); fetches < 1 || fetches > float64(bound) {
		t.Errorf("%v upstream fetches in the %v after the step, want 1 to %d", fetches, time.Since(stepAt), bound)
	}
	if calls < 1 || float64(calls) > 2*fetches {
		t.Errorf("%d STS calls for %v fetches after the step", calls, fetches)
	}
	e.drillWaitReadyz(t, http.StatusOK, 2*time.Second, "ready: credentials for role "+e2e.RoleName+" valid until")

	// Clients, by the new clock.
	s := e.drillServe(t, time.Now().Add(3*time.Second), drillClients{wantAK: fresh.AccessKeyID})
	s.check(t, "after the step")
	var cli clientCreds
	b := runClient(t, e.dir, e.clientEnviron(), awsCLIPath, "configure", "export-credentials", "--format", "process")
	if err := json.Unmarshal(b, &cli); err != nil {
		t.Fatalf("aws configure export-credentials printed %q: %v", redactOutput(b), err)
	}
	e.assertExactlyIssued(t, "AWS CLI", cli)
	if exp, err := time.Parse(time.RFC3339, cli.Expiration); err != nil || !exp.After(time.Now().Add(30*time.Minute)) {
		t.Errorf("AWS CLI got credentials expiring %q, want about an hour from now (%s)", cli.Expiration, time.Now().UTC().Format(time.RFC3339))
	}
	t.Logf("AWS CLI got %s expiring %s", cli.AccessKeyId, cli.Expiration)

	// The restore: a backward step of the same size.
	callsBefore = e.sts.Calls()
	cs.restore(t)
	restoredAt := time.Now()
	for clockSteps(e.scrape(t), "backward") != 1 {
		if time.Since(restoredAt) > clockStepMaxSleep+3*time.Second {
			t.Fatalf(`imdsproxy_cache_clock_steps_total{direction="backward"} = %v %v after the restore, want 1`,
				clockSteps(e.scrape(t), "backward"), time.Since(restoredAt))
		}
		time.Sleep(100 * time.Millisecond)
	}
	if e.stepLogLine("backward") == nil {
		t.Errorf(`no "wall clock stepped" line with direction backward in the log`)
	}
	s = e.drillServe(t, time.Now().Add(2*time.Second), drillClients{wantAK: fresh.AccessKeyID})
	s.check(t, "after the restore")
	e.drillWaitReadyz(t, http.StatusOK, 2*time.Second, "ready: credentials for role "+e2e.RoleName+" valid until")
	if n := e.sts.Calls() - callsBefore; n != 0 {
		t.Errorf("%d STS calls after the restore, want none (the credentials are valid and not due)", n)
	}
	ent := e.clockStepEntry(t)
	if next, err := time.Parse(time.RFC3339, ent.NextRefresh); err != nil || time.Until(next) > 30*time.Minute {
		t.Errorf("after the restore the next refresh is %q, want within 30m (as planned before the restore), not an hour later", ent.NextRefresh)
	}
}

// haveCapSysTime reports whether this process may set CLOCK_REALTIME
// (CAP_SYS_TIME, bit 25, in its effective capabilities).
func haveCapSysTime() (bool, string) {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return false, err.Error()
	}
	for line := range strings.Lines(string(b)) {
		v, ok := strings.CutPrefix(line, "CapEff:")
		if !ok {
			continue
		}
		caps, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
		if err != nil {
			return false, fmt.Sprintf("CapEff %q: %v", strings.TrimSpace(v), err)
		}
		const capSysTime = 25
		if caps&(1<<capSysTime) == 0 {
			return false, fmt.Sprintf("uid %d, CapEff %s", os.Geteuid(), strings.TrimSpace(v))
		}
		return true, ""
	}
	return false, "no CapEff in /proc/self/status"
}

// buildClockStep builds test/fakes/cmd/clockstep into a temporary directory.
func buildClockStep(t *testing.T) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "clockstep")
	cmd := exec.Command("go", "build", "-o", p, "./test/fakes/cmd/clockstep")
	cmd.Dir = repoRoot
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build ./test/fakes/cmd/clockstep: %v\n%s", err, out)
	}
	return p
}

// clockStepper is a running clockstep process holding the clock stepped.
type clockStepper struct {
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	lines  chan string // clockstep's stdout lines; closed at EOF
	stderr *e2e.LockedBuffer
	done   chan struct{} // closed when it has exited
	err    error         // its exit, valid after done
	t0     time.Time     // wall and monotonic reading before the step

	once    sync.Once
	stepped bool // it reported the step
}

// startClockStep starts clockstep in its own session and returns once it
// has stepped the clock by step. It registers a cleanup that restores the
// clock (if the test has not) and checks the wall clock is back where it
// belongs.
func startClockStep(t *testing.T, bin string, step, hold time.Duration) *clockStepper {
	t.Helper()
	c := &clockStepper{lines: make(chan string, 4), stderr: &e2e.LockedBuffer{}, done: make(chan struct{})}
	c.cmd = exec.Command(bin, "-step", step.String(), "-hold", hold.String())
	// Its own session: a signal to the test's process group (go test's
	// timeout, Ctrl-C) must not kill it before it restores the clock.
	c.cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	c.cmd.Stderr = c.stderr
	var err error
	if c.stdin, err = c.cmd.StdinPipe(); err != nil {
		t.Fatal(err)
	}
	stdout, err := c.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	c.t0 = time.Now()
	if err := c.cmd.Start(); err != nil {
		t.Fatalf("start clockstep: %v", err)
	}
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			c.lines <- sc.Text()
		}
		close(c.lines)
		c.err = c.cmd.Wait()
		close(c.done)
	}()
	t.Cleanup(func() { c.restore(t) })
	select {
	case l, ok := <-c.lines:
		if ok && strings.HasPrefix(l, "stepped ") {
			c.stepped = true
			return c
		}
		<-c.done
		if e2e.ExitCode(c.err) == 3 { // the clock was not changed
			t.Skipf("SKIPPED LOUDLY: clockstep could not step CLOCK_REALTIME: %s; run `make test` as root (CI does)", strings.TrimSpace(c.stderr.String()))
		}
		t.Fatalf("clockstep did not step the clock: first line %q, exit %v\n%s", l, c.err, c.stderr.String())
	case <-time.After(10 * time.Second):
		t.Fatalf("clockstep did not report the step within 10s\n%s", c.stderr.String())
	}
	return nil
}

// restore tells clockstep to put the clock back, waits for it, and checks
// the wall clock agrees with the monotonic clock's account of the time
// since before the step (within 1 s). Only the first call acts.
func (c *clockStepper) restore(t *testing.T) {
	t.Helper()
	c.once.Do(func() {
		_, _ = io.WriteString(c.stdin, "restore\n")
		_ = c.stdin.Close()
		select {
		case <-c.done:
		case <-time.After(15 * time.Second):
			t.Errorf("clockstep has not exited 15s after being told to restore (it restores by itself within %v of the step)\n%s", clockStepHold, c.stderr.String())
			return
		}
		var restored string
		for l := range c.lines {
			if strings.HasPrefix(l, "restored ") {
				restored = l
			}
		}
		if !c.stepped && e2e.ExitCode(c.err) == 3 {
			return // it could not step: the clock was never changed
		}
		if c.err != nil || restored == "" {
			t.Errorf("clockstep: exit %v, stdout %q\n%s", c.err, restored, c.stderr.String())
		}
		want := c.t0.Round(0).Add(time.Since(c.t0))
		got := time.Now().Round(0)
		if d := got.Sub(want); d > time.Second || d < -time.Second {
			t.Errorf("CLOCK_REALTIME is %s, want %s (off by %v): fix the clock (date -s, or NTP)", got.UTC().Format(time.RFC3339Nano), want.UTC().Format(time.RFC3339Nano), d)
		} else {
			t.Logf("clock restored (%s); the wall clock is within %v of where it would be without the step", restored, d)
		}
	})
}

// startTokenAgent writes a fresh one-hour JWT to the token file now and
// again whenever half its lifetime has passed by the machine's clock, as a
// real token agent does: after the step it writes a new one at once. It
// stops when the test ends.
func (e *daemonEnv) startTokenAgent(t *testing.T) {
	write := func() time.Time {
		now := time.Now()
		jwt := e.issuer.Mint(oidc.Claims{Subject: "host-1", IssuedAt: now, ExpiresAt: now.Add(time.Hour)})
		e.mu.Lock()
		e.jwts = append(e.jwts, jwt)
		e.mu.Unlock()
		if err := oidc.WriteTokenFile(e.tokenFile, jwt); err != nil {
			t.Errorf("token agent: %v", err)
		}
		return now
	}
	issued := write()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case <-ctx.Done():
				return
			case <-time.After(100 * time.Millisecond):
			}
			// Wall-clock times: the agent reads the clock as the token's
			// exp does.
			if time.Now().Round(0).Sub(issued.Round(0)) > 30*time.Minute {
				issued = write()
			}
		}
	}()
	t.Cleanup(func() { cancel(); <-done })
}

// clockStepDebugEntry is the /debug/cache entry of the role, the fields this
// test reads.
type clockStepDebugEntry struct {
	AccessKeyID string `json:"access_key_id"`
	Expires     string `json:"expires"`
	NextRefresh string `json:"next_refresh"`
	LastError   string `json:"last_error"`
	Valid       bool   `json:"valid"`
}

func (e *daemonEnv) clockStepEntry(t *testing.T) clockStepDebugEntry {
	t.Helper()
	_, body := e.debugCache(t)
	var doc struct {
		Entries []struct {
			Key string `json:"key"`
			clockStepDebugEntry
		} `json:"entries"`
	}
	if err := json.Unmarshal([]byte(body), &doc); err != nil {
		t.Fatalf("/debug/cache: %v", err)
	}
	for _, ent := range doc.Entries {
		if ent.Key == e2e.RoleName {
			return ent.clockStepDebugEntry
		}
	}
	t.Fatalf("/debug/cache has no entry for %s:\n%s", e2e.RoleName, body)
	return clockStepDebugEntry{}
}

// clockSteps is imdsproxy_cache_clock_steps_total for direction ("" for
// all) in the metrics m.
func clockSteps(m e2e.Metrics, direction string) float64 {
	var labels map[string]string
	if direction != "" {
		labels = map[string]string{"direction": direction}
	}
	return m.Sum("imdsproxy_cache_clock_steps_total", labels)
}

// stepLogLine returns the daemon's "wall clock stepped" log line with
// direction, nil if there is none.
func (e *daemonEnv) stepLogLine(direction string) map[string]any {
	for _, l := range e.logLines() {
		if l["msg"] == "wall clock stepped" && l["direction"] == direction {
			return l
		}
	}
	return nil
}
