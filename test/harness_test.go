package test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/imdsproxy/imdsproxy/test/fakes/oidc"
	"github.com/imdsproxy/imdsproxy/test/fakes/sts"
)

// Role used by every test; the daemon's config names it.
const (
	roleARN  = "arn:aws:iam::222222222222:role/app"
	roleName = "app"
)

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

var (
	repoRoot string // directory holding go.mod

	binOnce sync.Once
	binPath string
	binErr  error
	binTmp  string // temporary build directory, removed by TestMain

	upOnce   sync.Once
	upstream *upstreamIMDS
)

func TestMain(m *testing.M) {
	flag.Parse()
	os.Exit(testMain(m))
}

func testMain(m *testing.M) int {
	sanitizeOwnEnv()
	var err error
	repoRoot, err = findRepoRoot()
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		return 1
	}
	code := m.Run()
	if upstream != nil {
		upstream.stop()
	}
	if binTmp != "" {
		os.RemoveAll(binTmp)
	}
	return code
}

// sanitizeOwnEnv removes from the test process every variable that would make
// the in-process Go SDK (or anything else) look elsewhere for credentials, a
// CA bundle or a proxy.
func sanitizeOwnEnv() {
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		if dropEnv(k) {
			os.Unsetenv(k)
		}
	}
	os.Setenv("NO_PROXY", "*")
	os.Setenv("no_proxy", "*")
}

func dropEnv(k string) bool {
	if strings.HasPrefix(k, "AWS_") {
		return true
	}
	switch strings.ToUpper(k) {
	case "SSL_CERT_FILE", "SSL_CERT_DIR", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY":
		return true
	}
	return false
}

func findRepoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("go.mod not found above the working directory")
		}
		dir = parent
	}
}

// daemonBinary returns the imdsproxy binary: IMDSPROXY_BIN, else
// <repo>/bin/imdsproxy, else one built now into a temporary directory.
func daemonBinary(t testing.TB) string {
	t.Helper()
	binOnce.Do(func() {
		if p := os.Getenv("IMDSPROXY_BIN"); p != "" {
			if _, err := os.Stat(p); err != nil {
				binErr = fmt.Errorf("IMDSPROXY_BIN=%s: %w", p, err)
			}
			binPath = p
			return
		}
		p := filepath.Join(repoRoot, "bin", "imdsproxy")
		if _, err := os.Stat(p); err == nil {
			binPath = p
			return
		}
		dir, err := os.MkdirTemp("", "imdsproxy-e2e-bin-")
		if err != nil {
			binErr = err
			return
		}
		binTmp = dir
		p = filepath.Join(dir, "imdsproxy")
		cmd := exec.Command("go", "build", "-o", p, "./cmd/imdsproxy")
		cmd.Dir = repoRoot
		out, err := cmd.CombinedOutput()
		if err != nil {
			binErr = fmt.Errorf("bin/imdsproxy is missing and `go build ./cmd/imdsproxy` failed: %v\n%s", err, out)
			return
		}
		binPath = p
	})
	if binErr != nil {
		t.Fatalf("e2e: no daemon binary: %v", binErr)
	}
	return binPath
}

// ---------------------------------------------------------------------------
// Stand-in for the real IMDS.

type upstreamIMDS struct {
	url  string
	kind string // "amazon-ec2-metadata-mock ..." or "httptest stand-in"
	cmd  *exec.Cmd
	home string
	srv  *httptest.Server
	err  error
}

func (u *upstreamIMDS) stop() {
	if u.cmd != nil && u.cmd.Process != nil {
		_ = u.cmd.Process.Signal(syscall.SIGTERM)
		done := make(chan struct{})
		go func() { _ = u.cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			_ = u.cmd.Process.Kill()
			<-done
		}
	}
	if u.srv != nil {
		u.srv.Close()
	}
	if u.home != "" {
		os.RemoveAll(u.home)
	}
}

