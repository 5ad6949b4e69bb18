package cache

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/imdsproxy/imdsproxy/creds"
)

// stepClock is a wall clock that runs with the bubble's clock (time.Now) and
// can be stepped; the monotonic clock (time.Now) is not moved by a step, as
// on a real host.
type stepClock struct{ off atomic.Int64 }

func (s *stepClock) now() time.Time          { return time.Now().Add(time.Duration(s.off.Load())) }
func (s *stepClock) step(d time.Duration)    { s.off.Add(int64(d)) }
func (s *stepClock) config(r float64) Config { return Config{Now: s.now, Rand: fixedRand(r)} }

// noticeWithin is how soon after a step of the wall clock Run must act on
// it: the tests state the requirement rather than read MaxSleep, so a longer
// MaxSleep fails them.
const noticeWithin = 5 * time.Second

// succeedOn issues credentials valid for lifetime by clock, as an upstream
// on the same (stepped) clock does.
func succeedOn(clock *stepClock, lifetime time.Duration) fetchFunc {
	return func(_ context.Context, _ string, n int) (creds.Credentials, error) {
		cr := issue(keyID(n), 0)
		cr.Expires = clock.now().Add(lifetime).Round(0)
		return cr, nil
	}
}

// stepLogs returns the "wall clock stepped" log lines.
func stepLogs(t *testing.T, h *harness) []map[string]any {
	t.Helper()
	var out []map[string]any
	for l := range strings.Lines(h.logs.String()) {
		var m map[string]any
		if err := json.Unmarshal([]byte(l), &m); err != nil {
			t.Fatalf("bad log line %q: %v", l, err)
		}
		if m["msg"] == "wall clock stepped" {
			out = append(out, m)
		}
	}
	return out
}

func (h *harness) steps(dir string) float64 {
	return testutil.ToFloat64(h.m.clockSteps.WithLabelValues(dir))
}

// waitCalls sleeps in 100 ms steps until f has had want calls, for at most
// limit, and returns how long that took.
func waitCalls(t *testing.T, f *fakeFetcher, want int, limit time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	for f.calls() < want {
		if time.Since(start) > limit {
			t.Fatalf("fetch calls = %d after %s, want %d", f.calls(), limit, want)
		}
		time.Sleep(100 * time.Millisecond)
		synctest.Wait()
	}
	return time.Since(start)
}

// A forward step of the wall clock makes due at once what the new time says
// is due: Run starts those refreshes within MaxSleep without any Get, once
// per key, logs the step once and counts it, and then keeps the normal
// schedule (no storm). Get never serves credentials expired by the new clock.
func TestClockStepForward(t *testing.T) {
	for _, tc := range []struct {
		name string
		step time.Duration
		// servable: the old credentials are still servable after the step
		// (only their refresh is overdue).
		servable bool
	}{
		{"overdue refresh", 20 * time.Minute, true},
		{"credentials expired", time.Hour, false},
		{"a day", 24 * time.Hour, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				clock := &stepClock{}
				f := newFake(succeedOn(clock, time.Hour))
				h := newHarness(t, f, clock.config(0.5))
				defer run(t, h.Cache)()
				keys := []string{"a", "b", "c"}
				for _, k := range keys {
					if err := h.Prefetch(t.Context(), k); err != nil {
						t.Fatal(err)
					}
				}
				old := map[string]string{}
				for _, k := range keys {
					old[k] = mustGet(t, h.Cache, k).AccessKeyID
				}
				// Ten minutes of normal running: refreshes are due at 27m.
				time.Sleep(10 * time.Minute)
				synctest.Wait()
				if n := f.calls(); n != 3 || h.steps("forward")+h.steps("backward") != 0 || len(stepLogs(t, h)) != 0 {
					t.Fatalf("before the step: %d fetches, %v+%v steps, logs %v", n, h.steps("forward"), h.steps("backward"), stepLogs(t, h))
				}

				clock.step(tc.step)
				for _, e := range h.Snapshot() {
					if e.Valid != tc.servable {
						t.Fatalf("right after the step %s: Valid = %v, want %v", e.Key, e.Valid, tc.servable)
					}
				}
				took := waitCalls(t, f, 6, noticeWithin+time.Second)
				t.Logf("refreshes started %v after the step", took)
				if took > noticeWithin {
					t.Errorf("refreshes started %v after the step, want within %v", took, noticeWithin)
				}
				for _, k := range keys {
					e := snapshotOf(t, h.Cache, k)
					if !e.Valid || e.AccessKeyID == old[k] || e.ConsecutiveFailures != 0 {
						t.Errorf("after the step: %+v", e)
					}
					if left := e.NextRefresh.Sub(clock.now()); left < 26*time.Minute || left > 28*time.Minute {
						t.Errorf("%s: next refresh in %v after the step, want about 27m", k, left)
					}
					if cr := mustGet(t, h.Cache, k); !cr.ValidAt(clock.now().Add(time.Minute)) {
						t.Errorf("%s: served %s expiring %s, expired by the new clock %s", k, cr.AccessKeyID, cr.Expires, clock.now())
					}
				}
				if v := h.steps("forward"); v != 1 {
					t.Errorf(`clock_steps_total{direction="forward"} = %v, want 1`, v)
				}
				logs := stepLogs(t, h)
				if len(logs) != 1 {
					t.Fatalf("step log lines: %v, want one", logs)
				}
				if l := logs[0]; l["level"] != "warn" || l["direction"] != "forward" || l["refreshes_started"] != 3.0 ||
					l["step"].(float64) < tc.step.Seconds()-0.5 || l["step"].(float64) > tc.step.Seconds()+0.5 || l["wall_clock"] == nil {
					t.Errorf("step log line: %v", l)
				}

				// No storm: nothing more until the new schedule comes.
				time.Sleep(25 * time.Minute)
				synctest.Wait()
				if n := f.calls(); n != 6 {
					t.Errorf("fetch calls 25m after the step = %d, want 6", n)
				}
				time.Sleep(3 * time.Minute)
				synctest.Wait()
				if n := f.calls(); n != 9 {
					t.Errorf("fetch calls 28m after the step = %d, want 9", n)
				}
				if v := h.steps("forward"); v != 1 || len(stepLogs(t, h)) != 1 {
					t.Errorf("one step reported %v times, logged %d times", v, len(stepLogs(t, h)))
				}
			})
		})
	}
}

