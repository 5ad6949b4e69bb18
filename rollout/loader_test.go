package rollout

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

const (
	policyV1 = "version: v1\ndefault: off\ngroups:\n  api-asg: {canary: 10%}\n"
	policyV2 = "version: v2\ndefault: on\n"
	badDoc   = "version: v3\ndefault: sometimes\n"
)

func writeFile(t *testing.T, path, data string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(data), 0o600); err != nil {
		t.Fatal(err)
	}
}

func signalled(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

// fakeS3 is an in-memory ObjectGetter.
type fakeS3 struct {
	mu      sync.Mutex
	objects map[string]string
	err     error
	gets    int
}

func (f *fakeS3) put(bucket, key, data string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.objects == nil {
		f.objects = map[string]string{}
	}
	f.objects[bucket+"/"+key] = data
}

func (f *fakeS3) count() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.gets
}

func (f *fakeS3) GetObject(ctx context.Context, bucket, key string, max int64) ([]byte, string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.gets++
	if f.err != nil {
		return nil, "", f.err
	}
	d, ok := f.objects[bucket+"/"+key]
	if !ok {
		return nil, "", fmt.Errorf("NoSuchKey: %w", ErrObjectNotFound)
	}
	if int64(len(d)) > max+1 {
		d = d[:max+1]
	}
	return []byte(d), `"etag"`, nil
}

func TestNewLoaderSources(t *testing.T) {
	s3 := &fakeS3{}
	cases := []struct {
		source string
		opts   LoaderOptions
		ok     bool
	}{
		{"/etc/imdsproxy/rollout.yaml", LoaderOptions{}, true},
		{"https://policy.example.com/rollout.yaml", LoaderOptions{}, true},
		{"http://127.0.0.1:8080/rollout.yaml", LoaderOptions{}, true},
		{"http://[::1]:8080/rollout.yaml", LoaderOptions{}, true},
		{"http://localhost/rollout.yaml", LoaderOptions{}, true},
		{"s3://bucket/path/to/rollout.yaml", LoaderOptions{S3: s3}, true},
		{"relative/rollout.yaml", LoaderOptions{}, false},
		{"http://policy.example.com/rollout.yaml", LoaderOptions{}, false},
		{"ftp://policy.example.com/rollout.yaml", LoaderOptions{}, false},
		{"https:///nohost", LoaderOptions{}, false},
		{"s3://bucket", LoaderOptions{S3: s3}, false},
		{"s3:///key", LoaderOptions{S3: s3}, false},
		{"s3://bucket/key", LoaderOptions{}, false}, // no S3 client
		{"/etc/rollout.yaml", LoaderOptions{Interval: -time.Second}, false},
	}
	for _, tc := range cases {
		t.Run(tc.source, func(t *testing.T) {
			_, err := NewLoader(tc.source, tc.opts, nil, nil)
			if (err == nil) != tc.ok {
				t.Errorf("NewLoader(%q) error = %v, want ok=%t", tc.source, err, tc.ok)
			}
		})
	}
}

