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
// Clock steps: freshness is judged on the wall clock (credentials carry a
// wall-clock expiry from upstream), while Go timers run on the monotonic clock,
// which a step of the wall clock (an NTP step, a VM or host resumed from
// suspend, an operator's date -s) does not move. Run therefore never sleeps
// longer than MaxSleep and compares, at every wake, the wall-clock time that
// passed with the monotonic time that passed; a difference of more than
// StepThreshold is a step, logged once at Warn ("wall clock stepped", with
// the signed step) and counted in imdsproxy_cache_clock_steps_total. Each
// scheduled fetch is due at the earlier of its wall-clock time and the same
// delay on the monotonic clock. After a forward step whatever the wall clock
// made due (refreshes, retries, credentials that now look expired) is fetched
// within MaxSleep, once per key; nothing else changes, so there is no storm.
// After a backward step cached credentials look longer-lived, but every
// pending refresh or retry still comes when it would have without the step,
// so a key in backoff is not locked out for the size of the step. What is
// servable is still judged by the (stepped) wall clock: should refreshes
// fail after a backward step, the last good credentials are served until
// they look expired by the new clock.
//
// Which keys are kept fresh is the caller's decision: Keep declares the set
// (imdsproxy declares the keys its current configuration and rollout stage
// may serve); every other key is dropped, and a key outside the set that a
// request still asks for is fetched and served but not refreshed.
//
// The package knows nothing of AWS: keys are any comparable type (imdsproxy
// uses creds.Key, named by its String method) and errors are classified only
// through the optional methods ErrorClass() string and Permanent() bool.
package cache

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
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
type Fetcher[K comparable] interface {
	Fetch(ctx context.Context, key K) (creds.Credentials, error)
}

// FetcherFunc adapts a function to Fetcher.
type FetcherFunc[K comparable] func(ctx context.Context, key K) (creds.Credentials, error)

// Fetch implements Fetcher.
func (f FetcherFunc[K]) Fetch(ctx context.Context, key K) (creds.Credentials, error) {
	return f(ctx, key)
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
	// Now returns the current wall-clock time. Nil means time.Now. Any
	// monotonic clock reading is dropped (t.Round(0)): expiries and schedules
	// are wall-clock times. Run and the schedule also read the runtime's
	// monotonic clock (time.Now) to detect steps of Now (see the package
	// doc), so a Now that does not advance with real time reads as steps.
	Now func() time.Time
	// Rand returns a uniform number in [0, 1) for jitter. Nil means
	// math/rand/v2.Float64. It is called with the cache's lock held, so it
	// need not be safe for concurrent use.
	Rand func() float64
}

