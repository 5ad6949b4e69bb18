package cache

import (
	"context"
	"errors"
	"math/rand/v2"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/imdsproxy/imdsproxy/creds"
)

func TestNewConfig(t *testing.T) {
	f := newFake(succeed(time.Hour))
	c, err := New[string](f, Config{}, nil, nil)
	if err != nil {
		t.Fatalf("New with zero config: %v", err)
	}
	want := Config{Size: 16, FetchTimeout: 30 * time.Second, BackoffInitial: 2 * time.Second, BackoffMax: 5 * time.Minute, ExpiryMargin: time.Minute}
	got := c.cfg
	got.Now, got.Rand = nil, nil
	if got.Size != want.Size || got.FetchTimeout != want.FetchTimeout || got.BackoffInitial != want.BackoffInitial ||
		got.BackoffMax != want.BackoffMax || got.ExpiryMargin != want.ExpiryMargin || c.cfg.Now == nil || c.cfg.Rand == nil {
		t.Errorf("defaults = %+v, want %+v", got, want)
	}
	for name, cfg := range map[string]Config{
		"negative size":         {Size: -1},
		"negative timeout":      {FetchTimeout: -time.Second},
		"negative margin":       {ExpiryMargin: -time.Second},
		"max below initial":     {BackoffInitial: time.Minute, BackoffMax: time.Second},
		"max below default ini": {BackoffMax: time.Second},
	} {
		if _, err := New[string](f, cfg, nil, nil); err == nil {
			t.Errorf("%s: New succeeded, want an error", name)
		}
	}
	if _, err := New[string](nil, Config{}, nil, nil); err == nil {
		t.Error("New[string](nil fetcher) succeeded, want an error")
	}
	h := newHarness(t, f, Config{})
	if !panics(func() { _, _ = New[string](f, Config{}, nil, h.reg) }) {
		t.Error("registering a second cache on the same registry succeeded, want a panic")
	}
}

// panics reports whether f panicked: registering a component's metrics
// twice on one registry is a programming error (promauto's MustRegister).
func panics(f func()) (did bool) {
	defer func() { did = recover() != nil }()
	f()
	return false
}

// A hit never calls or waits on the fetcher, even while a refresh is in
// flight (blocked) or failing.
func TestGetHitNeverWaits(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFake(succeed(time.Hour))
		h := newHarness(t, f, Config{Rand: fixedRand(0.5)})
		defer run(t, h.Cache)()
		if err := h.Prefetch(t.Context(), "app"); err != nil {
			t.Fatal(err)
		}
		first := mustGet(t, h.Cache, "app")
		for range 100 {
			if cr := mustGet(t, h.Cache, "app"); cr.AccessKeyID != first.AccessKeyID {
				t.Fatalf("got %s, want %s", cr.AccessKeyID, first.AccessKeyID)
			}
		}
		if n := f.calls(); n != 1 {
			t.Fatalf("fetch calls = %d, want 1", n)
		}

		open := f.block()
		time.Sleep(time.Until(snapshotOf(t, h.Cache, "app").NextRefresh) + time.Second)
		synctest.Wait()
		if n := f.calls(); n != 2 {
			t.Fatalf("fetch calls = %d, want 2 (refresh in flight)", n)
		}
		if v := testutil.ToFloat64(h.m.inFlight); v != 1 {
			t.Errorf("fetches in flight = %v, want 1", v)
		}
		// The fetcher is blocked: a Get that waited on it would deadlock the bubble.
		before := time.Now()
		if cr := mustGet(t, h.Cache, "app"); cr.AccessKeyID != first.AccessKeyID || !time.Now().Equal(before) {
			t.Fatalf("Get during refresh returned %s after %s", cr.AccessKeyID, time.Since(before))
		}

		f.set(fail(&testError{class: "server"}))
		open()
		synctest.Wait()
		if e := snapshotOf(t, h.Cache, "app"); e.ConsecutiveFailures != 1 || !e.Valid {
			t.Fatalf("after failed refresh: %+v", e)
		}
		if cr := mustGet(t, h.Cache, "app"); cr.AccessKeyID != first.AccessKeyID {
			t.Fatalf("Get during failing refresh returned %s", cr.AccessKeyID)
		}
		if n := f.calls(); n != 2 {
			t.Fatalf("fetch calls = %d, want 2", n)
		}
		if hit, stale := testutil.ToFloat64(h.m.hit), testutil.ToFloat64(h.m.stale); hit != 102 || stale != 1 {
			t.Errorf("hit, stale = %v, %v; want 102, 1", hit, stale)
		}
	})
}

// 1000 concurrent Gets on a cold cache share exactly one fetch.
func TestColdHerdOneFetch(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFake(succeed(time.Hour))
		h := newHarness(t, f, Config{})
		open := f.block()
		const n = 1000
		got := make([]creds.Credentials, n)
		errs := make([]error, n)
		var wg sync.WaitGroup
		for i := range n {
			wg.Go(func() { got[i], errs[i] = h.Get(t.Context(), "app") })
		}
		synctest.Wait()
		if c := f.calls(); c != 1 {
			t.Fatalf("fetch calls with %d waiters = %d, want 1", n, c)
		}
		if v := testutil.ToFloat64(h.m.inFlight); v != 1 {
			t.Errorf("fetches in flight = %v, want 1", v)
		}
		open()
		wg.Wait()
		for i := range n {
			if errs[i] != nil || got[i].AccessKeyID != keyID(1) {
				t.Fatalf("waiter %d: %s, %v", i, got[i].AccessKeyID, errs[i])
			}
		}
		if c := f.calls(); c != 1 {
			t.Errorf("fetch calls = %d, want 1", c)
		}
		if v := testutil.ToFloat64(h.m.miss); v != n {
			t.Errorf("misses = %v, want %d", v, n)
		}
		if v := testutil.ToFloat64(h.m.inFlight); v != 0 {
			t.Errorf("fetches in flight = %v, want 0", v)
		}
	})
}

