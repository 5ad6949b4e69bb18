package main

import (
	"bytes"
	"strings"
	"testing"
	"time"

	"github.com/imdsproxy/imdsproxy/cache"
)

// small is the short fleet of make test: 1,000 hosts booting over an hour,
// a quota of 10 requests per second, four simulated hours.
func small() Params {
	return Params{Hosts: 1000, Quota: 10, Latency: 100 * time.Millisecond, Duration: 4 * time.Hour,
		BootSpread: time.Hour, Seed: 7}
}

func TestFleet(t *testing.T) {
	slow := small()
	slow.Latency = 25 * time.Second // below the 30s fetch timeout
	once := small()
	once.BootSpread = 0
	outage := small()
	outage.OutageAt, outage.Outage, outage.Duration = 2*time.Hour, 30*time.Minute, 4*time.Hour+30*time.Minute

	for _, tc := range []struct {
		name  string
		p     Params
		check func(t *testing.T, r Result)
	}{
		{"jitter keeps the fleet under quota", small(), func(t *testing.T, r Result) {
			if r.Throttled != 0 || r.PeakRPS > 10 {
				t.Errorf("throttled %d, peak %d/s: want none throttled, peak <= quota 10", r.Throttled, r.PeakRPS)
			}
			// About one refresh per host every 27..33 minutes.
			if per := float64(r.Calls) / 1000 / 4; per < 1.8 || per > 2.6 {
				t.Errorf("%.2f calls per host per hour, want about 2.2", per)
			}
		}},
		{"slow STS never leaves a host without credentials", slow, func(t *testing.T, r Result) {
			if r.HostsWithout != 0 || r.WaitedOneCall != 0 || r.NeverGotCreds != 0 || r.Failed != 0 {
				t.Errorf("hosts without %d, one-call waits %d, never %d, failed %d: want all 0",
					r.HostsWithout, r.WaitedOneCall, r.NeverGotCreds, r.Failed)
			}
			if r.MinRemaining < 25*time.Minute {
				t.Errorf("least remaining lifetime served %s, want >= 25m", r.MinRemaining)
			}
		}},
		{"boot at once: backoff spreads the throttled start", once, func(t *testing.T, r Result) {
			if r.Throttled == 0 || r.NeverGotCreds != 0 || r.FirstCreds > 10*time.Minute || r.HostsWithout != 0 {
				t.Errorf("throttled %d, never %d, first creds %s, without %d: want throttling, then everyone served within 10m",
					r.Throttled, r.NeverGotCreds, r.FirstCreds, r.HostsWithout)
			}
		}},
		{"30-minute outage: calls bounded by the backoff", outage, func(t *testing.T, r Result) {
			bound := int64(1000 * AttemptBound(30*time.Minute, cache.DefaultBackoffInitial, cache.DefaultBackoffMax))
			if r.OutageCalls == 0 || r.OutageCalls > bound {
				t.Errorf("%d calls during the outage, want 1..%d", r.OutageCalls, bound)
			}
			if r.RecoverValid > cache.DefaultBackoffMax || r.RecoverFresh > cache.DefaultBackoffMax+time.Second {
				t.Errorf("recovery valid %s, fresh %s: want within backoff max %s", r.RecoverValid, r.RecoverFresh, cache.DefaultBackoffMax)
			}
			if r.HostsWithout != r.HostsWithoutDuring {
				t.Errorf("%d hosts ran out, %d during the outage: want only during it", r.HostsWithout, r.HostsWithoutDuring)
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc.check(t, Simulate(tc.p))
		})
	}
}

func TestDeterministic(t *testing.T) {
	if a, b := Simulate(small()), Simulate(small()); a != b {
		t.Errorf("two runs with one seed differ:\n%+v\n%+v", a, b)
	}
}

func TestAttemptBound(t *testing.T) {
	// 30m: retries after ≥1s, 2s, 4s, … 128s, then 150s each: 1 + 8 + 10 + 1.
	if got := AttemptBound(30*time.Minute, 2*time.Second, 5*time.Minute); got != 20 {
		t.Errorf("AttemptBound(30m) = %d, want 20", got)
	}
}

func TestRun(t *testing.T) {
	var out, errb bytes.Buffer
	if code := run([]string{"-hosts", "200", "-outage", "5m"}, &out, &errb); code != exitOK {
		t.Fatalf("exit %d: %s", code, errb.String())
	}
	for _, want := range []string{"STS calls:", "outage 5m0s", "all hosts valid again"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output lacks %q:\n%s", want, out.String())
		}
	}
	if code := run([]string{"-boot", "sometimes"}, &out, &errb); code != exitUsage {
		t.Errorf("bad -boot: exit %d, want %d", code, exitUsage)
	}
}
