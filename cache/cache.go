// Package cache is the refresh-ahead credential cache of imdsproxy.
//
// A Cache sits in front of a Fetcher (the upstream exchange) and answers
// Get from memory whenever it holds credentials with more than
// Config.ExpiryMargin left: a request never waits on, or triggers, an upstream
// call while servable credentials are cached. Only a key with nothing
// servable waits, and all callers waiting on one key share a single upstream
// call.
//
// Freshness: after every successful fetch the key is scheduled for refresh at
// about half its lifetime (±10% jitter, so a fleet does not refresh in
// lockstep; sessions of an hour or more refresh a little earlier so served
// credentials keep at least 30 minutes). Run drives these refreshes in the
// background. A failed refresh keeps the last good credentials, which are
// served until they are within ExpiryMargin of expiry, and the next attempt is
// scheduled with capped exponential backoff and jitter. Permanent errors are
// reported (Snapshot, metrics, log) but follow the same schedule, since an
// operator may fix the cause at any time.
//
// The package knows nothing of AWS: keys are opaque strings (imdsproxy uses
// the configured role name) and errors are classified only through the
// optional methods ErrorClass() string and Permanent() bool.
package cache

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sort"
	"sync"
	"time"

	"github.com/hashicorp/golang-lru/v2/simplelru"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/imdsproxy/imdsproxy/creds"
)

// Fetcher obtains fresh credentials for key from upstream.
//
// Fetch must honour ctx (the cache bounds every call with Config.FetchTimeout)
// and must be safe for concurrent use with different keys. Errors may
// implement ErrorClass() string (a bounded, snake_case class used as a metric
// label) and Permanent() bool; they are found with errors.As. Error strings
// are logged and shown in Snapshot, so they must never contain secrets.
type Fetcher interface {
	Fetch(ctx context.Context, key string) (creds.Credentials, error)
}

// Config tunes a Cache. The zero value of every field selects its default.
type Config struct {
	// Size is the maximum number of keys kept (least recently used evicted
	// first). Default 16.
	Size int
	// FetchTimeout bounds one upstream fetch. Default 30s.
	FetchTimeout time.Duration
	// BackoffInitial is the base delay before the first retry after a
	// failure. Default 2s.
	BackoffInitial time.Duration
	// BackoffMax caps the retry delay before jitter. Default 5m. Must not be
	// less than BackoffInitial.
	BackoffMax time.Duration
	// ExpiryMargin is how much lifetime credentials must have left to be
	// served or accepted from upstream (clock-skew safety). Default 1m.
	ExpiryMargin time.Duration
	// Now returns the current time. Nil means time.Now. Run's timer still
	// runs on real time: it sleeps for NextRefresh minus Now().
	Now func() time.Time
	// Rand returns a uniform number in [0, 1) for jitter. Nil means
	// math/rand/v2.Float64. It is called with the cache's lock held, so it
	// need not be safe for concurrent use.
	Rand func() float64
}

// Default values applied by New to zero fields of Config.
const (
	// DefaultSize is the default Config.Size (keys).
	DefaultSize = 16
	// DefaultFetchTimeout is the default Config.FetchTimeout.
	DefaultFetchTimeout = 30 * time.Second
	// DefaultBackoffInitial is the default Config.BackoffInitial.
	DefaultBackoffInitial = 2 * time.Second
	// DefaultBackoffMax is the default Config.BackoffMax.
	DefaultBackoffMax = 5 * time.Minute
	// DefaultExpiryMargin is the default Config.ExpiryMargin.
	DefaultExpiryMargin = time.Minute
)

// Entry is a redacted view of one cached key, as returned by Snapshot. It
// holds no secret and is safe to print or serve on an admin endpoint.
type Entry struct {
	// Key is the cache key (the role name in imdsproxy).
	Key string
	// AccessKeyID is the key id of the last good credentials, "" if none.
	AccessKeyID string
	// Expires is when the last good credentials expire; zero if none.
	Expires time.Time
	// LastUpdated is when the last good credentials were stored; zero if none.
	LastUpdated time.Time
	// LastRefresh is when the last upstream fetch (success or failure)
	// finished; zero if none has finished yet.
	LastRefresh time.Time
	// NextRefresh is when the next upstream fetch is due; zero if none is
	// scheduled.
	NextRefresh time.Time
	// LastError is the message of the last failure, "" after a success.
	LastError string
	// ErrorClass is the class of the last failure, "" after a success: the
	// error's own ErrorClass(), else "invalid_response" for credentials the
	// cache rejected, "timeout" when FetchTimeout expired, or "other".
	ErrorClass string
	// Permanent reports whether the last failure was permanent.
	Permanent bool
	// ConsecutiveFailures counts failures since the last success.
	ConsecutiveFailures int
	// Valid reports whether the cached credentials are servable now, that is
	// complete with more than ExpiryMargin left.
	Valid bool
}

