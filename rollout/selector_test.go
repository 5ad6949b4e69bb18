package rollout

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/imdsproxy/imdsproxy/creds"
)

// fakeSource is a hand-written Source returning fixed credentials or an error.
type fakeSource struct {
	mu    sync.Mutex
	c     creds.Credentials
	err   error
	keys  []string
	calls int
}

func newFakeSource(keyID, account string) *fakeSource {
	return &fakeSource{c: creds.Credentials{
		AccessKeyID: keyID, SecretAccessKey: "secret-" + keyID, SessionToken: "token-" + keyID,
		Expires: time.Now().Add(time.Hour), AccountID: account,
		RoleARN: "arn:aws:sts::" + account + ":assumed-role/app/s",
	}}
}

func (f *fakeSource) set(err error) { f.mu.Lock(); f.err = err; f.mu.Unlock() }

func (f *fakeSource) Credentials(ctx context.Context, key string) (creds.Credentials, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls++
	f.keys = append(f.keys, key)
	if f.err != nil {
		return creds.Credentials{}, f.err
	}
	return f.c, nil
}

const (
	wlAccount = "222222222222"
	ipAccount = "111111111111"
)

type selectorHarness struct {
	s      *Selector
	wl, ip *fakeSource
	reg    *prometheus.Registry
	logs   *observer.ObservedLogs
}

func newSelectorHarness(t *testing.T, fb Fallback) *selectorHarness {
	t.Helper()
	core, logs := observer.New(zap.DebugLevel)
	h := &selectorHarness{
		wl:   newFakeSource("ASIAWORKLOAD", wlAccount),
		ip:   newFakeSource("ASIAPROFILE", ipAccount),
		reg:  prometheus.NewPedanticRegistry(),
		logs: logs,
	}
	s, err := NewSelector(SelectorConfig{
		Workload: h.wl, WorkloadKey: "app",
		InstanceProfile: h.ip, InstanceProfileKey: "profile",
		Fallback: fb,
		Host:     Host{InstanceID: "i-1", Group: "api-asg", GroupSource: GroupFromTag, IDSource: IDFromIMDS},
	}, zap.New(core), h.reg)
	if err != nil {
		t.Fatal(err)
	}
	h.s = s
	return h
}

func TestNewSelectorValidates(t *testing.T) {
	src := newFakeSource("A", wlAccount)
	for _, cfg := range []SelectorConfig{
		{InstanceProfile: src},
		{Workload: src},
		{Workload: src, InstanceProfile: src, Fallback: "open"},
	} {
		if _, err := NewSelector(cfg, nil, nil); err == nil {
			t.Errorf("NewSelector(%+v) accepted", cfg)
		}
	}
}

func TestSelectorServesPerStage(t *testing.T) {
	p := &Policy{Groups: map[string]Rule{
		"off": {Stage: StageOff}, "shadow": {Stage: StageShadow},
		"canary": {Stage: StageCanary, Percent: 10}, "on": {Stage: StageOn},
	}}
	cases := []struct {
		group  string
		bucket int
		kill   bool
		want   Kind
	}{
		{"off", 0, false, KindInstanceProfile},
		{"shadow", 0, false, KindInstanceProfile},
		{"canary", 999, false, KindWorkload},
		{"canary", 1000, false, KindInstanceProfile},
		{"on", 0, false, KindWorkload},
		{"on", 0, true, KindInstanceProfile},
	}
	for _, tc := range cases {
		t.Run(string(tc.want)+"/"+tc.group, func(t *testing.T) {
			h := newSelectorHarness(t, FallbackNone)
			if got := h.s.Decision(); got.Serve != KindInstanceProfile || got.Bucket != Bucket("i-1") || got.Group != "api-asg" {
				t.Fatalf("initial decision %+v, want off for the configured host", got)
			}
			pp := *p
			pp.KillSwitch = tc.kill
			h.s.Set(Decide(&pp, tc.group, tc.bucket))
			c, err := h.s.Credentials(context.Background(), "ignored")
			if err != nil {
				t.Fatal(err)
			}
			wantKey, wantSrc := "ASIAPROFILE", h.ip
			if tc.want == KindWorkload {
				wantKey, wantSrc = "ASIAWORKLOAD", h.wl
			}
			if c.AccessKeyID != wantKey {
				t.Errorf("served %s, want %s", c.AccessKeyID, wantKey)
			}
			wantSrc.mu.Lock()
			if len(wantSrc.keys) != 1 || (wantSrc == h.wl && wantSrc.keys[0] != "app") || (wantSrc == h.ip && wantSrc.keys[0] != "profile") {
				t.Errorf("source called with keys %v", wantSrc.keys)
			}
			wantSrc.mu.Unlock()
			if got := testutil.ToFloat64(h.s.served.WithLabelValues(string(tc.want))); got != 1 {
				t.Errorf("served_total{kind=%s} = %v, want 1", tc.want, got)
			}
		})
	}
}

