package test

import (
	"context"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/imdsproxy/imdsproxy/test/e2e"
	"github.com/imdsproxy/imdsproxy/test/fakes/sts"
)

// TestNoSecretsLeak drives the daemon through success, refresh, STS errors,
// a token rotation and a reload with debug logging on, then scans its whole
// log, /debug/cache and /metrics for every secret of the run.
func TestNoSecretsLeak(t *testing.T) {
	t.Parallel()
	e := startDaemon(t, envOptions{sessionLength: 8 * time.Second, expiryMargin: time.Second})
	ctx := context.Background()
	fetch := func() {
		if _, err := e.fetchCreds(ctx); err != nil {
			t.Logf("fetch: %v", err)
		}
		// the listing and token routes too
		if tok, err := e2e.IMDSToken(ctx, e2e.Client, e.imdsURL, 300); err == nil {
			_, _, _ = e2e.IMDSGet(ctx, e2e.Client, e.imdsURL, "/latest/meta-data/iam/security-credentials/", tok)
			_, _, _ = e2e.IMDSGet(ctx, e2e.Client, e.imdsURL, "/latest/meta-data/instance-id", tok)
		}
	}
	fetch()

	// Error paths: errors from STS while the token is presented.
	for _, m := range []sts.Mode{sts.ModeInvalidToken, sts.ModeIDPError, sts.ModeThrottle} {
		e.sts.SetMode(m)
		time.Sleep(1500 * time.Millisecond)
		fetch()
	}
	e.sts.SetMode(sts.ModeOK)
	e.rotateToken(t)
	e.signal(t, syscall.SIGHUP)

	deadline := time.Now().Add(20 * time.Second)
	for len(e.sts.Issued()) < 2 && time.Now().Before(deadline) {
		fetch()
		time.Sleep(200 * time.Millisecond)
	}
	fetch()
	issued := e.sts.Issued()
	if len(issued) < 2 {
		t.Fatalf("only %d credentials issued; wanted a refresh during the run. STS calls: %+v", len(issued), e.sts.CallLog())
	}

	_, cacheDoc := e.debugCache(t)
	e.assertNoSecrets(t, "/debug/cache", cacheDoc)
	if !strings.Contains(cacheDoc, "ASIA") {
		t.Errorf("/debug/cache does not show the access key id: %s", cacheDoc)
	}
	e.assertNoSecrets(t, "/metrics", e.metrics(t))

	if code := e.stop(); code != 0 {
		t.Errorf("exit code %d on SIGTERM", code)
	}
	log := e.log.String()
	if len(log) == 0 {
		t.Fatal("the daemon logged nothing (expected JSON logs on stderr at debug level)")
	}
	e.assertNoSecrets(t, "daemon log", log)
	t.Logf("scanned %d bytes of log for %d secrets of %d issued credentials", len(log), len(e.secrets()), len(issued))
}
