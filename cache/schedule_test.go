package cache

import (
	"testing"
	"time"

	"github.com/imdsproxy/imdsproxy/creds"
)

func TestBackoff(t *testing.T) {
	const initial, max = 2 * time.Second, 5 * time.Minute
	for _, tc := range []struct {
		n    int
		r    float64
		want time.Duration
	}{
		{n: 1, r: 0, want: time.Second},
		{n: 1, r: 1, want: 2 * time.Second},
		{n: 2, r: 0, want: 2 * time.Second},
		{n: 3, r: 0.5, want: 6 * time.Second}, // 8s × 0.75
		{n: 8, r: 1, want: 256 * time.Second},
		{n: 9, r: 1, want: max}, // 512s capped
		{n: 9, r: 0, want: max / 2},
		{n: 1000, r: 1, want: max},           // no overflow
		{n: 3, r: -5, want: 4 * time.Second}, // rnd clamped to 0
		{n: 3, r: 7, want: 8 * time.Second},  // rnd clamped to 1
	} {
		if got := RetryDelay(tc.n, initial, max, tc.r); got != tc.want {
			t.Errorf("RetryDelay(%d, r=%v) = %s, want %s", tc.n, tc.r, got, tc.want)
		}
	}
	// Over the whole jitter range the delay stays within [base/2, base] of
	// the capped base, and never shrinks as failures grow.
	prevLow := time.Duration(0)
	for n := 1; n <= 20; n++ {
		base := initial << (n - 1)
		if base > max || base <= 0 {
			base = max
		}
		low, high := RetryDelay(n, initial, max, 0), RetryDelay(n, initial, max, 1)
		if low != base/2 || high != base {
			t.Errorf("n=%d: jitter range [%s, %s], want [%s, %s]", n, low, high, base/2, base)
		}
		for r := 0.0; r <= 1; r += 0.125 {
			if d := RetryDelay(n, initial, max, r); d < low || d > high {
				t.Errorf("n=%d r=%v: %s outside [%s, %s]", n, r, d, low, high)
			}
		}
		if low < prevLow {
			t.Errorf("n=%d: the lower bound %s shrank from %s", n, low, prevLow)
		}
		prevLow = low
	}
}

