package e2e

import (
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// TestScrapeMetrics reads what promhttp serves, as the daemon's /metrics
// does: counters by label, a gauge without labels, a histogram's buckets,
// sum and count.
func TestScrapeMetrics(t *testing.T) {
	reg := prometheus.NewRegistry()
	refreshes := prometheus.NewCounterVec(prometheus.CounterOpts{Name: "x_refreshes_total", Help: "h"}, []string{"result", "class"})
	refreshes.WithLabelValues("success", "").Add(3)
	refreshes.WithLabelValues("failure", "server").Add(2)
	refreshes.WithLabelValues("failure", "timeout").Add(1)
	ok := prometheus.NewGauge(prometheus.GaugeOpts{Name: "x_last_reload_successful", Help: "h"})
	ok.Set(1)
	dur := prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "x_duration_seconds", Help: "h", Buckets: []float64{0.1, 1}}, []string{"route"})
	dur.WithLabelValues("token").Observe(0.05)
	dur.WithLabelValues("token").Observe(0.5)
	dur.WithLabelValues("token").Observe(5)
	dur.WithLabelValues("credentials").Observe(0.05)
	reg.MustRegister(refreshes, ok, dur)
	srv := httptest.NewServer(promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	defer srv.Close()

	m, text, err := ScrapeMetrics(Client, srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(text, "# TYPE x_duration_seconds histogram") {
		t.Fatalf("not the text exposition:\n%s", text)
	}
	for _, c := range []struct {
		name   string
		labels map[string]string
		sum    float64
	}{
		{"x_refreshes_total", nil, 6},
		{"x_refreshes_total", map[string]string{"result": "failure"}, 3},
		{"x_refreshes_total", map[string]string{"result": "failure", "class": "timeout"}, 1},
		{"x_refreshes_total", map[string]string{"result": "nothing"}, 0},
		{"x_refreshes_total", map[string]string{"class": ""}, 3},
		{"x_duration_seconds_bucket", map[string]string{"route": "token", "le": "0.1"}, 1},
		{"x_duration_seconds_bucket", map[string]string{"route": "token", "le": "1"}, 2},
		{"x_duration_seconds_bucket", map[string]string{"route": "token", "le": "+Inf"}, 3},
		{"x_duration_seconds_bucket", map[string]string{"le": "0.1"}, 2},
		{"x_duration_seconds_count", nil, 4},
		{"x_duration_seconds_sum", map[string]string{"route": "token"}, 5.55},
	} {
		if got := m.Sum(c.name, c.labels); got != c.sum {
			t.Errorf("Sum(%s, %v) = %v, want %v", c.name, c.labels, got, c.sum)
		}
	}
	if v, ok := m.Value("x_last_reload_successful", nil); !ok || v != 1 {
		t.Errorf("Value(x_last_reload_successful) = %v, %v; want 1, true", v, ok)
	}
	// class="" is no label.
	if v, ok := m.Value("x_refreshes_total", map[string]string{"result": "success"}); !ok || v != 3 {
		t.Errorf(`Value(x_refreshes_total{result="success"}) = %v, %v; want 3, true`, v, ok)
	}
	if _, ok := m.Value("x_refreshes_total", map[string]string{"result": "failure"}); ok {
		t.Error(`Value(x_refreshes_total{result="failure"}) found a series: its class label is left out`)
	}
	if _, ok := m.Value("x_missing", nil); ok {
		t.Error("Value of a missing metric found one")
	}
	if got, want := m.Select("x_refreshes_total", map[string]string{"result": "failure"}).String(),
		`x_refreshes_total{class="server",result="failure"} 2`+"\n"+`x_refreshes_total{class="timeout",result="failure"} 1`; got != want {
		t.Errorf("String() = %q, want %q", got, want)
	}
}

func TestParseMetrics(t *testing.T) {
	// No # TYPE: untyped samples, each its own name, labels in any order.
	m, err := ParseMetrics(`# HELP h_seconds x
h_seconds_bucket{route="token",le="0.0005"} 99
h_seconds_bucket{le="0.0005",route="credentials"} 7
h_seconds_count{route="credentials"} 7
up 1`) // and no final newline
	if err != nil {
		t.Fatal(err)
	}
	if got := m.Sum("h_seconds_bucket", map[string]string{"le": "0.0005", "route": "credentials"}); got != 7 {
		t.Errorf("bucket = %v, want 7", got)
	}
	if v, ok := m.Value("up", nil); !ok || v != 1 {
		t.Errorf("up = %v, %v", v, ok)
	}
	if n := len(m.Select("h_seconds_bucket", nil)); n != 2 {
		t.Errorf("%d buckets, want 2:\n%s", n, m)
	}
	for _, bad := range []string{
		"x{a=\"1\" 1\n",
		"x 1 2 3\n",
		"x one\n",
	} {
		if _, err := ParseMetrics(bad); err == nil {
			t.Errorf("ParseMetrics(%q) succeeded", bad)
		}
	}
}
