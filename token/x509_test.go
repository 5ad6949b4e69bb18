package token

import (
	"context"
	"encoding/pem"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/imdsproxy/imdsproxy/test/fakes/rolesanywhere"
)

var (
	x509CAOnce sync.Once
	x509CA     *rolesanywhere.CA
	x509CAErr  error
)

func testX509CA(t testing.TB) *rolesanywhere.CA {
	t.Helper()
	x509CAOnce.Do(func() { x509CA, x509CAErr = rolesanywhere.NewCA() })
	if x509CAErr != nil {
		t.Fatal(x509CAErr)
	}
	return x509CA
}

func issue(t testing.TB, o rolesanywhere.LeafOptions) *rolesanywhere.Leaf {
	t.Helper()
	l, err := testX509CA(t).Issue(o)
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// identityFiles writes l into a new directory and returns the paths.
func identityFiles(t testing.TB, l *rolesanywhere.Leaf) (cert, key, chain string) {
	t.Helper()
	cert, key, chain, err := l.WriteFiles(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	return cert, key, chain
}

// settleFiles sets the modification time of the files (those not "") to
// twice SettleTime ago, so that X509 takes their content as final.
func settleFiles(t *testing.T, paths ...string) {
	t.Helper()
	for _, p := range paths {
		if p != "" {
			age(t, p, 2*SettleTime)
		}
	}
}

// secretLines returns the base64 body lines of a PEM document, each of
// which must never appear in an error or log.
func secretLines(pemBytes []byte) []string {
	var out []string
	for _, line := range strings.Split(string(pemBytes), "\n") {
		if len(line) >= 16 && !strings.HasPrefix(line, "-----") {
			out = append(out, line)
		}
	}
	return out
}

func assertNoPEM(t *testing.T, err error, docs ...[]byte) {
	t.Helper()
	for _, d := range docs {
		for _, line := range secretLines(d) {
			if strings.Contains(err.Error(), line) {
				t.Fatalf("error quotes PEM content: %v", err)
			}
			if len(line) > 24 && strings.Contains(err.Error(), line[4:20]) {
				t.Fatalf("error quotes part of the PEM content: %v", err)
			}
		}
	}
}

func TestX509Formats(t *testing.T) {
	for _, tc := range []rolesanywhere.LeafOptions{
		{Key: rolesanywhere.RSA2048, Format: rolesanywhere.PKCS8},
		{Key: rolesanywhere.RSA2048, Format: rolesanywhere.PKCS1},
		{Key: rolesanywhere.RSA4096, Format: rolesanywhere.PKCS1},
		{Key: rolesanywhere.ECP256, Format: rolesanywhere.PKCS8},
		{Key: rolesanywhere.ECP256, Format: rolesanywhere.SEC1},
		{Key: rolesanywhere.ECP384, Format: rolesanywhere.SEC1},
		{Key: rolesanywhere.ECP384, Format: rolesanywhere.PKCS8, Direct: true},
	} {
		t.Run(string(tc.Key)+"-"+string(tc.Format), func(t *testing.T) {
			l := issue(t, tc)
			cert, key, chain := identityFiles(t, l)
			x, err := NewX509(cert, key, chain, X509Options{}, nil, nil)
			if err != nil {
				t.Fatal(err)
			}
			leaf, ch, signer, err := x.X509(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			if !leaf.Equal(l.Cert) || len(ch) != len(l.Chain) || !publicKeysEqual(signer.Public(), l.Key.Public()) {
				t.Fatalf("loaded identity differs: serial %s, %d intermediates", leaf.SerialNumber, len(ch))
			}
		})
	}
}

func TestX509ChainInCertFileAndECParameters(t *testing.T) {
	l := issue(t, rolesanywhere.LeafOptions{Key: rolesanywhere.ECP256, Format: rolesanywhere.SEC1})
	dir := t.TempDir()
	cert := filepath.Join(dir, "fullchain.pem")
	key := filepath.Join(dir, "key.pem")
	// openssl ecparam -genkey writes an EC PARAMETERS block first.
	params := pem.EncodeToMemory(&pem.Block{Type: "EC PARAMETERS", Bytes: []byte{0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07}})
	if err := os.WriteFile(cert, append(append([]byte{}, l.CertPEM...), l.ChainPEM...), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(key, append(params, l.KeyPEM...), 0o600); err != nil {
		t.Fatal(err)
	}
	x, err := NewX509(cert, key, "", X509Options{}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	leaf, chain, _, err := x.X509(context.Background())
	if err != nil || !leaf.Equal(l.Cert) || len(chain) != 1 || !chain[0].Equal(l.Chain[0]) {
		t.Fatalf("leaf %v chain %d err %v", leaf != nil, len(chain), err)
	}
}

func TestX509Refused(t *testing.T) {
	good := issue(t, rolesanywhere.LeafOptions{Key: rolesanywhere.ECP256})
	other := issue(t, rolesanywhere.LeafOptions{Key: rolesanywhere.ECP256})
	rsaLeaf := issue(t, rolesanywhere.LeafOptions{Key: rolesanywhere.RSA2048})
	encrypted := pem.EncodeToMemory(&pem.Block{Type: "ENCRYPTED PRIVATE KEY", Bytes: []byte("0123456789abcdef0123456789abcdef")})
	legacy := pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY",
		Headers: map[string]string{"Proc-Type": "4,ENCRYPTED", "DEK-Info": "AES-128-CBC,00112233445566778899AABBCCDDEEFF"},
		Bytes:   []byte("0123456789abcdef0123456789abcdef")})
	half := func(b []byte) []byte { return b[:len(b)/2] }

	for _, tc := range []struct {
		name   string
		leaf   *rolesanywhere.Leaf
		cert   []byte // nil: the leaf's
		key    []byte // nil: the leaf's
		mode   os.FileMode
		reason string
		want   []string // substrings of the message
	}{
		{name: "rsa 1024", leaf: issue(t, rolesanywhere.LeafOptions{Key: rolesanywhere.RSA1024}), reason: ReasonKeyUnsupported, want: []string{"RSA key of 1024 bits"}},
		{name: "p-521", leaf: issue(t, rolesanywhere.LeafOptions{Key: rolesanywhere.ECP521}), reason: ReasonKeyUnsupported, want: []string{"P-521"}},
		{name: "ed25519", leaf: issue(t, rolesanywhere.LeafOptions{Key: rolesanywhere.Ed25519}), reason: ReasonKeyUnsupported, want: []string{"Ed25519"}},
		{name: "mode 0644", leaf: good, mode: 0o644, reason: ReasonKeyPermissions, want: []string{"0644", "chmod 600"}},
		{name: "mode 0640", leaf: good, mode: 0o640, reason: ReasonKeyPermissions, want: []string{"0640", "chmod 600"}},
		{name: "mode 0604", leaf: good, mode: 0o604, reason: ReasonKeyPermissions, want: []string{"0604"}},
		{name: "expired", leaf: issue(t, rolesanywhere.LeafOptions{Expired: true}), reason: ReasonCertExpired, want: []string{"NotAfter"}},
		{name: "not yet valid", leaf: issue(t, rolesanywhere.LeafOptions{NotYetValid: true}), reason: ReasonCertNotYetValid, want: []string{"NotBefore"}},
		{name: "mismatched key", leaf: good, key: other.KeyPEM, reason: ReasonKeyMismatch, want: []string{"does not match", good.Cert.SerialNumber.String()}},
		{name: "mismatched key type", leaf: good, key: rsaLeaf.KeyPEM, reason: ReasonKeyMismatch, want: []string{"RSA 2048 bits", "ECDSA P-256"}},
		{name: "truncated cert", leaf: good, cert: half(good.CertPEM), reason: ReasonCertInvalid, want: []string{"truncated"}},
		{name: "garbage cert", leaf: good, cert: []byte("hello world\n"), reason: ReasonCertInvalid, want: []string{"no PEM CERTIFICATE"}},
		{name: "empty cert", leaf: good, cert: []byte{}, reason: ReasonCertInvalid},
		{name: "key in cert file", leaf: good, cert: good.KeyPEM, reason: ReasonCertInvalid},
		{name: "bad DER in cert", leaf: good, cert: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: []byte("not der at all")}), reason: ReasonCertInvalid, want: []string{"not a valid X.509"}},
		{name: "truncated key", leaf: good, key: half(good.KeyPEM), reason: ReasonKeyInvalid, want: []string{"truncated"}},
		{name: "garbage key", leaf: good, key: []byte("\x00\x01garbage"), reason: ReasonKeyInvalid},
		{name: "bad DER in key", leaf: good, key: pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: []byte("0123456789abcdef0123456789abcdef")}), reason: ReasonKeyInvalid},
		{name: "cert in key file", leaf: good, key: good.CertPEM, reason: ReasonKeyInvalid, want: []string{"CERTIFICATE"}},
		{name: "two keys", leaf: good, key: append(append([]byte{}, good.KeyPEM...), other.KeyPEM...), reason: ReasonKeyInvalid, want: []string{"more than one"}},
		{name: "encrypted pkcs8", leaf: good, key: encrypted, reason: ReasonKeyInvalid, want: []string{"encrypted"}},
		{name: "encrypted legacy", leaf: good, key: legacy, reason: ReasonKeyInvalid, want: []string{"encrypted"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cert, key, chain := identityFiles(t, tc.leaf)
			if tc.cert != nil {
				if err := os.WriteFile(cert, tc.cert, 0o644); err != nil {
					t.Fatal(err)
				}
			}
			if tc.key != nil {
				if err := os.WriteFile(key, tc.key, 0o600); err != nil {
					t.Fatal(err)
				}
			}
			if tc.mode != 0 {
				if err := os.Chmod(key, tc.mode); err != nil {
					t.Fatal(err)
				}
			}
			settleFiles(t, cert, key, chain) // fresh files would be refused as changing (TestX509InPlace)
			reg := prometheus.NewPedanticRegistry()
			_, err := NewX509(cert, key, chain, X509Options{}, nil, reg)
			var te *Error
			if !errors.As(err, &te) || te.Reason != tc.reason {
				t.Fatalf("error %v, want reason %s", err, tc.reason)
			}
			if te.ErrorClass() != "identity" || !te.Permanent() {
				t.Fatalf("class %s permanent %v", te.ErrorClass(), te.Permanent())
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not mention %q", err, w)
				}
			}
			assertNoPEM(t, err, tc.leaf.KeyPEM, tc.key, other.KeyPEM, rsaLeaf.KeyPEM)
			if got := testutil.ToFloat64(metricVec(t, reg).WithLabelValues(tc.reason)); got != 1 {
				t.Errorf("loads_total{result=%q} = %v", tc.reason, got)
			}
		})
	}
}

