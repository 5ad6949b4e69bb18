package cache

import "time"

// The refresh-ahead schedule (see RefreshAt), after WIRE.md §4 and §8.6:
// refresh upstream when less than about half, or less than 30 minutes, of the
// lifetime remains, whichever comes first, so that served credentials keep at
// least 30 minutes whenever the session is long enough (botocore rewrites
// expiries under 17..25 minutes and then uses dead credentials).
//
// The half-life part is refreshCenter of the lifetime, ± refreshJitter of
// it. Sessions of longLifetime or more use the earlier refreshCenterLong;
// longLifetime is a little under an hour because a one-hour session arrives
// with slightly less than an hour left (network and STS latency, clock skew).
// The 30-minute part, for sessions of keepFrom (40 minutes) or more,
// refreshes refreshKeep × (1 + refreshKeepJitter·rnd) (30..36 minutes)
// before expiry, but never sooner than a quarter of the lifetime
// (refreshMinFraction); a shorter session cannot keep 30 minutes and is
// refreshed at its jittered half-life. maxRefreshInterval bounds
// the delay whatever expiry upstream claims: it is half of the longest AWS
// role session (12 h), so legitimate sessions never reach it, and an absurd
// expiry (a federation endpoint with a wrong year) is still refreshed every
// 6 h instead of decades later.
const (
	refreshCenter      = 0.50
	refreshCenterLong  = 0.45
	refreshJitter      = 0.10 // ± fraction of the center
	longLifetime       = 55 * time.Minute
	refreshKeep        = 30 * time.Minute
	refreshKeepJitter  = 0.20 // + fraction of refreshKeep
	refreshMinFraction = 0.25
	maxRefreshInterval = 6 * time.Hour
	// keepFrom is the shortest lifetime the 30-minute part applies to: from
	// it, 30 minutes are left after a quarter of the lifetime. Shorter
	// sessions cannot keep 30 minutes and keep the jittered half-life.
	keepFrom = time.Duration(float64(refreshKeep) / (1 - refreshMinFraction)) // 40 min
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

// RefreshAt is the refresh-ahead schedule a Cache uses for credentials
// obtained at now that expire at expires, with lifetime = expires − now and
// rnd in [0, 1] (clamped) choosing the jitter:
//
//	half = now + lifetime × center × (0.9 + 0.2·rnd)   (center 0.5, or 0.45 from 55 min)
//	keep = 30 min × (1 + 0.2·rnd)
//	next = min(half, max(expires − keep, now + lifetime/4), now + 6 h)   (lifetime ≥ 40 min)
//	next = min(half, now + 6 h)                                          (shorter)
//
// that is, when about half, or 30..36 minutes, of the lifetime remains,
// whichever comes first (WIRE.md §4, §8.6): a session of 40 minutes or more
// is refreshed with at least 30 minutes left, a shorter one at its jittered
// half-life, and none later than 6 h after now, whatever expiry upstream
// claims. The result is then never after expires − margin (when the
// credentials stop being servable) and never sooner than minDelay from now
// (an upstream handing out very short sessions must not be hammered);
// minDelay wins. A Cache passes its ExpiryMargin and BackoffInitial.
// RefreshAt is pure and safe for concurrent use; it exists so that
// simulations (cmd/fleetsim) run the real schedule.
func RefreshAt(now, expires time.Time, margin, minDelay time.Duration, rnd float64) time.Time {
	rnd = min(max(rnd, 0), 1)
	lifetime := expires.Sub(now)
	center := refreshCenter
	if lifetime >= longLifetime {
		center = refreshCenterLong
	}
	f := center * (1 - refreshJitter + 2*refreshJitter*rnd)
	next := now.Add(time.Duration(float64(lifetime) * f))
	if lifetime >= keepFrom {
		keep := time.Duration(float64(refreshKeep) * (1 + refreshKeepJitter*rnd))
		keepAt := expires.Add(-keep)
		if floor := now.Add(time.Duration(float64(lifetime) * refreshMinFraction)); keepAt.Before(floor) {
			keepAt = floor
		}
		if keepAt.Before(next) {
			next = keepAt
		}
	}
	if limit := now.Add(maxRefreshInterval); next.After(limit) {
		next = limit
	}
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
