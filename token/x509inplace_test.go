package token

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	cryptorand "crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
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
	"go.uber.org/zap/zaptest/observer"

	"github.com/imdsproxy/imdsproxy/test/fakes/rolesanywhere"
)

// verifyPair signs a digest with signer and verifies the signature with the
// public key of leaf: it fails unless the two belong together.
func verifyPair(leaf *x509.Certificate, signer crypto.Signer) error {
	digest := sha256.Sum256([]byte(leaf.SerialNumber.String()))
	sig, err := signer.Sign(cryptorand.Reader, digest[:], crypto.SHA256)
	if err != nil {
		return fmt.Errorf("sign: %w", err)
	}
	switch pub := leaf.PublicKey.(type) {
	case *rsa.PublicKey:
		if err := rsa.VerifyPKCS1v15(pub, crypto.SHA256, digest[:], sig); err != nil {
			return fmt.Errorf("certificate %s: RSA signature does not verify: %w", leaf.SerialNumber, err)
		}
	case *ecdsa.PublicKey:
		if !ecdsa.VerifyASN1(pub, digest[:], sig) {
			return fmt.Errorf("certificate %s: ECDSA signature does not verify", leaf.SerialNumber)
		}
	default:
		return fmt.Errorf("certificate %s: unexpected public key %T", leaf.SerialNumber, pub)
	}
	return nil
}

// wallDrift returns how far the wall clock has moved from the monotonic
// clock since start: more than a second means the machine's clock was
// stepped (another test on the machine, NTP).
func wallDrift(start time.Time) time.Duration {
	d := time.Now().Round(0).Sub(start.Round(0)) - time.Since(start)
	return max(d, -d)
}

