package bench

import (
	"bufio"
	"bytes"
	"fmt"
	"maps"
	"net"
	"net/http"
	"os"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/imdsproxy/imdsproxy/test/e2e"
)

// The raw replay answers the ceiling's three requests with the same bytes
// from a hand-written HTTP/1.1 loop instead of net/http's server: one
// goroutine and one buffered reader per connection, a request read as
// lines up to the empty one, the answer written in one write. It parses
// only the request line and the names of the headers it checks (the token
// and TTL headers, as the ceiling does), reads no body and checks nothing
// else: not a server anyone should run, only the measure of what net/http's
// server costs per request on this machine (docs/benchmarks.md, "What
// net/http costs").

// maxRawRequest bounds one request's line and headers.
const maxRawRequest = 8 << 10

// startRaw starts the raw replay and checks its answers against the
// daemon's, as the ceiling's; it returns why not ("" when it runs).
func (e *benchEnv) startRaw() (*server, string) {
	s, err := e.startCeiling("raw")
	if err != nil {
		return nil, err.Error()
	}
	tok, err := e.checkCeiling(s)
	if err != nil {
		s.stop()
		return nil, err.Error()
	}
	s.role, s.tok = e2e.RoleName, tok
	return s, ""
}

// rawAnswer is a response as bytes: its head up to the Date header (which
// is added per write), and its body.
type rawAnswer struct{ head, body []byte }

func newRawAnswer(r *wireResponse) rawAnswer {
	var b bytes.Buffer
	fmt.Fprintf(&b, "HTTP/1.1 %d %s\r\n", r.Status, http.StatusText(r.Status))
	keys := slices.Sorted(maps.Keys(r.Header))
	for _, k := range keys {
		if k == "Content-Length" || k == "Date" {
			continue
		}
		for _, v := range r.Header[k] {
			fmt.Fprintf(&b, "%s: %s\r\n", k, v)
		}
	}
	fmt.Fprintf(&b, "Content-Length: %d\r\n", len(r.Body))
	return rawAnswer{head: b.Bytes(), body: r.Body}
}

// serveRaw serves the raw replay on ln until the process is killed.
func serveRaw(ln net.Listener, w *wireSample, credsPath string) int {
	token, listing, creds := newRawAnswer(&w.Token), newRawAnswer(&w.Listing), newRawAnswer(&w.Creds)
	text := http.Header{"Content-Type": {"text/plain"}}
	notFound := newRawAnswer(&wireResponse{Status: http.StatusNotFound, Header: text, Body: []byte("not found")})
	refused := newRawAnswer(&wireResponse{Status: http.StatusUnauthorized, Header: text, Body: []byte("unauthorized")})
	var date atomic.Pointer[[]byte]
	setDate := func() {
		d := []byte("Date: " + time.Now().UTC().Format(http.TimeFormat) + "\r\n\r\n")
		date.Store(&d)
	}
	setDate()
	go func() {
		for range time.Tick(100 * time.Millisecond) {
			setDate()
		}
	}()
	for {
		c, err := ln.Accept()
		if err != nil {
			fmt.Fprintln(os.Stderr, "raw:", err)
			return 1
		}
		go func() {
			defer c.Close()
			br := bufio.NewReaderSize(c, 4096)
			out := make([]byte, 0, 4096)
			for {
				method, path, hasToken, hasTTL, ok := readRawRequest(br)
				if !ok {
					return
				}
				a := notFound
				switch {
				case method == http.MethodPut && path == e2e.TokenPath:
					if a = token; !hasTTL {
						a = refused
					}
				case method == http.MethodGet && path == e2e.CredentialsPath:
					if a = listing; !hasToken {
						a = refused
					}
				case method == http.MethodGet && path == credsPath:
					if a = creds; !hasToken {
						a = refused
					}
				}
				out = append(append(append(out[:0], a.head...), *date.Load()...), a.body...)
				if _, err := c.Write(out); err != nil {
					return
				}
			}
		}()
	}
}

// readRawRequest reads one request's line and headers (no body: none of the
// replayed requests has one) and reports its method, path and whether it
// carries the token and TTL headers; false at EOF or on anything it cannot
// read.
func readRawRequest(br *bufio.Reader) (method, path string, hasToken, hasTTL, ok bool) {
	n := 0
	for first := true; ; first = false {
		line, err := br.ReadSlice('\n')
		if n += len(line); err != nil || n > maxRawRequest {
			return "", "", false, false, false
		}
		line = bytes.TrimRight(line, "\r\n")
		if first {
			f := bytes.Fields(line)
			if len(f) != 3 {
				return "", "", false, false, false
			}
			method, path = string(f[0]), string(f[1])
			continue
		}
		if len(line) == 0 {
			return method, path, hasToken, hasTTL, true
		}
		name, _, _ := bytes.Cut(line, []byte(":"))
		switch {
		case bytes.EqualFold(name, []byte(e2e.TTLHeader)):
			hasTTL = true
		case bytes.EqualFold(name, []byte(e2e.TokenHeader)):
			hasToken = true
		}
	}
}

// TestReadRawRequest: the raw replay reads pipelined requests one at a
// time, finds the token and TTL headers whatever their case, and gives up
// on a malformed request line, an oversized head or EOF.
func TestReadRawRequest(t *testing.T) {
	in := "GET /latest/meta-data/iam/security-credentials/app HTTP/1.1\r\nHost: x\r\nx-aws-ec2-metadata-token: t\r\n\r\n" +
		"PUT /latest/api/token HTTP/1.1\r\nX-AWS-EC2-METADATA-TOKEN-TTL-SECONDS: 60\r\n\r\n" +
		"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
	br := bufio.NewReader(strings.NewReader(in))
	for i, want := range []struct {
		method, path     string
		hasToken, hasTTL bool
	}{
		{"GET", "/latest/meta-data/iam/security-credentials/app", true, false},
		{"PUT", "/latest/api/token", false, true},
		{"GET", "/", false, false},
	} {
		m, p, tok, ttl, ok := readRawRequest(br)
		if !ok || m != want.method || p != want.path || tok != want.hasToken || ttl != want.hasTTL {
			t.Fatalf("request %d: %q %q token %v ttl %v ok %v, want %+v", i, m, p, tok, ttl, ok, want)
		}
	}
	if _, _, _, _, ok := readRawRequest(br); ok {
		t.Fatal("a request read at EOF")
	}
	for name, bad := range map[string]string{
		"malformed line": "GET /\r\n\r\n",
		"oversized head": "GET / HTTP/1.1\r\nX: " + strings.Repeat("a", maxRawRequest) + "\r\n\r\n",
		"unterminated":   "GET / HTTP/1.1\r\nHost: x\r\n",
	} {
		if _, _, _, _, ok := readRawRequest(bufio.NewReader(strings.NewReader(bad))); ok {
			t.Errorf("%s: read as a request", name)
		}
	}
}
