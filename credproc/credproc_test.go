package credproc

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/imdsproxy/imdsproxy/access"
	"github.com/imdsproxy/imdsproxy/config"
	"github.com/imdsproxy/imdsproxy/creds"
	"github.com/imdsproxy/imdsproxy/peer"
)

type via struct{}

func (via) Fetch(context.Context, creds.Role) (creds.Credentials, error) {
	return creds.Credentials{}, errors.New("not used")
}

func key(name, acct string) creds.Key {
	return creds.Key{Kind: creds.KindWorkload, Role: creds.Role{Name: name, ARN: "arn:aws:iam::" + acct + ":role/" + name}, Via: via{}}
}

func uidp(u int) *int { return &u }

// src answers every key with credentials of its own (with token as the
// session token when set), or err.
type src struct {
	mu    sync.Mutex
	err   error
	token string
}

func (s *src) GetWithin(_ context.Context, k creds.Key, _ time.Duration) (creds.Credentials, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.err != nil {
		return creds.Credentials{}, s.err
	}
	c := credsOf(k.Role.Name)
	if s.token != "" {
		c.SessionToken = s.token
	}
	return c, nil
}

// sessionToken returns a session token of n bytes, shaped like STS's.
func sessionToken(n int) string {
	return "IQoJb3JpZ2luX2Vj" + strings.Repeat("A", n-16)
}

func credsOf(role string) creds.Credentials {
	return creds.Credentials{
		AccessKeyID: "ASIA" + strings.ToUpper(role) + "0000000000", SecretAccessKey: "secret/of+" + role, SessionToken: "session-of-" + role + "==",
		Expires: time.Now().Add(time.Hour), LastUpdated: time.Now(), RoleARN: "arn:aws:sts::333333333333:assumed-role/" + role + "/h",
	}
}

type syncBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuf) Write(p []byte) (int, error) { s.mu.Lock(); defer s.mu.Unlock(); return s.b.Write(p) }
func (s *syncBuf) String() string              { s.mu.Lock(); defer s.mu.Unlock(); return s.b.String() }

type env struct {
	srv    *Server
	src    *src
	socket string
	reg    *prometheus.Registry
	log    *syncBuf
	mu     sync.Mutex
	info   peer.Info
	err    error
	hold   func() // when set, identify calls it before it answers
}

// newEnv serves a plan with workload billing for uid 64101 and the host
// role app for every other client, denying uid 64104.
// newEnv serves a Server on a socket in a temporary directory; each of
// opts is applied to the Server before Serve.
func newEnv(t *testing.T, opts ...func(*Server)) *env {
	t.Helper()
	e := &env{src: &src{}, reg: prometheus.NewRegistry(), log: &syncBuf{}}
	log := zap.New(zapcore.NewCore(zapcore.NewJSONEncoder(zap.NewProductionEncoderConfig()), zapcore.AddSync(e.log), zap.DebugLevel))
	plan, err := access.NewPlan(access.PlanConfig{
		Host: key("app", "222222222222"), Serve: creds.KindWorkload,
		Access:       access.Section{DenyUIDs: []int{64104}},
		Workloads:    []access.Workload{{UID: uidp(64101), Role: config.Role{Name: "billing"}}},
		WorkloadKeys: []creds.Key{key("billing", "333333333333")},
	}, nil, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	broker, err := access.NewBroker(e.src, log, log.Named("audit"), e.reg)
	if err != nil {
		t.Fatal(err)
	}
	if e.srv, err = New(plan, broker, log, e.reg); err != nil {
		t.Fatal(err)
	}
	e.srv.identify = func(*net.UnixConn) (peer.Info, error) {
		e.mu.Lock()
		info, err, hold := e.info, e.err, e.hold
		e.mu.Unlock()
		if hold != nil {
			hold()
		}
		return info, err
	}
	for _, o := range opts {
		o(e.srv)
	}
	sec := DefaultSection()
	sec.Socket = filepath.Join(t.TempDir(), "credentials.sock")
	e.socket = sec.Socket
	ln, err := sec.Listen()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- e.srv.Serve(ctx, ln) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	})
	return e
}

func (e *env) as(info peer.Info, err error) {
	e.mu.Lock()
	e.info, e.err = info, err
	e.mu.Unlock()
}

