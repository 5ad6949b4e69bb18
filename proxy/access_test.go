package proxy

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"testing"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/imdsproxy/imdsproxy/access"
	"github.com/imdsproxy/imdsproxy/peer"
)

// testPeer is the identified client of the access tests.
var testPeer = peer.Info{UID: 1234, PID: 42, Exe: "/usr/bin/app", Unit: "app.service", Cgroup: "/system.slice/app.service"}

// allowUIDs is an access: section admitting only uids (audit on).
func allowUIDs(uids ...int) access.PlanConfig {
	return access.PlanConfig{Access: access.Section{AllowUIDs: uids}}
}

func TestAccessDenied(t *testing.T) {
	upstream := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodPut {
			http.Error(w, "v1 only", http.StatusNotFound)
			return
		}
		_, _ = io.WriteString(w, "i-0123456789abcdef0")
	}))
	defer upstream.Close()
	u, _ := url.Parse(upstream.URL)
	core, logs := observer.New(zapcore.DebugLevel)
	e := newEnvLog(t, Config{Upstream: u, Plan: planOf(t, allowUIDs(9999))}, zap.New(core))
	e.id.set(testPeer, nil)
	base, client := serveEnv(t, e)

	for _, tc := range []struct {
		path string
		want int
	}{
		{"/latest/meta-data/iam/security-credentials/", 403},
		{"/latest/meta-data/iam/security-credentials/" + testRole, 403},
		{"/latest/meta-data/iam/security-credentials-extended/" + testRole, 403},
		{"/latest/meta-data/iam/info", 403},
		{"/latest/meta-data/instance-id", 200},
		{"/latest/meta-data/iam/", 200}, // the listing names no role
		{"/latest/meta-data/iam/security-credentials/other", 403},
	} {
		code, body := get(t, client, base+tc.path)
		if code != tc.want {
			t.Errorf("GET %s = %d %q, want %d", tc.path, code, body, tc.want)
		}
		if code == 403 && body != accessDeniedBody {
			t.Errorf("GET %s: body %q", tc.path, body)
		}
		if strings.Contains(body, testSecret) || strings.Contains(body, testKeyID) {
			t.Errorf("GET %s leaked credentials: %q", tc.path, body)
		}
	}
	if got := metricValue(t, e.reg, "imdsproxy_access_refused_total", map[string]string{"outcome": "deny", "reason": "not_allowed"}); got != 5 {
		t.Errorf("imdsproxy_access_refused_total{deny,not_allowed} = %v, want 5", got)
	}
	if n := e.id.calls.Load(); n != 1 {
		t.Errorf("Identifier called %d times on one keep-alive connection, want 1", n)
	}
	if n := logs.FilterMessage("credentials served").Len(); n != 0 {
		t.Errorf("%d audit lines for refused requests", n)
	}
	if n := e.src.callCount(); n != 0 {
		t.Errorf("credential source called %d times for refused requests", n)
	}

	// A new plan applies to the open connection at once.
	e.publish(t, Config{Upstream: u}, allowUIDs(testPeer.UID))
	if code, body := get(t, client, base+"/latest/meta-data/iam/security-credentials/"+testRole); code != 200 || !strings.Contains(body, testKeyID) {
		t.Errorf("after allowing: %d %q", code, body)
	}
	if n := e.id.calls.Load(); n != 1 {
		t.Errorf("Identifier called %d times, want 1", n)
	}
}