// metricVec finds the loads counter on reg (registered by NewX509) by
// registering an identical collector: Register returns the existing one.
func metricVec(t *testing.T, reg prometheus.Registerer) *prometheus.CounterVec {
	t.Helper()
	c := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "imdsproxy_identity_certificate_loads_total",
		Help: "Loads of the X.509 identity files (on start and after every change), by result (ok or the reason they were refused).",
	}, []string{"result"})
	var are prometheus.AlreadyRegisteredError
	if err := reg.Register(c); !errors.As(err, &are) {
		t.Fatalf("loads counter not registered: %v", err)
	}
	return are.ExistingCollector.(*prometheus.CounterVec)
}

// TestX509MissingFiles: files that do not exist yet do not fail NewX509;
// X509 reports them as a transient missing error naming the file, and
// loads the identity on the first call after they appear. A path that is
// a directory, or an empty one, fails at once.
func TestX509MissingFiles(t *testing.T) {
	l := issue(t, rolesanywhere.LeafOptions{})
	src, srcKey, srcChain := identityFiles(t, l)
	for _, missing := range []string{"cert", "key", "chain", "all"} {
		t.Run(missing, func(t *testing.T) {
			dir := t.TempDir()
			paths := map[string]string{"cert": filepath.Join(dir, "cert.pem"), "key": filepath.Join(dir, "key.pem"), "chain": filepath.Join(dir, "chain.pem")}
			from := map[string]string{"cert": src, "key": srcKey, "chain": srcChain}
			put := func(which string) {
				t.Helper()
				b, err := os.ReadFile(from[which])
				if err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(paths[which], b, 0o600); err != nil {
					t.Fatal(err)
				}
			}
			for _, w := range []string{"cert", "key", "chain"} {
				if w != missing && missing != "all" {
					put(w)
				}
			}
			reg := prometheus.NewPedanticRegistry()
			core, logs := observer.New(zap.DebugLevel)
			x, err := NewX509(paths["cert"], paths["key"], paths["chain"], X509Options{}, zap.New(core), reg)
			if err != nil {
				t.Fatalf("NewX509 with %s missing: %v", missing, err)
			}
			if logs.FilterMessage("X.509 identity files not there yet; they are loaded when they appear").Len() != 1 {
				t.Errorf("no Warn line at construction: %v", logs.All())
			}
			for range 2 {
				_, _, _, err = x.X509(context.Background())
				var te *Error
				if !errors.As(err, &te) || te.Reason != ReasonMissing || te.Permanent() || te.ErrorClass() != "identity" {
					t.Fatalf("X509 with %s missing: %v, want a transient missing error", missing, err)
				}
				if !strings.Contains(err.Error(), dir) || !errors.Is(err, fs.ErrNotExist) {
					t.Errorf("error %q does not name the missing file", err)
				}
			}
			if n := testutil.ToFloat64(metricVec(t, reg).WithLabelValues(ReasonMissing)); n != 3 {
				t.Errorf("loads_total{result=missing} = %v, want 3 (construction and two calls)", n)
			}
			// The agent writes the files: picked up at once.
			for _, w := range []string{"cert", "key", "chain"} {
				if w == missing || missing == "all" {
					put(w)
				}
			}
			leaf, _, _, err := x.X509(context.Background())
			if err != nil || !leaf.Equal(l.Cert) {
				t.Fatalf("after the files appeared: %v", err)
			}
			if n := testutil.ToFloat64(metricVec(t, reg).WithLabelValues("ok")); n != 1 {
				t.Errorf("loads_total{result=ok} = %v", n)
			}
		})
	}

	// Definitely wrong at start-up: fail NewX509.
	if _, err := NewX509(t.TempDir(), srcKey, "", X509Options{}, nil, nil); err == nil || !strings.Contains(err.Error(), "not a regular file") {
		t.Errorf("directory as cert: %v", err)
	}
	if _, err := NewX509(src, t.TempDir(), "", X509Options{}, nil, nil); err == nil || !strings.Contains(err.Error(), "not a regular file") {
		t.Errorf("directory as key: %v", err)
	}
	if _, err := NewX509("", srcKey, "", X509Options{}, nil, nil); err == nil {
		t.Error("empty cert path accepted")
	}
	if _, err := NewX509(src, "", "", X509Options{}, nil, nil); err == nil {
		t.Error("empty key path accepted")
	}
	// A present file that does not validate still fails at once, even with
	// another file missing (the certificate is read first).
	garbage := filepath.Join(t.TempDir(), "cert.pem")
	if err := os.WriteFile(garbage, []byte("hello\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	settleFiles(t, garbage)
	var te *Error
	if _, err := NewX509(garbage, srcKey+".nope", "", X509Options{}, nil, nil); !errors.As(err, &te) || te.Reason != ReasonCertInvalid {
		t.Errorf("garbage cert, missing key: %v, want cert_invalid", err)
	}
}

func TestX509Rotation(t *testing.T) {
	l1 := issue(t, rolesanywhere.LeafOptions{Key: rolesanywhere.RSA2048})
	dir := t.TempDir()
	cert, key, chain, err := l1.WriteFiles(dir)
	if err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewPedanticRegistry()
	x, err := NewX509(cert, key, chain, X509Options{}, nil, reg)
	if err != nil {
		t.Fatal(err)
	}
	serial := func() string {
		t.Helper()
		leaf, _, _, err := x.X509(context.Background())
		if err != nil {
			t.Fatalf("X509: %v", err)
		}
		return leaf.SerialNumber.String()
	}
	if serial() != l1.Cert.SerialNumber.String() {
		t.Fatal("first serial")
	}
	// Unchanged files are not reloaded.
	for range 5 {
		serial()
	}
	if n := testutil.ToFloat64(metricVec(t, reg).WithLabelValues("ok")); n != 1 {
		t.Fatalf("%v loads for unchanged files", n)
	}

	// Atomic rotation (rename) to an EC identity.
	l2 := issue(t, rolesanywhere.LeafOptions{Key: rolesanywhere.ECP384})
	if _, _, _, err := l2.WriteFiles(dir); err != nil {
		t.Fatal(err)
	}
	if serial() != l2.Cert.SerialNumber.String() {
		t.Fatal("rotation by rename not picked up")
	}

	// Rotation mid-write: new certificate, old key. While the certificate
	// is new, the load is refused as changing and the cached identity is
	// served; once the files have been left alone for SettleTime, the
	// mismatch is permanent and the cached identity is no longer served.
	l3 := issue(t, rolesanywhere.LeafOptions{Key: rolesanywhere.ECP256})
	if err := os.WriteFile(cert, l3.CertPEM, 0o644); err != nil { // in place
		t.Fatal(err)
	}
	if serial() != l2.Cert.SerialNumber.String() {
		t.Fatal("half-rotated files: the cached identity is not served")
	}
	if n := testutil.ToFloat64(metricVec(t, reg).WithLabelValues(ReasonChanging)); n != 1 {
		t.Fatalf("loads_total{result=changing} = %v, want 1", n)
	}
	settleFiles(t, cert, key, chain)
	_, _, _, err = x.X509(context.Background())
	var te *Error
	if !errors.As(err, &te) || te.Reason != ReasonKeyMismatch || !te.Permanent() {
		t.Fatalf("half-rotated files left alone: %v", err)
	}
	if err := os.WriteFile(key, l3.KeyPEM, 0o600); err != nil { // in place
		t.Fatal(err)
	}
	if serial() != l3.Cert.SerialNumber.String() {
		t.Fatal("in-place rotation not picked up")
	}

	// chmod alone is noticed.
	settleFiles(t, cert, key, chain)
	if err := os.Chmod(key, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, _, _, err := x.X509(context.Background()); !errors.As(err, &te) || te.Reason != ReasonKeyPermissions {
		t.Fatalf("chmod 644: %v", err)
	}
	if err := os.Chmod(key, 0o400); err != nil {
		t.Fatal(err)
	}
	if serial() != l3.Cert.SerialNumber.String() {
		t.Fatal("after chmod 400")
	}
	g := testutil.ToFloat64(gaugeOf(t, reg))
	if g != float64(l3.Cert.NotAfter.Unix()) {
		t.Fatalf("expiry gauge %v, want %v", g, l3.Cert.NotAfter.Unix())
	}
	if problems, err := testutil.GatherAndLint(reg); err != nil || len(problems) > 0 {
		t.Fatalf("lint: %v %v", problems, err)
	}
}

func gaugeOf(t *testing.T, reg prometheus.Registerer) prometheus.Gauge {
	t.Helper()
	g := prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "imdsproxy_identity_certificate_expiry_timestamp_seconds",
		Help: "NotAfter of the X.509 identity certificate loaded last, in Unix seconds.",
	})
	var are prometheus.AlreadyRegisteredError
	if err := reg.Register(g); !errors.As(err, &are) {
		t.Fatalf("expiry gauge not registered: %v", err)
	}
	return are.ExistingCollector.(prometheus.Gauge)
}

func TestX509CachedIdentityExpires(t *testing.T) {
	l := issue(t, rolesanywhere.LeafOptions{})
	cert, key, chain := identityFiles(t, l)
	now := time.Now()
	var mu sync.Mutex
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	x, err := NewX509(cert, key, chain, X509Options{Now: clock}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	now = l.Cert.NotAfter.Add(time.Second)
	mu.Unlock()
	_, _, _, err = x.X509(context.Background())
	var te *Error
	if !errors.As(err, &te) || te.Reason != ReasonCertExpired {
		t.Fatalf("error %v", err)
	}
	mu.Lock()
	now = l.Cert.NotBefore.Add(-time.Second)
	mu.Unlock()
	if _, _, _, err = x.X509(context.Background()); !errors.As(err, &te) || te.Reason != ReasonCertNotYetValid {
		t.Fatalf("error %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, _, _, err := x.X509(ctx); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled ctx: %v", err)
	}
}

func TestX509MetricsRegistration(t *testing.T) {
	l := issue(t, rolesanywhere.LeafOptions{})
	cert, key, chain := identityFiles(t, l)
	reg := prometheus.NewPedanticRegistry()
	if _, err := NewX509(cert, key, chain, X509Options{}, nil, reg); err != nil {
		t.Fatal(err)
	}
	if !panics(func() { _, _ = NewX509(cert, key, chain, X509Options{}, nil, reg) }) {
		t.Fatal("registering twice succeeded")
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	names := map[string]bool{}
	for _, mf := range mfs {
		names[mf.GetName()] = true
	}
	for _, n := range []string{"imdsproxy_identity_certificate_loads_total", "imdsproxy_identity_certificate_expiry_timestamp_seconds"} {
		if !names[n] {
			t.Errorf("metric %s missing", n)
		}
	}
}

// FuzzLoadPEM feeds arbitrary certificate and key bytes to the parsers:
// they must never panic, and errors must be *Error with a known reason that
// never quotes the key bytes.
func FuzzLoadPEM(f *testing.F) {
	l := issue(f, rolesanywhere.LeafOptions{Key: rolesanywhere.ECP256, Format: rolesanywhere.SEC1})
	r := issue(f, rolesanywhere.LeafOptions{Key: rolesanywhere.RSA2048, Format: rolesanywhere.PKCS1})
	f.Add(l.CertPEM, l.KeyPEM)
	f.Add(r.CertPEM, r.KeyPEM)
	f.Add(append(l.CertPEM, l.ChainPEM...), l.KeyPEM)
	f.Add(l.CertPEM[:len(l.CertPEM)/2], l.KeyPEM[:len(l.KeyPEM)/2])
	f.Add([]byte("-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n"), []byte("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"))
	f.Add([]byte{}, []byte{})
	known := map[string]bool{}
	for _, r := range x509Reasons {
		known[r] = true
	}
	f.Fuzz(func(t *testing.T, certPEM, keyPEM []byte) {
		certs, cerr := parseCertificates(certPEM)
		if cerr == nil && len(certs) == 0 {
			t.Fatal("no certificates and no error")
		}
		signer, kerr := parsePrivateKey(append([]byte(nil), keyPEM...))
		if kerr != nil {
			var te *Error
			if !errors.As(kerr, &te) || !known[te.Reason] {
				t.Fatalf("key error %T %v", kerr, kerr)
			}
			if len(keyPEM) >= 24 {
				for _, line := range secretLines(keyPEM) {
					if strings.Contains(kerr.Error(), line) {
						t.Fatalf("key error quotes the input: %v", kerr)
					}
				}
			}
		} else if signer == nil {
			t.Fatal("nil signer without error")
		}
		if cerr == nil && kerr == nil {
			_ = publicKeysEqual(signer.Public(), certs[0].PublicKey)
			_ = describeKey(certs[0].PublicKey)
		}
	})
}