func TestServe(t *testing.T) {
	e := newEnv(t)
	for _, tc := range []struct {
		name     string
		info     peer.Info
		idErr    error
		role     string
		wantRole string
		wantErr  string
	}{
		{"a workload's uid", peer.Info{UID: 64101}, nil, "", "billing", ""},
		{"any other uid: the host's role", peer.Info{UID: 1000, Unit: "web.service"}, nil, "", "app", ""},
		{"its own role by name", peer.Info{UID: 64101}, nil, "billing", "billing", ""},
		{"another role by name", peer.Info{UID: 1000}, nil, "billing", "", "not_found: role billing is not served to this process"},
		{"a denied uid", peer.Info{UID: 64104}, nil, "", "", "access_denied"},
		{"not identified", peer.Info{}, errors.New("gone"), "", "", "retry"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e.as(tc.info, tc.idErr)
			d, err := Fetch(t.Context(), Options{Socket: e.socket, Role: tc.role, Timeout: 5 * time.Second})
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("Fetch = %+v, %v; want an error with %q", d.AccessKeyID, err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			want := credsOf(tc.wantRole)
			if d.Version != 1 || d.AccessKeyID != want.AccessKeyID || d.SecretAccessKey != want.SecretAccessKey ||
				d.SessionToken != want.SessionToken || d.AccountID != "333333333333" {
				t.Errorf("document %+v, want the credentials of %s", d.AccessKeyID, tc.wantRole)
			}
			if exp, err := time.Parse(TimeLayout, d.Expiration); err != nil || exp.After(want.Expires) {
				t.Errorf("Expiration %q", d.Expiration)
			}
		})
	}
	if v := testutil.ToFloat64(e.srv.requests.WithLabelValues(CodeRetry)); v != retries {
		t.Errorf("retry answers %v, want %d (the client asks again)", v, retries)
	}
	if problems, err := testutil.GatherAndLint(e.reg); err != nil || len(problems) > 0 {
		t.Errorf("lint: %v %v", problems, err)
	}
	logs := e.log.String()
	for _, secret := range []string{"secret/of+billing", "session-of-billing", "secret/of+app"} {
		if strings.Contains(logs, secret) {
			t.Errorf("the log holds a secret %q", secret)
		}
	}
	if !strings.Contains(logs, `"door":"process"`) {
		t.Errorf("no audit line with door process:\n%s", logs)
	}
}

// TestServeUnavailable: no credentials is an error, never an empty
// document.
func TestServeUnavailable(t *testing.T) {
	e := newEnv(t)
	e.src.mu.Lock()
	e.src.err = errors.New("sts down")
	e.src.mu.Unlock()
	if _, err := Fetch(t.Context(), Options{Socket: e.socket, Timeout: 5 * time.Second}); err == nil || !strings.Contains(err.Error(), "unavailable") {
		t.Errorf("Fetch = %v, want unavailable", err)
	}
}

// TestServeLongSessionToken: a session token's size is not fixed (WIRE.md
// §6.3), so one of 20 KB, larger than the 8 KiB and 16 KiB caps there used
// to be, reaches the client whole, as the IMDS and container doors serve it.
func TestServeLongSessionToken(t *testing.T) {
	e := newEnv(t)
	tok := sessionToken(20_000)
	e.src.mu.Lock()
	e.src.token = tok
	e.src.mu.Unlock()
	d, err := Fetch(t.Context(), Options{Socket: e.socket, Timeout: 5 * time.Second})
	if err != nil || d.SessionToken != tok {
		t.Fatalf("Fetch = %d-byte session token, %v; want the %d-byte one", len(d.SessionToken), err, len(tok))
	}
	if out := d.Marshal(); bytes.Count(out, []byte("\n")) != 1 || !bytes.Contains(out, []byte(tok)) {
		t.Errorf("the printed document is not one line holding the token")
	}
}

// TestServeAnswerTooLarge: credentials that make an answer over MaxResponse
// are not sent (no client would read them); the client gets an error that
// says why.
func TestServeAnswerTooLarge(t *testing.T) {
	e := newEnv(t)
	e.src.mu.Lock()
	e.src.token = sessionToken(MaxResponse)
	e.src.mu.Unlock()
	d, err := Fetch(t.Context(), Options{Socket: e.socket, Timeout: 5 * time.Second})
	if err == nil || !strings.Contains(err.Error(), "unavailable: the credentials make an answer of") ||
		!strings.Contains(err.Error(), "more than the protocol's 1048576") || d.SessionToken != "" {
		t.Fatalf("Fetch = %d-byte session token, %v; want an unavailable error naming the bound", len(d.SessionToken), err)
	}
	if v := testutil.ToFloat64(e.srv.requests.WithLabelValues(CodeUnavailable)); v != 1 {
		t.Errorf("unavailable answers %v, want 1", v)
	}
	if !strings.Contains(e.log.String(), "credential_process answer too large") {
		t.Errorf("no log line for the answer too large:\n%s", e.log.String())
	}
}

