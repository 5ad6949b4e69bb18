//go:build linux || darwin || freebsd || netbsd || openbsd || dragonfly

package proxy

import (
	"context"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"syscall"
	"testing"
)

// hopProbe wraps the response writer and reads the socket's hop limit on
// the server side at the moment the handler writes.
type hopProbe struct {
	http.ResponseWriter
	conn   net.Conn
	mu     *sync.Mutex
	atHdr  *int
	atBody *int
}

func (p *hopProbe) WriteHeader(code int) {
	v, _ := getHopLimit(p.conn)
	p.mu.Lock()
	*p.atHdr = v
	p.mu.Unlock()
	p.ResponseWriter.WriteHeader(code)
}

func (p *hopProbe) Write(b []byte) (int, error) {
	v, _ := getHopLimit(p.conn)
	p.mu.Lock()
	*p.atBody = v
	p.mu.Unlock()
	return p.ResponseWriter.Write(b)
}

func (p *hopProbe) Unwrap() http.ResponseWriter { return p.ResponseWriter }

func TestHopLimit(t *testing.T) {
	for _, network := range []struct{ name, addr string }{{"ipv4", "127.0.0.1:0"}, {"ipv6", "[::1]:0"}} {
		t.Run(network.name, func(t *testing.T) {
			ln, err := net.Listen("tcp", network.addr)
			if err != nil {
				t.Skipf("no %s loopback: %v", network.name, err)
			}
			e := newEnv(t, Config{HopLimit: 3})
			var mu sync.Mutex
			var atHdr, atBody, before, after int
			done := make(chan struct{}, 1)
			srv := &http.Server{
				ConnContext: connAccessContext,
				Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
					c := connInfoOf(r).connection()
					b, err := getHopLimit(c)
					if err != nil {
						t.Errorf("getsockopt: %v", err)
					}
					e.s.Handler().ServeHTTP(&hopProbe{ResponseWriter: w, conn: c, mu: &mu, atHdr: &atHdr, atBody: &atBody}, r)
					a, _ := getHopLimit(c)
					mu.Lock()
					before, after = b, a
					mu.Unlock()
					done <- struct{}{}
				}),
			}
			go func() { _ = srv.Serve(ln) }()
			defer srv.Close()

			base := "http://" + ln.Addr().String()
			client := &http.Client{Transport: &http.Transport{}}
			defer client.CloseIdleConnections()
			// check sends one request on the keep-alive connection and
			// checks the hop limit while its answer is written
			// (wantDuring) and once the handler has returned (wantAfter;
			// 0: the default).
			def := 0
			check := func(method, path, ttl string, wantDuring, wantAfter int) {
				t.Helper()
				req, _ := http.NewRequest(method, base+path, nil)
				if ttl != "" {
					req.Header.Set(headerTokenTTL, ttl)
				}
				resp, err := client.Do(req)
				if err != nil {
					t.Fatal(err)
				}
				_, _ = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				<-done // the handler has returned (the response is flushed before the restore)
				mu.Lock()
				defer mu.Unlock()
				if def == 0 {
					def = before // the first request, on a fresh connection
				}
				if wantDuring == 0 {
					wantDuring = def
				}
				if wantAfter == 0 {
					wantAfter = def
				}
				if atHdr != wantDuring || atBody != wantDuring {
					t.Errorf("%s %s: hop limit %d at header, %d at body; want %d", method, path, atHdr, atBody, wantDuring)
				}
				if after != wantAfter {
					t.Errorf("%s %s: hop limit %d after the handler, want %d", method, path, after, wantAfter)
				}
			}
			// The token response keeps the limit after the handler, so a
			// retransmission carries it too...
			check("PUT", "/latest/api/token", "300", 3, 3)
			if def <= 0 || def == 3 {
				t.Fatalf("default hop limit %d: the test proves nothing", def)
			}
			// ...until the next request on the connection, whose answer
			// and everything after use the default.
			check("GET", "/latest/meta-data/iam/security-credentials/", "", 0, 0)
			check("PUT", "/latest/api/token/", "21600", 3, 3)
			// A refused PUT is not a token response: default.
			check("PUT", "/latest/api/token", "", 0, 0)
		})
	}
}

