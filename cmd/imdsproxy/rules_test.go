package main

import (
	"context"
	"os"
	"os/exec"
	"path"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"go.yaml.in/yaml/v3"
)

// ruleSet is a Prometheus rules file shipped under deploy/prometheus, its
// promtool unit tests and the page that documents the metrics it reads and
// holds a runbook section ("### <alert>") per alert; paths are relative to
// the repository root.
type ruleSet struct {
	rules, tests, doc string
	// signals are the metrics the alerts are built on: a rules file that
	// lost one (or a parser that finds nothing) fails.
	signals []string
}

// ruleSets are the daemon's rules (docs/metrics.md, "Alerts") and the
// issuer's (docs/issuer.md, "Alerts").
var ruleSets = []ruleSet{
	{
		rules: "deploy/prometheus/imdsproxy.rules.yaml", tests: "deploy/prometheus/imdsproxy.rules.test.yaml", doc: "docs/metrics.md",
		signals: []string{
			"imdsproxy_cache_credentials_remaining_seconds", "imdsproxy_cache_consecutive_failures",
			"imdsproxy_cache_refreshes_total", "imdsproxy_ready", "imdsproxy_access_refused_total", "imdsproxy_passthrough_refused_total",
			"imdsproxy_config_last_reload_successful", "imdsproxy_config_restart_required",
			"imdsproxy_intercept_rules_present", "imdsproxy_intercept_repairs_total",
			"imdsproxy_rollout_policy_last_success_timestamp_seconds", "imdsproxy_rollout_policy_last_load_successful",
			"imdsproxy_rollout_policy_refused_total", "imdsproxy_rollout_enabled",
			"imdsproxy_rollout_shadow_verifications_total", "imdsproxy_rollout_fallbacks_total",
			"imdsproxy_log_write_errors_total", "imdsproxy_cache_clock_steps_total",
		},
	},
	{
		rules: "deploy/prometheus/imdsproxy-issuer.rules.yaml", tests: "deploy/prometheus/imdsproxy-issuer.rules.test.yaml", doc: "docs/issuer.md",
		signals: []string{
			"imdsproxy_issuer_ready", "imdsproxy_issuer_attestation_failures_total",
			"imdsproxy_issuer_token_request_duration_seconds", "imdsproxy_issuer_config_last_reload_successful",
		},
	},
}

// promRuleFile is the part of a Prometheus rule file the tests read.
type promRuleFile struct {
	Groups []struct {
		Name  string `yaml:"name"`
		Rules []struct {
			Record      string            `yaml:"record"`
			Alert       string            `yaml:"alert"`
			Expr        string            `yaml:"expr"`
			For         string            `yaml:"for"`
			Labels      map[string]string `yaml:"labels"`
			Annotations map[string]string `yaml:"annotations"`
		} `yaml:"rules"`
	} `yaml:"groups"`
}

// promRuleTests is the part of a promtool unit-test file the tests read.
type promRuleTests struct {
	RuleFiles []string `yaml:"rule_files"`
	Tests     []struct {
		Name      string `yaml:"name"`
		AlertTest []struct {
			EvalTime  string `yaml:"eval_time"`
			Alertname string `yaml:"alertname"`
			ExpAlerts []any  `yaml:"exp_alerts"`
		} `yaml:"alert_rule_test"`
		ExprTest []struct {
			Expr string `yaml:"expr"`
		} `yaml:"promql_expr_test"`
	} `yaml:"tests"`
}

func readYAML(t *testing.T, path string, v any) {
	t.Helper()
	data, err := os.ReadFile("../../" + path)
	if err != nil {
		t.Fatal(err)
	}
	if err := yaml.Unmarshal(data, v); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
}