// TestFetchAnswerTooLarge: the client reads at most MaxResponse bytes of an
// answer and refuses a longer one with a one-line error, even one that
// would parse.
func TestFetchAnswerTooLarge(t *testing.T) {
	socket := filepath.Join(t.TempDir(), "big.sock")
	ln, err := net.Listen("unix", socket)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	d := Document{Version: 1, AccessKeyID: "ASIAEXAMPLE000000000", SecretAccessKey: "s/e+c",
		SessionToken: sessionToken(MaxResponse), Expiration: time.Now().Add(time.Hour).UTC().Format(TimeLayout)}
	answer, _ := jsonLine(Response{Version: Version, Credentials: &d})
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(10 * time.Second))
				_, _ = bufio.NewReader(c).ReadSlice('\n')
				_, _ = c.Write(answer) // the client stops reading: an error here is expected
			}()
		}
	}()
	_, err = Fetch(t.Context(), Options{Socket: socket, Timeout: 10 * time.Second})
	if err == nil || !strings.Contains(err.Error(), "the daemon's answer is longer than 1048576 bytes") || strings.Contains(err.Error(), "\n") {
		t.Errorf("Fetch of a %d-byte answer: %v; want one line saying it is too long", len(answer), err)
	}
}

// TestServeIdentifiesForReal: peer.LookupUnix identifies this process.
func TestServeIdentifiesForReal(t *testing.T) {
	e := newEnv(t)
	e.srv.identify = peer.LookupUnix
	d, err := Fetch(t.Context(), Options{Socket: e.socket, Timeout: 5 * time.Second})
	want := "app"
	switch os.Getuid() {
	case 64101:
		want = "billing"
	case 64104:
		want = ""
	}
	if want == "" {
		return
	}
	if err != nil || d.AccessKeyID != credsOf(want).AccessKeyID {
		t.Errorf("Fetch = %q, %v; want %s's", d.AccessKeyID, err, want)
	}
}

// TestServeBadRequests: whatever is sent, the answer is one line of the
// protocol, a bad_request.
func TestServeBadRequests(t *testing.T) {
	e := newEnv(t)
	for _, req := range []string{
		"",
		"{\"version\":1}",                    // no newline
		"{\"version\":2}\n",                  // another version
		"{\"version\":1,\"x\":1}\n",          // unknown field
		"{\"version\":1,\"role\":\"a/b\"}\n", // not a role name
		"{\"version\":1}{\"version\":1}\n",   // trailing data
		"{\"version\":1,\"role\":\"" + strings.Repeat("a", 600) + "\"}\n", // too long
		"\x00\xff\n",
	} {
		c, err := net.Dial("unix", e.socket)
		if err != nil {
			t.Fatal(err)
		}
		_, _ = c.Write([]byte(req))
		if !strings.HasSuffix(req, "\n") {
			_ = c.(*net.UnixConn).CloseWrite()
		}
		var buf bytes.Buffer
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		_, _ = buf.ReadFrom(c)
		c.Close()
		var resp Response
		if err := decodeLine(buf.Bytes(), &resp); err != nil || resp.Error == nil || resp.Error.Code != CodeBadRequest || resp.Credentials != nil {
			t.Errorf("request %.40q: answer %q (%v), want one bad_request line", req, buf.String(), err)
		}
	}
}

