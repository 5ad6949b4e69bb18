package token

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
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
)

// rewriteInPlace truncates path and writes content in chunks of 1..maxChunk
// bytes with up to pause between them; holdAt >= 0 (a byte offset) adds a
// pause of hold there. It is what a careless token agent does.
func rewriteInPlace(path, content string, rng *rand.Rand, maxChunk int, pause time.Duration, holdAt int, hold time.Duration) error {
	fh, err := os.OpenFile(path, os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	for off := 0; off < len(content); {
		if off == holdAt {
			time.Sleep(hold)
		}
		n := min(1+rng.IntN(maxChunk), len(content)-off)
		if off < holdAt && off+n > holdAt {
			n = holdAt - off
		}
		if _, err := fh.WriteString(content[off : off+n]); err != nil {
			fh.Close()
			return err
		}
		off += n
		if pause > 0 && off != holdAt {
			time.Sleep(time.Duration(rng.Int64N(int64(pause) + 1)))
		}
	}
	return fh.Close()
}

// TestTokenInPlaceRewrite: a writer rewrites the token file in place, in
// small chunks with pauses and now and then a long stop half-way, while
// many goroutines call Token. Every token returned is one of the complete
// tokens written; every refusal is ReasonChanging (transient); once the
// writer is done, the next call returns its last token.
func TestTokenInPlaceRewrite(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "token.jwt")
	// Tokens of equal length (so that a splice of two would parse), RS256
	// and ES256, some with a trailing newline.
	var pool []string
	for i := range 6 {
		payload := map[string]any{"sub": fmt.Sprintf("host-%d", i), "exp": testNow.Add(time.Hour).Unix()}
		if i%2 == 0 {
			pool = append(pool, makeJWTAlg(t, "RS256", 256, payload))
		} else {
			pool = append(pool, makeJWTAlg(t, "ES256", 64, payload)+"\n")
		}
	}
	complete := map[string]bool{}
	for _, p := range pool {
		complete[strings.TrimSpace(p)] = true
	}
	write(t, path, pool[0])
	reg := prometheus.NewPedanticRegistry()
	f, err := NewFile(path, FileOptions{Now: func() time.Time { return testNow }}, zap.NewNop(), reg)
	if err != nil {
		t.Fatal(err)
	}

	stop := make(chan struct{})
	writerDone := make(chan error, 1)
	var writes, holds atomic.Int64
	last := pool[0]
	go func() {
		rng := rand.New(rand.NewPCG(1, 2))
		writerDone <- func() error {
			for i := 1; ; i++ {
				select {
				case <-stop:
					return nil
				default:
				}
				tok := pool[i%len(pool)]
				holdAt, hold := -1, time.Duration(0)
				switch rng.IntN(4) {
				case 0: // stop inside the signature for longer than ChangeWait
					holdAt = strings.LastIndexByte(tok, '.') + 1 + rng.IntN(40)
					hold = ChangeWait + time.Duration(rng.IntN(150))*time.Millisecond
					holds.Add(1)
				case 1: // stop anywhere, briefly
					holdAt = rng.IntN(len(tok))
					hold = time.Duration(5+rng.IntN(60)) * time.Millisecond
				}
				if err := rewriteInPlace(path, tok, rng, 48, 2*time.Millisecond, holdAt, hold); err != nil {
					return err
				}
				last = tok
				writes.Add(1)
				time.Sleep(time.Duration(10+rng.IntN(50)) * time.Millisecond) // complete for a while
			}
		}()
	}()

	var ok, changing, torn atomic.Int64
	var mu sync.Mutex
	var bad []string
	deadline := time.Now().Add(2 * time.Second)
	var wg sync.WaitGroup
	for range 6 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Now().Before(deadline) {
				tok, err := f.Token(context.Background())
				var te *Error
				switch {
				case err == nil && complete[tok]:
					ok.Add(1)
				case err == nil:
					torn.Add(1)
				case errors.As(err, &te) && te.Reason == ReasonChanging && !te.Permanent():
					changing.Add(1)
				default:
					mu.Lock()
					bad = append(bad, err.Error())
					mu.Unlock()
				}
			}
		}()
	}
	wg.Wait()
	close(stop)
	if err := <-writerDone; err != nil {
		t.Fatal(err)
	}
	t.Logf("%d in-place rewrites (%d held torn beyond ChangeWait); %d tokens returned, %d refused as changing", writes.Load(), holds.Load(), ok.Load(), changing.Load())
	if torn.Load() > 0 {
		t.Errorf("%d torn tokens returned", torn.Load())
	}
	if len(bad) > 0 {
		t.Fatalf("%d errors other than changing, first: %v", len(bad), bad[:min(5, len(bad))])
	}
	if ok.Load() == 0 || changing.Load() == 0 {
		t.Errorf("want both tokens and changing refusals, got %d and %d", ok.Load(), changing.Load())
	}
	if n := testutil.ToFloat64(f.reads.WithLabelValues(ReasonChanging)); n != float64(changing.Load()) {
		t.Errorf("reads_total{result=changing} = %v, want %d", n, changing.Load())
	}

	// The writer is done: the next call succeeds with its last token.
	got, err := f.Token(context.Background())
	if err != nil || got != strings.TrimSpace(last) {
		t.Fatalf("after the writer stopped: Token = %d bytes, %v; want its last token", len(got), err)
	}
}