func TestAccessAllowedAudit(t *testing.T) {
	core, logs := observer.New(zapcore.InfoLevel)
	e := newEnvLog(t, Config{Plan: planOf(t, allowUIDs(testPeer.UID))}, zap.New(core))
	e.id.set(testPeer, nil)
	base, client := serveEnv(t, e)

	for _, p := range []string{"security-credentials/", "security-credentials-extended/"} {
		code, body := get(t, client, base+"/latest/meta-data/iam/"+p+testRole)
		if code != 200 || !strings.Contains(body, testSecret) {
			t.Fatalf("GET %s: %d %q", p, code, body)
		}
	}
	// The listing hands out nothing: no audit line.
	if code, body := get(t, client, base+"/latest/meta-data/iam/security-credentials/"); code != 200 || body != testRole {
		t.Fatalf("listing: %d %q", code, body)
	}
	// The first hand-out of the key id to this client is a line at once;
	// the second (the extended document) a repeat, counted until the
	// broker reports it (access/audit.go).
	audit := logs.FilterMessage("credentials served").All()
	if len(audit) != 1 {
		t.Fatalf("%d audit lines, want 1 (the first hand-out): %v", len(audit), logs.All())
	}
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	_ = e.broker.Run(ctx) // shutdown: the repeats are reported
	if again := logs.FilterMessage("credentials served again").All(); len(again) != 1 || again[0].ContextMap()["count"] != int64(1) {
		t.Fatalf("repeats reported as %v, want one line with count 1", again)
	}
	for i, route := range []string{routeCredentials} {
		l := audit[i]
		if l.LoggerName != "audit" || l.Level != zapcore.InfoLevel {
			t.Errorf("audit line from %q at %v", l.LoggerName, l.Level)
		}
		got := l.ContextMap()
		want := map[string]any{
			"identified": true, "uid": int64(1234), "pid": int64(42), "exe": "/usr/bin/app", "unit": "app.service",
			"cgroup": "/system.slice/app.service", "role_name": testRole, "role": testCreds().RoleARN,
			"access_key_id": testKeyID, "kind": "cache", "door": doorIMDS, "route": route,
		}
		for k, v := range want {
			if got[k] != v {
				t.Errorf("audit %s = %v, want %v", k, got[k], v)
			}
		}
		for _, k := range []string{"requested_role_name", "fallback"} {
			if _, ok := got[k]; ok {
				t.Errorf("audit has %s = %v for a plain hand-out", k, got[k])
			}
		}
		for k, v := range got {
			if s, _ := v.(string); strings.Contains(s, testSecret) || strings.Contains(s, testToken) {
				t.Errorf("audit field %s holds a secret", k)
			}
		}
	}
	if n := e.id.calls.Load(); n != 1 {
		t.Errorf("Identifier called %d times, want 1", n)
	}
}

// TestAccessKind checks that credentials stored during the request are
// audited as a fetch.
func TestAccessKind(t *testing.T) {
	core, logs := observer.New(zapcore.InfoLevel)
	e := newEnvLog(t, Config{Plan: planOf(t, allowUIDs(testPeer.UID))}, zap.New(core))
	e.id.set(testPeer, nil)
	c := testCreds()
	c.LastUpdated = t0.AddDate(10, 0, 0) // "after" the request started
	e.src.set(c, nil)
	base, client := serveEnv(t, e)
	if code, body := get(t, client, base+"/latest/meta-data/iam/security-credentials/"+testRole); code != 200 {
		t.Fatalf("%d %q", code, body)
	}
	if got := logs.FilterMessage("credentials served").All(); len(got) != 1 || got[0].ContextMap()["kind"] != "fetch" {
		t.Errorf("audit lines %v, want one with kind fetch", got)
	}
}

