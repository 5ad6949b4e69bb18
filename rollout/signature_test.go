package rollout

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

func newKey(t testing.TB) (ed25519.PublicKey, ed25519.PrivateKey) {
	t.Helper()
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return pub, priv
}

func pemOf(t testing.TB, pub any) []byte {
	t.Helper()
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der})
}

func TestSignPolicyVerifies(t *testing.T) {
	pub, priv := newKey(t)
	policy := []byte(policyV1)
	sig := SignPolicy(priv, policy)
	if !bytes.HasPrefix(sig, []byte("ed25519 "+KeyID(pub)+" ")) || !bytes.HasSuffix(sig, []byte("\n")) || bytes.Count(sig, []byte("\n")) != 1 {
		t.Fatalf("SignPolicy = %q", sig)
	}
	if len(KeyID(pub)) != 16 || strings.Trim(KeyID(pub), "0123456789abcdef") != "" {
		t.Fatalf("KeyID = %q, want 16 lower-case hex digits", KeyID(pub))
	}
	if err := VerifyPolicy([]ed25519.PublicKey{pub}, policy, sig); err != nil {
		t.Fatalf("VerifyPolicy: %v", err)
	}
	tampered := append([]byte(nil), policy...)
	tampered[len(tampered)-2] ^= 1
	if err := VerifyPolicy([]ed25519.PublicKey{pub}, tampered, sig); reasonOf(err) != ReasonBadSignature {
		t.Fatalf("tampered policy: %v", err)
	}
}

func reasonOf(err error) string {
	var le *LoadError
	if errors.As(err, &le) {
		return le.Reason
	}
	if err == nil {
		return ""
	}
	return "unclassified: " + err.Error()
}

func TestVerifyPolicy(t *testing.T) {
	pubA, privA := newKey(t)
	pubB, privB := newKey(t)
	_, privC := newKey(t)
	policy := []byte(policyV1)
	sigA, sigB, sigC := SignPolicy(privA, policy), SignPolicy(privB, policy), SignPolicy(privC, policy)
	noKID := func(sig []byte) []byte { // "ed25519 <kid> <sig>" → "ed25519 <sig>"
		f := strings.Fields(string(sig))
		return []byte(f[0] + " " + f[2] + "\n")
	}
	wrongSig := []byte("ed25519 " + KeyID(pubA) + " " + strings.Fields(string(sigB))[2] + "\n")
	cat := func(parts ...[]byte) []byte { return bytes.Join(parts, nil) }
	cases := []struct {
		name string
		keys []ed25519.PublicKey
		sig  []byte
		want string
	}{
		{"signed by the key", []ed25519.PublicKey{pubA}, sigA, ""},
		{"second of two keys (rotation)", []ed25519.PublicKey{pubA, pubB}, sigB, ""},
		{"both signatures, one key known", []ed25519.PublicKey{pubB}, cat(sigA, sigB), ""},
		{"no key id, tried with every key", []ed25519.PublicKey{pubA, pubB}, noKID(sigB), ""},
		{"comments, blank lines, CRLF", []ed25519.PublicKey{pubA}, cat([]byte("# published 2026-12-01\r\n\r\n"), bytes.ReplaceAll(sigA, []byte("\n"), []byte("\r\n"))), ""},
		{"unknown key", []ed25519.PublicKey{pubA, pubB}, sigC, ReasonUnknownKey},
		{"unknown key, no key id", []ed25519.PublicKey{pubA}, noKID(sigC), ReasonBadSignature},
		{"known key id, another key's signature", []ed25519.PublicKey{pubA, pubB}, wrongSig, ReasonBadSignature},
		{"a bad one and an unknown one", []ed25519.PublicKey{pubA}, cat(wrongSig, sigC), ReasonBadSignature},
		{"empty", []ed25519.PublicKey{pubA}, []byte(""), ReasonBadSignature},
		{"only comments", []ed25519.PublicKey{pubA}, []byte("# nothing\n"), ReasonBadSignature},
		{"garbage", []ed25519.PublicKey{pubA}, []byte("not a signature\n"), ReasonBadSignature},
		{"malformed line after a good one", []ed25519.PublicKey{pubA}, cat(sigA, []byte("ed25519 zz\n")), ReasonBadSignature},
		{"another algorithm", []ed25519.PublicKey{pubA}, bytes.Replace(sigA, []byte("ed25519"), []byte("rsa"), 1), ReasonBadSignature},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			err := VerifyPolicy(tc.keys, policy, tc.sig)
			if got := reasonOf(err); got != tc.want {
				t.Fatalf("VerifyPolicy = %v (reason %q), want %q", err, got, tc.want)
			}
		})
	}
}

