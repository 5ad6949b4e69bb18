package test

// The operators' view, proven against a real Prometheus (Debian's
// prometheus package, which `make test-deps` installs): the shipped rules
// (deploy/prometheus) loaded into a Prometheus on loopback that scrapes the
// built daemon and the built issuer every second, driven through failures
// and recoveries; the alerts must go pending, fire and resolve
// (/api/v1/alerts), every rule must evaluate without error (/api/v1/rules),
// and every query of docs/grafana-dashboard.json must return data.
//
// Only the rules' `for:` durations are shortened (promRuleFor), in a copy:
// the expressions, labels and annotations are the shipped ones. Windows of
// 5 to 15 minutes (increase, rate) are not shortened, so an alert resting
// on one (ImdsproxyRefreshesFailingTransient, the issuer's rates) fires
// within seconds of the first samples but resolves only once its window
// has passed; the tests check that those fire and the others resolve.

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"maps"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/imdsproxy/imdsproxy/test/e2e"
	fakeec2 "github.com/imdsproxy/imdsproxy/test/fakes/ec2"
	"github.com/imdsproxy/imdsproxy/test/fakes/instance"
	"github.com/imdsproxy/imdsproxy/test/fakes/sts"
)

// prometheusPath is Debian's Prometheus server.
const prometheusPath = "/usr/bin/prometheus"

// Timing of the Prometheus the tests run.
const (
	// promInterval is the scrape and evaluation interval.
	promInterval = time.Second
	// promRuleFor replaces every alert's `for:` (1m to 1h as shipped).
	promRuleFor = 2 * time.Second
	// promRateInterval stands for Grafana's $__rate_interval in the
	// dashboard's queries.
	promRateInterval = "30s"
	// promAlertTimeout bounds the wait for one alert to change state. The
	// slowest is the first refresh failure: a 20 s session is refreshed
	// after about 10 s.
	promAlertTimeout = 45 * time.Second
)

// promServer is a running Prometheus.
type promServer struct {
	url  string // http://127.0.0.1:PORT
	proc *e2e.Process
	log  *e2e.LockedBuffer
}

// startPrometheus runs Debian's prometheus on a free loopback port, its
// storage in a temporary directory, scraping targets (job name → host:port)
// every promInterval with the shipped rules files (paths relative to the
// repository) copied with their `for:` shortened to promRuleFor. It stops
// when t ends.
func startPrometheus(t *testing.T, targets map[string]string, rules ...string) *promServer {
	t.Helper()
	requireClient(t, prometheusPath, "Prometheus (Debian package prometheus)")
	dir := t.TempDir()
	var ruleFiles []string
	for _, r := range rules {
		dst := filepath.Join(dir, filepath.Base(r))
		promShortenFor(t, filepath.Join(repoRoot, r), dst, promRuleFor)
		ruleFiles = append(ruleFiles, dst)
	}
	var scrapes strings.Builder
	for _, job := range slices.Sorted(maps.Keys(targets)) {
		fmt.Fprintf(&scrapes, "  - job_name: %s\n    static_configs: [{targets: [%q]}]\n", job, targets[job])
	}
	cfg := fmt.Sprintf(`global:
  scrape_interval: %[1]s
  scrape_timeout: %[1]s
  evaluation_interval: %[1]s
rule_files: [%[2]s]
scrape_configs:
%[3]s`, promInterval, strings.Join(ruleFiles, ", "), scrapes.String())
	cfgPath := filepath.Join(dir, "prometheus.yml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	port, err := e2e.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	p := &promServer{url: fmt.Sprintf("http://127.0.0.1:%d", port), log: &e2e.LockedBuffer{}}
	cmd := exec.Command(prometheusPath,
		"--config.file="+cfgPath,
		"--storage.tsdb.path="+filepath.Join(dir, "data"),
		"--web.listen-address="+strings.TrimPrefix(p.url, "http://"),
		"--log.level=warn")
	cmd.Dir = dir
	cmd.Env = append(e2e.Environ("HOME"), "HOME="+dir, "NO_PROXY=*", "no_proxy=*")
	cmd.Stdout, cmd.Stderr = p.log, p.log
	if p.proc, err = e2e.Start(cmd); err != nil {
		t.Fatalf("start %s: %v", prometheusPath, err)
	}
	t.Cleanup(func() {
		p.proc.Stop(10 * time.Second)
		if t.Failed() {
			t.Logf("prometheus log:\n%s", e2e.TailLines(p.log.String(), 40))
		}
	})
	if err := e2e.WaitOK(e2e.Client, p.url+"/-/ready", 30*time.Second, 50*time.Millisecond, p.proc); err != nil {
		t.Fatalf("prometheus not ready: %v\n%s", err, p.log)
	}
	return p
}

// promShortenFor copies the rules file src to dst with every alert's
// `for:` set to d, and nothing else changed.
func promShortenFor(t *testing.T, src, dst string, d time.Duration) {
	t.Helper()
	data, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	var doc yaml.Node
	if err := yaml.Unmarshal(data, &doc); err != nil {
		t.Fatalf("%s: %v", src, err)
	}
	n := 0
	var walk func(*yaml.Node)
	walk = func(node *yaml.Node) {
		if node.Kind == yaml.MappingNode {
			for i := 0; i+1 < len(node.Content); i += 2 {
				if k, v := node.Content[i], node.Content[i+1]; k.Value == "for" && v.Kind == yaml.ScalarNode {
					v.Value = d.String()
					n++
				}
			}
		}
		for _, c := range node.Content {
			walk(c)
		}
	}
	walk(&doc)
	if n == 0 {
		t.Fatalf("%s: no for: to shorten", src)
	}
	out, err := yaml.Marshal(&doc)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dst, out, 0o600); err != nil {
		t.Fatal(err)
	}
}

