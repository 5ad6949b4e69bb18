package rollout

import (
	"context"
	"crypto/ed25519"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/imdsproxy/imdsproxy/config"
)

// Defaults of LoaderOptions.
const (
	// DefaultInterval is LoaderOptions.Interval when zero.
	DefaultInterval = time.Minute
	// DefaultFetchTimeout bounds one fetch of the policy.
	DefaultFetchTimeout = 30 * time.Second
	// sigRetryDelay is the pause before the policy and its signature are
	// fetched again when they do not match (a publication under way).
	sigRetryDelay = 2 * time.Second
)

// Reasons a policy load fails: LoadError.Reason, LoadStatus.Reason and,
// for every reason but ReasonUnavailable, the reason label of
// imdsproxy_rollout_policy_refused_total. Bounded.
const (
	// ReasonUnavailable: the policy or its signature could not be read (a
	// missing file, a network error, an HTTP status other than 200, an S3
	// error). Nothing was refused: nothing arrived.
	ReasonUnavailable = "unavailable"
	// ReasonTooLarge: the policy is larger than MaxPolicySize; reading
	// stopped there.
	ReasonTooLarge = "too_large"
	// ReasonInvalid: the policy does not parse or validate (ParsePolicy).
	ReasonInvalid = "invalid"
	// ReasonUnsigned: signatures are required (LoaderOptions.PolicyKeys)
	// and there is no signature file (no such file, HTTP 404 or 410, S3
	// NoSuchKey).
	ReasonUnsigned = "unsigned"
	// ReasonBadSignature: the signature file is malformed or larger than
	// MaxSignatureSize, or no signature in it verifies with a configured
	// key.
	ReasonBadSignature = "bad_signature"
	// ReasonUnknownKey: every signature names a key id that is not
	// configured.
	ReasonUnknownKey = "unknown_key"
	// ReasonUnsafeFile: a local policy file (or its directory) that someone
	// other than root or the daemon's user may write, or that is owned by
	// someone else, or that is not a regular file.
	ReasonUnsafeFile = "unsafe_file"
)

// refusalReasons are the reason label values of
// imdsproxy_rollout_policy_refused_total.
var refusalReasons = []string{ReasonTooLarge, ReasonInvalid, ReasonUnsigned, ReasonBadSignature, ReasonUnknownKey, ReasonUnsafeFile}

// LoadError is a failed policy load with its bounded Reason. Its message
// is Err's; it never contains the policy or a URL's query.
type LoadError struct {
	// Reason is one of the Reason constants.
	Reason string
	// Err says what failed.
	Err error
}

// Error returns Err's message.
func (e *LoadError) Error() string { return e.Err.Error() }

// Unwrap returns Err.
func (e *LoadError) Unwrap() error { return e.Err }

// loadErr classifies err as reason unless it is a *LoadError already.
func loadErr(reason string, err error) error {
	var le *LoadError
	if err == nil || errors.As(err, &le) {
		return err
	}
	return &LoadError{Reason: reason, Err: err}
}

// ErrObjectNotFound is what an ObjectGetter's error wraps when the object
// does not exist (S3 NoSuchKey): a missing signature is then "unsigned",
// not "unavailable". It is fs.ErrNotExist, so that a getter need not import
// this package.
var ErrObjectNotFound = fs.ErrNotExist

// ObjectGetter reads one object from S3; exchange.S3Objects is the one built
// on aws-sdk-go-v2, tests use fakes. GetObject must honour ctx, read at most
// max+1 bytes (a longer object is returned cut there, or refused with an
// error that has a method TooLarge() bool returning true; the caller refuses
// it), wrap ErrObjectNotFound when the object does not exist, and be safe for
// concurrent use. Its errors must not contain secrets.
type ObjectGetter interface {
	GetObject(ctx context.Context, bucket, key string, max int64) (data []byte, etag string, err error)
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
	// PolicyKeys are the Ed25519 public keys a policy's detached signature
	// must verify with (see ParseSignatureFile, VerifyPolicy): several for
	// a key rotation. Empty: signatures are neither required nor read.
	// ParsePublicKeys reads them from configuration.
	PolicyKeys []ed25519.PublicKey
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
	// Reason is the Reason of LastError, "" when the last load succeeded.
	Reason string
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
	keys     []ed25519.PublicKey
	log      *zap.Logger
	now      func() time.Time
	rand     func() float64

	sigRetryDelay time.Duration

	loadMu sync.Mutex // serialises Load

	mu          sync.Mutex
	policy      *Policy
	status      LoadStatus
	lastOK      bool
	subscribers []chan struct{}

	loads   *prometheus.CounterVec
	refused *prometheus.CounterVec
}

