package token

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// hugeBody is the size of the answers of a misbehaving issuer or IMDS.
const hugeBody = 300 << 20

// streamer answers every request with status and hugeBody bytes of 'a',
// written 32 KiB at a time until the client stops reading, and counts the
// bytes it got written.
type streamer struct {
	status     int
	ctype      string
	withLength bool

	served atomic.Int64
	wg     sync.WaitGroup
}

func (s *streamer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	s.wg.Add(1)
	defer s.wg.Done()
	if s.ctype != "" {
		w.Header().Set("Content-Type", s.ctype)
	}
	if s.withLength {
		w.Header().Set("Content-Length", strconv.Itoa(hugeBody))
	}
	w.WriteHeader(s.status)
	chunk := make([]byte, 32<<10)
	for i := range chunk {
		chunk[i] = 'a'
	}
	for n := 0; n < hugeBody; n += len(chunk) {
		m, err := w.Write(chunk)
		s.served.Add(int64(m))
		if err != nil {
			return
		}
	}
}

// wait waits for the handlers to see the client go.
func (s *streamer) wait(t *testing.T) int64 {
	t.Helper()
	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatalf("the server is still writing after %d bytes: the client did not stop reading", s.served.Load())
	}
	return s.served.Load()
}

// maxServed bounds what a client that stops at its limit lets the server
// write: its limit, plus what the socket buffers and the HTTP layers hold.
const maxServed = 32 << 20

// TestURLIssuerAnswerBounded: an issuer answering 300 MB (200 or an error
// status, with or without Content-Length) is refused after at most
// MaxTokenSize bytes are read (too_large, or issuer_failed for an error
// status): the read stops early, and memory stays bounded.
func TestURLIssuerAnswerBounded(t *testing.T) {
	for _, tc := range []struct {
		name       string
		status     int
		withLength bool
		reason     string
	}{
		{"200 streamed", 200, false, ReasonTooLarge},
		{"200 with length", 200, true, ReasonTooLarge},
		{"500 streamed", 500, false, ReasonIssuerFailed},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, imdsURL := startIMDS(t)
			s := &streamer{status: tc.status, ctype: "text/plain", withLength: tc.withLength}
			srv := httptest.NewServer(s)
			t.Cleanup(srv.Close)
			u, err := NewURL(srv.URL, URLOptions{IMDSBase: imdsURL, Timeout: 20 * time.Second}, nil, nil)
			if err != nil {
				t.Fatal(err)
			}
			var before, after runtime.MemStats
			runtime.ReadMemStats(&before)
			_, err = u.Token(context.Background())
			runtime.ReadMemStats(&after)
			var te *Error
			if !errors.As(err, &te) || te.Reason != tc.reason {
				t.Fatalf("err = %v, want reason %s", err, tc.reason)
			}
			if served := s.wait(t); served > maxServed {
				t.Fatalf("the client read on: %d bytes served of %d", served, hugeBody)
			}
			if alloc := after.TotalAlloc - before.TotalAlloc; alloc > maxServed {
				t.Fatalf("%d bytes allocated for one refused answer", alloc)
			}
		})
	}
}

// TestURLIdentityDocumentBounded: the same for IMDS answering 300 MB for
// the identity document.
func TestURLIdentityDocumentBounded(t *testing.T) {
	s := &streamer{status: 200, ctype: "text/plain"}
	mux := http.NewServeMux()
	mux.HandleFunc("PUT /latest/api/token", func(w http.ResponseWriter, r *http.Request) { _, _ = w.Write([]byte("t")) })
	mux.Handle("GET /latest/dynamic/instance-identity/document", s)
	imds := httptest.NewServer(mux)
	t.Cleanup(imds.Close)
	u, err := NewURL("http://127.0.0.1:1/v1/token", URLOptions{IMDSBase: imds.URL, Timeout: 20 * time.Second}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	_, err = u.Token(context.Background())
	var te *Error
	if !errors.As(err, &te) || te.Reason != ReasonDocumentUnavailable {
		t.Fatalf("err = %v, want reason %s", err, ReasonDocumentUnavailable)
	}
	if served := s.wait(t); served > maxServed {
		t.Fatalf("the client read on: %d bytes served", served)
	}
}
