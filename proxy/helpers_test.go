package proxy

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"io"
	"maps"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/imdsproxy/imdsproxy/access"
	"github.com/imdsproxy/imdsproxy/creds"
	"github.com/imdsproxy/imdsproxy/peer"
)

var update = flag.Bool("update", false, "rewrite the golden files under testdata/")

// t0 is the fixed "now" of the tests: half a second past a whole second, so
// that truncation (never rounding up) is visible.
var t0 = time.Date(2026, 3, 1, 12, 0, 0, 500_000_000, time.UTC)

const (
	testRole   = "app"
	testKeyID  = "ASIAIOSFODNN7EXAMPLE"
	testSecret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
	testToken  = "IQoJb3JpZ2luX2VjEXAMPLESESSIONTOKEN+/=="
	// testIPRole is the instance profile's role name of the tests.
	testIPRole = "ec2-instance-role"
)

func testCreds() creds.Credentials {
	return creds.Credentials{
		AccessKeyID:     testKeyID,
		SecretAccessKey: testSecret,
		SessionToken:    testToken,
		Expires:         t0.Add(time.Hour + 900*time.Millisecond), // 13:00:01.4 → 13:00:01Z
		LastUpdated:     t0.Add(-10*time.Minute + 700*time.Millisecond),
		AccountID:       "222222222222",
		RoleARN:         "arn:aws:sts::222222222222:assumed-role/app/i-0123456789abcdef0",
		Source:          "web-identity",
	}
}

// credsFor returns credentials of role in account, valid at t0 and with a
// key id, secret and session token of their own.
func credsFor(role, account, keyID string) creds.Credentials {
	c := testCreds()
	c.AccessKeyID = keyID
	c.SecretAccessKey = "secret-of-" + role
	c.SessionToken = "token-of-" + role
	c.AccountID = account
	c.RoleARN = "arn:aws:sts::" + account + ":assumed-role/" + role + "/host"
	return c
}

// clock is a settable clock.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func newClock(t time.Time) *clock { return &clock{t: t} }

func (c *clock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *clock) add(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// answer is what fakeSource returns for one key.
type answer struct {
	c   creds.Credentials
	err error
}

// fakeSource is a hand-written access.Source. It answers a role name set
// with setRole with that role's answer, any other key with the default
// answer (set), and records every key asked for.
type fakeSource struct {
	mu     sync.Mutex
	c      creds.Credentials
	err    error
	byRole map[string]answer
	calls  int
	keys   []creds.Key
	roles  []string // the role names of keys
	ctxOK  bool     // the last context passed was live
	// hook, when set, runs first on every Get, without the lock held.
	hook func(ctx context.Context, key creds.Key)
}

var _ access.Source = (*fakeSource)(nil)

func (f *fakeSource) GetWithin(ctx context.Context, key creds.Key, _ time.Duration) (creds.Credentials, error) {
	f.mu.Lock()
	hook := f.hook
	f.mu.Unlock()
	if hook != nil {
		hook(ctx, key)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls++
	f.keys = append(f.keys, key)
	f.roles = append(f.roles, key.Role.Name)
	f.ctxOK = ctx != nil && ctx.Err() == nil
	if a, ok := f.byRole[key.Role.Name]; ok {
		return a.c, a.err
	}
	return f.c, f.err
}

// set sets the default answer.
func (f *fakeSource) set(c creds.Credentials, err error) {
	f.mu.Lock()
	f.c, f.err = c, err
	f.mu.Unlock()
}

// setRole sets the answer for the keys of role name.
func (f *fakeSource) setRole(name string, c creds.Credentials, err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.byRole == nil {
		f.byRole = map[string]answer{}
	}
	f.byRole[name] = answer{c, err}
}

func (f *fakeSource) setHook(h func(ctx context.Context, key creds.Key)) {
	f.mu.Lock()
	f.hook = h
	f.mu.Unlock()
}

// asked returns the role names asked for so far.
func (f *fakeSource) asked() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.roles...)
}

// askedKeys returns the keys asked for so far.
func (f *fakeSource) askedKeys() []creds.Key {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]creds.Key(nil), f.keys...)
}

func (f *fakeSource) callCount() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.calls
}

// fakeID is a hand-written Identifier: every connection is info, or the
// lookup fails with err. It checks that it is handed a connection and a
// live, bounded context.
type fakeID struct {
	mu    sync.Mutex
	info  peer.Info
	err   error
	pid   int
	exe   string
	calls atomic.Int32
	audit atomic.Int32 // of calls, LookupConnForAudit's
	procs atomic.Int32 // Process calls
}