// sharedUpstream returns the stand-in IMDS shared by all tests: the
// amazon-ec2-metadata-mock binary (AEMM_BIN or bin/tools/ec2-metadata-mock)
// in IMDSv2-only mode, or an httptest stand-in when it is not installed.
func sharedUpstream(t testing.TB) *upstreamIMDS {
	t.Helper()
	upOnce.Do(func() { upstream = startUpstream() })
	if upstream.err != nil {
		t.Fatalf("e2e: upstream IMDS: %v", upstream.err)
	}
	t.Logf("upstream IMDS: %s at %s", upstream.kind, upstream.url)
	return upstream
}

func startUpstream() *upstreamIMDS {
	bin := os.Getenv("AEMM_BIN")
	if bin == "" {
		bin = filepath.Join(repoRoot, "bin", "tools", "ec2-metadata-mock")
	}
	if _, err := os.Stat(bin); err != nil {
		fmt.Fprintf(os.Stderr, "e2e: WARNING: %s not found; using the httptest IMDS stand-in. `make test` installs amazon-ec2-metadata-mock v1.13.0.\n", bin)
		srv := httptest.NewServer(standInIMDS())
		return &upstreamIMDS{url: srv.URL, kind: "httptest stand-in (amazon-ec2-metadata-mock NOT installed)", srv: srv}
	}
	u := &upstreamIMDS{kind: "amazon-ec2-metadata-mock (" + bin + ", -I IMDSv2 only)"}
	port, err := freePort()
	if err != nil {
		u.err = err
		return u
	}
	u.url = "http://127.0.0.1:" + strconv.Itoa(port)
	// aemm reads $HOME/aemm-config.json: give it an empty home.
	u.home, _ = os.MkdirTemp("", "imdsproxy-e2e-aemm-")
	u.cmd = exec.Command(bin, "-n", "127.0.0.1", "-p", strconv.Itoa(port), "-I")
	u.cmd.Env = []string{"HOME=" + u.home, "PATH=/usr/bin:/bin", "NO_PROXY=*"}
	u.cmd.Dir = u.home
	var out lockedBuffer
	u.cmd.Stdout, u.cmd.Stderr = &out, &out
	if err := u.cmd.Start(); err != nil {
		u.err = fmt.Errorf("start %s: %w", bin, err)
		return u
	}
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		if tok, err := imdsToken(context.Background(), u.url, 60); err == nil && tok != "" {
			return u
		}
		time.Sleep(50 * time.Millisecond)
	}
	u.err = fmt.Errorf("%s did not answer on %s:\n%s", bin, u.url, out.String())
	return u
}

// standInIMDS serves the few paths the tests pass through, with the same
// values as amazon-ec2-metadata-mock, IMDSv2 only.
func standInIMDS() http.Handler {
	const instanceID = "i-1234567890abcdef0"
	doc := `{
	"accountId": "0123456789",
	"availabilityZone": "us-east-1f",
	"instanceId": "` + instanceID + `",
	"instanceType": "m4.xlarge",
	"region": "us-east-1"
}`
	var mu sync.Mutex
	tokens := map[string]time.Time{}
	mux := http.NewServeMux()
	mux.HandleFunc("PUT /latest/api/token", func(w http.ResponseWriter, r *http.Request) {
		ttl, err := strconv.Atoi(r.Header.Get("X-aws-ec2-metadata-token-ttl-seconds"))
		if err != nil || ttl < 1 || ttl > 21600 {
			http.Error(w, "bad ttl", http.StatusBadRequest)
			return
		}
		tok := strconv.FormatInt(time.Now().UnixNano(), 36)
		mu.Lock()
		tokens[tok] = time.Now().Add(time.Duration(ttl) * time.Second)
		mu.Unlock()
		w.Header().Set("X-aws-ec2-metadata-token-ttl-seconds", strconv.Itoa(ttl))
		_, _ = io.WriteString(w, tok)
	})
	serve := func(body string) http.HandlerFunc {
		return func(w http.ResponseWriter, r *http.Request) {
			mu.Lock()
			exp, ok := tokens[r.Header.Get("X-aws-ec2-metadata-token")]
			mu.Unlock()
			if !ok || time.Now().After(exp) {
				http.Error(w, "401 - Unauthorized", http.StatusUnauthorized)
				return
			}
			_, _ = io.WriteString(w, body)
		}
	}
	mux.HandleFunc("GET /latest/meta-data/instance-id", serve(instanceID))
	mux.HandleFunc("GET /latest/meta-data/placement/region", serve("us-east-1"))
	mux.HandleFunc("GET /latest/meta-data/placement/availability-zone", serve("us-east-1f"))
	mux.HandleFunc("GET /latest/meta-data/local-hostname", serve("ip-172-16-34-43.ec2.internal"))
	mux.HandleFunc("GET /latest/dynamic/instance-identity/document", serve(doc))
	return mux
}