// NewLoader checks the source and returns a Loader for it. source is an
// absolute file path, an https:// URL (http:// only to a loopback address),
// or s3://bucket/key (which needs opts.S3). No policy is read until Load or
// Run. With opts.PolicyKeys, every policy must come with a signature
// beside it (see VerifyPolicy): the source with ".sig" appended to the file
// name, the URL's path or the S3 key. It registers the loader's metrics
// with reg (nil: none); log may be nil.
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
	for i, k := range opts.PolicyKeys {
		if len(k) != ed25519.PublicKeySize {
			return nil, fmt.Errorf("rollout: policy key %d: %d bytes, want an Ed25519 key of %d", i+1, len(k), ed25519.PublicKeySize)
		}
	}
	l := &Loader{
		source:        source,
		interval:      opts.Interval,
		keys:          append([]ed25519.PublicKey(nil), opts.PolicyKeys...),
		log:           log,
		now:           time.Now,
		rand:          rand.Float64,
		sigRetryDelay: sigRetryDelay,
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
			return nil, fmt.Errorf("rollout: policy source: %q is not a URL", config.RedactURL(source))
		}
		switch {
		case u.Scheme == "https":
		case u.Scheme == "http" && config.IsLoopbackHost(u.Hostname()):
		case u.Scheme == "http":
			return nil, fmt.Errorf("rollout: policy source %s: http:// is allowed only to a loopback address; use https://", config.RedactURL(source))
		default:
			return nil, fmt.Errorf("rollout: policy source %s: want an absolute path, https:// URL or s3://bucket/key", config.RedactURL(source))
		}
		l.kind, l.redacted = "http", config.RedactURL(source)
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
	l.loads, l.refused = loadCounters()
	if reg != nil {
		reg.MustRegister(l.loads, l.refused, loaderCollector{l})
	}
	return l, nil
}

// loadCounters are a loader's load and refusal counters; a Controller
// shares one pair across the loaders of its successive policy sources.
func loadCounters() (loads, refused *prometheus.CounterVec) {
	loads = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "imdsproxy_rollout_policy_loads_total",
		Help: "Rollout policy loads, by result (success, failure). A failed load keeps the last good policy.",
	}, []string{"result"})
	loads.WithLabelValues("success")
	loads.WithLabelValues("failure")
	refused = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "imdsproxy_rollout_policy_refused_total",
		Help: "Rollout policies read but refused, by reason (too_large, invalid, unsigned, bad_signature, unknown_key, unsafe_file). Each is also a loads_total failure; the last good policy stays.",
	}, []string{"reason"})
	for _, r := range refusalReasons {
		refused.WithLabelValues(r)
	}
	return loads, refused
}

// Load reads and validates the policy now: it reads the policy (at most
// MaxPolicySize bytes; a local file must be safe, see ReasonUnsafeFile),
// with PolicyKeys its signature, verifies the signature before anything
// parses the policy, then parses it. On success the policy becomes
// current (and subscribers are signalled if it differs from the previous
// one); on failure the last good policy stays current, the failure is
// counted (loads_total{result="failure"} and, when something was read but
// refused, refused_total{reason}) and logged, and a *LoadError is
// returned. A signature that does not match the policy is fetched again,
// with the policy, once after a short pause: a publisher writes the two one
// after the other. Concurrent calls are
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
		reason := ReasonUnavailable
		var le *LoadError
		if errors.As(err, &le) {
			reason = le.Reason
		}
		err = &LoadError{Reason: reason, Err: fmt.Errorf("rollout: policy %s: %w", l.redacted, err)}
		l.status.LastError = err.Error()
		l.status.Reason = reason
		l.lastOK = false
		kept := l.status.Version
		had := l.policy != nil
		l.mu.Unlock()
		l.loads.WithLabelValues("failure").Inc()
		if reason != ReasonUnavailable {
			l.refused.WithLabelValues(reason).Inc()
		}
		l.log.Warn("rollout policy not loaded; keeping the last good one",
			zap.String("source", l.redacted), zap.String("reason", reason), zap.Error(err),
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
	l.status.Reason = ""
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
	data, err := l.fetchVerified(ctx)
	if reasonIs(err, ReasonBadSignature) {
		// A publisher writes the policy and its signature one after the
		// other: a host may read one of each publication. Once more.
		t := time.NewTimer(l.sigRetryDelay)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, err
		case <-t.C:
		}
		data, err = l.fetchVerified(ctx)
	}
	if err != nil {
		return nil, err
	}
	p, err := ParsePolicy(data)
	return p, loadErr(ReasonInvalid, err)
}

