package bench

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/imdsproxy/imdsproxy/test/e2e"
	"github.com/imdsproxy/imdsproxy/test/fakes/oidc"
	"github.com/imdsproxy/imdsproxy/test/fakes/sts"
)

// The shared environment: a fake OIDC issuer and a fake STS (in this
// process), a stub upstream IMDS answering 404, one long-running daemon and
// one long-running ceiling, both subprocesses. It is built by the first
// benchmark that needs it and torn down by TestMain.

// server is a subprocess serving IMDS on base.
type server struct {
	name string
	proc *e2e.Process
	pid  int
	base string // http://127.0.0.1:PORT
	// admin is the daemon's admin listener (http://127.0.0.1:PORT), "" for
	// the other servers.
	admin string
	role  string // the role it serves
	tok   string // a valid IMDSv2 token, for the GETs
	dial  dialFunc
	out   *capBuffer
	// rss samples a daemon's VmRSS every 100 ms from its start to the end
	// of the run (the report's "RSS throughout"); nil for the others.
	rss *rssSampler
}

// ep is where the load generator reaches s.
func (s *server) ep() endpoint { return endpoint{base: s.base, role: s.role, dial: s.dial} }

// stop sends SIGTERM and waits up to 10 s, then kills; then it closes the
// output file (String still reads it).
func (s *server) stop() {
	if s != nil {
		s.proc.Stop(10 * time.Second)
		if s.out != nil {
			s.out.mu.Lock()
			_ = s.out.f.Close()
			s.out.mu.Unlock()
		}
	}
}

func (s *server) exited() bool { return s.proc.Exited() }

// state is how the process ended, for messages.
func (s *server) state() *os.ProcessState { return s.proc.State() }

// capBuffer is a subprocess's output, kept in a file of the run's
// directory. A daemon writes its log into that file itself (StartDaemon
// hands the *os.File to exec), so no goroutine of the bench, which runs on
// the load generator's CPU, copies it: a daemon pays for its own log lines,
// as it does on a host, and nothing else does. Other writers (AEMM's and
// the ceiling's pipes) go through Write. String returns the first 64 KiB
// and the last 32 KiB, for error messages (AEMM logs two lines per request,
// and the reason it stopped would be past the first 64 KiB).
type capBuffer struct {
	mu sync.Mutex
	f  *os.File
}

const capHead, capTail = 64 << 10, 32 << 10

// newOutput creates the output file name.log in the run's directory.
func (e *benchEnv) newOutput(name string) (*capBuffer, error) {
	f, err := os.OpenFile(filepath.Join(e.dir, strings.NewReplacer("/", "_", " ", "_").Replace(name)+".log"),
		os.O_CREATE|os.O_WRONLY|os.O_APPEND|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, err
	}
	return &capBuffer{f: f}, nil
}

func (c *capBuffer) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.f.Write(p)
}

func (c *capBuffer) String() string {
	if c == nil {
		return ""
	}
	b, err := os.ReadFile(c.f.Name())
	if err != nil {
		return fmt.Sprintf("[output %s: %v]", c.f.Name(), err)
	}
	if len(b) <= capHead+capTail {
		return string(b)
	}
	return fmt.Sprintf("%s\n[... %d bytes left out ...]\n%s", b[:capHead], len(b)-capHead-capTail, b[len(b)-capTail:])
}

// wireResponse is one captured response of the daemon.
type wireResponse struct {
	Status int         `json:"status"`
	Header http.Header `json:"header"`
	Body   []byte      `json:"body"`
}

// wireSample is what the ceiling replays: the daemon's own answers.
type wireSample struct {
	Role    string       `json:"role"`
	Token   wireResponse `json:"token"`
	Listing wireResponse `json:"listing"`
	Creds   wireResponse `json:"creds"`
}

