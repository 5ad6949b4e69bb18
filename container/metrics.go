package container

import (
	"strconv"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promauto"
)

// Reasons of imdsproxy_container_rejections_total: requests refused before
// any access decision.
const (
	rejectMethod   = "method"      // not GET: 405
	rejectPath     = "path"        // not the configured path, or a query: 404
	rejectHost     = "host"        // Host header not this endpoint: 403
	rejectRequest  = "bad_request" // a body, chunked framing, an over-long URI: 400/413/414
	rejectNoToken  = "missing_token"
	rejectBadToken = "invalid_token" // unknown, replaced past its overlap, malformed
)

var rejectReasons = []string{rejectMethod, rejectPath, rejectHost, rejectRequest, rejectNoToken, rejectBadToken}

// durationBuckets go from 50µs (an answer from memory) to 5s.
var durationBuckets = []float64{0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5}

// metrics are the endpoint's and the tokens' collectors; labels are bounded.
type metrics struct {
	requests    *prometheus.CounterVec
	duration    prometheus.Histogram
	rejections  *prometheus.CounterVec
	rotations   prometheus.Counter
	writeErrors prometheus.Counter
	tokens      prometheus.Gauge
	idleClosed  prometheus.Counter
	overShare   prometheus.Counter

	hot sync.Map // code -> prometheus.Counter
}

// newMetrics builds the collectors and registers them with reg (nil: not
// registered).
func newMetrics(reg prometheus.Registerer) *metrics {
	f := promauto.With(reg)
	m := &metrics{
		requests: f.NewCounterVec(prometheus.CounterOpts{
			Name: "imdsproxy_container_requests_total",
			Help: "Requests answered by the container credentials endpoint, by HTTP status code.",
		}, []string{"code"}),
		duration: f.NewHistogram(prometheus.HistogramOpts{
			Name:    "imdsproxy_container_request_duration_seconds",
			Help:    "Time to answer a request of the container credentials endpoint.",
			Buckets: durationBuckets,
		}),
		rejections: f.NewCounterVec(prometheus.CounterOpts{
			Name: "imdsproxy_container_rejections_total",
			Help: "Container endpoint requests refused before the access decision, by reason (missing_token, invalid_token, method, path, host, bad_request).",
		}, []string{"reason"}),
		idleClosed: f.NewCounter(prometheus.CounterOpts{
			Name: "imdsproxy_container_idle_connections_closed_total",
			Help: "Keep-alive connections of the container credentials endpoint closed while idle to make room for a new one at the connection limit.",
		}),
		overShare: f.NewCounter(prometheus.CounterOpts{
			Name: "imdsproxy_container_connections_over_share_total",
			Help: "New connections of the container credentials endpoint closed at once because their uid already held a quarter of the connection slots while more than half were taken.",
		}),
		rotations: f.NewCounter(prometheus.CounterOpts{
			Name: "imdsproxy_container_token_rotations_total",
			Help: "Rotations of every workload's authorization token (scheduled and SIGUSR1).",
		}),
		writeErrors: f.NewCounter(prometheus.CounterOpts{
			Name: "imdsproxy_container_token_write_errors_total",
			Help: "Token files that could not be written (the workload keeps its previous token).",
		}),
		tokens: f.NewGauge(prometheus.GaugeOpts{
			Name: "imdsproxy_container_tokens",
			Help: "Authorization tokens accepted now: one per workload, and the replaced ones within their overlap.",
		}),
	}
	for _, r := range rejectReasons {
		m.rejections.WithLabelValues(r)
	}
	return m
}

func (m *metrics) observe(code int, d time.Duration) {
	v, ok := m.hot.Load(code)
	if !ok {
		v, _ = m.hot.LoadOrStore(code, m.requests.WithLabelValues(strconv.Itoa(code)))
	}
	v.(prometheus.Counter).Inc()
	m.duration.Observe(d.Seconds())
}
