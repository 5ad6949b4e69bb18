package rollout

import (
	"context"
	"crypto/ed25519"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promauto"
	"go.uber.org/zap"

	"github.com/imdsproxy/imdsproxy/creds"
)

// Source supplies credentials by key (the credential cache). It must answer
// from memory whenever it holds valid credentials and be safe for
// concurrent use.
type Source interface {
	Get(ctx context.Context, key creds.Key) (creds.Credentials, error)
}

// Verifier checks workload credentials with AWS (sts:GetCallerIdentity) and
// returns the ARN they authenticate as. It must honour ctx and never put a
// secret into its error.
type Verifier interface {
	Verify(ctx context.Context, c creds.Credentials) (arn string, err error)
}

// shadowTimeout bounds one shadow verification (fetch and verify).
const shadowTimeout = 30 * time.Second

// loadTimeout bounds the policy read of Configure.
const loadTimeout = 10 * time.Second

// offPolicy is in force until a policy has been loaded: the zero policy puts
// every host off, so it keeps the instance profile's credentials, as before
// the rollout.
var offPolicy = &Policy{}

// Settings is what a configuration generation gives the Controller.
type Settings struct {
	// Config is the validated rollout: section.
	Config Section
	// S3 reads an s3:// policy (built with the instance profile's
	// credentials); nil for other sources.
	S3 ObjectGetter
	// ShadowKey is the key of the host's workload role, which the shadow
	// stage verifies.
	ShadowKey creds.Key
	// PolicyKeys verify the policy's signature (rollout.policy_keys); none:
	// policies are not signed.
	PolicyKeys []ed25519.PublicKey
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

// state is one immutable view of the Controller: what Decision, Status and
// the metrics read.
type state struct {
	enabled  bool
	settings Settings
	host     Host
	bucket   int
	loader   *Loader
	decision Decision
}

// Controller is the rollout machinery of one daemon: it keeps the policy of
// its current Settings loaded (re-read every poll interval, at once on
// Configure), decides what this host serves from the policy, the host's
// group and its bucket, reports every change on Changed, and verifies the
// workload credentials while the decision is shadow. Create it with
// NewController; all methods are safe for concurrent use. Configure may be
// called any number of times (every reload): a rollout can be enabled,
// disabled or pointed at another policy source while the daemon runs.
type Controller struct {
	md         TagReader
	instanceID string
	log        *zap.Logger

	mu   sync.Mutex // serialises Configure and recompute
	cur  atomic.Pointer[state]
	swap chan struct{} // closed when the loader changes; guarded by mu

	changed chan struct{} // capacity 1

	shadowMu   sync.Mutex
	shadow     ShadowStatus
	shadowWake chan struct{} // closed and replaced on every decision change; guarded by shadowMu

	loads         *prometheus.CounterVec
	refused       *prometheus.CounterVec
	stageChanges  prometheus.Counter
	verifications *prometheus.CounterVec
}

// NewController returns a Controller, disabled until Configure enables it.
// md reads the instance's tags and instanceID is the instance id read once
// by the daemon ("" when unknown: the host name stands in). It registers
// the rollout metrics with reg (nil: none); log may be nil.
func NewController(md TagReader, instanceID string, log *zap.Logger, reg prometheus.Registerer) (*Controller, error) {
	if log == nil {
		log = zap.NewNop()
	}
	factory := promauto.With(reg)
	c := &Controller{
		md: md, instanceID: instanceID, log: log,
		swap:       make(chan struct{}),
		changed:    make(chan struct{}, 1),
		shadowWake: make(chan struct{}),
		stageChanges: factory.NewCounter(prometheus.CounterOpts{
			Name: "imdsproxy_rollout_stage_changes_total",
			Help: "Changes of this host's rollout decision (stage, canary percentage or kind served).",
		}),
		verifications: factory.NewCounterVec(prometheus.CounterOpts{
			Name: "imdsproxy_rollout_shadow_verifications_total",
			Help: "Shadow verifications of the workload credentials (sts:GetCallerIdentity), by result (success, failure).",
		}, []string{"result"}),
	}
	c.loads, c.refused = loadCounters()
	c.verifications.WithLabelValues("success")
	c.verifications.WithLabelValues("failure")
	c.cur.Store(&state{bucket: -1})
	if reg != nil {
		reg.MustRegister(c.loads, c.refused, collector{c})
	}
	return c, nil
}

// Configure applies s: with a policy source it reads the instance group
// (again, when the tag or the group changed), switches to s's policy source
// when it differs from the current one, reads the policy now (bounded;
// a failure is logged and the last good policy of that source, or none —
// every host off — stays in force) and decides. Without one the rollout is
// disabled. It returns the decision in force and whether the rollout is
// enabled. It fails, changing nothing, only when the group cannot be read.
func (c *Controller) Configure(ctx context.Context, s Settings) (Decision, bool, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	old := c.cur.Load()
	next := &state{enabled: s.Config.Enabled(), settings: s, host: old.host, bucket: old.bucket, loader: old.loader}
	if !next.enabled {
		next.loader, next.bucket = nil, -1
		c.publish(old, next)
		return next.decision, false, nil
	}
	oc, nc := old.settings.Config, s.Config
	if !old.enabled || oc.GroupTag != nc.GroupTag || oc.Group != nc.Group {
		host, err := DetectHost(ctx, c.md, c.instanceID, nc.GroupTag, nc.Group)
		if err != nil {
			return old.decision, old.enabled, err
		}
		next.host, next.bucket = host, Bucket(host.InstanceID)
		c.log.Info("rollout host", zap.String("instance_id", host.InstanceID), zap.String("id_source", host.IDSource),
			zap.String("group", host.Group), zap.String("group_source", host.GroupSource), zap.Int("bucket", next.bucket))
		if host.IDSource == IDFromHostname {
			c.log.Warn("the instance id could not be read; the canary bucket is derived from the host name")
		}
	}
	if next.loader == nil || oc.Policy != nc.Policy || oc.PollInterval != nc.PollInterval || (nc.S3() && s.S3 != old.settings.S3) ||
		!slices.EqualFunc(s.PolicyKeys, old.settings.PolicyKeys, func(a, b ed25519.PublicKey) bool { return a.Equal(b) }) {
		l, err := NewLoader(nc.Policy, LoaderOptions{S3: s.S3, Interval: nc.PollInterval.D(), PolicyKeys: s.PolicyKeys}, c.log, nil)
		if err != nil {
			return old.decision, old.enabled, err
		}
		l.loads, l.refused = c.loads, c.refused
		next.loader = l
	}
	lctx, cancel := context.WithTimeout(ctx, loadTimeout)
	err := next.loader.Load(lctx)
	cancel()
	if err != nil && next.loader != old.loader {
		c.log.Warn("rollout policy not loaded from the new source; every host is off until it is", zap.Error(err))
	}
	c.publish(old, next)
	return next.decision, true, nil
}

// publish decides for next, makes it current and reports a change. c.mu
// must be held.
func (c *Controller) publish(old, next *state) {
	if next.enabled {
		p, _ := next.loader.Current()
		if p == nil {
			p = offPolicy
		}
		next.decision = Decide(p, next.host.Group, next.bucket)
	}
	c.cur.Store(next)
	if next.loader != old.loader {
		close(c.swap)
		c.swap = make(chan struct{})
	}
	d, o := next.decision, old.decision
	fields := []zap.Field{
		zap.Bool("enabled", next.enabled), zap.String("stage", string(d.Stage)), zap.Int("percent", d.Percent),
		zap.String("serve", string(d.Serve)), zap.Bool("shadow", d.Shadow),
		zap.String("group", d.Group), zap.Int("bucket", d.Bucket),
		zap.Bool("kill_switch", d.KillSwitch), zap.String("policy_version", d.PolicyVersion),
		zap.String("reason", d.Reason),
	}
	switch {
	case next.enabled != old.enabled || d.Stage != o.Stage || d.Percent != o.Percent || d.Serve != o.Serve:
		if old.enabled && next.enabled {
			c.stageChanges.Inc()
		}
		c.log.Info("rollout decision", append(fields, zap.String("from_stage", string(o.Stage)),
			zap.String("from_serve", string(o.Serve)))...)
	case d != o:
		c.log.Info("rollout decision", fields...)
	}
	if d != o || next.enabled != old.enabled || next.settings.ShadowKey != old.settings.ShadowKey {
		select {
		case c.changed <- struct{}{}:
		default:
		}
		c.shadowMu.Lock()
		close(c.shadowWake)
		c.shadowWake = make(chan struct{})
		c.shadowMu.Unlock()
	}
}

// Decision returns the decision in force and whether the rollout is
// enabled (without a rollout the zero Decision is returned).
func (c *Controller) Decision() (Decision, bool) {
	st := c.cur.Load()
	return st.decision, st.enabled
}

// Changed is signalled (without blocking; one signal may stand for
// several changes) whenever the decision or the enablement changes; read
// Decision after it.
func (c *Controller) Changed() <-chan struct{} { return c.changed }

// Reload re-reads the policy now (SIGHUP); a change is reported on
// Changed. Nothing happens while the rollout is disabled.
func (c *Controller) Reload(ctx context.Context) {
	if l := c.cur.Load().loader; l != nil {
		_ = l.Load(ctx)
		c.recompute()
	}
}

// recompute decides again with the current policy and reports a change.
func (c *Controller) recompute() {
	c.mu.Lock()
	defer c.mu.Unlock()
	old := c.cur.Load()
	if !old.enabled {
		return
	}
	next := *old
	c.publish(old, &next)
}

// Run keeps the current policy source polled and applies every policy
// change, until ctx ends; then it returns nil. It follows Configure: a new
// source is polled from the moment it is configured.
func (c *Controller) Run(ctx context.Context) error {
	for {
		c.mu.Lock()
		l, swap := c.cur.Load().loader, c.swap
		c.mu.Unlock()
		if l == nil {
			select {
			case <-ctx.Done():
				return nil
			case <-swap:
				continue
			}
		}
		lctx, cancel := context.WithCancel(ctx)
		changes := l.Subscribe()
		done := make(chan struct{})
		go func() { _ = l.Run(lctx); close(done) }()
	poll:
		for {
			select {
			case <-ctx.Done():
				cancel()
				<-done
				return nil
			case <-swap:
				break poll
			case <-changes:
				c.recompute()
			}
		}
		cancel()
		<-done
	}
}

// RunShadow verifies the workload credentials (the Settings' ShadowKey,
// from src) while the decision in force is shadow: at once on entering
// shadow, then every shadow interval, it gets them, calls v.Verify and
// records the outcome (imdsproxy_rollout_shadow_verifications_total, a log
// line, Status). Outside shadow it waits for the next change. It returns nil
// when ctx ends.
func (c *Controller) RunShadow(ctx context.Context, v Verifier, src Source) error {
	if v == nil || src == nil {
		return errors.New("rollout: RunShadow needs a verifier and a source")
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
		c.shadowMu.Lock()
		wake := c.shadowWake
		c.shadowMu.Unlock()
		st := c.cur.Load()
		shadow := st.enabled && st.decision.Shadow
		switch {
		case shadow && !inShadow:
			inShadow = true
			c.verify(ctx, v, src, st.settings.ShadowKey)
			stop()
			timer = time.NewTimer(st.settings.Config.ShadowInterval.D())
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
			st := c.cur.Load()
			if st.enabled && st.decision.Shadow {
				c.verify(ctx, v, src, st.settings.ShadowKey)
			}
			timer.Reset(st.settings.Config.ShadowInterval.D())
		}
	}
}

func (c *Controller) verify(ctx context.Context, v Verifier, src Source, key creds.Key) {
	if ctx.Err() != nil {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, shadowTimeout)
	defer cancel()
	arn, err := verifyOnce(ctx, v, src, key)
	if ctx.Err() != nil && errors.Is(err, context.Canceled) {
		return // shutting down: not a verdict on the credentials
	}
	now := time.Now()
	c.shadowMu.Lock()
	prev := c.shadow.LastResult
	c.shadow.LastCheck = now
	if err != nil {
		c.shadow.LastResult, c.shadow.LastError = "failure", err.Error()
	} else {
		c.shadow.LastResult, c.shadow.LastError, c.shadow.LastARN = "success", "", arn
	}
	c.shadowMu.Unlock()
	if err != nil {
		c.verifications.WithLabelValues("failure").Inc()
		c.log.Warn("shadow verification of the workload credentials failed", zap.Stringer("key", key), zap.Error(err))
		return
	}
	c.verifications.WithLabelValues("success").Inc()
	if prev != "success" {
		c.log.Info("shadow verification of the workload credentials succeeded", zap.String("arn", arn))
	} else {
		c.log.Debug("shadow verification succeeded", zap.String("arn", arn))
	}
}

func verifyOnce(ctx context.Context, v Verifier, src Source, key creds.Key) (string, error) {
	if key.IsZero() {
		return "", errors.New("no workload role to verify")
	}
	cr, err := src.Get(ctx, key)
	if err != nil {
		return "", fmt.Errorf("get workload credentials: %w", err)
	}
	arn, err := v.Verify(ctx, cr)
	if err != nil {
		return "", fmt.Errorf("verify workload credentials: %w", err)
	}
	if arn == "" {
		return "", errors.New("verify workload credentials: empty caller ARN")
	}
	if got := creds.AccountFromARN(arn); cr.AccountID != "" && got != cr.AccountID {
		return arn, fmt.Errorf("verify workload credentials: caller %s is not in the expected account %s", arn, cr.AccountID)
	}
	return arn, nil
}

// Status is the rollout part of the daemon's status: never a secret.
type Status struct {
	Enabled     bool         `json:"enabled"`
	Stage       Stage        `json:"stage,omitempty"`
	Percent     int          `json:"percent"`
	Group       string       `json:"group,omitempty"`
	GroupSource string       `json:"group_source,omitempty"`
	Bucket      int          `json:"bucket"`
	Serve       Kind         `json:"serve,omitempty"`
	Shadow      bool         `json:"shadow"`
	KillSwitch  bool         `json:"kill_switch"`
	Reason      string       `json:"reason,omitempty"`
	Fallback    string       `json:"fallback,omitempty"`
	Policy      PolicyStatus `json:"policy"`
	ShadowCheck ShadowJSON   `json:"shadow_status"`
}

// PolicyStatus is the policy part of Status.
type PolicyStatus struct {
	Source      string `json:"source"`
	Version     string `json:"version"`
	LastLoad    string `json:"last_load"`
	LastSuccess string `json:"last_success"`
	LastError   string `json:"last_error"`
}

// ShadowJSON is the shadow part of Status.
type ShadowJSON struct {
	LastCheck  string `json:"last_check"`
	LastResult string `json:"last_result"`
	LastARN    string `json:"last_arn"`
	LastError  string `json:"last_error"`
}

// Status returns the rollout's state for /debug/status.
func (c *Controller) Status() Status {
	st := c.cur.Load()
	if !st.enabled {
		return Status{Bucket: -1}
	}
	d := st.decision
	out := Status{
		Enabled: true, Stage: d.Stage, Percent: d.Percent, Group: st.host.Group, GroupSource: st.host.GroupSource,
		Bucket: st.bucket, Serve: d.Serve, Shadow: d.Shadow, KillSwitch: d.KillSwitch, Reason: d.Reason,
		Fallback: st.settings.Config.Fallback,
	}
	_, ls := st.loader.Current()
	out.Policy = PolicyStatus{Source: ls.Source, Version: ls.Version, LastLoad: rfc3339(ls.LastLoad),
		LastSuccess: rfc3339(ls.LastSuccess), LastError: ls.LastError}
	c.shadowMu.Lock()
	sh := c.shadow
	c.shadowMu.Unlock()
	out.ShadowCheck = ShadowJSON{LastCheck: rfc3339(sh.LastCheck), LastResult: sh.LastResult, LastARN: sh.LastARN, LastError: sh.LastError}
	return out
}

// Shadow returns the outcome of the latest shadow verification.
func (c *Controller) Shadow() ShadowStatus {
	c.shadowMu.Lock()
	defer c.shadowMu.Unlock()
	return c.shadow
}

func rfc3339(t time.Time) string {
	if t.IsZero() {
		return ""
	}
	return t.UTC().Format(time.RFC3339)
}

// collector exports the current state at scrape time, so every series
// always matches Decision; nothing but the counters while disabled.
type collector struct{ c *Controller }

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
	descEnabled = prometheus.NewDesc("imdsproxy_rollout_enabled",
		"Whether a rollout policy decides what this host serves (1) or not (0: rollout.policy is not set).", nil, nil)
)