// retryAt never schedules past the end of servability, but keeps at least
// BackoffInitial; without servable credentials it is plain backoff.
func TestRetryAt(t *testing.T) {
	now := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	c, err := New[string](newFake(nil), Config{BackoffInitial: 10 * time.Second, BackoffMax: time.Hour, Rand: fixedRand(1)}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	valid := func(left time.Duration) creds.Credentials {
		return creds.Credentials{AccessKeyID: "A", SecretAccessKey: "S", SessionToken: "T", Expires: now.Add(left)}
	}
	for _, tc := range []struct {
		name     string
		cr       creds.Credentials
		failures int
		want     time.Duration
	}{
		{"no credentials", creds.Credentials{}, 6, 320 * time.Second},
		{"plenty left", valid(time.Hour), 6, 320 * time.Second},
		{"pulled forward", valid(3 * time.Minute), 6, 2 * time.Minute},
		{"pulled forward, floor", valid(time.Minute + 5*time.Second), 6, 10 * time.Second},
		{"not servable", valid(time.Minute), 6, 320 * time.Second},
	} {
		e := &entry[string]{creds: tc.cr, failures: tc.failures}
		c.mu.Lock()
		got := c.retryAt(now, e).Sub(now)
		c.mu.Unlock()
		if got != tc.want {
			t.Errorf("%s: retry in %s, want %s", tc.name, got, tc.want)
		}
	}
}

// refreshAt stays within servability and never sooner than BackoffInitial.
func TestRefreshAtBounds(t *testing.T) {
	now := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	c, err := New[string](newFake(nil), Config{ExpiryMargin: 10 * time.Minute, Rand: fixedRand(1)}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		lifetime, want time.Duration
	}{
		{2 * time.Hour, 3564 * time.Second},             // 0.495 of 2h
		{30 * time.Minute, 990 * time.Second},           // 0.55 of 30m
		{15 * time.Minute, 5 * time.Minute},             // capped at expiry − margin
		{10*time.Minute + time.Second, 2 * time.Second}, // floor: BackoffInitial
	} {
		c.mu.Lock()
		got := c.refreshAt(now, now.Add(tc.lifetime)).Sub(now)
		c.mu.Unlock()
		if got != tc.want {
			t.Errorf("lifetime %s: refresh in %s, want %s", tc.lifetime, got, tc.want)
		}
	}
}

// RefreshAt refreshes when about half, or 30..36 minutes, of the lifetime
// remains, whichever comes first (WIRE.md §4, §8.6: served credentials keep
// at least 30 minutes whenever the session allows), a session too short for
// that (under 40 minutes) at its jittered half-life, and none later than 6 h
// from now.
func TestRefreshAtSchedule(t *testing.T) {
	now := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	const year = 365 * 24 * time.Hour
	for _, tc := range []struct {
		name     string
		lifetime time.Duration
		// Bounds of the time left at refresh, over every rnd.
		minLeft, maxLeft time.Duration
	}{
		// 45 − max(30..36 min, 11m15s): 30..33m45s left, not 20..25.
		{"45m", 45 * time.Minute, 30 * time.Minute, 33*time.Minute + 45*time.Second},
		// 60 − min(24m18s..29m42s, 24..30m): at least 30 (in fact 33..36) min left.
		{"1h", time.Hour, 30 * time.Minute, 36 * time.Minute},
		// The jittered half-life, 0.45 × [0.9, 1.1], as before.
		{"6h", 6 * time.Hour, 6*time.Hour - 2*time.Hour - 58*time.Minute - 12*time.Second, 6*time.Hour - 2*time.Hour - 25*time.Minute - 48*time.Second},
		{"12h", 12 * time.Hour, 12*time.Hour - 5*time.Hour - 56*time.Minute - 24*time.Second, 12*time.Hour - 4*time.Hour - 51*time.Minute - 36*time.Second},
		// Cannot keep 30 minutes: the jittered half-life, 0.5 × [0.9, 1.1].
		{"20m", 20 * time.Minute, 9 * time.Minute, 11 * time.Minute},
		// 40 minutes: 30 minutes left after a quarter of it at most.
		{"40m", 40 * time.Minute, 30 * time.Minute, 30 * time.Minute},
		// An absurd expiry is refreshed 6 h from now.
		{"100y", 100 * year, 100*year - 6*time.Hour, 100*year - 6*time.Hour},
	} {
		t.Run(tc.name, func(t *testing.T) {
			expires := now.Add(tc.lifetime)
			for r := 0.0; r <= 1; r += 1.0 / 64 {
				next := RefreshAt(now, expires, DefaultExpiryMargin, DefaultBackoffInitial, r)
				if left := expires.Sub(next); left < tc.minLeft || left > tc.maxLeft {
					t.Errorf("rnd %v: refresh after %s with %s left, want %s..%s left",
						r, next.Sub(now), left, tc.minLeft, tc.maxLeft)
				}
				if in := next.Sub(now); in > maxRefreshInterval {
					t.Errorf("rnd %v: refresh after %s, want at most %s", r, in, maxRefreshInterval)
				}
			}
		})
	}
}

// WIRE.md §4 ("Proxy policy suggestions"), §3.2 and §8.6: refresh upstream
// when less than about 50 %, or less than 30 min, remains, whichever comes
// first, so that served credentials keep at least 30 minutes whenever the
// session length allows (botocore rewrites expiries under 17..25 min and
// then uses dead credentials). For a session of L minutes, L > 30, the
// refresh must therefore come while max(L/2, 30 min) is still left; "about"
// is given one minute of slack here.
func TestRefreshKeeps30MinutesWhenSessionAllows(t *testing.T) {
	now := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	const slack = time.Minute
	for _, lifetime := range []time.Duration{
		40 * time.Minute, 45 * time.Minute, 50 * time.Minute, 55 * time.Minute, 58 * time.Minute,
		time.Hour, 2 * time.Hour, 6 * time.Hour,
	} {
		want := max(lifetime/2, 30*time.Minute) - slack
		for _, rnd := range []float64{0, 0.5, 1} {
			next := RefreshAt(now, now.Add(lifetime), DefaultExpiryMargin, DefaultBackoffInitial, rnd)
			if left := now.Add(lifetime).Sub(next); left < want {
				t.Errorf("session of %s, rnd %v: refresh leaves %s, want at least %s (WIRE.md §4: refresh when <50%% or <30 min remains, whichever comes first)",
					lifetime, rnd, left.Round(time.Second), want)
			}
		}
	}
}
