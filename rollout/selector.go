package rollout

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/imdsproxy/imdsproxy/creds"
)

// fallbackWarnEvery rate-limits the Warn line logged when the instance
// profile's credentials are served in place of the workload's.
const fallbackWarnEvery = 30 * time.Second

// shadowTimeout bounds one shadow verification (fetch and verify).
const shadowTimeout = 30 * time.Second

// Source supplies credentials of one kind for a key; the credential cache
// implements it (its Get or an adapter). It must answer from memory whenever
// it holds valid credentials and be safe for concurrent use. Errors may carry
// ErrorClass() string and Permanent() bool (docs/architecture.md); a Selector
// passes them through unchanged.
type Source interface {
	Credentials(ctx context.Context, key string) (creds.Credentials, error)
}

// Verifier checks workload credentials with AWS (sts:GetCallerIdentity) and
// returns the ARN they authenticate as. It must honour ctx and never put a
// secret into its error.
type Verifier interface {
	Verify(ctx context.Context, c creds.Credentials) (arn string, err error)
}

// SelectorConfig configures NewSelector.
type SelectorConfig struct {
	// Workload supplies the workload role's credentials. Required.
	Workload Source
	// WorkloadKey is the key passed to Workload (the cache key): the host's
	// role, and the one shadow verification checks.
	WorkloadKey string
	// WorkloadKeyFor, when set, chooses the key passed to Workload per
	// request while the workload kind is served (per-workload roles: the
	// requesting process's role, from ctx); it must be cheap, safe for
	// concurrent use and return WorkloadKey for a client with no role of
	// its own. Nil: WorkloadKey for every request.
	WorkloadKeyFor func(ctx context.Context) string
	// InstanceProfile supplies the instance profile's credentials. Required.
	InstanceProfile Source
	// InstanceProfileKey is the key passed to InstanceProfile.
	InstanceProfileKey string
	// Fallback is what happens when the workload credentials cannot be
	// obtained: FallbackNone ("" too) or FallbackInstanceProfile.
	Fallback Fallback
	// Host labels imdsproxy_rollout_host_info (its GroupSource; the group
	// is the current Decision's). Optional: GroupSource "" is shown as
	// "unknown".
	Host Host
}

// ShadowStatus is the outcome of the latest shadow verification. It holds no
// secret.
type ShadowStatus struct {
	// LastCheck is when the last verification finished (zero: none yet).
	LastCheck time.Time
	// LastResult is "success", "failure", or "" before the first check.
	LastResult string
	// LastARN is the ARN the workload credentials authenticated as at the
	// last successful check.
	LastARN string
	// LastError is the error of the last check, "" when it succeeded.
	LastError string
}

// Selector is the proxy's CredentialSource under rollout: it serves the
// workload role's or the instance profile's credentials according to the
// current Decision. Create it with NewSelector; all methods are safe for
// concurrent use.
//
// Until the first Set the decision is off (instance profile), with the
// reason "no decision yet", the group of SelectorConfig.Host and the bucket of
// its InstanceID (-1 when that is empty).
type Selector struct {
	cfg SelectorConfig
	log *zap.Logger

	decision atomic.Pointer[Decision]

	mu          sync.Mutex    // guards the fields below
	decided     bool          // Set was called
	wake        chan struct{} // closed and replaced by Set
	shadow      ShadowStatus
	lastWarn    time.Time
	nSuppressed int // fallback warnings suppressed since lastWarn

	served        *prometheus.CounterVec
	fallbacks     prometheus.Counter
	stageChanges  prometheus.Counter
	verifications *prometheus.CounterVec
}

