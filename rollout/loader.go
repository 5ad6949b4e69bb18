package rollout

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
)

// Defaults of LoaderOptions.
const (
	// DefaultInterval is LoaderOptions.Interval when zero.
	DefaultInterval = time.Minute
	// DefaultFetchTimeout bounds one fetch of the policy.
	DefaultFetchTimeout = 30 * time.Second
)

// ObjectGetter reads one object from S3. NewS3Getter returns one built on
// aws-sdk-go-v2; tests use fakes. GetObject must honour ctx, refuse objects
// larger than MaxPolicySize and be safe for concurrent use. Its errors must
// not contain secrets.
type ObjectGetter interface {
	GetObject(ctx context.Context, bucket, key string) (data []byte, etag string, err error)
}

// LoaderOptions tunes a Loader. The zero value is usable for file and
// https:// sources.
type LoaderOptions struct {
	// HTTPClient fetches https:// (and loopback http://) sources. Nil means
	// a client with a 30s timeout that honours HTTP(S)_PROXY.
	HTTPClient *http.Client
	// S3 reads s3://bucket/key sources. Required for those.
	S3 ObjectGetter
	// Interval is the mean time between polls of Run (each jittered ±10%).
	// Zero means DefaultInterval.
	Interval time.Duration
}

// LoadStatus describes the loader's state, for status output. It holds no
// secret.
type LoadStatus struct {
	// Version is the Version of the current policy ("" when none or unset).
	Version string
	// LastLoad is when the last load attempt finished (zero: none yet).
	LastLoad time.Time
	// LastSuccess is when the last successful load finished (zero: none yet).
	LastSuccess time.Time
	// LastError is the error of the last load attempt, "" when it succeeded.
	LastError string
	// Source is the policy source with any user info and query removed.
	Source string
}

// Loader reads a rollout policy from a file, an https:// URL or an S3 object,
// re-reads it on demand (Load) or on an interval (Run), and keeps the last
// good policy when a new one cannot be read or is invalid. Create it with
// NewLoader; all methods are safe for concurrent use.
type Loader struct {
	kind     string // "file" | "http" | "s3"
	source   string // as configured
	redacted string // for logs, errors and status
	bucket   string // s3
	key      string // s3
	client   *http.Client
	s3       ObjectGetter
	interval time.Duration
	log      *zap.Logger
	now      func() time.Time
	rand     func() float64

	loadMu sync.Mutex // serialises Load

	mu          sync.Mutex
	policy      *Policy
	status      LoadStatus
	lastOK      bool
	subscribers []chan struct{}

	loads *prometheus.CounterVec
}

// NewLoader checks the source and returns a Loader for it. source is an
// absolute file path, an https:// URL (http:// only to a loopback address),
// or s3://bucket/key (which needs opts.S3). No policy is read until Load or
// Run. It registers the loader's metrics with reg (nil: none); log may be
// nil.
func NewLoader(source string, opts LoaderOptions, log *zap.Logger, reg prometheus.Registerer) (*Loader, error) {
	if log == nil {
		log = zap.NewNop()
	}
	if opts.Interval < 0 {
		return nil, fmt.Errorf("rollout: negative policy interval %s", opts.Interval)
	}
	if opts.Interval == 0 {
		opts.Interval = DefaultInterval
	}
	l := &Loader{
		source:   source,
		interval: opts.Interval,
		log:      log,
		now:      time.Now,
		rand:     rand.Float64,
	}
	switch {
	case strings.HasPrefix(source, "s3://"):
		rest := strings.TrimPrefix(source, "s3://")
		bucket, key, ok := strings.Cut(rest, "/")
		if !ok || bucket == "" || key == "" || strings.ContainsAny(rest, "?#") {
			return nil, fmt.Errorf("rollout: policy source %q: want s3://bucket/key", source)
		}
		if opts.S3 == nil {
			return nil, fmt.Errorf("rollout: policy source %s: no S3 client configured", source)
		}
		l.kind, l.bucket, l.key, l.s3, l.redacted = "s3", bucket, key, opts.S3, source
	case strings.Contains(source, "://"):
		u, err := url.Parse(source)
		if err != nil || u.Host == "" {
			return nil, fmt.Errorf("rollout: policy source: %q is not a URL", redactURL(source))
		}
		switch {
		case u.Scheme == "https":
		case u.Scheme == "http" && isLoopback(u.Hostname()):
		case u.Scheme == "http":
			return nil, fmt.Errorf("rollout: policy source %s: http:// is allowed only to a loopback address; use https://", redactURL(source))
		default:
			return nil, fmt.Errorf("rollout: policy source %s: want an absolute path, https:// URL or s3://bucket/key", redactURL(source))
		}
		l.kind, l.redacted = "http", redactURL(source)
		l.client = opts.HTTPClient
		if l.client == nil {
			l.client = &http.Client{Timeout: DefaultFetchTimeout}
		}
	case filepath.IsAbs(source):
		l.kind, l.redacted = "file", filepath.Clean(source)
	default:
		return nil, fmt.Errorf("rollout: policy source %q: want an absolute path, https:// URL or s3://bucket/key", source)
	}
	l.status.Source = l.redacted
	l.loads = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "imdsproxy_rollout_policy_loads_total",
		Help: "Rollout policy loads, by result (success, failure). A failed load keeps the last good policy.",
	}, []string{"result"})
	l.loads.WithLabelValues("success")
	l.loads.WithLabelValues("failure")
	if reg != nil {
		for _, c := range []prometheus.Collector{l.loads, loaderCollector{l}} {
			if err := reg.Register(c); err != nil {
				return nil, fmt.Errorf("rollout: register metrics: %w", err)
			}
		}
	}
	return l, nil
}

