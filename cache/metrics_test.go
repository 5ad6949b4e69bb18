package cache

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/imdsproxy/imdsproxy/creds"
)

// appOrThrottle succeeds for "app" and fails for every other key.
func appOrThrottle(_ context.Context, key string, n int) (creds.Credentials, error) {
	if key == "app" {
		return issue(keyID(n), time.Hour), nil
	}
	return creds.Credentials{}, &testError{class: "throttling"}
}

func TestMetrics(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFake(appOrThrottle)
		h := newHarness(t, f, Config{Rand: fixedRand(0.5)})
		// The bubble starts at 2000-01-01T00:00:00Z = 946684800.
		if err := h.Prefetch(t.Context(), "app"); err != nil {
			t.Fatal(err)
		}
		time.Sleep(10 * time.Minute)
		mustGet(t, h.Cache, "app")
		mustGet(t, h.Cache, "app")
		if _, err := h.Get(t.Context(), "bad"); err == nil {
			t.Fatal("Get(bad) succeeded")
		}

		const want = `
# HELP imdsproxy_cache_requests_total Credential requests answered by the cache, by result: hit (served from cache), stale (served last good credentials while refreshes fail), miss (waited for an upstream fetch), wait_timeout (the caller's bound on the wait for an upstream fetch came first; no credentials returned, the fetch carries on), error (no credentials returned).
# TYPE imdsproxy_cache_requests_total counter
imdsproxy_cache_requests_total{result="error"} 1
imdsproxy_cache_requests_total{result="hit"} 2
imdsproxy_cache_requests_total{result="miss"} 0
imdsproxy_cache_requests_total{result="stale"} 0
imdsproxy_cache_requests_total{result="wait_timeout"} 0
# HELP imdsproxy_cache_refreshes_total Upstream credential fetches finished, by result (success, failure) and error class (none on success).
# TYPE imdsproxy_cache_refreshes_total counter
imdsproxy_cache_refreshes_total{class="none",result="success"} 1
imdsproxy_cache_refreshes_total{class="throttling",result="failure"} 1
# HELP imdsproxy_cache_fetches_in_flight Upstream credential fetches in progress.
# TYPE imdsproxy_cache_fetches_in_flight gauge
imdsproxy_cache_fetches_in_flight 0
# HELP imdsproxy_cache_credentials_remaining_seconds Seconds until the cached credentials of key expire (0 once expired; absent when none).
# TYPE imdsproxy_cache_credentials_remaining_seconds gauge
imdsproxy_cache_credentials_remaining_seconds{key="app"} 3000
# HELP imdsproxy_cache_next_refresh_timestamp_seconds Unix time of the next scheduled upstream fetch for key (absent when none).
# TYPE imdsproxy_cache_next_refresh_timestamp_seconds gauge
imdsproxy_cache_next_refresh_timestamp_seconds{key="app"} 946686420
imdsproxy_cache_next_refresh_timestamp_seconds{key="bad"} 946685401.5
# HELP imdsproxy_cache_consecutive_failures Upstream fetch failures for key since its last success.
# TYPE imdsproxy_cache_consecutive_failures gauge
imdsproxy_cache_consecutive_failures{key="app"} 0
imdsproxy_cache_consecutive_failures{key="bad"} 1
# HELP imdsproxy_cache_entries Keys held by the cache.
# TYPE imdsproxy_cache_entries gauge
imdsproxy_cache_entries 2
`
		names := []string{
			"imdsproxy_cache_requests_total", "imdsproxy_cache_refreshes_total", "imdsproxy_cache_fetches_in_flight",
			"imdsproxy_cache_credentials_remaining_seconds", "imdsproxy_cache_next_refresh_timestamp_seconds",
			"imdsproxy_cache_consecutive_failures", "imdsproxy_cache_entries",
		}
		if err := testutil.GatherAndCompare(h.reg, strings.NewReader(want), names...); err != nil {
			t.Error(err)
		}
		if n := testutil.ToFloat64(h.m.hit); n != 2 {
			t.Errorf("hits = %v, want 2", n)
		}
		mfs, err := h.reg.Gather()
		if err != nil {
			t.Fatal(err)
		}
		counts := map[string]uint64{}
		for _, mf := range mfs {
			if mf.GetName() != "imdsproxy_cache_fetch_duration_seconds" {
				continue
			}
			for _, m := range mf.GetMetric() {
				counts[m.GetLabel()[0].GetValue()] = m.GetHistogram().GetSampleCount()
			}
		}
		if counts["success"] != 1 || counts["failure"] != 1 {
			t.Errorf("fetch_duration_seconds sample counts = %v, want success 1, failure 1", counts)
		}

		problems, err := testutil.GatherAndLint(h.reg)
		if err != nil || len(problems) != 0 {
			t.Errorf("GatherAndLint: %v, %+v", err, problems)
		}

		// Expired credentials report 0 remaining, not a negative number.
		time.Sleep(2 * time.Hour)
		if v := gaugeValue(t, h, "imdsproxy_cache_credentials_remaining_seconds", "app"); v != 0 {
			t.Errorf("remaining after expiry = %v, want 0", v)
		}

		// No stale per-key series after Purge.
		h.Purge()
		for _, name := range names[3:6] {
			if n, err := testutil.GatherAndCount(h.reg, name); err != nil || n != 0 {
				t.Errorf("%s: %d series after Purge (%v), want 0", name, n, err)
			}
		}
		if err := testutil.GatherAndCompare(h.reg, strings.NewReader(`
# HELP imdsproxy_cache_entries Keys held by the cache.
# TYPE imdsproxy_cache_entries gauge
imdsproxy_cache_entries 0
`), "imdsproxy_cache_entries"); err != nil {
			t.Error(err)
		}
	})
}