// TestAccessUnknownPeer: with access lists, a client that is not a process
// of this host (no connection, peer.ErrNotFound, no Identifier) is denied;
// one that could not be identified is told to retry, never denied or
// served.
func TestAccessUnknownPeer(t *testing.T) {
	path := "/latest/meta-data/iam/security-credentials/" + testRole
	t.Run("no connection", func(t *testing.T) {
		e := newEnv(t, Config{Plan: planOf(t, allowUIDs(testPeer.UID))})
		e.id.set(testPeer, nil)
		if w := e.do(http.MethodGet, path, nil); w.Code != 403 || w.Body.String() != accessDeniedBody {
			t.Errorf("got %d %q, want 403", w.Code, w.Body.String())
		}
		if n := e.id.calls.Load(); n != 0 {
			t.Errorf("Identifier called %d times without a connection", n)
		}
		if got := metricValue(t, e.reg, "imdsproxy_access_refused_total", map[string]string{"outcome": "deny", "reason": "not_local"}); got != 1 {
			t.Errorf("refused{deny,not_local} = %v, want 1", got)
		}
	})
	t.Run("not found", func(t *testing.T) {
		e := newEnv(t, Config{Plan: planOf(t, allowUIDs(testPeer.UID))})
		e.id.set(peer.Info{}, peer.ErrNotFound)
		base, client := serveEnv(t, e)
		if code, body := get(t, client, base+path); code != 403 || body != accessDeniedBody {
			t.Errorf("got %d %q, want 403", code, body)
		}
	})
	t.Run("identify fails", func(t *testing.T) {
		e := newEnv(t, Config{Plan: planOf(t, allowUIDs(testPeer.UID))})
		e.id.set(testPeer, errors.New("gone"))
		base, client := serveEnv(t, e)
		r := fetch(t, client, http.MethodGet, base+path, "")
		if r.code != http.StatusServiceUnavailable || r.hdr.Get("Retry-After") != "1" || r.body != retryBody {
			t.Errorf("got %d %q (Retry-After %q), want 503 with Retry-After: 1", r.code, r.body, r.hdr.Get("Retry-After"))
		}
		if got := metricValue(t, e.reg, "imdsproxy_access_refused_total", map[string]string{"outcome": "deny", "reason": "not_allowed"}); got != 0 {
			t.Errorf("a retry counted as denied: %v", got)
		}
		if n := e.src.callCount(); n != 0 {
			t.Errorf("credential source called %d times", n)
		}
	})
	t.Run("no identifier", func(t *testing.T) {
		e := newEnvWith(t, Config{Plan: planOf(t, allowUIDs(testPeer.UID))}, envOpts{noID: true})
		base, client := serveEnv(t, e)
		if code, _ := get(t, client, base+path); code != 403 {
			t.Errorf("got %d, want 403", code)
		}
	})
	t.Run("no access control", func(t *testing.T) {
		core, logs := observer.New(zapcore.InfoLevel)
		e := newEnvLog(t, Config{}, zap.New(core))
		e.id.set(testPeer, nil)
		base, client := serveEnv(t, e)
		if code, _ := get(t, client, base+path); code != 200 {
			t.Errorf("got %d, want 200", code)
		}
		if n := logs.FilterMessage("credentials served").Len(); n != 0 {
			t.Errorf("%d audit lines with audit off", n)
		}
		if n := e.id.calls.Load(); n != 0 {
			t.Errorf("Identifier called %d times for a plan that identifies nobody", n)
		}
	})
}

// TestAccessUnitUnknownNotRemembered: a client whose unit could not be told
// in time, or that could not be identified at all, is not kept for the
// connection; its next request identifies the process again, while a
// complete answer is kept.
func TestAccessUnitUnknownNotRemembered(t *testing.T) {
	path := "/latest/meta-data/iam/security-credentials/" + testRole
	partial := testPeer
	partial.Unit, partial.UnitUnknown = "", true
	for _, tc := range []struct {
		name string
		who  peer.Info
		err  error
		code int
		want int32 // Identifier calls for three requests on one connection
	}{
		{"unit unknown", partial, nil, 200, 3},
		{"unresolved", peer.Info{}, errTimeout, 503, 3},
		{"complete", testPeer, nil, 200, 1},
		{"not local", peer.Info{}, peer.ErrNotFound, 403, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, Config{Plan: planOf(t, allowUIDs(testPeer.UID))})
			e.id.set(tc.who, tc.err)
			base, client := serveEnv(t, e)
			for range 3 {
				if code, _ := get(t, client, base+path); code != tc.code {
					t.Fatalf("got %d, want %d", code, tc.code)
				}
			}
			if n := e.id.calls.Load(); n != tc.want {
				t.Errorf("Identifier called %d times for 3 requests on one connection, want %d", n, tc.want)
			}
		})
	}
}

// TestAuditGoesToTheBrokersLogger: the audit line is written to the audit
// logger given to the broker, never to the Server's own logger.
func TestAuditGoesToTheBrokersLogger(t *testing.T) {
	srvCore, srvLogs := observer.New(zapcore.DebugLevel)
	auditCore, auditLogs := observer.New(zapcore.InfoLevel)
	e := newEnvWith(t, Config{Plan: planOf(t, allowUIDs(testPeer.UID))},
		envOpts{log: zap.New(srvCore), audit: zap.New(auditCore).Named("custom")})
	e.id.set(testPeer, nil)
	base, client := serveEnv(t, e)
	if code, _ := get(t, client, base+"/latest/meta-data/iam/security-credentials/"+testRole); code != 200 {
		t.Fatalf("got %d", code)
	}
	if got := auditLogs.All(); len(got) != 1 || got[0].LoggerName != "custom" {
		t.Errorf("audit lines %v", got)
	}
	if n := srvLogs.FilterMessage("credentials served").Len(); n != 0 {
		t.Errorf("%d audit lines on the Server's logger", n)
	}
}