// NextRefresh falls in the window of the schedule for every random value,
// the random values spread over it, and sessions of 40 minutes or more keep
// at least 30 minutes at refresh time (WIRE.md §4, §8.6). Sessions of 6 h and
// 12 h are refreshed at the jittered half-life, 0.45 × [0.9, 1.1] of the
// lifetime, as before. Sessions of 40 minutes up to an hour changed: they
// used to be refreshed at the jittered half-life too (0.5 × [0.9, 1.1] below
// 55 min, 0.45 × [0.9, 1.1] from it), which left 20..25 minutes of a 45-minute
// session and as little as 27.8 of an hour-long one; they are now refreshed
// 30..36 minutes before expiry when that comes first (never sooner than a
// quarter of the lifetime); a session under 40 minutes keeps its half-life.
func TestRefreshJitterWindow(t *testing.T) {
	for _, tc := range []struct {
		lifetime         time.Duration
		earliest, latest time.Duration // of the refresh, from now
		spread           time.Duration // at least, over the random values
		keeps30m         bool
	}{
		// Under 40 minutes: the jittered half-life, 0.5 × [0.9, 1.1], as before.
		{15 * time.Minute, 6*time.Minute + 45*time.Second, 8*time.Minute + 15*time.Second, 80 * time.Second, false},
		// 54 − 36 .. 54 − 30 min: the 30-minute rule comes first for every rnd.
		{54 * time.Minute, 18 * time.Minute, 24 * time.Minute, 5 * time.Minute, true},
		// Seconds short of an hour: 0.405 × lifetime (rnd 0) or
		// lifetime − 36 min (rnd 1), whichever comes first, up to about 27 min.
		{59*time.Minute + 58*time.Second, 23*time.Minute + 58*time.Second, 27 * time.Minute, 2*time.Minute + 30*time.Second, true},
		{time.Hour, 24 * time.Minute, 27 * time.Minute, 2*time.Minute + 30*time.Second, true},
		{6 * time.Hour, 2*time.Hour + 25*time.Minute + 48*time.Second, 2*time.Hour + 58*time.Minute + 12*time.Second, 29 * time.Minute, true},
		{12 * time.Hour, 4*time.Hour + 51*time.Minute + 36*time.Second, 5*time.Hour + 56*time.Minute + 24*time.Second, 58 * time.Minute, true},
	} {
		t.Run(tc.lifetime.String(), func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				rs := []float64{0, 0.5, 0.999999}
				for range 300 {
					rs = append(rs, rand.Float64())
				}
				var lo, hi time.Duration = tc.lifetime, 0
				for _, r := range rs {
					f := newFake(succeed(tc.lifetime))
					c, err := New[string](f, Config{Rand: fixedRand(r)}, nil, nil)
					if err != nil {
						t.Fatal(err)
					}
					now := time.Now()
					if err := c.Prefetch(t.Context(), "app"); err != nil {
						t.Fatal(err)
					}
					e := c.Snapshot()[0]
					at := e.NextRefresh.Sub(now)
					if at < tc.earliest || at > tc.latest {
						t.Fatalf("r=%v: refresh after %s, want within [%s, %s]", r, at, tc.earliest, tc.latest)
					}
					if left := e.Expires.Sub(e.NextRefresh); tc.keeps30m && left < 30*time.Minute {
						t.Fatalf("r=%v: only %s left at refresh, want >= 30m", r, left)
					}
					lo, hi = min(lo, at), max(hi, at)
				}
				// The random values must actually spread over the window.
				if hi-lo < tc.spread {
					t.Errorf("refresh times spread over %s, want at least %s", hi-lo, tc.spread)
				}
			})
		})
	}
}

// Through a Cache, a 45-minute session is scheduled for refresh while 30
// minutes are still left (WIRE.md §4, §8.6), not at its jittered half-life
// (20..25 minutes left).
func TestCacheRefreshKeeps30Minutes(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFake(succeed(45 * time.Minute))
		c, err := New[string](f, Config{Rand: fixedRand(0.5)}, nil, nil)
		if err != nil {
			t.Fatal(err)
		}
		if err := c.Prefetch(t.Context(), "app"); err != nil {
			t.Fatal(err)
		}
		e := c.Snapshot()[0]
		if left := e.Expires.Sub(e.NextRefresh); left < 30*time.Minute {
			t.Errorf("a 45m session is refreshed with %s left, want at least 30m (WIRE.md §4, §8.6)", left)
		}
	})
}