// TestX509InPlaceRewrite: an agent rewrites the certificate in place in
// small chunks (now and then stopping half-way for longer than ChangeWait),
// stops for longer than ChangeWait with the new certificate next to the old
// key, then rewrites the key in place, while many goroutines load and sign.
// Every identity returned is a matching pair of one of the leaves written
// (its signature verifies with the certificate's key), no call fails (the
// identity loaded before is served while the files are being rewritten,
// and those loads count as changing), and once the agent stops the next
// call returns its last identity.
func TestX509InPlaceRewrite(t *testing.T) {
	l0 := issue(t, rolesanywhere.LeafOptions{Key: rolesanywhere.ECP256})
	pool := []*rolesanywhere.Leaf{
		issue(t, rolesanywhere.LeafOptions{Key: rolesanywhere.ECP256}),
		issue(t, rolesanywhere.LeafOptions{Key: rolesanywhere.ECP384, Format: rolesanywhere.SEC1}),
		issue(t, rolesanywhere.LeafOptions{Key: rolesanywhere.RSA2048, Format: rolesanywhere.PKCS1}),
		issue(t, rolesanywhere.LeafOptions{Key: rolesanywhere.ECP256}),
	}
	known := map[string]bool{l0.Cert.SerialNumber.String(): true}
	for _, l := range pool {
		known[l.Cert.SerialNumber.String()] = true
	}
	cert, key, chain := identityFiles(t, l0)
	settleFiles(t, cert, key, chain)
	reg := prometheus.NewPedanticRegistry()
	core, logs := observer.New(zap.InfoLevel)
	x, err := NewX509(cert, key, chain, X509Options{}, zap.New(core), reg)
	if err != nil {
		t.Fatal(err)
	}

	// Youth is judged by mtime against the wall clock: a step of the
	// machine's clock while files are torn makes them look settled (as for
	// File). The loaders watch for one.
	start := time.Now()
	var stepped atomic.Bool
	var (
		done                   atomic.Bool
		served, failed, signed atomic.Int64
		mu                     sync.Mutex
		seen                   = map[string]int{}
		firstErr               error
	)
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for !done.Load() {
				if wallDrift(start) > time.Second {
					stepped.Store(true)
				}
				leaf, _, signer, err := x.X509(context.Background())
				if err != nil {
					failed.Add(1)
					mu.Lock()
					if firstErr == nil {
						firstErr = err
					}
					mu.Unlock()
					continue
				}
				served.Add(1)
				if !known[leaf.SerialNumber.String()] {
					t.Errorf("served certificate serial %s, which was never written whole", leaf.SerialNumber)
					return
				}
				if err := verifyPair(leaf, signer); err != nil {
					t.Errorf("mismatched pair served: %v", err)
					return
				}
				signed.Add(1)
				mu.Lock()
				seen[leaf.SerialNumber.String()]++
				mu.Unlock()
				time.Sleep(time.Millisecond)
			}
		})
	}

	rng := rand.New(rand.NewPCG(7, 11))
	hold := ChangeWait + 150*time.Millisecond
	var writeErr error
	for i, l := range pool {
		holdAt := -1
		if i%2 == 1 {
			holdAt = len(l.CertPEM) / 2 // a long stop half-way through the certificate
		}
		if writeErr = rewriteInPlace(cert, string(l.CertPEM), rng, 64, 2*time.Millisecond, holdAt, hold); writeErr != nil {
			break
		}
		time.Sleep(hold) // the new certificate next to the old key
		if writeErr = rewriteInPlace(key, string(l.KeyPEM), rng, 48, 2*time.Millisecond, len(l.KeyPEM)/3, hold/2); writeErr != nil {
			break
		}
		time.Sleep(100 * time.Millisecond) // the complete pair, for a while
	}
	if writeErr != nil {
		done.Store(true)
		wg.Wait()
		t.Fatal(writeErr)
	}

	// The agent is done: its last identity is picked up.
	last := pool[len(pool)-1].Cert.SerialNumber.String()
	deadline := time.Now().Add(10 * time.Second)
	for {
		leaf, _, signer, err := x.X509(context.Background())
		if err == nil && leaf.SerialNumber.String() == last && verifyPair(leaf, signer) == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the last identity written is not served 10s after the writer stopped (err %v)", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	done.Store(true)
	wg.Wait()

	changing := testutil.ToFloat64(metricVec(t, reg).WithLabelValues(ReasonChanging))
	ok := testutil.ToFloat64(metricVec(t, reg).WithLabelValues("ok"))
	t.Logf("%d identities served and signed with, %d calls failed; loads ok %v, changing %v; serials seen %v",
		signed.Load(), failed.Load(), ok, changing, seen)
	if stepped.Load() || wallDrift(start) > time.Second {
		// The pairs served were checked above; what the files' age decides
		// is not meaningful across a clock step.
		t.Skipf("SKIPPED LOUDLY: the machine's wall clock was stepped during the test (%d calls failed, first: %v)", failed.Load(), firstErr)
	}
	if n := failed.Load(); n != 0 {
		t.Errorf("%d calls failed while a good identity was loaded; first: %v", n, firstErr)
	}
	if served.Load() == 0 {
		t.Fatal("no identity served")
	}
	// Each cycle leaves the new certificate next to the old key for longer
	// than ChangeWait while the loaders keep calling.
	if changing < float64(len(pool)) {
		t.Errorf("loads_total{result=changing} = %v, want >= %d", changing, len(pool))
	}
	if ok < 2 || ok > float64(1+len(pool)) {
		t.Errorf("loads_total{result=ok} = %v, want 2..%d (each complete identity loaded at most once)", ok, 1+len(pool))
	}
	for _, r := range []string{ReasonCertInvalid, ReasonKeyInvalid, ReasonKeyMismatch} {
		if n := testutil.ToFloat64(metricVec(t, reg).WithLabelValues(r)); n != 0 {
			t.Errorf("loads_total{result=%s} = %v: a file being rewritten was refused as permanent", r, n)
		}
	}
	if logs.FilterMessage("X.509 identity files are being rewritten; the identity loaded before stays in use").Len() == 0 {
		t.Error("no log line for the identity kept while the files are rewritten")
	}
	for _, e := range logs.All() {
		for _, l := range append(pool, l0) {
			for _, line := range secretLines(l.KeyPEM) {
				if strings.Contains(fmt.Sprint(e.Message, e.ContextMap()), line) {
					t.Fatalf("a log line quotes the private key: %s", e.Message)
				}
			}
		}
	}
}