// syncBuffer is a bytes.Buffer safe for concurrent writes.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// TestAuditLineJSON: a hand-out to an identified client writes one JSON
// line naming the client (uid, unit), the role, the access key id, the
// door and the route, and never the secret or the session token; a
// workload's hand-out names the workload's role.
func TestAuditLineJSON(t *testing.T) {
	var buf syncBuffer
	enc := zapcore.NewJSONEncoder(zap.NewProductionEncoderConfig())
	auditLog := zap.New(zapcore.NewCore(enc, zapcore.AddSync(&buf), zapcore.InfoLevel)).Named("audit")
	pc := withWorkloads(access.PlanConfig{}, uidWorkload(1001, "billing")) // audit unset: on
	e := newEnvWith(t, Config{Plan: planOf(t, pc)}, envOpts{audit: auditLog})
	e.src.setRole("billing", credsFor("billing", "111122223333", "ASIABILLING000000000"), nil)
	e.id.set(peer.Info{UID: 1001, PID: 7, Exe: "/usr/bin/billing", Unit: "billing.service"}, nil)
	base, client := serveEnv(t, e)

	if code, body := get(t, client, base+"/latest/meta-data/iam/security-credentials-extended/billing"); code != 200 {
		t.Fatalf("got %d %q", code, body)
	}
	out := buf.String()
	lines := strings.Split(strings.TrimSuffix(out, "\n"), "\n")
	if len(lines) != 1 || !strings.HasSuffix(out, "\n") {
		t.Fatalf("want one JSON line, got %q", out)
	}
	var line map[string]any
	if err := json.Unmarshal([]byte(lines[0]), &line); err != nil {
		t.Fatalf("not JSON: %v: %s", err, lines[0])
	}
	for k, v := range map[string]any{
		"msg": "credentials served", "logger": "audit", "level": "info",
		"identified": true, "uid": float64(1001), "pid": float64(7), "unit": "billing.service", "exe": "/usr/bin/billing",
		"role_name": "billing", "access_key_id": "ASIABILLING000000000",
		"role": "arn:aws:sts::111122223333:assumed-role/billing/host",
		"door": "imds", "route": routeCredentialsExtended, "kind": "cache",
	} {
		if line[k] != v {
			t.Errorf("audit %s = %v (%T), want %v", k, line[k], line[k], v)
		}
	}
	for _, secret := range []string{"secret-of-billing", "token-of-billing", testSecret, testToken} {
		if strings.Contains(out, secret) {
			t.Errorf("audit line holds a secret %q: %s", secret, out)
		}
	}
}

// TestProcessOnlyForTheAudit: the pid and exe (Identifier.Process, the
// costly part of identification) are looked up only when hand-outs are
// audited; the decision is the same either way, taken on what LookupConn
// gave.
func TestProcessOnlyForTheAudit(t *testing.T) {
	for _, audit := range []bool{false, true} {
		pc := withWorkloads(access.PlanConfig{Access: access.Section{Audit: &audit}}, uidWorkload(1001, "billing"))
		e := newEnvWith(t, Config{Plan: planOf(t, pc)}, envOpts{})
		e.src.setRole("billing", credsFor("billing", "111122223333", "ASIABILLING000000000"), nil)
		e.id.set(peer.Info{UID: 1001, PID: 7, Exe: "/usr/bin/billing"}, nil)
		base, client := serveEnv(t, e)
		if code, body := get(t, client, base+"/latest/meta-data/iam/security-credentials/billing"); code != 200 || !strings.Contains(body, "ASIABILLING000000000") {
			t.Fatalf("audit %v: got %d %q, want billing's credentials", audit, code, body)
		}
		want := int32(0)
		if audit {
			want = 1
		}
		if n := e.id.procs.Load(); n != want {
			t.Errorf("audit %v: %d Process calls, want %d", audit, n, want)
		}
	}
}