// Cache is a bounded refresh-ahead credential cache. Create it with New; the
// zero value is not usable. All methods are safe for concurrent use.
type Cache struct {
	fetcher Fetcher
	cfg     Config
	log     *zap.Logger
	m       *metrics

	// wake tells Run to recompute its timer (capacity 1, never blocks).
	wake chan struct{}

	mu  sync.Mutex // guards lru, every *entry in it, and calls of cfg.Rand
	lru *simplelru.LRU[string, *entry]
}

// entry is the state of one key. All fields are guarded by Cache.mu.
type entry struct {
	key         string
	creds       creds.Credentials // last good credentials; zero if none
	lastUpdated time.Time
	lastRefresh time.Time
	nextRefresh time.Time
	err         error // last failure, nil after a success
	class       string
	permanent   bool
	failures    int
	background  bool    // refreshed by Run (set by Prefetch or a success)
	flight      *flight // the upstream call in progress, nil if none
}

// flight is one shared upstream call. creds and err are written before done
// is closed and only read after.
type flight struct {
	done  chan struct{}
	creds creds.Credentials
	err   error
}

// New returns a Cache in front of f. It registers the cache's metrics with reg
// (nil: no metrics are registered) and logs to log (nil: no logging). It
// fails when cfg holds negative values, BackoffMax < BackoffInitial, or the
// metrics cannot be registered.
func New(f Fetcher, cfg Config, log *zap.Logger, reg prometheus.Registerer) (*Cache, error) {
	if f == nil {
		return nil, errors.New("cache: nil fetcher")
	}
	if cfg.Size < 0 || cfg.FetchTimeout < 0 || cfg.BackoffInitial < 0 || cfg.BackoffMax < 0 || cfg.ExpiryMargin < 0 {
		return nil, errors.New("cache: negative value in config")
	}
	setDefault(&cfg.Size, DefaultSize)
	setDefault(&cfg.FetchTimeout, DefaultFetchTimeout)
	setDefault(&cfg.BackoffInitial, DefaultBackoffInitial)
	setDefault(&cfg.BackoffMax, DefaultBackoffMax)
	setDefault(&cfg.ExpiryMargin, DefaultExpiryMargin)
	if cfg.BackoffMax < cfg.BackoffInitial {
		return nil, fmt.Errorf("cache: backoff max %s is less than backoff initial %s", cfg.BackoffMax, cfg.BackoffInitial)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Rand == nil {
		cfg.Rand = rand.Float64
	}
	if log == nil {
		log = zap.NewNop()
	}
	c := &Cache{
		fetcher: f,
		cfg:     cfg,
		log:     log,
		wake:    make(chan struct{}, 1),
	}
	l, err := simplelru.NewLRU(cfg.Size, func(string, *entry) { c.wakeRun() })
	if err != nil {
		return nil, fmt.Errorf("cache: %w", err)
	}
	c.lru = l
	m, err := newMetrics(c, reg)
	if err != nil {
		return nil, err
	}
	c.m = m
	return c, nil
}

func setDefault[T comparable](p *T, def T) {
	var zero T
	if *p == zero {
		*p = def
	}
}

// Get returns servable credentials for key.
//
// When the cache holds credentials with more than ExpiryMargin left, Get
// returns them at once without calling or waiting on the Fetcher, even while a
// refresh is in flight or failing. Otherwise, if the key is in backoff after a
// recent failure, Get returns that failure at once (wrapped; errors.As still
// finds ErrorClass and Permanent). Otherwise it joins or starts the key's one
// shared upstream fetch, which is not cancelled when ctx is; Get itself
// returns ctx.Err() as soon as ctx ends. A key not yet cached is added (and
// may evict the least recently used key), so its state shows in Snapshot
// even when the fetch fails.
func (c *Cache) Get(ctx context.Context, key string) (creds.Credentials, error) {
	c.mu.Lock()
	now := c.cfg.Now()
	e := c.entryLocked(key)
	if c.servable(e.creds, now) {
		cr, stale := e.creds, e.failures > 0
		c.mu.Unlock()
		if stale {
			c.m.stale.Inc()
		} else {
			c.m.hit.Inc()
		}
		return cr, nil
	}
	if e.failures > 0 && now.Before(e.nextRefresh) {
		err := fmt.Errorf("cache: no valid credentials for %s, next attempt in %s: %w", key, e.nextRefresh.Sub(now).Round(time.Millisecond), e.err)
		c.mu.Unlock()
		c.m.errors.Inc()
		return creds.Credentials{}, err
	}
	f := c.startLocked(ctx, e)
	c.mu.Unlock()

	cr, err := wait(ctx, key, f)
	if err != nil {
		c.m.errors.Inc()
	} else {
		c.m.miss.Inc()
	}
	return cr, err
}

// Credentials is Get under the name proxy.CredentialSource asks for.
func (c *Cache) Credentials(ctx context.Context, key string) (creds.Credentials, error) {
	return c.Get(ctx, key)
}

// Prefetch fetches credentials for key now, whatever the cache holds and even
// in backoff (it is meant for start-up and reload, not the request path),
// sharing the upstream call with concurrent waiters, and registers key for
// background refresh by Run even when the fetch fails. It returns the fetch's
// error, or ctx.Err() if ctx ends first (the fetch itself carries on).
func (c *Cache) Prefetch(ctx context.Context, key string) error {
	c.mu.Lock()
	e := c.entryLocked(key)
	e.background = true
	f := c.startLocked(ctx, e)
	c.mu.Unlock()
	_, err := wait(ctx, key, f)
	return err
}

// Run refreshes keys in the background, each at its NextRefresh, until ctx
// ends; then it returns nil. A key is refreshed once it has been passed to
// Prefetch or has had one successful fetch; a key only ever asked for by Get
// and never fetched successfully is retried only when Get asks again (after
// its backoff), so a mistyped key cannot cause background traffic. Refreshes
// go through the same shared fetch as Get and never block Get. Fetches in
// flight when ctx ends finish on their own (bounded by FetchTimeout). Call
// Run once per Cache.
func (c *Cache) Run(ctx context.Context) error {
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	defer timer.Stop()
	for {
		next, ok := c.startDue(ctx)
		var tick <-chan time.Time
		if ok {
			timer.Reset(next.Sub(c.cfg.Now()))
			tick = timer.C
		}
		select {
		case <-ctx.Done():
			return nil
		case <-c.wake:
		case <-tick:
		}
	}
}

// startDue starts a refresh for every registered key whose NextRefresh has
// come and returns the earliest NextRefresh still ahead (ok false if none).
func (c *Cache) startDue(ctx context.Context) (next time.Time, ok bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	now := c.cfg.Now()
	for _, e := range c.lru.Values() {
		if !e.background || e.flight != nil || e.nextRefresh.IsZero() {
			continue
		}
		if !now.Before(e.nextRefresh) {
			c.startLocked(ctx, e)
			continue
		}
		if !ok || e.nextRefresh.Before(next) {
			next, ok = e.nextRefresh, true
		}
	}
	return next, ok
}

// Snapshot returns a redacted view of every cached key, sorted by key.
func (c *Cache) Snapshot() []Entry {
	c.mu.Lock()
	defer c.mu.Unlock()
	now := c.cfg.Now()
	out := make([]Entry, 0, c.lru.Len())
	for _, e := range c.lru.Values() {
		s := Entry{
			Key:                 e.key,
			AccessKeyID:         e.creds.AccessKeyID,
			Expires:             e.creds.Expires,
			LastUpdated:         e.lastUpdated,
			LastRefresh:         e.lastRefresh,
			NextRefresh:         e.nextRefresh,
			ErrorClass:          e.class,
			Permanent:           e.permanent,
			ConsecutiveFailures: e.failures,
			Valid:               c.servable(e.creds, now),
		}
		if e.err != nil {
			s.LastError = e.err.Error()
		}
		out = append(out, s)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Key < out[j].Key })
	return out
}