// An upstream that claims a far-future Expiration (a federation endpoint's
// bug, a wrong time zone, a year typo) used to get its refresh scheduled at
// about half of the claimed lifetime, decades away: no AWS role session
// outlives 12 h, so the daemon would serve dead credentials, ready, without
// ever refreshing. The refresh interval is capped at 6 h, and Run does
// refresh by then.
func TestFarFutureExpiryStillRefreshed(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFake(succeed(100 * 365 * 24 * time.Hour))
		h := newHarness(t, f, Config{})
		defer run(t, h.Cache)()
		start := time.Now()
		if _, err := h.Get(t.Context(), "app"); err != nil {
			t.Fatal(err)
		}
		e, ok := h.Lookup("app")
		if !ok {
			t.Fatal("no entry for app after Get")
		}
		if in := e.NextRefresh.Sub(start); in > maxRefreshInterval {
			t.Fatalf("next refresh in %s (%s); credentials claiming to outlive any AWS session should still be refreshed within %s",
				in.Round(time.Hour), e.NextRefresh.Format(time.RFC3339), maxRefreshInterval)
		}
		time.Sleep(maxRefreshInterval + time.Second)
		synctest.Wait()
		if n := f.calls(); n < 2 {
			t.Errorf("fetch calls %s after the first = %d, want a refresh (>= 2)", maxRefreshInterval, n)
		}
	})
}

// Run refreshes at NextRefresh (not before), serves the new credentials,
// and picks up keys registered after it started.
func TestRunRefreshesAtNextRefresh(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFake(succeed(time.Hour))
		h := newHarness(t, f, Config{Rand: fixedRand(0.5)})
		defer run(t, h.Cache)()
		synctest.Wait() // Run is idle with nothing to schedule
		start := time.Now()
		if err := h.Prefetch(t.Context(), "app"); err != nil {
			t.Fatal(err)
		}
		e := snapshotOf(t, h.Cache, "app")
		if want := start.Add(27 * time.Minute); !e.NextRefresh.Equal(want) {
			t.Fatalf("NextRefresh = %s, want %s (0.45 of 1h)", e.NextRefresh, want)
		}
		time.Sleep(time.Until(e.NextRefresh) - time.Second)
		synctest.Wait()
		if n := f.calls(); n != 1 {
			t.Fatalf("fetch calls 1s before NextRefresh = %d, want 1", n)
		}
		old := mustGet(t, h.Cache, "app")
		if left := old.Remaining(time.Now()); left < 30*time.Minute {
			t.Errorf("served credentials with %s left before refresh, want >= 30m", left)
		}
		time.Sleep(time.Second)
		synctest.Wait()
		if n := f.calls(); n != 2 {
			t.Fatalf("fetch calls at NextRefresh = %d, want 2", n)
		}
		if cr := mustGet(t, h.Cache, "app"); cr.AccessKeyID != keyID(2) {
			t.Fatalf("after refresh got %s, want %s", cr.AccessKeyID, keyID(2))
		}
		e = snapshotOf(t, h.Cache, "app")
		if want := time.Now().Add(27 * time.Minute); !e.NextRefresh.Equal(want) {
			t.Errorf("second NextRefresh = %s, want %s", e.NextRefresh, want)
		}
		// Three more refresh periods: three more fetches, no more.
		time.Sleep(3*27*time.Minute + time.Second)
		synctest.Wait()
		if n := f.calls(); n != 5 {
			t.Errorf("fetch calls after 4 periods = %d, want 5", n)
		}
	})
}

// An upstream outage longer than a refresh interval: Gets keep returning the
// last good credentials with no error until they are within ExpiryMargin of
// expiry, the number of fetches is bounded by the backoff formula, and the
// first successful retry is served.
func TestOutageKeepsLastGoodAndBacksOff(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cfg := Config{BackoffInitial: 2 * time.Second, BackoffMax: 5 * time.Minute, ExpiryMargin: time.Minute}
		f := newFake(succeed(time.Hour))
		h := newHarness(t, f, cfg)
		defer run(t, h.Cache)()
		t0 := time.Now()
		if err := h.Prefetch(t.Context(), "app"); err != nil {
			t.Fatal(err)
		}
		good := mustGet(t, h.Cache, "app")
		f.set(fail(&testError{class: "server"}))

		const outage = 90 * time.Minute
		servableUntil := good.Expires.Add(-cfg.ExpiryMargin)
		var served, stale, failed int
		for time.Since(t0) < outage {
			refreshFailed := f.calls() > 1
			cr, err := h.Get(t.Context(), "app")
			switch {
			case time.Now().Before(servableUntil):
				if err != nil || cr.AccessKeyID != good.AccessKeyID {
					t.Fatalf("at %s (before margin): %s, %v", time.Since(t0), cr.AccessKeyID, err)
				}
				served++
				if refreshFailed {
					stale++
				}
			default:
				var ce interface{ ErrorClass() string }
				if err == nil || !errors.As(err, &ce) || ce.ErrorClass() != "server" {
					t.Fatalf("at %s (past margin): %s, %v; want the upstream error", time.Since(t0), cr.AccessKeyID, err)
				}
				if strings.Contains(err.Error(), testSecret) || strings.Contains(err.Error(), testToken) {
					t.Fatalf("error leaks a secret: %v", err)
				}
				failed++
			}
			time.Sleep(10 * time.Second)
		}
		if served == 0 || failed == 0 {
			t.Fatalf("served %d, failed %d: the scenario did not cover both phases", served, failed)
		}

		// Attempts start at the first refresh (0.405..0.495 of the hour) and
		// each waits at least 0.5 × min(max, initial × 2^(n-1)) after the
		// previous one; one interval may be cut short to retry before the
		// credentials stop being servable.
		attempts := f.calls() - 1
		first := time.Duration(0.405 * float64(time.Hour))
		last := time.Duration(0.495 * float64(time.Hour))
		upper := countAttempts(outage-first, cfg, 0.5) + 1
		lower := countAttempts(outage-last, cfg, 1.0)
		t.Logf("%d upstream attempts during a %s outage (bounds %d..%d)", attempts, outage, lower, upper)
		if attempts > upper || attempts < lower {
			t.Fatalf("upstream attempts = %d, want within [%d, %d]", attempts, lower, upper)
		}
		if e := snapshotOf(t, h.Cache, "app"); e.ConsecutiveFailures != attempts || e.Valid || e.ErrorClass != "server" {
			t.Errorf("snapshot during outage: %+v", e)
		}
		if v := testutil.ToFloat64(h.m.stale); v != float64(stale) || stale == 0 {
			t.Errorf("stale serves = %v, want %d (> 0)", v, stale)
		}
		if v := testutil.ToFloat64(h.m.hit); v != float64(served-stale+1) { // +1: the first Get
			t.Errorf("hits = %v, want %d", v, served-stale+1)
		}
		if v := testutil.ToFloat64(h.m.errors); v != float64(failed) {
			t.Errorf("errors counted = %v, want %d", v, failed)
		}
		f.set(succeed(time.Hour))
		recovered := time.Now()
		for {
			cr, err := h.Get(t.Context(), "app")
			if err == nil {
				if cr.AccessKeyID == good.AccessKeyID {
					t.Fatal("recovery served the expired credentials")
				}
				break
			}
			if time.Since(recovered) > cfg.BackoffMax {
				t.Fatalf("still failing %s after the upstream recovered: %v", time.Since(recovered), err)
			}
			time.Sleep(time.Second)
		}
		if e := snapshotOf(t, h.Cache, "app"); e.ConsecutiveFailures != 0 || e.LastError != "" || e.ErrorClass != "" || !e.Valid {
			t.Errorf("snapshot after recovery: %+v", e)
		}
	})
}