func reasonIs(err error, reason string) bool {
	var le *LoadError
	return errors.As(err, &le) && le.Reason == reason
}

// fetchVerified reads the policy and, with keys, its signature, and checks
// the signature. The policy is not parsed.
func (l *Loader) fetchVerified(ctx context.Context) ([]byte, error) {
	data, err := l.fetch(ctx, "", MaxPolicySize)
	if err != nil {
		return nil, err
	}
	if len(l.keys) == 0 {
		return data, nil
	}
	sig, err := l.fetch(ctx, ".sig", MaxSignatureSize)
	switch {
	case errors.Is(err, errNotFound):
		return nil, &LoadError{Reason: ReasonUnsigned, Err: errors.New("no signature: the policy must be signed (" + l.sigLocation() + " is missing)")}
	case reasonIs(err, ReasonTooLarge):
		return nil, &LoadError{Reason: ReasonBadSignature, Err: fmt.Errorf("signature %w", err)}
	case err != nil:
		return nil, fmt.Errorf("signature: %w", err)
	}
	if err := VerifyPolicy(l.keys, data, sig); err != nil {
		return nil, err
	}
	return data, nil
}

// sigLocation names the signature's location, redacted like the source.
func (l *Loader) sigLocation() string {
	switch l.kind {
	case "http":
		return config.RedactURL(sigURL(l.source))
	case "s3":
		return "s3://" + l.bucket + "/" + l.key + ".sig"
	}
	return l.redacted + ".sig"
}

// errNotFound marks a source that does not exist (a signature's absence
// means "unsigned").
var errNotFound = errors.New("not found")

// fetch reads the policy (suffix "") or its signature (".sig"), at most
// max bytes: more is a *LoadError too_large, read no further. A missing
// object wraps errNotFound; other failures are *LoadError unavailable,
// or unsafe_file for an unsafe local file.
func (l *Loader) fetch(ctx context.Context, suffix string, max int64) ([]byte, error) {
	var data []byte
	var err error
	switch l.kind {
	case "file":
		data, err = readFile(l.source+suffix, max, suffix == "")
	case "http":
		src := l.source
		if suffix != "" {
			src = sigURL(src)
		}
		data, err = l.fetchHTTP(ctx, src, max)
	case "s3":
		data, _, err = l.s3.GetObject(ctx, l.bucket, l.key+suffix, max)
		var tl interface{ TooLarge() bool }
		switch {
		case errors.Is(err, ErrObjectNotFound):
			err = fmt.Errorf("%w: %w", errNotFound, err)
		case errors.As(err, &tl) && tl.TooLarge():
			err = &LoadError{Reason: ReasonTooLarge, Err: err}
		case err == nil && int64(len(data)) > max:
			err = &LoadError{Reason: ReasonTooLarge, Err: fmt.Errorf("object is larger than %d bytes", max)}
		}
	}
	if err != nil {
		if errors.Is(err, errNotFound) {
			return nil, err
		}
		return nil, loadErr(ReasonUnavailable, err)
	}
	return data, nil
}

// sigURL is the URL of the signature of the policy at src: ".sig"
// appended to its path, the query (a presigned URL's) kept.
func sigURL(src string) string {
	u, err := url.Parse(src)
	if err != nil {
		return src + ".sig"
	}
	u.Path += ".sig"
	if u.RawPath != "" {
		u.RawPath += ".sig"
	}
	return u.String()
}