// ---------------------------------------------------------------------------
// The daemon under test.

type envOptions struct {
	sessionLength  time.Duration // fake STS session override; 0: honour DurationSeconds
	stsDelay       time.Duration
	stsMode        sts.Mode
	backoffInitial time.Duration // default 1s
	backoffMax     time.Duration // default 5s
	expiryMargin   time.Duration // default 2s
	fetchTimeout   time.Duration // cache.fetch_timeout; 0: the daemon's default (30s)
	tokens         string        // imds.tokens; default "required"
	noWaitReady    bool          // wait for /healthz only, not /readyz

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
}

type daemonEnv struct {
	t          *testing.T
	opts       envOptions
	dir        string
	issuer     *oidc.Issuer
	sts        *sts.Server
	upstream   *upstreamIMDS
	tokenFile  string
	configPath string
	imdsPort   int
	adminPort  int
	imdsURL    string // http://127.0.0.1:PORT (no trailing slash)
	adminURL   string
	emptyFile  string // an empty file for AWS_CONFIG_FILE and friends

	mu   sync.Mutex
	jwts []string // every JWT written to the token file

	cmd     *exec.Cmd
	log     *lockedBuffer
	done    chan struct{}
	waitErr error
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
	e := &daemonEnv{t: t, opts: opts, dir: t.TempDir(), log: &lockedBuffer{}, done: make(chan struct{})}
	e.upstream = sharedUpstream(t)
	e.issuer = oidc.Start(t)
	e.sts = sts.Start(t, sts.Config{Issuer: e.issuer, RoleARN: roleARN})
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
	if e.imdsPort, err = freePort(); err != nil {
		t.Fatal(err)
	}
	if e.adminPort, err = freePort(); err != nil {
		t.Fatal(err)
	}
	e.imdsURL = fmt.Sprintf("http://127.0.0.1:%d", e.imdsPort)
	e.adminURL = fmt.Sprintf("http://127.0.0.1:%d", e.adminPort)
	e.configPath = filepath.Join(e.dir, "config.yaml")
	e.writeConfig(t, e.config())

	e.cmd = exec.Command(bin, "serve", "--config", e.configPath, "--log-format", "json", "--log-level", "debug")
	e.cmd.Dir = e.dir
	e.cmd.Env = e.daemonEnviron()
	e.cmd.Stdout, e.cmd.Stderr = e.log, e.log
	if err := e.cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", bin, err)
	}
	go func() {
		e.waitErr = e.cmd.Wait()
		close(e.done)
	}()
	t.Cleanup(e.cleanup)

	if err := e.waitHTTP(e.adminURL+"/healthz", readyTimeout); err != nil {
		t.Fatalf("daemon not live: %v\n%s", err, e.logTail(60))
	}
	if err := waitTCP(fmt.Sprintf("127.0.0.1:%d", e.imdsPort), readyTimeout); err != nil {
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
	return e.upstream.url
}