// promResponse is the envelope of every answer of Prometheus's HTTP API.
type promResponse struct {
	Status    string          `json:"status"`
	ErrorType string          `json:"errorType"`
	Error     string          `json:"error"`
	Data      json.RawMessage `json:"data"`
}

// api GETs path?params from Prometheus's HTTP API and decodes its data
// into v. An answer with status "error" is an error naming it.
func (p *promServer) api(path string, params url.Values, v any) error {
	u := p.url + path
	if len(params) > 0 {
		u += "?" + params.Encode()
	}
	resp, err := e2e.Client.Get(u)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	var r promResponse
	if err := json.Unmarshal(body, &r); err != nil {
		return fmt.Errorf("GET %s: %s: not the API's JSON: %v: %.200s", path, resp.Status, err, body)
	}
	if r.Status != "success" {
		return fmt.Errorf("GET %s %v: %s: %s", path, params, r.ErrorType, r.Error)
	}
	return json.Unmarshal(r.Data, v)
}

// promSample is one element of an instant vector.
type promSample struct {
	Metric map[string]string `json:"metric"`
	Value  [2]any            `json:"value"`
}

// query evaluates expr now and returns the series of the result (a scalar
// counts as one), or the evaluation error.
func (p *promServer) query(expr string) ([]promSample, error) {
	var data struct {
		ResultType string          `json:"resultType"`
		Result     json.RawMessage `json:"result"`
	}
	if err := p.api("/api/v1/query", url.Values{"query": {expr}}, &data); err != nil {
		return nil, err
	}
	switch data.ResultType {
	case "vector":
		var v []promSample
		err := json.Unmarshal(data.Result, &v)
		return v, err
	case "scalar":
		var s [2]any
		err := json.Unmarshal(data.Result, &s)
		return []promSample{{Value: s}}, err
	}
	return nil, fmt.Errorf("%s: result type %s", expr, data.ResultType)
}

// promAlert is an active alert of /api/v1/alerts.
type promAlert struct {
	Labels      map[string]string `json:"labels"`
	Annotations map[string]string `json:"annotations"`
	State       string            `json:"state"` // pending, firing
	Value       string            `json:"value"`
}

func (a promAlert) String() string {
	ls := map[string]string{}
	for k, v := range a.Labels {
		if k != "alertname" && k != "severity" {
			ls[k] = v
		}
	}
	return fmt.Sprintf("%s%s %s (%s)", a.Labels["alertname"], promLabels(ls), a.State, a.Value)
}

// alerts returns the active (pending or firing) alerts.
func (p *promServer) alerts(t *testing.T) []promAlert {
	t.Helper()
	var data struct {
		Alerts []promAlert `json:"alerts"`
	}
	if err := p.api("/api/v1/alerts", nil, &data); err != nil {
		t.Fatal(err)
	}
	return data.Alerts
}

// promMatch reports whether a has name and every label of labels.
func promMatch(a promAlert, name string, labels map[string]string) bool {
	if a.Labels["alertname"] != name {
		return false
	}
	for k, v := range labels {
		if a.Labels[k] != v {
			return false
		}
	}
	return true
}

// promLabels renders labels as {k=v,...} ("" for none), sorted.
func promLabels(labels map[string]string) string {
	if len(labels) == 0 {
		return ""
	}
	var ls []string
	for k, v := range labels {
		ls = append(ls, k+"="+v)
	}
	slices.Sort(ls)
	return "{" + strings.Join(ls, ",") + "}"
}

