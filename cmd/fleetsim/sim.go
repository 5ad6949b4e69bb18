package main

import (
	"math/rand/v2"
	"time"

	"github.com/imdsproxy/imdsproxy/cache"
)

// Params describes one simulated fleet. Durations are simulated time.
type Params struct {
	// Hosts is the number of daemons, each caching one role.
	Hosts int
	// Quota is the STS rate quota in requests per second (token bucket
	// rate); Burst its bucket size (zero: Quota, one second's worth). A call
	// that finds the bucket empty is throttled: a failure of class
	// throttling.
	Quota, Burst float64
	// Latency is how long every STS call takes. A call longer than
	// FetchTimeout fails with class timeout after FetchTimeout (it still
	// counts against the quota).
	Latency time.Duration
	// Session is the lifetime of the credentials STS issues, counted from
	// the moment the call reaches STS.
	Session time.Duration
	// Duration is how long the simulation runs.
	Duration time.Duration
	// BootSpread spreads the hosts' start (first fetch) uniformly over
	// [0, BootSpread); zero boots every host at 0.
	BootSpread time.Duration
	// OutageAt and Outage: STS fails every call arriving in
	// [OutageAt, OutageAt+Outage) (class server). Outage zero: none.
	OutageAt, Outage time.Duration
	// The daemon's cache settings (cache.Config), defaults when zero.
	ExpiryMargin, BackoffInitial, BackoffMax, FetchTimeout time.Duration
	// Seed makes a run reproducible.
	Seed uint64
}

func (p *Params) defaults() {
	if p.Burst == 0 {
		p.Burst = p.Quota
	}
	if p.Session == 0 {
		p.Session = time.Hour
	}
	if p.ExpiryMargin == 0 {
		p.ExpiryMargin = cache.DefaultExpiryMargin
	}
	if p.BackoffInitial == 0 {
		p.BackoffInitial = cache.DefaultBackoffInitial
	}
	if p.BackoffMax == 0 {
		p.BackoffMax = cache.DefaultBackoffMax
	}
	if p.FetchTimeout == 0 {
		p.FetchTimeout = cache.DefaultFetchTimeout
	}
}

// Result is what a run measured. Rates are STS calls arriving per simulated
// second (per-second buckets), throttled and failed calls included.
type Result struct {
	Params Params

	Calls, Throttled, Failed int64
	PeakRPS                  int
	MeanRPS                  float64

	// FirstCreds is the longest time from a host's boot to its first
	// credentials; NeverGotCreds counts hosts still without any at the end.
	FirstCreds    time.Duration
	NeverGotCreds int
	// MaxAge is the oldest credentials ever served (time since they were
	// obtained); MinRemaining the shortest lifetime left on credentials
	// being served at any moment (ExpiryMargin when some host ran out).
	MaxAge, MinRemaining time.Duration
	// HostsWithout counts hosts that, after having had credentials, had none
	// servable for longer than one STS call; WithoutTime is the longest such
	// gap. WaitedOneCall counts the gaps no longer than one call: a retry
	// that RetryAt pulled forward to the end of servability runs then, so
	// requests in that moment wait for the call (they never get expired
	// credentials). These are excluded from the outage figures too.
	HostsWithout  int
	WithoutTime   time.Duration
	WaitedOneCall int

	// Outage figures (zero without an outage).
	OutageCalls   int64 // calls arriving during the outage
	OutagePeakRPS int
	AfterPeakRPS  int // peak in the 10 minutes after the outage
	// HostsWithoutDuring: hosts without servable credentials at some moment
	// of the outage; HostsWithoutAfter: of those, the ones still without
	// when it ended.
	HostsWithoutDuring, HostsWithoutAfter int
	// RecoverValid: from the end of the outage until every host serves
	// valid credentials again. RecoverFresh: until every host has fetched
	// successfully after the outage.
	RecoverValid, RecoverFresh time.Duration
}