// countAttempts counts attempts in window w when attempt n+1 follows attempt
// n by factor × min(max, initial × 2^(n-1)), the first at the window start.
func countAttempts(w time.Duration, cfg Config, factor float64) int {
	var t time.Duration
	n := 0
	for t <= w {
		n++
		t += time.Duration(factor * float64(min(cfg.BackoffMax, cfg.BackoffInitial<<min(n-1, 30))))
	}
	return n
}

// With nothing valid, a key in backoff answers at once with the last error
// and no upstream call; after the delay one caller tries again. A key that
// never succeeded and was not prefetched is not retried in the background.
func TestBackoffWithNothingValid(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFake(fail(&testError{class: "throttling"}))
		h := newHarness(t, f, Config{Rand: fixedRand(0.999999)}) // delay ≈ 1.0 × base
		defer run(t, h.Cache)()
		_, err := h.Get(t.Context(), "app")
		var te *testError
		if !errors.As(err, &te) || te.class != "throttling" {
			t.Fatalf("first Get: %v, want the throttling error", err)
		}
		before := time.Now()
		for range 50 {
			if _, err := h.Get(t.Context(), "app"); !errors.As(err, &te) {
				t.Fatalf("Get in backoff: %v", err)
			}
		}
		if n := f.calls(); n != 1 || !time.Now().Equal(before) {
			t.Fatalf("Gets in backoff made %d calls and took %s, want 1 call and no time", n, time.Since(before))
		}
		e := snapshotOf(t, h.Cache, "app")
		if d := e.NextRefresh.Sub(before); d < 1999*time.Millisecond || d > 2*time.Second {
			t.Errorf("first retry in %s, want ≈2s", d)
		}
		time.Sleep(time.Second)
		if _, err := h.Get(t.Context(), "app"); err == nil || f.calls() != 1 {
			t.Fatalf("Get 1s into a 2s backoff: %v, %d calls", err, f.calls())
		}
		time.Sleep(time.Second)
		if _, err := h.Get(t.Context(), "app"); err == nil || f.calls() != 2 {
			t.Fatalf("Get after backoff: %v, %d calls; want a new failed attempt", err, f.calls())
		}
		if e := snapshotOf(t, h.Cache, "app"); e.ConsecutiveFailures != 2 || e.NextRefresh.Sub(time.Now()) < 3999*time.Millisecond {
			t.Fatalf("after second failure: %+v, want 2 failures and ≈4s backoff", e)
		}
		// Nobody asks: Run does not retry a key that never succeeded.
		time.Sleep(time.Hour)
		synctest.Wait()
		if n := f.calls(); n != 2 {
			t.Fatalf("background retries of a never-successful key: %d calls, want 2", n)
		}
		f.set(succeed(time.Hour))
		if cr := mustGet(t, h.Cache, "app"); cr.AccessKeyID != keyID(3) {
			t.Fatalf("got %s, want %s", cr.AccessKeyID, keyID(3))
		}
		if v := testutil.ToFloat64(h.m.errors); v != 53 {
			t.Errorf("errors counted = %v, want 53", v)
		}
	})
}