func TestParseSignatureFile(t *testing.T) {
	_, priv := newKey(t)
	good := string(SignPolicy(priv, []byte("x")))
	f := strings.Fields(good)
	sig64 := f[2]
	raw, _ := base64.StdEncoding.DecodeString(sig64)
	for name, in := range map[string]string{
		"key id not hex":          "ed25519 ZZZZZZZZZZZZZZZZ " + sig64 + "\n",
		"key id too short":        "ed25519 abcd " + sig64 + "\n",
		"signature not base64":    "ed25519 " + f[1] + " !!!!\n",
		"signature too short":     "ed25519 " + f[1] + " " + base64.StdEncoding.EncodeToString(raw[:63]) + "\n",
		"four fields":             good[:len(good)-1] + " extra\n",
		"one field":               "ed25519\n",
		"upper-case algorithm":    strings.Replace(good, "ed25519", "ED25519", 1),
		"too many lines":          strings.Repeat(good, MaxSignatureLines+1),
		"larger than the limit":   "#" + strings.Repeat("x", MaxSignatureSize) + "\n" + good,
		"NUL byte":                strings.Replace(good, " ", "\x00", 1),
		"leading space in fields": "ed25519  " + f[1] + " " + sig64 + "\n",
	} {
		if _, err := ParseSignatureFile([]byte(in)); err == nil {
			t.Errorf("%s: accepted %q", name, in)
		}
	}
	sigs, err := ParseSignatureFile([]byte("# two\n" + good + "ed25519 " + base64.RawStdEncoding.EncodeToString(raw) + "\n"))
	if err != nil || len(sigs) != 2 || sigs[0].KeyID != f[1] || sigs[1].KeyID != "" || !bytes.Equal(sigs[1].Sig, raw) {
		t.Fatalf("ParseSignatureFile = %+v, %v", sigs, err)
	}
}

// FuzzParseSignatureFile: the parser never panics, accepts only lines it
// can verify (64-byte signatures, 16-hex key ids) and never more than
// MaxSignatureLines of them.
func FuzzParseSignatureFile(f *testing.F) {
	pub, priv := newKey(f)
	f.Add(SignPolicy(priv, []byte(policyV1)))
	f.Add([]byte("# c\n\ned25519 " + KeyID(pub) + " AAAA\r\n"))
	f.Add([]byte("ed25519 " + base64.StdEncoding.EncodeToString(make([]byte, 64))))
	f.Add([]byte{})
	f.Add([]byte("ed25519 0123456789abcdef ====\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		sigs, err := ParseSignatureFile(data)
		if err != nil {
			if sigs != nil {
				t.Fatal("signatures and an error")
			}
			if strings.ContainsAny(err.Error(), "\x00\n") {
				t.Fatalf("control characters in %q", err)
			}
			return
		}
		if len(sigs) == 0 || len(sigs) > MaxSignatureLines || len(data) > MaxSignatureSize {
			t.Fatalf("%d signatures from %d bytes", len(sigs), len(data))
		}
		for _, s := range sigs {
			if len(s.Sig) != ed25519.SignatureSize || (s.KeyID != "" && len(s.KeyID) != 16) {
				t.Fatalf("accepted %+v", s)
			}
		}
		_ = VerifyPolicy([]ed25519.PublicKey{pub}, []byte(policyV1), data)
	})
}

