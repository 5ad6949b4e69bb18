package test

import (
	"context"
	"fmt"
	"net"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/imdsproxy/imdsproxy/test/e2e"
	"github.com/imdsproxy/imdsproxy/test/fakes/sts"
)

// TestAdminEndpoints checks /healthz, /readyz, /debug/cache and the metric
// names the docs promise.
func TestAdminEndpoints(t *testing.T) {
	t.Parallel()
	e := startDaemon(t, envOptions{})
	if _, err := e.fetchCreds(context.Background()); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{"/healthz", "/readyz"} {
		if st, body, err := e2e.GetURL(e.adminURL + p); err != nil || st != 200 {
			t.Errorf("GET %s: %d %q %v", p, st, body, err)
		}
	}
	dc, _ := e.debugCache(t)
	last, _ := e.sts.Last()
	if len(dc.Entries) != 1 {
		t.Fatalf("/debug/cache has %d entries, want 1", len(dc.Entries))
	}
	en := dc.Entries[0]
	if en.Key != e2e.RoleName || en.AccessKeyID != last.AccessKeyID || !en.Valid || en.Permanent || en.ConsecutiveFailures != 0 || en.LastError != "" {
		t.Errorf("/debug/cache entry %+v", en)
	}
	if exp, err := time.Parse(time.RFC3339, en.Expires); err != nil || exp.Sub(last.Expiration).Abs() > time.Second {
		t.Errorf("/debug/cache expires %q, STS issued %s", en.Expires, last.Expiration)
	}

	m := e.metrics(t)
	for _, re := range []string{
		`(?m)^imdsproxy_build_info\{.*\} 1$`,
		`(?m)^imdsproxy_cache_refreshes_total\{.*\} [1-9]`,
		`(?m)^imdsproxy_cache_requests_total\{.*result=.*\} [1-9]`,
		`(?m)^imdsproxy_http_requests_total\{.*code="200".*\} [1-9]`,
		`(?m)^imdsproxy_http_requests_total\{.*route=.*\} `,
		`(?m)^imdsproxy_imds_tokens_outstanding(\{.*\})? `,
		`(?m)^imdsproxy_cache_credentials_remaining_seconds\{.*key="app".*\} [1-9]`,
	} {
		if !regexp.MustCompile(re).MatchString(m) {
			t.Errorf("/metrics has no line matching %s", re)
		}
	}
	if strings.Contains(m, last.AccessKeyID) {
		t.Errorf("/metrics has the access key id as a label value (unbounded label)")
	}
}

// TestNotReadyWithoutCredentials: while STS denies access /readyz is 503 with
// a reason, no credentials are served, and readiness follows STS recovering.
func TestNotReadyWithoutCredentials(t *testing.T) {
	t.Parallel()
	e := startDaemon(t, envOptions{stsMode: sts.ModeAccessDenied, noWaitReady: true})
	deadline := time.Now().Add(5 * time.Second)
	for e.sts.Calls() == 0 && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	time.Sleep(300 * time.Millisecond)
	st, body, err := e2e.GetURL(e.adminURL + "/readyz")
	if err != nil || st != 503 || strings.TrimSpace(body) == "" {
		t.Errorf("/readyz while STS denies: %d %q %v, want 503 with a reason", st, body, err)
	}
	d, err := e.fetchCreds(context.Background())
	if err == nil || d.AccessKeyId != "" || d.SecretAccessKey != "" {
		t.Errorf("credentials served while STS denies: %+v err %v", d.AccessKeyId, err)
	} else {
		t.Logf("credential request while STS denies: %v", err)
	}
	dc, _ := e.debugCache(t)
	if len(dc.Entries) != 1 || dc.Entries[0].Valid || !dc.Entries[0].Permanent || dc.Entries[0].ErrorClass != "access_denied" {
		t.Errorf("/debug/cache while STS denies: %+v, want one invalid entry, permanent, class access_denied", dc.Entries)
	}

	e.sts.SetMode(sts.ModeOK)
	e.waitReady(t, 15*time.Second)
	d, err = e.fetchCreds(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if err := e.checkServed(d); err != nil {
		t.Fatal(err)
	}
}

func TestSIGTERM(t *testing.T) {
	t.Parallel()
	e := startDaemon(t, envOptions{})
	if _, err := e.fetchCreds(context.Background()); err != nil {
		t.Fatal(err)
	}
	began := time.Now()
	if code := e.stop(); code != 0 {
		t.Fatalf("exit code %d on SIGTERM, want 0: %v", code, e.proc.Err())
	}
	t.Logf("exited 0 %v after SIGTERM", time.Since(began).Round(time.Millisecond))
	if c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", e.imdsPort), time.Second); err == nil {
		c.Close()
		t.Error("IMDS port still accepting after exit")
	}
}

func TestSIGHUP(t *testing.T) {
	t.Parallel()
	e := startDaemon(t, envOptions{})
	ctx := context.Background()
	d0, err := e.fetchCreds(ctx)
	if err != nil {
		t.Fatal(err)
	}
	errorLines := func() []string {
		var out []string
		for _, l := range e.logLines() {
			if lv, _ := l["level"].(string); strings.EqualFold(lv, "error") {
				msg, _ := l["msg"].(string)
				out = append(out, fmt.Sprintf("%s %v", msg, l["error"]))
			}
		}
		return out
	}

	t.Run("good config", func(t *testing.T) {
		before := len(errorLines())
		e.signal(t, syscall.SIGHUP)
		time.Sleep(time.Second)
		if e.exited() {
			t.Fatalf("daemon exited on SIGHUP: %v", e.proc.Err())
		}
		if n := errorLines(); len(n) != before {
			t.Errorf("error logged on a good reload: %v", n[before:])
		}
		d, err := e.fetchCreds(ctx)
		if err != nil || d.AccessKeyId != d0.AccessKeyId {
			t.Fatalf("after reload: %v %s", err, d.AccessKeyId)
		}
	})

	t.Run("broken config", func(t *testing.T) {
		good := e.config()
		before := len(errorLines())
		e.writeConfig(t, good+"no_such_key: true\nlisten: [\n")
		e.signal(t, syscall.SIGHUP)
		deadline := time.Now().Add(5 * time.Second)
		for len(errorLines()) == before && time.Now().Before(deadline) && !e.exited() {
			time.Sleep(50 * time.Millisecond)
		}
		if e.exited() {
			t.Fatalf("daemon exited on SIGHUP with a broken config: %v", e.proc.Err())
		}
		if got := errorLines(); len(got) == before {
			t.Errorf("no error logged for a broken config on SIGHUP")
		} else {
			t.Logf("logged: %v", got[before:])
		}
		d, err := e.fetchCreds(ctx)
		if err != nil || d.AccessKeyId != d0.AccessKeyId {
			t.Fatalf("not serving the same credentials after a bad reload: %v %s", err, d.AccessKeyId)
		}
		if st, _, _ := e2e.GetURL(e.adminURL + "/readyz"); st != 200 {
			t.Errorf("/readyz %d after a bad reload", st)
		}
		if v, ok := e.scrape(t).Value("imdsproxy_config_last_reload_successful", nil); !ok || v != 0 {
			t.Errorf("imdsproxy_config_last_reload_successful is not 0 after a refused reload")
		}
		out, _ := runStatusCommand(t, e)
		if !strings.Contains(out, "REFUSED") || !strings.Contains(out, "running configuration is kept") {
			t.Errorf("imdsproxy status does not say the reload was refused:\n%s", out)
		}
		e.writeConfig(t, good) // so the next test step and shutdown see a good file
	})
}