func TestLoaderFileRewriteAndBadPolicy(t *testing.T) {
	path := filepath.Join(t.TempDir(), "rollout.yaml")
	writeFile(t, path, policyV1)
	reg := prometheus.NewPedanticRegistry()
	l, err := NewLoader(path, LoaderOptions{}, nil, reg)
	if err != nil {
		t.Fatal(err)
	}
	if p, st := l.Current(); p != nil || st.Source != path {
		t.Fatalf("before Load: policy %+v, status %+v", p, st)
	}
	sub := l.Subscribe()
	ctx := context.Background()

	if err := l.Load(ctx); err != nil {
		t.Fatalf("Load: %v", err)
	}
	p, st := l.Current()
	if p == nil || p.Version != "v1" || st.Version != "v1" || st.LastError != "" || st.LastSuccess.IsZero() {
		t.Fatalf("after Load: %+v %+v", p, st)
	}
	if !signalled(sub) {
		t.Error("Subscribe not signalled on the first policy")
	}

	// Same content again: no signal.
	if err := l.Load(ctx); err != nil {
		t.Fatal(err)
	}
	if signalled(sub) {
		t.Error("Subscribe signalled although the policy did not change")
	}
	// Same policy, different text (a comment): still no signal.
	writeFile(t, path, "# edited\n"+policyV1)
	if err := l.Load(ctx); err != nil || signalled(sub) {
		t.Errorf("comment-only edit: err %v, signalled %t", err, !signalled(sub))
	}

	// Rewrite: picked up.
	writeFile(t, path, policyV2)
	if err := l.Load(ctx); err != nil {
		t.Fatal(err)
	}
	if p, _ := l.Current(); p.Version != "v2" || p.Default.Stage != StageOn {
		t.Errorf("rewrite not picked up: %+v", p)
	}
	if !signalled(sub) {
		t.Error("Subscribe not signalled on change")
	}
	if got := testutil.ToFloat64(l.loads.WithLabelValues("success")); got != 4 {
		t.Errorf("loads success = %v, want 4", got)
	}

	// Bad policy: rejected, old one stays, metrics say so.
	writeFile(t, path, badDoc)
	err = l.Load(ctx)
	if err == nil || !strings.Contains(err.Error(), "default") {
		t.Fatalf("Load of a bad policy: %v", err)
	}
	p, st = l.Current()
	if p.Version != "v2" || st.Version != "v2" || st.LastError == "" || !st.LastLoad.After(st.LastSuccess) && !st.LastLoad.Equal(st.LastSuccess) {
		t.Errorf("after a bad policy: %+v %+v", p, st)
	}
	if signalled(sub) {
		t.Error("Subscribe signalled on a rejected policy")
	}
	want := `
# HELP imdsproxy_rollout_policy_last_load_successful Whether the last rollout policy load succeeded (1) or failed (0; the last good policy stays in force).
# TYPE imdsproxy_rollout_policy_last_load_successful gauge
imdsproxy_rollout_policy_last_load_successful 0
# HELP imdsproxy_rollout_policy_loads_total Rollout policy loads, by result (success, failure). A failed load keeps the last good policy.
# TYPE imdsproxy_rollout_policy_loads_total counter
imdsproxy_rollout_policy_loads_total{result="failure"} 1
imdsproxy_rollout_policy_loads_total{result="success"} 4
# HELP imdsproxy_rollout_policy_info The version of the rollout policy in force (always 1; absent until a policy is loaded).
# TYPE imdsproxy_rollout_policy_info gauge
imdsproxy_rollout_policy_info{version="v2"} 1
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want),
		"imdsproxy_rollout_policy_last_load_successful", "imdsproxy_rollout_policy_loads_total", "imdsproxy_rollout_policy_info"); err != nil {
		t.Error(err)
	}

	// Missing file: also kept.
	os.Remove(path)
	if err := l.Load(ctx); err == nil {
		t.Error("Load of a missing file succeeded")
	}
	if p, _ := l.Current(); p.Version != "v2" {
		t.Error("policy lost after a missing file")
	}
	// Fixed: back to 1.
	writeFile(t, path, policyV1)
	if err := l.Load(ctx); err != nil {
		t.Fatal(err)
	}
	want = `
# HELP imdsproxy_rollout_policy_last_load_successful Whether the last rollout policy load succeeded (1) or failed (0; the last good policy stays in force).
# TYPE imdsproxy_rollout_policy_last_load_successful gauge
imdsproxy_rollout_policy_last_load_successful 1
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want), "imdsproxy_rollout_policy_last_load_successful"); err != nil {
		t.Error(err)
	}
	if _, st := l.Current(); st.LastSuccess.IsZero() || st.LastError != "" {
		t.Errorf("after recovery: %+v", st)
	}
}

