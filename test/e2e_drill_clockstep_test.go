package test

// The drill of the clock stepped forward an hour.

import (
	"context"
	"fmt"
	"net/http"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/imdsproxy/imdsproxy/test/e2e"
	"github.com/imdsproxy/imdsproxy/test/fakes/oidc"
	"github.com/imdsproxy/imdsproxy/test/fakes/sts"
)

// drillClockStep: the host clock steps forward an hour.
//
// Not done here: step the daemon's own CLOCK_REALTIME. That disturbs
// everything else on the machine and these drills run alongside other
// tests, so TestClockStepReal (e2e_clockstep_test.go) does it in a serial
// step of its own (`make test`, IMDSPROXY_CLOCK_STEP=1). Here, a time
// namespace (unshare --time) offsets only CLOCK_MONOTONIC and
// CLOCK_BOOTTIME; and libfaketime (Debian's faketime) works by LD_PRELOAD on
// libc, which Go bypasses (the runtime reads the clock through the vDSO):
// `faketime -f +1h` shifts date(1) but not a Go program, checked with
// faketime 0.9.10 and Go 1.26.
//
// What is done instead: the rest of the world steps back an hour, which is
// the same skew seen from the daemon. The fake STS runs on a clock that jumps
// one hour behind the host's after the daemon has cached credentials, and the
// token agent (on the world's clock) writes tokens that are valid for two
// hours. STS then issues credentials whose Expiration, read with the host
// clock, is already past. The daemon must keep serving the cached
// credentials while they are valid, never serve the skewed ones (every
// answer's Expiration is after now + margin), report class invalid_response
// naming the host clock, answer an error document once nothing valid
// remains, and recover by itself when the clocks agree again.
//
// The daemon's own clock jumping (cached credentials suddenly an hour older;
// refresh timers on Go's monotonic clock, which a wall-clock step does not
// move) is covered by TestClockStepReal: the cache never sleeps more than
// 5 s, compares wall and monotonic time at each wake, refreshes whatever the
// step made due, and reports the step (imdsproxy_cache_clock_steps_total,
// log "wall clock stepped").
func drillClockStep(t *testing.T) {
	var skew atomic.Int64 // world clock minus host clock, nanoseconds
	world := func() time.Time { return time.Now().Add(time.Duration(skew.Load())) }
	dir := t.TempDir()
	issuer := oidc.Start(t)
	fake := sts.Start(t, sts.Config{Issuer: issuer, RoleARN: e2e.RoleARN, Now: world})
	fake.SetSessionLength(drillSession)
	tokenFile := filepath.Join(dir, "world-token.jwt")
	var jwtMu sync.Mutex
	var jwts []string
	writeToken := func() {
		now := world()
		jwt := issuer.Mint(oidc.Claims{Subject: "host-1", IssuedAt: now, ExpiresAt: now.Add(2 * time.Hour)})
		jwtMu.Lock()
		jwts = append(jwts, jwt)
		jwtMu.Unlock()
		if err := oidc.WriteTokenFile(tokenFile, jwt); err != nil {
			t.Fatal(err)
		}
	}
	writeToken()

	opts := drillOptions()
	opts.identityYAML = func(*daemonEnv) string {
		return e2e.WebIdentityYAML(e2e.RoleARN, e2e.RoleName, tokenFile)
	}
	// The daemon talks to the skewed STS (the last AWS_ENDPOINT_URL_STS wins).
	opts.extraEnv = []string{"AWS_ENDPOINT_URL_STS=" + fake.URL}
	opts.extraSecrets = func() map[string]string {
		out := map[string]string{}
		for i, is := range fake.Issued() {
			out[fmt.Sprintf("skewed STS SecretAccessKey #%d", i)] = is.SecretAccessKey
			out[fmt.Sprintf("skewed STS SessionToken #%d", i)] = is.SessionToken
		}
		jwtMu.Lock()
		defer jwtMu.Unlock()
		for i, j := range jwts {
			out[fmt.Sprintf("world JWT #%d", i)] = j
		}
		return out
	}
	e := startDaemon(t, opts)
	first, ok := fake.Last()
	if !ok {
		t.Fatal("ready without credentials from the skewed STS")
	}
	validUntil := first.Expiration.Add(-drillMargin)
	served := func(d e2e.CredDoc) error {
		is, ok := fake.Find(d.AccessKeyId)
		if !ok || is.SecretAccessKey != d.SecretAccessKey || is.SessionToken != d.Token {
			return fmt.Errorf("served %s, not what the STS issued", d.AccessKeyId)
		}
		return nil
	}

	// The step.
	skew.Store(int64(-time.Hour))
	writeToken()
	callsBefore := fake.Calls()
	stepAt := time.Now()

	stop := make(chan struct{})
	rz := e.watchReadyz(stop)
	s := e.drillServe(t, validUntil.Add(-2*time.Second), drillClients{wantAK: first.AccessKeyID, served: served})
	close(stop)
	s.check(t, "after the step, while valid credentials remain")
	if bad := rz.notOK(); len(bad) > 0 {
		t.Errorf("/readyz not 200 while valid credentials were cached: %v", bad[:min(len(bad), 3)])
	}
	if n := e.refreshFailures(t, "invalid_response"); n < 1 {
		t.Errorf(`imdsproxy_cache_refreshes_total{result="failure",class="invalid_response"} = %v, want >= 1`, n)
	}
	if !e.drillLogged("credential refresh failed", map[string]any{"class": "invalid_response", "serving_last_good": true}) {
		t.Errorf(`no "credential refresh failed" log line naming class invalid_response`)
	}

	time.Sleep(time.Until(validUntil.Add(300 * time.Millisecond)))
	d, err := e.fetchCreds(context.Background())
	if err == nil || d.Code == "" || d.AccessKeyId != "" || d.SecretAccessKey != "" {
		t.Errorf("after expiry with the clock skewed: %v %+v, want an error document without credentials", err, d.Code)
	}
	body := e.drillWaitReadyz(t, http.StatusServiceUnavailable, 2*time.Second, ": invalid_response: ", "check the host clock")
	t.Logf("/readyz with the clock skewed: %s", strings.TrimSpace(body))
	calls := fake.Calls() - callsBefore
	if bound := 2 * drillMaxFetches(time.Since(stepAt), 0); calls > bound {
		t.Errorf("STS called %d times in %v with the clock skewed, bound %d", calls, time.Since(stepAt), bound)
	}

	// The clocks agree again.
	skew.Store(0)
	took := e.drillWaitFreshFrom(t, first.AccessKeyID, drillRecoverWithin, served)
	t.Logf("fresh credentials %v after the clocks agreed again", took.Round(time.Millisecond))
}