// NewSelector returns a Selector. It registers the selector's metrics with
// reg (nil: none); log may be nil.
func NewSelector(cfg SelectorConfig, log *zap.Logger, reg prometheus.Registerer) (*Selector, error) {
	if cfg.Workload == nil || cfg.InstanceProfile == nil {
		return nil, errors.New("rollout: selector needs both a workload and an instance-profile source")
	}
	fb, err := ParseFallback(string(cfg.Fallback))
	if err != nil {
		return nil, err
	}
	cfg.Fallback = fb
	if log == nil {
		log = zap.NewNop()
	}
	s := &Selector{
		cfg:  cfg,
		log:  log.Named("rollout"),
		wake: make(chan struct{}),
		served: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "imdsproxy_rollout_served_total",
			Help: "Credentials served under rollout, by kind (workload, instance-profile).",
		}, []string{"kind"}),
		fallbacks: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "imdsproxy_rollout_fallbacks_total",
			Help: "Requests served the instance profile's credentials because the workload credentials could not be obtained (rollout.fallback: instance-profile).",
		}),
		stageChanges: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "imdsproxy_rollout_stage_changes_total",
			Help: "Changes of this host's rollout decision (stage, canary percentage or kind served).",
		}),
		verifications: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "imdsproxy_rollout_shadow_verifications_total",
			Help: "Shadow verifications of the workload credentials (sts:GetCallerIdentity), by result (success, failure).",
		}, []string{"result"}),
	}
	for _, k := range []Kind{KindWorkload, KindInstanceProfile} {
		s.served.WithLabelValues(string(k))
	}
	s.verifications.WithLabelValues("success")
	s.verifications.WithLabelValues("failure")
	bucket := -1
	if cfg.Host.InstanceID != "" {
		bucket = Bucket(cfg.Host.InstanceID)
	}
	initial := Decide(&Policy{}, cfg.Host.Group, bucket)
	initial.Reason = "no decision yet: off: instance-profile"
	s.decision.Store(&initial)
	if reg != nil {
		for _, c := range []prometheus.Collector{s.served, s.fallbacks, s.stageChanges, s.verifications, selectorCollector{s}} {
			if err := reg.Register(c); err != nil {
				return nil, fmt.Errorf("rollout: register metrics: %w", err)
			}
		}
	}
	return s, nil
}

// Set makes d the current decision. It takes effect for requests that start
// after it returns. A change of stage, canary percentage or kind served is
// logged and counted.
func (s *Selector) Set(d Decision) {
	old := s.decision.Swap(&d)
	s.mu.Lock()
	first := !s.decided
	s.decided = true
	close(s.wake)
	s.wake = make(chan struct{})
	s.mu.Unlock()

	fields := []zap.Field{
		zap.String("stage", string(d.Stage)), zap.Int("percent", d.Percent),
		zap.String("serve", string(d.Serve)), zap.Bool("shadow", d.Shadow),
		zap.String("group", d.Group), zap.Int("bucket", d.Bucket),
		zap.Bool("kill_switch", d.KillSwitch), zap.String("policy_version", d.PolicyVersion),
		zap.String("reason", d.Reason),
	}
	switch {
	case first:
		s.log.Info("rollout decision", fields...)
	case old.Stage != d.Stage || old.Percent != d.Percent || old.Serve != d.Serve:
		s.stageChanges.Inc()
		s.log.Info("rollout decision changed", append(fields,
			zap.String("from_stage", string(old.Stage)), zap.Int("from_percent", old.Percent),
			zap.String("from_serve", string(old.Serve)))...)
	default:
		s.log.Debug("rollout decision unchanged", fields...)
	}
}

// Decision returns the current decision.
func (s *Selector) Decision() Decision { return *s.decision.Load() }

