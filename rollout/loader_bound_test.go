package rollout

import (
	"context"
	"crypto/ed25519"
	"github.com/imdsproxy/imdsproxy/exchange"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/credentials"
)

// hugeBody is the size of a misbehaving policy source's answer.
const hugeBody = 300 << 20

// maxServed bounds what a client that stops at its limit lets the server
// write: its limit, plus what the socket buffers and the HTTP layers hold.
const maxServed = 32 << 20

// streamer answers requests whose path ends in suffix with hugeBody bytes
// of YAML comment, 32 KiB at a time until the client stops reading, and
// counts what it got written; other paths get small.
type streamer struct {
	suffix     string
	small      string
	withLength bool

	served atomic.Int64
	wg     sync.WaitGroup
}

func (s *streamer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if !strings.HasSuffix(r.URL.Path, s.suffix) {
		_, _ = w.Write([]byte(s.small))
		return
	}
	s.wg.Add(1)
	defer s.wg.Done()
	if s.withLength {
		w.Header().Set("Content-Length", strconv.Itoa(hugeBody))
	}
	chunk := []byte("#" + strings.Repeat("a", 32<<10-2) + "\n")
	for n := 0; n < hugeBody; n += len(chunk) {
		m, err := w.Write(chunk)
		s.served.Add(int64(m))
		if err != nil {
			return
		}
	}
}

func (s *streamer) wait(t *testing.T) int64 {
	t.Helper()
	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		t.Fatalf("the server is still writing after %d bytes: the loader did not stop reading", s.served.Load())
	}
	return s.served.Load()
}

// TestLoaderBodyBounded: a policy (or signature) source answering 300 MB,
// over https or S3, with or without Content-Length, is refused as
// too_large (a signature as bad_signature) after at most its limit is
// read: the read stops early and memory stays bounded.
func TestLoaderBodyBounded(t *testing.T) {
	pub, priv := newKey(t)
	sig := string(SignPolicy(priv, []byte(policyV1)))
	for _, tc := range []struct {
		name     string
		s3       bool
		huge     string // ".yaml" (the policy) or ".sig"
		length   bool
		keys     bool
		reason   string
		inReason string
	}{
		{"https policy streamed", false, ".yaml", false, false, ReasonTooLarge, "larger than"},
		{"https policy with length", false, ".yaml", true, false, ReasonTooLarge, "larger than"},
		{"https signature streamed", false, ".sig", false, true, ReasonBadSignature, "larger than"},
		{"s3 policy streamed", true, ".yaml", false, false, ReasonTooLarge, "larger than"},
		{"s3 policy with length", true, ".yaml", true, false, ReasonTooLarge, "larger than"},
		{"s3 signature streamed", true, ".sig", false, true, ReasonBadSignature, "larger than"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			small := policyV1
			if tc.huge == ".yaml" {
				small = sig
			}
			s := &streamer{suffix: tc.huge, small: small, withLength: tc.length}
			srv := httptest.NewServer(s)
			t.Cleanup(srv.Close)
			var opts LoaderOptions
			source := srv.URL + "/fleet/rollout.yaml"
			if tc.s3 {
				isolateAWS(t, srv.URL)
				g, err := exchange.NewS3Objects(context.Background(), credentials.NewStaticCredentialsProvider("AKIDROLLOUTTEST", "s", ""), "us-east-1")
				if err != nil {
					t.Fatal(err)
				}
				opts.S3, source = g, "s3://fleet/rollout.yaml"
			}
			if tc.keys {
				opts.PolicyKeys = []ed25519.PublicKey{pub}
			}
			l, err := NewLoader(source, opts, nil, nil)
			if err != nil {
				t.Fatal(err)
			}
			var before, after runtime.MemStats
			runtime.ReadMemStats(&before)
			err = l.Load(context.Background())
			runtime.ReadMemStats(&after)
			if reasonOf(err) != tc.reason || !strings.Contains(err.Error(), tc.inReason) {
				t.Fatalf("Load = %v, want reason %s", err, tc.reason)
			}
			if served := s.wait(t); served > maxServed {
				t.Fatalf("the loader read on: %d bytes served of %d", served, hugeBody)
			}
			alloc := after.TotalAlloc - before.TotalAlloc
			t.Logf("%d bytes served, %d allocated", s.served.Load(), alloc)
			if alloc > maxServed {
				t.Fatalf("%d bytes allocated for one refused load", alloc)
			}
		})
	}
}
