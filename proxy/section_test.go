package proxy

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestLoadTokenKey(t *testing.T) {
	if k, err := LoadTokenKey(""); k != nil || err != nil {
		t.Fatalf("empty path: %v %v", k, err)
	}
	dir := t.TempDir()
	path := filepath.Join(dir, "token.key")
	k1, err := LoadTokenKey(path)
	if err != nil || len(k1) != 32 {
		t.Fatalf("create: %d bytes, %v", len(k1), err)
	}
	st, err := os.Stat(path)
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("mode %v, %v; want 0600", st.Mode().Perm(), err)
	}
	k2, err := LoadTokenKey(path)
	if err != nil || !bytes.Equal(k1, k2) {
		t.Fatalf("second load differs or failed: %v", err)
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Errorf("temporary files left behind: %v", entries)
	}
	bad := filepath.Join(dir, "short.key")
	os.WriteFile(bad, []byte("short"), 0o600)
	if _, err := LoadTokenKey(bad); err == nil || !strings.Contains(err.Error(), "32 bytes") {
		t.Errorf("short key: %v", err)
	}
	open := filepath.Join(dir, "open.key")
	os.WriteFile(open, bytes.Repeat([]byte{1}, 32), 0o644)
	os.Chmod(open, 0o644)
	if _, err := LoadTokenKey(open); err == nil || !strings.Contains(err.Error(), "0600") {
		t.Errorf("world-readable key: %v", err)
	}
	if _, err := LoadTokenKey(filepath.Join(dir, "missing", "token.key")); err == nil {
		t.Error("a key in a missing directory was accepted")
	}
}

func TestIMDSSectionValidate(t *testing.T) {
	def := DefaultIMDSSection()
	if err := def.Validate(); err != nil || def.Tokens != "required" || def.HopLimit != 1 {
		t.Fatalf("defaults %+v: %v", def, err)
	}
	for _, tc := range []struct {
		name   string
		edit   func(*IMDSSection)
		errKey string // "" for valid
	}{
		{"optional tokens", func(s *IMDSSection) { s.Tokens = "optional" }, ""},
		{"hop limit 64", func(s *IMDSSection) { s.HopLimit = 64 }, ""},
		{"absolute key file", func(s *IMDSSection) { s.TokenKeyFile = "/var/lib/imdsproxy/token.key" }, ""},
		{"allowed hosts", func(s *IMDSSection) {
			s.AllowedHosts = []string{"imds.internal", "10.0.0.5", "fd00::1", "IMDS-1.example"}
		}, ""},
		{"tokens value", func(s *IMDSSection) { s.Tokens = "sometimes" }, "imds.tokens"},
		{"tokens empty", func(s *IMDSSection) { s.Tokens = "" }, "imds.tokens"},
		{"hop limit 0", func(s *IMDSSection) { s.HopLimit = 0 }, "imds.hop_limit"},
		{"hop limit 65", func(s *IMDSSection) { s.HopLimit = 65 }, "imds.hop_limit"},
		{"relative key file", func(s *IMDSSection) { s.TokenKeyFile = "token.key" }, "imds.token_key_file"},
		{"host with port", func(s *IMDSSection) { s.AllowedHosts = []string{"imds.internal:80"} }, "imds.allowed_hosts"},
		{"bracketed host", func(s *IMDSSection) { s.AllowedHosts = []string{"[::1]"} }, "imds.allowed_hosts"},
		{"empty host", func(s *IMDSSection) { s.AllowedHosts = []string{""} }, "imds.allowed_hosts"},
		{"userinfo host", func(s *IMDSSection) { s.AllowedHosts = []string{"user@host"} }, "imds.allowed_hosts"},
		{"leading hyphen", func(s *IMDSSection) { s.AllowedHosts = []string{"ok.example", "-bad.example"} }, "imds.allowed_hosts"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := DefaultIMDSSection()
			tc.edit(&s)
			err := s.Validate()
			if tc.errKey == "" {
				if err != nil {
					t.Fatalf("Validate: %v", err)
				}
				// What validates here is accepted by the Server too.
				if _, err := normalizeHosts(s.AllowedHosts); err != nil {
					t.Errorf("normalizeHosts refuses what Validate accepted: %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.errKey) {
				t.Fatalf("Validate = %v, want an error naming %s", err, tc.errKey)
			}
			if strings.Contains(err.Error(), "proxy:") {
				t.Errorf("error %q carries the package prefix", err)
			}
		})
	}
}
