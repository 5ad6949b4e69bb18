package proxy

import (
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promauto"
)

// Route labels. The set is closed: a route label never carries a path.
const (
	routeToken               = "token"
	routeRoleList            = "role_list"
	routeCredentials         = "credentials"
	routeCredentialsExtended = "credentials_extended"
	routeIAMInfo             = "iam_info"
	routeIAMList             = "iam_list"
	routePassthrough         = "passthrough"
	routeNotFound            = "not_found"
)

// Reasons of imdsproxy_imds_token_rejections_total.
const (
	rejectMissing   = "missing"
	rejectInvalid   = "invalid"
	rejectExpired   = "expired"
	rejectBadTTL    = "bad_ttl"
	rejectForwarded = "forwarded"
)

// Reasons of imdsproxy_passthrough_errors_total.
const (
	ptErrUnreachable = "unreachable"
	ptErrTimeout     = "timeout"
)

// Results of imdsproxy_upstream_token_fetches_total.
const (
	fetchSuccess = "success"
	fetchV1Only  = "v1_only" // upstream answered 403/404/405: IMDSv1-only, no token used
	fetchError   = "error"
)

// durationBuckets go from 50µs (an answer from memory) to 5s (a slow pass-through).
var durationBuckets = []float64{
	0.00005, 0.0001, 0.00025, 0.0005,
	0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
	0.1, 0.25, 0.5, 1, 2.5, 5,
}

// metrics are the collectors of one Server. All labels are bounded.
type metrics struct {
	requests           *prometheus.CounterVec
	duration           *prometheus.HistogramVec
	tokensIssued       prometheus.Counter
	outstanding        prometheus.GaugeFunc
	rejections         *prometheus.CounterVec
	ptErrors           *prometheus.CounterVec
	passthroughRefused *prometheus.CounterVec // imds.passthrough
	upstreamTokens     *prometheus.CounterVec

	// hot caches the children of requests and duration per (route, code),
	// so a request costs no label hashing or formatting; ok holds those of
	// code 200 by route index (routeIndex), the common case, without a
	// hash at all.
	hot sync.Map // routeCode -> *routeMetrics
	ok  [len(routes)]atomic.Pointer[routeMetrics]
}

// routes are the route labels, in routeIndex order.
var routes = [...]string{routeToken, routeRoleList, routeCredentials, routeCredentialsExtended,
	routeIAMInfo, routeIAMList, routePassthrough, routeNotFound}

// routeIndex is route's index in routes, -1 for none.
func routeIndex(route string) int {
	switch route {
	case routeToken:
		return 0
	case routeRoleList:
		return 1
	case routeCredentials:
		return 2
	case routeCredentialsExtended:
		return 3
	case routeIAMInfo:
		return 4
	case routeIAMList:
		return 5
	case routePassthrough:
		return 6
	case routeNotFound:
		return 7
	}
	return -1
}

type routeCode struct {
	route string
	code  int
}

type routeMetrics struct {
	requests prometheus.Counter
	duration prometheus.Observer
}

// newMetrics builds the collectors and registers them with reg (nil: not
// registered anywhere; registering them twice on one registry panics).
// outstanding is called on every scrape.
func newMetrics(reg prometheus.Registerer, outstanding func() float64) (*metrics, error) {
	factory := promauto.With(reg)
	m := &metrics{
		requests: factory.NewCounterVec(prometheus.CounterOpts{
			Name: "imdsproxy_http_requests_total",
			Help: "IMDS HTTP requests answered, by route and HTTP status code.",
		}, []string{"route", "code"}),
		duration: factory.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "imdsproxy_http_request_duration_seconds",
			Help:    "Time to answer an IMDS HTTP request, by route.",
			Buckets: durationBuckets,
		}, []string{"route"}),
		tokensIssued: factory.NewCounter(prometheus.CounterOpts{
			Name: "imdsproxy_imds_tokens_issued_total",
			Help: "IMDSv2 session tokens issued.",
		}),
		outstanding: factory.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "imdsproxy_imds_tokens_outstanding",
			Help: "IMDSv2 session tokens issued by this process and not yet expired.",
		}, outstanding),
		rejections: factory.NewCounterVec(prometheus.CounterOpts{
			Name: "imdsproxy_imds_token_rejections_total",
			Help: "IMDS requests refused because of the session token or the token request, by reason.",
		}, []string{"reason"}),
		passthroughRefused: factory.NewCounterVec(prometheus.CounterOpts{
			Name: "imdsproxy_passthrough_refused_total",
			Help: "Pass-through requests refused by imds.passthrough (identity material, denied paths), by outcome (deny: 403; retry: the client could not be identified, 503).",
		}, []string{"outcome"}),
		ptErrors: factory.NewCounterVec(prometheus.CounterOpts{
			Name: "imdsproxy_passthrough_errors_total",
			Help: "Pass-through requests to the real IMDS that failed, by reason.",
		}, []string{"reason"}),
		upstreamTokens: factory.NewCounterVec(prometheus.CounterOpts{
			Name: "imdsproxy_upstream_token_fetches_total",
			Help: "IMDSv2 token requests the daemon sent to the real IMDS, by result.",
		}, []string{"result"}),
	}
	// Initialise every known label value so that the series exist from the start.
	for _, r := range []string{rejectMissing, rejectInvalid, rejectExpired, rejectBadTTL, rejectForwarded} {
		m.rejections.WithLabelValues(r)
	}
	for _, r := range []string{ptErrUnreachable, ptErrTimeout} {
		m.ptErrors.WithLabelValues(r)
	}
	m.passthroughRefused.WithLabelValues("deny")
	m.passthroughRefused.WithLabelValues("retry")
	for _, r := range []string{fetchSuccess, fetchV1Only, fetchError} {
		m.upstreamTokens.WithLabelValues(r)
	}
	return m, nil
}

// observe records one answered request.
func (m *metrics) observe(route string, code int, d time.Duration) {
	var rm *routeMetrics
	i := routeIndex(route)
	if code == 200 && i >= 0 {
		rm = m.ok[i].Load()
	}
	if rm == nil {
		k := routeCode{route, code}
		v, ok := m.hot.Load(k)
		if !ok {
			v, _ = m.hot.LoadOrStore(k, &routeMetrics{
				requests: m.requests.WithLabelValues(route, strconv.Itoa(code)),
				duration: m.duration.WithLabelValues(route),
			})
		}
		rm = v.(*routeMetrics)
		if code == 200 && i >= 0 {
			m.ok[i].Store(rm)
		}
	}
	rm.requests.Inc()
	rm.duration.Observe(d.Seconds())
}