func gaugeValue(t *testing.T, h *harness, name, key string) float64 {
	t.Helper()
	mfs, err := h.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			if m.GetLabel()[0].GetValue() == key {
				return m.GetGauge().GetValue()
			}
		}
	}
	t.Fatalf("no %s{key=%q}", name, key)
	return 0
}

// Refresh logs: Info with the redacted credentials, key and next refresh;
// Warn with class, permanence, failures and retry delay; never a secret.
func TestLogging(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFake(succeed(time.Hour))
		h := newHarness(t, f, Config{Rand: fixedRand(0.5)})
		defer run(t, h.Cache)()
		if err := h.Prefetch(t.Context(), "app"); err != nil {
			t.Fatal(err)
		}
		f.set(fail(&testError{class: "access_denied", permanent: true}))
		time.Sleep(27*time.Minute + time.Second)
		synctest.Wait()

		out := h.logs.String()
		if strings.Contains(out, testSecret) || strings.Contains(out, testToken) {
			t.Fatalf("log leaks a secret:\n%s", out)
		}
		var lines []map[string]any
		for l := range strings.Lines(out) {
			var m map[string]any
			if err := json.Unmarshal([]byte(l), &m); err != nil {
				t.Fatalf("bad log line %q: %v", l, err)
			}
			lines = append(lines, m)
		}
		if len(lines) != 2 {
			t.Fatalf("got %d log lines, want 2:\n%s", len(lines), out)
		}
		ok, bad := lines[0], lines[1]
		cr, _ := ok["credentials"].(map[string]any)
		if ok["level"] != "info" || ok["logger"] != "cache" || ok["key"] != "app" || ok["next_refresh"] == nil ||
			cr["access_key_id"] != keyID(1) || cr["account_id"] != "222222222222" {
			t.Errorf("success line: %v", ok)
		}
		if bad["level"] != "warn" || bad["key"] != "app" || bad["class"] != "access_denied" || bad["permanent"] != true ||
			bad["consecutive_failures"] != 1.0 || bad["retry_in"] != 1.5 || bad["serving_last_good"] != true ||
			bad["error"] != "exchange: upstream said access_denied" {
			t.Errorf("failure line: %v", bad)
		}
	})
}
