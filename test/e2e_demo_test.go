package test

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestDemo runs `make demo`'s script in its check mode: the daemon, the fake
// STS and the IMDS stand-in on their fixed loopback ports, and the unmodified
// AWS CLI getting credentials through the daemon. It keeps the README's first
// command honest.
func TestDemo(t *testing.T) {
	requireClient(t, awsCLIPath, "AWS CLI v2 (Debian package awscli)")
	for _, p := range []string{"bin/imdsproxy", "bin/fakests", "bin/tools/ec2-metadata-mock"} {
		if _, err := os.Stat(filepath.Join(repoRoot, p)); err != nil {
			if os.Getenv("IMDSPROXY_E2E_ALLOW_MISSING") == "1" {
				t.Skipf("%s missing (make test builds it)", p)
			}
			t.Fatalf("%s missing: run `make test` (it builds the demo's tools)", p)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, filepath.Join(repoRoot, "scripts", "demo.sh"), "--check")
	cmd.Dir = repoRoot
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("demo.sh --check: %v\n%s", err, out)
	}
	text := string(out)
	if !strings.Contains(text, "AWS_ACCESS_KEY_ID=ASIA") || !strings.Contains(text, "got a complete set of credentials") {
		t.Fatalf("demo did not show the CLI getting credentials:\n%s", text)
	}
	if strings.Contains(text, "AWS_SECRET_ACCESS_KEY") || strings.Contains(text, "AWS_SESSION_TOKEN") {
		t.Fatalf("demo printed a secret:\n%s", text)
	}
}
