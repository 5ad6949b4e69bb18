package main

import (
	"strings"
	"testing"
	"time"

	"github.com/imdsproxy/imdsproxy/cache"
)

func TestEntryReadiness(t *testing.T) {
	exp := time.Date(2026, 11, 25, 10, 0, 0, 0, time.UTC)
	tests := []struct {
		name  string
		e     *cache.Entry
		ready bool
		want  []string
	}{
		{"nothing cached", nil, false, []string{"not fetched yet", "role app"}},
		{"fetching, nothing yet", &cache.Entry{Key: "app"}, false, []string{"not fetched yet"}},
		{"valid", &cache.Entry{Key: "app", AccessKeyID: "ASIAEXAMPLE", Expires: exp, Valid: true}, true,
			[]string{"ready: credentials for role app valid until 2026-11-25T10:00:00Z"}},
		{"valid, permanent failure", &cache.Entry{Key: "app", AccessKeyID: "ASIAEXAMPLE", Expires: exp, Valid: true,
			Permanent: true, ErrorClass: "access_denied", LastError: "denied"}, false,
			[]string{"permanent error (access_denied: denied)", "valid until 2026-11-25T10:00:00Z"}},
		{"failed, nothing valid", &cache.Entry{Key: "app", AccessKeyID: "ASIAEXAMPLE", Expires: exp,
			ErrorClass: "throttled", LastError: "Throttling"}, false, []string{"no valid credentials for role app: throttled: Throttling"}},
		// The wall clock stepped forward: held, no failure, not servable.
		{"ran out without a failure", &cache.Entry{Key: "app", AccessKeyID: "ASIAEXAMPLE", Expires: exp}, false,
			[]string{"expire at 2026-11-25T10:00:00Z, too soon by the local clock", "check the host clock"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ready, why := entryReadiness("app", tt.e)
			if ready != tt.ready {
				t.Errorf("ready = %v, want %v (%q)", ready, tt.ready, why)
			}
			for _, w := range tt.want {
				if !strings.Contains(why, w) {
					t.Errorf("reason %q does not contain %q", why, w)
				}
			}
		})
	}
}
