package bench

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/imdsproxy/imdsproxy/test/e2e"
)

// Tests of the spin generator (spin_test.go): its request bytes, its
// response framing, and its schedule and latency accounting against
// in-process servers.

// TestSpinRequestBytes checks that the spin generator writes exactly the
// bytes net/http's client writes for the same requests.
func TestSpinRequestBytes(t *testing.T) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	got := make(chan []byte, 8)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		br := bufio.NewReader(c)
		for {
			var raw bytes.Buffer
			for {
				line, err := br.ReadBytes('\n')
				raw.Write(line)
				if err != nil {
					return
				}
				if string(line) == "\r\n" {
					break
				}
			}
			got <- raw.Bytes()
			// The PUT's answer is a token; the other bodies only need to be
			// non-empty.
			if _, err := io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nabcde"); err != nil {
				return
			}
		}
	}()
	base := "http://" + ln.Addr().String()
	const role, tok = "bench-role", "AQAEAK-example-token=="
	w, err := newWorker(endpoint{base: base, role: role}, tok)
	if err != nil {
		t.Fatal(err)
	}
	defer w.c.CloseIdleConnections()
	tpl, err := newSpinTemplates(base, role)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		r  spinReq
		do func() error
	}{
		{spinPut, w.putToken},
		{spinListing, func() error { return w.do(w.listing) }},
		{spinCreds, w.getCreds},
	} {
		if err := c.do(); err != nil {
			t.Fatalf("%s: %v", c.r, err)
		}
		client := <-got
		spin := tpl.appendReq(nil, c.r, []byte(tok))
		if !bytes.Equal(spin, client) {
			t.Errorf("%s: spin writes\n%q\nnet/http writes\n%q", c.r, spin, client)
		}
		if c.r != spinPut && !bytes.Contains(spin, []byte(e2e.TokenHeader+": "+tok+"\r\n")) {
			t.Errorf("%s: no token header in %q", c.r, spin)
		}
	}
	if put := tpl.appendReq(nil, spinPut, nil); !bytes.Contains(put, []byte(e2e.TTLHeader+": "+requestedTTL+"\r\n")) ||
		!bytes.Contains(put, []byte("Host: "+ln.Addr().String()+"\r\n")) {
		t.Errorf("PUT lacks the TTL or Host header: %q", put)
	}
}

