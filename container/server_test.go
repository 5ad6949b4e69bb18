package container

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/imdsproxy/imdsproxy/access"
	"github.com/imdsproxy/imdsproxy/connlimit/connlimittest"
	"github.com/imdsproxy/imdsproxy/peer"
)

// readToken reads a workload's token file as the SDKs do.
func readToken(t *testing.T, e *env, id string) string {
	t.Helper()
	b, err := os.ReadFile(e.dir + "/tokens/" + dirName(id) + "/token")
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// get sends one request and returns the status and decoded JSON body.
func get(t *testing.T, method, url, host string, hdr map[string][]string) (int, map[string]string, http.Header) {
	t.Helper()
	req, err := http.NewRequest(method, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	if host != "" {
		req.Host = host
	}
	for k, v := range hdr {
		req.Header[k] = v
	}
	resp, err := http.DefaultTransport.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	var m map[string]string
	if len(body) > 0 && method != http.MethodHead {
		if err := json.Unmarshal(body, &m); err != nil {
			t.Fatalf("%s %s: body %q is not a JSON object of strings: %v", method, url, body, err)
		}
		if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
			t.Errorf("Content-Type %q, want exactly application/json (the Go SDK decodes only that)", ct)
		}
	}
	return resp.StatusCode, m, resp.Header
}

func TestServe(t *testing.T) {
	e := newEnv(t, access.Section{})
	billing := readToken(t, e, "uid:64101")
	backup := readToken(t, e, "backup.service")
	if len(billing) != 43 || strings.ContainsAny(billing, "\r\n=") || billing == backup {
		t.Fatalf("token %q: want 43 base64url characters, no newline, one per workload", billing)
	}
	base := "http://" + e.addr
	wrong := billing[:42] + "A"
	if wrong == billing {
		wrong = billing[:42] + "B"
	}
	for _, tc := range []struct {
		name       string
		method     string
		url, host  string
		auth       []string
		peer       peer.Info
		peerErr    error
		status     int
		code, role string
	}{
		{"billing from a container on a bridge", "GET", e.url, "", []string{billing}, peer.Info{}, peer.ErrNotFound, 200, "", "billing"},
		{"backup from a container on a bridge", "GET", e.url, "", []string{backup}, peer.Info{}, peer.ErrNotFound, 200, "", "backup"},
		{"local billing process", "GET", e.url, "", []string{billing}, peer.Info{UID: 64101}, nil, 200, "", "billing"},
		{"local backup unit", "GET", e.url, "", []string{backup}, peer.Info{UID: 0, Unit: "backup.service"}, nil, 200, "", "backup"},
		{"stolen token, another uid", "GET", e.url, "", []string{billing}, peer.Info{UID: 1000}, nil, 403, codeAccessDenied, ""},
		{"another workload's token", "GET", e.url, "", []string{backup}, peer.Info{UID: 64101}, nil, 403, codeAccessDenied, ""},
		{"unidentifiable local client", "GET", e.url, "", []string{billing}, peer.Info{}, errors.New("sock_diag timeout"), 503, codeRetry, ""},
		{"missing token", "GET", e.url, "", nil, peer.Info{}, peer.ErrNotFound, 401, codeMissingToken, ""},
		{"empty token", "GET", e.url, "", []string{""}, peer.Info{}, peer.ErrNotFound, 401, codeMissingToken, ""},
		{"wrong token", "GET", e.url, "", []string{wrong}, peer.Info{}, peer.ErrNotFound, 401, codeInvalidToken, ""},
		{"Bearer prefix", "GET", e.url, "", []string{"Bearer " + billing}, peer.Info{}, peer.ErrNotFound, 401, codeInvalidToken, ""},
		{"two tokens", "GET", e.url, "", []string{billing, billing}, peer.Info{}, peer.ErrNotFound, 401, codeInvalidToken, ""},
		{"over-long token", "GET", e.url, "", []string{strings.Repeat("A", MaxTokenLen+1)}, peer.Info{}, peer.ErrNotFound, 401, codeInvalidToken, ""},
		{"POST", "POST", e.url, "", []string{billing}, peer.Info{}, peer.ErrNotFound, 405, codeMethod, ""},
		{"HEAD", "HEAD", e.url, "", []string{billing}, peer.Info{}, peer.ErrNotFound, 405, "", ""},
		{"another path", "GET", base + "/v2/credentials", "", []string{billing}, peer.Info{}, peer.ErrNotFound, 404, codeNotFound, ""},
		{"trailing slash", "GET", e.url + "/", "", []string{billing}, peer.Info{}, peer.ErrNotFound, 404, codeNotFound, ""},
		{"a query", "GET", e.url + "?x=1", "", []string{billing}, peer.Info{}, peer.ErrNotFound, 404, codeNotFound, ""},
		{"encoded path", "GET", base + "/v1%2Fcredentials", "", []string{billing}, peer.Info{}, peer.ErrNotFound, 404, codeNotFound, ""},
		{"rebound Host", "GET", e.url, "evil.example", []string{billing}, peer.Info{}, peer.ErrNotFound, 403, codeAccessDenied, ""},
		{"link-local Host", "GET", e.url, "169.254.170.23", []string{billing}, peer.Info{}, peer.ErrNotFound, 200, "", "billing"},
		{"IPv6 link-local Host", "GET", e.url, "[fd00:ec2::23]:80", []string{billing}, peer.Info{}, peer.ErrNotFound, 200, "", "billing"},
		{"localhost Host", "GET", e.url, "localhost:8171", []string{billing}, peer.Info{}, peer.ErrNotFound, 200, "", "billing"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e.id.set(tc.peer, tc.peerErr)
			hdr := map[string][]string{}
			if tc.auth != nil {
				hdr["Authorization"] = tc.auth
			}
			// A new connection each: the client is identified per connection.
			hdr["Connection"] = []string{"close"}
			status, body, h := get(t, tc.method, tc.url, tc.host, hdr)
			if status != tc.status {
				t.Fatalf("status %d %v, want %d", status, body, tc.status)
			}
			if tc.code != "" && (body["code"] != tc.code || body["message"] == "") {
				t.Errorf("error document %v, want code %s and a message", body, tc.code)
			}
			if status == 503 && h.Get("Retry-After") == "" {
				t.Error("503 without Retry-After")
			}
			if tc.role == "" {
				return
			}
			want := credsOf(tc.role)
			if body["AccessKeyId"] != want.AccessKeyID || body["SecretAccessKey"] != want.SecretAccessKey || body["Token"] != want.SessionToken ||
				body["AccountId"] != "333333333333" || body["RoleArn"] != want.RoleARN {
				t.Errorf("document %v, want the credentials of %s", body, tc.role)
			}
			exp, err := time.Parse(time.RFC3339, body["Expiration"])
			if err != nil || !strings.HasSuffix(body["Expiration"], "Z") || strings.Contains(body["Expiration"], ".") || exp.After(want.Expires) {
				t.Errorf("Expiration %q: want RFC 3339 UTC whole seconds, not after the real expiry", body["Expiration"])
			}
		})
	}
	// Counted by door; the tokens and secrets never reach the log.
	if v := testutil.ToFloat64(e.srv.m.rejections.WithLabelValues(rejectBadToken)); v != 4 {
		t.Errorf("rejections{invalid_token} = %v, want 4", v)
	}
	mfs, _ := e.reg.Gather()
	found := false
	for _, mf := range mfs {
		if mf.GetName() == "imdsproxy_access_refused_total" {
			for _, m := range mf.GetMetric() {
				l := map[string]string{}
				for _, p := range m.GetLabel() {
					l[p.GetName()] = p.GetValue()
				}
				if l["door"] == "container" && l["reason"] == "peer_mismatch" && m.GetCounter().GetValue() == 2 {
					found = true
				}
			}
		}
	}
	if !found {
		t.Error("imdsproxy_access_refused_total{door=container,reason=peer_mismatch} is not 2")
	}
	if problems, err := testutil.GatherAndLint(e.reg); err != nil || len(problems) > 0 {
		t.Errorf("lint: %v %v", problems, err)
	}
	logs := e.log.String()
	for _, secret := range []string{billing, backup, billing[:20], "secret-of-billing", "session-of-billing"} {
		if strings.Contains(logs, secret) {
			t.Errorf("the log holds a secret (%.6s…)", secret)
		}
	}
	if !strings.Contains(logs, `"pid":4242`) || !strings.Contains(logs, `"exe":"/usr/bin/app"`) {
		t.Errorf("no audit line with the local client's pid and exe (Identifier.Process):\n%s", logs)
	}
	if !strings.Contains(logs, `"door":"container"`) {
		t.Errorf("no audit line with door container:\n%s", logs)
	}
}