// Credentials serves credentials according to the current decision, read
// once per request. role is ignored (the proxy has validated it; under
// per-workload roles WorkloadKeyFor chooses the key). With Serve workload,
// when the workload source fails for the key (it holds nothing valid) and
// Fallback is instance-profile, the instance profile's credentials are
// served instead, logged at Warn (rate-limited) and counted; with Fallback
// none the workload error is returned. A cancelled request never falls back.
func (s *Selector) Credentials(ctx context.Context, role string) (creds.Credentials, error) {
	d := s.decision.Load()
	if d.Serve != KindWorkload {
		c, err := s.cfg.InstanceProfile.Credentials(ctx, s.cfg.InstanceProfileKey)
		if err != nil {
			return creds.Credentials{}, err
		}
		s.served.WithLabelValues(string(KindInstanceProfile)).Inc()
		return c, nil
	}
	key := s.cfg.WorkloadKey
	if s.cfg.WorkloadKeyFor != nil {
		key = s.cfg.WorkloadKeyFor(ctx)
	}
	c, err := s.cfg.Workload.Credentials(ctx, key)
	if err == nil {
		s.served.WithLabelValues(string(KindWorkload)).Inc()
		return c, nil
	}
	if s.cfg.Fallback != FallbackInstanceProfile || ctx.Err() != nil {
		return creds.Credentials{}, err
	}
	ipc, ipErr := s.cfg.InstanceProfile.Credentials(ctx, s.cfg.InstanceProfileKey)
	if ipErr != nil {
		s.log.Warn("workload credentials unavailable and the instance-profile fallback failed too",
			zap.String("key", key), zap.Error(err), zap.NamedError("fallback_error", ipErr))
		return creds.Credentials{}, err
	}
	s.fallbacks.Inc()
	s.served.WithLabelValues(string(KindInstanceProfile)).Inc()
	s.warnFallback(key, err)
	return ipc, nil
}

func (s *Selector) warnFallback(key string, err error) {
	now := time.Now()
	s.mu.Lock()
	if !s.lastWarn.IsZero() && now.Sub(s.lastWarn) < fallbackWarnEvery {
		s.nSuppressed++
		s.mu.Unlock()
		return
	}
	suppressed := s.nSuppressed
	s.lastWarn, s.nSuppressed = now, 0
	s.mu.Unlock()
	s.log.Warn("workload credentials unavailable; serving instance-profile credentials (rollout.fallback: instance-profile)",
		zap.String("key", key), zap.Error(err), zap.Int("suppressed", suppressed))
}

// RunShadow verifies the workload credentials while the current decision has
// Shadow set: at once on entering shadow, then every interval, it gets the
// workload credentials from the workload source, calls v.Verify and records
// the outcome (imdsproxy_rollout_shadow_verifications_total, a log line,
// Shadow). Outside shadow it waits for the next Set. It returns nil when ctx
// ends. interval must be positive.
func (s *Selector) RunShadow(ctx context.Context, v Verifier, interval time.Duration) error {
	if v == nil || interval <= 0 {
		return errors.New("rollout: RunShadow needs a verifier and a positive interval")
	}
	var timer *time.Timer
	var timerC <-chan time.Time
	stop := func() {
		if timer != nil {
			timer.Stop()
			timer, timerC = nil, nil
		}
	}
	defer stop()
	inShadow := false
	for {
		s.mu.Lock()
		wake := s.wake
		s.mu.Unlock()
		shadow := s.Decision().Shadow
		switch {
		case shadow && !inShadow:
			inShadow = true
			s.verify(ctx, v)
			stop()
			timer = time.NewTimer(interval)
			timerC = timer.C
		case !shadow && inShadow:
			inShadow = false
			stop()
		}
		select {
		case <-ctx.Done():
			return nil
		case <-wake:
		case <-timerC:
			if s.Decision().Shadow {
				s.verify(ctx, v)
			}
			timer.Reset(interval)
		}
	}
}

