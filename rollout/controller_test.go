package rollout

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/imdsproxy/imdsproxy/config"
	"github.com/imdsproxy/imdsproxy/creds"
)

// tags is a TagReader serving one group tag.
type tags struct{ group string }

func (g tags) Get(context.Context, string) ([]byte, error) { return []byte(g.group), nil }

func writePolicy(t *testing.T, path, doc string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(doc), 0o600); err != nil {
		t.Fatal(err)
	}
}

func section(policy string) Section {
	s := Section{Policy: policy, PollInterval: config.Duration(time.Hour)}
	if err := s.Validate(); err != nil {
		panic(err)
	}
	return s
}

func newController(t *testing.T, group string) (*Controller, *prometheus.Registry) {
	t.Helper()
	reg := prometheus.NewRegistry()
	c, err := NewController(tags{group}, "i-0123456789abcdef0", nil, reg)
	if err != nil {
		t.Fatal(err)
	}
	return c, reg
}

// waitChanged waits for a Changed signal.
func waitChanged(t *testing.T, c *Controller) {
	t.Helper()
	select {
	case <-c.Changed():
	case <-time.After(10 * time.Second):
		t.Fatal("no change reported")
	}
}

func TestControllerConfigure(t *testing.T) {
	dir := t.TempDir()
	a, b := filepath.Join(dir, "a.yaml"), filepath.Join(dir, "b.yaml")
	writePolicy(t, a, "version: a1\ndefault: off\ngroups: {api-asg: on}\n")
	writePolicy(t, b, "version: b1\nkill_switch: true\n")
	c, reg := newController(t, "api-asg")

	if d, on := c.Decision(); on || d != (Decision{}) {
		t.Fatalf("before Configure: %+v %v", d, on)
	}
	d, on, err := c.Configure(t.Context(), Settings{Config: section(a)})
	if err != nil || !on || d.Stage != StageOn || d.Serve != KindWorkload || d.Group != "api-asg" {
		t.Fatalf("Configure(a) = %+v %v %v", d, on, err)
	}
	waitChanged(t, c)

	// Another source: read at once, the decision follows.
	d, on, err = c.Configure(t.Context(), Settings{Config: section(b)})
	if err != nil || !on || !d.KillSwitch || d.Serve != KindInstanceProfile {
		t.Fatalf("Configure(b) = %+v %v %v", d, on, err)
	}
	waitChanged(t, c)
	st := c.Status()
	if st.Policy.Source != b || st.Policy.Version != "b1" || !st.KillSwitch || st.Bucket != Bucket("i-0123456789abcdef0") {
		t.Fatalf("status after the switch: %+v", st)
	}

	// A source that cannot be read: every host off until it is.
	d, _, err = c.Configure(t.Context(), Settings{Config: section(filepath.Join(dir, "missing.yaml"))})
	if err != nil || d.Stage != StageOff || d.Serve != KindInstanceProfile {
		t.Fatalf("unreadable source: %+v %v", d, err)
	}
	if st := c.Status(); st.Policy.LastError == "" {
		t.Fatal("the load error is not reported")
	}

	// Disabled: nothing decides; the metrics say so.
	if _, on, err := c.Configure(t.Context(), Settings{Config: Section{}}); on || err != nil {
		t.Fatalf("disable: %v %v", on, err)
	}
	if st := c.Status(); st.Enabled {
		t.Fatalf("status while disabled: %+v", st)
	}
	if err := testutil.GatherAndCompare(reg, strings.NewReader(`
# HELP imdsproxy_rollout_enabled Whether a rollout policy decides what this host serves (1) or not (0: rollout.policy is not set).
# TYPE imdsproxy_rollout_enabled gauge
imdsproxy_rollout_enabled 0
`), "imdsproxy_rollout_enabled"); err != nil {
		t.Error(err)
	}
	// And back on.
	if d, on, err := c.Configure(t.Context(), Settings{Config: section(a)}); !on || err != nil || d.Stage != StageOn {
		t.Fatalf("enable again: %+v %v %v", d, on, err)
	}
	if problems, err := testutil.GatherAndLint(reg); err != nil || len(problems) > 0 {
		t.Errorf("lint: %v %v", problems, err)
	}
}

// TestControllerRunFollowsPolicy: Run polls the current source and reports
// a change; after Configure switches sources it polls the new one.
func TestControllerRunFollowsPolicy(t *testing.T) {
	dir := t.TempDir()
	a := filepath.Join(dir, "a.yaml")
	writePolicy(t, a, "version: a1\ndefault: off\n")
	c, _ := newController(t, "api-asg")
	s := section(a)
	s.PollInterval = config.Duration(50 * time.Millisecond)
	if _, _, err := c.Configure(t.Context(), Settings{Config: s}); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	defer func() { cancel(); <-done }()
	waitChanged(t, c) // the first Configure
	writePolicy(t, a, "version: a2\ndefault: on\n")
	deadline := time.Now().Add(10 * time.Second)
	for {
		if d, _ := c.Decision(); d.Stage == StageOn {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the polled policy change was not applied")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

type fakeVerifier struct {
	mu    sync.Mutex
	calls int
	err   error
}

func (v *fakeVerifier) Verify(_ context.Context, c creds.Credentials) (string, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.calls++
	if v.err != nil {
		return "", v.err
	}
	return "arn:aws:sts::222222222222:assumed-role/app/s", nil
}

type fakeSource struct{ asked chan creds.Key }

func (f fakeSource) Get(_ context.Context, k creds.Key) (creds.Credentials, error) {
	f.asked <- k
	return creds.Credentials{AccessKeyID: "A", SecretAccessKey: "S", SessionToken: "T", AccountID: "222222222222",
		Expires: time.Now().Add(time.Hour)}, nil
}

func TestControllerShadow(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "p.yaml")
	writePolicy(t, p, "version: s1\ndefault: shadow\n")
	c, _ := newController(t, "")
	key := creds.Key{Kind: creds.KindWorkload, Role: creds.Role{Name: "app"}}
	if _, _, err := c.Configure(t.Context(), Settings{Config: section(p), ShadowKey: key}); err != nil {
		t.Fatal(err)
	}
	v := &fakeVerifier{}
	src := fakeSource{asked: make(chan creds.Key, 10)}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- c.RunShadow(ctx, v, src) }()
	defer func() { cancel(); <-done }()
	select {
	case k := <-src.asked:
		if k != key {
			t.Fatalf("verified %v, want the shadow key", k)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no shadow verification")
	}
	deadline := time.Now().Add(10 * time.Second)
	for c.Shadow().LastResult != "success" {
		if time.Now().After(deadline) {
			t.Fatalf("shadow status %+v", c.Shadow())
		}
		time.Sleep(10 * time.Millisecond)
	}
	if st := c.Status(); st.ShadowCheck.LastResult != "success" || st.ShadowCheck.LastARN == "" {
		t.Fatalf("status %+v", st.ShadowCheck)
	}
	if err := c.RunShadow(ctx, nil, src); err == nil {
		t.Error("RunShadow without a verifier")
	}
	v.mu.Lock()
	v.err = errors.New("InvalidClientTokenId")
	v.mu.Unlock()
}