// TestTokenTorn: content a write cut short leaves is refused as changing
// while the file is young, after re-reading for about ChangeWait, and is
// judged on its own once the file has settled.
func TestTokenTorn(t *testing.T) {
	full := makeJWT(t, map[string]any{"sub": "h", "exp": testNow.Add(time.Hour).Unix()})
	es := makeJWTAlg(t, "ES256", 64, map[string]any{"sub": "h", "exp": testNow.Add(time.Hour).Unix()})
	sig := strings.LastIndexByte(full, '.') + 1
	odd := makeJWTAlg(t, "RS256", 264, map[string]any{"sub": "h", "exp": testNow.Add(time.Hour).Unix()}) // a 2112-bit key
	for _, tc := range []struct {
		name    string
		content string
		settled string // Reason once settled, "" for the token itself
	}{
		{"nothing yet", "", ReasonEmpty},
		{"inside the header", full[:10], ReasonMalformed},
		{"at a dot", full[:sig], ReasonMalformed},
		{"inside the payload", full[:sig-20], ReasonMalformed},
		// A signature cut at a multiple of 4 characters decodes fine.
		{"inside the RS256 signature", full[:sig+(len(full)-sig)/4*4-16], ""},
		{"inside the ES256 signature", es[:len(es)-4], ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, "token.jwt")
			write(t, path, tc.content)
			reg := prometheus.NewRegistry()
			f, logs := newTestFile(t, path, reg)
			start := time.Now()
			_, err := f.Token(context.Background())
			took := time.Since(start)
			var te *Error
			if !errors.As(err, &te) || te.Reason != ReasonChanging || te.Permanent() {
				t.Fatalf("young torn file: %v, want a transient changing error", err)
			}
			if took < ChangeWait/2 || took > 5*time.Second {
				t.Errorf("refused after %v, want about ChangeWait (%v) of re-reads", took, ChangeWait)
			}
			if !strings.Contains(err.Error(), "replace it atomically") {
				t.Errorf("error %q does not say how to fix it", err)
			}
			if n := testutil.ToFloat64(f.reads.WithLabelValues(ReasonChanging)); n != 1 {
				t.Errorf("reads_total{result=changing} = %v", n)
			}
			if e := logs.FilterMessage("identity token refused").All(); len(e) != 1 || e[0].ContextMap()["reason"] != ReasonChanging {
				t.Errorf("log: %v", logs.All())
			}

			age(t, path, SettleTime+time.Second)
			tok, err := f.Token(context.Background())
			switch {
			case tc.settled == "" && (err != nil || tok != tc.content):
				t.Fatalf("settled: %v, want the token as it is", err)
			case tc.settled != "" && (!errors.As(err, &te) || te.Reason != tc.settled):
				t.Fatalf("settled: %v, want %s", err, tc.settled)
			}
		})
	}

	// An RSA key of an odd size: refused while the file is young, used once
	// it has settled (and logged).
	path := filepath.Join(t.TempDir(), "token.jwt")
	write(t, path, odd)
	f, logs := newTestFile(t, path, nil)
	var te *Error
	if _, err := f.Token(context.Background()); !errors.As(err, &te) || te.Reason != ReasonChanging {
		t.Fatalf("young, odd signature length: %v", err)
	}
	age(t, path, SettleTime+time.Second)
	if tok, err := f.Token(context.Background()); err != nil || tok != odd {
		t.Fatalf("settled, odd signature length: %v", err)
	}
	if logs.FilterMessage("identity token with an unusual signature length used: the file has not changed for a while").Len() != 1 {
		t.Errorf("no Info line for the odd signature: %v", logs.All())
	}
}