func isLoopback(host string) bool {
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// redactURL drops user info, query and fragment (a presigned URL carries its
// signature in the query).
func redactURL(s string) string {
	u, err := url.Parse(s)
	if err != nil {
		if i := strings.IndexAny(s, "?#@"); i >= 0 {
			return s[:i] + "…"
		}
		return s
	}
	u.User, u.RawQuery, u.ForceQuery, u.Fragment, u.RawFragment = nil, "", false, "", ""
	return u.String()
}

// Load reads and validates the policy now. On success the policy becomes
// current (and subscribers are signalled if it differs from the previous
// one); on failure the last good policy stays current, the failure is
// counted and logged, and the error is returned. Concurrent calls are
// serialised. The fetch is bounded by DefaultFetchTimeout. When ctx itself
// ends during the fetch, the error is returned but not recorded.
func (l *Loader) Load(ctx context.Context) error {
	l.loadMu.Lock()
	defer l.loadMu.Unlock()
	parent := ctx
	ctx, cancel := context.WithTimeout(ctx, DefaultFetchTimeout)
	defer cancel()

	p, err := l.fetchAndParse(ctx)
	if err != nil && parent.Err() != nil {
		// Cancelled by the caller (shutdown): not a verdict on the policy.
		return fmt.Errorf("rollout: policy %s: %w", l.redacted, parent.Err())
	}
	now := l.now()
	l.mu.Lock()
	l.status.LastLoad = now
	if err != nil {
		err = fmt.Errorf("rollout: policy %s: %w", l.redacted, err)
		l.status.LastError = err.Error()
		l.lastOK = false
		kept := l.status.Version
		had := l.policy != nil
		l.mu.Unlock()
		l.loads.WithLabelValues("failure").Inc()
		l.log.Warn("rollout policy not loaded; keeping the last good one",
			zap.String("source", l.redacted), zap.Error(err),
			zap.Bool("have_policy", had), zap.String("policy_version", kept))
		return err
	}
	changed := l.policy == nil || !reflect.DeepEqual(l.policy, p)
	if changed {
		l.policy = p
	}
	l.status.Version = l.policy.Version
	l.status.LastSuccess = now
	l.status.LastError = ""
	l.lastOK = true
	var subs []chan struct{}
	if changed {
		subs = append(subs, l.subscribers...)
	}
	l.mu.Unlock()
	l.loads.WithLabelValues("success").Inc()
	if changed {
		l.log.Info("rollout policy loaded", zap.String("source", l.redacted),
			zap.String("policy_version", p.Version), zap.Bool("kill_switch", p.KillSwitch),
			zap.Stringer("default", p.Default), zap.Int("groups", len(p.Groups)))
		for _, ch := range subs {
			select {
			case ch <- struct{}{}:
			default:
			}
		}
	} else {
		l.log.Debug("rollout policy unchanged", zap.String("source", l.redacted))
	}
	return nil
}

func (l *Loader) fetchAndParse(ctx context.Context) (*Policy, error) {
	var data []byte
	var err error
	switch l.kind {
	case "file":
		data, err = readFile(l.source)
	case "http":
		data, err = l.fetchHTTP(ctx)
	case "s3":
		data, _, err = l.s3.GetObject(ctx, l.bucket, l.key)
		if err == nil && len(data) > MaxPolicySize {
			err = fmt.Errorf("object is larger than %d bytes", MaxPolicySize)
		}
	}
	if err != nil {
		return nil, err
	}
	return ParsePolicy(data)
}

func readFile(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, MaxPolicySize+1))
	if err != nil {
		return nil, err
	}
	if len(data) > MaxPolicySize {
		return nil, fmt.Errorf("file is larger than %d bytes", MaxPolicySize)
	}
	return data, nil
}

