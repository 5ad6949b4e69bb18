package test

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/imdsproxy/imdsproxy/test/e2e"
	"github.com/imdsproxy/imdsproxy/test/fakes/oidc"
	"github.com/imdsproxy/imdsproxy/test/fakes/sts"
)

// The harness of the end-to-end tests: a daemon per test (startDaemon) on
// the process's shared stand-in IMDS, with its own fake issuer and STS, on
// the helpers of package e2e.

// Timeouts of the harness.
const (
	readyTimeout = 15 * time.Second
	stopTimeout  = 10 * time.Second
)

// Debian's clients. Use these paths: other copies (pyenv, pip) may shadow
// them on PATH.
const (
	awsCLIPath  = "/usr/bin/aws"
	python3Path = "/usr/bin/python3"
	nodePath    = "/usr/bin/node"
)

// credPath is the credential document of the role the daemon serves.
const credPath = e2e.CredentialsPath + e2e.RoleName

var repoRoot string // directory holding go.mod

func TestMain(m *testing.M) {
	flag.Parse()
	os.Exit(testMain(m))
}

func testMain(m *testing.M) int {
	e2e.SanitizeEnv()
	var err error
	if repoRoot, err = e2e.RepoRoot(); err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		return 1
	}
	defer e2e.Cleanup()
	return m.Run()
}

// daemonBinary returns the imdsproxy binary (e2e.DaemonBinary); without one
// it fails t.
func daemonBinary(t testing.TB) string {
	t.Helper()
	bin, err := e2e.DaemonBinary()
	if err != nil {
		t.Fatalf("e2e: no daemon binary: %v", err)
	}
	return bin
}

// sharedUpstream returns the stand-in IMDS shared by all tests
// (e2e.SharedUpstream); without one it fails t.
func sharedUpstream(t testing.TB) *e2e.Upstream {
	t.Helper()
	up, err := e2e.SharedUpstream()
	if err != nil {
		t.Fatalf("e2e: upstream IMDS: %v", err)
	}
	t.Logf("upstream IMDS: %s at %s", up.Kind, up.URL)
	return up
}

// ---------------------------------------------------------------------------
// The daemon under test.

type envOptions struct {
	sessionLength   time.Duration // fake STS session override; 0: honour DurationSeconds
	stsDelay        time.Duration
	stsMode         sts.Mode
	backoffInitial  time.Duration // default 1s
	backoffMax      time.Duration // default 5s
	expiryMargin    time.Duration // default 2s
	fetchTimeout    time.Duration // cache.fetch_timeout; 0: the daemon's default (30s)
	upstreamTimeout time.Duration // upstream_timeout; 0: 2s
	tokens          string        // imds.tokens; default "required"
	imds            string        // more of the imds: flow mapping, e.g. "passthrough: {deny: [user-data]}"
	noWaitReady     bool          // wait for /healthz only, not /readyz
	logLevel        string        // --log-level; "" is debug (info for a flood: no line per request)

	// identityYAML, when set, renders the role:, source:, identity: and any
	// source-specific sections of the config instead of the web-identity
	// default (role arn/name, source web-identity, the token file).
	identityYAML func(e *daemonEnv) string
	// upstreamURL, when set, replaces the shared stand-in IMDS as the
	// daemon's upstream (for sources that read instance-profile
	// credentials from it).
	upstreamURL string
	// extraEnv is appended to the daemon's environment (for example
	// AWS_ENDPOINT_URL_ROLESANYWHERE for another source's fake).
	extraEnv []string
	// extraSecrets returns more values that must never appear in the
	// daemon's log, /debug/cache or /metrics (keys issued by another
	// source's fake, private keys, …).
	extraSecrets func() map[string]string
	// sts, when set, is the fake STS the daemon uses instead of one
	// trusting the harness's fake issuer (one that verifies a real
	// imdsproxy-issuer's tokens, say). The options above still apply to it.
	sts *sts.Server
	// command, when set, builds the daemon's command (e2e.DaemonOptions):
	// to run it in a mount namespace of its own, say.
	command func(name string, args ...string) *exec.Cmd
}