// TestServeUnavailable: credentials that cannot be had are a 503 with a
// JSON error, never an empty document.
func TestServeUnavailable(t *testing.T) {
	e := newEnv(t, access.Section{})
	e.src.mu.Lock()
	e.src.err = errors.New("sts down")
	e.src.mu.Unlock()
	status, body, h := get(t, "GET", e.url, "", map[string][]string{"Authorization": {readToken(t, e, "uid:64101")}})
	if status != 503 || body["code"] != codeUnavailable || h.Get("Retry-After") != "1" {
		t.Errorf("status %d %v, want 503 %s with Retry-After", status, body, codeUnavailable)
	}
}

// TestServeAccessLists: a local client the lists deny is refused even with
// its own workload's token.
func TestServeAccessLists(t *testing.T) {
	e := newEnv(t, access.Section{DenyUIDs: []int{64101}})
	e.id.set(peer.Info{UID: 64101}, nil)
	status, body, _ := get(t, "GET", e.url, "", map[string][]string{"Authorization": {readToken(t, e, "uid:64101")}})
	if status != 403 || body["code"] != codeAccessDenied {
		t.Errorf("status %d %v, want 403", status, body)
	}
}

// TestServeIdentifiesOncePerConnection: keep-alive requests reuse the
// identification of their connection.
func TestServeIdentifiesOncePerConnection(t *testing.T) {
	e := newEnv(t, access.Section{})
	tok := readToken(t, e, "uid:64101")
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 1}}
	for range 3 {
		req, _ := http.NewRequest("GET", e.url, nil)
		req.Header.Set("Authorization", tok)
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Fatalf("status %d", resp.StatusCode)
		}
	}
	e.id.mu.Lock()
	defer e.id.mu.Unlock()
	if e.id.n != 1 {
		t.Errorf("%d identifications for 3 requests on one connection, want 1", e.id.n)
	}
}

