package issuer

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/asn1"
	"encoding/json"
	"encoding/pem"
	"math/big"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/kms"
	kmstypes "github.com/aws/aws-sdk-go-v2/service/kms/types"
	"github.com/go-jose/go-jose/v4"
	lkms "github.com/nsmithuk/local-kms/src"
	lkmsconfig "github.com/nsmithuk/local-kms/src/config"
	lkmsdata "github.com/nsmithuk/local-kms/src/data"
)

func TestFileKeys(t *testing.T) {
	dir := t.TempDir()
	enc := func(k any) []byte {
		der, err := x509.MarshalPKCS8PrivateKey(k)
		if err != nil {
			t.Fatal(err)
		}
		return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
	}
	p384, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	rsa1024, _ := rsa.GenerateKey(rand.Reader, 1024)
	ec, _, rk := keyPEMs()
	ecKey, _ := parsePrivateKey(ec)
	sec1, _ := x509.MarshalECPrivateKey(ecKey.(*ecdsa.PrivateKey))
	for _, tc := range []struct {
		name string
		data []byte
		mode os.FileMode
		alg  string
		err  string
	}{
		{"EC P-256 PKCS #8", ec, 0o600, AlgES256, ""},
		{"EC P-256 SEC 1", pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: sec1}), 0o400, AlgES256, ""},
		{"RSA 2048", rk, 0o600, AlgRS256, ""},
		{"EC P-384", enc(p384), 0o600, "", "only P-256"},
		{"RSA 1024", enc(rsa1024), 0o600, "", "at least 2048"},
		{"world-readable", ec, 0o644, "", "readable by group or others"},
		{"certificate only", []byte("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"), 0o600, "", "no PEM private key"},
		{"encrypted", []byte("-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n"), 0o600, "", "encrypted"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(dir, strings.ReplaceAll(tc.name, " ", "_"))
			if err := os.WriteFile(p, tc.data, tc.mode); err != nil {
				t.Fatal(err)
			}
			_ = os.Chmod(p, tc.mode)
			k, err := loadFileKey(p)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("err %v, want %q", err, tc.err)
				}
				if err != nil && strings.Contains(err.Error(), "AAAA") {
					t.Fatal("the error quotes the file")
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			checkSigns(t, k, tc.alg)
		})
	}
}

// checkSigns signs a token with k and verifies it with go-jose against
// k's published JWK.
func checkSigns(t *testing.T, k *signingKey, alg string) {
	t.Helper()
	if k.alg != alg {
		t.Fatalf("alg %s, want %s", k.alg, alg)
	}
	tok, err := k.signJWT(context.Background(), []byte(`{"sub":"app"}`))
	if err != nil {
		t.Fatal(err)
	}
	set, _ := json.Marshal(jose.JSONWebKeySet{Keys: []jose.JSONWebKey{k.jwk}})
	kid, c := verifyWithJWKS(t, tok, set)
	if kid != k.kid || c["sub"] != "app" {
		t.Fatalf("kid %s claims %v", kid, c)
	}
}

func TestDERToJOSE(t *testing.T) {
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	digest := sha256.Sum256([]byte("x"))
	for i := 0; i < 50; i++ { // short r or s values must be left-padded
		der, _ := ecdsa.SignASN1(rand.Reader, k, digest[:])
		sig, err := derToJOSE(der)
		if err != nil || len(sig) != 64 {
			t.Fatalf("derToJOSE: %v len %d", err, len(sig))
		}
		r, s := new(big.Int).SetBytes(sig[:32]), new(big.Int).SetBytes(sig[32:])
		if !ecdsa.Verify(&k.PublicKey, digest[:], r, s) {
			t.Fatal("converted signature does not verify")
		}
	}
	tooBig, _ := asn1.Marshal(struct{ R, S *big.Int }{new(big.Int).Lsh(big.NewInt(1), 300), big.NewInt(1)})
	for _, bad := range [][]byte{nil, []byte("garbage"), tooBig} {
		if _, err := derToJOSE(bad); err == nil {
			t.Fatalf("derToJOSE(%x) accepted", bad)
		}
	}
}

var (
	kmsOnce sync.Once
	kmsURL  string
	kmsDB   *lkmsdata.Database
)

// startLocalKMS serves local-kms (github.com/nsmithuk/local-kms, a real
// implementation of the KMS API) in process on loopback, once per test
// binary: its configuration is global.
func startLocalKMS(t *testing.T) string {
	t.Helper()
	kmsOnce.Do(func() {
		dir, err := os.MkdirTemp("", "local-kms-")
		if err != nil {
			t.Fatal(err)
		}
		lkmsconfig.AWSAccountId = "111122223333"
		lkmsconfig.AWSRegion = "eu-west-2"
		lkmsconfig.DatabasePath = dir
		kmsDB = lkmsdata.NewDatabase(dir)
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			lkms.HandleRequest(w, r, kmsDB)
		}))
		kmsURL = srv.URL
	})
	return kmsURL
}

