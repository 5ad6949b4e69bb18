package test

import (
	"testing"

	"github.com/imdsproxy/imdsproxy/test/e2e"
)

// TestGCSetting: the daemon collects garbage with GOGC 200 unless its
// environment sets GOGC, as docs/deploy.md ("Memory") says: the setting in
// force is on /metrics (go_gc_gogc_percent) and in the start-up log line
// "garbage collector", with where it came from. The documented override
// (Environment=GOGC=100 in the unit) is honoured.
func TestGCSetting(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		env  []string
		want float64
		gogc string
		from string
	}{
		{"default", nil, 200, "200", "default"},
		{"environment", []string{"GOGC=100"}, 100, "100", "environment"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			e := startDaemon(t, envOptions{extraEnv: tc.env, logLevel: "info"})
			m, _, err := e2e.ScrapeMetrics(e2e.Client, e.adminURL)
			if err != nil {
				t.Fatal(err)
			}
			if v, ok := m.Value("go_gc_gogc_percent", nil); !ok || v != tc.want {
				t.Errorf("go_gc_gogc_percent = %v (present %v), want %v", v, ok, tc.want)
			}
			found := false
			for _, l := range e.logLines() {
				if l["msg"] == "garbage collector" {
					found = true
					if l["gogc"] != tc.gogc || l["from"] != tc.from {
						t.Errorf("log line %v, want gogc %s from %s", l, tc.gogc, tc.from)
					}
				}
			}
			if !found {
				t.Errorf("no \"garbage collector\" line in the log:\n%s", e.logTail(20))
			}
		})
	}
}
