package cache

import (
	"bytes"
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/imdsproxy/imdsproxy/creds"
)

// Secrets every fake credential carries; no log or error may contain them.
const (
	testSecret = "SECRETACCESSKEY-must-not-leak"
	testToken  = "SESSIONTOKEN-must-not-leak"
)

// fetchFunc scripts one Fetch: n is the 1-based number of the call.
type fetchFunc func(ctx context.Context, key string, n int) (creds.Credentials, error)

// fakeFetcher is a scriptable Fetcher that counts its calls and can block
// them on a gate.
type fakeFetcher struct {
	mu      sync.Mutex
	fn      fetchFunc
	gate    chan struct{} // non-nil: Fetch waits until it is closed or ctx ends
	total   int
	perKey  map[string]int
	ctxErrs []error // ctx.Err() seen by each call when it returned
	dls     []time.Duration
}

func newFake(fn fetchFunc) *fakeFetcher {
	return &fakeFetcher{fn: fn, perKey: map[string]int{}}
}

func (f *fakeFetcher) Fetch(ctx context.Context, key string) (creds.Credentials, error) {
	f.mu.Lock()
	f.total++
	f.perKey[key]++
	n, gate := f.total, f.gate
	if dl, ok := ctx.Deadline(); ok {
		f.dls = append(f.dls, time.Until(dl))
	} else {
		f.dls = append(f.dls, 0)
	}
	f.mu.Unlock()

	var cr creds.Credentials
	var err error
	if gate != nil {
		select {
		case <-gate:
		case <-ctx.Done():
			err = ctx.Err()
		}
	}
	if err == nil {
		f.mu.Lock()
		fn := f.fn // read after the gate, so a test can script the outcome while blocked
		f.mu.Unlock()
		cr, err = fn(ctx, key, n)
	}
	f.mu.Lock()
	f.ctxErrs = append(f.ctxErrs, ctx.Err())
	f.mu.Unlock()
	return cr, err
}

func (f *fakeFetcher) set(fn fetchFunc) {
	f.mu.Lock()
	f.fn = fn
	f.mu.Unlock()
}

// block makes later calls wait on a new gate and returns a function that
// opens it.
func (f *fakeFetcher) block() (open func()) {
	g := make(chan struct{})
	f.mu.Lock()
	f.gate = g
	f.mu.Unlock()
	return func() {
		f.mu.Lock()
		f.gate = nil
		f.mu.Unlock()
		close(g)
	}
}

func (f *fakeFetcher) calls() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.total
}

func (f *fakeFetcher) callsFor(key string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.perKey[key]
}

// issue returns complete credentials valid for lifetime from now.
func issue(id string, lifetime time.Duration) creds.Credentials {
	return creds.Credentials{
		AccessKeyID:     id,
		SecretAccessKey: testSecret,
		SessionToken:    testToken,
		Expires:         time.Now().Add(lifetime),
		AccountID:       "222222222222",
		RoleARN:         "arn:aws:sts::222222222222:assumed-role/app/host",
	}
}

// succeed issues credentials valid for lifetime, key id ASIA<call number>.
func succeed(lifetime time.Duration) fetchFunc {
	return func(_ context.Context, _ string, n int) (creds.Credentials, error) {
		return issue(keyID(n), lifetime), nil
	}
}

func keyID(n int) string { return fmt.Sprintf("ASIATEST%08d", n) }

// fail returns err on every call.
func fail(err error) fetchFunc {
	return func(context.Context, string, int) (creds.Credentials, error) {
		return creds.Credentials{}, err
	}
}

// testError is a classified upstream error.
type testError struct {
	class     string
	permanent bool
}

func (e *testError) Error() string      { return "exchange: upstream said " + e.class }
func (e *testError) ErrorClass() string { return e.class }
func (e *testError) Permanent() bool    { return e.permanent }

// fixedRand returns r for every call.
func fixedRand(r float64) func() float64 { return func() float64 { return r } }

// harness is a Cache with its registry and a JSON log buffer.
type harness struct {
	*Cache[string]
	reg  *prometheus.Registry
	logs *syncBuffer
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func newHarness(t *testing.T, f Fetcher[string], cfg Config) *harness {
	t.Helper()
	buf := &syncBuffer{}
	log := zap.New(zapcore.NewCore(zapcore.NewJSONEncoder(zap.NewProductionEncoderConfig()), zapcore.AddSync(buf), zap.DebugLevel))
	reg := prometheus.NewPedanticRegistry()
	c, err := New[string](f, cfg, log.Named("cache"), reg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	return &harness{Cache: c, reg: reg, logs: buf}
}

// run starts c.Run and returns a function that stops it and checks that it
// returned nil.
func run(t *testing.T, c *Cache[string]) (stop func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	return func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run returned %v, want nil", err)
		}
	}
}

// snapshotOf returns the Snapshot entry of key.
func snapshotOf(t *testing.T, c *Cache[string], key string) Entry[string] {
	t.Helper()
	for _, e := range c.Snapshot() {
		if e.Key == key {
			return e
		}
	}
	t.Fatalf("no snapshot entry for %q in %+v", key, c.Snapshot())
	return Entry[string]{}
}

func mustGet(t *testing.T, c *Cache[string], key string) creds.Credentials {
	t.Helper()
	cr, err := c.Get(t.Context(), key)
	if err != nil {
		t.Fatalf("Get(%q) at %s: %v", key, time.Now().UTC().Format(time.TimeOnly), err)
	}
	return cr
}

type result struct {
	cr  creds.Credentials
	err error
}

// get is Get for goroutines that must not call t.Fatal.
func get(c *Cache[string], key string) result {
	cr, err := c.Get(context.Background(), key)
	return result{cr, err}
}