func TestSelectorFallback(t *testing.T) {
	errSTS := errors.New("sts down")
	cases := []struct {
		name      string
		fallback  Fallback
		ipErr     error
		wantKey   string
		wantErr   error
		fallback1 float64
	}{
		{"instance-profile", FallbackInstanceProfile, nil, "ASIAPROFILE", nil, 1},
		{"none", FallbackNone, nil, "", errSTS, 0},
		{"instance-profile also failing", FallbackInstanceProfile, errors.New("imds down"), "", errSTS, 0},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			h := newSelectorHarness(t, tc.fallback)
			h.s.Set(Decide(&Policy{Default: Rule{Stage: StageOn}}, "api-asg", 5))
			h.wl.set(errSTS)
			h.ip.set(tc.ipErr)
			for range 3 {
				c, err := h.s.Credentials(context.Background(), "app")
				if !errors.Is(err, tc.wantErr) || c.AccessKeyID != tc.wantKey {
					t.Fatalf("Credentials = %v, %v; want %s, %v", c, err, tc.wantKey, tc.wantErr)
				}
			}
			if got := testutil.ToFloat64(h.s.fallbacks); got != 3*tc.fallback1 {
				t.Errorf("fallbacks_total = %v, want %v", got, 3*tc.fallback1)
			}
			if got := testutil.ToFloat64(h.s.served.WithLabelValues("instance-profile")); got != 3*tc.fallback1 {
				t.Errorf("served_total{instance-profile} = %v", got)
			}
			if tc.fallback1 > 0 {
				if n := h.logs.FilterMessageSnippet("serving instance-profile credentials").Len(); n != 1 {
					t.Errorf("%d fallback warnings for 3 fallbacks, want 1 (rate-limited)", n)
				}
			}
			// Workload recovers: served again, no fallback.
			h.wl.set(nil)
			if c, err := h.s.Credentials(context.Background(), "app"); err != nil || c.AccessKeyID != "ASIAWORKLOAD" {
				t.Errorf("after recovery: %v, %v", c, err)
			}
		})
	}
}

// keyedSource is a hand-written Source with credentials per key; a key it
// does not hold fails like a cache with nothing valid.
type keyedSource struct {
	mu   sync.Mutex
	m    map[string]creds.Credentials
	keys []string
}

func (k *keyedSource) Credentials(_ context.Context, key string) (creds.Credentials, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.keys = append(k.keys, key)
	c, ok := k.m[key]
	if !ok {
		return creds.Credentials{}, errors.New("nothing valid cached for " + key)
	}
	return c, nil
}

type clientKey struct{}

// TestSelectorWorkloadKeyFor: with WorkloadKeyFor the workload kind serves
// each request the key it chooses (per-workload roles), the instance-profile
// kind ignores it, the fallback applies to every key, and shadow verification
// keeps checking WorkloadKey.
func TestSelectorWorkloadKeyFor(t *testing.T) {
	wl := &keyedSource{m: map[string]creds.Credentials{
		"app":     newFakeSource("ASIAHOSTROLE", wlAccount).c,
		"billing": newFakeSource("ASIABILLING", wlAccount).c,
	}}
	ip := newFakeSource("ASIAPROFILE", ipAccount)
	s, err := NewSelector(SelectorConfig{
		Workload: wl, WorkloadKey: "app",
		WorkloadKeyFor: func(ctx context.Context) string {
			if k, ok := ctx.Value(clientKey{}).(string); ok {
				return k
			}
			return "app"
		},
		InstanceProfile: ip, InstanceProfileKey: "profile",
		Fallback: FallbackInstanceProfile,
	}, nil, prometheus.NewPedanticRegistry())
	if err != nil {
		t.Fatal(err)
	}
	as := func(client string) context.Context {
		if client == "" {
			return context.Background()
		}
		return context.WithValue(context.Background(), clientKey{}, client)
	}
	check := func(stage, client, want string) {
		t.Helper()
		// The requested name never matters: the proxy passes the listed one.
		c, err := s.Credentials(as(client), "ip-role")
		if err != nil || c.AccessKeyID != want {
			t.Errorf("%s, client %q: %s, %v; want %s", stage, client, c.AccessKeyID, err, want)
		}
	}
	for _, client := range []string{"", "billing", "reports"} {
		check("off", client, "ASIAPROFILE")
	}
	s.Set(Decide(&Policy{Default: Rule{Stage: StageOn}}, "api-asg", 5))
	check("on", "", "ASIAHOSTROLE")
	check("on", "billing", "ASIABILLING")
	check("on, nothing cached for the workload's role: fallback", "reports", "ASIAPROFILE")
	if got := testutil.ToFloat64(s.fallbacks); got != 1 {
		t.Errorf("fallbacks_total = %v, want 1", got)
	}
	if _, err := s.verifyOnce(as("billing"), &fakeVerifier{arn: "arn:aws:sts::" + wlAccount + ":assumed-role/app/i-1"}); err != nil {
		t.Fatal(err)
	}
	if last := wl.keys[len(wl.keys)-1]; last != "app" {
		t.Errorf("shadow verification read key %q, want the host role's", last)
	}
}