func (l *Loader) fetchHTTP(ctx context.Context) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, l.source, nil)
	if err != nil {
		return nil, errors.New("invalid request URL")
	}
	req.Header.Set("Accept", "application/yaml, text/yaml, text/plain, */*")
	resp, err := l.client.Do(req)
	if err != nil {
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err // the url.Error text repeats the URL, query included
		}
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 4096))
		return nil, fmt.Errorf("HTTP status %d", resp.StatusCode)
	}
	if resp.ContentLength > MaxPolicySize {
		return nil, fmt.Errorf("response is larger than %d bytes", MaxPolicySize)
	}
	data, err := io.ReadAll(io.LimitReader(resp.Body, MaxPolicySize+1))
	if err != nil {
		return nil, fmt.Errorf("read response: %w", err)
	}
	if len(data) > MaxPolicySize {
		return nil, fmt.Errorf("response is larger than %d bytes", MaxPolicySize)
	}
	return data, nil
}

// Run calls Load every Interval (each wait jittered ±10%) until ctx ends,
// then returns nil. It does not load at once: call Load first at start-up.
// Failed loads are logged and counted by Load; Run carries on.
func (l *Loader) Run(ctx context.Context) error {
	for {
		d := time.Duration(float64(l.interval) * (0.9 + 0.2*l.rand()))
		t := time.NewTimer(d)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-t.C:
		}
		_ = l.Load(ctx)
	}
}

// Current returns the current policy and the loader's status. The policy is
// nil until the first successful Load; it is shared and must not be
// modified. Note that Decide(nil, …) means "no rollout configured" (on): a
// daemon that has a policy source but no policy yet should decide with a
// fail-safe policy such as &Policy{} (every host off).
func (l *Loader) Current() (*Policy, LoadStatus) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.policy, l.status
}

// Subscribe returns a channel (capacity 1) that is signalled, without
// blocking, whenever a Load makes a different policy current. A signal may
// stand for several changes; read Current after it.
func (l *Loader) Subscribe() <-chan struct{} {
	ch := make(chan struct{}, 1)
	l.mu.Lock()
	l.subscribers = append(l.subscribers, ch)
	l.mu.Unlock()
	return ch
}

// loaderCollector exports the loader's state at scrape time.
type loaderCollector struct{ l *Loader }

var (
	descLastLoadOK = prometheus.NewDesc("imdsproxy_rollout_policy_last_load_successful",
		"Whether the last rollout policy load succeeded (1) or failed (0; the last good policy stays in force).", nil, nil)
	descLastSuccess = prometheus.NewDesc("imdsproxy_rollout_policy_last_success_timestamp_seconds",
		"Unix time of the last successful rollout policy load (0: none yet).", nil, nil)
	descPolicyInfo = prometheus.NewDesc("imdsproxy_rollout_policy_info",
		"The version of the rollout policy in force (always 1; absent until a policy is loaded).", []string{"version"}, nil)
)

// Describe implements prometheus.Collector.
func (c loaderCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- descLastLoadOK
	ch <- descLastSuccess
	ch <- descPolicyInfo
}

// Collect implements prometheus.Collector.
func (c loaderCollector) Collect(ch chan<- prometheus.Metric) {
	c.l.mu.Lock()
	ok, last, have, version := c.l.lastOK, c.l.status.LastSuccess, c.l.policy != nil, c.l.status.Version
	c.l.mu.Unlock()
	ch <- prometheus.MustNewConstMetric(descLastLoadOK, prometheus.GaugeValue, boolFloat(ok))
	ts := 0.0
	if !last.IsZero() {
		ts = float64(last.UnixNano()) / 1e9
	}
	ch <- prometheus.MustNewConstMetric(descLastSuccess, prometheus.GaugeValue, ts)
	if have {
		ch <- prometheus.MustNewConstMetric(descPolicyInfo, prometheus.GaugeValue, 1, version)
	}
}

func boolFloat(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