// host is the state of one daemon's cache entry. Times are offsets from the
// start of the simulation.
type host struct {
	next     time.Duration // the pending event: an attempt, or its completion
	inFlight bool          // the pending event is the completion of a call
	ok       bool          // outcome of the call in flight
	issued   time.Duration // expiry of the call in flight is issued+Session

	have        bool // holds (possibly no longer servable) credentials
	obtained    time.Duration
	expires     time.Duration
	failures    int
	boot        time.Duration
	lost        bool // has had a gap after its first credentials
	freshAfter  bool // has fetched successfully since the outage ended
	withoutMark bool // counted in HostsWithoutDuring
}

// epoch anchors simulated offsets to wall-clock times for the cache functions.
var epoch = time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)

// Simulate runs p and returns what it measured. It is deterministic for a
// given p.
func Simulate(p Params) Result {
	p.defaults()
	rng := rand.New(rand.NewPCG(p.Seed, 0x9e3779b97f4a7c15))
	hosts := make([]host, p.Hosts)
	for i := range hosts {
		if p.BootSpread > 0 {
			hosts[i].boot = time.Duration(rng.Int64N(int64(p.BootSpread)))
		}
		hosts[i].next = hosts[i].boot
	}
	h := newHeap(hosts)

	secs := int(p.Duration/time.Second) + 1
	buckets := make([]int32, secs)
	res := Result{Params: p, MinRemaining: p.Session}
	outEnd := p.OutageAt + p.Outage
	inOutage := func(t time.Duration) bool { return p.Outage > 0 && t >= p.OutageAt && t < outEnd }

	tokens, last := p.Burst, time.Duration(0)
	take := func(t time.Duration) bool {
		tokens = min(p.Burst, tokens+(t-last).Seconds()*p.Quota)
		last = t
		if tokens >= 1 {
			tokens--
			return true
		}
		return false
	}
	callTime := min(p.Latency, p.FetchTimeout)

	// gap records that host x had nothing servable during [a, b).
	gap := func(x *host, a, b time.Duration) {
		if b <= a {
			return
		}
		if b-a <= callTime {
			res.WaitedOneCall++
			return
		}
		if !x.lost {
			x.lost = true
			res.HostsWithout++
		}
		res.WithoutTime = max(res.WithoutTime, b-a)
		if p.Outage > 0 && a < outEnd && b > p.OutageAt && !x.withoutMark {
			x.withoutMark = true
			res.HostsWithoutDuring++
			if b > outEnd {
				res.HostsWithoutAfter++
			}
		}
		if p.Outage > 0 && a < outEnd && b > outEnd {
			res.RecoverValid = max(res.RecoverValid, b-outEnd)
		}
	}
	// served accounts for x's current credentials being served until t
	// (or until they stop being servable, if that comes first).
	served := func(x *host, t time.Duration) {
		until := x.expires - p.ExpiryMargin
		end := min(t, until)
		res.MaxAge = max(res.MaxAge, end-x.obtained)
		res.MinRemaining = min(res.MinRemaining, x.expires-end)
		gap(x, until, t)
	}

	for h.len() > 0 {
		i := h.peek()
		x := &hosts[i]
		t := x.next
		if t >= p.Duration {
			break
		}
		if !x.inFlight {
			// An attempt reaches STS.
			res.Calls++
			buckets[t/time.Second]++
			x.issued = t
			switch {
			case inOutage(t):
				x.ok = false
			case !take(t):
				x.ok = false
				res.Throttled++
			default:
				x.ok = p.Latency <= p.FetchTimeout
			}
			x.inFlight = true
			x.next = t + callTime
			h.fix(i)
			continue
		}
		// The call completes at t.
		x.inFlight = false
		now := epoch.Add(t)
		expires := x.issued + p.Session
		if x.ok && expires-t <= p.ExpiryMargin {
			x.ok = false // the cache rejects credentials too close to expiry
		}
		if !x.ok {
			res.Failed++
			x.failures++
			var until time.Time
			if x.have && x.expires-p.ExpiryMargin > t {
				until = epoch.Add(x.expires - p.ExpiryMargin)
			}
			x.next = cache.RetryAt(now, until, x.failures, p.BackoffInitial, p.BackoffMax, rng.Float64()).Sub(epoch)
			h.fix(i)
			continue
		}
		if x.have {
			served(x, t)
		} else {
			res.FirstCreds = max(res.FirstCreds, t-x.boot)
		}
		if p.Outage > 0 && t >= outEnd && !x.freshAfter {
			x.freshAfter = true
			res.RecoverFresh = max(res.RecoverFresh, t-outEnd)
		}
		x.have, x.obtained, x.expires, x.failures = true, t, expires, 0
		x.next = cache.RefreshAt(now, epoch.Add(expires), p.ExpiryMargin, p.BackoffInitial, rng.Float64()).Sub(epoch)
		h.fix(i)
	}
	for i := range hosts {
		x := &hosts[i]
		if x.have {
			served(x, p.Duration)
		} else {
			res.NeverGotCreds++
		}
		if p.Outage > 0 && !x.freshAfter && outEnd < p.Duration {
			res.RecoverFresh = max(res.RecoverFresh, p.Duration-outEnd) // not recovered by the end
		}
	}

	var peak int32
	for s, n := range buckets {
		peak = max(peak, n)
		st := time.Duration(s) * time.Second
		if inOutage(st) {
			res.OutageCalls += int64(n)
			res.OutagePeakRPS = max(res.OutagePeakRPS, int(n))
		}
		if p.Outage > 0 && st >= outEnd && st < outEnd+10*time.Minute {
			res.AfterPeakRPS = max(res.AfterPeakRPS, int(n))
		}
	}
	res.PeakRPS = int(peak)
	res.MeanRPS = float64(res.Calls) / p.Duration.Seconds()
	return res
}

