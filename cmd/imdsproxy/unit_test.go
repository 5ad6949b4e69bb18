package main

import (
	"os"
	"strings"
	"testing"
)

// TestServiceHardening: the systemd unit keeps the settings docs/security.md
// relies on. LimitCORE=0: a crash must not write the process memory, which
// holds credentials and the token key, to a core file.
func TestServiceHardening(t *testing.T) {
	data, err := os.ReadFile("../../systemd/imdsproxy.service")
	if err != nil {
		t.Fatal(err)
	}
	lines := map[string]bool{}
	for _, l := range strings.Split(string(data), "\n") {
		lines[strings.TrimSpace(l)] = true
	}
	for _, want := range []string{"LimitCORE=0", "NoNewPrivileges=yes", "UMask=0077", "User=imdsproxy",
		"CapabilityBoundingSet=CAP_NET_ADMIN", "ProtectSystem=strict", "PrivateTmp=yes", "MemoryDenyWriteExecute=yes"} {
		if !lines[want] {
			t.Errorf("systemd/imdsproxy.service lacks %q", want)
		}
	}
}