func TestParsePublicKey(t *testing.T) {
	pub, _ := newKey(t)
	pemText := pemOf(t, pub)
	der, _ := x509.MarshalPKIXPublicKey(pub)
	ec, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	dir := t.TempDir()
	pemFile := filepath.Join(dir, "policy.pub")
	writeFile(t, pemFile, string(pemText))
	rawFile := filepath.Join(dir, "policy.b64")
	writeFile(t, rawFile, base64.StdEncoding.EncodeToString(pub)+"\n")
	for name, in := range map[string]string{
		"raw base64":   base64.StdEncoding.EncodeToString(pub),
		"SPKI base64":  base64.StdEncoding.EncodeToString(der),
		"PEM":          string(pemText),
		"PEM file":     pemFile,
		"base64 file":  rawFile,
		"spaces round": "  " + base64.StdEncoding.EncodeToString(pub) + "\n",
	} {
		got, err := ParsePublicKey(in)
		if err != nil || !got.Equal(pub) {
			t.Errorf("%s: ParsePublicKey = %x, %v", name, got, err)
		}
	}
	// The example key of docs/rollout.md (RFC 8410's).
	if _, err := ParsePublicKey("MCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE="); err != nil {
		t.Errorf("the documented example key: %v", err)
	}
	for name, in := range map[string]string{
		"empty":         "",
		"short":         base64.StdEncoding.EncodeToString(pub[:31]),
		"ECDSA PEM":     string(pemOf(t, &ec.PublicKey)),
		"private PEM":   "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n",
		"missing file":  filepath.Join(dir, "missing.pub"),
		"relative path": "keys/policy.pub",
		"not base64":    "hello world",
	} {
		if _, err := ParsePublicKey(in); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	pub2, _ := newKey(t)
	keys, err := ParsePublicKeys([]string{base64.StdEncoding.EncodeToString(pub), pemFile, base64.StdEncoding.EncodeToString(pub2)})
	if err != nil || len(keys) != 2 || !keys[0].Equal(pub) || !keys[1].Equal(pub2) {
		t.Fatalf("ParsePublicKeys = %d keys, %v; want the two keys, the one given twice once", len(keys), err)
	}
	if _, err := ParsePublicKeys([]string{"x"}); err == nil || !strings.Contains(err.Error(), "key 1") {
		t.Fatalf("ParsePublicKeys error does not say which key: %v", err)
	}
}

// TestOpenSSLSignature signs a policy with exactly the openssl commands
// docs/rollout.md gives, and the loader accepts it with the public key
// file openssl wrote. Skipped when openssl (3.0 or later) is not installed.
func TestOpenSSLSignature(t *testing.T) {
	if _, err := exec.LookPath("openssl"); err != nil {
		t.Skip("openssl not installed")
	}
	if _, err := exec.LookPath("sh"); err != nil {
		t.Skip("no sh")
	}
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "rollout.yaml"), policyV1)
	// The commands of docs/rollout.md, "Signing with openssl", verbatim.
	const keygen = `openssl genpkey -algorithm ed25519 -out policy-signing.key
openssl pkey -in policy-signing.key -pubout -out policy-signing.pub`
	const sign = `KID=$(openssl pkey -pubin -in policy-signing.pub -outform DER | tail -c 32 | openssl dgst -sha256 -binary | head -c 8 | od -An -tx1 | tr -d ' \n')
SIG=$(openssl pkeyutl -sign -inkey policy-signing.key -rawin -in rollout.yaml | openssl base64 -A)
printf 'ed25519 %s %s\n' "$KID" "$SIG" > rollout.yaml.sig`
	for _, script := range []string{keygen, sign} {
		cmd := exec.Command("sh", "-ec", script)
		cmd.Dir = dir
		if out, err := cmd.CombinedOutput(); err != nil {
			if strings.Contains(string(out), "rawin") || strings.Contains(string(out), "Unknown") {
				t.Skipf("this openssl cannot sign ed25519 raw input (3.0+ needed): %s", out)
			}
			t.Fatalf("%s: %v\n%s", script, err, out)
		}
	}
	for _, doc := range []string{"docs/rollout.md"} {
		b, err := os.ReadFile(filepath.Join("..", doc))
		if err != nil {
			t.Fatal(err)
		}
		for _, s := range []string{keygen, sign} {
			if !strings.Contains(string(b), s) {
				t.Errorf("%s does not hold the tested commands:\n%s", doc, s)
			}
		}
	}
	keys, err := ParsePublicKeys([]string{filepath.Join(dir, "policy-signing.pub")})
	if err != nil {
		t.Fatal(err)
	}
	sig, _ := os.ReadFile(filepath.Join(dir, "rollout.yaml.sig"))
	if f := strings.Fields(string(sig)); len(f) != 3 || f[1] != KeyID(keys[0]) {
		t.Fatalf("openssl's key id is not KeyID's: %q vs %s", sig, KeyID(keys[0]))
	}
	l, err := NewLoader(filepath.Join(dir, "rollout.yaml"), LoaderOptions{PolicyKeys: keys}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Load(context.Background()); err != nil {
		t.Fatalf("the loader refused openssl's signature: %v", err)
	}
	// The key-id-less form of the docs.
	cmd := exec.Command("sh", "-ec", `SIG=$(openssl pkeyutl -sign -inkey policy-signing.key -rawin -in rollout.yaml | openssl base64 -A)
printf 'ed25519 %s\n' "$SIG" > rollout.yaml.sig`)
	cmd.Dir = dir
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	if err := l.Load(context.Background()); err != nil {
		t.Fatalf("the loader refused openssl's signature without a key id: %v", err)
	}
}