// TestRulesPromtool runs `promtool check rules` and `promtool test rules` on
// every shipped rules file, as `make lint` does: every alert must fire on its
// synthetic series after its `for:`, with the exact labels and annotations
// expected, and stay silent on the near misses. promtool comes with Debian's
// prometheus package (`make test-deps`); without it the test fails, unless
// IMDSPROXY_E2E_ALLOW_MISSING=1, in which case it skips.
func TestRulesPromtool(t *testing.T) {
	promtool, err := exec.LookPath("promtool")
	if err != nil {
		msg := "promtool is not installed, so the Prometheus rules are NOT tested; `make test-deps` installs it (Debian package prometheus)"
		if os.Getenv("IMDSPROXY_E2E_ALLOW_MISSING") == "1" {
			t.Skip(msg + " (skipped: IMDSPROXY_E2E_ALLOW_MISSING=1)")
		}
		t.Fatal(msg + " (set IMDSPROXY_E2E_ALLOW_MISSING=1 to skip)")
	}
	for _, rs := range ruleSets {
		for _, args := range [][]string{{"check", "rules", rs.rules}, {"test", "rules", rs.tests}} {
			ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
			cmd := exec.CommandContext(ctx, promtool, args...)
			cmd.Dir = "../.."
			out, err := cmd.CombinedOutput()
			cancel()
			if err != nil {
				t.Errorf("promtool %s: %v\n%s", strings.Join(args, " "), err, out)
			}
		}
	}
}

// exprString matches a PromQL string literal (label values, regexes).
var exprString = regexp.MustCompile("\"(?:[^\"\\\\]|\\\\.)*\"|'(?:[^'\\\\]|\\\\.)*'|`[^`]*`")

// exprIdentifier matches a PromQL identifier: metric, recorded series,
// label and function names and keywords.
var exprIdentifier = regexp.MustCompile(`[a-zA-Z_:][a-zA-Z0-9_:]*`)

// ruleNames returns the imdsproxy_* metrics and the recorded series
// (level:metric:operations) that expr reads.
func ruleNames(expr string) (metrics, recorded []string) {
	for _, id := range exprIdentifier.FindAllString(exprString.ReplaceAllString(expr, `""`), -1) {
		switch {
		case strings.Contains(id, ":"):
			recorded = append(recorded, id)
		case strings.HasPrefix(id, "imdsproxy_"):
			metrics = append(metrics, id)
		}
	}
	return metrics, recorded
}

func TestRulesExprNames(t *testing.T) {
	m, r := ruleNames(`(max by (instance) (imdsproxy_intercept_rules_present) == 0) and on (instance)
		sum by (instance) (increase(imdsproxy_intercept_check_errors_total{job=~"imdsproxy_x.*",class='imdsproxy_y'}[30m]))
		or instance:imdsproxy_cache_consecutive_failures:max > 0`)
	if want := []string{"imdsproxy_intercept_rules_present", "imdsproxy_intercept_check_errors_total"}; !slices.Equal(m, want) {
		t.Errorf("metrics = %q, want %q", m, want)
	}
	if want := []string{"instance:imdsproxy_cache_consecutive_failures:max"}; !slices.Equal(r, want) {
		t.Errorf("recorded = %q, want %q", r, want)
	}
}

// TestRulesMetricsDocumented: every imdsproxy_* metric the rules read is
// documented in the tables of the set's page (docs/metrics.md for the
// daemon, and so, by TestDaemonMetricsLintAndAdmin, exported; docs/issuer.md
// for the issuer), and every recorded series an expression reads is
// recorded by a rule of the same file: renaming a metric, or a recording
// rule, fails here instead of silencing an alert.
func TestRulesMetricsDocumented(t *testing.T) {
	for _, rs := range ruleSets {
		t.Run(rs.rules, func(t *testing.T) {
			var f promRuleFile
			readYAML(t, rs.rules, &f)
			documented := documentedMetricsIn(t, rs.doc)
			records := map[string]bool{}
			for _, g := range f.Groups {
				for _, r := range g.Rules {
					if r.Record != "" {
						records[r.Record] = true
					}
				}
			}
			used := map[string]bool{}
			for _, g := range f.Groups {
				for _, r := range g.Rules {
					name := r.Record + r.Alert
					metrics, recorded := ruleNames(r.Expr)
					for _, m := range metrics {
						m = dashboardMetricName(m, documented)
						used[m] = true
						if !slices.Contains(documented, m) {
							t.Errorf("%s: %s uses %s, which %s does not document", rs.rules, name, m, rs.doc)
						}
					}
					for _, rec := range recorded {
						if !records[rec] {
							t.Errorf("%s: %s reads %s, which no rule of the file records", rs.rules, name, rec)
						}
					}
				}
			}
			for _, m := range rs.signals {
				if !used[m] {
					t.Errorf("%s uses no %s", rs.rules, m)
				}
			}
		})
	}
}