// TestHopLimitServe checks the option through Serve itself: the token PUT
// succeeds and the accepted socket is back at its default once the next
// request has come.
func TestHopLimitServe(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	rec := &recordingListener{Listener: ln}
	e := newEnv(t, Config{HopLimit: 7})
	go func() { _ = e.s.Serve(t.Context(), rec) }()
	client := &http.Client{Transport: &http.Transport{}}
	defer client.CloseIdleConnections()
	req, _ := http.NewRequest("PUT", "http://"+ln.Addr().String()+"/latest/api/token", strings.NewReader(""))
	req.Header.Set(headerTokenTTL, "300")
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("status %d", resp.StatusCode)
	}
	// A second request on the same keep-alive connection restores the
	// limit the token response left set (hoplimit.go).
	resp, err = client.Get("http://" + ln.Addr().String() + "/latest/meta-data/iam/security-credentials/")
	if err != nil {
		t.Fatal(err)
	}
	// Read to the end: a body closed unread makes the client close the
	// connection, and the server's side may be closed before it is read.
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	rec.mu.Lock()
	n := len(rec.conns)
	rec.mu.Unlock()
	if n != 1 {
		t.Fatalf("%d connections, want 1 (keep-alive)", n)
	}
	c := rec.last()
	if c == nil {
		t.Fatal("no connection accepted")
	}
	if v, err := getHopLimit(c); err != nil || v == 7 {
		t.Errorf("after the token response the hop limit is %d (%v), want the default", v, err)
	}
}

type recordingListener struct {
	net.Listener
	mu    sync.Mutex
	conns []net.Conn
}

func (l *recordingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.mu.Lock()
		l.conns = append(l.conns, c)
		l.mu.Unlock()
	}
	return c, err
}

func (l *recordingListener) last() net.Conn {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.conns) == 0 {
		return nil
	}
	return l.conns[len(l.conns)-1]
}

// TestHopLimitListenerDefault: a connection of Serve's listener restores,
// after a token response, the hop limit it was accepted with, known from
// its listener without reading the socket (initialHopser): a listener with
// a TTL of its own (systemd's IPTTL=, say) passes it on and the restore
// puts it back, not the system default; a listener without one passes
// "unset" on and the restore unsets it. Both hold for the restore of a
// second token response sent before the first's restore (deferred), which
// reading the socket would get wrong (it reads the limit itself).
func TestHopLimitListenerDefault(t *testing.T) {
	for _, tc := range []struct {
		name     string
		ttl      int // set on the listener; 0: none
		wantHops int // what the listener passes on
		want     int // the accepted connection's TTL, and after the restores; 0: the system default
	}{
		{"listener TTL 9", 9, 9, 9},
		{"listener TTL unset", 0, hopsUnset, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			lc := net.ListenConfig{Control: func(_, _ string, rc syscall.RawConn) error {
				if tc.ttl == 0 {
					return nil
				}
				var serr error
				if err := rc.Control(func(fd uintptr) { serr = syscall.SetsockoptInt(int(fd), syscall.IPPROTO_IP, syscall.IP_TTL, tc.ttl) }); err != nil {
					return err
				}
				return serr
			}}
			raw, err := lc.Listen(context.Background(), "tcp4", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			ln := limitListenerOf(t, raw, 4)
			if ln.hops4 != tc.wantHops {
				t.Fatalf("listener TTL read as %d, want %d", ln.hops4, tc.wantHops)
			}
			c := dialAccept(t, ln)
			defer c.Close()
			v, err := getHopLimit(c)
			if err != nil || tc.want != 0 && v != tc.want {
				t.Fatalf("accepted connection TTL %d (%v), want %d", v, err, tc.want)
			}
			if tc.want == 0 {
				tc.want = v // net.ipv4.ip_default_ttl
			}
			restore, err := setHopLimit(c, 1)
			if err != nil {
				t.Fatal(err)
			}
			if v, _ := getHopLimit(c); v != 1 {
				t.Fatalf("TTL %d during the token response, want 1", v)
			}
			restore2, err := setHopLimit(c, 1)
			if err != nil {
				t.Fatal(err)
			}
			if err := restore2(); err != nil {
				t.Fatal(err)
			}
			if v, _ := getHopLimit(c); v != tc.want {
				t.Fatalf("TTL %d after the second response's restore, want %d", v, tc.want)
			}
			if err := restore(); err != nil {
				t.Fatal(err)
			}
			if v, _ := getHopLimit(c); v != tc.want {
				t.Fatalf("TTL %d after both restores, want %d", v, tc.want)
			}
		})
	}
}