type benchEnv struct {
	bin      string
	dir      string
	fakes    *e2e.Fakes       // the OIDC issuer and STS
	up       *httptest.Server // the upstream IMDS, answering 404
	stsURL   string
	upstream string
	jwtFile  string

	daemon      *server
	daemonToken string
	// noaudit is a second daemon, the same config plus
	// `access: {audit: false}`; nil (and noauditSkip says why) when it
	// did not start.
	noaudit     *server
	noauditSkip string
	// other is a daemon from -other.bin (another build, e.g. an older
	// commit), with the default daemon's config; nil when -other.bin is
	// unset or it did not start (otherSkip says why).
	other        *server
	otherSkip    string
	firstReady   time.Duration // cold start of the long-running daemon
	ceiling      *server
	ceilingToken string
	wire         wireSample
	// raw replays the ceiling's bytes from a hand-written HTTP/1.1 loop
	// instead of net/http's server (serveRaw): what the server package
	// itself costs. nil (and rawSkip says why) when it did not start.
	raw     *server
	rawSkip string

	// aemm is amazon-ec2-metadata-mock, nil (and aemmSkip says why) when
	// its binary is missing or it did not start.
	aemm         *server
	aemmSkip     string
	aemmCredsLen int // bytes of its credential document

	// rah is the Roles Anywhere credential helper's serve, nil (and rahSkip
	// says why) when RAH_BIN is unset or it did not start; rahFake is the
	// fake Roles Anywhere it signed in to.
	rah     *server
	rahSkip string
	rahFake *rahFake

	// ns is the network namespace of the interception benchmark, nil (and
	// nsSkip says why) when it could not be set up.
	ns     *nsEnv
	nsSkip string

	nstarted int // daemons started, for config file names

	loadAtStart string // /proc/loadavg when the environment was built
}

var (
	envOnce sync.Once
	envVal  *benchEnv
	envErr  error
)

// getEnv returns the shared environment, building it on first use. It skips
// the benchmark when IMDSPROXY_BIN is unset or missing.
func getEnv(b *testing.B) *benchEnv {
	b.Helper()
	bin := os.Getenv(e2e.BinEnv)
	if bin == "" {
		b.Skipf("%s is not set: build the daemon (make build) and run with %s=$PWD/bin/imdsproxy (or use make bench)", e2e.BinEnv, e2e.BinEnv)
	}
	if st, err := os.Stat(bin); err != nil || st.IsDir() {
		b.Skipf("%s=%s: no such file (%v): build it with make build", e2e.BinEnv, bin, err)
	}
	envOnce.Do(func() { envVal, envErr = newEnv(bin) })
	if envErr != nil {
		b.Fatalf("bench setup: %v", envErr)
	}
	return envVal
}

var teardownOnce sync.Once

// teardownEnv stops everything getEnv started, once.
func teardownEnv() { teardownOnce.Do(teardown) }

func teardown() {
	e := envVal
	if e == nil {
		return
	}
	for _, d := range []*server{e.daemon, e.noaudit, e.other} {
		if d != nil && d.rss != nil {
			d.rss.stop()
		}
	}
	e.daemon.stop()
	e.noaudit.stop()
	e.other.stop()
	e.ceiling.stop()
	e.raw.stop()
	e.aemm.stop()
	e.rah.stop()
	e.rahFake.close()
	e.ns.teardown()
	if e.fakes != nil {
		e.fakes.Close()
	}
	if e.up != nil {
		e.up.Close()
	}
	if e.dir != "" {
		os.RemoveAll(e.dir)
	}
}