func TestHostAllowed(t *testing.T) {
	local := &netTCPAddr127
	for _, tc := range []struct {
		host string
		want bool
	}{
		{"127.0.0.1:8171", true}, {"127.0.0.1", true}, {"localhost", true}, {"LOCALHOST:1", true},
		{"[::1]:8171", true}, {"169.254.170.23", true}, {"169.254.170.23:80", true}, {"[fd00:ec2::23]", true},
		{"127.0.0.2", true}, // loopback
		{"", false}, {"evil.example", false}, {"169.254.170.2", false}, {"fd00:ec2::23", false},
		{"127.0.0.1:", false}, {"127.0.0.1:x", false}, {"127.0.0.1:123456", false}, {"[::1%lo]", false},
		{"user@127.0.0.1", false}, {"[127.0.0.1]", true},
	} {
		if got := hostAllowed(tc.host, local); got != tc.want {
			t.Errorf("hostAllowed(%q) = %v, want %v", tc.host, got, tc.want)
		}
	}
}

// TestServeIdleConnectionsGiveWay: connections that merely stay open cannot
// lock clients out of the endpoint. With every slot held by keep-alive
// connections idle after one request each (a local process refreshing them
// would hold them for good otherwise: the idle timeout is 60 s), a new
// client is served at once; the connection idle the longest is closed to
// make room, and counted.
func TestServeIdleConnectionsGiveWay(t *testing.T) {
	const limit = 4
	e := newEnv(t, access.Section{}, func(s *Server) { s.maxConns = limit })
	e.id.set(peer.Info{UID: 64101}, nil)
	billing := readToken(t, e, "uid:64101")
	request := "GET " + DefaultPath + " HTTP/1.1\r\nHost: " + e.addr + "\r\nAuthorization: " + billing + "\r\n\r\n"
	ask := func(c net.Conn) error {
		resp, _, err := connlimittest.RoundTrip(c, request, 10*time.Second)
		if err != nil {
			return err
		}
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("status %d", resp.StatusCode)
		}
		return nil
	}
	var conns []net.Conn
	for i := range limit {
		c, err := net.Dial("tcp", e.addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if err := ask(c); err != nil {
			t.Fatalf("connection %d: %v", i, err)
		}
		conns = append(conns, c)
	}
	c, err := net.Dial("tcp", e.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := ask(c); err != nil {
		t.Fatalf("a new client with every slot held by idle keep-alive connections: %v", err)
	}
	if v := testutil.ToFloat64(e.srv.m.idleClosed); v != 1 {
		t.Errorf("imdsproxy_container_idle_connections_closed_total = %v, want 1", v)
	}
	_ = conns[0].SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := conns[0].Read(make([]byte, 1)); err == nil {
		t.Error("the connection idle the longest was not the one closed")
	}
	if err := ask(conns[limit-1]); err != nil {
		t.Errorf("the connection idle the shortest: %v", err)
	}
}

// TestServeShutdownAnswersAcceptedConnection: a connection accepted
// before the shutdown (here, one the accept loop holds when it begins) has
// its request answered, not dropped: a restart (a hand-off of the socket
// to the next process) loses no container's request.
func TestServeShutdownAnswersAcceptedConnection(t *testing.T) {
	e := newEnv(t, access.Section{})
	e.id.set(peer.Info{UID: 64101}, nil)
	tok := readToken(t, e, "uid:64101")
	p := connlimittest.StartPaused(t, 300*time.Millisecond, e.srv.Serve)
	c, err := net.Dial("tcp", p.Addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: %s\r\nAuthorization: %s\r\n\r\n", DefaultPath, p.Addr, tok)
	<-p.Accepted
	p.Shutdown() // while the accept loop holds the connection
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("the request of a connection accepted at the shutdown was dropped: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Errorf("its request: %d", resp.StatusCode)
	}
}
