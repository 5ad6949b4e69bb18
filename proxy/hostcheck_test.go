package proxy

import (
	"bufio"
	"context"
	"io"
	"net"
	"net/http"
	"net/url"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/imdsproxy/imdsproxy/connlimit/connlimittest"
)

func TestHostAllowed(t *testing.T) {
	local := &net.TCPAddr{IP: net.ParseIP("10.1.2.3"), Port: 8169}
	for _, tc := range []struct {
		host string
		want bool
	}{
		{"", true},
		{"169.254.169.254", true},
		{"169.254.169.254:80", true},
		{"169.254.169.254:", true},
		{"[fd00:ec2::254]", true},
		{"[FD00:EC2::254]:80", true},
		{"localhost", true},
		{"LOCALHOST:8169", true},
		{"127.0.0.1:8169", true},
		{"[::1]:8169", true},
		{"10.1.2.3:8169", true}, // the listener's own address
		{"10.1.2.3", true},
		{"imds.internal", true}, // Config.AllowedHosts
		{"imds.internal:80", true},
		{"[::ffff:169.254.169.254]", true}, // other spellings of listed addresses
		{"[fd00:ec2:0::254]:80", true},
		{"[::ffff:10.1.2.3]", true},

		{"evil.example", false}, // DNS rebinding: the attacker's name
		{"evil.example:80", false},
		{"169.254.169.254.nip.io", false},
		{"localhost.evil.example", false},
		{"user@169.254.169.254", false},
		{"169.254.169.254@evil.example", false},
		{"169.254.169.254:80@evil.example", false},
		{"169.254.169.254:http", false},
		{"169.254.169.254:123456", false},
		{"::1", false}, // IPv6 must be bracketed
		{"fd00:ec2::254", false},
		{"[::1", false},
		{"[fe80::1%25eth0]", false},
		{"ｌocalhost", false},
		{"localhost\u200b", false},
		{"10.1.2.4", false},
		{"0x7f.0.0.1", false},
		{"2130706433", false},
	} {
		if got := hostAllowed(tc.host, local, []string{"imds.internal"}); got != tc.want {
			t.Errorf("hostAllowed(%q) = %v, want %v", tc.host, got, tc.want)
		}
	}
}

// TestHostAllowedNoAlloc: the Host every SDK sends, with or without a
// port, is checked on every request without allocating.
func TestHostAllowedNoAlloc(t *testing.T) {
	local := &net.TCPAddr{IP: net.ParseIP("127.0.0.1"), Port: 8169}
	for _, host := range []string{"169.254.169.254", "169.254.169.254:80", "127.0.0.1:8169", "[fd00:ec2::254]"} {
		if n := testing.AllocsPerRun(100, func() { hostAllowed(host, local, nil) }); n != 0 {
			t.Errorf("hostAllowed(%q): %v allocations, want 0", host, n)
		}
	}
}