// readFile reads the regular file at path, at most max bytes. The policy
// itself (checkSafe) must be safe: see fileSafety.
func readFile(path string, max int64, checkSafe bool) ([]byte, error) {
	// O_NONBLOCK keeps open(2) from hanging on a FIFO without a writer;
	// anything but a regular file is refused below.
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("%w: %w", errNotFound, err)
		}
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !st.Mode().IsRegular() {
		return nil, &LoadError{Reason: ReasonUnsafeFile, Err: fmt.Errorf("%s is not a regular file", path)}
	}
	if checkSafe {
		if err := fileSafety(path, st); err != nil {
			return nil, err
		}
	}
	if st.Size() > max {
		return nil, &LoadError{Reason: ReasonTooLarge, Err: fmt.Errorf("file is larger than %d bytes", max)}
	}
	data, err := io.ReadAll(io.LimitReader(f, max+1))
	if err != nil {
		return nil, err
	}
	if int64(len(data)) > max {
		return nil, &LoadError{Reason: ReasonTooLarge, Err: fmt.Errorf("file is larger than %d bytes", max)}
	}
	return data, nil
}

// fileSafety refuses (unsafe_file) a local policy file that someone other
// than root or the daemon's user could change: writable by its group or by
// others, owned by another user, or in a directory its group or others may
// write without the sticky bit (they could rename another file over it;
// the directory of a symbolic link and that of its target are checked,
// not their parents).
// st is of the open file, so what is checked is what is read. Whoever
// changes the policy switches this host between the instance profile's and
// the workload's credentials, signed policies or not.
func fileSafety(path string, st fs.FileInfo) error {
	var problems, fixes []string
	if perm := st.Mode().Perm(); perm&0o022 != 0 {
		problems = append(problems, fmt.Sprintf("it is writable by %s (mode %04o)", groupOthers(perm), uint32(perm)))
		fixes = append(fixes, "chmod go-w "+path)
	}
	if sys, ok := st.Sys().(*syscall.Stat_t); ok {
		if uid := int(sys.Uid); uid != 0 && uid != os.Geteuid() {
			problems = append(problems, fmt.Sprintf("it is owned by uid %d, not root or the daemon's uid %d", uid, os.Geteuid()))
			fixes = append(fixes, "chown root "+path)
		}
	}
	for _, dir := range fileDirs(path) {
		if dst, err := os.Stat(dir); err == nil && dst.Mode()&fs.ModeSticky == 0 && dst.Mode().Perm()&0o022 != 0 {
			problems = append(problems, fmt.Sprintf("its directory %s is writable by %s", dir, groupOthers(dst.Mode().Perm())))
			fixes = append(fixes, "chmod go-w "+dir)
		}
	}
	if len(problems) == 0 {
		return nil
	}
	return &LoadError{Reason: ReasonUnsafeFile, Err: fmt.Errorf("refused: %s; fix: %s",
		strings.Join(problems, "; "), strings.Join(fixes, ", "))}
}

// fileDirs returns the directory of path and, when path goes through
// symbolic links, the directory of the file it names: whoever may write
// either can put another file in its place.
func fileDirs(path string) []string {
	dirs := []string{filepath.Dir(filepath.Clean(path))}
	if real, err := filepath.EvalSymlinks(path); err == nil && filepath.Dir(real) != dirs[0] {
		dirs = append(dirs, filepath.Dir(real))
	}
	return dirs
}

func groupOthers(perm fs.FileMode) string {
	switch {
	case perm&0o020 != 0 && perm&0o002 != 0:
		return "group and others"
	case perm&0o020 != 0:
		return "its group"
	}
	return "others"
}

func (l *Loader) fetchHTTP(ctx context.Context, src string, max int64) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, src, nil)
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
	switch resp.StatusCode {
	case http.StatusOK:
	case http.StatusNotFound, http.StatusGone:
		return nil, fmt.Errorf("%w: HTTP status %d", errNotFound, resp.StatusCode)
	default:
		_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 4096))
		return nil, fmt.Errorf("HTTP status %d", resp.StatusCode)
	}
	if resp.ContentLength > max {
		// Refused before reading any of it; closing the body drops the
		// connection rather than reading on.
		return nil, &LoadError{Reason: ReasonTooLarge, Err: fmt.Errorf("response of %d bytes is larger than %d bytes", resp.ContentLength, max)}
	}
	// Never more than max+1 bytes are read, whatever the answer holds.
	data, err := io.ReadAll(io.LimitReader(resp.Body, max+1))
	if err != nil {
		return nil, fmt.Errorf("read response: %w", err)
	}
	if int64(len(data)) > max {
		return nil, &LoadError{Reason: ReasonTooLarge, Err: fmt.Errorf("response is larger than %d bytes", max)}
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
