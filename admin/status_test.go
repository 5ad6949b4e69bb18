package admin

import (
	"testing"
	"time"
)

func TestDialable(t *testing.T) {
	for in, want := range map[string]string{
		"127.0.0.1:8170":         "127.0.0.1:8170",
		":8170":                  "127.0.0.1:8170",
		"0.0.0.0:8170":           "127.0.0.1:8170",
		"[::]:8170":              "[::1]:8170",
		"[::1]:8170":             "[::1]:8170",
		"http://127.0.0.1:8170/": "127.0.0.1:8170",
		"admin.internal:8170":    "admin.internal:8170",
		"127.0.0.1:0":            "",
		"127.0.0.1":              "",
	} {
		got, err := Dialable(in)
		if got != want || (want == "") != (err != nil) {
			t.Errorf("Dialable(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
}

func TestStatusTimesRelativeToNow(t *testing.T) {
	now := time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)
	if got := until("2026-11-25T13:00:00Z", now); got != "2026-11-25T13:00:00Z (1h0m0s left)" {
		t.Errorf("until = %q", got)
	}
	if got := until("2026-11-25T11:00:00Z", now); got != "2026-11-25T11:00:00Z (expired)" {
		t.Errorf("until past = %q", got)
	}
	if got := when("2026-11-25T11:59:30Z", now); got != "2026-11-25T11:59:30Z (30s ago)" {
		t.Errorf("when past = %q", got)
	}
	if got := when("2026-11-25T12:00:05Z", now); got != "2026-11-25T12:00:05Z (in 5s)" {
		t.Errorf("when future = %q", got)
	}
	if got := when("", now); got != "-" {
		t.Errorf("when empty = %q", got)
	}
}