// AttemptBound is the most attempts one host can make in a window of length
// w while STS fails everything: the attempt due when the window opens, the
// retries at the shortest delays RetryDelay allows (half the capped
// exponential), plus the one attempt RetryAt may pull forward to the moment
// the last good credentials stop being servable.
func AttemptBound(w, initial, maxDelay time.Duration) int {
	n, elapsed := 1, time.Duration(0)
	for f := 1; ; f++ {
		elapsed += cache.RetryDelay(f, initial, maxDelay, 0)
		if elapsed > w {
			break
		}
		n++
	}
	return n + 1
}

// heap is a binary min-heap of host indices ordered by (next, index).
type heap struct {
	hosts []host
	a     []int32
	pos   []int32
}

func newHeap(hosts []host) *heap {
	h := &heap{hosts: hosts, a: make([]int32, len(hosts)), pos: make([]int32, len(hosts))}
	for i := range hosts {
		h.a[i], h.pos[i] = int32(i), int32(i)
	}
	for i := len(h.a)/2 - 1; i >= 0; i-- {
		h.down(i)
	}
	return h
}

func (h *heap) len() int  { return len(h.a) }
func (h *heap) peek() int { return int(h.a[0]) }
func (h *heap) fix(i int) { p := int(h.pos[i]); h.down(p); h.up(p) }
func (h *heap) less(i, j int) bool {
	a, b := h.a[i], h.a[j]
	ta, tb := h.hosts[a].next, h.hosts[b].next
	return ta < tb || (ta == tb && a < b)
}

func (h *heap) swap(i, j int) {
	h.a[i], h.a[j] = h.a[j], h.a[i]
	h.pos[h.a[i]], h.pos[h.a[j]] = int32(i), int32(j)
}

func (h *heap) up(j int) {
	for j > 0 {
		i := (j - 1) / 2
		if !h.less(j, i) {
			break
		}
		h.swap(i, j)
		j = i
	}
}

func (h *heap) down(i int) {
	n := len(h.a)
	for {
		l := 2*i + 1
		if l >= n {
			return
		}
		j := l
		if r := l + 1; r < n && h.less(r, l) {
			j = r
		}
		if !h.less(j, i) {
			return
		}
		h.swap(i, j)
		i = j
	}
}