// config renders the daemon's YAML config.
func (e *daemonEnv) config() string {
	identity := fmt.Sprintf(`role: {arn: %q, name: %s, session_name: "", duration: 1h}
source: web-identity
identity: {jwt_file: %q}
`, roleARN, roleName, e.tokenFile)
	if e.opts.identityYAML != nil {
		identity = e.opts.identityYAML(e)
	}
	fetchTimeout := ""
	if e.opts.fetchTimeout > 0 {
		fetchTimeout = fmt.Sprintf(", fetch_timeout: %s", e.opts.fetchTimeout)
	}
	return fmt.Sprintf(`listen: 127.0.0.1:%d
admin_listen: 127.0.0.1:%d
upstream: %s
upstream_timeout: 2s
imds: {tokens: %s, hop_limit: 1}
cache: {backoff_initial: %s, backoff_max: %s, expiry_margin: %s%s}
%s`, e.imdsPort, e.adminPort, e.upstreamBase(), e.opts.tokens,
		e.opts.backoffInitial, e.opts.backoffMax, e.opts.expiryMargin, fetchTimeout, identity)
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
// bundles and proxies, plus the region and the fake STS endpoint.
func (e *daemonEnv) daemonEnviron() []string {
	var env []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		if dropEnv(k) || k == "HOME" {
			continue
		}
		env = append(env, kv)
	}
	return append(append(env,
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

func (e *daemonEnv) exited() bool {
	select {
	case <-e.done:
		return true
	default:
		return false
	}
}

func (e *daemonEnv) waitHTTP(url string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	var last string
	for time.Now().Before(deadline) {
		if e.exited() {
			return fmt.Errorf("daemon exited: %v", e.waitErr)
		}
		st, body, err := httpGet(url)
		if err == nil && st == http.StatusOK {
			return nil
		}
		last = fmt.Sprintf("status %d %q err %v", st, body, err)
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("GET %s not 200 after %v (last: %s)", url, timeout, last)
}

func (e *daemonEnv) waitReady(t testing.TB, timeout time.Duration) {
	t.Helper()
	if err := e.waitHTTP(e.adminURL+"/readyz", timeout); err != nil {
		t.Fatalf("daemon not ready: %v\nSTS calls: %+v\n%s", err, e.sts.CallLog(), e.logTail(60))
	}
}

// signal sends sig to the daemon.
func (e *daemonEnv) signal(t testing.TB, sig os.Signal) {
	t.Helper()
	if err := e.cmd.Process.Signal(sig); err != nil {
		t.Fatalf("signal %v: %v", sig, err)
	}
}

// stop sends SIGTERM and waits for the exit; it returns the exit code (-1 if
// killed after stopTimeout).
func (e *daemonEnv) stop() int {
	if !e.stopped {
		e.stopped = true
		if !e.exited() {
			_ = e.cmd.Process.Signal(syscall.SIGTERM)
		}
	}
	select {
	case <-e.done:
	case <-time.After(stopTimeout):
		_ = e.cmd.Process.Kill()
		<-e.done
		return -1
	}
	return exitCode(e.waitErr)
}

func exitCode(err error) int {
	if err == nil {
		return 0
	}
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			return 128 + int(ws.Signal())
		}
		return ee.ExitCode()
	}
	return -1
}

func (e *daemonEnv) cleanup() {
	t := e.t
	alreadyStopped := e.stopped
	code := e.stop()
	if !alreadyStopped && code != 0 {
		t.Errorf("daemon exited %d on SIGTERM (want 0): %v", code, e.waitErr)
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

func (e *daemonEnv) logTail(n int) string {
	lines := strings.Split(strings.TrimRight(e.log.String(), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// logLines returns the daemon's JSON log lines, decoded (non-JSON lines are
// skipped).
func (e *daemonEnv) logLines() []map[string]any {
	var out []map[string]any
	sc := bufio.NewScanner(strings.NewReader(e.log.String()))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var m map[string]any
		if json.Unmarshal(sc.Bytes(), &m) == nil {
			out = append(out, m)
		}
	}
	return out
}

// ---------------------------------------------------------------------------
// IMDS and admin helpers.

var httpClient = &http.Client{
	Timeout: 10 * time.Second,
	Transport: &http.Transport{
		Proxy:               nil,
		MaxIdleConnsPerHost: 64,
		DisableCompression:  true,
	},
}

func httpGet(url string) (int, string, error) {
	resp, err := httpClient.Get(url)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), err
}

// imdsToken PUTs /latest/api/token with the TTL header.
func imdsToken(ctx context.Context, base string, ttl int) (string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPut, base+"/latest/api/token", nil)
	if err != nil {
		return "", err
	}
	req.Header.Set("X-aws-ec2-metadata-token-ttl-seconds", strconv.Itoa(ttl))
	resp, err := httpClient.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("token PUT: %s: %s", resp.Status, b)
	}
	return string(b), nil
}

// imdsGet GETs an IMDS path with the session token (none if tok == "").
func imdsGet(ctx context.Context, client *http.Client, base, path, tok string) (int, string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, base+path, nil)
	if err != nil {
		return 0, "", err
	}
	if tok != "" {
		req.Header.Set("X-aws-ec2-metadata-token", tok)
	}
	resp, err := client.Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), err
}

// credDoc is the IMDS credential document.
type credDoc struct {
	Code            string
	Message         string
	LastUpdated     string
	Type            string
	AccessKeyId     string //nolint:revive // wire name
	SecretAccessKey string
	Token           string
	Expiration      string
}

const credPath = "/latest/meta-data/iam/security-credentials/" + roleName

// fetchCreds does what every SDK does: PUT a token, then GET the document.
func (e *daemonEnv) fetchCreds(ctx context.Context) (credDoc, error) {
	tok, err := imdsToken(ctx, e.imdsURL, 21600)
	if err != nil {
		return credDoc{}, err
	}
	return getCredDoc(ctx, httpClient, e.imdsURL, tok)
}

func getCredDoc(ctx context.Context, client *http.Client, base, tok string) (credDoc, error) {
	st, body, err := imdsGet(ctx, client, base, credPath, tok)
	if err != nil {
		return credDoc{}, err
	}
	if st != http.StatusOK {
		return credDoc{}, fmt.Errorf("GET %s: status %d", credPath, st)
	}
	var d credDoc
	if err := json.Unmarshal([]byte(body), &d); err != nil {
		return credDoc{}, fmt.Errorf("GET %s: bad JSON: %v", credPath, err)
	}
	if d.Code != "Success" {
		return d, fmt.Errorf("GET %s: Code %q Message %q", credPath, d.Code, d.Message)
	}
	return d, nil
}

var wireTime = regexp.MustCompile(`^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$`)

// checkServed checks a served document against what the fake STS issued:
// the three values must be exactly one issued credential, and the expiry must
// be whole-second UTC and not later than the real one.
func (e *daemonEnv) checkServed(d credDoc) error {
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
	st, body, err := httpGet(e.adminURL + "/debug/cache")
	if err != nil || st != http.StatusOK {
		t.Fatalf("GET /debug/cache: %d %v\n%s", st, err, body)
	}
	var dc debugCache
	if err := json.Unmarshal([]byte(body), &dc); err != nil {
		t.Fatalf("/debug/cache is not the documented JSON: %v\n%s", err, body)
	}
	return dc, body
}

func (e *daemonEnv) metrics(t testing.TB) string {
	t.Helper()
	st, body, err := httpGet(e.adminURL + "/metrics")
	if err != nil || st != http.StatusOK {
		t.Fatalf("GET /metrics: %d %v", st, err)
	}
	return body
}

// ---------------------------------------------------------------------------
// Small utilities.

func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

func waitTCP(addr string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
			return nil
		}
		if time.Now().After(deadline) {
			return err
		}
		time.Sleep(25 * time.Millisecond)
	}
}

// lockedBuffer is an io.Writer safe for concurrent use.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

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