// A permanent error is reported but the last good credentials stay served,
// retries continue, and a success clears the error.
func TestPermanentErrorKeepsCredentials(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFake(succeed(time.Hour))
		h := newHarness(t, f, Config{Rand: fixedRand(0.5)})
		defer run(t, h.Cache)()
		if err := h.Prefetch(t.Context(), "app"); err != nil {
			t.Fatal(err)
		}
		good := mustGet(t, h.Cache, "app")
		f.set(fail(&testError{class: "access_denied", permanent: true}))
		time.Sleep(27*time.Minute + time.Millisecond)
		synctest.Wait()
		e := snapshotOf(t, h.Cache, "app")
		if !e.Permanent || e.ErrorClass != "access_denied" || e.ConsecutiveFailures != 1 || !e.Valid ||
			!strings.Contains(e.LastError, "upstream said access_denied") || e.AccessKeyID != good.AccessKeyID {
			t.Fatalf("snapshot after permanent failure: %+v", e)
		}
		if cr := mustGet(t, h.Cache, "app"); cr.AccessKeyID != good.AccessKeyID {
			t.Fatalf("served %s, want last good %s", cr.AccessKeyID, good.AccessKeyID)
		}
		if v := testutil.ToFloat64(h.m.refreshes.WithLabelValues("failure", "access_denied")); v != 1 {
			t.Errorf("refreshes{failure,access_denied} = %v, want 1", v)
		}
		// Same schedule as any failure: the retry comes after the backoff.
		if d := e.NextRefresh.Sub(e.LastRefresh); d != 1500*time.Millisecond {
			t.Errorf("retry after a permanent error in %s, want 1.5s (2s × 0.75)", d)
		}
		f.set(succeed(time.Hour))
		time.Sleep(2 * time.Second)
		synctest.Wait()
		e = snapshotOf(t, h.Cache, "app")
		if e.Permanent || e.ErrorClass != "" || e.LastError != "" || e.ConsecutiveFailures != 0 || e.AccessKeyID == good.AccessKeyID {
			t.Fatalf("snapshot after recovery: %+v", e)
		}
	})
}

// Incomplete or nearly expired credentials from upstream are failures of
// class invalid_response: never stored, never served.
func TestInvalidResponsesRejected(t *testing.T) {
	cases := map[string]func() creds.Credentials{
		"no session token": func() creds.Credentials { c := issue("ASIABAD", time.Hour); c.SessionToken = ""; return c },
		"no secret":        func() creds.Credentials { c := issue("ASIABAD", time.Hour); c.SecretAccessKey = ""; return c },
		"no key id":        func() creds.Credentials { c := issue("", time.Hour); return c },
		"no expiry":        func() creds.Credentials { c := issue("ASIABAD", time.Hour); c.Expires = time.Time{}; return c },
		"zero":             func() creds.Credentials { return creds.Credentials{} },
		"within margin":    func() creds.Credentials { return issue("ASIABAD", 30*time.Second) },
		"exactly margin":   func() creds.Credentials { return issue("ASIABAD", time.Minute) },
		"expired":          func() creds.Credentials { return issue("ASIABAD", -time.Hour) },
	}
	for name, bad := range cases {
		t.Run(name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				f := newFake(func(context.Context, string, int) (creds.Credentials, error) { return bad(), nil })
				h := newHarness(t, f, Config{})
				cr, err := h.Get(t.Context(), "app")
				var ce interface{ ErrorClass() string }
				if err == nil || !cr.IsZero() || !errors.As(err, &ce) || ce.ErrorClass() != "invalid_response" {
					t.Fatalf("Get = %v, %v; want no credentials and an invalid_response error", cr, err)
				}
				if strings.Contains(err.Error(), testSecret) || strings.Contains(err.Error(), testToken) {
					t.Fatalf("error leaks a secret: %v", err)
				}
				e := snapshotOf(t, h.Cache, "app")
				if e.Valid || e.AccessKeyID != "" || e.ErrorClass != "invalid_response" || e.ConsecutiveFailures != 1 {
					t.Fatalf("snapshot: %+v", e)
				}
				if v := testutil.ToFloat64(h.m.refreshes.WithLabelValues("failure", "invalid_response")); v != 1 {
					t.Errorf("refreshes{failure,invalid_response} = %v, want 1", v)
				}
			})
		})
	}

	t.Run("refresh keeps last good", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			f := newFake(succeed(time.Hour))
			h := newHarness(t, f, Config{Rand: fixedRand(0.5)})
			defer run(t, h.Cache)()
			if err := h.Prefetch(t.Context(), "app"); err != nil {
				t.Fatal(err)
			}
			good := mustGet(t, h.Cache, "app")
			f.set(func(context.Context, string, int) (creds.Credentials, error) {
				return issue("ASIABAD", 10*time.Second), nil
			})
			time.Sleep(28 * time.Minute)
			synctest.Wait()
			if cr := mustGet(t, h.Cache, "app"); cr.AccessKeyID != good.AccessKeyID {
				t.Fatalf("served %s, want last good %s", cr.AccessKeyID, good.AccessKeyID)
			}
			if e := snapshotOf(t, h.Cache, "app"); e.ErrorClass != "invalid_response" || e.AccessKeyID != good.AccessKeyID {
				t.Fatalf("snapshot: %+v", e)
			}
		})
	})
}

// A caller whose ctx ends returns at once; the shared fetch carries on for
// the others, uncancelled, bounded by FetchTimeout.
func TestCallerCancelDoesNotCancelFetch(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFake(succeed(time.Hour))
		h := newHarness(t, f, Config{FetchTimeout: 10 * time.Second})
		open := f.block()
		ctxA, cancelA := context.WithCancel(t.Context())
		errA := make(chan error, 1)
		go func() { _, err := h.Get(ctxA, "app"); errA <- err }()
		gotB := make(chan result, 1)
		go func() { gotB <- get(h.Cache, "app") }()
		synctest.Wait()
		cancelA()
		synctest.Wait()
		select {
		case err := <-errA:
			if !errors.Is(err, context.Canceled) {
				t.Fatalf("cancelled caller got %v, want context.Canceled", err)
			}
		default:
			t.Fatal("cancelled caller still waiting")
		}
		time.Sleep(5 * time.Second)
		open()
		if r := <-gotB; r.err != nil || r.cr.AccessKeyID != keyID(1) {
			t.Fatalf("other caller got %s, %v", r.cr.AccessKeyID, r.err)
		}
		f.mu.Lock()
		ctxErr, dl := f.ctxErrs[0], f.dls[0]
		f.mu.Unlock()
		if ctxErr != nil {
			t.Errorf("fetch ctx ended with %v, want still live", ctxErr)
		}
		if dl != 10*time.Second {
			t.Errorf("fetch deadline in %s, want FetchTimeout 10s", dl)
		}
		if f.calls() != 1 {
			t.Errorf("fetch calls = %d, want 1", f.calls())
		}
		if v := testutil.ToFloat64(h.m.errors); v != 1 {
			t.Errorf("errors counted = %v, want 1 (the cancelled caller)", v)
		}
	})
}

