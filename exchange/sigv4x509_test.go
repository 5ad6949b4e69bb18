package exchange

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/hex"
	"encoding/pem"
	"flag"
	"math/big"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

// -update-sigv4 regenerates exchange/testdata/sigv4x509/ (the fixed RSA key,
// certificates and the golden canonical request and Authorization header).
// The name is specific so that it cannot clash with another -update flag of
// this package's tests.
var updateSigV4 = flag.Bool("update-sigv4", false, "regenerate testdata/sigv4x509 golden files")

const sigv4Testdata = "testdata/sigv4x509"

// The fixed inputs of the known-answer test.
var (
	goldenDate = time.Date(2026, 3, 14, 15, 9, 26, 0, time.UTC)
	goldenURL  = "https://rolesanywhere.us-east-1.amazonaws.com/sessions?" + encodeQuery(map[string][]string{
		"profileArn":     {"arn:aws:rolesanywhere:us-east-1:222222222222:profile/7c9a1b2c-1111-2222-3333-444455556666"},
		"roleArn":        {"arn:aws:iam::222222222222:role/app"},
		"trustAnchorArn": {"arn:aws:rolesanywhere:us-east-1:222222222222:trust-anchor/0b8c3f1e-1111-2222-3333-444455556666"},
	})
	goldenBody = []byte(`{"durationSeconds":3600}`)
)

func readTestdata(t testing.TB, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(sigv4Testdata, name))
	if err != nil {
		t.Fatalf("%v (run `go test ./exchange -run TestSignX509Golden -update-sigv4` to create it)", err)
	}
	return b
}

func writeTestdata(t testing.TB, name string, b []byte) {
	t.Helper()
	if err := os.MkdirAll(sigv4Testdata, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(sigv4Testdata, name), b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// generateGoldenIdentity creates the committed RSA key, a CA and a leaf.
func generateGoldenIdentity(t *testing.T) {
	caKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	leafKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	nb := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "sigv4x509 golden CA"},
		NotBefore: nb, NotAfter: nb.AddDate(30, 0, 0), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, caKey.Public(), caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(caDER)
	serial, _ := new(big.Int).SetString("173504628418376405624788116375498563617", 10)
	leafTmpl := &x509.Certificate{
		SerialNumber: serial, Subject: pkix.Name{CommonName: "host-1.golden.test"},
		NotBefore: nb, NotAfter: nb.AddDate(30, 0, 0), KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}, BasicConstraintsValid: true,
	}
	leafDER, err := x509.CreateCertificate(rand.Reader, leafTmpl, ca, leafKey.Public(), caKey)
	if err != nil {
		t.Fatal(err)
	}
	pk8, err := x509.MarshalPKCS8PrivateKey(leafKey)
	if err != nil {
		t.Fatal(err)
	}
	writeTestdata(t, "rsa-key.pem", pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: pk8}))
	writeTestdata(t, "rsa-cert.pem", pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: leafDER}))
	writeTestdata(t, "ca-cert.pem", pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}))
}