func TestNormalizeHosts(t *testing.T) {
	got, err := normalizeHosts([]string{"IMDS.internal", "10.0.0.1", "FD00:0::1", "IMDS-1.example", "a", "::ffff:10.0.0.1"})
	if err != nil || strings.Join(got, ",") != "imds.internal,10.0.0.1,fd00::1,imds-1.example,a,10.0.0.1" {
		t.Errorf("normalizeHosts = %q, %v (IP addresses in canonical form)", got, err)
	}
	// A non-canonical allowed address matches its canonical Host, and back.
	if !hostAllowed("[fd00::1]", nil, got) || !hostAllowed("[fd00:0:0::1]:80", nil, got) {
		t.Error("an allowed IPv6 address written two ways does not match")
	}
	if got, err := normalizeHosts(nil); err != nil || len(got) != 0 {
		t.Errorf("normalizeHosts(nil) = %q, %v", got, err)
	}
	label63 := strings.Repeat("a", 63)
	long := strings.Repeat(label63+".", 4)[:254] // 254 characters of valid labels
	for _, ok := range []string{label63 + ".example", strings.TrimSuffix(long[:253], ".")} {
		if _, err := normalizeHosts([]string{ok}); err != nil {
			t.Errorf("normalizeHosts(%q): %v", ok, err)
		}
	}
	for _, bad := range []string{"", "a:80", "imds.internal:80", "[::1]", "user@h", "user@host", "a b", "a/b", "-bad.example",
		"bad-.example", "a..b", ".a", "a.", "a_b", "fe80::1%eth0", "ｌocalhost", "imds\x00", "a\r\nb", "*.example",
		label63 + "a.example", long, "10.0.0.1/8", "http://imds"} {
		if _, err := normalizeHosts([]string{bad}); err == nil {
			t.Errorf("normalizeHosts(%q) accepted", bad)
		}
	}
	if _, err := New(Config{Plan: planOf(t, defaultPlanConfig()), AllowedHosts: []string{"a:1"}}, newTestBroker(t, nil), nil, nil, nil); err == nil {
		t.Error("New accepted an allowed host with a port")
	}
}

// rawServer serves e on a real loopback listener through Serve, with
// credentials valid in real time, and returns its address.
func rawServer(t *testing.T, cfg Config) (*testEnv, string) {
	t.Helper()
	e, addr, _, _ := servingEnv(t, cfg)
	return e, addr
}

// servingEnv is rawServer with the shutdown in the caller's hands: cancel
// begins it and done receives Serve's result. A cleanup cancels and waits
// for Serve to return.
func servingEnv(t *testing.T, cfg Config) (e *testEnv, addr string, cancel context.CancelFunc, done <-chan error) {
	t.Helper()
	e = newEnv(t, cfg)
	e.s.now = time.Now
	c := testCreds()
	c.LastUpdated, c.Expires = time.Now(), time.Now().Add(time.Hour)
	e.src.set(c, nil)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	result, returned := make(chan error, 1), make(chan struct{})
	go func() { result <- e.s.Serve(ctx, ln); close(returned) }()
	t.Cleanup(func() { cancel(); <-returned })
	return e, ln.Addr().String(), cancel, result
}

// exchange writes raw to a new connection, half-closes it and returns every
// response read until the server closes the connection.
func exchange(t *testing.T, addr, raw string) []*http.Response {
	t.Helper()
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(conn, raw); err != nil {
		t.Fatal(err)
	}
	_ = conn.(*net.TCPConn).CloseWrite()
	br := bufio.NewReader(conn)
	var out []*http.Response
	for {
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			return out
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		resp.Body = io.NopCloser(strings.NewReader(string(body)))
		resp.Header.Set("X-Test-Body", string(body))
		out = append(out, resp)
	}
}

const credPath = "/latest/meta-data/iam/security-credentials/app"