// A Get between a forward step and Run's next wake finds the old credentials
// expired by the new clock: it waits for one fresh fetch (which Run then
// does not repeat) and never gets the expired ones.
func TestClockStepForwardGetNeverServesExpired(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		clock := &stepClock{}
		f := newFake(succeedOn(clock, time.Hour))
		h := newHarness(t, f, clock.config(0.5))
		defer run(t, h.Cache)()
		if err := h.Prefetch(t.Context(), "app"); err != nil {
			t.Fatal(err)
		}
		time.Sleep(10 * time.Minute)
		clock.step(time.Hour)
		cr := mustGet(t, h.Cache, "app")
		if cr.AccessKeyID != keyID(2) || !cr.ValidAt(clock.now().Add(30*time.Minute)) {
			t.Fatalf("after the step Get returned %s expiring %s (now %s), want fresh %s", cr.AccessKeyID, cr.Expires, clock.now(), keyID(2))
		}
		time.Sleep(2 * noticeWithin)
		synctest.Wait()
		if n := f.calls(); n != 2 {
			t.Errorf("fetch calls = %d, want 2 (Run must not refresh again)", n)
		}
		if v := h.steps("forward"); v != 1 {
			t.Errorf(`clock_steps_total{direction="forward"} = %v, want 1`, v)
		}
	})
}

// A backward step makes cached credentials look longer-lived; the pending
// refresh still comes when it would have without the step (not an hour
// later), the step is logged and counted once, and nothing is fetched early.
func TestClockStepBackward(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		clock := &stepClock{}
		f := newFake(succeedOn(clock, time.Hour))
		h := newHarness(t, f, clock.config(0.5))
		defer run(t, h.Cache)()
		if err := h.Prefetch(t.Context(), "app"); err != nil {
			t.Fatal(err)
		}
		planned := time.Now().Add(27 * time.Minute) // on the bubble's (monotonic) clock
		time.Sleep(10 * time.Minute)
		clock.step(-time.Hour)
		time.Sleep(noticeWithin)
		synctest.Wait()
		if v := h.steps("backward"); v != 1 {
			t.Errorf(`clock_steps_total{direction="backward"} = %v, want 1`, v)
		}
		logs := stepLogs(t, h)
		if len(logs) != 1 || logs[0]["direction"] != "backward" || logs[0]["step"].(float64) > -3599.5 || logs[0]["refreshes_started"] != 0.0 {
			t.Fatalf("step log lines: %v", logs)
		}
		e := snapshotOf(t, h.Cache, "app")
		if left := e.NextRefresh.Sub(clock.now()); left != time.Until(planned) {
			t.Errorf("next refresh in %v after the step, want %v as planned", left, time.Until(planned))
		}
		if !e.Valid || f.calls() != 1 {
			t.Errorf("after the step: %d fetches, entry %+v", f.calls(), e)
		}
		time.Sleep(time.Until(planned) - time.Second)
		synctest.Wait()
		if n := f.calls(); n != 1 {
			t.Fatalf("fetch calls 1s before the planned refresh = %d, want 1", n)
		}
		took := waitCalls(t, f, 2, noticeWithin)
		t.Logf("refreshed %v after the planned time", took-time.Second)
		if cr := mustGet(t, h.Cache, "app"); cr.AccessKeyID != keyID(2) {
			t.Errorf("after the refresh got %s, want %s", cr.AccessKeyID, keyID(2))
		}
		// Then the normal schedule, on the (new) wall clock.
		time.Sleep(30 * time.Minute)
		synctest.Wait()
		if n := f.calls(); n != 3 {
			t.Errorf("fetch calls 30m later = %d, want 3", n)
		}
		if v := h.steps("backward") + h.steps("forward"); v != 1 {
			t.Errorf("clock steps = %v, want 1", v)
		}
	})
}

