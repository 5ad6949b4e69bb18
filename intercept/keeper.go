package intercept

import (
	"context"
	"errors"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promauto"
	"go.uber.org/zap"
)

// Metrics are the metrics of a Keeper. Create them with NewMetrics; the zero
// value is not usable.
type Metrics struct {
	present prometheus.Gauge
	repairs prometheus.Counter
	errs    prometheus.Counter
}

// NewMetrics builds the metrics and registers them with reg (nil: not
// registered): imdsproxy_intercept_rules_present (gauge; 0 until a Keeper
// finds or puts the rules in place, so 0 when interception is off),
// imdsproxy_intercept_repairs_total and imdsproxy_intercept_check_errors_total.
func NewMetrics(reg prometheus.Registerer) (*Metrics, error) {
	factory := promauto.With(reg)
	m := &Metrics{
		present: factory.NewGauge(prometheus.GaugeOpts{
			Name: "imdsproxy_intercept_rules_present",
			Help: "1 if the last check found the interception rules present and correct (or repaired them), else 0.",
		}),
		repairs: factory.NewCounter(prometheus.CounterOpts{
			Name: "imdsproxy_intercept_repairs_total",
			Help: "Times the interception rules were found missing or altered and reinstalled.",
		}),
		errs: factory.NewCounter(prometheus.CounterOpts{
			Name: "imdsproxy_intercept_check_errors_total",
			Help: "Checks or repairs of the interception rules that failed (for example without CAP_NET_ADMIN).",
		}),
	}

	return m, nil
}

// Keeper checks the rules periodically and repairs them when they are missing
// or altered. Create it with NewKeeper; Run it once.
type Keeper struct {
	r        *Rules
	interval time.Duration
	log      *zap.Logger
	*Metrics
}

// NewKeeper returns a Keeper of r that checks every interval (> 0), logs to
// log (nil: no logging) and updates m (nil: metrics of its own, unregistered).
func NewKeeper(r *Rules, interval time.Duration, log *zap.Logger, m *Metrics) (*Keeper, error) {
	if r == nil {
		return nil, errors.New("intercept: nil rules")
	}
	if interval <= 0 {
		return nil, errors.New("intercept: check interval must be positive")
	}
	if log == nil {
		log = zap.NewNop()
	}
	if m == nil {
		m, _ = NewMetrics(nil)
	}
	return &Keeper{r: r, interval: interval, log: log, Metrics: m}, nil
}

// Run checks at once and then every interval until ctx ends; it always
// returns nil (failures are logged and counted, and retried next time).
func (k *Keeper) Run(ctx context.Context) error {
	k.log.Info("keeping interception rules", zap.String("table", "inet "+TableName),
		zap.Duration("check_interval", k.interval), zap.Uint32("exempt_uid", k.r.cfg.ExemptUID))
	t := time.NewTicker(k.interval)
	defer t.Stop()
	for {
		k.CheckOnce()
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

// CheckOnce checks the rules and repairs them if needed. It reports whether
// the rules are in place afterwards.
func (k *Keeper) CheckOnce() bool {
	st, err := k.r.Ensure()
	if err != nil {
		k.errs.Inc()
		k.present.Set(0)
		k.log.Error("cannot check or repair the interception rules", zap.Error(err))
		return false
	}
	if st.State != Present {
		k.repairs.Inc()
		k.log.Warn("interception rules were missing or altered; reinstalled",
			zap.String("table", "inet "+TableName), zap.Stringer("found", st.State), zap.String("detail", st.Detail))
	}
	k.present.Set(1)
	return true
}
