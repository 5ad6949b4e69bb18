package issuer

import (
	"sync"
	"time"

	"github.com/hashicorp/golang-lru/v2/simplelru"
)

// limiter is a token bucket per key (the attested instance id), in a
// bounded map: the least recently seen host is forgotten first, which
// gives it a full bucket when it comes back. Safe for concurrent use;
// Configure may be called while requests run (a reload).
type limiter struct {
	mu      sync.Mutex
	perSec  float64 // 0: unlimited
	burst   float64
	max     int
	buckets *simplelru.LRU[string, *bucket]
}

type bucket struct {
	tokens float64
	last   time.Time
}

func newLimiter(cfg RateLimit) *limiter {
	l := &limiter{}
	l.Configure(cfg)
	return l
}

// Configure applies cfg, keeping the buckets when the size does not change.
func (l *limiter) Configure(cfg RateLimit) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.perSec = float64(cfg.PerHostPerMinute) / 60
	l.burst = float64(cfg.Burst)
	if l.buckets == nil || cfg.MaxHosts != l.max {
		size := max(cfg.MaxHosts, 1)
		l.buckets, _ = simplelru.NewLRU[string, *bucket](size, nil)
		l.max = cfg.MaxHosts
	}
}

// Allow takes one token from key's bucket at now, and reports whether
// there was one.
func (l *limiter) Allow(key string, now time.Time) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.perSec <= 0 {
		return true
	}
	b, ok := l.buckets.Get(key)
	if !ok {
		b = &bucket{tokens: l.burst, last: now}
		l.buckets.Add(key, b)
	} else if d := now.Sub(b.last); d > 0 {
		b.tokens = min(l.burst, b.tokens+d.Seconds()*l.perSec)
		b.last = now
	}
	if b.tokens < 1 {
		return false
	}
	b.tokens--
	return true
}

// Len is the number of hosts tracked.
func (l *limiter) Len() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buckets.Len()
}