// TestGetWithinBoundsTheWait: GetWithin returns a *WaitError (class
// timeout, not permanent) when its bound comes before the upstream fetch
// ends, counted as wait_timeout; the fetch carries on, is not started
// twice, and its result is then served from memory whatever the bound.
// Get (no bound) waits for the fetch.
func TestGetWithinBoundsTheWait(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFake(succeed(time.Hour))
		h := newHarness(t, f, Config{FetchTimeout: 30 * time.Second})
		open := f.block()
		start := time.Now()
		_, err := h.GetWithin(t.Context(), "app", 900*time.Millisecond)
		var we *WaitError
		if !errors.As(err, &we) || time.Since(start) != 900*time.Millisecond {
			t.Fatalf("GetWithin = %v after %s, want a WaitError after 900ms", err, time.Since(start))
		}
		if class, permanent := creds.Classify(err); class != "timeout" || permanent {
			t.Errorf("WaitError classified %q, permanent %v; want timeout, retryable", class, permanent)
		}
		if v := testutil.ToFloat64(h.m.waitTimeouts); v != 1 {
			t.Errorf("wait_timeout counted %v, want 1", v)
		}
		if v := testutil.ToFloat64(h.m.errors); v != 0 {
			t.Errorf("errors counted %v, want 0 (a bounded wait is not a failed fetch)", v)
		}
		got := make(chan result, 1)
		go func() { cr, err := h.Get(t.Context(), "app"); got <- result{cr, err} }()
		time.Sleep(5 * time.Second)
		open()
		if r := <-got; r.err != nil || r.cr.AccessKeyID != keyID(1) {
			t.Fatalf("Get (no bound) after the fetch ended: %s, %v", r.cr.AccessKeyID, r.err)
		}
		if cr, err := h.GetWithin(t.Context(), "app", time.Nanosecond); err != nil || cr.AccessKeyID != keyID(1) {
			t.Fatalf("GetWithin from memory: %s, %v", cr.AccessKeyID, err)
		}
		if f.calls() != 1 {
			t.Errorf("fetch calls = %d, want 1 (the bounded caller's fetch went on and was shared)", f.calls())
		}
	})
}

// A fetch that outlives FetchTimeout fails with class timeout.
func TestFetchTimeout(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFake(succeed(time.Hour))
		f.block() // never opened: Fetch returns when its ctx ends
		h := newHarness(t, f, Config{FetchTimeout: 7 * time.Second})
		start := time.Now()
		_, err := h.Get(t.Context(), "app")
		if !errors.Is(err, context.DeadlineExceeded) || time.Since(start) != 7*time.Second {
			t.Fatalf("Get = %v after %s, want DeadlineExceeded after 7s", err, time.Since(start))
		}
		if e := snapshotOf(t, h.Cache, "app"); e.ErrorClass != "timeout" || e.Permanent {
			t.Fatalf("snapshot: %+v", e)
		}
	})
}

func TestErrorWithoutClassIsOther(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFake(fail(errors.New("boom")))
		h := newHarness(t, f, Config{})
		if _, err := h.Get(t.Context(), "app"); err == nil {
			t.Fatal("want an error")
		}
		if e := snapshotOf(t, h.Cache, "app"); e.ErrorClass != "other" || e.Permanent || e.LastError != "boom" {
			t.Fatalf("snapshot: %+v", e)
		}
	})
}

// The LRU keeps Size keys; an evicted key leaves refresh scheduling and
// metrics.
func TestEviction(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFake(succeed(time.Hour))
		h := newHarness(t, f, Config{Size: 2, Rand: fixedRand(0.5)})
		defer run(t, h.Cache)()
		for _, k := range []string{"a", "b"} {
			if err := h.Prefetch(t.Context(), k); err != nil {
				t.Fatal(err)
			}
		}
		mustGet(t, h.Cache, "a") // b is now the least recently used
		if err := h.Prefetch(t.Context(), "c"); err != nil {
			t.Fatal(err)
		}
		var keys []string
		for _, e := range h.Snapshot() {
			keys = append(keys, e.Key)
		}
		if strings.Join(keys, ",") != "a,c" {
			t.Fatalf("keys = %v, want [a c]", keys)
		}
		time.Sleep(28 * time.Minute)
		synctest.Wait()
		if a, b, c := f.callsFor("a"), f.callsFor("b"), f.callsFor("c"); a != 2 || b != 1 || c != 2 {
			t.Fatalf("calls a, b, c = %d, %d, %d; want 2, 1, 2 (b evicted)", a, b, c)
		}
		if n, err := testutil.GatherAndCount(h.reg, "imdsproxy_cache_consecutive_failures"); n != 2 || err != nil {
			t.Errorf("consecutive_failures series = %d, want 2", n)
		}
		// An evicted key is fetched again on demand.
		if cr := mustGet(t, h.Cache, "b"); cr.AccessKeyID != keyID(6) {
			t.Errorf("b after eviction: %s, want %s", cr.AccessKeyID, keyID(6))
		}
	})
}