func TestSelectorNoFallbackOnCancelledRequest(t *testing.T) {
	h := newSelectorHarness(t, FallbackInstanceProfile)
	h.s.Set(Decide(nil, "", 0))
	h.wl.set(context.Canceled)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := h.s.Credentials(ctx, "app"); !errors.Is(err, context.Canceled) {
		t.Errorf("Credentials on a cancelled request = %v", err)
	}
	if h.ip.calls != 0 {
		t.Error("fell back for a cancelled request")
	}
}

// TestSelectorSetWhileServing flips the decision while requests run (for
// the race detector) and checks every request got one kind or the other.
func TestSelectorSetWhileServing(t *testing.T) {
	h := newSelectorHarness(t, FallbackNone)
	on := Decide(&Policy{Default: Rule{Stage: StageOn}}, "g", 1)
	off := Decide(&Policy{}, "g", 1)
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	var bad sync.Map
	for range 8 {
		wg.Go(func() {
			for ctx.Err() == nil {
				c, err := h.s.Credentials(ctx, "app")
				if err != nil || (c.AccessKeyID != "ASIAWORKLOAD" && c.AccessKeyID != "ASIAPROFILE") {
					bad.Store(c.AccessKeyID, err)
				}
				_ = h.s.Decision()
			}
		})
	}
	for i := range 200 {
		if i%2 == 0 {
			h.s.Set(on)
		} else {
			h.s.Set(off)
		}
	}
	h.s.Set(on)
	cancel()
	wg.Wait()
	bad.Range(func(k, v any) bool { t.Errorf("bad answer %v: %v", k, v); return true })
	if got := testutil.ToFloat64(h.s.stageChanges); got != 200 {
		t.Errorf("stage_changes_total = %v, want 200", got)
	}
	// After Set returns, new requests see the new decision at once.
	h.s.Set(off)
	if c, _ := h.s.Credentials(context.Background(), "app"); c.AccessKeyID != "ASIAPROFILE" {
		t.Errorf("served %s right after Set(off)", c.AccessKeyID)
	}
}