// LookupConnForAudit answers as LookupConn, and counts.
func (f *fakeID) LookupConnForAudit(ctx context.Context, conn net.Conn) (peer.Info, error) {
	f.audit.Add(1)
	return f.LookupConn(ctx, conn)
}

var _ Identifier = (*fakeID)(nil)

func (f *fakeID) LookupConn(ctx context.Context, conn net.Conn) (peer.Info, error) {
	f.calls.Add(1)
	if conn == nil || ctx.Err() != nil {
		return peer.Info{}, errors.New("no connection or done context")
	}
	if _, ok := ctx.Deadline(); !ok {
		return peer.Info{}, errors.New("unbounded context")
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.info, f.err
}

// Process adds the pid and exe of the info set, as the resolver does.
func (f *fakeID) Process(ctx context.Context, info peer.Info) peer.Info {
	f.procs.Add(1)
	f.mu.Lock()
	defer f.mu.Unlock()
	info.PID, info.Exe = f.pid, f.exe
	return info
}

// set makes every later lookup answer info, or fail with err; like the
// resolver, LookupConn leaves the pid and exe to Process.
func (f *fakeID) set(info peer.Info, err error) {
	f.mu.Lock()
	f.pid, f.exe = info.PID, info.Exe
	info.PID, info.Exe = 0, ""
	f.info, f.err = info, err
	f.mu.Unlock()
}

// errTimeout is an identification that ran out of time.
var errTimeout = context.DeadlineExceeded

// classErr is an error carrying a class and a permanence, like the ones of
// exchange and token.
type classErr struct {
	class     string
	permanent bool
	msg       string
}

func (e *classErr) Error() string      { return e.msg }
func (e *classErr) ErrorClass() string { return e.class }
func (e *classErr) Permanent() bool    { return e.permanent }

// viaStub is a Fetcher whose pointer makes a key's source distinct; it is
// never called (the fake source answers).
type viaStub struct{ name string }

func (v *viaStub) Fetch(context.Context, creds.Role) (creds.Credentials, error) {
	return creds.Credentials{}, errors.New("viaStub " + v.name + " must not be called")
}

// testVia is the source of every test key.
var testVia = &viaStub{name: "test"}

// roleKey is the key of the workload-kind role name.
func roleKey(name string) creds.Key {
	return creds.Key{Kind: creds.KindWorkload, Via: testVia, Role: creds.Role{
		Name: name, ARN: "arn:aws:iam::222222222222:role/" + name, SessionName: "host", Duration: time.Hour,
	}}
}

// ipKey is the key of the instance profile's role.
func ipKey() creds.Key {
	return creds.Key{Kind: creds.KindInstanceProfile, Via: testVia, Role: creds.Role{Name: testIPRole}}
}

// noAudit is access.Section.Audit false: with no lists and no workloads, a
// plan then identifies nobody.
func noAudit() access.Section {
	off := false
	return access.Section{Audit: &off}
}

// defaultPlanConfig is the plan of newEnv: every client is served the host
// role testRole, nobody is identified, nothing is audited.
func defaultPlanConfig() access.PlanConfig {
	return access.PlanConfig{Host: roleKey(testRole), Access: noAudit(), Serve: creds.KindWorkload}
}

// workload is one workloads: entry and the key of its role.
type workload struct {
	w access.Workload
	k creds.Key
}

// uidWorkload maps the processes of uid to role.
func uidWorkload(uid int, role string) workload {
	return workload{access.Workload{UID: &uid}, roleKey(role)}
}

// unitWorkload maps the processes of the systemd unit to role.
func unitWorkload(unit, role string) workload {
	return workload{access.Workload{Unit: unit}, roleKey(role)}
}

// withWorkloads returns pc with the workloads (and their keys) appended.
func withWorkloads(pc access.PlanConfig, ws ...workload) access.PlanConfig {
	pc.Workloads = append([]access.Workload(nil), pc.Workloads...)
	pc.WorkloadKeys = append([]creds.Key(nil), pc.WorkloadKeys...)
	for _, w := range ws {
		w.w.Role.Name = w.k.Role.Name
		pc.Workloads = append(pc.Workloads, w.w)
		pc.WorkloadKeys = append(pc.WorkloadKeys, w.k)
	}
	return pc
}

// planDefaults fills the host role (testRole) and the kind served
// (workload) when pc leaves them zero. The access section is left as is:
// its zero value audits (and so identifies).
func planDefaults(pc access.PlanConfig) access.PlanConfig {
	if pc.Host.IsZero() {
		pc.Host = roleKey(testRole)
	}
	if pc.Serve == "" {
		pc.Serve = creds.KindWorkload
	}
	return pc
}

// planOf builds a first plan (generation 1) at t0.
func planOf(t testing.TB, pc access.PlanConfig) *access.Plan {
	t.Helper()
	p, err := access.NewPlan(planDefaults(pc), nil, t0)
	if err != nil {
		t.Fatalf("NewPlan: %v", err)
	}
	return p
}

type testEnv struct {
	s      *Server
	src    *fakeSource
	id     *fakeID
	broker *access.Broker
	clock  *clock
	reg    *prometheus.Registry

	mu   sync.Mutex
	plan *access.Plan // the plan last published
}

// envOpts are newEnvWith's options; zero fields are defaults.
type envOpts struct {
	log   *zap.Logger // the Server's logger (default: none)
	audit *zap.Logger // the broker's audit logger (default: log named "audit")
	noID  bool        // New gets a nil Identifier (default: the env's fakeID)
}

// newEnv builds a Server on a fixed clock with a fake source holding
// testCreds, a fake Identifier (identifying nobody until set) and, when
// cfg.Plan is nil, the default plan (defaultPlanConfig).
func newEnv(t testing.TB, cfg Config) *testEnv {
	t.Helper()
	return newEnvWith(t, cfg, envOpts{})
}

func newEnvLog(t testing.TB, cfg Config, log *zap.Logger) *testEnv {
	t.Helper()
	return newEnvWith(t, cfg, envOpts{log: log})
}

func newEnvWith(t testing.TB, cfg Config, o envOpts) *testEnv {
	t.Helper()
	if cfg.Plan == nil {
		cfg.Plan = planOf(t, defaultPlanConfig())
	}
	log := o.log
	if log == nil {
		log = zap.NewNop()
	}
	audit := o.audit
	if audit == nil {
		audit = log.Named("audit")
	}
	src := &fakeSource{c: testCreds()}
	reg := prometheus.NewRegistry()
	broker, err := access.NewBroker(src, log.Named("access"), audit, reg)
	if err != nil {
		t.Fatalf("NewBroker: %v", err)
	}
	fid := &fakeID{err: peer.ErrNotFound}
	var id Identifier = fid
	if o.noID {
		id = nil
	}
	s, err := New(cfg, broker, id, log, reg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	c := newClock(t0)
	s.now = c.now
	s.outstanding = newOutstandingTokens(c.now())
	t.Cleanup(func() {
		if pt := s.state.Load().pt; pt != nil {
			pt.close()
		}
	})
	return &testEnv{s: s, src: src, id: fid, broker: broker, clock: c, reg: reg, plan: cfg.Plan}
}

// publish builds the plan of pc replacing the last one published (so
// generations chain and the replaced plans are retained for access.Grace
// from the test clock's now) and makes it the Server's with cfg.
func (e *testEnv) publish(t testing.TB, cfg Config, pc access.PlanConfig) *access.Plan {
	t.Helper()
	e.mu.Lock()
	defer e.mu.Unlock()
	p, err := access.NewPlan(planDefaults(pc), e.plan, e.clock.now())
	if err != nil {
		t.Fatalf("NewPlan: %v", err)
	}
	cfg.Plan = p
	if err := e.s.Update(cfg); err != nil {
		t.Fatalf("Update: %v", err)
	}
	e.plan = p
	return p
}

// do sends one request through the handler (no connection: the client is
// never identified).
func (e *testEnv) do(method, target string, hdr map[string]string) *httptest.ResponseRecorder {
	r := httptest.NewRequest(method, target, nil)
	for k, v := range hdr {
		r.Header.Set(k, v)
	}
	w := httptest.NewRecorder()
	e.s.Handler().ServeHTTP(w, r)
	return w
}

// doWire is do through a real net/http server (e.s.Handler on loopback,
// one connection per request): what a client receives, with the headers
// net/http adds (Content-Length below autoLengthBelow).
func (e *testEnv) doWire(t testing.TB, method, target string, hdr map[string]string) *httptest.ResponseRecorder {
	t.Helper()
	srv := httptest.NewServer(e.s.Handler())
	defer srv.Close()
	r, err := http.NewRequest(method, srv.URL+target, nil)
	if err != nil {
		t.Fatal(err)
	}
	r.Close = true
	for k, v := range hdr {
		r.Header.Set(k, v)
	}
	resp, err := srv.Client().Do(r)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	w := httptest.NewRecorder()
	maps.Copy(w.Header(), resp.Header)
	w.WriteHeader(resp.StatusCode)
	if _, err := io.Copy(w, resp.Body); err != nil {
		t.Fatal(err)
	}
	return w
}

// token mints a valid session token through the API.
func (e *testEnv) token(t testing.TB, ttl string) string {
	t.Helper()
	w := e.do(http.MethodPut, "/latest/api/token", map[string]string{headerTokenTTL: ttl})
	if w.Code != http.StatusOK {
		t.Fatalf("token PUT: %d %q", w.Code, w.Body.String())
	}
	return w.Body.String()
}

// serveEnv runs e.s.Serve on a loopback listener and returns its base URL
// and a keep-alive client (one connection at a time).
func serveEnv(t *testing.T, e *testEnv) (string, *http.Client) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan struct{})
	go func() { _ = e.s.Serve(ctx, ln); close(done) }()
	tr := &http.Transport{MaxIdleConnsPerHost: 1}
	t.Cleanup(func() { tr.CloseIdleConnections(); cancel(); <-done })
	return "http://" + ln.Addr().String(), &http.Client{Transport: tr}
}