// TestLoggerNotRenamed: New logs with the logger it is given, as given
// ("proxy", not "proxy.proxy"); the pass-through's is a child of it.
func TestLoggerNotRenamed(t *testing.T) {
	core, logs := observer.New(zapcore.DebugLevel)
	e := newEnvLog(t, Config{}, zap.New(core).Named("proxy"))
	e.do(http.MethodGet, "/latest/meta-data/iam/security-credentials/", nil)
	reqs := logs.FilterMessage("request").All()
	if len(reqs) != 1 {
		t.Fatalf("%d request lines, want 1: %v", len(reqs), logs.All())
	}
	if reqs[0].LoggerName != "proxy" {
		t.Errorf("request line from logger %q, want %q", reqs[0].LoggerName, "proxy")
	}
	if err := e.s.Update(Config{Plan: e.plan}); err != nil {
		t.Fatal(err)
	}
	if got := logs.FilterMessage("configuration updated").All(); len(got) != 1 || got[0].LoggerName != "proxy" {
		t.Errorf("update lines %v, want one from %q", got, "proxy")
	}
}

// TestAuditIdentifiesOnlyHandouts: with the audit on and nothing that
// decides by client (the default config), the role listing and iam/info,
// which hand nothing out, identify no one (an SDK's cold flow sends each on
// a connection of its own); the credential document, audited, does. Where
// decisions depend on the client (access lists, workloads) every credential
// route identifies it, with the checked lookup; the audit alone uses the
// lookup that skips the checks only decisions need.
func TestAuditIdentifiesOnlyHandouts(t *testing.T) {
	for _, tc := range []struct {
		name      string
		pc        access.PlanConfig
		want      int32 // Identifier calls for the three routes, a connection each
		wantAudit int32 // of them, for the audit alone (LookupConnForAudit)
	}{
		{"default", access.PlanConfig{}, 1, 1},
		{"access lists", allowUIDs(testPeer.UID), 3, 0},
		{"workloads", withWorkloads(access.PlanConfig{}, uidWorkload(testPeer.UID+1, "other")), 3, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, Config{Plan: planOf(t, tc.pc)})
			e.id.set(testPeer, nil)
			base, _ := serveEnv(t, e)
			client := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
			for _, path := range []string{
				"/latest/meta-data/iam/security-credentials/",
				"/latest/meta-data/iam/info",
				"/latest/meta-data/iam/security-credentials/" + testRole,
			} {
				if code, _ := get(t, client, base+path); code != http.StatusOK {
					t.Fatalf("%s: %d", path, code)
				}
			}
			if n := e.id.calls.Load(); n != tc.want {
				t.Errorf("Identifier called %d times for listing, iam/info and credentials, want %d", n, tc.want)
			}
			if n := e.id.audit.Load(); n != tc.wantAudit {
				t.Errorf("%d of the lookups for the audit alone, want %d (a decision by client needs the checked lookup)", n, tc.wantAudit)
			}
		})
	}
}