// waitAlert waits until alert name with labels is in state (pending or
// firing) and returns it. An alert is pending for promRuleFor before it
// fires, and polling may miss that: waiting for pending accepts firing.
func (p *promServer) waitAlert(t *testing.T, name string, labels map[string]string, state string, why string) promAlert {
	t.Helper()
	begin := time.Now()
	deadline := begin.Add(promAlertTimeout)
	for {
		active := p.alerts(t)
		for _, a := range active {
			if promMatch(a, name, labels) && (a.State == state || state == "pending" && a.State == "firing") {
				t.Logf("%s: %s (after %v)", why, a, time.Since(begin).Round(100*time.Millisecond))
				return a
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: %s%s not %s after %v; active: %v", why, name, promLabels(labels), state, promAlertTimeout, active)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// waitResolved waits until no alert name with labels is active.
func (p *promServer) waitResolved(t *testing.T, name string, labels map[string]string, why string) {
	t.Helper()
	begin := time.Now()
	deadline := begin.Add(promAlertTimeout)
	for {
		active := p.alerts(t)
		found := false
		for _, a := range active {
			found = found || promMatch(a, name, labels)
		}
		if !found {
			t.Logf("%s: %s%s resolved (after %v)", why, name, promLabels(labels), time.Since(begin).Round(100*time.Millisecond))
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: %s%s still active after %v; active: %v", why, name, promLabels(labels), promAlertTimeout, active)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// waitQuiet waits until no alert is active at all (a rule that fires on a
// healthy target fails here).
func (p *promServer) waitQuiet(t *testing.T, why string) {
	t.Helper()
	deadline := time.Now().Add(promAlertTimeout)
	for {
		active := p.alerts(t)
		if len(active) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: alerts active on a healthy target: %v", why, active)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// waitSeries waits until expr returns at least one series.
func (p *promServer) waitSeries(t *testing.T, expr, why string) []promSample {
	t.Helper()
	deadline := time.Now().Add(promAlertTimeout)
	for {
		v, err := p.query(expr)
		if err != nil {
			t.Fatalf("%s: %v", why, err)
		}
		if len(v) > 0 {
			return v
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: %s returned nothing for %v", why, expr, promAlertTimeout)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// checkRulesHealthy checks that every rule of files (base names) is
// loaded, and that every rule evaluated so far did so without error:
// a type or matching error that only real series show (many-to-many, a
// duplicate series) fails here.
func (p *promServer) checkRulesHealthy(t *testing.T, files ...string) {
	t.Helper()
	var data struct {
		Groups []struct {
			Name  string `json:"name"`
			File  string `json:"file"`
			Rules []struct {
				Name      string `json:"name"`
				Health    string `json:"health"`
				LastError string `json:"lastError"`
			} `json:"rules"`
		} `json:"groups"`
	}
	if err := p.api("/api/v1/rules", nil, &data); err != nil {
		t.Fatal(err)
	}
	loaded := map[string]int{}
	for _, g := range data.Groups {
		for _, r := range g.Rules {
			loaded[filepath.Base(g.File)]++
			if r.Health != "ok" || r.LastError != "" {
				t.Errorf("rule %s (group %s): health %q, last error %q", r.Name, g.Name, r.Health, r.LastError)
			}
		}
	}
	for _, f := range files {
		var want promRuleFile
		readRules(t, f, &want)
		n := 0
		for _, g := range want.Groups {
			n += len(g.Rules)
		}
		if loaded[filepath.Base(f)] != n {
			t.Errorf("%s: Prometheus loaded %d rules, the file has %d", f, loaded[filepath.Base(f)], n)
		}
	}
}

// promRuleFile is the part of a rules file the tests read.
type promRuleFile struct {
	Groups []struct {
		Rules []struct {
			Alert string `yaml:"alert"`
		} `yaml:"rules"`
	} `yaml:"groups"`
}

func readRules(t *testing.T, path string, v any) {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(repoRoot, path))
	if err != nil {
		t.Fatal(err)
	}
	if err := yaml.Unmarshal(data, v); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
}

// The shipped rules files.
const (
	daemonRules = "deploy/prometheus/imdsproxy.rules.yaml"
	issuerRules = "deploy/prometheus/imdsproxy-issuer.rules.yaml"
)

// ---------------------------------------------------------------------------
// The daemon.

// promSession is the fake STS's session length in TestPrometheusDaemon:
// short, so that a refresh (at about half of it) comes within seconds and
// the credentials run out while STS fails.
const promSession = 20 * time.Second

// TestPrometheusDaemon drives the daemon (web identity, a rollout policy
// putting its group `on`, 20 s sessions) through refresh failures and
// recoveries under a real Prometheus with the shipped rules:
//
//   - healthy: no alert is active;
//   - STS answers 500: ImdsproxyRefreshesFailingTransient{class=server} and
//     ImdsproxyCredentialsExpiring fire;
//   - STS denies the role: ImdsproxyRefreshesFailingNeedsHuman
//     {class=access_denied} fires, imdsproxy_ready is 0 and
//     ImdsproxyNotReady fires; once the credentials ran out,
//     ImdsproxyCredentialRequestsFailing fires (clients ask all along);
//   - STS recovers: NeedsHuman, CredentialsExpiring and NotReady resolve;
//   - every query of docs/grafana-dashboard.json returns data;
//   - the rollout policy becomes invalid: ImdsproxyRolloutPolicyLoadFailing
//     fires; writable by others: ImdsproxyRolloutPolicyRefused
//     {reason=unsafe_file} fires; good again: LoadFailing resolves; the kill
//     switch is set: ImdsproxyRolloutKillSwitchOn fires; lifted: it resolves;
//   - a config file that does not parse, then one changing `listen`:
//     ImdsproxyConfigReloadFailed fires, then gives way to
//     ImdsproxyRestartRequired, which resolves when the file is restored;
//   - the daemon stops: ImdsproxyDown fires; it starts again: it resolves.
//
// Every rule evaluates without error throughout.
func TestPrometheusDaemon(t *testing.T) {
	t.Parallel()
	start := time.Now()
	dir := t.TempDir()
	policy := filepath.Join(dir, "rollout.yaml")
	writePolicy := func(doc string, mode os.FileMode) {
		t.Helper()
		if err := os.WriteFile(policy+".tmp", []byte(doc), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(policy+".tmp", mode); err != nil { // past the umask
			t.Fatal(err)
		}
		if err := os.Rename(policy+".tmp", policy); err != nil {
			t.Fatal(err)
		}
	}
	goodPolicy := "version: \"e2e-1\"\nkill_switch: false\ndefault: off\ngroups:\n  e2e-asg: on\n"
	writePolicy(goodPolicy, 0o644)
	e := startDaemon(t, envOptions{
		sessionLength:  promSession,
		backoffInitial: time.Second, backoffMax: 2 * time.Second, expiryMargin: 2 * time.Second,
		identityYAML: func(e *daemonEnv) string {
			return e.defaultIdentity() + fmt.Sprintf("rollout: {policy: %q, group_tag: e2e-no-such-tag, group: e2e-asg, poll_interval: 1s}\n", policy)
		},
	})
	p := startPrometheus(t, map[string]string{"imdsproxy": strings.TrimPrefix(e.adminURL, "http://")}, daemonRules)

	// Clients ask for credentials all along, as SDKs do.
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var served, failed atomic.Int64
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			case <-time.After(250 * time.Millisecond):
			}
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			if _, err := e.fetchCreds(ctx); err != nil {
				failed.Add(1)
			} else {
				served.Add(1)
			}
			cancel()
		}
	}()
	defer func() {
		close(stop)
		wg.Wait()
		t.Logf("clients: %d served, %d failed; %v in all", served.Load(), failed.Load(), time.Since(start).Round(100*time.Millisecond))
	}()

	p.waitSeries(t, `up{job="imdsproxy"} == 1`, "first scrape")
	p.waitSeries(t, `imdsproxy_ready{job="imdsproxy"} == 1`, "ready")
	p.waitQuiet(t, "healthy")
	// Rates need two samples in their window.
	p.waitSeries(t, `count_over_time(imdsproxy_build_info{job="imdsproxy"}[`+promRateInterval+`]) > 2`, "three scrapes")
	checkDashboard(t, p, false)
	t.Logf("healthy, no alert: %v", time.Since(start).Round(100*time.Millisecond))

	// STS fails with 500: a transient class.
	e.sts.SetMode(sts.ModeFail5xx)
	p.waitAlert(t, "ImdsproxyRefreshesFailingTransient", map[string]string{"class": "server"}, "firing", "STS 500")
	p.waitAlert(t, "ImdsproxyCredentialsExpiring", nil, "firing", "STS 500")
	for _, a := range p.alerts(t) {
		if promMatch(a, "ImdsproxyRefreshesFailingNeedsHuman", nil) {
			t.Errorf("STS 500: %s active: a 5xx is transient", a)
		}
	}

	// STS denies the role: a class that needs a human. Readiness says so at
	// once (a permanent error), whatever is cached.
	e.sts.SetMode(sts.ModeAccessDenied)
	p.waitAlert(t, "ImdsproxyRefreshesFailingNeedsHuman", map[string]string{"class": "access_denied"}, "firing", "STS AccessDenied")
	p.waitSeries(t, `imdsproxy_ready{job="imdsproxy"} == 0`, "STS AccessDenied: not ready")
	p.waitAlert(t, "ImdsproxyNotReady", nil, "firing", "STS AccessDenied")
	p.waitAlert(t, "ImdsproxyCredentialRequestsFailing", nil, "firing", "STS AccessDenied, credentials run out")
	t.Logf("failing, alerts fired: %v", time.Since(start).Round(100*time.Millisecond))

	// STS recovers: the alerts resting on the failing state resolve.
	e.sts.SetMode(sts.ModeOK)
	p.waitResolved(t, "ImdsproxyRefreshesFailingNeedsHuman", nil, "STS recovered")
	p.waitResolved(t, "ImdsproxyCredentialsExpiring", nil, "STS recovered")
	p.waitResolved(t, "ImdsproxyNotReady", nil, "STS recovered")
	p.waitSeries(t, `imdsproxy_ready{job="imdsproxy"} == 1`, "STS recovered: ready")
	t.Logf("recovered, alerts resolved: %v; still active (their windows have not passed): %v",
		time.Since(start).Round(100*time.Millisecond), p.alerts(t))

	checkDashboard(t, p, true)
	p.checkRulesHealthy(t, daemonRules)

	// The rollout policy (read every second): invalid, then writable by
	// others (refused as unsafe_file), then good again; then the kill
	// switch, set and lifted.
	writePolicy("version: \"e2e-2\"\nkill_switch: maybe\n", 0o644)
	p.waitAlert(t, "ImdsproxyRolloutPolicyLoadFailing", nil, "firing", "invalid policy")
	writePolicy(strings.Replace(goodPolicy, "e2e-1", "e2e-3", 1), 0o666)
	p.waitAlert(t, "ImdsproxyRolloutPolicyRefused", map[string]string{"reason": "unsafe_file"}, "firing", "policy others may write")
	writePolicy(strings.Replace(goodPolicy, "e2e-1", "e2e-4", 1), 0o644)
	p.waitResolved(t, "ImdsproxyRolloutPolicyLoadFailing", nil, "good policy")
	writePolicy(strings.Replace(strings.Replace(goodPolicy, "e2e-1", "e2e-5", 1), "kill_switch: false", "kill_switch: true", 1), 0o644)
	p.waitAlert(t, "ImdsproxyRolloutKillSwitchOn", nil, "firing", "kill switch")
	writePolicy(strings.Replace(goodPolicy, "e2e-1", "e2e-6", 1), 0o644)
	p.waitResolved(t, "ImdsproxyRolloutKillSwitchOn", nil, "kill switch lifted")
	// The instance profile served meanwhile (the stand-in IMDS's credentials
	// expired in 2020) may have made the daemon not ready: wait it out.
	p.waitSeries(t, `imdsproxy_ready{job="imdsproxy"} == 1`, "kill switch lifted: ready")
	p.waitResolved(t, "ImdsproxyNotReady", nil, "kill switch lifted")
	p.waitResolved(t, "ImdsproxyCredentialsExpiring", nil, "kill switch lifted")
	t.Logf("rollout policy alerts fired and resolved: %v", time.Since(start).Round(100*time.Millisecond))

	// A config file that does not parse; then one that changes listen (a
	// restart-only setting): the reload alert gives way to the restart one.
	good := e.config()
	e.writeConfig(t, good+"this is: [not yaml\n")
	e.signal(t, syscall.SIGHUP)
	p.waitAlert(t, "ImdsproxyConfigReloadFailed", nil, "firing", "config that does not parse")
	port, err := e2e.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	moved := strings.Replace(good, fmt.Sprintf("listen: 127.0.0.1:%d\n", e.imdsPort), fmt.Sprintf("listen: 127.0.0.1:%d\n", port), 1)
	if moved == good {
		t.Fatalf("no listen: line in the config:\n%s", good)
	}
	e.writeConfig(t, moved)
	e.signal(t, syscall.SIGHUP)
	p.waitAlert(t, "ImdsproxyRestartRequired", nil, "firing", "config changing listen")
	p.waitResolved(t, "ImdsproxyConfigReloadFailed", nil, "config changing listen")
	e.writeConfig(t, good)
	e.signal(t, syscall.SIGHUP)
	p.waitResolved(t, "ImdsproxyRestartRequired", nil, "config restored")

	// The daemon stops, then starts again on the same ports.
	if code := e.stop(); code != 0 {
		t.Fatalf("daemon exited %d on SIGTERM", code)
	}
	p.waitAlert(t, "ImdsproxyDown", nil, "firing", "daemon stopped")
	for _, a := range p.alerts(t) {
		if promMatch(a, "ImdsproxyNotReady", nil) || promMatch(a, "ImdsproxyCredentialsExpiring", nil) {
			t.Errorf("daemon stopped: %s active: the daemon's series must go stale, leaving ImdsproxyDown alone", a)
		}
	}
	e.proc, err = e2e.StartDaemon(e2e.DaemonOptions{Bin: daemonBinary(t), Config: e.configPath,
		Args: []string{"--log-format", "json", "--log-level", "debug"}, Dir: e.dir, Env: e.daemonEnviron(), Out: e.log})
	if err != nil {
		t.Fatal(err)
	}
	e.stopped = false
	e.waitReady(t, readyTimeout)
	p.waitResolved(t, "ImdsproxyDown", nil, "daemon started again")
	p.checkRulesHealthy(t, daemonRules)
}

// grafanaVar is Grafana's variable syntax: $name, ${name} and [[name]].
var grafanaVar = regexp.MustCompile(`\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]`)

// dashboardExpr substitutes the dashboard's variables in expr as Grafana
// does with every value selected: the multi-value variables (job, group,
// instance) by their "All" value .*, $__rate_interval by promRateInterval.
func dashboardExpr(t *testing.T, expr string) string {
	t.Helper()
	return grafanaVar.ReplaceAllStringFunc(expr, func(m string) string {
		sub := grafanaVar.FindStringSubmatch(m)
		name := sub[1] + sub[2] + sub[3]
		switch name {
		case "job", "group", "instance":
			return ".*"
		case "__rate_interval", "__interval", "__range":
			return promRateInterval
		}
		t.Errorf("dashboard query %q: unknown variable %s", expr, m)
		return m
	})
}

// labelValues matches Grafana's label_values(selector, label) variable query.
var labelValues = regexp.MustCompile(`^label_values\((.+),\s*(\w+)\)$`)

// checkDashboard evaluates every query of docs/grafana-dashboard.json (the
// panels', nested in rows too, and the template variables') against p:
// each must evaluate without error; each variable must return a series with
// its label, and each panel data: every query of it when every query must
// (after failures), at least one of them otherwise (a healthy daemon: no
// panel shows "No data", though a failure's series may not exist yet).
func checkDashboard(t *testing.T, p *promServer, every bool) {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(repoRoot, "docs", "grafana-dashboard.json"))
	if err != nil {
		t.Fatal(err)
	}
	type panel struct {
		Title   string                  `json:"title"`
		Type    string                  `json:"type"`
		Targets []struct{ Expr string } `json:"targets"`
		Panels  []json.RawMessage       `json:"panels"`
	}
	var d struct {
		Templating struct {
			List []struct {
				Name       string `json:"name"`
				Type       string `json:"type"`
				Definition string `json:"definition"`
			} `json:"list"`
		} `json:"templating"`
		Panels []json.RawMessage `json:"panels"`
	}
	if err := json.Unmarshal(data, &d); err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, v := range d.Templating.List {
		if v.Type != "query" {
			continue
		}
		m := labelValues.FindStringSubmatch(v.Definition)
		if m == nil {
			t.Errorf("variable %s: %q is not label_values(selector, label)", v.Name, v.Definition)
			continue
		}
		expr := dashboardExpr(t, m[1])
		res, err := p.query(expr)
		n++
		switch {
		case err != nil:
			t.Errorf("variable %s: %s: %v", v.Name, expr, err)
		case len(res) == 0 || res[0].Metric[m[2]] == "":
			t.Errorf("variable %s: %s: no series with label %s: %v", v.Name, expr, m[2], res)
		}
	}
	var walk func([]json.RawMessage)
	walk = func(raw []json.RawMessage) {
		for _, r := range raw {
			var pn panel
			if err := json.Unmarshal(r, &pn); err != nil {
				t.Fatal(err)
			}
			walk(pn.Panels)
			var empty []string
			for _, tg := range pn.Targets {
				expr := dashboardExpr(t, tg.Expr)
				res, err := p.query(expr)
				n++
				switch {
				case err != nil:
					t.Errorf("panel %q: %s: %v", pn.Title, expr, err)
				case len(res) == 0 && every:
					t.Errorf("panel %q: %s: no data", pn.Title, expr)
				case len(res) == 0:
					empty = append(empty, expr)
				}
			}
			if len(pn.Targets) > 0 && len(empty) == len(pn.Targets) {
				t.Errorf("panel %q shows no data: %q", pn.Title, empty)
			} else if len(empty) > 0 {
				t.Logf("panel %q: no data yet from %q", pn.Title, empty)
			}
		}
	}
	walk(d.Panels)
	if n < 20 {
		t.Errorf("only %d dashboard queries evaluated", n)
	}
	t.Logf("dashboard: %d queries evaluated (every one with data: %v)", n, every)
}

// ---------------------------------------------------------------------------
// The issuer.

// TestPrometheusIssuer drives the built imdsproxy-issuer (aws_iid with EC2
// verification against the fake EC2, behind a switch that fails or slows
// it) under a real Prometheus with the issuer's shipped rules:
//
//   - healthy, minting: no alert is active;
//   - documents signed by a CA it does not trust: ImdsproxyIssuerRefusing
//     {reason=untrusted_signer} fires;
//   - EC2 fails: ImdsproxyIssuerUpstreamFailing fires;
//   - EC2 answers after 3 s: ImdsproxyIssuerSlow fires;
//   - a config file that does not parse: ImdsproxyIssuerConfigReloadFailed
//     fires, and resolves when the file is restored;
//   - SIGTERM with a drain delay: /readyz fails while it still serves:
//     ImdsproxyIssuerNotReady fires; it exits: ImdsproxyIssuerDown fires and
//     NotReady resolves; it starts again: Down resolves.
//
// Every rule evaluates without error throughout.
func TestPrometheusIssuer(t *testing.T) {
	t.Parallel()
	start := time.Now()
	bin, err := e2e.IssuerBinary()
	if err != nil {
		t.Fatalf("e2e: no issuer binary: %v", err)
	}
	dir := t.TempDir()

	// EC2, behind a switch: fail (503, which the SDK retries, then gives
	// up) or answer late.
	ec2 := fakeec2.New()
	var ec2Delay atomic.Int64
	ec2Srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if d := time.Duration(ec2Delay.Load()); d > 0 {
			time.Sleep(d)
		}
		ec2.ServeHTTP(w, r)
	}))
	defer ec2Srv.Close()

	ca, err := instance.NewCA("e2e prometheus identity signer")
	if err != nil {
		t.Fatal(err)
	}
	caFile := filepath.Join(dir, "iid-ca.pem")
	if err := ca.WriteCert(caFile); err != nil {
		t.Fatal(err)
	}
	other, err := instance.NewCA("an untrusted signer")
	if err != nil {
		t.Fatal(err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	keyFile := filepath.Join(dir, "signing.pem")
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	port, err := e2e.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	good := fmt.Sprintf(`listen: %s
issuer: http://%s
signing:
  keys:
    - {file: %q}
attestation:
  aws_iid:
    certificates: [%q]
    verify_instance: true
  ec2:
    endpoint: %s
    timeout: 10s
tokens: {audience: sts.amazonaws.com, ttl: 1h}
policy:
  - name: hosts
    match: {accounts: [%q]}
    subjects: [app]
rate_limit: {per_host_per_minute: 0}
shutdown: {drain_delay: 8s, timeout: 5s}
`, addr, addr, keyFile, caFile, ec2Srv.URL, instance.DefaultAccountID)
	cfgPath := filepath.Join(dir, "issuer.yaml")
	writeIssuerConfig := func(s string) {
		if err := os.WriteFile(cfgPath+".tmp", []byte(s), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(cfgPath+".tmp", cfgPath); err != nil {
			t.Fatal(err)
		}
	}
	writeIssuerConfig(good)
	empty := filepath.Join(dir, "empty")
	if err := os.WriteFile(empty, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	log := &e2e.LockedBuffer{}
	opts := e2e.IssuerOptions{Bin: bin, Config: cfgPath, Addr: addr, Dir: dir, Out: log,
		Env: append(e2e.Environ("HOME"), "HOME="+dir, "NO_PROXY=*", "no_proxy=*",
			// The issuer's own credentials (EC2): dummies the fake accepts.
			"AWS_REGION=us-east-1", "AWS_ACCESS_KEY_ID=AKIAISSUEREXAMPLE000", "AWS_SECRET_ACCESS_KEY=issuer-dummy-secret",
			"AWS_EC2_METADATA_DISABLED=true", "AWS_CONFIG_FILE="+empty, "AWS_SHARED_CREDENTIALS_FILE="+empty)}
	proc, err := e2e.StartIssuer(opts)
	if err != nil {
		t.Fatalf("%v\n%s", err, log)
	}
	t.Cleanup(func() {
		proc.Stop(15 * time.Second)
		if t.Failed() {
			t.Logf("issuer log:\n%s", e2e.TailLines(log.String(), 40))
		}
	})
	p := startPrometheus(t, map[string]string{"imdsproxy-issuer": addr}, issuerRules)

	// mint asks for a token for a new instance, known to EC2 (running) or
	// not, its document signed by ca; it returns the HTTP status.
	mint := func(signer *instance.CA, known bool) int {
		in, err := instance.New(instance.Options{CA: signer})
		if err != nil {
			t.Error(err)
			return 0
		}
		if known {
			ec2.Put(in.Region, fakeec2.Instance{ID: in.InstanceID, State: "running", LaunchTime: in.PendingTime})
		}
		body, _ := json.Marshal(map[string]string{"document": in.Document, "pkcs7": in.PKCS7, "workload": "app"})
		resp, err := e2e.Client.Post("http://"+addr+"/v1/token", "application/json", bytes.NewReader(body))
		if err != nil {
			t.Error(err)
			return 0
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp.StatusCode
	}
	// mintN runs n mints at once and returns how many answered want.
	mintN := func(n int, signer *instance.CA, known bool, want int) int {
		var wg sync.WaitGroup
		var got atomic.Int64
		for range n {
			wg.Go(func() {
				if mint(signer, known) == want {
					got.Add(1)
				}
			})
		}
		wg.Wait()
		return int(got.Load())
	}

	p.waitSeries(t, `up{job="imdsproxy-issuer"} == 1`, "first scrape")
	if got := mintN(10, ca, true, http.StatusOK); got != 10 {
		t.Fatalf("healthy: %d of 10 tokens minted\n%s", got, e2e.TailLines(log.String(), 20))
	}
	p.waitSeries(t, `sum(imdsproxy_issuer_tokens_minted_total{job="imdsproxy-issuer"}) >= 10`, "minted")
	p.waitQuiet(t, "healthy")

	if got := mintN(20, other, true, http.StatusForbidden); got != 20 {
		t.Errorf("untrusted signer: %d of 20 refused with 403", got)
	}
	a := p.waitAlert(t, "ImdsproxyIssuerRefusing", map[string]string{"reason": "untrusted_signer"}, "firing", "untrusted signer")
	checkRatio(t, a)

	ec2.SetFail(true)
	if got := mintN(10, ca, true, http.StatusServiceUnavailable); got != 10 {
		t.Errorf("EC2 failing: %d of 10 answered 503", got)
	}
	ec2.SetFail(false)
	checkRatio(t, p.waitAlert(t, "ImdsproxyIssuerUpstreamFailing", nil, "firing", "EC2 failing"))

	ec2Delay.Store(int64(3 * time.Second))
	if got := mintN(10, ca, true, http.StatusOK); got != 10 {
		t.Errorf("EC2 slow: %d of 10 tokens minted", got)
	}
	ec2Delay.Store(0)
	p.waitAlert(t, "ImdsproxyIssuerSlow", nil, "firing", "EC2 answering after 3 s")
	t.Logf("refusals, upstream failures and slowness fired: %v", time.Since(start).Round(100*time.Millisecond))

	writeIssuerConfig(good + "this is: [not yaml\n")
	if err := proc.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	p.waitAlert(t, "ImdsproxyIssuerConfigReloadFailed", nil, "firing", "config that does not parse")
	writeIssuerConfig(good)
	if err := proc.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	p.waitResolved(t, "ImdsproxyIssuerConfigReloadFailed", nil, "config restored")
	p.checkRulesHealthy(t, issuerRules)

	// SIGTERM: /readyz fails for the drain delay while /metrics still
	// answers, then the process exits.
	if err := proc.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	p.waitAlert(t, "ImdsproxyIssuerNotReady", nil, "firing", "draining")
	p.waitAlert(t, "ImdsproxyIssuerDown", nil, "firing", "exited")
	p.waitResolved(t, "ImdsproxyIssuerNotReady", nil, "exited")
	if code := e2e.ExitCode(proc.Err()); !proc.Exited() || code != 0 {
		t.Errorf("issuer: exited %v, code %d after SIGTERM; want 0", proc.Exited(), code)
	}
	writeIssuerConfig(strings.Replace(good, "drain_delay: 8s", "drain_delay: 0s", 1)) // the cleanup's SIGTERM
	if proc, err = e2e.StartIssuer(opts); err != nil {
		t.Fatalf("%v\n%s", err, log)
	}
	p.waitResolved(t, "ImdsproxyIssuerDown", nil, "started again")
	p.checkRulesHealthy(t, issuerRules)
	t.Logf("issuer: %v in all", time.Since(start).Round(100*time.Millisecond))
}

// checkRatio checks that a's value, a share of requests, is one: in
// (0, 1]. A rate of requests that misses the first requests after a start
// (a series created by its first observation) makes it +Inf.
func checkRatio(t *testing.T, a promAlert) {
	t.Helper()
	v, err := strconv.ParseFloat(a.Value, 64)
	if err != nil || !(v > 0 && v <= 1) {
		t.Errorf("%s: value %q is not a share of the requests", a, a.Value)
	}
}