// TestParseSpinResponse checks the framing of responses, complete, split
// at every byte, and malformed.
func TestParseSpinResponse(t *testing.T) {
	ok := "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\ncontent-length: 11\r\nDate: x\r\n\r\nhello world"
	for i := range len(ok) {
		if _, err := parseSpinResponse([]byte(ok[:i])); err != errSpinNeedMore {
			t.Fatalf("prefix of %d bytes: got %v, want errSpinNeedMore", i, err)
		}
	}
	r, err := parseSpinResponse([]byte(ok))
	if err != nil || r.status != 200 || ok[r.bodyStart:r.end] != "hello world" || r.end != len(ok) {
		t.Fatalf("complete response: %+v, %v", r, err)
	}
	r, err = parseSpinResponse([]byte("HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n"))
	if err != nil || r.status != 401 || r.bodyStart != r.end {
		t.Errorf("401 with an empty body: %+v, %v", r, err)
	}
	r, err = parseSpinResponse([]byte("HTTP/1.1 204\r\n\r\n"))
	if err != nil || r.status != 204 {
		t.Errorf("204 without a reason or Content-Length: %+v, %v", r, err)
	}
	for _, c := range []struct{ resp, want string }{
		{"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", "Transfer-Encoding"},
		{"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nhello", "without Content-Length"},
		{"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\nx", "closes the connection"},
		{"HTTP/1.1 100 Continue\r\n\r\n", "informational"},
		{"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nxy", "after the response"},
		{"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "bad Content-Length"},
		{"HTTP/1.1 200 OK\r\nContent-Length: +1\r\n\r\nx", "bad Content-Length"},
		{"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxy", "conflicting"},
		{"HTTP/1.1 200 OK\r\nContent-Length: 99999999\r\n\r\n", "limit"},
		{"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nx", "status line"},
		{"HTTP/1.1 2x0 OK\r\nContent-Length: 1\r\n\r\nx", "status line"},
		{"HTTP/1.1 200OK\r\nContent-Length: 1\r\n\r\nx", "status line"},
		{"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "malformed header"},
		{"HTTP/1.1 200 OK\r\nX: " + strings.Repeat("a", spinMaxHeader) + "\r\n\r\n", "header longer"},
		{"HTTP/1.1 200 OK\r\nX: " + strings.Repeat("a", spinMaxHeader), "header longer"},
	} {
		if _, err := parseSpinResponse([]byte(c.resp)); err == nil || err == errSpinNeedMore || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%.60q: got %v, want an error containing %q", c.resp, err, c.want)
		}
	}
}

// fakeIMDS is an in-process IMDS for the spin generator's tests. It answers
// the token PUT with a fresh token per request, accepts on the GETs only the
// fixed token or the last token issued on the same connection, waits
// credsDelay before answering the credentials, and writes every answer in
// two parts 1 ms apart (with a Content-Length, so net/http does not chunk),
// so that responses arrive split across reads.
type fakeIMDS struct {
	role, fixedTok string
	credsDelay     time.Duration
	credsStatus    int   // 0: 200
	credsFailAfter int64 // > 0: the credential GETs after this many answer 500
	chunked        bool

	n     atomic.Int64
	creds atomic.Int64
	mu    sync.Mutex
	last  map[string]string // remote address → last token issued
}

func (f *fakeIMDS) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	reply := func(status int, body string) {
		if !f.chunked {
			w.Header().Set("Content-Length", fmt.Sprint(len(body)))
		}
		w.WriteHeader(status)
		_, _ = io.WriteString(w, body[:len(body)/2])
		w.(http.Flusher).Flush()
		time.Sleep(time.Millisecond)
		_, _ = io.WriteString(w, body[len(body)/2:])
	}
	tok := r.Header.Get(e2e.TokenHeader)
	f.mu.Lock()
	valid := tok == f.fixedTok || tok == f.last[r.RemoteAddr]
	f.mu.Unlock()
	switch {
	case r.Method == http.MethodPut && r.URL.Path == e2e.TokenPath:
		if r.Header.Get(e2e.TTLHeader) != requestedTTL {
			reply(http.StatusBadRequest, "no TTL")
			return
		}
		tok := fmt.Sprintf("token-%d", f.n.Add(1))
		f.mu.Lock()
		f.last[r.RemoteAddr] = tok
		f.mu.Unlock()
		reply(http.StatusOK, tok)
	case r.Method != http.MethodGet:
		reply(http.StatusMethodNotAllowed, "method")
	case !valid:
		reply(http.StatusUnauthorized, "bad token "+tok)
	case r.URL.Path == e2e.CredentialsPath:
		reply(http.StatusOK, f.role)
	case r.URL.Path == e2e.CredentialsPath+f.role:
		time.Sleep(f.credsDelay)
		status := cmpOr(f.credsStatus, http.StatusOK)
		if n := f.creds.Add(1); f.credsFailAfter > 0 && n > f.credsFailAfter {
			status = http.StatusInternalServerError
		}
		reply(status, `{"Code":"Success","AccessKeyId":"ASIAEXAMPLE"}`)
	default:
		reply(http.StatusNotFound, "not found")
	}
}

func cmpOr(a, b int) int {
	if a != 0 {
		return a
	}
	return b
}

// startFakeIMDS serves f on loopback for the length of the test.
func startFakeIMDS(t *testing.T, f *fakeIMDS) endpoint {
	t.Helper()
	f.role, f.fixedTok, f.last = "bench-role", "fixed-token", map[string]string{}
	s := httptest.NewServer(f)
	t.Cleanup(s.Close)
	return endpoint{base: s.URL, role: f.role}
}

// TestRunSpinFlow runs the IMDSv2 flow and the credential GET against a
// server that delays each credential answer by 20 ms: every operation
// succeeds (the token of each PUT is carried by the GETs after it, the
// listing is checked), on the schedule, and every latency is at least the
// delay.
func TestRunSpinFlow(t *testing.T) {
	const delay = 20 * time.Millisecond
	f := &fakeIMDS{credsDelay: delay}
	ep := startFakeIMDS(t, f)
	for _, name := range []string{"imdsv2-flow", "creds-get"} {
		plan := spinPlans[name]
		// 4 connections, one operation each every 100 ms, for 0.5 s.
		const conns, interval = 4, 100 * time.Millisecond
		rate := float64(conns*len(plan)) / interval.Seconds()
		res, err := runSpin(ep, f.fixedTok, os.Getpid(), conns, rate, 500*time.Millisecond, plan)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if res.Errors != 0 || res.Ops != conns*5 || res.Requests != res.Ops*len(plan) {
			t.Fatalf("%s: %d errors (first %v), %d ops, %d requests", name, res.Errors, res.FirstErr, res.Ops, res.Requests)
		}
		if res.Interval != interval {
			t.Errorf("%s: interval %s, want %s", name, res.Interval, interval)
		}
		// Each latency includes the delay; lat is sorted, so its minimum
		// is below P50.
		if res.P50 < delay || res.Max < delay {
			t.Errorf("%s: p50 %s, max %s: want at least the server's delay %s", name, res.P50, res.Max, delay)
		}
		if res.Sent+res.Late != res.Ops || res.SendP50 < 0 || res.SendMax < res.SendP99 {
			t.Errorf("%s: send lag over %d ops with %d late: p50 %s p99 %s max %s", name, res.Sent, res.Late, res.SendP50, res.SendP99, res.SendMax)
		}
		// The whole run follows the schedule: about 5 intervals, not more
		// than twice that even on a loaded machine.
		if res.Elapsed < 4*interval || res.Elapsed > 10*interval+5*time.Second {
			t.Errorf("%s: elapsed %s for 5 operations 100 ms apart", name, res.Elapsed)
		}
	}
	if f.n.Load() != 4+20 { // warm-up and timed flows
		t.Errorf("server issued %d tokens, want 24", f.n.Load())
	}
}