type daemonEnv struct {
	t          *testing.T
	opts       envOptions
	dir        string
	issuer     *oidc.Issuer
	sts        *sts.Server
	upstream   *e2e.Upstream
	tokenFile  string
	configPath string
	imdsPort   int
	adminPort  int
	imdsURL    string // http://127.0.0.1:PORT (no trailing slash)
	adminURL   string
	emptyFile  string // an empty file for AWS_CONFIG_FILE and friends

	mu   sync.Mutex
	jwts []string // every JWT written to the token file

	proc    *e2e.Process
	log     *e2e.LockedBuffer
	stopped bool
}

// startDaemon starts a fake issuer and STS, writes a token file and a config,
// starts the daemon and waits until it is ready (or only live, with
// noWaitReady). Everything is torn down at the end of the test; the daemon
// must then exit 0 on SIGTERM and its log must hold no secret.
func startDaemon(t *testing.T, opts envOptions) *daemonEnv {
	t.Helper()
	bin := daemonBinary(t)
	if opts.backoffInitial == 0 {
		opts.backoffInitial = time.Second
	}
	if opts.backoffMax == 0 {
		opts.backoffMax = 5 * time.Second
	}
	if opts.expiryMargin == 0 {
		opts.expiryMargin = 2 * time.Second
	}
	if opts.tokens == "" {
		opts.tokens = "required"
	}
	e := &daemonEnv{t: t, opts: opts, dir: t.TempDir(), log: &e2e.LockedBuffer{}}
	e.upstream = sharedUpstream(t)
	fakes := e2e.StartFakes(t, sts.Config{RoleARN: e2e.RoleARN})
	e.issuer, e.sts = fakes.Issuer, fakes.STS
	if opts.sts != nil {
		e.sts = opts.sts
	}
	e.sts.SetSessionLength(opts.sessionLength)
	e.sts.SetDelay(opts.stsDelay)
	e.sts.SetMode(opts.stsMode)

	e.tokenFile = filepath.Join(e.dir, "token.jwt")
	e.rotateToken(t)
	e.emptyFile = filepath.Join(e.dir, "empty")
	if err := os.WriteFile(e.emptyFile, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	var err error
	if e.imdsPort, err = e2e.FreePort(); err != nil {
		t.Fatal(err)
	}
	if e.adminPort, err = e2e.FreePort(); err != nil {
		t.Fatal(err)
	}
	e.imdsURL = fmt.Sprintf("http://127.0.0.1:%d", e.imdsPort)
	e.adminURL = fmt.Sprintf("http://127.0.0.1:%d", e.adminPort)
	e.configPath = filepath.Join(e.dir, "config.yaml")
	e.writeConfig(t, e.config())

	e.proc, err = e2e.StartDaemon(e2e.DaemonOptions{
		Bin: bin, Config: e.configPath, Args: []string{"--log-format", "json", "--log-level", cmp.Or(opts.logLevel, "debug")},
		Dir: e.dir, Env: e.daemonEnviron(), Out: e.log, Command: opts.command,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.cleanup)

	if err := e2e.WaitOK(e2e.Client, e.adminURL+"/healthz", readyTimeout, 50*time.Millisecond, e.proc); err != nil {
		t.Fatalf("daemon not live: %v\n%s", err, e.logTail(60))
	}
	if err := e2e.WaitTCP(fmt.Sprintf("127.0.0.1:%d", e.imdsPort), readyTimeout); err != nil {
		t.Fatalf("IMDS listener not accepting: %v\n%s", err, e.logTail(60))
	}
	if !opts.noWaitReady {
		e.waitReady(t, readyTimeout)
	}
	return e
}

// upstreamBase is the daemon's upstream: the option, else the shared stand-in.
func (e *daemonEnv) upstreamBase() string {
	if e.opts.upstreamURL != "" {
		return e.opts.upstreamURL
	}
	return e.upstream.URL
}

// defaultIdentity is the role:, source: and identity: sections of the
// config without identityYAML: web identity from the token file.
func (e *daemonEnv) defaultIdentity() string {
	return fmt.Sprintf(`role: {arn: %q, name: %s, session_name: "", duration: 1h}
source: web-identity
identity: {jwt_file: %q}
`, e2e.RoleARN, e2e.RoleName, e.tokenFile)
}

// config renders the daemon's YAML config.
func (e *daemonEnv) config() string {
	identity := e.defaultIdentity()
	if e.opts.identityYAML != nil {
		identity = e.opts.identityYAML(e)
	}
	cache := fmt.Sprintf("backoff_initial: %s, backoff_max: %s, expiry_margin: %s", e.opts.backoffInitial, e.opts.backoffMax, e.opts.expiryMargin)
	if e.opts.fetchTimeout > 0 {
		cache += fmt.Sprintf(", fetch_timeout: %s", e.opts.fetchTimeout)
	}
	return e2e.Config{
		Port: e.imdsPort, AdminPort: e.adminPort,
		Upstream: e.upstreamBase(), UpstreamTimeout: cmp.Or(e.opts.upstreamTimeout, 2*time.Second),
		Tokens: e.opts.tokens, IMDS: e.opts.imds, Cache: cache, Identity: identity,
	}.YAML()
}

func (e *daemonEnv) writeConfig(t testing.TB, cfg string) {
	t.Helper()
	tmp := e.configPath + ".tmp"
	if err := os.WriteFile(tmp, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, e.configPath); err != nil {
		t.Fatal(err)
	}
}

// rotateToken writes a fresh one-hour JWT to the token file.
func (e *daemonEnv) rotateToken(t testing.TB) string {
	t.Helper()
	jwt := e.issuer.Mint(oidc.Claims{Subject: "host-1"})
	if err := oidc.WriteTokenFile(e.tokenFile, jwt); err != nil {
		t.Fatal(err)
	}
	e.mu.Lock()
	e.jwts = append(e.jwts, jwt)
	e.mu.Unlock()
	return jwt
}

// daemonEnviron is the daemon's environment: the test's minus AWS_*, CA
// bundles and proxies (e2e.Environ), plus the region and the fake STS
// endpoint.
func (e *daemonEnv) daemonEnviron() []string {
	return append(append(e2e.Environ("HOME", "GOGC", "GOMEMLIMIT"), // the daemon's own GC settings unless a test sets them
		"HOME="+e.dir,
		"NO_PROXY=*", "no_proxy=*",
		"AWS_REGION=us-east-1",
		"AWS_ENDPOINT_URL_STS="+e.sts.URL,
		"AWS_CONFIG_FILE="+e.emptyFile,
		"AWS_SHARED_CREDENTIALS_FILE="+e.emptyFile,
	), e.opts.extraEnv...)
}

// clientEnviron is a minimal, hermetic environment for SDK client
// subprocesses pointed at the daemon.
func (e *daemonEnv) clientEnviron() []string {
	return []string{
		"PATH=/usr/bin:/bin",
		"HOME=" + e.dir,
		"LANG=C.UTF-8",
		"NO_PROXY=*", "no_proxy=*",
		"AWS_REGION=us-east-1",
		"AWS_CONFIG_FILE=" + e.emptyFile,
		"AWS_SHARED_CREDENTIALS_FILE=" + e.emptyFile,
		// AWS CLI 2.9.19 needs the trailing slash.
		"AWS_EC2_METADATA_SERVICE_ENDPOINT=" + e.imdsURL + "/",
	}
}

func (e *daemonEnv) exited() bool { return e.proc.Exited() }

func (e *daemonEnv) waitReady(t testing.TB, timeout time.Duration) {
	t.Helper()
	if err := e2e.WaitOK(e2e.Client, e.adminURL+"/readyz", timeout, 50*time.Millisecond, e.proc); err != nil {
		t.Fatalf("daemon not ready: %v\nSTS calls: %+v\n%s", err, e.sts.CallLog(), e.logTail(60))
	}
}

// signal sends sig to the daemon.
func (e *daemonEnv) signal(t testing.TB, sig os.Signal) {
	t.Helper()
	if err := e.proc.Signal(sig); err != nil {
		t.Fatalf("signal %v: %v", sig, err)
	}
}

// stop sends SIGTERM and waits for the exit; it returns the exit code (-1 if
// killed after stopTimeout).
func (e *daemonEnv) stop() int {
	e.stopped = true
	return e.proc.Stop(stopTimeout)
}

func (e *daemonEnv) cleanup() {
	t := e.t
	alreadyStopped := e.stopped
	code := e.stop()
	if !alreadyStopped && code != 0 {
		t.Errorf("daemon exited %d on SIGTERM (want 0): %v", code, e.proc.Err())
	}
	e.assertNoSecrets(t, "daemon log", e.log.String())
	if t.Failed() {
		t.Logf("daemon log (tail):\n%s", e.logTail(120))
	}
}

// secrets returns every secret the run produced: each issued secret key and
// session token, and every JWT written to the token file or presented to STS.
func (e *daemonEnv) secrets() map[string]string {
	out := map[string]string{}
	for i, is := range e.sts.Issued() {
		out[fmt.Sprintf("SecretAccessKey #%d", i)] = is.SecretAccessKey
		out[fmt.Sprintf("SessionToken #%d", i)] = is.SessionToken
		// a window from the random middle of the token catches partial dumps
		mid := len(is.SessionToken) / 2
		out[fmt.Sprintf("SessionToken #%d (middle 32 chars)", i)] = is.SessionToken[mid-16 : mid+16]
		out[fmt.Sprintf("JWT presented to STS for #%d", i)] = is.WebIdentityToken
	}
	if e.opts.extraSecrets != nil {
		for k, v := range e.opts.extraSecrets() {
			out[k] = v
		}
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	for i, j := range e.jwts {
		out[fmt.Sprintf("JWT #%d", i)] = j
		if k := strings.LastIndexByte(j, '.'); k > 0 {
			out[fmt.Sprintf("JWT #%d signature", i)] = j[k+1:]
		}
	}
	return out
}

func (e *daemonEnv) assertNoSecrets(t testing.TB, where, text string) {
	t.Helper()
	for name, s := range e.secrets() {
		if s != "" && strings.Contains(text, s) {
			t.Errorf("%s contains %s", where, name)
		}
	}
}

func (e *daemonEnv) logTail(n int) string { return e2e.TailLines(e.log.String(), n) }

// logLines returns the daemon's JSON log lines, decoded (non-JSON lines are
// skipped).
func (e *daemonEnv) logLines() []map[string]any { return e2e.JSONLines(e.log.String()) }

// ---------------------------------------------------------------------------
// IMDS and admin helpers.

// fetchCreds does what every SDK does: PUT a token, then GET the document.
func (e *daemonEnv) fetchCreds(ctx context.Context) (e2e.CredDoc, error) {
	tok, err := e2e.IMDSToken(ctx, e2e.Client, e.imdsURL, 21600)
	if err != nil {
		return e2e.CredDoc{}, err
	}
	return e2e.GetCredDoc(ctx, e2e.Client, e.imdsURL, e2e.RoleName, tok)
}

var wireTime = regexp.MustCompile(`^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$`)

// checkServed checks a served document against what the fake STS issued:
// the three values must be exactly one issued credential, and the expiry must
// be whole-second UTC and not later than the real one.
func (e *daemonEnv) checkServed(d e2e.CredDoc) error {
	is, ok := e.sts.Find(d.AccessKeyId)
	if !ok {
		return fmt.Errorf("served access key id %q was never issued by STS", d.AccessKeyId)
	}
	if d.SecretAccessKey != is.SecretAccessKey || d.Token != is.SessionToken {
		return fmt.Errorf("served secret/token for %s differ from the ones STS issued", d.AccessKeyId)
	}
	if !wireTime.MatchString(d.Expiration) || !wireTime.MatchString(d.LastUpdated) {
		return fmt.Errorf("timestamps not YYYY-MM-DDTHH:MM:SSZ: Expiration %q LastUpdated %q", d.Expiration, d.LastUpdated)
	}
	exp, _ := time.Parse(time.RFC3339, d.Expiration)
	if exp.After(is.Expiration) {
		return fmt.Errorf("served Expiration %s is after the real one %s", exp, is.Expiration)
	}
	if d.Type != "AWS-HMAC" {
		return fmt.Errorf("Type %q", d.Type)
	}
	return nil
}

// debugCache is the /debug/cache document.
type debugCache struct {
	Entries []struct {
		Key                 string `json:"key"`
		AccessKeyID         string `json:"access_key_id"`
		Expires             string `json:"expires"`
		LastError           string `json:"last_error"`
		ErrorClass          string `json:"error_class"`
		Permanent           bool   `json:"permanent"`
		ConsecutiveFailures int    `json:"consecutive_failures"`
		Valid               bool   `json:"valid"`
	} `json:"entries"`
}

func (e *daemonEnv) debugCache(t testing.TB) (debugCache, string) {
	t.Helper()
	st, body, err := e2e.GetURL(e.adminURL + "/debug/cache")
	if err != nil || st != http.StatusOK {
		t.Fatalf("GET /debug/cache: %d %v\n%s", st, err, body)
	}
	var dc debugCache
	if err := json.Unmarshal([]byte(body), &dc); err != nil {
		t.Fatalf("/debug/cache is not the documented JSON: %v\n%s", err, body)
	}
	return dc, body
}

// metrics returns the text of /metrics.
func (e *daemonEnv) metrics(t testing.TB) string {
	t.Helper()
	st, body, err := e2e.GetURL(e.adminURL + "/metrics")
	if err != nil || st != http.StatusOK {
		t.Fatalf("GET /metrics: %d %v", st, err)
	}
	return body
}

// scrape returns /metrics, parsed.
func (e *daemonEnv) scrape(t testing.TB) e2e.Metrics {
	t.Helper()
	m, err := e2e.ParseMetrics(e.metrics(t))
	if err != nil {
		t.Fatalf("GET /metrics: %v", err)
	}
	return m
}

// waitMetric polls /metrics until cond holds for the value of the series
// name{labels} (e2e.Metrics.Value).
func waitMetric(t *testing.T, e *daemonEnv, name string, labels map[string]string, cond func(float64) bool, timeout time.Duration) float64 {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var v float64
	var ok bool
	for time.Now().Before(deadline) {
		if v, ok = e.scrape(t).Value(name, labels); ok && cond(v) {
			return v
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("metric %s%v = %v (present %v) after %v\n%s", name, labels, v, ok, timeout, e.logTail(40))
	return v
}

// waitFor polls ok every 100 ms until it holds; it fails t after d.
func waitFor(t testing.TB, d time.Duration, what string, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !ok() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// ---------------------------------------------------------------------------
// Client programs.

// requireClient fails the test when a client program is missing, unless
// IMDSPROXY_E2E_ALLOW_MISSING=1, in which case it skips.
func requireClient(t *testing.T, path, what string) {
	t.Helper()
	if _, err := os.Stat(path); err == nil {
		return
	}
	msg := fmt.Sprintf("%s (%s) is not installed; `make test` installs it", what, path)
	if os.Getenv("IMDSPROXY_E2E_ALLOW_MISSING") == "1" {
		t.Skip(msg + " (skipped: IMDSPROXY_E2E_ALLOW_MISSING=1)")
	}
	t.Fatal(msg + " (set IMDSPROXY_E2E_ALLOW_MISSING=1 to skip)")
}

// runClient runs a client program with env and returns its stdout.
func runClient(t *testing.T, dir string, env []string, name string, args ...string) []byte {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = dir
	cmd.Env = env
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("%s %s: %v\nstderr:\n%s", name, strings.Join(args, " "), err, stderr.String())
	}
	return stdout.Bytes()
}

func execCommand(ctx context.Context, name string, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, name, args...)
}