// A key in backoff with nothing servable is not locked out for the size of a
// backward step: Get reports the retry as it was planned and Run retries on
// time.
func TestClockStepBackwardBackoff(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		clock := &stepClock{}
		f := newFake(fail(&testError{class: "server"}))
		h := newHarness(t, f, clock.config(0.5))
		defer run(t, h.Cache)()
		if err := h.Prefetch(t.Context(), "app"); err == nil {
			t.Fatal("Prefetch succeeded")
		}
		// Retry planned 1.5s after the failure (2s × 0.75).
		clock.step(-time.Hour)
		_, err := h.Get(t.Context(), "app")
		var te *testError
		if !errors.As(err, &te) || !strings.Contains(err.Error(), "next attempt in 1.5s") {
			t.Fatalf("Get in backoff after the step: %v, want the planned 1.5s", err)
		}
		f.set(succeedOn(clock, time.Hour))
		took := waitCalls(t, f, 2, noticeWithin)
		if took > 2*time.Second {
			t.Errorf("retried %v after the step, want at the planned 1.5s", took)
		}
		synctest.Wait()
		if cr := mustGet(t, h.Cache, "app"); cr.AccessKeyID != keyID(2) {
			t.Errorf("got %s, want %s", cr.AccessKeyID, keyID(2))
		}
	})
}

// Differences below StepThreshold are not steps, however often they come.
func TestClockSmallAdjustmentsAreNotSteps(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		clock := &stepClock{}
		f := newFake(succeedOn(clock, time.Hour))
		h := newHarness(t, f, clock.config(0.5))
		defer run(t, h.Cache)()
		if err := h.Prefetch(t.Context(), "app"); err != nil {
			t.Fatal(err)
		}
		for i := range 20 {
			d := StepThreshold - 100*time.Millisecond
			if i%2 == 1 {
				d = -d
			}
			clock.step(d)
			time.Sleep(noticeWithin + time.Second)
			synctest.Wait()
		}
		if v := h.steps("forward") + h.steps("backward"); v != 0 || len(stepLogs(t, h)) != 0 {
			t.Errorf("adjustments below the threshold reported as %v steps: %v", v, stepLogs(t, h))
		}
		clock.step(StepThreshold + 100*time.Millisecond)
		time.Sleep(noticeWithin)
		synctest.Wait()
		if v := h.steps("forward"); v != 1 {
			t.Errorf("a step just above the threshold counted %v times, want 1", v)
		}
	})
}

// Run never sleeps longer than MaxSleep (at most noticeWithin), even with
// nothing to do for hours: a step is noticed that soon whatever the
// schedule.
func TestRunSleepIsCapped(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		clock := &stepClock{}
		f := newFake(succeedOn(clock, 12*time.Hour))
		h := newHarness(t, f, clock.config(0.5))
		defer run(t, h.Cache)()
		if err := h.Prefetch(t.Context(), "app"); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Hour)
		synctest.Wait()
		clock.step(-time.Hour)
		start := time.Now()
		for h.steps("backward") == 0 {
			if time.Since(start) > noticeWithin {
				t.Fatalf("step not noticed within %v", noticeWithin)
			}
			time.Sleep(100 * time.Millisecond)
			synctest.Wait()
		}
		if n := f.calls(); n != 1 {
			t.Errorf("fetch calls = %d, want 1", n)
		}
	})
}

// BenchmarkStartDue is the cost of one wake of Run with a full cache (16
// keys) and nothing due: what the MaxSleep cap adds every 5 s.
func BenchmarkStartDue(b *testing.B) {
	f := newFake(succeed(time.Hour))
	c, err := New[string](f, Config{}, nil, nil)
	if err != nil {
		b.Fatal(err)
	}
	for i := range DefaultSize {
		if err := c.Prefetch(b.Context(), string(rune('a'+i))); err != nil {
			b.Fatal(err)
		}
	}
	for b.Loop() {
		if _, started := c.startDue(b.Context()); started != 0 {
			b.Fatalf("started %d refreshes", started)
		}
	}
}
