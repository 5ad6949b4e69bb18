package intercept

import (
	"bytes"
	"errors"
	"strings"
	"testing"
)

// TestCommandUsage: the command's usage and configuration errors, without
// touching nftables.
func TestCommandUsage(t *testing.T) {
	load := func(path string) (Section, string, error) {
		if path == "bad" {
			return Section{}, "", errors.New("config: bad")
		}
		on := true
		return Section{IPv6: &on, ListenIPv6: "[::1]:8169"}, "127.0.0.1:8169", nil
	}
	for _, tc := range []struct {
		args []string
		code int
		err  string
	}{
		{nil, ExitUsage, "Usage: imdsproxy intercept"},
		{[]string{"help"}, ExitOK, "Usage: imdsproxy intercept"},
		{[]string{"frobnicate"}, ExitUsage, "Usage"},
		{[]string{"status", "extra"}, ExitUsage, "Usage"},
		{[]string{"status", "--bogus"}, ExitUsage, "bogus"},
		{[]string{"status", "--config", "bad"}, ExitBadConfig, "config: bad"},
	} {
		var out, errOut bytes.Buffer
		if code := Command(tc.args, "/etc/imdsproxy/config.yaml", load, &out, &errOut); code != tc.code || !strings.Contains(errOut.String(), tc.err) {
			t.Errorf("Command(%q) = %d, stderr %q; want %d with %q", tc.args, code, errOut.String(), tc.code, tc.err)
		}
	}
}