// TestRunSpinLatencyFromSchedule checks there is no coordinated omission:
// when the server takes 30 ms per operation but operations are due every
// 10 ms, the queue behind grows, the operations are counted late and their
// latency, from the scheduled time, grows far beyond the 30 ms of service.
func TestRunSpinLatencyFromSchedule(t *testing.T) {
	const delay, interval, ops = 30 * time.Millisecond, 10 * time.Millisecond, 10
	f := &fakeIMDS{credsDelay: delay}
	ep := startFakeIMDS(t, f)
	res, err := runSpin(ep, f.fixedTok, os.Getpid(), 1, 1/interval.Seconds(), ops*interval, spinPlans["creds-get"])
	if err != nil {
		t.Fatal(err)
	}
	if res.Ops != ops || res.Errors != 0 {
		t.Fatalf("%d ops, %d errors (first %v)", res.Ops, res.Errors, res.FirstErr)
	}
	if res.Late != ops-1 {
		t.Errorf("late %d, want %d (each operation is due before the previous one ends)", res.Late, ops-1)
	}
	// Operation k ends no sooner than (k+1)×delay after the start and was
	// due k×interval after it: the last one waited at least
	// ops×delay − (ops−1)×interval = 210 ms.
	if want := ops*delay - (ops-1)*interval; res.Max < want {
		t.Errorf("max latency %s, want at least %s (measured from the schedule)", res.Max, want)
	}
}

// TestRunSpinErrors checks that a non-200 answer counts as a failed
// operation and that a response the generator cannot frame fails the run.
func TestRunSpinErrors(t *testing.T) {
	f := &fakeIMDS{credsStatus: http.StatusInternalServerError}
	ep := startFakeIMDS(t, f)
	_, err := runSpin(ep, f.fixedTok, os.Getpid(), 2, 100, 100*time.Millisecond, spinPlans["creds-get"])
	if err == nil || !strings.Contains(err.Error(), "warm-up") || !strings.Contains(err.Error(), "status 500") {
		t.Errorf("500 on the credentials: got %v, want a warm-up error with status 500", err)
	}

	// Non-200 during the timed part: each fails its operation, and the run
	// goes on.
	g := &fakeIMDS{credsFailAfter: 2} // the two warm-up GETs succeed
	ep = startFakeIMDS(t, g)
	res, err := runSpin(ep, g.fixedTok, os.Getpid(), 2, 2/0.05, 200*time.Millisecond, spinPlans["creds-get"])
	if err != nil {
		t.Fatal(err)
	}
	if res.Ops != 8 || res.Errors != res.Ops || res.FirstErr == nil || !strings.Contains(res.FirstErr.Error(), "status 500") {
		t.Errorf("500s in the run: %d ops, %d errors, first %v; want every operation failed with status 500", res.Ops, res.Errors, res.FirstErr)
	}

	h := &fakeIMDS{chunked: true}
	ep = startFakeIMDS(t, h)
	if _, err := runSpin(ep, h.fixedTok, os.Getpid(), 1, 10, 100*time.Millisecond, spinPlans["creds-get"]); err == nil || !strings.Contains(err.Error(), "Transfer-Encoding") {
		t.Errorf("chunked answers: got %v, want a Transfer-Encoding error", err)
	}

	if _, err := runSpin(endpoint{base: "http://127.0.0.1:1", role: "r"}, "t", os.Getpid(), 1, 10, time.Second, spinPlans["creds-get"]); err == nil {
		t.Error("closed port: no error")
	}
}