// Purge drops everything, including the refresh schedule; a fetch in flight
// during Purge answers its caller but is not stored.
func TestPurge(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFake(succeed(time.Hour))
		h := newHarness(t, f, Config{Rand: fixedRand(0.5)})
		defer run(t, h.Cache)()
		if err := h.Prefetch(t.Context(), "a"); err != nil {
			t.Fatal(err)
		}
		open := f.block()
		gotB := make(chan result, 1)
		go func() { gotB <- get(h.Cache, "b") }()
		synctest.Wait()
		h.Purge()
		if s := h.Snapshot(); len(s) != 0 {
			t.Fatalf("snapshot after Purge: %+v", s)
		}
		open()
		if r := <-gotB; r.err != nil || r.cr.AccessKeyID != keyID(2) {
			t.Fatalf("caller of the purged fetch got %s, %v", r.cr.AccessKeyID, r.err)
		}
		synctest.Wait()
		if s := h.Snapshot(); len(s) != 0 {
			t.Fatalf("purged fetch was stored: %+v", s)
		}
		time.Sleep(2 * time.Hour)
		synctest.Wait()
		if n := f.calls(); n != 2 {
			t.Fatalf("fetch calls after Purge = %d, want 2 (nothing refreshed)", n)
		}
		if cr := mustGet(t, h.Cache, "a"); cr.AccessKeyID != keyID(3) {
			t.Fatalf("Get after Purge: %s, want a fresh fetch %s", cr.AccessKeyID, keyID(3))
		}
		if v := testutil.ToFloat64(h.m.miss); v != 2 {
			t.Errorf("misses = %v, want 2", v)
		}
	})
}

func TestForget(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFake(succeed(time.Hour))
		h := newHarness(t, f, Config{Rand: fixedRand(0.5)})
		defer run(t, h.Cache)()
		for _, k := range []string{"a", "b"} {
			if err := h.Prefetch(t.Context(), k); err != nil {
				t.Fatal(err)
			}
		}
		if !h.Forget("a") {
			t.Fatal(`Forget("a") = false for a cached key`)
		}
		if h.Forget("a") || h.Forget("never") {
			t.Fatal("Forget of a key not cached reported true")
		}
		if s := h.Snapshot(); len(s) != 1 || s[0].Key != "b" {
			t.Fatalf("snapshot after Forget(a): %+v, want only b", s)
		}
		// Over two hours b is refreshed (about every 27 min) and a never.
		before := f.calls()
		time.Sleep(2 * time.Hour)
		synctest.Wait()
		refreshes := f.calls() - before
		if refreshes < 3 || refreshes > 5 {
			t.Fatalf("fetch calls in 2h after Forget(a) = %d, want b's 3..5 refreshes only", refreshes)
		}
		if s := h.Snapshot(); len(s) != 1 || s[0].Key != "b" {
			t.Fatalf("snapshot 2h after Forget(a): %+v, want only b", s)
		}
		// A forgotten key comes back with a fresh fetch.
		calls := f.calls()
		mustGet(t, h.Cache, "a")
		if f.calls() != calls+1 {
			t.Errorf("Get after Forget: %d fetches, want 1", f.calls()-calls)
		}
	})
}

func TestSnapshot(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFake(succeed(time.Hour))
		h := newHarness(t, f, Config{Rand: fixedRand(0.5)})
		if s := h.Snapshot(); len(s) != 0 {
			t.Fatalf("empty cache snapshot: %+v", s)
		}
		now := time.Now()
		for _, k := range []string{"zeta", "alpha"} {
			if err := h.Prefetch(t.Context(), k); err != nil {
				t.Fatal(err)
			}
		}
		s := h.Snapshot()
		want := Entry[string]{
			Key:         "alpha",
			Name:        "alpha",
			Kept:        true,
			AccessKeyID: keyID(2),
			Expires:     now.Add(time.Hour),
			LastUpdated: now,
			LastRefresh: now,
			NextRefresh: now.Add(27 * time.Minute),
			Valid:       true,
		}
		if len(s) != 2 || s[0] != want || s[1].Key != "zeta" {
			t.Fatalf("snapshot = %+v\nwant [%+v zeta]", s, want)
		}
		time.Sleep(time.Hour - time.Minute)
		if e := snapshotOf(t, h.Cache, "alpha"); e.Valid {
			t.Errorf("entry with exactly ExpiryMargin left reported valid: %+v", e)
		}
	})
}

// A failure is retried no later than when the credentials stop being
// servable, so there is one more attempt before they die.
func TestRetryBeforeCredentialsDie(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cfg := Config{BackoffInitial: time.Minute, BackoffMax: time.Hour, ExpiryMargin: time.Minute, Rand: fixedRand(0.999999)}
		f := newFake(succeed(20 * time.Minute))
		h := newHarness(t, f, cfg)
		defer run(t, h.Cache)()
		t0 := time.Now()
		if err := h.Prefetch(t.Context(), "app"); err != nil {
			t.Fatal(err)
		}
		f.set(fail(&testError{class: "network"}))
		// Refresh at 11m; retries after ≈1m, 2m, 4m: at ≈12m, ≈14m, ≈18m. The
		// next (≈8m later) is pulled forward to 19m, when the credentials stop
		// being servable.
		time.Sleep(18*time.Minute + 10*time.Second)
		synctest.Wait()
		e := snapshotOf(t, h.Cache, "app")
		if e.ConsecutiveFailures != 4 || !e.NextRefresh.Equal(t0.Add(19*time.Minute)) {
			t.Fatalf("after 4 failures: %+v, want NextRefresh at +19m", e)
		}
		time.Sleep(time.Until(e.NextRefresh))
		synctest.Wait()
		if n := f.calls(); n != 6 {
			t.Fatalf("fetch calls = %d, want 6", n)
		}
		// Nothing servable now: plain backoff (16m) again.
		e = snapshotOf(t, h.Cache, "app")
		if d := e.NextRefresh.Sub(e.LastRefresh); d < 15*time.Minute || d > 16*time.Minute {
			t.Errorf("retry after the credentials died in %s, want ≈16m", d)
		}
	})
}