// TestHostCheckOverTheWire: SDK-style Host headers are served; a foreign
// Host (DNS rebinding) is refused with 403 on every route, before the token
// or credential handler runs.
func TestHostCheckOverTheWire(t *testing.T) {
	e, addr := rawServer(t, Config{Upstream: &url.URL{Scheme: "http", Host: "127.0.0.1:1"}})
	_, port, _ := net.SplitHostPort(addr)
	get := func(host string) string {
		return "GET " + credPath + " HTTP/1.1\r\nHost: " + host + "\r\nConnection: close\r\n\r\n"
	}
	for _, tc := range []struct {
		name, raw string
		want      int
	}{
		{"imds", get("169.254.169.254"), 200},
		{"imds port 80", get("169.254.169.254:80"), 200},
		{"loopback endpoint", get("127.0.0.1:" + port), 200},
		{"localhost endpoint", get("localhost:" + port), 200},
		{"imds ipv6", get("[fd00:ec2::254]"), 200},
		{"http/1.0 without host", "GET " + credPath + " HTTP/1.0\r\n\r\n", 200},
		{"rebinding", get("evil.example"), 403},
		{"rebinding with port", get("evil.example:" + port), 403},
		{"userinfo", get("user@169.254.169.254"), 400}, // refused by net/http itself
		{"rebinding token", "PUT /latest/api/token HTTP/1.1\r\nHost: evil.example\r\nX-aws-ec2-metadata-token-ttl-seconds: 60\r\n\r\n", 403},
		{"rebinding passthrough", "GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: evil.example\r\n\r\n", 403},
		{"rebinding role list", "GET /latest/meta-data/iam/security-credentials/ HTTP/1.1\r\nHost: evil.example\r\n\r\n", 403},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e.src.mu.Lock()
			before := e.src.calls
			e.src.mu.Unlock()
			rs := exchange(t, addr, tc.raw)
			if len(rs) != 1 || rs[0].StatusCode != tc.want {
				t.Fatalf("got %d responses (%v), want one %d", len(rs), statuses(rs), tc.want)
			}
			e.src.mu.Lock()
			calls := e.src.calls - before
			e.src.mu.Unlock()
			if tc.want == 403 {
				if calls != 0 || strings.Contains(rs[0].Header.Get("X-Test-Body"), testSecret) {
					t.Errorf("refused request reached the credential source (%d calls)", calls)
				}
				if rs[0].Header.Get("X-Test-Body") != hostForbidden {
					t.Errorf("body %q, want %q", rs[0].Header.Get("X-Test-Body"), hostForbidden)
				}
			}
		})
	}
	if v := testutil.ToFloat64(e.s.lim.hostRejections); v != 5 {
		t.Errorf("imdsproxy_http_host_rejections_total = %v, want 5", v)
	}
}

// TestAllowedHostsConfig: an extra name in AllowedHosts is served.
func TestAllowedHostsConfig(t *testing.T) {
	_, addr := rawServer(t, Config{AllowedHosts: []string{"IMDS.Internal"}})
	rs := exchange(t, addr, "GET "+credPath+" HTTP/1.1\r\nHost: imds.internal:80\r\n\r\n")
	if len(rs) != 1 || rs[0].StatusCode != 200 {
		t.Fatalf("allowed host: %v", statuses(rs))
	}
}

