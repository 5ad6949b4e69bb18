package admin

import (
	"strings"
	"testing"
	"time"

	"github.com/imdsproxy/imdsproxy/cache"
	"github.com/imdsproxy/imdsproxy/creds"
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

// TestReadinessHints: a not-ready line says what to check, per cause, so an
// operator looking at /readyz or `imdsproxy status` knows where to look.
func TestReadinessHints(t *testing.T) {
	exp := time.Date(2026, 12, 7, 12, 0, 0, 0, time.UTC)
	wl := creds.Key{Kind: creds.KindWorkload, Role: creds.Role{Name: "app"}}
	ip := creds.Key{Kind: creds.KindInstanceProfile, Role: creds.Role{Name: "host"}}
	for _, tc := range []struct {
		name  string
		e     *cache.Entry[creds.Key]
		ready bool
		want  []string
	}{
		{"not fetched", nil, false, []string{"not fetched yet"}},
		{"valid", &cache.Entry[creds.Key]{Key: wl, Valid: true, Expires: exp}, true, []string{"ready: credentials for role app valid until 2026-12-07T12:00:00Z"}},
		{"sts unreachable", &cache.Entry[creds.Key]{Key: wl, ErrorClass: "network", LastError: "dial tcp: lookup sts.eu-west-1.amazonaws.com: no such host"},
			false, []string{"no such host", "egress and DNS", "sts.<region>.amazonaws.com", "AWS_ENDPOINT_URL_STS", "HTTPS_PROXY"}},
		{"sts timeout", &cache.Entry[creds.Key]{Key: wl, ErrorClass: "timeout", LastError: "context deadline exceeded"},
			false, []string{"egress and DNS"}},
		{"imds unreachable", &cache.Entry[creds.Key]{Key: ip, ErrorClass: "network", LastError: "connection refused"},
			false, []string{"reaches the real IMDS", "exempt from interception"}},
		{"region disabled", &cache.Entry[creds.Key]{Key: wl, ErrorClass: "region_disabled", LastError: "RegionDisabledException"},
			false, []string{"STS is enabled in this region"}},
		{"identity", &cache.Entry[creds.Key]{Key: wl, ErrorClass: "identity", LastError: "jwt_file: empty"},
			false, []string{"identity: section"}},
		{"permanent, still valid", &cache.Entry[creds.Key]{Key: wl, Valid: true, Permanent: true, ErrorClass: "access_denied", LastError: "AccessDenied", Expires: exp},
			false, []string{"permanent error", "still serving cached credentials valid until 2026-12-07T12:00:00Z"}},
		{"clock stepped", &cache.Entry[creds.Key]{Key: wl, AccessKeyID: "ASIAEXAMPLE", Expires: exp},
			false, []string{"too soon by the local clock", "check the host clock"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ready, line := Readiness(wl.Role.Name, tc.e)
			if ready != tc.ready {
				t.Errorf("ready = %v, want %v (%s)", ready, tc.ready, line)
			}
			for _, w := range tc.want {
				if !strings.Contains(line, w) {
					t.Errorf("line %q lacks %q", line, w)
				}
			}
			if strings.Count(line, "\n") != 0 {
				t.Errorf("line %q is not one line", line)
			}
		})
	}
}