// Describe implements prometheus.Collector.
func (k collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descStage, descCanaryPercent, descBucket, descHostInfo, descKillSwitch, descEnabled,
		descLastLoadOK, descLastSuccess, descPolicyInfo} {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (k collector) Collect(ch chan<- prometheus.Metric) {
	st := k.c.cur.Load()
	ch <- prometheus.MustNewConstMetric(descEnabled, prometheus.GaugeValue, boolFloat(st.enabled))
	if !st.enabled {
		return
	}
	d := st.decision
	for _, s := range Stages {
		ch <- prometheus.MustNewConstMetric(descStage, prometheus.GaugeValue, boolFloat(d.Stage == s), string(s))
	}
	ch <- prometheus.MustNewConstMetric(descCanaryPercent, prometheus.GaugeValue, float64(d.Percent))
	ch <- prometheus.MustNewConstMetric(descBucket, prometheus.GaugeValue, float64(d.Bucket))
	src := st.host.GroupSource
	if src == "" {
		src = "unknown"
	}
	ch <- prometheus.MustNewConstMetric(descHostInfo, prometheus.GaugeValue, 1, d.Group, src)
	ch <- prometheus.MustNewConstMetric(descKillSwitch, prometheus.GaugeValue, boolFloat(d.KillSwitch))
	loaderCollector{st.loader}.Collect(ch)
}
