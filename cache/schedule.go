package cache

import "time"

// Refresh-ahead fractions of the lifetime. Sessions of longLifetime or more
// use the earlier center so that served credentials keep at least 30 minutes
// (botocore rewrites expiries under about 25 minutes). longLifetime is a
// little under an hour: a one-hour session arrives with slightly less than an
// hour left (network and STS latency, clock skew) and must still count.
const (
	refreshCenter     = 0.50
	refreshCenterLong = 0.45
	refreshJitter     = 0.10 // ± fraction of the center
	longLifetime      = 55 * time.Minute
)

// refreshAt schedules the refresh of credentials obtained at now that expire
// at expires (see RefreshAt). c.mu must be held (cfg.Rand).
func (c *Cache[K]) refreshAt(now, expires time.Time) time.Time {
	return RefreshAt(now, expires, c.cfg.ExpiryMargin, c.cfg.BackoffInitial, c.rand())
}

// retryAt schedules the next attempt after e's latest failure (e.failures ≥ 1)
// at now (see RetryAt). c.mu must be held.
func (c *Cache[K]) retryAt(now time.Time, e *entry[K]) time.Time {
	var until time.Time
	if c.servable(e.creds, now) {
		until = e.creds.Expires.Add(-c.cfg.ExpiryMargin)
	}
	return RetryAt(now, until, e.failures, c.cfg.BackoffInitial, c.cfg.BackoffMax, c.rand())
}

// RefreshAt is the refresh-ahead schedule a Cache uses: credentials obtained
// at now that expire at expires are refreshed at now + lifetime × f, f uniform
// in center × [0.9, 1.1] (center 0.5, or 0.45 when lifetime, counted from
// now, is an hour or more), with rnd in [0, 1] (clamped) choosing f. The result is never after
// expires − margin (when the credentials stop being servable) and never
// sooner than minDelay from now (an upstream handing out very short sessions
// must not be hammered); minDelay wins. A Cache passes its ExpiryMargin and
// BackoffInitial. RefreshAt is pure and safe for concurrent use; it exists so
// that simulations (cmd/fleetsim) run the real schedule.
func RefreshAt(now, expires time.Time, margin, minDelay time.Duration, rnd float64) time.Time {
	rnd = min(max(rnd, 0), 1)
	lifetime := expires.Sub(now)
	center := refreshCenter
	if lifetime >= longLifetime {
		center = refreshCenterLong
	}
	f := center * (1 - refreshJitter + 2*refreshJitter*rnd)
	next := now.Add(time.Duration(float64(lifetime) * f))
	if until := expires.Add(-margin); next.After(until) {
		next = until
	}
	if floor := now.Add(minDelay); next.Before(floor) {
		next = floor
	}
	return next
}

// RetryAt is the retry schedule a Cache uses after the failures-th
// consecutive failure (failures ≥ 1) at now: now + RetryDelay(failures,
// initial, maxDelay, rnd). servableUntil is when the last good credentials stop
// being servable (expiry − margin), zero when none are servable at now; if it
// comes before that delay, the attempt is moved forward to it, but never
// sooner than initial from now. RetryAt is pure and safe for concurrent use.
func RetryAt(now, servableUntil time.Time, failures int, initial, maxDelay time.Duration, rnd float64) time.Time {
	next := now.Add(RetryDelay(failures, initial, maxDelay, rnd))
	if servableUntil.After(now) && servableUntil.Before(next) {
		next = servableUntil
		if floor := now.Add(initial); next.Before(floor) {
			next = floor
		}
	}
	return next
}

// RetryDelay is the capped exponential backoff with jitter of a Cache: the
// delay before attempt n+1 after n ≥ 1 consecutive failures is
// min(maxDelay, initial × 2^(n−1)) × (0.5 + 0.5·rnd), rnd in [0, 1]
// (clamped). It is pure and safe for concurrent use.
func RetryDelay(n int, initial, maxDelay time.Duration, rnd float64) time.Duration {
	rnd = min(max(rnd, 0), 1)
	d := initial
	for i := 1; i < n && d < maxDelay; i++ {
		d *= 2
	}
	d = min(d, maxDelay)
	return time.Duration(float64(d) * (0.5 + 0.5*rnd))
}

// rand returns cfg.Rand clamped to [0, 1]. c.mu must be held.
func (c *Cache[K]) rand() float64 {
	return min(max(c.cfg.Rand(), 0), 1)
}