// Run's defences against wall-clock steps (see the package doc).
const (
	// MaxSleep caps one sleep of Run: a forward step of the wall clock is
	// acted on within MaxSleep. 5 s is far inside the default ExpiryMargin
	// (1 m), so a refresh a step made overdue happens while credentials that
	// were servable at the step still are. It adds no upstream traffic: a
	// wake fetches only keys that are already due. It is cheap: a wake locks the cache and scans at most
	// Config.Size keys (BenchmarkStartDue: about a microsecond for 16).
	// (When a step leaves nothing servable, the first Get starts the fetch
	// itself; it does not wait for Run.)
	MaxSleep = 5 * time.Second
	// StepThreshold is how far the wall-clock time elapsed between two wakes
	// of Run may differ from the monotonic time elapsed before it counts as
	// a clock step. Slewing (NTP adjusts the rate by at most 500 ppm, 2.5 ms
	// per MaxSleep) and scheduling delays (which move both clocks alike) stay
	// far below it.
	StepThreshold = 2 * time.Second
)

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
type Entry[K comparable] struct {
	// Key is the cache key.
	Key K
	// Name is the key as printed (fmt.Sprint: its String method when it
	// has one); it labels the metrics and log lines of the key.
	Name string
	// Kept reports whether the key is in the set declared by Keep (every
	// key before the first Keep): it is refreshed ahead of expiry.
	Kept bool
	// AccessKeyID is the key id of the last good credentials, "" if none.
	AccessKeyID string
	// Expires is when the last good credentials expire; zero if none.
	Expires time.Time
	// LastUpdated is when the last good credentials were stored; zero if none.
	LastUpdated time.Time
	// LastRefresh is when the last upstream fetch (success or failure)
	// finished; zero if none has finished yet.
	LastRefresh time.Time
	// NextRefresh is when the next upstream fetch is due, on the wall clock;
	// zero if none is scheduled. After a backward clock step it is the
	// scheduled time moved back by the step (see the package doc).
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
type Cache[K comparable] struct {
	fetcher Fetcher[K]
	cfg     Config
	ownNow  bool // cfg.Now is time.Now: clock reads it once for both clocks
	log     *zap.Logger
	m       *metrics

	// wake tells Run to recompute its timer (capacity 1, never blocks).
	wake chan struct{}

	mu  sync.Mutex // guards lru, kept, every *entry in lru, and calls of cfg.Rand
	lru *simplelru.LRU[K, *entry[K]]
	// kept is the set declared by Keep; nil until the first Keep, when
	// every key fetched successfully is refreshed.
	kept map[K]struct{}
}

// entry is the state of one key. All fields are guarded by Cache.mu.
type entry[K comparable] struct {
	key         K
	name        string            // fmt.Sprint(key), computed once
	creds       creds.Credentials // last good credentials; zero if none
	lastUpdated time.Time
	lastRefresh time.Time
	nextRefresh time.Time // wall clock
	dueMono     time.Time // nextRefresh on the monotonic clock (see next)
	err         error     // last failure, nil after a success
	class       string
	permanent   bool
	failures    int
	background  bool    // refreshed by Run (set by Prefetch, Keep, or a success of a kept key)
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
// fails when cfg holds negative values or BackoffMax < BackoffInitial; it
// panics when reg already holds the metrics of another Cache.
func New[K comparable](f Fetcher[K], cfg Config, log *zap.Logger, reg prometheus.Registerer) (*Cache[K], error) {
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
	ownNow := cfg.Now == nil
	if ownNow {
		cfg.Now = time.Now
	}
	if cfg.Rand == nil {
		cfg.Rand = rand.Float64
	}
	if log == nil {
		log = zap.NewNop()
	}
	c := &Cache[K]{
		fetcher: f,
		cfg:     cfg,
		ownNow:  ownNow,
		log:     log,
		wake:    make(chan struct{}, 1),
	}
	l, err := simplelru.NewLRU(cfg.Size, func(K, *entry[K]) { c.wakeRun() })
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

// Tune replaces the retry and freshness tuning (FetchTimeout,
// BackoffInitial, BackoffMax, ExpiryMargin; zero fields get their defaults)
// for every schedule computed and every fetch started from now on; Size,
// Now and Rand are kept. It fails, changing nothing, on values New would
// refuse.
func (c *Cache[K]) Tune(t Config) error {
	if t.FetchTimeout < 0 || t.BackoffInitial < 0 || t.BackoffMax < 0 || t.ExpiryMargin < 0 {
		return errors.New("cache: negative value in config")
	}
	setDefault(&t.FetchTimeout, DefaultFetchTimeout)
	setDefault(&t.BackoffInitial, DefaultBackoffInitial)
	setDefault(&t.BackoffMax, DefaultBackoffMax)
	setDefault(&t.ExpiryMargin, DefaultExpiryMargin)
	if t.BackoffMax < t.BackoffInitial {
		return fmt.Errorf("cache: backoff max %s is less than backoff initial %s", t.BackoffMax, t.BackoffInitial)
	}
	c.mu.Lock()
	c.cfg.FetchTimeout, c.cfg.BackoffInitial, c.cfg.BackoffMax, c.cfg.ExpiryMargin =
		t.FetchTimeout, t.BackoffInitial, t.BackoffMax, t.ExpiryMargin
	c.mu.Unlock()
	c.wakeRun()
	return nil
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
func (c *Cache[K]) Get(ctx context.Context, key K) (creds.Credentials, error) {
	return c.GetWithin(ctx, key, 0)
}

// GetWithin is Get with a bound on the wait for an upstream fetch: when the
// answer must come from one, GetWithin waits at most maxWait (0: no bound
// but ctx) and then returns a *WaitError (class "timeout"); the fetch carries
// on and stores its result for the next request. The front doors use it so
// that a client is answered within its own timeout (WIRE.md §8.7: never block
// an IMDS request on upstream) instead of being dropped. An answer from
// memory costs nothing more than Get's.
func (c *Cache[K]) GetWithin(ctx context.Context, key K, maxWait time.Duration) (creds.Credentials, error) {
	c.mu.Lock()
	now, mono := c.clock()
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
	if next := e.next(now, mono); e.failures > 0 && now.Before(next) {
		err := fmt.Errorf("cache: no valid credentials for %s, next attempt in %s: %w", e.name, next.Sub(now).Round(time.Millisecond), e.err)
		c.mu.Unlock()
		c.m.errors.Inc()
		return creds.Credentials{}, err
	}
	f := c.startLocked(ctx, e)
	c.mu.Unlock()

	cr, err := wait(ctx, e.name, f, maxWait)
	var we *WaitError
	switch {
	case errors.As(err, &we):
		c.m.waitTimeouts.Inc()
	case err != nil:
		c.m.errors.Inc()
	default:
		c.m.miss.Inc()
	}
	return cr, err
}

// WaitError is GetWithin's error when its bound on the wait for an upstream
// fetch was reached first. Its class is "timeout" (retryable): the fetch
// carries on, and a client asking again is answered from memory once it has
// finished.
type WaitError struct {
	Name   string        // the key's name
	Waited time.Duration // the bound that was reached
}

func (e *WaitError) Error() string {
	return fmt.Sprintf("cache: credentials for %s are still being fetched after %s; ask again", e.Name, e.Waited)
}

// ErrorClass is "timeout", as for a fetch that timed out.
func (e *WaitError) ErrorClass() string { return "timeout" }

// Permanent is false: asking again may succeed.
func (e *WaitError) Permanent() bool { return false }

// Prefetch fetches credentials for key now, whatever the cache holds and even
// in backoff (it is meant for start-up and reload, not the request path),
// sharing the upstream call with concurrent waiters, and registers key for
// background refresh by Run even when the fetch fails. It returns the fetch's
// error, or ctx.Err() if ctx ends first (the fetch itself carries on).
func (c *Cache[K]) Prefetch(ctx context.Context, key K) error {
	c.mu.Lock()
	e := c.entryLocked(key)
	e.background = true
	f := c.startLocked(ctx, e)
	c.mu.Unlock()
	_, err := wait(ctx, e.name, f, 0)
	return err
}

// Keep declares the keys to keep fresh: every cached key not in keys is
// dropped with its credentials and schedule (a fetch in flight finishes for
// its callers, but nothing it returns is stored), and the cached keys in keys
// are refreshed ahead by Run from now on. From the first Keep on, a key that
// Get fetches and that is not in the latest set is served but never
// refreshed: a request that decided on a key just before the set changed
// cannot make the cache refresh it for ever. Keep fetches nothing itself
// (Prefetch does). It returns the names of the keys it dropped.
func (c *Cache[K]) Keep(keys []K) []string {
	kept := make(map[K]struct{}, len(keys))
	for _, k := range keys {
		kept[k] = struct{}{}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.kept = kept
	var dropped []string
	for _, e := range c.lru.Values() {
		if _, ok := kept[e.key]; ok {
			e.background = true
			continue
		}
		c.lru.Remove(e.key)
		dropped = append(dropped, e.name)
	}
	slices.Sort(dropped)
	return dropped
}

// keptLocked reports whether key is to be refreshed. c.mu must be held.
func (c *Cache[K]) keptLocked(key K) bool {
	if c.kept == nil {
		return true
	}
	_, ok := c.kept[key]
	return ok
}

// Lookup returns the redacted view of key, and whether it is cached.
func (c *Cache[K]) Lookup(key K) (Entry[K], bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.lru.Peek(key)
	if !ok {
		return Entry[K]{}, false
	}
	now, mono := c.clock()
	return c.entryView(e, now, mono), true
}

// Run refreshes keys in the background, each at its NextRefresh, until ctx
// ends; then it returns nil. A key is refreshed once it has been passed to
// Prefetch or has had one successful fetch; a key only ever asked for by Get
// and never fetched successfully is retried only when Get asks again (after
// its backoff), so a mistyped key cannot cause background traffic. Refreshes
// go through the same shared fetch as Get and never block Get. Fetches in
// flight when ctx ends finish on their own (bounded by FetchTimeout). Run
// sleeps at most MaxSleep at a time and reports steps of the wall clock (see
// the package doc). Call Run once per Cache.
func (c *Cache[K]) Run(ctx context.Context) error {
	timer := time.NewTimer(MaxSleep)
	defer timer.Stop()
	lastWall, lastMono := c.clock()
	var step time.Duration // detected at the latest wake, reported after startDue
	for {
		sleep, started := c.startDue(ctx)
		if step != 0 {
			c.reportStep(step, started)
			step = 0
		}
		timer.Reset(sleep)
		select {
		case <-ctx.Done():
			return nil
		case <-c.wake:
		case <-timer.C:
		}
		wall, mono := c.clock()
		if d := wall.Sub(lastWall) - mono.Sub(lastMono); d > StepThreshold || d < -StepThreshold {
			step = d
		}
		lastWall, lastMono = wall, mono
	}
}

// reportStep logs and counts a step of the wall clock by d (positive:
// forward), after which started refreshes were due at once.
func (c *Cache[K]) reportStep(d time.Duration, started int) {
	dir := "forward"
	if d < 0 {
		dir = "backward"
	}
	c.m.clockSteps.WithLabelValues(dir).Inc()
	c.log.Warn("wall clock stepped",
		zap.Duration(logStep, d),
		zap.String(logDirection, dir),
		zap.Time(logWallClock, c.now()),
		zap.Int(logRefreshesStarted, started))
}

// startDue starts a refresh for every registered key that is due and returns
// how long Run may sleep: until the earliest schedule still ahead, at most
// MaxSleep. started counts the refreshes it started.
func (c *Cache[K]) startDue(ctx context.Context) (sleep time.Duration, started int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	now, mono := c.clock()
	sleep = MaxSleep
	for _, e := range c.lru.Values() {
		if !e.background || e.flight != nil || e.nextRefresh.IsZero() {
			continue
		}
		next := e.next(now, mono)
		if !now.Before(next) {
			c.startLocked(ctx, e)
			started++
			continue
		}
		sleep = min(sleep, next.Sub(now))
	}
	return sleep, started
}

// Snapshot returns a redacted view of every cached key, sorted by key.
func (c *Cache[K]) Snapshot() []Entry[K] {
	c.mu.Lock()
	defer c.mu.Unlock()
	now, mono := c.clock()
	out := make([]Entry[K], 0, c.lru.Len())
	for _, e := range c.lru.Values() {
		out = append(out, c.entryView(e, now, mono))
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// entryView is the redacted view of e. c.mu must be held.
func (c *Cache[K]) entryView(e *entry[K], now, mono time.Time) Entry[K] {
	s := Entry[K]{
		Key:                 e.key,
		Name:                e.name,
		Kept:                c.keptLocked(e.key),
		AccessKeyID:         e.creds.AccessKeyID,
		Expires:             e.creds.Expires,
		LastUpdated:         e.lastUpdated,
		LastRefresh:         e.lastRefresh,
		NextRefresh:         e.next(now, mono),
		ErrorClass:          e.class,
		Permanent:           e.permanent,
		ConsecutiveFailures: e.failures,
		Valid:               c.servable(e.creds, now),
	}
	if e.err != nil {
		s.LastError = e.err.Error()
	}
	return s
}

// Purge drops every key, its credentials and its refresh schedule (used when
// the configured role or source changes). Fetches in flight finish, and their
// callers get their result, but nothing they return is stored.
func (c *Cache[K]) Purge() {
	c.mu.Lock()
	c.lru.Purge()
	c.mu.Unlock()
}

// Forget drops key, its credentials and its refresh schedule, as Purge does
// for every key, so the cache stops refreshing credentials nothing needs any
// more. A fetch in flight finishes and its callers get its result, but
// nothing it returns is stored. A later Get or Prefetch of key starts
// afresh. It reports whether key was cached.
func (c *Cache[K]) Forget(key K) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.lru.Remove(key)
}

// entryLocked returns the entry of key, marked most recently used, adding an
// empty one if there is none. c.mu must be held.
func (c *Cache[K]) entryLocked(key K) *entry[K] {
	e, ok := c.lru.Get(key)
	if !ok {
		e = &entry[K]{key: key, name: fmt.Sprint(key)}
		c.lru.Add(key, e)
	}
	return e
}

// clock returns the wall-clock time (Config.Now, monotonic reading dropped)
// and the monotonic time (time.Now). With the default Now both come from one
// reading, so they agree exactly until the wall clock steps.
func (c *Cache[K]) clock() (wall, mono time.Time) {
	mono = time.Now()
	if c.ownNow {
		return mono.Round(0), mono
	}
	return c.cfg.Now().Round(0), mono
}

// now returns the wall-clock time, without a monotonic reading.
func (c *Cache[K]) now() time.Time {
	return c.cfg.Now().Round(0)
}

// schedule sets e's next fetch to next, a wall-clock time, read at (now,
// mono) from clock. c.mu must be held.
func (e *entry[K]) schedule(next, now, mono time.Time) {
	e.nextRefresh = next
	e.dueMono = mono.Add(next.Sub(now))
}

// next returns when e's next fetch is due, as a wall-clock time, read at
// (now, mono) from clock: the earlier of its wall-clock schedule and the same
// delay on the monotonic clock, which differ only after a step of the wall
// clock. Zero if none is scheduled. c.mu must be held.
func (e *entry[K]) next(now, mono time.Time) time.Time {
	if e.nextRefresh.IsZero() {
		return time.Time{}
	}
	if m := now.Add(e.dueMono.Sub(mono)); m.Before(e.nextRefresh) {
		return m
	}
	return e.nextRefresh
}

// servable reports whether cr may be served at now.
func (c *Cache[K]) servable(cr creds.Credentials, now time.Time) bool {
	return cr.Complete() && cr.Remaining(now) > c.cfg.ExpiryMargin
}

// wakeRun asks Run to recompute its timer.
func (c *Cache[K]) wakeRun() {
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

// startLocked returns e's upstream call in flight, starting one if there is
// none. The call runs detached from ctx's cancellation, bounded by
// FetchTimeout. c.mu must be held.
func (c *Cache[K]) startLocked(ctx context.Context, e *entry[K]) *flight {
	if e.flight == nil {
		f := &flight{done: make(chan struct{})}
		e.flight = f
		c.m.inFlight.Inc()
		go c.fetch(context.WithoutCancel(ctx), e, f, c.cfg.FetchTimeout)
	}
	return e.flight
}

// wait waits for f, for ctx to end, or for maxWait (0: no bound) to pass.
func wait(ctx context.Context, name string, f *flight, maxWait time.Duration) (creds.Credentials, error) {
	var bound <-chan time.Time
	if maxWait > 0 {
		t := time.NewTimer(maxWait)
		defer t.Stop()
		bound = t.C
	}
	select {
	case <-f.done:
		if f.err != nil {
			return creds.Credentials{}, fmt.Errorf("cache: fetch credentials for %s: %w", name, f.err)
		}
		return f.creds, nil
	case <-ctx.Done():
		return creds.Credentials{}, ctx.Err()
	case <-bound:
		return creds.Credentials{}, &WaitError{Name: name, Waited: maxWait}
	}
}

// fetch performs the upstream call of f for e, records the outcome in e and
// releases f's waiters.
func (c *Cache[K]) fetch(ctx context.Context, e *entry[K], f *flight, timeout time.Duration) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	_, began := c.clock()
	cr, err := c.fetcher.Fetch(ctx, e.key)
	timedOut := ctx.Err() != nil
	cancel()

	c.mu.Lock()
	now, mono := c.clock()
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
		e.background = e.background || c.keptLocked(e.key)
		e.schedule(c.refreshAt(now, cr.Expires), now, mono)
	} else {
		class, permanent = classify(err, timedOut)
		e.err, e.class, e.permanent = err, class, permanent
		e.failures++
		e.schedule(c.retryAt(now, e), now, mono)
	}
	e.lastRefresh = now
	e.flight = nil
	failures, next, lastGood := e.failures, e.nextRefresh, c.servable(e.creds, now)
	c.mu.Unlock()

	// Metrics first, so they are up to date when the waiters return. The
	// duration is monotonic: a clock step during the fetch does not show.
	took := mono.Sub(began).Seconds()
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
			zap.String(logKey, e.name),
			zap.Object(logCredentials, cr),
			zap.Time(logNextRefresh, next))
		return
	}
	c.log.Warn("credential refresh failed",
		zap.String(logKey, e.name),
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
	logStep                = "step"
	logDirection           = "direction"
	logWallClock           = "wall_clock"
	logRefreshesStarted    = "refreshes_started"
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
func (c *Cache[K]) check(cr creds.Credentials, now time.Time) error {
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
	class, permanent = creds.Classify(err)
	if class == classOther && timedOut && errors.Is(err, context.DeadlineExceeded) {
		class = classTimeout
	}
	return class, permanent
}