// TestServeReadTimeout: a client that sends no request, or only part of
// one, is answered bad_request and its connection closed readTimeout (2 s,
// docs/configuration.md) after it was accepted: not sooner, and not
// never.
func TestServeReadTimeout(t *testing.T) {
	e := newEnv(t)
	for _, tc := range []struct{ name, sent string }{
		{"nothing", ""},
		{"half a line", `{"version":`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			start := time.Now()
			c, err := net.Dial("unix", e.socket)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if _, err := c.Write([]byte(tc.sent)); err != nil {
				t.Fatal(err)
			}
			// Generous: the server must close well before this.
			_ = c.SetReadDeadline(time.Now().Add(5 * readTimeout))
			var buf bytes.Buffer
			_, err = buf.ReadFrom(c) // until the server closes
			took := time.Since(start)
			if err != nil {
				t.Fatalf("not closed by the server within %v: %v (read %q)", 5*readTimeout, err, buf.String())
			}
			if took < readTimeout*3/4 {
				t.Errorf("closed after %v, before the %v a request may take", took, readTimeout)
			}
			var resp Response
			if err := decodeLine(buf.Bytes(), &resp); err != nil || resp.Error == nil || resp.Error.Code != CodeBadRequest {
				t.Errorf("answer %q (%v), want one bad_request line", buf.String(), err)
			}
			t.Logf("answered bad_request and closed after %v", took.Round(time.Millisecond))
		})
	}
}

// TestServeMaxConns: while MaxConns connections are being answered (held
// in identify), the next one is not served; it is as soon as one of them
// is done.
func TestServeMaxConns(t *testing.T) {
	e := newEnv(t, func(s *Server) { s.owner = nil }) // one uid may take every slot here: TestServeShareByUID
	var calls atomic.Int64
	entered := make(chan struct{}, MaxConns)
	release := make(chan struct{})
	e.mu.Lock()
	e.info = peer.Info{UID: 1000}
	e.hold = func() {
		if calls.Add(1) <= MaxConns {
			entered <- struct{}{}
			<-release
		}
	}
	e.mu.Unlock()
	var once sync.Once
	releaseAll := func() { once.Do(func() { close(release) }) }
	t.Cleanup(releaseAll) // before the server stops (cleanups run last first)

	request := func() net.Conn {
		t.Helper()
		c, err := net.Dial("unix", e.socket)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		if _, err := c.Write([]byte("{\"version\":1}\n")); err != nil {
			t.Fatal(err)
		}
		return c
	}
	for range MaxConns {
		request()
	}
	timeout := time.After(30 * time.Second)
	for n := range MaxConns {
		select {
		case <-entered:
		case <-timeout:
			t.Fatalf("%d of %d connections served after 30s", n, MaxConns)
		}
	}

	next := request()
	// Generous enough for the server to reach it if it did not wait.
	_ = next.SetReadDeadline(time.Now().Add(time.Second))
	var b [1]byte
	if n, err := next.Read(b[:]); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("connection %d read %d bytes, %v while %d were being served; want no answer yet", MaxConns+1, n, err, MaxConns)
	}
	if n := calls.Load(); n != MaxConns {
		t.Fatalf("%d requests decided with %d connections allowed", n, MaxConns)
	}

	release <- struct{}{} // one of the held answers, then its connection closes
	_ = next.SetReadDeadline(time.Now().Add(10 * time.Second))
	line, err := bufio.NewReader(next).ReadBytes('\n')
	if err != nil {
		t.Fatalf("connection %d not served within 10s of a slot freeing: %v (read %q)", MaxConns+1, err, line)
	}
	var resp Response
	if err := decodeLine(line, &resp); err != nil || resp.Credentials == nil || resp.Credentials.AccessKeyID != credsOf("app").AccessKeyID {
		t.Errorf("connection %d answered %q (%v), want the host role's credentials", MaxConns+1, line, err)
	}
}

func TestSectionValidate(t *testing.T) {
	for _, tc := range []struct {
		s   Section
		err string
	}{
		{DefaultSection(), ""},
		{Section{Socket: "/run/x.sock", SocketMode: "0660", SocketGroup: "0"}, ""},
		{Section{Socket: "/run/x.sock", SocketMode: "600"}, ""},
		{Section{Socket: "run/x.sock", SocketMode: "0666"}, "credential_process.socket"},
		{Section{Socket: "/run/../x.sock", SocketMode: "0666"}, "credential_process.socket"},
		{Section{Socket: "/" + strings.Repeat("a", 120), SocketMode: "0666"}, "credential_process.socket"},
		{Section{Socket: "/run/x.sock", SocketMode: "0999"}, "credential_process.socket_mode"},
		{Section{Socket: "/run/x.sock", SocketMode: "01777"}, "credential_process.socket_mode"},
		{Section{Socket: "/run/x.sock", SocketMode: "rw"}, "credential_process.socket_mode"},
		{Section{Socket: "/run/x.sock", SocketMode: "0666", SocketGroup: "no-such-group"}, ""}, // looked up by Listen
		{Section{Socket: "/run/x.sock", SocketMode: "0666", SocketGroup: "a b"}, "credential_process.socket_group"},
	} {
		err := tc.s.Validate()
		if tc.err == "" && err != nil || tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err)) {
			t.Errorf("Validate(%+v) = %v, want %q", tc.s, err, tc.err)
		}
	}
}

