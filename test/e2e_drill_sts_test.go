package test

// Drills of STS: slow beyond the fetch timeout, hanging, failing in every
// class (the generic drill), and slow but within the timeout.

import (
	"testing"
	"time"

	"github.com/imdsproxy/imdsproxy/test/fakes/sts"
)

func stsMode(m sts.Mode) (inject, clear func(*testing.T, *daemonEnv)) {
	return func(_ *testing.T, e *daemonEnv) { e.sts.SetMode(m) },
		func(_ *testing.T, e *daemonEnv) { e.sts.SetMode(sts.ModeOK) }
}

func stsDrill(name string, m sts.Mode, class string, permanent bool, code string, perFetch int) drillFault {
	in, cl := stsMode(m)
	return drillFault{name: name, inject: in, clear: cl, class: class, permanent: permanent, code: code, stsPerFetch: perFetch}
}

// stsDrills: STS slow beyond the fetch timeout, hanging, and failing in
// every class.
func stsDrills() []drillFault {
	slow30 := drillFault{
		name:   "slow30s",
		inject: func(_ *testing.T, e *daemonEnv) { e.sts.SetDelay(30 * time.Second) },
		clear:  func(_ *testing.T, e *daemonEnv) { e.sts.SetDelay(0) },
		class:  "timeout", code: "ServiceUnavailable", stsPerFetch: 1, minFetch: drillFetchTimeout,
	}
	hang := stsDrill("hang", sts.ModeHang, "timeout", false, "ServiceUnavailable", 1)
	hang.minFetch = drillFetchTimeout
	return []drillFault{
		slow30,
		hang,
		// SDK attempts per fetch: 2 (exchange.DefaultMaxAttempts).
		stsDrill("5xx", sts.ModeFail5xx, "server", false, "ServiceUnavailable", 2),
		stsDrill("503", sts.ModeUnavailable, "server", false, "ServiceUnavailable", 2),
		stsDrill("throttling", sts.ModeThrottle, "throttling", false, "Throttling", 2),
		stsDrill("IDPCommunicationError", sts.ModeIDPError, "idp", false, "ServiceUnavailable", 2),
		// The exchange re-reads the token and retries once.
		stsDrill("InvalidIdentityToken", sts.ModeInvalidToken, "invalid_token", false, "InvalidIdentityToken", 4),
		stsDrill("AccessDenied", sts.ModeAccessDenied, "access_denied", true, "AssumeRoleUnauthorizedAccess", 2),
	}
}

// drillSTSSlow2s: STS answers every call after 2 s. Requests are still
// answered from the cache at once, refreshes succeed late, STS is called
// about once per half-life, and the slowness shows in the fetch duration
// metric.
func drillSTSSlow2s(t *testing.T) {
	const delay = 2 * time.Second
	opts := drillOptions()
	opts.stsDelay = delay
	e := startDaemon(t, opts)
	first, _ := e.sts.Last()
	callsBefore := e.sts.Calls()
	start := time.Now()
	// Past the first refresh (at about half the session) and its 2 s.
	until := first.IssuedAt.Add(drillSession/2 + drillSession/10 + delay + 2*time.Second)
	stop := make(chan struct{})
	rz := e.watchReadyz(stop)
	s := e.drillServe(t, until, drillClients{})
	close(stop)
	s.check(t, "STS slow 2s")
	if bad := rz.notOK(); len(bad) > 0 {
		t.Errorf("/readyz not 200 while STS was merely slow: %v", bad[:min(len(bad), 3)])
	}
	if len(s.keys) < 2 {
		t.Errorf("clients saw only %v: the late refresh never landed", s.keys)
	}
	m := e.scrape(t)
	if n := m.Sum("imdsproxy_cache_refreshes_total", map[string]string{"result": "failure"}); n != 0 {
		t.Errorf("%v refresh failures while STS was merely slow (fetch timeout %v)", n, drillFetchTimeout)
	}
	sum := m.Sum("imdsproxy_cache_fetch_duration_seconds_sum", map[string]string{"result": "success"})
	cnt := m.Sum("imdsproxy_cache_fetch_duration_seconds_count", map[string]string{"result": "success"})
	if cnt < 2 || sum/cnt < delay.Seconds()*0.9 {
		t.Errorf("fetch duration metric: %v successful fetches, mean %.2fs; want >= 2 of about %v", cnt, sum/cnt, delay)
	}
	calls := e.sts.Calls() - callsBefore
	t.Logf("STS calls in %v: %d", time.Since(start).Round(100*time.Millisecond), calls)
	if calls < 1 || calls > 2 {
		t.Errorf("STS calls in %v of a %v session: %d, want 1..2 (one refresh at about half-life)", time.Since(start), drillSession, calls)
	}
}