func newEnv(bin string) (_ *benchEnv, err error) {
	abs, err := filepath.Abs(bin)
	if err != nil {
		return nil, err
	}
	e := &benchEnv{bin: abs, loadAtStart: loadAvg()}
	envVal = e // so that teardownEnv cleans up a half-built environment
	// On SIGINT or SIGTERM, stop the subprocesses and delete the namespace
	// before exiting; TestMain does it at a normal end.
	go func() {
		ctx, stop := signalContext()
		defer stop()
		<-ctx.Done()
		fmt.Fprintln(os.Stderr, "bench: interrupted (SIGINT or SIGTERM): stopping the servers and deleting the namespace")
		teardownEnv()
		os.Exit(2)
	}()
	if e.dir, err = os.MkdirTemp("", "imdsproxy-bench-"); err != nil {
		return nil, err
	}

	if e.fakes, err = e2e.NewFakes(sts.Config{RoleARN: e2e.RoleARN}); err != nil {
		return nil, err
	}
	e.stsURL = e.fakes.STS.URL

	e.up = httptest.NewServer(http.NotFoundHandler())
	e.upstream = e.up.URL

	e.jwtFile = filepath.Join(e.dir, "token.jwt")
	jwt := e.fakes.Issuer.Mint(oidc.Claims{ExpiresAt: time.Now().Add(24 * time.Hour)})
	if err := oidc.WriteTokenFile(e.jwtFile, jwt); err != nil {
		return nil, err
	}

	if e.daemon, e.firstReady, err = e.startDaemon(); err != nil {
		return nil, err
	}
	if err := e.capture(); err != nil {
		return nil, err
	}
	if e.ceiling, err = e.startCeiling("ceiling"); err != nil {
		return nil, err
	}
	if e.ceilingToken, err = e.checkCeiling(e.ceiling); err != nil {
		return nil, err
	}
	e.daemon.role, e.daemon.tok = e2e.RoleName, e.daemonToken
	e.ceiling.role, e.ceiling.tok = e2e.RoleName, e.ceilingToken
	if e.raw, e.rawSkip = e.startRaw(); e.rawSkip != "" {
		fmt.Fprintf(os.Stderr, "\n*** SKIPPING the raw replay: %s ***\n\n", e.rawSkip)
	}
	e.daemon.rss = newRSSSampler(e.daemon.pid, 100*time.Millisecond)
	e.noaudit, e.noauditSkip = e.startExtraDaemon(daemonSpec{name: "daemon-noaudit", extra: "access: {audit: false}\n"})
	if e.noauditSkip != "" {
		fmt.Fprintf(os.Stderr, "\n*** SKIPPING the daemon with access: {audit: false}: %s ***\n\n", e.noauditSkip)
	}
	if *otherBin != "" {
		e.other, e.otherSkip = e.startExtraDaemon(daemonSpec{name: "daemon-" + *otherName, bin: *otherBin})
		if e.otherSkip != "" {
			fmt.Fprintf(os.Stderr, "\n*** SKIPPING the daemon of -other.bin %s: %s ***\n\n", *otherBin, e.otherSkip)
		}
	}
	e.aemm, e.aemmSkip = e.startAEMM()
	if e.aemmSkip != "" {
		fmt.Fprintf(os.Stderr, "\n*** SKIPPING amazon-ec2-metadata-mock: %s ***\n\n", e.aemmSkip)
	}
	e.rah, e.rahSkip = e.startRAHelper()
	if e.rahSkip != "" {
		fmt.Fprintf(os.Stderr, "\n*** SKIPPING the Roles Anywhere credential helper: %s ***\n\n", e.rahSkip)
	}
	e.ns, e.nsSkip = e.setupNetns()
	if e.nsSkip != "" {
		fmt.Fprintf(os.Stderr, "\n*** SKIPPING the interception benchmark: %s ***\n\n", e.nsSkip)
	}
	return e, nil
}

// daemonEnv is the daemon's environment: ours without AWS_*, CA bundles
// and proxies (e2e.Environ), plus the region and the fake STS endpoint.
func (e *benchEnv) daemonEnv(stsURL string) []string {
	return append(e2e.Environ(), "AWS_REGION=us-east-1", "AWS_ENDPOINT_URL_STS="+stsURL)
}

// daemonSpec says which daemon to start: the default one (the zero value:
// IMDSPROXY_BIN, the default config, logging at the default level, info,
// so that the audit lines are written as in production), or a variant.
type daemonSpec struct {
	name  string // for messages and the report; "" is "daemon"
	bin   string // "" is IMDSPROXY_BIN
	extra string // appended to the config
	// ns, when set, runs the daemon inside that network namespace (ip
	// netns exec, which execs, so the pid is the daemon's) with
	// interception enabled, talking to the fakes ns serves there.
	ns *nsEnv
}

// startDaemon writes a config with fresh ports, starts the default daemon
// and waits for /readyz to answer 200. The duration is from exec to that
// answer.
func (e *benchEnv) startDaemon() (*server, time.Duration, error) {
	return e.startDaemonWith(daemonSpec{})
}

// startDaemonIn is startDaemon inside the network namespace ns.
func (e *benchEnv) startDaemonIn(ns *nsEnv) (*server, time.Duration, error) {
	return e.startDaemonWith(daemonSpec{ns: ns})
}

