package cache

import (
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promauto"
)

// metrics holds the cache's instruments. Per-key gauges are not instruments
// but a collector reading Snapshot at scrape time, so an evicted or purged key
// leaves no stale series behind.
type metrics struct {
	hit, stale, miss, errors prometheus.Counter
	waitTimeouts             prometheus.Counter
	refreshes                *prometheus.CounterVec
	fetchOK, fetchFail       prometheus.Observer
	inFlight                 prometheus.Gauge
	clockSteps               *prometheus.CounterVec
}

func newMetrics[K comparable](c *Cache[K], reg prometheus.Registerer) (*metrics, error) {
	factory := promauto.With(reg)
	requests := factory.NewCounterVec(prometheus.CounterOpts{
		Name: "imdsproxy_cache_requests_total",
		Help: "Credential requests answered by the cache, by result: hit (served from cache), stale (served last good credentials while refreshes fail), miss (waited for an upstream fetch), wait_timeout (the caller's bound on the wait for an upstream fetch came first; no credentials returned, the fetch carries on), error (no credentials returned).",
	}, []string{"result"})
	refreshes := factory.NewCounterVec(prometheus.CounterOpts{
		Name: "imdsproxy_cache_refreshes_total",
		Help: "Upstream credential fetches finished, by result (success, failure) and error class (none on success).",
	}, []string{"result", "class"})
	duration := factory.NewHistogramVec(prometheus.HistogramOpts{
		Name:    "imdsproxy_cache_fetch_duration_seconds",
		Help:    "Latency of upstream credential fetches, by result (success, failure).",
		Buckets: []float64{0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30},
	}, []string{"result"})
	inFlight := factory.NewGauge(prometheus.GaugeOpts{
		Name: "imdsproxy_cache_fetches_in_flight",
		Help: "Upstream credential fetches in progress.",
	})
	clockSteps := factory.NewCounterVec(prometheus.CounterOpts{
		Name: "imdsproxy_cache_clock_steps_total",
		Help: "Steps of the wall clock seen by the cache's refresh loop (wall-clock and monotonic time elapsed between two wakes differing by more than 2s), by direction (forward, backward). A host resumed from suspend counts as a forward step.",
	}, []string{"direction"})
	clockSteps.WithLabelValues("forward")
	clockSteps.WithLabelValues("backward")
	m := &metrics{
		hit:          requests.WithLabelValues("hit"),
		stale:        requests.WithLabelValues("stale"),
		miss:         requests.WithLabelValues("miss"),
		errors:       requests.WithLabelValues("error"),
		waitTimeouts: requests.WithLabelValues("wait_timeout"),
		refreshes:    refreshes,
		fetchOK:      duration.WithLabelValues("success"),
		fetchFail:    duration.WithLabelValues("failure"),
		inFlight:     inFlight,
		clockSteps:   clockSteps,
	}
	if reg != nil {
		reg.MustRegister(newEntryCollector(c)) // read at scrape time: not a factory metric
	}
	return m, nil
}

// entryCollector exports the per-key state of Snapshot at scrape time.
type entryCollector[K comparable] struct {
	c                                *Cache[K]
	remaining, nextRefresh, failures *prometheus.Desc
	entries                          *prometheus.Desc
}

func newEntryCollector[K comparable](c *Cache[K]) *entryCollector[K] {
	return &entryCollector[K]{
		c: c,
		remaining: prometheus.NewDesc("imdsproxy_cache_credentials_remaining_seconds",
			"Seconds until the cached credentials of key expire (0 once expired; absent when none).", []string{"key"}, nil),
		nextRefresh: prometheus.NewDesc("imdsproxy_cache_next_refresh_timestamp_seconds",
			"Unix time of the next scheduled upstream fetch for key (absent when none).", []string{"key"}, nil),
		failures: prometheus.NewDesc("imdsproxy_cache_consecutive_failures",
			"Upstream fetch failures for key since its last success.", []string{"key"}, nil),
		entries: prometheus.NewDesc("imdsproxy_cache_entries",
			"Keys held by the cache.", nil, nil),
	}
}

// Describe implements prometheus.Collector.
func (k *entryCollector[K]) Describe(ch chan<- *prometheus.Desc) {
	ch <- k.remaining
	ch <- k.nextRefresh
	ch <- k.failures
	ch <- k.entries
}

// Collect implements prometheus.Collector.
func (k *entryCollector[K]) Collect(ch chan<- prometheus.Metric) {
	now := k.c.now()
	snap := k.c.Snapshot()
	for _, e := range snap {
		if !e.Expires.IsZero() {
			ch <- prometheus.MustNewConstMetric(k.remaining, prometheus.GaugeValue, max(e.Expires.Sub(now).Seconds(), 0), e.Name)
		}
		if !e.NextRefresh.IsZero() {
			ch <- prometheus.MustNewConstMetric(k.nextRefresh, prometheus.GaugeValue, float64(e.NextRefresh.UnixNano())/1e9, e.Name)
		}
		ch <- prometheus.MustNewConstMetric(k.failures, prometheus.GaugeValue, float64(e.ConsecutiveFailures), e.Name)
	}
	ch <- prometheus.MustNewConstMetric(k.entries, prometheus.GaugeValue, float64(len(snap)))
}