// TestTokenWriterFinishesDuringWait: a Token call that starts while the
// file is torn returns the complete token when the writer finishes within
// ChangeWait.
func TestTokenWriterFinishesDuringWait(t *testing.T) {
	path := filepath.Join(t.TempDir(), "token.jwt")
	full := validJWT(t, "h")
	write(t, path, "")
	f, _ := newTestFile(t, path, nil)
	fh, err := os.OpenFile(path, os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer fh.Close()
	if _, err := fh.WriteString(full[:len(full)-30]); err != nil {
		t.Fatal(err)
	}
	go func() {
		time.Sleep(ChangeWait / 4)
		_, _ = fh.WriteString(full[len(full)-30:])
	}()
	if tok, err := f.Token(context.Background()); err != nil || tok != full {
		t.Fatalf("Token = %d bytes, %v; want the complete token", len(tok), err)
	}
}

// TestTokenYoungFileReadTwice: a freshly written complete token is returned
// after a confirming second read; a settled one at once.
func TestTokenYoungFileReadTwice(t *testing.T) {
	path := filepath.Join(t.TempDir(), "token.jwt")
	full := validJWT(t, "h")
	write(t, path, full)
	f, _ := newTestFile(t, path, nil)
	if tok, err := f.Token(context.Background()); err != nil || tok != full {
		t.Fatalf("young: %v", err)
	}
	age(t, path, SettleTime+time.Second)
	start := time.Now()
	if tok, err := f.Token(context.Background()); err != nil || tok != full {
		t.Fatalf("settled: %v", err)
	}
	if took := time.Since(start); took >= firstPause*5 {
		t.Logf("settled read took %v (a loaded machine?)", took)
	}
}

// TestTokenChangingCancelled: a ctx that ends while Token waits for a writer
// ends the wait with ctx's error.
func TestTokenChangingCancelled(t *testing.T) {
	path := filepath.Join(t.TempDir(), "token.jwt")
	write(t, path, "")
	f, _ := newTestFile(t, path, nil)
	ctx, cancel := context.WithTimeout(context.Background(), firstPause/2)
	defer cancel()
	if _, err := f.Token(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err = %v, want context.DeadlineExceeded", err)
	}
}

func TestPlausibleSignature(t *testing.T) {
	for _, tc := range []struct {
		alg  string
		n    int
		want bool
	}{
		{"RS256", 256, true}, {"RS256", 384, true}, {"RS512", 512, true}, {"PS256", 256, true},
		{"RS256", 255, false}, {"RS256", 243, false}, {"RS256", 128, false}, {"RS256", 264, false},
		{"ES256", 64, true}, {"ES256", 63, false}, {"ES384", 96, true}, {"ES512", 132, true}, {"ES512", 130, false},
		{"EdDSA", 64, true}, {"EdDSA", 114, true}, {"EdDSA", 100, false},
		{"HS256", 32, true}, {"HS256", 31, false},
		{"XY999", 7, true}, // unknown: cannot tell
	} {
		ok, want := plausibleSignature(jwtShape{alg: tc.alg, sigLen: tc.n})
		if ok != tc.want || (!ok && want == "") {
			t.Errorf("%s %d bytes: %v %q, want %v", tc.alg, tc.n, ok, want, tc.want)
		}
	}
}

// FuzzFileJudge: whatever a token file holds, judge never panics, returns a
// token only when it parses, and says "partial" only for content a write cut
// short can leave (nothing, JWT characters, a parsed token).
func FuzzFileJudge(f *testing.F) {
	good := makeJWT(f, map[string]any{"exp": testNow.Add(time.Hour).Unix()})
	f.Add([]byte(good))
	f.Add([]byte(good[:len(good)-20]))
	f.Add([]byte(good[:40]))
	f.Add([]byte(""))
	f.Add([]byte(" \n"))
	f.Add([]byte("<html>"))
	file, err := NewFile("/nonexistent", FileOptions{Now: func() time.Time { return testNow }}, nil, nil)
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, content []byte) {
		tok, _, partial, err := file.judge(content)
		if err == nil {
			if _, perr := ParseClaims(tok); perr != nil {
				t.Fatalf("judge accepted what ParseClaims refuses: %v", perr)
			}
		} else if tok != "" {
			t.Fatal("token returned with an error")
		}
		trimmed := strings.TrimSpace(string(content))
		if partial != "" && len(content) > 0 && err != nil && !jwtPrefix(trimmed) {
			t.Fatalf("partial %q for content that no JWT starts with", partial)
		}
		if len(trimmed) >= 16 && partial != "" && strings.Contains(partial, trimmed) {
			t.Fatal("partial quotes the content")
		}
	})
}