// startExtraDaemon starts the daemon of spec beside the default one, checks
// that it lists the role and serves its credentials, and samples its RSS.
// It returns a reason to skip instead of an error.
func (e *benchEnv) startExtraDaemon(spec daemonSpec) (*server, string) {
	s, _, err := e.startDaemonWith(spec)
	if err != nil {
		return nil, err.Error()
	}
	c := newClient()
	defer c.CloseIdleConnections()
	tok, err := roundTrip(c, http.MethodPut, s.base+e2e.TokenPath, "")
	if err == nil && (tok.Status != http.StatusOK || len(tok.Body) == 0) {
		err = fmt.Errorf("token: status %d body %.100q", tok.Status, tok.Body)
	}
	if err == nil {
		var cr wireResponse
		cr, err = roundTrip(c, http.MethodGet, s.base+e2e.CredentialsPath+e2e.RoleName, string(tok.Body))
		if err == nil && (cr.Status != http.StatusOK || !bytes.Contains(cr.Body, []byte(`"AccessKeyId"`))) {
			err = fmt.Errorf("credentials: status %d body %.200q", cr.Status, cr.Body)
		}
	}
	if err != nil {
		s.stop()
		return nil, fmt.Sprintf("%s: %v; output:\n%s", s.name, err, tail(s.out.String(), 2000))
	}
	s.tok = string(tok.Body)
	s.rss = newRSSSampler(s.pid, 100*time.Millisecond)
	return s, ""
}

// startDaemonWith starts the daemon of spec.
func (e *benchEnv) startDaemonWith(spec daemonSpec) (*server, time.Duration, error) {
	ns, bin := spec.ns, cmp.Or(spec.bin, e.bin)
	var err error
	port, err1 := e2e.FreePort()
	admin, err2 := e2e.FreePort()
	if err = errors.Join(err1, err2); err != nil {
		return nil, 0, err
	}
	if port == admin {
		return nil, 0, fmt.Errorf("free port %d returned twice", port)
	}
	upstream, stsURL, extra, dial := e.upstream, e.stsURL, "", dialFunc(nil)
	if ns != nil {
		upstream, stsURL, dial = ns.upstream, ns.stsURL, ns.dial
		extra = fmt.Sprintf("intercept: {enabled: true, ipv6: false, check_interval: 30s, exempt_uid: %d}\n", nsExemptUID)
	}
	e.nstarted++
	cfgPath := filepath.Join(e.dir, fmt.Sprintf("config-%d.yaml", e.nstarted))
	cfg := e2e.Config{
		Port: port, AdminPort: admin, Upstream: upstream,
		Identity: e2e.WebIdentityYAML(e2e.RoleARN, e2e.RoleName, e.jwtFile), Extra: extra + spec.extra,
	}
	if err := os.WriteFile(cfgPath, []byte(cfg.YAML()), 0o600); err != nil {
		return nil, 0, err
	}
	s := &server{name: cmp.Or(spec.name, "daemon"), base: fmt.Sprintf("http://127.0.0.1:%d", port), role: e2e.RoleName, dial: dial,
		admin: fmt.Sprintf("http://127.0.0.1:%d", admin)}
	if s.out, err = e.newOutput(fmt.Sprintf("%s-%d", s.name, e.nstarted)); err != nil {
		return nil, 0, err
	}
	command := pinnedCommand
	if ns != nil {
		// Rules first, as ExecStartPre would.
		inst := exec.Command("ip", "netns", "exec", ns.name, bin, "intercept", "install", "--config", cfgPath)
		inst.Env = e.daemonEnv(stsURL)
		if out, err := inst.CombinedOutput(); err != nil {
			return nil, 0, fmt.Errorf("imdsproxy intercept install in %s: %v: %s", ns.name, err, out)
		}
		s.name = "daemon (netns)"
		command = func(name string, args ...string) *exec.Cmd {
			return exec.Command("ip", append([]string{"netns", "exec", ns.name}, pinned(append([]string{name}, args...)...)...)...)
		}
	}
	poll := &http.Client{Timeout: time.Second, Transport: &http.Transport{Proxy: nil, DisableKeepAlives: true, DialContext: dial}}

	t0 := time.Now()
	s.proc, err = e2e.StartDaemon(e2e.DaemonOptions{
		Bin: bin, Config: cfgPath,
		Env: e.daemonEnv(stsURL), Command: command, Out: s.out.f,
	})
	if err != nil {
		return nil, 0, err
	}
	s.pid = s.proc.Pid()
	if err := e2e.WaitOK(poll, s.admin+"/readyz", 20*time.Second, time.Millisecond, s.proc); err != nil {
		s.stop()
		return nil, 0, fmt.Errorf("%s (%s) not ready: %v; output:\n%s", s.name, bin, err, s.out)
	}
	return s, time.Since(t0), nil
}

