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
