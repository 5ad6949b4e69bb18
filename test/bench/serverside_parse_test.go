package bench

import (
	"math"
	"strconv"
	"strings"
	"testing"
	"time"
)

func TestParseHistogram(t *testing.T) {
	text := func(c [3]int) string {
		return strings.Join([]string{
			`# HELP imdsproxy_http_request_duration_seconds x`,
			`imdsproxy_http_request_duration_seconds_bucket{route="token",le="0.0005"} 99`,
			`imdsproxy_http_request_duration_seconds_bucket{le="0.00025",route="credentials"} ` + strconv.Itoa(c[0]),
			`imdsproxy_http_request_duration_seconds_bucket{le="0.0005",route="credentials"} ` + strconv.Itoa(c[1]),
			`imdsproxy_http_request_duration_seconds_bucket{le="0.001",route="credentials"} ` + strconv.Itoa(c[2]),
			`imdsproxy_http_request_duration_seconds_bucket{le="+Inf",route="credentials"} ` + strconv.Itoa(c[2]),
			`imdsproxy_http_request_duration_seconds_count{route="credentials"} ` + strconv.Itoa(c[2]),
		}, "\n")
	}
	before, err := parseHistogram(strings.NewReader(text([3]int{10, 10, 10})), durationMetric, credsRoute)
	if err != nil {
		t.Fatal(err)
	}
	// The run: 1000 GETs, 985 within 250 µs, 995 within 500 µs, all within 1 ms.
	after, err := parseHistogram(strings.NewReader(text([3]int{995, 1005, 1010})), durationMetric, credsRoute)
	if err != nil {
		t.Fatal(err)
	}
	s := newServerSide(before, after)
	if s.Err != nil || s.Count != 1000 || s.P99Bound != 500*time.Microsecond ||
		math.Abs(s.Within500us-0.995) > 1e-9 || s.Within1ms != 1 {
		t.Errorf("serverSide = %+v, want 1000 GETs, p99 ≤ 500µs, 99.5%% ≤ 0.5 ms, 100%% ≤ 1 ms", s)
	}
	if got := fmtServerSide(s); got != "≤ 500 (99.50% ≤ 500 µs, 100.00% ≤ 1 ms)" {
		t.Errorf("fmtServerSide = %q", got)
	}
	if _, err := parseHistogram(strings.NewReader(text([3]int{1, 1, 1})), durationMetric, "role_list"); err == nil {
		t.Error("a route without buckets parsed")
	}
	if _, err := parseHistogram(strings.NewReader(`imdsproxy_http_request_duration_seconds_bucket{route="credentials",le="x"} 1`), durationMetric, credsRoute); err == nil {
		t.Error("a bad bound parsed")
	}
}