// TestRulesRunbooksAndTests: every alert has a `for:`, a severity of page or
// ticket, a summary and a description, and a runbook annotation naming its
// own section of the set's page, which exists (and no section is left for
// an alert that is gone); the promtool tests fire every alert at least once
// and check it silent at least once, and evaluate every recorded series. No
// alert is defined twice, in one file or across them.
func TestRulesRunbooksAndTests(t *testing.T) {
	alerts := map[string]string{} // alert → rules file
	for _, rs := range ruleSets {
		t.Run(rs.rules, func(t *testing.T) {
			var f promRuleFile
			readYAML(t, rs.rules, &f)
			var tests promRuleTests
			readYAML(t, rs.tests, &tests)
			if want := []string{path.Base(rs.rules)}; !slices.Equal(tests.RuleFiles, want) {
				t.Errorf("%s: rule_files = %q, want %q, the rules file next to it", rs.tests, tests.RuleFiles, want)
			}
			doc, err := os.ReadFile("../../" + rs.doc)
			if err != nil {
				t.Fatal(err)
			}
			sections := map[string]bool{}
			for _, line := range strings.Split(string(doc), "\n") {
				if name, ok := strings.CutPrefix(line, "### "); ok && strings.HasPrefix(name, "Imdsproxy") {
					sections[name] = true
				}
			}

			fires, silent, evaluated := map[string]bool{}, map[string]bool{}, map[string]bool{}
			for _, tg := range tests.Tests {
				for _, at := range tg.AlertTest {
					if len(at.ExpAlerts) > 0 {
						fires[at.Alertname] = true
					} else {
						silent[at.Alertname] = true
					}
				}
				for _, et := range tg.ExprTest {
					_, recorded := ruleNames(et.Expr)
					for _, r := range recorded {
						evaluated[r] = true
					}
				}
			}

			mine := map[string]bool{}
			for _, g := range f.Groups {
				for _, r := range g.Rules {
					if r.Record != "" {
						if !evaluated[r.Record] {
							t.Errorf("%s: no promql_expr_test evaluates the recorded %s", rs.tests, r.Record)
						}
						continue
					}
					a := r.Alert
					if other, ok := alerts[a]; ok {
						t.Errorf("%s: alert %s defined twice (also in %s)", rs.rules, a, other)
					}
					alerts[a], mine[a] = rs.rules, true
					if r.For == "" {
						t.Errorf("%s: %s has no for:", rs.rules, a)
					}
					if s := r.Labels["severity"]; s != "page" && s != "ticket" {
						t.Errorf("%s: %s has severity %q, want page or ticket", rs.rules, a, s)
					}
					for _, k := range []string{"summary", "description"} {
						if strings.TrimSpace(r.Annotations[k]) == "" {
							t.Errorf("%s: %s has no %s annotation", rs.rules, a, k)
						}
					}
					if want := rs.doc + "#" + strings.ToLower(a); r.Annotations["runbook"] != want {
						t.Errorf("%s: %s has runbook %q, want %q", rs.rules, a, r.Annotations["runbook"], want)
					}
					if !sections[a] {
						t.Errorf("%s has no runbook section \"### %s\"", rs.doc, a)
					}
					if !fires[a] {
						t.Errorf("%s: no test fires %s", rs.tests, a)
					}
					if !silent[a] {
						t.Errorf("%s: no test checks that %s stays silent", rs.tests, a)
					}
				}
			}
			for s := range sections {
				if !mine[s] {
					t.Errorf("%s has a runbook section for %s, which %s does not define", rs.doc, s, rs.rules)
				}
			}
			for a := range fires {
				if !mine[a] {
					t.Errorf("%s tests %s, which %s does not define", rs.tests, a, rs.rules)
				}
			}
		})
	}
}
