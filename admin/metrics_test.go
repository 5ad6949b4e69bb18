package admin

import (
	"sync/atomic"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// readyDaemon is a Daemon whose readiness a test sets.
type readyDaemon struct{ ready atomic.Bool }

func (d *readyDaemon) Status() Status      { return Status{Ready: d.ready.Load()} }
func (d *readyDaemon) Cache() []CacheEntry { return nil }

// TestReadyGauge: imdsproxy_ready follows the status at every scrape, and
// lints clean.
func TestReadyGauge(t *testing.T) {
	reg := prometheus.NewRegistry()
	d := &readyDaemon{}
	if err := RegisterReady(reg, d); err != nil {
		t.Fatal(err)
	}
	for _, ready := range []bool{false, true, false} {
		d.ready.Store(ready)
		mfs, err := reg.Gather()
		if err != nil || len(mfs) != 1 || mfs[0].GetName() != "imdsproxy_ready" || len(mfs[0].GetMetric()) != 1 {
			t.Fatalf("gathered %v, %v; want imdsproxy_ready alone", mfs, err)
		}
		want := 0.0
		if ready {
			want = 1
		}
		if v := mfs[0].GetMetric()[0].GetGauge().GetValue(); v != want {
			t.Errorf("ready %v: imdsproxy_ready = %v, want %v", ready, v, want)
		}
	}
	if problems, err := testutil.GatherAndLint(reg); err != nil || len(problems) > 0 {
		t.Fatalf("lint: %v %v", problems, err)
	}
	if err := RegisterReady(reg, d); err == nil {
		t.Error("registered twice without an error")
	}
}