// capture records the daemon's answers to the three requests of the IMDSv2
// flow; the ceiling replays them.
func (e *benchEnv) capture() error {
	c := newClient()
	defer c.CloseIdleConnections()
	var err error
	get := func(method, path, tok string) wireResponse {
		if err != nil {
			return wireResponse{}
		}
		var r wireResponse
		r, err = roundTrip(c, method, e.daemon.base+path, tok)
		if err == nil && (r.Status != http.StatusOK || len(r.Body) == 0) {
			err = fmt.Errorf("daemon: %s %s: status %d body %.200q", method, path, r.Status, r.Body)
		}
		return r
	}
	w := wireSample{Role: e2e.RoleName}
	w.Token = get(http.MethodPut, e2e.TokenPath, "")
	e.daemonToken = string(w.Token.Body)
	w.Listing = get(http.MethodGet, e2e.CredentialsPath, e.daemonToken)
	w.Creds = get(http.MethodGet, e2e.CredentialsPath+e2e.RoleName, e.daemonToken)
	if err != nil {
		return err
	}
	if string(w.Listing.Body) != e2e.RoleName {
		return fmt.Errorf("daemon lists %q, want %q", w.Listing.Body, e2e.RoleName)
	}
	e.wire = w
	return nil
}

// roundTrip sends one request (a PUT asks for a token of requestedTTL) and
// returns the response with the Date header removed.
func roundTrip(c *http.Client, method, url, tok string) (wireResponse, error) {
	req, err := http.NewRequest(method, url, nil)
	if err != nil {
		return wireResponse{}, err
	}
	if method == http.MethodPut {
		req.Header.Set(e2e.TTLHeader, requestedTTL)
	}
	if tok != "" {
		req.Header.Set(e2e.TokenHeader, tok)
	}
	resp, err := c.Do(req)
	if err != nil {
		return wireResponse{}, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return wireResponse{}, err
	}
	h := resp.Header.Clone()
	h.Del("Date")
	return wireResponse{Status: resp.StatusCode, Header: h, Body: body}, nil
}

// startCeiling re-executes this test binary as the ceiling server (name
// "ceiling") or the raw replay ("raw"), replaying the captured responses; it
// reports its address on its first stdout line.
func (e *benchEnv) startCeiling(name string) (*server, error) {
	spec := filepath.Join(e.dir, "ceiling.json")
	b, err := json.Marshal(e.wire)
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(spec, b, 0o600); err != nil {
		return nil, err
	}
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	s := &server{name: name}
	if s.out, err = e.newOutput(name); err != nil {
		return nil, err
	}
	cmd := pinnedCommand(self)
	cmd.Env = append(os.Environ(), ceilingEnv+"="+spec)
	if name == "raw" {
		cmd.Env = append(cmd.Env, rawEnv+"=1")
	}
	cmd.Stderr = s.out
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if s.proc, err = e2e.Start(cmd); err != nil {
		return nil, err
	}
	s.pid = s.proc.Pid()
	lines := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		if sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
		_, _ = io.Copy(s.out, stdout)
	}()
	select {
	case line, ok := <-lines:
		addr, found := strings.CutPrefix(line, "listening ")
		if !ok || !found {
			s.stop()
			return nil, fmt.Errorf("%s: unexpected first line %q; stderr:\n%s", name, line, s.out)
		}
		s.base = "http://" + addr
		return s, nil
	case <-time.After(10 * time.Second):
		s.stop()
		return nil, fmt.Errorf("%s did not start; stderr:\n%s", name, s.out)
	}
}