func TestLoaderFileTooLarge(t *testing.T) {
	path := filepath.Join(t.TempDir(), "rollout.yaml")
	writeFile(t, path, "#"+strings.Repeat("x", MaxPolicySize+10))
	l, err := NewLoader(path, LoaderOptions{}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Load(context.Background()); err == nil || !strings.Contains(err.Error(), "larger") {
		t.Errorf("Load of an oversize file: %v", err)
	}
}

func TestLoaderHTTPS(t *testing.T) {
	var mu sync.Mutex
	body, status := policyV1, http.StatusOK
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		defer mu.Unlock()
		if r.URL.Path != "/rollout.yaml" || r.URL.Query().Get("sig") != "secret" {
			http.NotFound(w, r)
			return
		}
		w.WriteHeader(status)
		w.Write([]byte(body))
	}))
	srv.Config.ErrorLog = log.New(io.Discard, "", 0) // the untrusted-client case logs a handshake error
	srv.StartTLS()
	defer srv.Close()
	set := func(b string, s int) { mu.Lock(); body, status = b, s; mu.Unlock() }

	src := srv.URL + "/rollout.yaml?sig=secret"
	l, err := NewLoader(src, LoaderOptions{HTTPClient: srv.Client()}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if err := l.Load(ctx); err != nil {
		t.Fatalf("Load: %v", err)
	}
	if p, st := l.Current(); p.Version != "v1" || strings.Contains(st.Source, "secret") {
		t.Errorf("after Load: %+v, source %q (must not show the query)", p, st.Source)
	}
	set(policyV2, http.StatusOK)
	if err := l.Load(ctx); err != nil {
		t.Fatal(err)
	}
	if p, _ := l.Current(); p.Version != "v2" {
		t.Errorf("change not picked up: %+v", p)
	}
	set(policyV1, http.StatusInternalServerError)
	err = l.Load(ctx)
	if err == nil || !strings.Contains(err.Error(), "500") || strings.Contains(err.Error(), "secret") {
		t.Errorf("Load on HTTP 500: %v", err)
	}
	if p, st := l.Current(); p.Version != "v2" || strings.Contains(st.LastError, "secret") {
		t.Errorf("after 500: %+v %+v", p, st)
	}

	// Without the test server's CA the TLS handshake fails; the error must
	// not leak the query either.
	l2, err := NewLoader(src, LoaderOptions{}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := l2.Load(ctx); err == nil || strings.Contains(err.Error(), "secret") {
		t.Errorf("Load with an untrusted certificate: %v", err)
	}
}

func TestLoaderS3(t *testing.T) {
	s3 := &fakeS3{}
	s3.put("policies", "fleet/rollout.yaml", policyV1)
	l, err := NewLoader("s3://policies/fleet/rollout.yaml", LoaderOptions{S3: s3}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	sub := l.Subscribe()
	ctx := context.Background()
	if err := l.Load(ctx); err != nil {
		t.Fatalf("Load: %v", err)
	}
	if p, _ := l.Current(); p.Version != "v1" || !signalled(sub) {
		t.Errorf("after Load: %+v", p)
	}
	s3.put("policies", "fleet/rollout.yaml", badDoc)
	if err := l.Load(ctx); err == nil {
		t.Error("bad S3 policy accepted")
	}
	s3.mu.Lock()
	s3.err = errors.New("AccessDenied")
	s3.mu.Unlock()
	if err := l.Load(ctx); err == nil || !strings.Contains(err.Error(), "AccessDenied") {
		t.Errorf("Load on S3 error: %v", err)
	}
	if p, st := l.Current(); p.Version != "v1" || !strings.Contains(st.LastError, "AccessDenied") || signalled(sub) {
		t.Errorf("after failures: %+v %+v", p, st)
	}
	s3.mu.Lock()
	s3.err = nil
	s3.mu.Unlock()
	s3.put("policies", "fleet/rollout.yaml", policyV2)
	if err := l.Load(ctx); err != nil {
		t.Fatal(err)
	}
	if p, st := l.Current(); p.Version != "v2" || st.LastError != "" || !signalled(sub) {
		t.Errorf("after recovery: %+v %+v", p, st)
	}
}

func TestLoaderRunPolls(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s3 := &fakeS3{}
		s3.put("b", "k", policyV1)
		l, err := NewLoader("s3://b/k", LoaderOptions{S3: s3, Interval: time.Minute}, nil, nil)
		if err != nil {
			t.Fatal(err)
		}
		sub := l.Subscribe()
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- l.Run(ctx) }()

		synctest.Wait()
		if p, _ := l.Current(); p != nil {
			t.Fatal("Run loaded at once; it must wait an interval")
		}
		time.Sleep(54 * time.Second) // below the earliest jittered tick (54s)
		synctest.Wait()
		if s3.count() != 0 {
			t.Fatalf("polled after 54s: %d gets", s3.count())
		}
		time.Sleep(12 * time.Second) // past the latest (66s)
		synctest.Wait()
		if p, _ := l.Current(); p == nil || p.Version != "v1" || !signalled(sub) {
			t.Fatalf("after one interval: %+v", p)
		}
		s3.put("b", "k", policyV2)
		time.Sleep(66 * time.Second)
		synctest.Wait()
		if p, _ := l.Current(); p.Version != "v2" || !signalled(sub) {
			t.Fatalf("after two intervals: %+v", p)
		}
		for range 5 {
			time.Sleep(66 * time.Second)
		}
		synctest.Wait()
		if signalled(sub) {
			t.Error("signalled without a change")
		}
		if n := s3.count(); n < 6 {
			t.Errorf("only %d polls in about 8 minutes", n)
		}
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run returned %v, want nil", err)
		}
	})
}
