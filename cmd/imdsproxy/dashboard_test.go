package main

import (
	"encoding/json"
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"
)

// grafanaDashboard is the part of docs/grafana-dashboard.json the test reads.
type grafanaDashboard struct {
	SchemaVersion int    `json:"schemaVersion"`
	UID           string `json:"uid"`
	Title         string `json:"title"`
	Templating    struct {
		List []struct {
			Name       string `json:"name"`
			Type       string `json:"type"`
			Query      any    `json:"query"`
			Definition string `json:"definition"`
		} `json:"list"`
	} `json:"templating"`
	Panels []grafanaPanel `json:"panels"`
}

type grafanaPanel struct {
	ID         int    `json:"id"`
	Type       string `json:"type"`
	Title      string `json:"title"`
	Datasource *struct {
		Type string `json:"type"`
		UID  string `json:"uid"`
	} `json:"datasource"`
	Targets []struct {
		Expr string `json:"expr"`
	} `json:"targets"`
	Panels []grafanaPanel `json:"panels"` // collapsed rows
}

var metricNameRe = regexp.MustCompile(`\bimdsproxy_[a-z0-9_]+`)

// dashboardMetricName maps a series name used in a query to the metric
// family docs/metrics.md documents: a histogram's _bucket, _sum and _count
// series to the histogram, unless the name itself is documented (a gauge
// may end in _count or _bucket without being a histogram's series).
func dashboardMetricName(series string, documented []string) string {
	if slices.Contains(documented, series) {
		return series
	}
	for _, suffix := range []string{"_bucket", "_sum", "_count"} {
		if base, ok := strings.CutSuffix(series, suffix); ok {
			return base
		}
	}
	return series
}

// TestGrafanaDashboard checks that docs/grafana-dashboard.json is a
// dashboard on a Prometheus data source variable and that every imdsproxy_*
// metric its queries use is documented in docs/metrics.md.
func TestGrafanaDashboard(t *testing.T) {
	data, err := os.ReadFile("../../docs/grafana-dashboard.json")
	if err != nil {
		t.Fatal(err)
	}
	var d grafanaDashboard
	if err := json.Unmarshal(data, &d); err != nil {
		t.Fatalf("docs/grafana-dashboard.json is not JSON: %v", err)
	}
	if d.SchemaVersion < 36 || d.UID == "" || d.Title == "" {
		t.Errorf("schemaVersion %d, uid %q, title %q: want a modern dashboard with a uid and title", d.SchemaVersion, d.UID, d.Title)
	}
	dsVar := ""
	var exprs []string
	for _, v := range d.Templating.List {
		if v.Type == "datasource" {
			if q, _ := v.Query.(string); q == "prometheus" {
				dsVar = "${" + v.Name + "}"
			}
			continue
		}
		q, _ := json.Marshal(v.Query)
		exprs = append(exprs, string(q), v.Definition)
	}
	if dsVar == "" {
		t.Fatal("no Prometheus data source variable in templating")
	}

	var walk func([]grafanaPanel)
	ids := map[int]bool{}
	walk = func(ps []grafanaPanel) {
		for _, p := range ps {
			if ids[p.ID] {
				t.Errorf("panel id %d used twice", p.ID)
			}
			ids[p.ID] = true
			walk(p.Panels)
			if p.Type == "row" {
				continue
			}
			if p.Datasource == nil || p.Datasource.Type != "prometheus" || p.Datasource.UID != dsVar {
				t.Errorf("panel %q: datasource must be the %s variable", p.Title, dsVar)
			}
			if len(p.Targets) == 0 {
				t.Errorf("panel %q has no query", p.Title)
			}
			for _, tg := range p.Targets {
				if strings.TrimSpace(tg.Expr) == "" {
					t.Errorf("panel %q has an empty query", p.Title)
				}
				exprs = append(exprs, tg.Expr)
			}
		}
	}
	walk(d.Panels)

	documented := documentedMetrics(t)
	used := map[string]bool{}
	for _, e := range exprs {
		for _, m := range metricNameRe.FindAllString(e, -1) {
			used[dashboardMetricName(m, documented)] = true
		}
	}
	for m := range used {
		if !slices.Contains(documented, m) {
			t.Errorf("the dashboard uses %s, which docs/metrics.md does not document", m)
		}
	}
	// The views the rollout guide promises.
	for _, m := range []string{
		"imdsproxy_rollout_stage", "imdsproxy_rollout_host_info", "imdsproxy_rollout_served_total",
		"imdsproxy_rollout_fallbacks_total", "imdsproxy_rollout_shadow_verifications_total",
		"imdsproxy_rollout_policy_loads_total", "imdsproxy_rollout_policy_last_load_successful",
		"imdsproxy_cache_credentials_remaining_seconds", "imdsproxy_cache_refreshes_total",
		"imdsproxy_http_requests_total", "imdsproxy_http_request_duration_seconds",
		"imdsproxy_config_last_reload_successful",
	} {
		if !used[m] {
			t.Errorf("the dashboard has no panel using %s", m)
		}
	}
}

func TestDashboardMetricName(t *testing.T) {
	documented := []string{"imdsproxy_http_request_duration_seconds", "imdsproxy_rollout_bucket_number", "imdsproxy_cache_entries", "imdsproxy_example_count"}
	for in, want := range map[string]string{
		"imdsproxy_http_request_duration_seconds_bucket": "imdsproxy_http_request_duration_seconds",
		"imdsproxy_cache_fetch_duration_seconds_sum":     "imdsproxy_cache_fetch_duration_seconds",
		"imdsproxy_http_requests_total":                  "imdsproxy_http_requests_total",
		"imdsproxy_cache_entries":                        "imdsproxy_cache_entries",
		"imdsproxy_rollout_bucket_number":                "imdsproxy_rollout_bucket_number",
		"imdsproxy_example_count":                        "imdsproxy_example_count",
	} {
		if got := dashboardMetricName(in, documented); got != want {
			t.Errorf("dashboardMetricName(%s) = %s, want %s", in, got, want)
		}
	}
}