func (s *Selector) verify(ctx context.Context, v Verifier) {
	if ctx.Err() != nil {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, shadowTimeout)
	defer cancel()
	arn, err := s.verifyOnce(ctx, v)
	if ctx.Err() != nil && errors.Is(err, context.Canceled) {
		return // shutting down: not a verdict on the credentials
	}
	now := time.Now()
	s.mu.Lock()
	prev := s.shadow.LastResult
	s.shadow.LastCheck = now
	if err != nil {
		s.shadow.LastResult, s.shadow.LastError = "failure", err.Error()
	} else {
		s.shadow.LastResult, s.shadow.LastError, s.shadow.LastARN = "success", "", arn
	}
	s.mu.Unlock()
	if err != nil {
		s.verifications.WithLabelValues("failure").Inc()
		s.log.Warn("shadow verification of the workload credentials failed", zap.Error(err))
		return
	}
	s.verifications.WithLabelValues("success").Inc()
	if prev != "success" {
		s.log.Info("shadow verification of the workload credentials succeeded", zap.String("arn", arn))
	} else {
		s.log.Debug("shadow verification succeeded", zap.String("arn", arn))
	}
}

func (s *Selector) verifyOnce(ctx context.Context, v Verifier) (string, error) {
	c, err := s.cfg.Workload.Credentials(ctx, s.cfg.WorkloadKey)
	if err != nil {
		return "", fmt.Errorf("get workload credentials: %w", err)
	}
	arn, err := v.Verify(ctx, c)
	if err != nil {
		return "", fmt.Errorf("verify workload credentials: %w", err)
	}
	if arn == "" {
		return "", errors.New("verify workload credentials: empty caller ARN")
	}
	if got := creds.AccountFromARN(arn); c.AccountID != "" && got != c.AccountID {
		return arn, fmt.Errorf("verify workload credentials: caller %s is not in the expected account %s", arn, c.AccountID)
	}
	return arn, nil
}

// Shadow returns the outcome of the latest shadow verification.
func (s *Selector) Shadow() ShadowStatus {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.shadow
}

// selectorCollector exports the current decision at scrape time, so every
// series always matches Decision().
type selectorCollector struct{ s *Selector }

var (
	descStage = prometheus.NewDesc("imdsproxy_rollout_stage",
		"This host's rollout stage: 1 for the current stage (off, shadow, canary, on), 0 for the others.", []string{"stage"}, nil)
	descCanaryPercent = prometheus.NewDesc("imdsproxy_rollout_canary_percent",
		"The canary percentage of this host's group when its stage is canary, else 0.", nil, nil)
	descBucket = prometheus.NewDesc("imdsproxy_rollout_bucket_number",
		"This host's canary bucket, 0..9999 (canary N% selects buckets below N*100); -1 when unknown.", nil, nil)
	descHostInfo = prometheus.NewDesc("imdsproxy_rollout_host_info",
		"This host's instance group and where it came from (tag, config, none); always 1.", []string{"group", "group_source"}, nil)
	descKillSwitch = prometheus.NewDesc("imdsproxy_rollout_kill_switch",
		"Whether the rollout policy's kill switch is set (1) or not (0).", nil, nil)
)

// Describe implements prometheus.Collector.
func (c selectorCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descStage, descCanaryPercent, descBucket, descHostInfo, descKillSwitch} {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (c selectorCollector) Collect(ch chan<- prometheus.Metric) {
	d := c.s.Decision()
	for _, st := range Stages {
		ch <- prometheus.MustNewConstMetric(descStage, prometheus.GaugeValue, boolFloat(d.Stage == st), string(st))
	}
	ch <- prometheus.MustNewConstMetric(descCanaryPercent, prometheus.GaugeValue, float64(d.Percent))
	ch <- prometheus.MustNewConstMetric(descBucket, prometheus.GaugeValue, float64(d.Bucket))
	src := c.s.cfg.Host.GroupSource
	if src == "" {
		src = "unknown"
	}
	ch <- prometheus.MustNewConstMetric(descHostInfo, prometheus.GaugeValue, 1, d.Group, src)
	ch <- prometheus.MustNewConstMetric(descKillSwitch, prometheus.GaugeValue, boolFloat(d.KillSwitch))
}