// createKMSKey creates an asymmetric signing key in local-kms.
func createKMSKey(t *testing.T, spec kmstypes.KeySpec) string {
	t.Helper()
	c, _ := testAWSConfig(startLocalKMS(t))(context.Background())
	out, err := kms.NewFromConfig(c).CreateKey(context.Background(), &kms.CreateKeyInput{
		KeySpec: spec, KeyUsage: kmstypes.KeyUsageTypeSignVerify})
	if err != nil {
		t.Fatal(err)
	}
	return aws.ToString(out.KeyMetadata.Arn)
}

// TestKMSKeys signs with local-kms (kms:Sign, MessageType DIGEST) and
// verifies with the public key from GetPublicKey.
func TestKMSKeys(t *testing.T) {
	ctx := context.Background()
	c, _ := testAWSConfig(startLocalKMS(t))(ctx)
	client := kms.NewFromConfig(c, func(o *kms.Options) { o.Region = "eu-west-2" })
	for _, tc := range []struct {
		spec kmstypes.KeySpec
		alg  string
	}{{kmstypes.KeySpecEccNistP256, AlgES256}, {kmstypes.KeySpecRsa2048, AlgRS256}} {
		t.Run(string(tc.spec), func(t *testing.T) {
			arn := createKMSKey(t, tc.spec)
			k, err := loadKMSKey(ctx, client, arn)
			if err != nil {
				t.Fatal(err)
			}
			if k.source != sourceKMS || k.name != arn {
				t.Fatalf("key %s %s", k.source, k.name)
			}
			for i := 0; i < 5; i++ {
				checkSigns(t, k, tc.alg)
			}
			// The JWK is the key KMS holds: verify a raw KMS signature with it.
			digest := sha256.Sum256([]byte("hello"))
			sig, err := k.signDigest(ctx, digest[:])
			if err != nil {
				t.Fatal(err)
			}
			switch pub := k.public.(type) {
			case *ecdsa.PublicKey:
				if !ecdsa.Verify(pub, digest[:], new(big.Int).SetBytes(sig[:32]), new(big.Int).SetBytes(sig[32:])) {
					t.Fatal("KMS ECDSA signature does not verify")
				}
			case *rsa.PublicKey:
				if err := rsa.VerifyPKCS1v15(pub, crypto.SHA256, digest[:], sig); err != nil {
					t.Fatal(err)
				}
			}
		})
	}
	t.Run("symmetric key refused", func(t *testing.T) {
		out, err := kms.NewFromConfig(c).CreateKey(ctx, &kms.CreateKeyInput{})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := loadKMSKey(ctx, client, aws.ToString(out.KeyMetadata.Arn)); err == nil {
			t.Fatal("a symmetric key was accepted")
		}
	})
}

// TestKMSIssuer runs the whole issuer with a KMS key first and a file key
// second.
func TestKMSIssuer(t *testing.T) {
	arn := createKMSKey(t, kmstypes.KeySpecEccNistP256)
	ca, _ := cas()
	ec, _, _ := keyPEMs()
	dir := t.TempDir()
	yaml := strings.NewReplacer("KMSARN", arn, "KEY1", writeFile(t, dir, "k.pem", ec), "CA", writeFile(t, dir, "ca.pem", ca.pem)).Replace(`listen: 127.0.0.1:0
issuer: https://oidc.example.com
signing:
  keys:
    - {kms: "KMSARN"}
    - {file: "KEY1"}
attestation:
  aws_iid: {certificates: ["CA"]}
policy:
  - match: {accounts: ["111111111111"]}
    subjects: [app]
`)
	cfg, err := ParseConfig([]byte(yaml))
	if err != nil {
		t.Fatal(err)
	}
	reg := newRegistry()
	srv, err := New(context.Background(), cfg, Options{Registerer: reg, AWSConfig: testAWSConfig(startLocalKMS(t))})
	if err != nil {
		t.Fatal(err)
	}
	e := &env{t: t, srv: srv, h: srv.Handler(), reg: reg}
	status, out := e.post(iidRequest(t, ""))
	if status != 200 {
		t.Fatalf("status %d %v", status, out)
	}
	kid, c := e.verifyToken(out["token"])
	if kid != srv.state.Load().keys[0].kid || c["sub"] != "app" {
		t.Fatalf("kid %s claims %v", kid, c)
	}
	if ok, why := srv.Ready(); !ok || !strings.Contains(why, "(kms)") {
		t.Fatalf("ready %v %s", ok, why)
	}
}
