package exchange

import (
	"os"
	"strings"
	"testing"

	"github.com/imdsproxy/imdsproxy/creds"
)

func TestSanitizeSessionName(t *testing.T) {
	for in, want := range map[string]string{
		"i-0123456789abcdef0":    "i-0123456789abcdef0",
		"host.example.com":       "host.example.com",
		"a_b=c,d.e@f-g":          "a_b=c,d.e@f-g",
		"ci+build":               "ci+build", // STS and config accept '+'
		"with space":             "with-space",
		"  trimmed\n":            "trimmed",
		"ünïcode/slash":          "-n-code-slash",
		"x":                      "imdsproxy-x",
		"":                       "imdsproxy",
		"!":                      "imdsproxy--",
		strings.Repeat("a", 100): strings.Repeat("a", 64),
		strings.Repeat("é", 100): strings.Repeat("-", 64),
	} {
		if got := SanitizeSessionName(in); got != want {
			t.Errorf("SanitizeSessionName(%q) = %q, want %q", in, got, want)
		}
	}
}

func FuzzSanitizeSessionName(f *testing.F) {
	f.Add("i-0123")
	f.Add("")
	f.Add("ü")
	f.Add("ci+build")
	f.Fuzz(func(t *testing.T, s string) {
		got := SanitizeSessionName(s)
		if len(got) < 2 || len(got) > 64 {
			t.Fatalf("length %d", len(got))
		}
		for _, r := range got {
			if !sessionNameChar(r) {
				t.Fatalf("bad char %q in %q", r, got)
			}
		}
		if SanitizeSessionName(got) != got {
			t.Fatalf("not idempotent: %q", got)
		}
		// What config accepts as role.session_name reaches STS unchanged,
		// and everything sent is a name config would accept.
		if creds.ValidSessionName(s) && got != s {
			t.Fatalf("valid session name %q rewritten to %q", s, got)
		}
		if !creds.ValidSessionName(got) {
			t.Fatalf("%q is not a valid session name", got)
		}
	})
}

// TestSessionName: the configured name wins, then the instance id the
// caller read, then the host name; every result is sanitized. SessionName
// makes no request of its own.
func TestSessionName(t *testing.T) {
	host, _ := os.Hostname()
	hostName := SanitizeSessionName(host)
	if strings.TrimSpace(host) == "" {
		hostName = "imdsproxy"
	}
	for _, tc := range []struct {
		name, configured, instanceID, want string
	}{
		{"configured wins", "my session", "i-0abc123def4567890", "my-session"},
		{"configured, no instance id", "app-1", "", "app-1"},
		{"instance id", "", "i-0abc123def4567890", "i-0abc123def4567890"},
		{"blank configured", " \t\n", "i-0abc123def4567890", "i-0abc123def4567890"},
		{"instance id sanitized", "", " i-0abc 123\n", "i-0abc-123"},
		{"no instance id", "", "", hostName},
		{"blank instance id", "", "  ", hostName},
		{"long configured", strings.Repeat("s", 100), "i-0abc", strings.Repeat("s", 64)},
		{"one character", "x", "i-0abc", "imdsproxy-x"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := SessionName(tc.configured, tc.instanceID); got != tc.want {
				t.Errorf("SessionName(%q, %q) = %q, want %q", tc.configured, tc.instanceID, got, tc.want)
			}
		})
	}
}
