package issuer

import (
	"fmt"
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"
)

// metrics are the issuer's Prometheus metrics. Every label is bounded:
// subjects and rule names come from the config, reasons and methods from
// closed sets; never an instance id, an account or a key id.
type metrics struct {
	minted      *prometheus.CounterVec   // subject, rule
	failures    *prometheus.CounterVec   // method, reason
	duration    *prometheus.HistogramVec // method, result
	signing     *prometheus.HistogramVec // key_source
	signErrors  *prometheus.CounterVec   // key_source
	ec2Lookups  *prometheus.CounterVec   // result
	stsCalls    *prometheus.CounterVec   // result
	reloadOK    prometheus.Gauge
	reloadTime  prometheus.Gauge
	keys        prometheus.Gauge
	limiterSize prometheus.GaugeFunc
	stsInFlight prometheus.GaugeFunc
	ready       prometheus.GaugeFunc
}

var methodsLabel = []string{MethodIID, MethodIAM, "unknown"}

// newMetrics registers the issuer's metrics with reg; ready reports what
// /readyz answers, at scrape time.
func newMetrics(reg prometheus.Registerer, lim *limiter, stsInFlight *atomic.Int64, ready func() bool) (*metrics, error) {
	m := &metrics{
		minted: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "imdsproxy_issuer_tokens_minted_total",
			Help: "Tokens minted, by subject (workload) and the policy rule that granted it.",
		}, []string{"subject", "rule"}),
		failures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "imdsproxy_issuer_attestation_failures_total",
			Help: "Token requests refused, by attestation method and reason.",
		}, []string{"method", "reason"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "imdsproxy_issuer_token_request_duration_seconds",
			Help:    "Time to answer POST /v1/token, by attestation method and result (ok or refused).",
			Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5},
		}, []string{"method", "result"}),
		signing: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "imdsproxy_issuer_signing_duration_seconds",
			Help:    "Time to sign one token, by key source (file or kms).",
			Buckets: []float64{.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1},
		}, []string{"key_source"}),
		signErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "imdsproxy_issuer_signing_errors_total",
			Help: "Failed signatures, by key source (file or kms).",
		}, []string{"key_source"}),
		ec2Lookups: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "imdsproxy_issuer_ec2_lookups_total",
			Help: "EC2 DescribeInstances lookups, by result: hit (cache), running, not_running, error.",
		}, []string{"result"}),
		stsCalls: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "imdsproxy_issuer_sts_requests_total",
			Help: "Forwarded sts:GetCallerIdentity requests (aws_iam), by result: ok, denied, error.",
		}, []string{"result"}),
		reloadOK: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "imdsproxy_issuer_config_last_reload_successful",
			Help: "1 when the last configuration load (start or SIGHUP) succeeded, 0 when it failed and the previous configuration was kept.",
		}),
		reloadTime: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "imdsproxy_issuer_config_last_reload_success_timestamp_seconds",
			Help: "Time of the last successful configuration load, Unix seconds.",
		}),
		keys: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "imdsproxy_issuer_published_keys",
			Help: "Keys in the JWKS (the first signs; the others are published for rotation).",
		}),
	}
	m.limiterSize = prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "imdsproxy_issuer_rate_limiter_hosts",
		Help: "Hosts the per-host rate limiter currently tracks.",
	}, func() float64 { return float64(lim.Len()) })
	m.stsInFlight = prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "imdsproxy_issuer_sts_requests_in_flight",
		Help: "Requests forwarded to STS (aws_iam) and not answered yet; at attestation.aws_iam.max_in_flight more are refused (sts_busy).",
	}, func() float64 { return float64(stsInFlight.Load()) })
	m.ready = prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "imdsproxy_issuer_ready",
		Help: "1 while /readyz answers 200, 0 while it answers 503 (draining, or the signing key fails); computed at scrape time.",
	}, func() float64 {
		if ready() {
			return 1
		}
		return 0
	})
	for _, c := range []prometheus.Collector{m.minted, m.failures, m.duration, m.signing, m.signErrors,
		m.ec2Lookups, m.stsCalls, m.reloadOK, m.reloadTime, m.keys, m.limiterSize, m.stsInFlight, m.ready} {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("issuer: register metrics: %w", err)
		}
	}
	for _, meth := range methodsLabel {
		for _, r := range allReasons {
			m.failures.WithLabelValues(meth, r)
		}
	}
	// Every method and result, so that the first requests after a start
	// count in rates (a request rate of 0 beside a refusal rate of 20/s
	// would make a ratio of +Inf). A request whose method is unknown is
	// never minted.
	for _, meth := range []string{MethodIID, MethodIAM} {
		m.duration.WithLabelValues(meth, "ok")
		m.duration.WithLabelValues(meth, "refused")
	}
	m.duration.WithLabelValues("unknown", "refused")
	for _, s := range []string{sourceFile, sourceKMS} {
		m.signErrors.WithLabelValues(s)
	}
	for _, r := range []string{"hit", "running", "not_running", "error"} {
		m.ec2Lookups.WithLabelValues(r)
	}
	for _, r := range []string{"ok", "denied", "error"} {
		m.stsCalls.WithLabelValues(r)
	}
	return m, nil
}