// TestHostCheckRemembered: a connection's allowed Host is remembered only
// for that value and that configuration: another Host on the same
// connection is checked (and refused), and after an Update that no longer
// allows the name, the same connection's next request with it is refused.
func TestHostCheckRemembered(t *testing.T) {
	e, addr := rawServer(t, Config{AllowedHosts: []string{"imds.internal"}})
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	get := func(host string) int {
		t.Helper()
		resp, _, err := connlimittest.RoundTrip(conn, "GET "+credPath+" HTTP/1.1\r\nHost: "+host+"\r\n\r\n", 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		return resp.StatusCode
	}
	for i, tc := range []struct {
		host string
		want int
	}{{"imds.internal", 200}, {"imds.internal", 200}, {"evil.example", 403}, {"imds.internal:80", 200}, {"evil.example", 403}} {
		if got := get(tc.host); got != tc.want {
			t.Fatalf("request %d (Host %s): %d, want %d", i, tc.host, got, tc.want)
		}
	}
	if err := e.s.Update(Config{Plan: e.plan}); err != nil {
		t.Fatal(err)
	}
	if got := get("imds.internal:80"); got != 403 {
		t.Fatalf("after an Update without the name, its Host on the same connection: %d, want 403", got)
	}
	if got := get("169.254.169.254"); got != 200 {
		t.Fatalf("the IMDS address after the Update: %d, want 200", got)
	}
}

// TestSmuggling sends request-smuggling attempts over one raw connection
// each and checks how many responses come back, their statuses, and that
// the credential handler ran only for the requests meant to reach it.
func TestSmuggling(t *testing.T) {
	e, addr := rawServer(t, Config{})
	const h = "Host: 169.254.169.254\r\n"
	req := func(extra string) string { return "GET " + credPath + " HTTP/1.1\r\n" + h + extra + "\r\n" }
	evil := "GET " + credPath + " HTTP/1.1\r\nHost: evil.example\r\n\r\n"
	for _, tc := range []struct {
		name  string
		raw   string
		want  []int // statuses of the responses, in order
		calls int   // credential source calls expected
	}{
		{"pipelined: foreign Host refused in between", req("") + evil + req(""), []int{200, 403, 200}, 2},
		{"content-length body hides a request", "GET /latest/meta-data/iam HTTP/1.1\r\n" + h +
			"Content-Length: " + itoa(len(evil)) + "\r\n\r\n" + evil, []int{200}, 0},
		{"chunked body hides a request", "GET /latest/meta-data/iam HTTP/1.1\r\n" + h +
			"Transfer-Encoding: chunked\r\n\r\n" + hex(len(evil)) + "\r\n" + evil + "\r\n0\r\n\r\n" + req(""), []int{400}, 0},
		{"CL and TE together", "GET /latest/meta-data/iam HTTP/1.1\r\n" + h +
			"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + evil, []int{400}, 0},
		{"TE and CL together", "GET /latest/meta-data/iam HTTP/1.1\r\n" + h +
			"Transfer-Encoding: chunked\r\nContent-Length: 100\r\n\r\n0\r\n\r\n" + evil, []int{400}, 0},
		{"duplicate content-length", "GET /latest/meta-data/iam HTTP/1.1\r\n" + h +
			"Content-Length: 0\r\nContent-Length: " + itoa(len(evil)) + "\r\n\r\n" + evil, []int{400}, 0},
		{"obfuscated transfer-encoding", "GET /latest/meta-data/iam HTTP/1.1\r\n" + h +
			"Transfer-Encoding: xchunked\r\n\r\n" + evil, []int{501}, 0},
		{"transfer-encoding list", "GET /latest/meta-data/iam HTTP/1.1\r\n" + h +
			"Transfer-Encoding: identity, chunked\r\n\r\n0\r\n\r\n" + evil, []int{501}, 0},
		{"space before colon", "GET /latest/meta-data/iam HTTP/1.1\r\n" + h +
			"Content-Length : 5\r\n\r\n" + evil, []int{400}, 0},
		// RFC 9112 5.2: a server may replace obs-fold with a space, as net/http does.
		{"obs-fold harmless header", "GET " + credPath + " HTTP/1.1\r\n" + h + "X-Folded: a\r\n b\r\n\r\n", []int{200}, 1},
		{"obs-fold content-length", "GET /latest/meta-data/iam HTTP/1.1\r\n" + h + "Content-Length: 0\r\n " +
			itoa(len(evil)) + "\r\n\r\n" + evil, []int{400}, 0},
		{"obs-fold Host", "GET " + credPath + " HTTP/1.1\r\nHost: evil.example\r\n 169.254.169.254\r\n\r\n", []int{400}, 0},
		{"absolute-form foreign host", "GET http://evil.example" + credPath + " HTTP/1.1\r\n" + h + "\r\n", []int{403}, 0},
		{"absolute-form imds host", "GET http://169.254.169.254" + credPath + " HTTP/1.1\r\nHost: evil.example\r\n\r\n", []int{200}, 1},
		{"two Host headers", "GET " + credPath + " HTTP/1.1\r\n" + h + "Host: evil.example\r\n\r\n", []int{400}, 0},
		{"no Host in HTTP/1.1", "GET " + credPath + " HTTP/1.1\r\n\r\n", []int{400}, 0},
		{"non-ASCII Host", "GET " + credPath + " HTTP/1.1\r\nHost: ｌocalhost\r\n\r\n", []int{400}, 0},
		{"Host with userinfo and port", "GET " + credPath + " HTTP/1.1\r\nHost: 169.254.169.254:80@evil.example\r\n\r\n", []int{400}, 0},
		{"Host with foreign port trick", "GET " + credPath + " HTTP/1.1\r\nHost: evil.example:80:169.254.169.254\r\n\r\n", []int{403}, 0},
		{"bare LF line endings", "GET " + credPath + " HTTP/1.1\n" + "Host: evil.example\n\n", []int{403}, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e.src.mu.Lock()
			before := e.src.calls
			e.src.mu.Unlock()
			rs := exchange(t, addr, tc.raw)
			got := statuses(rs)
			if !equalInts(got, tc.want) {
				t.Errorf("statuses %v, want %v", got, tc.want)
			}
			e.src.mu.Lock()
			calls := e.src.calls - before
			e.src.mu.Unlock()
			if calls != tc.calls {
				t.Errorf("credential source called %d times, want %d", calls, tc.calls)
			}
			leaks := 0
			for _, r := range rs {
				if strings.Contains(r.Header.Get("X-Test-Body"), testSecret) {
					leaks++
				}
			}
			if leaks != tc.calls {
				t.Errorf("%d responses carry credentials, want %d", leaks, tc.calls)
			}
		})
	}
}

// TestConnectionFlood: 2,000 idle connections do not hold up a normal
// request (it is answered well within a second), and once they close the
// goroutines and the open connection gauge return to their baseline.
func TestConnectionFlood(t *testing.T) {
	e, addr := rawServer(t, Config{})
	warm := exchange(t, addr, "GET "+credPath+" HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n")
	if len(warm) != 1 {
		t.Fatal("no answer before the flood")
	}
	waitFor(t, func() bool { return testutil.ToFloat64(e.s.lim.openConns) == 0 })
	base := runtime.NumGoroutine()

	const n = 2000
	conns := make([]net.Conn, 0, n)
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	// Each connection sends one request and leaves the answer unread: it
	// then stays open as an idle keep-alive connection (idleTimeout), not
	// a silent one cut after readHeaderTimeout, so the flood stands however
	// long dialling 2,000 connections takes on a loaded machine.
	for range n {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
		if _, err := io.WriteString(c, "GET /latest/meta-data/iam HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n"); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, func() bool { return testutil.ToFloat64(e.s.lim.openConns) == n })

	start := time.Now()
	rs := exchange(t, addr, "GET "+credPath+" HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n")
	took := time.Since(start)
	if len(rs) != 1 || rs[0].StatusCode != 200 {
		t.Fatalf("normal request during the flood: %v", statuses(rs))
	}
	// Well under the header timeout the idle connections would hold a
	// blocked server for; not tighter, so that a loaded machine passes.
	if took > time.Second {
		t.Errorf("normal request took %s during the flood, want < 1s", took)
	}

	for _, c := range conns {
		c.Close()
	}
	conns = nil
	waitFor(t, func() bool {
		return testutil.ToFloat64(e.s.lim.openConns) == 0 && runtime.NumGoroutine() <= base+2
	})
}

// TestConnectionLimit: at MaxConns open connections the next one waits
// (counted) until one closes, then is served.
func TestConnectionLimit(t *testing.T) {
	e, addr := rawServer(t, Config{MaxConns: 8})
	var idle []net.Conn
	for range 8 {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		idle = append(idle, c)
	}
	waitFor(t, func() bool { return testutil.ToFloat64(e.s.lim.openConns) == 8 })

	c, err := net.Dial("tcp", addr) // queued in the kernel's backlog
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := io.WriteString(c, "GET "+credPath+" HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(c)
	_ = c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	if _, err := http.ReadResponse(br, nil); err == nil {
		t.Fatal("a ninth connection was served with 8 allowed")
	}
	if v := testutil.ToFloat64(e.s.lim.limitReached); v < 1 {
		t.Errorf("imdsproxy_http_connection_limit_reached_total = %v, want >= 1", v)
	}
	idle[0].Close()
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatalf("not served after a slot freed: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Errorf("status %d", resp.StatusCode)
	}
}

// TestConnectionLimitEvictsIdle: connections that merely stay open between
// requests cannot hold the limit against a new client. With the limit
// reached by keep-alive connections idle after one request each (a local
// process refreshing them would hold every slot for good otherwise), a new
// connection is served at once: the connection idle the longest is closed
// to make room, and counted.
func TestConnectionLimitEvictsIdle(t *testing.T) {
	e, addr := rawServer(t, Config{MaxConns: 8})
	var held []*bufio.Reader
	var conns []net.Conn
	for i := range 8 {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		br := bufio.NewReader(c)
		if _, err := io.WriteString(c, "GET "+credPath+" HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n"); err != nil {
			t.Fatal(err)
		}
		_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatalf("connection %d: %v", i, err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		held, conns = append(held, br), append(conns, c)
	}
	waitFor(t, func() bool { return testutil.ToFloat64(e.s.lim.openConns) == 8 })

	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := io.WriteString(c, "GET "+credPath+" HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	// Far below the 60 s idle timeout that would free a slot otherwise.
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("a new client at a limit held by idle keep-alive connections: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Errorf("status %d", resp.StatusCode)
	}
	if v := testutil.ToFloat64(e.s.lim.idleClosed); v != 1 {
		t.Errorf("imdsproxy_http_idle_connections_closed_total = %v, want 1", v)
	}
	// The one idle the longest (the first) was closed; the last still serves.
	_ = conns[0].SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := held[0].ReadByte(); err == nil {
		t.Error("the connection idle the longest was not the one closed")
	}
	if _, err := io.WriteString(conns[7], "GET "+credPath+" HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	_ = conns[7].SetReadDeadline(time.Now().Add(10 * time.Second))
	if resp, err := http.ReadResponse(held[7], nil); err != nil {
		t.Errorf("the connection idle the shortest: %v", err)
	} else {
		resp.Body.Close()
	}
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("condition not met in 10s (goroutines %d)", runtime.NumGoroutine())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func statuses(rs []*http.Response) []int {
	out := make([]int, 0, len(rs))
	for _, r := range rs {
		out = append(out, r.StatusCode)
	}
	return out
}

func equalInts(a, b []int) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func itoa(n int) string { return strconv.Itoa(n) }
func hex(n int) string  { return strconv.FormatInt(int64(n), 16) }

// FuzzHostAllowed: the Host check never panics, and whatever it accepts
// names one of the allowed hosts, with at most a numeric port.
func FuzzHostAllowed(f *testing.F) {
	for _, s := range []string{"", "169.254.169.254", "169.254.169.254:80", "[fd00:ec2::254]:80", "localhost",
		"[::1]", "[::ffff:127.0.0.1]", "[fd00:ec2:0::254]", "evil.example", "user@127.0.0.1", "127.0.0.1:80@evil", "[::1", "::1", "ｌocalhost", "10.1.2.3:8169"} {
		f.Add(s)
	}
	local := &net.TCPAddr{IP: net.ParseIP("10.1.2.3"), Port: 8169}
	f.Fuzz(func(t *testing.T, host string) {
		if !hostAllowed(host, local, []string{"imds.internal"}) || host == "" {
			return
		}
		name := host
		if h, _, err := net.SplitHostPort(host); err == nil {
			name = h
		}
		name = strings.ToLower(strings.TrimSuffix(strings.TrimPrefix(name, "["), "]"))
		ok := name == "imds.internal" || name == "10.1.2.3"
		ip := net.ParseIP(name)
		for _, d := range defaultHosts {
			ok = ok || name == d || ip != nil && ip.Equal(net.ParseIP(d)) // an address however spelt
		}
		if ip != nil && ip.Equal(local.IP) {
			ok = true
		}
		if !ok || strings.ContainsAny(host, "@/\\ %") {
			t.Errorf("hostAllowed(%q) = true", host)
		}
	})
}