func TestSelectorMetrics(t *testing.T) {
	h := newSelectorHarness(t, FallbackInstanceProfile)
	l, err := NewLoader("/etc/imdsproxy/rollout.yaml", LoaderOptions{}, nil, h.reg)
	if err != nil {
		t.Fatalf("loader and selector on one registry: %v", err)
	}
	_ = l
	p := &Policy{Version: "v7", Groups: map[string]Rule{"api-asg": {Stage: StageCanary, Percent: 25}}}
	h.s.Set(Decide(p, "api-asg", 1234))
	want := `
# HELP imdsproxy_rollout_bucket_number This host's canary bucket, 0..9999 (canary N% selects buckets below N*100); -1 when unknown.
# TYPE imdsproxy_rollout_bucket_number gauge
imdsproxy_rollout_bucket_number 1234
# HELP imdsproxy_rollout_canary_percent The canary percentage of this host's group when its stage is canary, else 0.
# TYPE imdsproxy_rollout_canary_percent gauge
imdsproxy_rollout_canary_percent 25
# HELP imdsproxy_rollout_host_info This host's instance group and where it came from (tag, config, none); always 1.
# TYPE imdsproxy_rollout_host_info gauge
imdsproxy_rollout_host_info{group="api-asg",group_source="tag"} 1
# HELP imdsproxy_rollout_kill_switch Whether the rollout policy's kill switch is set (1) or not (0).
# TYPE imdsproxy_rollout_kill_switch gauge
imdsproxy_rollout_kill_switch 0
# HELP imdsproxy_rollout_stage This host's rollout stage: 1 for the current stage (off, shadow, canary, on), 0 for the others.
# TYPE imdsproxy_rollout_stage gauge
imdsproxy_rollout_stage{stage="canary"} 1
imdsproxy_rollout_stage{stage="off"} 0
imdsproxy_rollout_stage{stage="on"} 0
imdsproxy_rollout_stage{stage="shadow"} 0
`
	names := []string{"imdsproxy_rollout_bucket_number", "imdsproxy_rollout_canary_percent", "imdsproxy_rollout_host_info",
		"imdsproxy_rollout_kill_switch", "imdsproxy_rollout_stage"}
	if err := testutil.GatherAndCompare(h.reg, strings.NewReader(want), names...); err != nil {
		t.Error(err)
	}
	problems, err := testutil.GatherAndLint(h.reg)
	if err != nil {
		t.Fatalf("GatherAndLint: %v", err)
	}
	for _, p := range problems {
		t.Errorf("promlint: %s: %s", p.Metric, p.Text)
	}
	// Every documented metric name is exported (series pre-created).
	mfs, err := h.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]bool{}
	for _, mf := range mfs {
		got[mf.GetName()] = true
	}
	for _, n := range []string{
		"imdsproxy_rollout_stage", "imdsproxy_rollout_canary_percent", "imdsproxy_rollout_bucket_number",
		"imdsproxy_rollout_host_info", "imdsproxy_rollout_kill_switch", "imdsproxy_rollout_served_total",
		"imdsproxy_rollout_fallbacks_total", "imdsproxy_rollout_stage_changes_total",
		"imdsproxy_rollout_shadow_verifications_total", "imdsproxy_rollout_policy_loads_total",
		"imdsproxy_rollout_policy_last_load_successful", "imdsproxy_rollout_policy_last_success_timestamp_seconds",
	} {
		if !got[n] {
			t.Errorf("metric %s not exported", n)
		}
	}
	// Kill switch flips the gauges.
	h.s.Set(Decide(&Policy{KillSwitch: true}, "api-asg", 1234))
	want = `
# HELP imdsproxy_rollout_kill_switch Whether the rollout policy's kill switch is set (1) or not (0).
# TYPE imdsproxy_rollout_kill_switch gauge
imdsproxy_rollout_kill_switch 1
# HELP imdsproxy_rollout_stage This host's rollout stage: 1 for the current stage (off, shadow, canary, on), 0 for the others.
# TYPE imdsproxy_rollout_stage gauge
imdsproxy_rollout_stage{stage="canary"} 0
imdsproxy_rollout_stage{stage="off"} 1
imdsproxy_rollout_stage{stage="on"} 0
imdsproxy_rollout_stage{stage="shadow"} 0
`
	if err := testutil.GatherAndCompare(h.reg, strings.NewReader(want), "imdsproxy_rollout_kill_switch", "imdsproxy_rollout_stage"); err != nil {
		t.Error(err)
	}
	if got := testutil.ToFloat64(h.s.stageChanges); got != 1 {
		t.Errorf("stage_changes_total = %v, want 1 (the first Set is not a change)", got)
	}
	if n := h.logs.FilterMessage("rollout decision changed").Len(); n != 1 {
		t.Errorf("%d stage change log lines, want 1", n)
	}
}

// fakeVerifier returns a fixed ARN or error and counts calls.
type fakeVerifier struct {
	mu    sync.Mutex
	arn   string
	err   error
	calls int
	keys  []string
}

func (v *fakeVerifier) set(arn string, err error) {
	v.mu.Lock()
	v.arn, v.err = arn, err
	v.mu.Unlock()
}

func (v *fakeVerifier) count() int { v.mu.Lock(); defer v.mu.Unlock(); return v.calls }

func (v *fakeVerifier) Verify(ctx context.Context, c creds.Credentials) (string, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.calls++
	v.keys = append(v.keys, c.AccessKeyID)
	return v.arn, v.err
}