func loadGoldenIdentity(t testing.TB) (*x509.Certificate, *x509.Certificate, crypto.Signer) {
	t.Helper()
	parseCert := func(name string) *x509.Certificate {
		b, _ := pem.Decode(readTestdata(t, name))
		if b == nil {
			t.Fatalf("%s: no PEM", name)
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	kb, _ := pem.Decode(readTestdata(t, "rsa-key.pem"))
	if kb == nil {
		t.Fatal("rsa-key.pem: no PEM")
	}
	k, err := x509.ParsePKCS8PrivateKey(kb.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return parseCert("rsa-cert.pem"), parseCert("ca-cert.pem"), k.(crypto.Signer)
}

func goldenRequest(t testing.TB) *http.Request {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, goldenURL, bytes.NewReader(goldenBody))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("User-Agent", "must-not-be-signed")
	req.Header.Set("X-Amzn-Trace-Id", "Root=must-not-be-signed")
	return req
}

// TestSignX509Golden is the known-answer test: RSA PKCS#1 v1.5 is
// deterministic, so the whole Authorization header of a fixed request, key,
// certificate and date is a golden value.
func TestSignX509Golden(t *testing.T) {
	if *updateSigV4 {
		generateGoldenIdentity(t)
	}
	leaf, ca, key := loadGoldenIdentity(t)
	for _, tc := range []struct {
		name  string
		chain []*x509.Certificate
	}{{"no-chain", nil}, {"chain", []*x509.Certificate{ca}}} {
		t.Run(tc.name, func(t *testing.T) {
			req := goldenRequest(t)
			if err := signX509(req, goldenBody, "us-east-1", goldenDate, leaf, tc.chain, key); err != nil {
				t.Fatal(err)
			}
			canon, _ := canonicalRequest(req, goldenBody)
			got := req.Header.Get("Authorization") + "\n"
			if *updateSigV4 {
				writeTestdata(t, tc.name+".canonical-request.txt", []byte(canon))
				writeTestdata(t, tc.name+".authorization.txt", []byte(got))
			}
			if want := string(readTestdata(t, tc.name+".canonical-request.txt")); canon != want {
				t.Errorf("canonical request:\n%s\nwant:\n%s", canon, want)
			}
			if want := string(readTestdata(t, tc.name+".authorization.txt")); got != want {
				t.Errorf("Authorization:\n%s\nwant:\n%s", got, want)
			}
			if d := req.Header.Get("X-Amz-Date"); d != "20260314T150926Z" {
				t.Errorf("X-Amz-Date %q", d)
			}
			if x := req.Header.Get("X-Amz-X509"); x != base64.StdEncoding.EncodeToString(leaf.Raw) {
				t.Errorf("X-Amz-X509 is not the padded standard base64 of the leaf DER")
			}
			wantChain := ""
			if tc.chain != nil {
				wantChain = base64.StdEncoding.EncodeToString(ca.Raw)
			}
			if c := req.Header.Get("X-Amz-X509-Chain"); c != wantChain {
				t.Errorf("X-Amz-X509-Chain %q, want %q", c, wantChain)
			}
		})
	}
}

// TestSignX509GoldenShape checks the golden header against the documented
// format independently of the implementation.
func TestSignX509GoldenShape(t *testing.T) {
	auth := strings.TrimSpace(string(readTestdata(t, "chain.authorization.txt")))
	re := regexp.MustCompile(`^AWS4-X509-RSA-SHA256 Credential=173504628418376405624788116375498563617/20260314/us-east-1/rolesanywhere/aws4_request, SignedHeaders=content-type;host;x-amz-date;x-amz-x509;x-amz-x509-chain, Signature=[0-9a-f]{512}$`)
	if !re.MatchString(auth) {
		t.Fatalf("golden Authorization has not the documented shape:\n%s", auth)
	}
	canon := string(readTestdata(t, "no-chain.canonical-request.txt"))
	lines := strings.Split(canon, "\n")
	if lines[0] != "POST" || lines[1] != "/sessions" ||
		lines[2] != "profileArn=arn%3Aaws%3Arolesanywhere%3Aus-east-1%3A222222222222%3Aprofile%2F7c9a1b2c-1111-2222-3333-444455556666&roleArn=arn%3Aaws%3Aiam%3A%3A222222222222%3Arole%2Fapp&trustAnchorArn=arn%3Aaws%3Arolesanywhere%3Aus-east-1%3A222222222222%3Atrust-anchor%2F0b8c3f1e-1111-2222-3333-444455556666" ||
		lines[3] != "content-type:application/json" || lines[4] != "host:rolesanywhere.us-east-1.amazonaws.com" ||
		lines[5] != "x-amz-date:20260314T150926Z" || !strings.HasPrefix(lines[6], "x-amz-x509:MII") || lines[7] != "" ||
		lines[8] != "content-type;host;x-amz-date;x-amz-x509" {
		t.Fatalf("golden canonical request has not the documented shape:\n%s", canon)
	}
	sum := sha256.Sum256(goldenBody)
	if lines[9] != hex.EncodeToString(sum[:]) {
		t.Fatalf("payload hash %s", lines[9])
	}
	// The sent query string is the canonical one.
	if q := strings.SplitN(goldenURL, "?", 2)[1]; q != lines[2] {
		t.Fatalf("sent query %s differs from the canonical one", q)
	}
}

// verifyAuthorization recomputes the string to sign from the request and
// checks the signature with the public key.
func verifyAuthorization(t *testing.T, req *http.Request, body []byte, pub crypto.PublicKey) {
	t.Helper()
	auth := req.Header.Get("Authorization")
	m := regexp.MustCompile(`^(AWS4-X509-(?:RSA|ECDSA)-SHA256) Credential=(\d+)/(\d{8})/([a-z0-9-]+)/rolesanywhere/aws4_request, SignedHeaders=([a-z0-9;-]+), Signature=([0-9a-f]+)$`).FindStringSubmatch(auth)
	if m == nil {
		t.Fatalf("Authorization %q", auth)
	}
	canon, signed := canonicalRequest(req, body)
	if signed != m[5] {
		t.Fatalf("SignedHeaders %s, canonical %s", m[5], signed)
	}
	sts := stringToSign(m[1], req.Header.Get("X-Amz-Date"), m[3]+"/"+m[4]+"/rolesanywhere/aws4_request", canon)
	digest := sha256.Sum256([]byte(sts))
	sig, _ := hex.DecodeString(m[6])
	switch k := pub.(type) {
	case *rsa.PublicKey:
		if m[1] != algX509RSA || rsa.VerifyPKCS1v15(k, crypto.SHA256, digest[:], sig) != nil {
			t.Fatalf("RSA signature does not verify (%s)", m[1])
		}
	case *ecdsa.PublicKey:
		if m[1] != algX509ECDSA || !ecdsa.VerifyASN1(k, digest[:], sig) {
			t.Fatalf("ECDSA signature does not verify (%s)", m[1])
		}
	}
}

func selfSigned(t testing.TB, key crypto.Signer) *x509.Certificate {
	t.Helper()
	serial, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 120))
	tmpl := &x509.Certificate{SerialNumber: serial, Subject: pkix.Name{CommonName: "t"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	return c
}

func TestSignX509ECDSA(t *testing.T) {
	for _, curve := range []elliptic.Curve{elliptic.P256(), elliptic.P384()} {
		t.Run(curve.Params().Name, func(t *testing.T) {
			key, _ := ecdsa.GenerateKey(curve, rand.Reader)
			cert := selfSigned(t, key)
			req := goldenRequest(t)
			if err := signX509(req, goldenBody, "eu-west-2", time.Now(), cert, nil, key); err != nil {
				t.Fatal(err)
			}
			auth := req.Header.Get("Authorization")
			if !strings.HasPrefix(auth, "AWS4-X509-ECDSA-SHA256 Credential="+cert.SerialNumber.String()+"/") ||
				!strings.Contains(auth, "/eu-west-2/rolesanywhere/aws4_request, SignedHeaders=content-type;host;x-amz-date;x-amz-x509, Signature=") {
				t.Fatalf("Authorization %q", auth)
			}
			verifyAuthorization(t, req, goldenBody, key.Public())
		})
	}
}

func TestSignX509RejectsUnsupportedKey(t *testing.T) {
	_, key, _ := ed25519.GenerateKey(rand.Reader)
	cert := selfSigned(t, key)
	if err := signX509(goldenRequest(t), goldenBody, "us-east-1", time.Now(), cert, nil, key); err == nil {
		t.Fatal("ed25519 accepted")
	}
	leaf, _, rsaKey := loadGoldenIdentity(t)
	if err := signX509(goldenRequest(t), goldenBody, "", time.Now(), leaf, nil, rsaKey); err == nil {
		t.Fatal("empty region accepted")
	}
	if err := signX509(goldenRequest(t), goldenBody, "us-east-1", time.Now(), nil, nil, rsaKey); err == nil {
		t.Fatal("nil certificate accepted")
	}
}

func TestCanonicalRequest(t *testing.T) {
	emptyHash := "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
	for _, tc := range []struct {
		name   string
		url    string
		host   string
		header http.Header
		body   string
		want   string
	}{
		{
			name: "empty query and body, host from URL with port",
			url:  "http://127.0.0.1:8080/prefix/sessions",
			want: "POST\n/sessions\n\nhost:127.0.0.1:8080\n\nhost\n" + emptyHash,
		},
		{
			name: "req.Host wins over URL host",
			url:  "http://127.0.0.1:8080/sessions", host: "rolesanywhere.test",
			want: "POST\n/sessions\n\nhost:rolesanywhere.test\n\nhost\n" + emptyHash,
		},
		{
			name: "query sorted and RFC 3986 encoded",
			url:  "http://h/sessions?b=2&a=x+y&a=%7E-_.&c=%2F%3A%2B&a=&a-b=1&a.=2",
			want: "POST\n/sessions\na=&a=x%20y&a=~-_.&a-b=1&a.=2&b=2&c=%2F%3A%2B\nhost:h\n\nhost\n" + emptyHash,
		},
		{
			name: "non-ASCII and reserved",
			url:  "http://h/sessions?k=%C3%A9%20%21%2A%27%28%29",
			want: "POST\n/sessions\nk=%C3%A9%20%21%2A%27%28%29\nhost:h\n\nhost\n" + emptyHash,
		},
		{
			name: "headers trimmed, collapsed, multi-valued, excluded ones dropped",
			url:  "http://h/sessions",
			header: http.Header{
				"X-Amz-Foo":       {"  a   b  c ", "d"},
				"Content-Type":    {"application/json"},
				"Amz-Sdk-Request": {"attempt=1; max=2"},
				"Authorization":   {"old"},
				"User-Agent":      {"ua"},
				"X-Amzn-Trace-Id": {"trace"},
			},
			body: `{"durationSeconds":900}`,
			want: "POST\n/sessions\n\namz-sdk-request:attempt=1; max=2\ncontent-type:application/json\nhost:h\nx-amz-foo:a b c,d\n\namz-sdk-request;content-type;host;x-amz-foo\n" +
				"6d6fc6db7c5f54e2a01ad2d45e00e1ac3ddce94fef1da4d2d55b75fb2dcb0c49",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			req, err := http.NewRequest(http.MethodPost, tc.url, strings.NewReader(tc.body))
			if err != nil {
				t.Fatal(err)
			}
			if tc.host != "" {
				req.Host = tc.host
			}
			for k, v := range tc.header {
				req.Header[k] = v
			}
			want := tc.want
			if tc.body != "" {
				sum := sha256.Sum256([]byte(tc.body))
				want = want[:len(want)-64] + hex.EncodeToString(sum[:])
			}
			got, _ := canonicalRequest(req, []byte(tc.body))
			if got != want {
				t.Errorf("canonical request:\n%q\nwant\n%q", got, want)
			}
		})
	}
}

func TestURIEncode(t *testing.T) {
	for in, want := range map[string]string{
		"":                   "",
		"AZaz09-_.~":         "AZaz09-_.~",
		" ":                  "%20",
		"+":                  "%2B",
		"a/b:c":              "a%2Fb%3Ac",
		"é":                  "%C3%A9",
		"%":                  "%25",
		"\x00\xff":           "%00%FF",
		"arn:aws:iam::1:r/x": "arn%3Aaws%3Aiam%3A%3A1%3Ar%2Fx",
	} {
		if got := uriEncode(in); got != want {
			t.Errorf("uriEncode(%q) = %q, want %q", in, got, want)
		}
	}
	if got := collapseSpaces("  a  b   c "); got != "a b c" {
		t.Errorf("collapseSpaces = %q", got)
	}
}

// TestSignX509OpenSSL verifies signatures with `openssl dgst -sha256
// -verify`, an implementation independent of Go's crypto.
func TestSignX509OpenSSL(t *testing.T) {
	openssl, err := exec.LookPath("openssl")
	if err != nil {
		t.Skip("openssl not installed")
	}
	leaf, _, rsaKey := loadGoldenIdentity(t)
	ecKey, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	ecCert := selfSigned(t, ecKey)
	for _, tc := range []struct {
		name string
		cert *x509.Certificate
		key  crypto.Signer
	}{{"rsa", leaf, rsaKey}, {"ecdsa-p384", ecCert, ecKey}} {
		t.Run(tc.name, func(t *testing.T) {
			req := goldenRequest(t)
			now := time.Now()
			if err := signX509(req, goldenBody, "us-east-1", now, tc.cert, nil, tc.key); err != nil {
				t.Fatal(err)
			}
			auth := req.Header.Get("Authorization")
			sigHex := auth[strings.LastIndex(auth, "Signature=")+len("Signature="):]
			sig, err := hex.DecodeString(sigHex)
			if err != nil {
				t.Fatal(err)
			}
			alg := strings.SplitN(auth, " ", 2)[0]
			canon, _ := canonicalRequest(req, goldenBody)
			sts := stringToSign(alg, req.Header.Get("X-Amz-Date"), now.UTC().Format("20060102")+"/us-east-1/rolesanywhere/aws4_request", canon)
			dir := t.TempDir()
			pubDER, err := x509.MarshalPKIXPublicKey(tc.cert.PublicKey)
			if err != nil {
				t.Fatal(err)
			}
			files := map[string][]byte{
				"pub.pem": pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pubDER}),
				"sig.bin": sig,
				"sts.txt": []byte(sts),
				"bad.txt": []byte(sts + "x"),
			}
			for n, b := range files {
				if err := os.WriteFile(filepath.Join(dir, n), b, 0o600); err != nil {
					t.Fatal(err)
				}
			}
			out, err := exec.Command(openssl, "dgst", "-sha256", "-verify", filepath.Join(dir, "pub.pem"),
				"-signature", filepath.Join(dir, "sig.bin"), filepath.Join(dir, "sts.txt")).CombinedOutput()
			if err != nil || !strings.Contains(string(out), "Verified OK") {
				t.Fatalf("openssl does not verify the signature: %v\n%s", err, out)
			}
			out, err = exec.Command(openssl, "dgst", "-sha256", "-verify", filepath.Join(dir, "pub.pem"),
				"-signature", filepath.Join(dir, "sig.bin"), filepath.Join(dir, "bad.txt")).CombinedOutput()
			if err == nil {
				t.Fatalf("openssl verified a signature over different data:\n%s", out)
			}
		})
	}
}
