package test

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/imdsproxy/imdsproxy/test/e2e"
)

// accessIdentity is the default identity config plus an access: section.
func accessIdentity(access string) func(e *daemonEnv) string {
	return func(e *daemonEnv) string {
		return e.defaultIdentity() + "access: " + access + "\n"
	}
}

// TestAccessDenyUID: the test's own uid is denied, so credential paths get
// 403 while the rest of the metadata still passes through.
func TestAccessDenyUID(t *testing.T) {
	uid := os.Getuid()
	e := startDaemon(t, envOptions{identityYAML: accessIdentity(fmt.Sprintf("{deny_uids: [%d]}", uid))})
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	tok, err := e2e.IMDSToken(ctx, e2e.Client, e.imdsURL, 300)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		path string
		want int
	}{
		{credPath, http.StatusForbidden},
		{"/latest/meta-data/iam/security-credentials-extended/" + e2e.RoleName, http.StatusForbidden},
		{"/latest/meta-data/iam/security-credentials/", http.StatusForbidden},
		{"/latest/meta-data/iam/info", http.StatusForbidden},
		{"/latest/meta-data/instance-id", http.StatusOK},
	} {
		code, body, err := e2e.IMDSGet(ctx, e2e.Client, e.imdsURL, tc.path, tok)
		if err != nil {
			t.Fatal(err)
		}
		if code != tc.want {
			t.Errorf("GET %s = %d %q, want %d", tc.path, code, body, tc.want)
		}
	}
	m := e.scrape(t)
	if v, ok := m.Value("imdsproxy_access_refused_total", map[string]string{"door": "imds", "outcome": "deny", "reason": "denied_uid"}); !ok || v != 4 {
		t.Errorf("metrics lack imdsproxy_access_refused_total{door=\"imds\",outcome=\"deny\",reason=\"denied_uid\"} 4:\n%s", m.Select("imdsproxy_access_refused_total", nil))
	}
	for _, l := range e.logLines() {
		if l["logger"] == "audit" {
			t.Errorf("audit line for a refused request: %v", l)
		}
	}
	e.assertNoSecrets(t, "daemon log", e.log.String())
}

// TestAccessAllowUIDAudit: the test's uid is allowed; the hand-out is
// audited with the uid, pid and access key id, never the secret.
func TestAccessAllowUIDAudit(t *testing.T) {
	uid := os.Getuid()
	e := startDaemon(t, envOptions{identityYAML: accessIdentity(fmt.Sprintf("{allow_uids: [%d]}", uid))})
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	d, err := e.fetchCreds(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := e.checkServed(d); err != nil {
		t.Fatal(err)
	}
	var audit []map[string]any
	deadline := time.Now().Add(5 * time.Second)
	for len(audit) == 0 && time.Now().Before(deadline) {
		for _, l := range e.logLines() {
			if l["logger"] == "audit" {
				audit = append(audit, l)
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	if len(audit) != 1 {
		t.Fatalf("%d audit lines, want 1; log:\n%s", len(audit), e.logTail(20))
	}
	a := audit[0]
	want := map[string]any{
		"msg": "credentials served", "level": "info", "identified": true,
		"uid": float64(uid), "pid": float64(os.Getpid()),
		"access_key_id": d.AccessKeyId, "role_name": e2e.RoleName, "route": "credentials",
	}
	for k, v := range want {
		if a[k] != v {
			t.Errorf("audit %s = %v, want %v (line %v)", k, a[k], v, a)
		}
	}
	if exe, _ := os.Executable(); a["exe"] != exe {
		t.Errorf("audit exe = %v, want %s", a["exe"], exe)
	}
	if k := a["kind"]; k != "cache" && k != "fetch" {
		t.Errorf("audit kind = %v", k)
	}
	e.assertNoSecrets(t, "daemon log", e.log.String())
	if strings.Contains(e.log.String(), d.SecretAccessKey) || strings.Contains(e.log.String(), d.Token) {
		t.Error("daemon log holds the served secret")
	}
}
