package cache

import "time"

// Refresh-ahead fractions of the lifetime. Sessions of longLifetime or more
// use the earlier center so that served credentials keep at least 30 minutes
// (botocore rewrites expiries under about 25 minutes).
const (
	refreshCenter     = 0.50
	refreshCenterLong = 0.45
	refreshJitter     = 0.10 // ± fraction of the center
	longLifetime      = time.Hour
)

// refreshAt schedules the refresh of credentials obtained at now that expire
// at expires: now + lifetime × f, f uniform in center × [0.9, 1.1]. It is
// never after the credentials stop being servable, and never sooner than
// BackoffInitial from now (an upstream handing out very short sessions must
// not be hammered). c.mu must be held (cfg.Rand).
func (c *Cache) refreshAt(now, expires time.Time) time.Time {
	lifetime := expires.Sub(now)
	center := refreshCenter
	if lifetime >= longLifetime {
		center = refreshCenterLong
	}
	f := center * (1 - refreshJitter + 2*refreshJitter*c.rand())
	next := now.Add(time.Duration(float64(lifetime) * f))
	if until := expires.Add(-c.cfg.ExpiryMargin); next.After(until) {
		next = until
	}
	if floor := now.Add(c.cfg.BackoffInitial); next.Before(floor) {
		next = floor
	}
	return next
}

// retryAt schedules the next attempt after e's latest failure (e.failures ≥ 1)
// at now: now + backoff. While e still holds servable credentials the attempt
// is moved forward to the moment they stop being servable, if that comes
// first, but never sooner than BackoffInitial from now. c.mu must be held.
func (c *Cache) retryAt(now time.Time, e *entry) time.Time {
	next := now.Add(backoff(e.failures, c.cfg.BackoffInitial, c.cfg.BackoffMax, c.rand()))
	if c.servable(e.creds, now) {
		if until := e.creds.Expires.Add(-c.cfg.ExpiryMargin); until.Before(next) {
			next = until
			if floor := now.Add(c.cfg.BackoffInitial); next.Before(floor) {
				next = floor
			}
		}
	}
	return next
}

// backoff is the delay before attempt n+1 after n consecutive failures:
// min(max, initial × 2^(n−1)) × (0.5 + 0.5r), r in [0, 1).
func backoff(n int, initial, max time.Duration, r float64) time.Duration {
	d := initial
	for i := 1; i < n && d < max; i++ {
		d *= 2
	}
	d = min(d, max)
	return time.Duration(float64(d) * (0.5 + 0.5*r))
}

// rand returns cfg.Rand clamped to [0, 1]. c.mu must be held.
func (c *Cache) rand() float64 {
	return min(max(c.cfg.Rand(), 0), 1)
}
