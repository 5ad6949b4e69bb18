package e2e

import (
	"context"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestConfigYAML(t *testing.T) {
	for _, c := range []struct {
		name string
		cfg  Config
		want string
	}{
		{"everything", Config{
			Port: 1, AdminPort: 2, Upstream: "http://127.0.0.1:3", UpstreamTimeout: 2 * time.Second,
			Tokens: "optional", Cache: "backoff_initial: 1s", Identity: "role: {arn: a}\n", Extra: "access: {}\n",
		}, `listen: 127.0.0.1:1
admin_listen: 127.0.0.1:2
upstream: http://127.0.0.1:3
upstream_timeout: 2s
imds: {tokens: optional, hop_limit: 1}
cache: {backoff_initial: 1s}
role: {arn: a}
access: {}
`},
		{"defaults", Config{Port: 1, AdminPort: 2, Upstream: "http://u", Identity: WebIdentityYAML(RoleARN, RoleName, "/t/token.jwt")},
			`listen: 127.0.0.1:1
admin_listen: 127.0.0.1:2
upstream: http://u
imds: {tokens: required, hop_limit: 1}
role: {arn: "arn:aws:iam::222222222222:role/app", name: app, duration: 1h}
source: web-identity
identity: {jwt_file: "/t/token.jwt"}
`},
	} {
		if got := c.cfg.YAML(); got != c.want {
			t.Errorf("%s:\n got %q\nwant %q", c.name, got, c.want)
		}
	}
}

func TestProcessStop(t *testing.T) {
	for _, c := range []struct {
		name    string
		script  string
		timeout time.Duration
		want    int
	}{
		{"exits by itself", "exit 3", time.Second, 3},
		{"dies of SIGTERM", "exec sleep 30", 5 * time.Second, 128 + 15},
		{"ignores SIGTERM", "trap '' TERM; : >\"$READY\"; exec sleep 30", 200 * time.Millisecond, -1},
	} {
		ready := filepath.Join(t.TempDir(), "ready")
		cmd := exec.Command("/bin/sh", "-c", c.script)
		cmd.Env = append(os.Environ(), "READY="+ready)
		p, err := Start(cmd)
		if err != nil {
			t.Fatal(err)
		}
		switch {
		case c.want == 3:
			<-p.Done()
		case strings.Contains(c.script, "READY"):
			// The trap is set once the shell has written the file: a
			// SIGTERM before that would kill it, whatever the load.
			for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(5 * time.Millisecond) {
				if _, err := os.Stat(ready); err == nil {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("%s: the shell never set its trap", c.name)
				}
			}
		}
		if got := p.Stop(c.timeout); got != c.want {
			t.Errorf("%s: Stop = %d, want %d (%v)", c.name, got, c.want, p.Err())
		}
		if !p.Exited() || p.State() == nil {
			t.Errorf("%s: not exited after Stop", c.name)
		}
	}
	var nilProc *Process
	if !nilProc.Exited() || nilProc.Err() != nil || nilProc.Stop(time.Second) != -1 {
		t.Error("a nil *Process is not one that has exited")
	}
}

func TestStandInIMDS(t *testing.T) {
	srv := httptest.NewServer(StandInIMDS())
	defer srv.Close()
	ctx := context.Background()
	if st, _, err := IMDSGet(ctx, Client, srv.URL, "/latest/meta-data/instance-id", ""); err != nil || st != http.StatusUnauthorized {
		t.Errorf("without a token: %d %v, want 401", st, err)
	}
	tok, err := IMDSToken(ctx, Client, srv.URL, 60)
	if err != nil {
		t.Fatal(err)
	}
	if st, body, err := IMDSGet(ctx, Client, srv.URL, "/latest/meta-data/instance-id", tok); err != nil || st != http.StatusOK || body != AEMMInstanceID {
		t.Errorf("with a token: %d %q %v", st, body, err)
	}
	if _, err := IMDSToken(ctx, Client, srv.URL, 0); err == nil {
		t.Error("a token of TTL 0 was issued")
	}
}

// TestFreePort: ports below the ephemeral range (where client connections
// never take theirs), bindable, never the same twice.
func TestFreePort(t *testing.T) {
	lo, hi := portRange()
	seen := map[int]bool{}
	for range 50 {
		p, err := FreePort()
		if err != nil {
			t.Fatal(err)
		}
		if p < lo || p >= hi || seen[p] {
			t.Fatalf("port %d: outside [%d, %d) or given twice", p, lo, hi)
		}
		seen[p] = true
	}
}