// checkCeiling verifies that the answers of srv (the ceiling or the raw
// replay) equal the daemon's byte for byte (status, headers except Date,
// body) and returns its token.
func (e *benchEnv) checkCeiling(srv *server) (string, error) {
	c := newClient()
	defer c.CloseIdleConnections()
	want := []struct {
		method, path string
		w            wireResponse
	}{
		{http.MethodPut, e2e.TokenPath, e.wire.Token},
		{http.MethodGet, e2e.CredentialsPath, e.wire.Listing},
		{http.MethodGet, e2e.CredentialsPath + e2e.RoleName, e.wire.Creds},
	}
	tok := ""
	for _, x := range want {
		got, err := roundTrip(c, x.method, srv.base+x.path, tok)
		if err != nil {
			return "", fmt.Errorf("%s: %w", srv.name, err)
		}
		if got.Status != x.w.Status || !bytes.Equal(got.Body, x.w.Body) || !headersEqual(got.Header, x.w.Header) {
			return "", fmt.Errorf("%s: %s %s differs from the daemon:\n got %d %v %q\nwant %d %v %q",
				srv.name, x.method, x.path, got.Status, got.Header, got.Body, x.w.Status, x.w.Header, x.w.Body)
		}
		if x.method == http.MethodPut {
			tok = string(got.Body)
		}
	}
	return tok, nil
}

func headersEqual(a, b http.Header) bool {
	if len(a) != len(b) {
		return false
	}
	for k, va := range a {
		vb, ok := b[k]
		if !ok || strings.Join(va, "\n") != strings.Join(vb, "\n") {
			return false
		}
	}
	return true
}

// ceilingEnv, when set in the environment of this test binary, makes it the
// ceiling server instead of running tests (see TestMain). Its value is the
// path of the wireSample JSON to replay.
const ceilingEnv = "IMDSPROXY_BENCH_CEILING_SPEC"

// rawEnv, set with ceilingEnv, makes the ceiling the raw replay (serveRaw).
const rawEnv = "IMDSPROXY_BENCH_RAW"

// runCeiling is the ceiling: a bare net/http server answering the three
// requests of the flow with the captured bytes. It checks only that a token
// header is present on GETs and a TTL header on PUTs; it returns on SIGTERM.
func runCeiling(specPath string, raw bool) int {
	b, err := os.ReadFile(specPath)
	if err != nil {
		fmt.Fprintln(os.Stderr, "ceiling:", err)
		return 1
	}
	var w wireSample
	if err := json.Unmarshal(b, &w); err != nil {
		fmt.Fprintln(os.Stderr, "ceiling:", err)
		return 1
	}
	for _, r := range []*wireResponse{&w.Token, &w.Listing, &w.Creds} {
		r.Header.Del("Content-Length") // net/http sets it from the body
	}
	credsPath := e2e.CredentialsPath + w.Role
	reply := func(rw http.ResponseWriter, r *wireResponse) {
		h := rw.Header()
		for k, v := range r.Header {
			h[k] = v
		}
		rw.WriteHeader(r.Status)
		_, _ = rw.Write(r.Body)
	}
	h := http.HandlerFunc(func(rw http.ResponseWriter, req *http.Request) {
		switch req.URL.Path {
		case e2e.TokenPath:
			if req.Method != http.MethodPut {
				http.Error(rw, "method not allowed", http.StatusMethodNotAllowed)
				return
			}
			if req.Header.Get(e2e.TTLHeader) == "" {
				http.Error(rw, "missing ttl", http.StatusBadRequest)
				return
			}
			reply(rw, &w.Token)
		case e2e.CredentialsPath, credsPath:
			if req.Header.Get(e2e.TokenHeader) == "" {
				http.Error(rw, "unauthorized", http.StatusUnauthorized)
				return
			}
			if req.URL.Path == e2e.CredentialsPath {
				reply(rw, &w.Listing)
			} else {
				reply(rw, &w.Creds)
			}
		default:
			http.NotFound(rw, req)
		}
	})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, "ceiling:", err)
		return 1
	}
	fmt.Printf("listening %s\n", ln.Addr())
	if raw {
		return serveRaw(ln, &w, credsPath)
	}
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second}
	ctx, stop := signalContext()
	defer stop()
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
	}()
	if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		fmt.Fprintln(os.Stderr, "ceiling:", err)
		return 1
	}
	return 0
}

// loadAvg returns the first three fields of /proc/loadavg: other work on the
// machine skews every number here, so the report records it.
func loadAvg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "unknown"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "unknown"
	}
	return strings.Join(f[:3], " ")
}