// TestUserAgentNeitherAuthorizesNorRoutes: the daemon does not authorize or
// route on User-Agent (WIRE.md §3.2, "User agents": the JS SDK sends none,
// the others send their own, and any local process can send any value).
// The same client process gets the same answers with no User-Agent, an
// SDK's and odd ones, each on a connection of its own (the client is
// identified once per connection): a workload its own role, a refused
// client 403.
func TestUserAgentNeitherAuthorizesNorRoutes(t *testing.T) {
	uas := []struct {
		name string
		line string // the User-Agent header line; "" sends none
	}{
		{"none (JS SDK)", ""},
		{"Go SDK", "User-Agent: aws-sdk-go-v2/1.48.0 ua/2.1 os/linux lang/go#1.26 md/GOOS#linux md/GOARCH#amd64 api/imds#1.20.8 ft/ec2-imds"},
		{"botocore", "User-Agent: Botocore/1.29.27 Python/3.11.2 Linux/6.1.0-18-amd64"},
		{"AWS CLI", "User-Agent: aws-cli/2.9.19 Python/3.11.2 Linux/6.1.0-18-amd64 source/x86_64.debian.12 prompt/off"},
		{"Java SDK", "User-Agent: aws-sdk-java/2.25.0 Linux/6.1.0 OpenJDK_64-Bit_Server_VM/17.0.10 Java/17.0.10 vendor/Debian"},
		{"JS SDK named", "User-Agent: aws-sdk-js/3.1173.0 ua/2.1 os/linux lang/js md/nodejs#20.11.0"},
		{"empty", "User-Agent:"},
		{"curl", "User-Agent: curl/8.5.0"},
		{"imdsproxy", "User-Agent: imdsproxy"},
		{"shellshock", "User-Agent: () { :; }; /bin/sh -c id"},
		{"long", "User-Agent: " + strings.Repeat("Mozilla/5.0 ", 300)},
		{"twice", "User-Agent: aws-sdk-go-v2/1.48.0\r\nUser-Agent: curl/8.5.0"},
	}
	// answers sends the credential requests of an SDK on a new connection
	// with ua: the token PUT, both listings, both documents of role and
	// iam/info.
	answers := func(t *testing.T, base, ua, role string) []reply {
		t.Helper()
		c := dialRaw(t, base)
		with := func(lines ...string) []string {
			if ua != "" {
				lines = append(lines, ua)
			}
			return lines
		}
		put := c.do(t, http.MethodPut, "/latest/api/token", with("X-aws-ec2-metadata-token-ttl-seconds: 21600")...)
		if put.code != http.StatusOK {
			t.Fatalf("token PUT: %d %q", put.code, put.body)
		}
		tok := "X-aws-ec2-metadata-token: " + put.body
		var out []reply
		for _, p := range []string{"security-credentials/", "security-credentials-extended/",
			"security-credentials/" + role, "security-credentials-extended/" + role, "info"} {
			out = append(out, c.do(t, http.MethodGet, "/latest/meta-data/iam/"+p, with(tok)...))
		}
		return out
	}
	same := func(t *testing.T, got, want []reply) {
		t.Helper()
		for i := range want {
			if got[i].code != want[i].code || got[i].body != want[i].body {
				t.Errorf("request %d: %d %q, without a User-Agent %d %q", i, got[i].code, got[i].body, want[i].code, want[i].body)
			}
		}
	}

	t.Run("workload", func(t *testing.T) {
		e := newEnv(t, Config{Plan: planOf(t, twoWorkloads()), InstanceProfileARN: hostProfile})
		setRoleCreds(e)
		e.id.set(peer.Info{UID: 1001}, nil) // billing's
		base, _ := serveEnv(t, e)
		want := answers(t, base, uas[0].line, "billing")
		for i, r := range want {
			if r.code != http.StatusOK {
				t.Fatalf("request %d without a User-Agent: %d %q", i, r.code, r.body)
			}
		}
		if want[0].body != "billing" || !strings.Contains(want[2].body, billingCreds.AccessKeyID) {
			t.Fatalf("without a User-Agent: listed %q, served %q; want billing's", want[0].body, want[2].body)
		}
		for _, ua := range uas[1:] {
			t.Run(ua.name, func(t *testing.T) { same(t, answers(t, base, ua.line, "billing"), want) })
		}
		for _, k := range e.src.askedKeys() {
			if k != roleKey("billing") {
				t.Errorf("the source was asked for %+v, want only billing's key", k)
			}
		}
	})

	t.Run("refused", func(t *testing.T) {
		e := newEnv(t, Config{Plan: planOf(t, allowUIDs(9999))})
		e.id.set(testPeer, nil)
		base, _ := serveEnv(t, e)
		for _, ua := range uas {
			t.Run(ua.name, func(t *testing.T) {
				got := answers(t, base, ua.line, testRole)
				for i, r := range got {
					if r.code != http.StatusForbidden || r.body != accessDeniedBody {
						t.Errorf("request %d: %d %q, want 403 %q", i, r.code, r.body, accessDeniedBody)
					}
				}
			})
		}
		if n := e.src.callCount(); n != 0 {
			t.Errorf("credential source called %d times for a refused client", n)
		}
	})
}