func TestListen(t *testing.T) {
	dir := t.TempDir()
	sec := Section{Socket: filepath.Join(dir, "c.sock"), SocketMode: "0660", SocketGroup: "0"}
	ln, err := sec.Listen()
	if err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(sec.Socket)
	if err != nil || st.Mode().Perm() != 0o660 || st.Mode()&os.ModeSocket == 0 {
		t.Errorf("socket file %v %v, want a socket of mode 0660", st.Mode(), err)
	}
	if _, err := sec.Listen(); err == nil || !strings.Contains(err.Error(), "another process answers") {
		t.Errorf("a second Listen on a live socket: %v", err)
	}
	ln.Close()
	if _, err := os.Stat(sec.Socket); !os.IsNotExist(err) {
		t.Errorf("the socket file is left after Close: %v", err)
	}
	// A socket file nobody answers on (a crash) is replaced.
	stale, err := net.ListenUnix("unix", &net.UnixAddr{Name: sec.Socket, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	stale.SetUnlinkOnClose(false)
	stale.Close()
	ln, err = sec.Listen()
	if err != nil {
		t.Fatalf("a stale socket file was not replaced: %v", err)
	}
	ln.Close()
	// A group that does not exist is refused when the socket is made.
	if _, err := (Section{Socket: sec.Socket, SocketMode: "0660", SocketGroup: "no-such-group-imdsproxy"}).Listen(); err == nil ||
		!strings.Contains(err.Error(), "credential_process.socket_group") {
		t.Errorf("Listen with an unknown group: %v", err)
	}
	if _, err := os.Stat(sec.Socket); !os.IsNotExist(err) {
		t.Errorf("the socket file is left after a failed Listen: %v", err)
	}
	// Anything else at the path is refused.
	os.WriteFile(sec.Socket, []byte("x"), 0o600)
	if _, err := sec.Listen(); err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Errorf("Listen over a regular file: %v", err)
	}
}

func TestParseFlags(t *testing.T) {
	var stderr bytes.Buffer
	o, err := ParseFlags([]string{"--socket", "/tmp/s", "--role", "billing"}, &stderr)
	if err != nil || o.Socket != "/tmp/s" || o.Role != "billing" || o.Timeout <= 0 {
		t.Errorf("ParseFlags = %+v, %v", o, err)
	}
	for _, args := range [][]string{{"extra"}, {"--role", "a/b"}, {"--timeout", "0s"}, {"--nope"}} {
		if _, err := ParseFlags(args, &stderr); err == nil {
			t.Errorf("ParseFlags(%q) accepted", args)
		}
	}
	if o, _ := ParseFlags(nil, &stderr); o.Socket != DefaultSocket {
		t.Errorf("default socket %q", o.Socket)
	}
}

// TestFetchNoDaemon: the one-line error says where it looked.
func TestFetchNoDaemon(t *testing.T) {
	_, err := Fetch(t.Context(), Options{Socket: filepath.Join(t.TempDir(), "none.sock"), Timeout: time.Second})
	if err == nil || !strings.Contains(err.Error(), "cannot reach the daemon") || strings.Contains(err.Error(), "\n") {
		t.Errorf("Fetch without a daemon: %v", err)
	}
}

func TestParseResponse(t *testing.T) {
	now := time.Date(2026, 12, 7, 12, 0, 0, 0, time.UTC)
	good := Document{Version: 1, AccessKeyID: "ASIAEXAMPLE000000000", SecretAccessKey: "s/e+c", SessionToken: "t==", Expiration: "2026-12-07T13:00:00Z", AccountID: "222222222222"}
	line := func(v any) []byte { b, _ := json.Marshal(v); return append(b, '\n') }
	bad := func(f func(*Document)) []byte {
		d := good
		f(&d)
		return line(Response{Version: 1, Credentials: &d})
	}
	for _, tc := range []struct {
		name string
		raw  []byte
		err  string
		code string
	}{
		{"credentials", line(Response{Version: 1, Credentials: &good}), "", ""},
		{"an error", line(Response{Version: 1, Error: &Error{Code: "access_denied", Message: "no\nway"}}), "access_denied: no way", "access_denied"},
		{"both", line(Response{Version: 1, Credentials: &good, Error: &Error{Code: "x"}}), "neither", ""},
		{"neither", line(Response{Version: 1}), "neither", ""},
		{"version 2", line(Response{Version: 2, Credentials: &good}), "protocol version 2", ""},
		{"no newline", bytes.TrimSuffix(line(Response{Version: 1, Credentials: &good}), []byte("\n")), "not the protocol", ""},
		{"trailing", append(line(Response{Version: 1, Credentials: &good}), 'x'), "not the protocol", ""},
		{"unknown field", []byte(`{"version":1,"extra":1}` + "\n"), "not the protocol", ""},
		{"expired", bad(func(d *Document) { d.Expiration = "2026-12-07T11:59:59Z" }), "expired", ""},
		{"fractional expiry", bad(func(d *Document) { d.Expiration = "2026-12-07T13:00:00.5Z" }), "Expiration", ""},
		{"no key id", bad(func(d *Document) { d.AccessKeyID = "" }), "AccessKeyId", ""},
		{"key id with a quote", bad(func(d *Document) { d.AccessKeyID = "ASIA\"0000000000000" }), "AccessKeyId", ""},
		{"secret with a space", bad(func(d *Document) { d.SecretAccessKey = "a b" }), "SecretAccessKey", ""},
		{"no session token", bad(func(d *Document) { d.SessionToken = "" }), "SessionToken", ""},
		{"session token with a space", bad(func(d *Document) { d.SessionToken = "t= =" }), "SessionToken", ""},
		{"session token with a control character", bad(func(d *Document) { d.SessionToken = "t\x01==" }), "SessionToken", ""},
		{"session token with a non-ASCII byte", bad(func(d *Document) { d.SessionToken = "t\u00e9==" }), "SessionToken", ""},
		{"bad account", bad(func(d *Document) { d.AccountID = "12" }), "AccountId", ""},
		{"inner version 2", bad(func(d *Document) { d.Version = 2 }), "version 2", ""},
		{"too long", append(bytes.Repeat([]byte(" "), MaxResponse), '\n'), "longer than 1048576 bytes", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d, code, err := ParseResponse(tc.raw, now)
			if tc.err == "" {
				if err != nil || d != good {
					t.Fatalf("ParseResponse = %+v, %v", d, err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.err) || code != tc.code || strings.Contains(err.Error(), "\n") {
				t.Fatalf("ParseResponse error %v (code %q), want one line with %q (code %q)", err, code, tc.err, tc.code)
			}
		})
	}
}

// TestParseResponseSessionTokenNotCapped: the session token has no length
// cap of its own (WIRE.md §6.3: "The session-token size is not fixed, so do
// not cap it"; STS pads it with MinimumSessionTokenSize and grows it with
// session tags and policies). Only the whole answer is bounded, by
// MaxResponse.
func TestParseResponseSessionTokenNotCapped(t *testing.T) {
	now := time.Date(2026, 12, 7, 12, 0, 0, 0, time.UTC)
	for _, n := range []int{4096, 8192, 8193, 16 << 10, 16<<10 + 1, 20_000, 64 << 10, MaxResponse - 1024} {
		d := Document{Version: 1, AccessKeyID: "ASIAEXAMPLE000000000", SecretAccessKey: "s/e+c",
			SessionToken: sessionToken(n), Expiration: "2026-12-07T13:00:00Z", AccountID: "222222222222"}
		raw, _ := jsonLine(Response{Version: 1, Credentials: &d})
		got, _, err := ParseResponse(raw, now)
		if err != nil || got.SessionToken != d.SessionToken {
			t.Errorf("a %d-byte session token: %v", n, err)
		}
	}
}

// TestServeShareByUID: connections of one uid that never send their
// request cannot hold every slot: once more than half are taken, a uid
// holding a quarter has its next connections closed at once, and another
// uid's request is answered at once.
func TestServeShareByUID(t *testing.T) {
	const hostile = "@imdsproxy-test-hostile-" // abstract socket names of its connections
	e := newEnv(t, func(s *Server) {
		s.owner = func(c net.Conn) (uint32, bool) {
			if strings.HasPrefix(c.RemoteAddr().String(), hostile) {
				return 64105, true
			}
			return 0, true
		}
	})
	e.as(peer.Info{UID: 1000}, nil)
	var held []net.Conn
	defer func() {
		for _, c := range held {
			c.Close()
		}
	}()
	raddr := &net.UnixAddr{Name: e.socket, Net: "unix"}
	for i := range MaxConns + 8 {
		laddr := &net.UnixAddr{Name: fmt.Sprintf("%s%d-%d", hostile, os.Getpid(), i), Net: "unix"}
		c, err := net.DialUnix("unix", laddr, raddr)
		if err != nil {
			t.Fatalf("hostile connection %d: %v", i+1, err)
		}
		held = append(held, c) // silent: its request never comes
	}
	// Another uid's request, while the hostile connections are held (the
	// server waits 2 s for their request lines).
	start := time.Now()
	c, err := net.Dial("unix", e.socket)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write([]byte("{\"version\":1}\n")); err != nil {
		t.Fatal(err)
	}
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	line, err := bufio.NewReader(c).ReadBytes('\n')
	if err != nil {
		t.Fatalf("another uid's request with %d silent connections of one uid: %v", len(held), err)
	}
	if took := time.Since(start); took > time.Second {
		t.Errorf("another uid's request answered after %v, want at once (not after the held ones time out)", took)
	}
	var resp Response
	if err := decodeLine(line, &resp); err != nil || resp.Credentials == nil {
		t.Errorf("answered %q (%v), want credentials", line, err)
	}
	// The hostile ones beyond its share were closed at once, unanswered;
	// the others get their bad-request answer when their 2 s run out.
	want := MaxConns + 8 - (MaxConns/2 + 1 + MaxConns/4)
	closed := 0
	for _, c := range held {
		_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
		if _, err := c.Read(make([]byte, 1)); errors.Is(err, io.EOF) {
			closed++
		}
	}
	if closed != want {
		t.Errorf("%d hostile connections closed unanswered, want %d", closed, want)
	}
	if v := testutil.ToFloat64(e.srv.overShare); v != float64(want) {
		t.Errorf("imdsproxy_process_connections_over_share_total %v, want %d", v, want)
	}
}

// TestUnixOwner: the owner of a unix connection is its peer's uid, or,
// when that uid is delegated to a user (subuid(5)), that user's.
func TestUnixOwner(t *testing.T) {
	a, b, err := socketPair()
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	defer b.Close()
	if uid, ok := unixOwner(nil)(a); !ok || int(uid) != os.Getuid() {
		t.Errorf("unixOwner = %d, %v; want %d", uid, ok, os.Getuid())
	}
	if _, ok := unixOwner(nil)(&net.TCPConn{}); ok {
		t.Error("a TCP connection has a unix owner")
	}
	dir := t.TempDir()
	passwd, subuid := filepath.Join(dir, "passwd"), filepath.Join(dir, "subuid")
	if err := os.WriteFile(passwd, []byte("alice:x:61000:61000::/:/bin/sh\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	line := fmt.Sprintf("alice:%d:1\n", os.Getuid()) // this test's uid, delegated to alice
	if err := os.WriteFile(subuid, []byte(line), 0o644); err != nil {
		t.Fatal(err)
	}
	var s Server
	s.MapUsers(peer.NewUsers(subuid, passwd, nil))
	if uid, ok := s.owner(a); !ok || uid != 61000 {
		t.Errorf("with the uid delegated to alice: owner %d, %v; want 61000", uid, ok)
	}
}

// socketPair is a connected pair of unix stream connections.
func socketPair() (*net.UnixConn, *net.UnixConn, error) {
	dir, err := os.MkdirTemp("", "credproc-pair")
	if err != nil {
		return nil, nil, err
	}
	defer os.RemoveAll(dir)
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: dir + "/s", Net: "unix"})
	if err != nil {
		return nil, nil, err
	}
	defer ln.Close()
	a, err := net.DialUnix("unix", nil, ln.Addr().(*net.UnixAddr))
	if err != nil {
		return nil, nil, err
	}
	b, err := ln.AcceptUnix()
	if err != nil {
		a.Close()
		return nil, nil, err
	}
	return a, b, nil
}