// reply is one response read whole.
type reply struct {
	code int
	body string
	hdr  http.Header
}

// fetch sends method url with the session token tok ("" for none) through
// c and reads the response.
func fetch(t *testing.T, c *http.Client, method, url, tok string) reply {
	t.Helper()
	req, err := http.NewRequest(method, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	if method == http.MethodPut {
		req.Header.Set(headerTokenTTL, "21600")
	}
	if tok != "" {
		req.Header.Set(headerToken, tok)
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return reply{resp.StatusCode, string(b), resp.Header}
}

// rawConn is one client connection of its own to a Server run by
// serveEnv, for tests that must know which connection a request travels on
// and exactly which header lines it carries.
type rawConn struct {
	conn net.Conn
	br   *bufio.Reader
}

// dialRaw opens a connection to base (serveEnv's URL); it is closed when
// the test ends.
func dialRaw(t *testing.T, base string) *rawConn {
	t.Helper()
	conn, err := net.DialTimeout("tcp", strings.TrimPrefix(base, "http://"), 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return &rawConn{conn: conn, br: bufio.NewReader(conn)}
}

// do sends one HTTP/1.1 request on c, with Host 169.254.169.254 and then
// the header lines given ("Name: value", in order, nothing else), and reads
// the response whole.
func (c *rawConn) do(t *testing.T, method, path string, lines ...string) reply {
	t.Helper()
	req := method + " " + path + " HTTP/1.1\r\nHost: 169.254.169.254\r\n"
	for _, l := range lines {
		req += l + "\r\n"
	}
	// Generous: the machine may be loaded; a hang must still end.
	_ = c.conn.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := io.WriteString(c.conn, req+"\r\n"); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(c.br, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return reply{resp.StatusCode, string(b), resp.Header}
}

func get(t *testing.T, c *http.Client, url string) (int, string) {
	t.Helper()
	r := fetch(t, c, http.MethodGet, url, "")
	return r.code, r.body
}

// metricValue sums the samples of the counter or gauge name in reg whose
// labels include labels.
func metricValue(t testing.TB, reg prometheus.Gatherer, name string, labels map[string]string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var sum float64
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	metrics:
		for _, m := range mf.GetMetric() {
			have := map[string]string{}
			for _, l := range m.GetLabel() {
				have[l.GetName()] = l.GetValue()
			}
			for k, v := range labels {
				if have[k] != v {
					continue metrics
				}
			}
			switch {
			case m.GetCounter() != nil:
				sum += m.GetCounter().GetValue()
			case m.GetGauge() != nil:
				sum += m.GetGauge().GetValue()
			}
		}
	}
	return sum
}

// golden compares got with testdata/name, rewriting it under -update.
func golden(t *testing.T, name string, got []byte) {
	t.Helper()
	path := filepath.Join("testdata", name)
	if *update {
		if err := os.WriteFile(path, got, 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run go test -update to create it)", err)
	}
	if string(got) != string(want) {
		t.Errorf("%s mismatch\n--- got ---\n%s\n--- want ---\n%s", name, got, want)
	}
}