// TestX509ChangingWithoutIdentity: with no identity loaded yet, files being
// written are refused as changing (transient), also by NewX509; once left
// alone for SettleTime the same content is refused permanently.
func TestX509ChangingWithoutIdentity(t *testing.T) {
	l := issue(t, rolesanywhere.LeafOptions{Key: rolesanywhere.ECP256})
	other := issue(t, rolesanywhere.LeafOptions{Key: rolesanywhere.ECP256})
	for _, tc := range []struct {
		name      string
		cert, key []byte
		reason    string // once settled
		path      string // "cert" or "key": the file the errors name
	}{
		{"torn key", l.CertPEM, l.KeyPEM[:len(l.KeyPEM)/2], ReasonKeyInvalid, "key"},
		{"torn certificate", l.CertPEM[:len(l.CertPEM)-40], l.KeyPEM, ReasonCertInvalid, "cert"},
		{"empty certificate", nil, l.KeyPEM, ReasonCertInvalid, "cert"},
		{"new certificate, old key", l.CertPEM, other.KeyPEM, ReasonKeyMismatch, "key"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			paths := map[string]string{"cert": filepath.Join(dir, "cert.pem"), "key": filepath.Join(dir, "key.pem")}
			if err := os.WriteFile(paths["cert"], tc.cert, 0o644); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(paths["key"], tc.key, 0o600); err != nil {
				t.Fatal(err)
			}
			reg := prometheus.NewPedanticRegistry()
			core, logs := observer.New(zap.InfoLevel)
			start := time.Now()
			x, err := NewX509(paths["cert"], paths["key"], "", X509Options{}, zap.New(core), reg)
			if err != nil {
				t.Fatalf("NewX509 while the files are being written: %v", err)
			}
			if took := time.Since(start); took < ChangeWait/2 {
				t.Errorf("NewX509 gave up after %v, want about ChangeWait of re-reads", took)
			}
			if logs.FilterMessage("X.509 identity files are being written; they are loaded when they settle").Len() != 1 {
				t.Errorf("no Warn line at construction: %v", logs.All())
			}
			_, _, _, err = x.X509(context.Background())
			var te *Error
			if !errors.As(err, &te) || te.Reason != ReasonChanging || te.Permanent() || te.ErrorClass() != ErrorClassIdentity {
				t.Fatalf("X509 = %v, want a transient changing error", err)
			}
			if te.Path != paths[tc.path] || !strings.Contains(err.Error(), tc.reason) || !strings.Contains(err.Error(), "atomically") {
				t.Errorf("error %q does not name %s and the reason %s", err, paths[tc.path], tc.reason)
			}
			assertNoPEM(t, err, l.KeyPEM, other.KeyPEM)
			if n := testutil.ToFloat64(metricVec(t, reg).WithLabelValues(ReasonChanging)); n != 2 {
				t.Errorf("loads_total{result=changing} = %v, want 2", n)
			}

			// Left alone for SettleTime: the same content is final.
			settleFiles(t, paths["cert"], paths["key"])
			_, _, _, err = x.X509(context.Background())
			if !errors.As(err, &te) || te.Reason != tc.reason || !te.Permanent() || te.Path != paths[tc.path] {
				t.Fatalf("settled: %v, want a permanent %s error naming %s", err, tc.reason, paths[tc.path])
			}
			if n := testutil.ToFloat64(metricVec(t, reg).WithLabelValues(tc.reason)); n != 1 {
				t.Errorf("loads_total{result=%s} = %v, want 1", tc.reason, n)
			}
		})
	}
}

// TestX509SettledIdentity: an identity loaded from files modified within
// SettleTime is re-read on every call (its stamps may not change when its
// content does) and compared by digest, without counting a new load; once
// the files are left alone it is trusted by their stamps. A bad rewrite
// after that is permanent at once when its mtime is old.
func TestX509SettledIdentity(t *testing.T) {
	l := issue(t, rolesanywhere.LeafOptions{Key: rolesanywhere.ECP256})
	cert, key, chain := identityFiles(t, l)
	reg := prometheus.NewPedanticRegistry()
	x, err := NewX509(cert, key, chain, X509Options{}, nil, reg)
	if err != nil {
		t.Fatal(err)
	}
	cached := func() *x509Identity {
		x.mu.Lock()
		defer x.mu.Unlock()
		return x.cached
	}
	if id := cached(); id == nil || id.settled {
		t.Fatalf("fresh files: cached %+v, want an unsettled identity", id)
	}
	for range 3 {
		if leaf, _, _, err := x.X509(context.Background()); err != nil || !leaf.Equal(l.Cert) {
			t.Fatalf("X509: %v", err)
		}
	}
	settleFiles(t, cert, key, chain)
	if leaf, _, _, err := x.X509(context.Background()); err != nil || !leaf.Equal(l.Cert) {
		t.Fatalf("X509 after the files settled: %v", err)
	}
	if id := cached(); !id.settled {
		t.Error("the identity is not settled after the files were left alone")
	}
	if n := testutil.ToFloat64(metricVec(t, reg).WithLabelValues("ok")); n != 1 {
		t.Errorf("loads_total{result=ok} = %v, want 1 (the same files)", n)
	}

	// A cancelled wait for files being rewritten returns ctx's error.
	if err := os.WriteFile(key, l.KeyPEM[:40], 0o600); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), firstPause/2)
	defer cancel()
	if _, _, _, err := x.X509(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("cancelled during the re-reads: %v", err)
	}
	// Torn, then left alone: permanent, and the old identity is no longer served.
	settleFiles(t, key)
	var te *Error
	if _, _, _, err := x.X509(context.Background()); !errors.As(err, &te) || te.Reason != ReasonKeyInvalid || !te.Permanent() {
		t.Fatalf("torn key left alone: %v, want permanent key_invalid", err)
	}
}