// Run, Gets, Prefetch, Snapshot, scrapes and Purge all at once (run with -race).
func TestConcurrentUse(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFake(func(_ context.Context, key string, n int) (creds.Credentials, error) {
			if n%3 == 0 {
				return creds.Credentials{}, &testError{class: "throttling"}
			}
			return issue(keyID(n), 20*time.Minute), nil
		})
		h := newHarness(t, f, Config{Size: 3})
		defer run(t, h.Cache)()
		deadline := time.Now().Add(3 * time.Hour)
		var wg sync.WaitGroup
		for i := range 8 {
			key := []string{"a", "b", "c", "d"}[i%4]
			wg.Go(func() {
				for time.Now().Before(deadline) {
					ctx, cancel := context.WithTimeout(t.Context(), time.Duration(i+1)*time.Millisecond)
					cr, err := h.Get(ctx, key)
					cancel()
					if err == nil && !cr.ValidAt(time.Now()) {
						t.Errorf("served invalid credentials %v", cr)
					}
					time.Sleep(time.Duration(7+i) * time.Second)
				}
			})
		}
		wg.Go(func() {
			for time.Now().Before(deadline) {
				_ = h.Prefetch(t.Context(), "a")
				time.Sleep(11 * time.Minute)
			}
		})
		wg.Go(func() {
			for time.Now().Before(deadline) {
				h.Snapshot()
				if _, err := h.reg.Gather(); err != nil {
					t.Errorf("gather: %v", err)
				}
				time.Sleep(13 * time.Second)
			}
		})
		wg.Go(func() {
			for time.Now().Before(deadline) {
				time.Sleep(17 * time.Minute)
				h.Purge()
			}
		})
		wg.Wait()
	})
}

// Keep drops every key not declared, refreshes the declared ones, and a
// key fetched after Keep without being declared (a request that decided on
// it just before the set changed) is served but never refreshed.
func TestKeep(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFake(succeed(time.Hour))
		h := newHarness(t, f, Config{Rand: fixedRand(0.5)})
		defer run(t, h.Cache)()
		for _, k := range []string{"app", "old"} {
			if err := h.Prefetch(t.Context(), k); err != nil {
				t.Fatal(err)
			}
		}
		if dropped := h.Keep([]string{"app", "new"}); len(dropped) != 1 || dropped[0] != "old" {
			t.Fatalf("Keep dropped %v, want [old]", dropped)
		}
		if _, ok := h.Lookup("old"); ok {
			t.Fatal("a key outside the kept set is still cached")
		}
		e, ok := h.Lookup("app")
		if !ok || !e.Kept || !e.Valid || e.Name != "app" {
			t.Fatalf("Lookup(app) = %+v, %v; want a kept, valid entry", e, ok)
		}
		// A late request for the dropped key: served, not refreshed.
		if cr := mustGet(t, h.Cache, "old"); cr.AccessKeyID == "" {
			t.Fatal("no credentials for a late request")
		}
		if e, _ := h.Lookup("old"); e.Kept {
			t.Error("a key fetched outside the kept set reports Kept")
		}
		before := f.callsFor("old")
		appBefore := f.callsFor("app")
		time.Sleep(2 * time.Hour)
		synctest.Wait()
		if n := f.callsFor("old"); n != before {
			t.Errorf("the unkept key was refreshed %d times, want 0", n-before)
		}
		if n := f.callsFor("app"); n <= appBefore {
			t.Errorf("the kept key was not refreshed (%d calls)", n)
		}
		// Declaring it again makes it refreshed.
		h.Keep([]string{"old"})
		if e, ok := h.Lookup("old"); ok && !e.Kept {
			t.Error("a re-declared key is not kept")
		}
	})
}

// A failed Prefetch still registers the key: Run retries it after the backoff.
func TestPrefetchFailureRetriedByRun(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFake(fail(&testError{class: "network"}))
		h := newHarness(t, f, Config{Rand: fixedRand(0.999999)})
		defer run(t, h.Cache)()
		var ce interface{ ErrorClass() string }
		if err := h.Prefetch(t.Context(), "app"); !errors.As(err, &ce) || ce.ErrorClass() != "network" {
			t.Fatalf("Prefetch = %v, want the network error", err)
		}
		f.set(succeed(time.Hour))
		time.Sleep(2 * time.Second)
		synctest.Wait()
		if n := f.calls(); n != 2 {
			t.Fatalf("fetch calls = %d, want 2 (retried by Run)", n)
		}
		if cr := mustGet(t, h.Cache, "app"); cr.AccessKeyID != keyID(2) {
			t.Fatalf("got %s, want %s", cr.AccessKeyID, keyID(2))
		}
		if v := testutil.ToFloat64(h.m.hit); v != 1 {
			t.Errorf("hits = %v, want 1 (served without waiting)", v)
		}
	})
}