func TestRunShadow(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newSelectorHarness(t, FallbackNone)
		v := &fakeVerifier{arn: "arn:aws:sts::" + wlAccount + ":assumed-role/app/i-1"}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- h.s.RunShadow(ctx, v, time.Minute) }()

		// Not in shadow: nothing happens.
		h.s.Set(Decide(&Policy{}, "g", 1))
		time.Sleep(5 * time.Minute)
		synctest.Wait()
		if v.count() != 0 {
			t.Fatalf("verified %d times outside shadow", v.count())
		}

		// Entering shadow: verified at once, then every interval.
		shadow := Decide(&Policy{Default: Rule{Stage: StageShadow}}, "g", 1)
		h.s.Set(shadow)
		synctest.Wait()
		if v.count() != 1 {
			t.Fatalf("verified %d times right after entering shadow, want 1", v.count())
		}
		st := h.s.Shadow()
		if st.LastResult != "success" || st.LastARN != v.arn || st.LastError != "" || st.LastCheck.IsZero() {
			t.Errorf("Shadow() = %+v", st)
		}
		// Served credentials stay the instance profile's in shadow.
		if c, _ := h.s.Credentials(ctx, "app"); c.AccessKeyID != "ASIAPROFILE" {
			t.Errorf("shadow served %s", c.AccessKeyID)
		}
		time.Sleep(time.Minute + time.Second)
		synctest.Wait()
		if v.count() != 2 {
			t.Fatalf("verified %d times after one interval, want 2", v.count())
		}
		// Re-setting the same stage does not verify again at once.
		h.s.Set(shadow)
		synctest.Wait()
		if v.count() != 2 {
			t.Errorf("re-Set of shadow verified again: %d", v.count())
		}

		// Failure of the verifier.
		v.set("", errors.New("InvalidClientTokenId"))
		time.Sleep(time.Minute)
		synctest.Wait()
		st = h.s.Shadow()
		if st.LastResult != "failure" || !strings.Contains(st.LastError, "InvalidClientTokenId") || st.LastARN != v.arnOK() {
			t.Errorf("after a failure: %+v", st)
		}
		// Failure to get workload credentials.
		h.wl.set(errors.New("sts down"))
		time.Sleep(time.Minute)
		synctest.Wait()
		if st := h.s.Shadow(); st.LastResult != "failure" || !strings.Contains(st.LastError, "sts down") {
			t.Errorf("after a fetch failure: %+v", st)
		}
		// Wrong account.
		h.wl.set(nil)
		v.set("arn:aws:sts::999999999999:assumed-role/app/i-1", nil)
		time.Sleep(time.Minute)
		synctest.Wait()
		if st := h.s.Shadow(); st.LastResult != "failure" || !strings.Contains(st.LastError, "account") {
			t.Errorf("after an account mismatch: %+v", st)
		}
		if got := testutil.ToFloat64(h.s.verifications.WithLabelValues("success")); got != 2 {
			t.Errorf("verifications success = %v, want 2", got)
		}
		if got := testutil.ToFloat64(h.s.verifications.WithLabelValues("failure")); got != 3 {
			t.Errorf("verifications failure = %v, want 3", got)
		}

		// Leaving shadow stops verification.
		n := v.count()
		h.s.Set(Decide(&Policy{Default: Rule{Stage: StageOn}}, "g", 1))
		time.Sleep(10 * time.Minute)
		synctest.Wait()
		if v.count() != n {
			t.Errorf("verified %d times after leaving shadow", v.count()-n)
		}
		// Re-entering verifies at once again.
		v.set("arn:aws:sts::"+wlAccount+":assumed-role/app/i-1", nil)
		h.s.Set(shadow)
		synctest.Wait()
		if v.count() != n+1 || h.s.Shadow().LastResult != "success" {
			t.Errorf("re-entering shadow: %d calls, %+v", v.count()-n, h.s.Shadow())
		}

		cancel()
		if err := <-done; err != nil {
			t.Errorf("RunShadow returned %v, want nil", err)
		}
	})
}

func (v *fakeVerifier) arnOK() string { return "arn:aws:sts::" + wlAccount + ":assumed-role/app/i-1" }

func TestRunShadowArgs(t *testing.T) {
	h := newSelectorHarness(t, FallbackNone)
	if err := h.s.RunShadow(context.Background(), nil, time.Minute); err == nil {
		t.Error("RunShadow without a verifier accepted")
	}
	if err := h.s.RunShadow(context.Background(), &fakeVerifier{}, 0); err == nil {
		t.Error("RunShadow with interval 0 accepted")
	}
}