// Purge drops every key, its credentials and its refresh schedule (used when
// the configured role or source changes). Fetches in flight finish, and their
// callers get their result, but nothing they return is stored.
func (c *Cache) Purge() {
	c.mu.Lock()
	c.lru.Purge()
	c.mu.Unlock()
}

// entryLocked returns the entry of key, marked most recently used, adding an
// empty one if there is none. c.mu must be held.
func (c *Cache) entryLocked(key string) *entry {
	e, ok := c.lru.Get(key)
	if !ok {
		e = &entry{key: key}
		c.lru.Add(key, e)
	}
	return e
}

// servable reports whether cr may be served at now.
func (c *Cache) servable(cr creds.Credentials, now time.Time) bool {
	return cr.Complete() && cr.Remaining(now) > c.cfg.ExpiryMargin
}

// wakeRun asks Run to recompute its timer.
func (c *Cache) wakeRun() {
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

// startLocked returns e's upstream call in flight, starting one if there is
// none. The call runs detached from ctx's cancellation, bounded by
// FetchTimeout. c.mu must be held.
func (c *Cache) startLocked(ctx context.Context, e *entry) *flight {
	if e.flight == nil {
		f := &flight{done: make(chan struct{})}
		e.flight = f
		c.m.inFlight.Inc()
		go c.fetch(context.WithoutCancel(ctx), e, f)
	}
	return e.flight
}

// wait waits for f or for ctx to end.
func wait(ctx context.Context, key string, f *flight) (creds.Credentials, error) {
	select {
	case <-f.done:
		if f.err != nil {
			return creds.Credentials{}, fmt.Errorf("cache: fetch credentials for %s: %w", key, f.err)
		}
		return f.creds, nil
	case <-ctx.Done():
		return creds.Credentials{}, ctx.Err()
	}
}

// fetch performs the upstream call of f for e, records the outcome in e and
// releases f's waiters.
func (c *Cache) fetch(ctx context.Context, e *entry, f *flight) {
	ctx, cancel := context.WithTimeout(ctx, c.cfg.FetchTimeout)
	start := c.cfg.Now()
	cr, err := c.fetcher.Fetch(ctx, e.key)
	timedOut := ctx.Err() != nil
	cancel()

	c.mu.Lock()
	now := c.cfg.Now()
	if err == nil {
		err = c.check(cr, now)
	}
	var class string
	var permanent bool
	if err == nil {
		if cr.LastUpdated.IsZero() {
			cr.LastUpdated = now
		}
		e.creds = cr
		e.lastUpdated = now
		e.err, e.class, e.permanent, e.failures = nil, "", false, 0
		e.background = true
		e.nextRefresh = c.refreshAt(now, cr.Expires)
	} else {
		class, permanent = classify(err, timedOut)
		e.err, e.class, e.permanent = err, class, permanent
		e.failures++
		e.nextRefresh = c.retryAt(now, e)
	}
	e.lastRefresh = now
	e.flight = nil
	failures, next, lastGood := e.failures, e.nextRefresh, c.servable(e.creds, now)
	c.mu.Unlock()

	// Metrics first, so they are up to date when the waiters return.
	took := now.Sub(start).Seconds()
	if err == nil {
		c.m.fetchOK.Observe(took)
		c.m.refreshes.WithLabelValues("success", "none").Inc()
	} else {
		cr = creds.Credentials{}
		c.m.fetchFail.Observe(took)
		c.m.refreshes.WithLabelValues("failure", class).Inc()
	}
	c.m.inFlight.Dec()
	f.creds, f.err = cr, err
	close(f.done)
	c.wakeRun()

	if err == nil {
		c.log.Info("credentials refreshed",
			zap.String(logKey, e.key),
			zap.Object(logCredentials, cr),
			zap.Time(logNextRefresh, next))
		return
	}
	c.log.Warn("credential refresh failed",
		zap.String(logKey, e.key),
		zap.Error(err),
		zap.String(logClass, class),
		zap.Bool(logPermanent, permanent),
		zap.Int(logConsecutiveFailures, failures),
		zap.Duration(logRetryIn, next.Sub(now)),
		zap.Bool(logServingLastGood, lastGood))
}

// Log keys, defined once.
const (
	logKey                 = "key"
	logCredentials         = "credentials"
	logNextRefresh         = "next_refresh"
	logClass               = "class"
	logPermanent           = "permanent"
	logConsecutiveFailures = "consecutive_failures"
	logRetryIn             = "retry_in"
	logServingLastGood     = "serving_last_good"
)

// Error classes the cache assigns itself.
const (
	classInvalidResponse = "invalid_response"
	classTimeout         = "timeout"
	classOther           = "other"
)

// classError is an error of a class chosen by the cache.
type classError struct {
	class, msg string
}

func (e *classError) Error() string      { return e.msg }
func (e *classError) ErrorClass() string { return e.class }
func (e *classError) Permanent() bool    { return false }

// check rejects credentials that may not be stored: incomplete, or already
// within ExpiryMargin of expiry. The message names no secret.
func (c *Cache) check(cr creds.Credentials, now time.Time) error {
	if !cr.Complete() {
		return &classError{classInvalidResponse, fmt.Sprintf("cache: upstream returned incomplete credentials (access key id %q)", cr.AccessKeyID)}
	}
	if left := cr.Remaining(now); left <= c.cfg.ExpiryMargin {
		return &classError{classInvalidResponse, fmt.Sprintf("cache: upstream returned credentials %s with %s left, not more than the expiry margin %s",
			cr.AccessKeyID, left, c.cfg.ExpiryMargin)}
	}
	return nil
}

// classify returns err's class and permanence. An error without a class is
// "timeout" when the cache's own FetchTimeout expired, else "other".
func classify(err error, timedOut bool) (class string, permanent bool) {
	var ce interface{ ErrorClass() string }
	if errors.As(err, &ce) && ce.ErrorClass() != "" {
		class = ce.ErrorClass()
	} else if timedOut && errors.Is(err, context.DeadlineExceeded) {
		class = classTimeout
	} else {
		class = classOther
	}
	var pe interface{ Permanent() bool }
	if errors.As(err, &pe) {
		permanent = pe.Permanent()
	}
	return class, permanent
}
