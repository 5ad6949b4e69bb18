package issuer

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"math/big"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	v4 "github.com/aws/aws-sdk-go-v2/aws/signer/v4"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/go-jose/go-jose/v4"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/smallstep/pkcs7"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	fakeec2 "github.com/imdsproxy/imdsproxy/test/fakes/ec2"
)

// testCA is a self-signed RSA certificate standing in for an AWS region's
// instance identity certificate.
type testCA struct {
	cert *x509.Certificate
	key  *rsa.PrivateKey
	pem  []byte
}

var (
	caOnce       sync.Once
	caMain       *testCA
	caOther      *testCA
	keyOnce      sync.Once
	ecKeyPEM     []byte
	ecKeyPEM2    []byte
	rsaKeyPEM    []byte
	testAccount  = "111111111111"
	testInstance = "i-0123456789abcdef0"
	testRegion   = "us-east-1"
	testPending  = time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
)

func newTestCA(cn string) *testCA {
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		panic(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		Subject:      pkix.Name{Organization: []string{"imdsproxy test"}, CommonName: cn},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(100 * 365 * 24 * time.Hour),
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		panic(err)
	}
	cert, _ := x509.ParseCertificate(der)
	return &testCA{cert: cert, key: key, pem: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}
}

func cas() (*testCA, *testCA) {
	caOnce.Do(func() {
		caMain = newTestCA("test region signer")
		caOther = newTestCA("untrusted signer")
	})
	return caMain, caOther
}

func keyPEMs() (ec, ec2, rsaPEM []byte) {
	keyOnce.Do(func() {
		enc := func(k crypto.Signer) []byte {
			der, err := x509.MarshalPKCS8PrivateKey(k)
			if err != nil {
				panic(err)
			}
			return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
		}
		k1, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		k2, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		k3, _ := rsa.GenerateKey(rand.Reader, 2048)
		ecKeyPEM, ecKeyPEM2, rsaKeyPEM = enc(k1), enc(k2), enc(k3)
	})
	return ecKeyPEM, ecKeyPEM2, rsaKeyPEM
}

// iidDocument is an instance identity document shaped like EC2's.
func iidDocument(account, instance, region string, pending time.Time) string {
	return fmt.Sprintf(`{
  "accountId" : "%s",
  "architecture" : "x86_64",
  "availabilityZone" : "%sa",
  "imageId" : "ami-0123456789abcdef0",
  "instanceId" : "%s",
  "instanceType" : "t3.micro",
  "pendingTime" : "%s",
  "privateIp" : "10.0.0.5",
  "region" : "%s",
  "version" : "2017-09-30"
}`, account, region, instance, pending.UTC().Format(time.RFC3339), region)
}

// signIID returns the base64 PKCS7 SignedData of doc (content embedded)
// signed by ca, as IMDS serves /rsa2048.
func signIID(t testing.TB, doc string, ca *testCA) string {
	t.Helper()
	sd, err := pkcs7.NewSignedData([]byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	sd.SetDigestAlgorithm(pkcs7.OIDDigestAlgorithmSHA256)
	if err := sd.AddSigner(ca.cert, ca.key, pkcs7.SignerInfoConfig{}); err != nil {
		t.Fatal(err)
	}
	der, err := sd.Finish()
	if err != nil {
		t.Fatal(err)
	}
	return base64.StdEncoding.EncodeToString(der)
}

func writeFile(t testing.TB, dir, name string, data []byte) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// env is one test issuer with its fakes.
type env struct {
	t    testing.TB
	dir  string
	ec2  *fakeec2.Server
	reg  *prometheus.Registry
	logs *observer.ObservedLogs
	srv  *Server
	h    http.Handler
	cfg  *Config
	now  time.Time
	// replace fills KEY1, KEY2, RSAKEY, CA and EC2 in a YAML template.
	replace func(string) string
}

// envConfig is the YAML of a test issuer; %s placeholders are filled by
// newEnv: the CA file, the signing key file(s), the EC2 endpoint.
const baseYAML = `listen: 127.0.0.1:0
issuer: https://oidc.example.com/imds
signing:
  keys:
    - {file: "KEY1"}
attestation:
  aws_iid:
    certificates: ["CA"]
  ec2:
    endpoint: EC2
tokens:
  audience: sts.amazonaws.com
  ttl: 1h
policy:
  - name: billing
    match: {accounts: ["111111111111"]}
    subjects: [app, billing]
    principal_tags: {team: billing, host: "{instanceId}", workload: "{workload}", where: "{accountId}/{region}"}
    transitive_tag_keys: [team]
  - match: {accounts: ["222222222222"]}
    subjects: [other]
`

// newEnv starts an issuer from yaml after replacing KEY1, KEY2, RSAKEY, CA
// and EC2 with test files and the fake EC2's URL.
func newEnv(t testing.TB, yaml string) *env {
	t.Helper()
	ca, _ := cas()
	ec1, ec2k, rk := keyPEMs()
	e := &env{t: t, dir: t.TempDir(), ec2: fakeec2.Start(t), reg: prometheus.NewPedanticRegistry(), now: time.Now()}
	r := strings.NewReplacer(
		"KEY1", writeFile(t, e.dir, "k1.pem", ec1),
		"KEY2", writeFile(t, e.dir, "k2.pem", ec2k),
		"RSAKEY", writeFile(t, e.dir, "rsa.pem", rk),
		"CA", writeFile(t, e.dir, "ca.pem", ca.pem),
		"EC2", e.ec2.URL)
	e.replace = r.Replace
	cfg, err := ParseConfig([]byte(r.Replace(yaml)))
	if err != nil {
		t.Fatalf("config: %v", err)
	}
	e.cfg = cfg
	core, logs := observer.New(zapcore.DebugLevel)
	e.logs = logs
	srv, err := New(context.Background(), cfg, Options{
		Log: zap.New(core), Registerer: e.reg, Gatherer: e.reg, AWSConfig: testAWSConfig(""),
	})
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	e.srv, e.h = srv, srv.Handler()
	return e
}

// testAWSConfig is an SDK config with static credentials (and an endpoint
// for every service when endpoint is set), never the machine's.
func testAWSConfig(endpoint string) func(context.Context) (aws.Config, error) {
	return func(context.Context) (aws.Config, error) {
		c := aws.Config{Region: "us-east-1", Credentials: credentials.NewStaticCredentialsProvider("AKIDTESTTESTTEST0000", "secretsecretsecretsecret", ""),
			HTTPClient: &http.Client{Timeout: 10 * time.Second}, RetryMaxAttempts: 1}
		if endpoint != "" {
			c.BaseEndpoint = aws.String(endpoint)
		}
		return c, nil
	}
}

// post sends a token request to the handler and returns the status and the
// decoded body.
func (e *env) post(body any) (int, map[string]string) {
	e.t.Helper()
	rec := e.postRecorder(body)
	out := map[string]string{}
	_ = json.Unmarshal(rec.Body.Bytes(), &out)
	return rec.Code, out
}

// postRecorder is post returning the whole response.
func (e *env) postRecorder(body any) *httptest.ResponseRecorder {
	e.t.Helper()
	var b []byte
	switch v := body.(type) {
	case []byte:
		b = v
	case string:
		b = []byte(v)
	default:
		b, _ = json.Marshal(v)
	}
	req := httptest.NewRequest(http.MethodPost, PathToken, bytes.NewReader(b))
	req.Header.Set("Content-Type", "application/json")
	rec := httptest.NewRecorder()
	e.h.ServeHTTP(rec, req)
	return rec
}

func (e *env) get(path string) (int, []byte) {
	rec := httptest.NewRecorder()
	e.h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, path, nil))
	return rec.Code, rec.Body.Bytes()
}

// iidRequest is a valid aws_iid request for the default test instance.
func iidRequest(t testing.TB, workload string) map[string]string {
	ca, _ := cas()
	doc := iidDocument(testAccount, testInstance, testRegion, testPending)
	return map[string]string{"document": doc, "pkcs7": signIID(t, doc, ca), "workload": workload}
}

// verifyToken checks tok's signature against the JWKS served by the
// handler (go-jose, independently of the issuer's code) and returns the
// header kid and the claims.
func (e *env) verifyToken(tok string) (string, map[string]any) {
	e.t.Helper()
	_, jwks := e.get(PathJWKS)
	return verifyWithJWKS(e.t, tok, jwks)
}

func verifyWithJWKS(t testing.TB, tok string, jwksDoc []byte) (string, map[string]any) {
	t.Helper()
	var set jose.JSONWebKeySet
	if err := json.Unmarshal(jwksDoc, &set); err != nil {
		t.Fatalf("jwks: %v", err)
	}
	jws, err := jose.ParseSigned(tok, []jose.SignatureAlgorithm{jose.ES256, jose.RS256})
	if err != nil {
		t.Fatalf("parse token: %v", err)
	}
	kid := jws.Signatures[0].Header.KeyID
	keys := set.Key(kid)
	if len(keys) != 1 {
		t.Fatalf("kid %q is not in the JWKS", kid)
	}
	if keys[0].Algorithm != jws.Signatures[0].Header.Algorithm {
		t.Fatalf("JWKS alg %s, token alg %s", keys[0].Algorithm, jws.Signatures[0].Header.Algorithm)
	}
	payload, err := jws.Verify(keys[0].Key)
	if err != nil {
		t.Fatalf("token does not verify with the published key: %v", err)
	}
	var claims map[string]any
	if err := json.Unmarshal(payload, &claims); err != nil {
		t.Fatal(err)
	}
	return kid, claims
}

// logText is every logged message and field, for secret checks.
func logText(logs *observer.ObservedLogs) string {
	var b strings.Builder
	for _, e := range logs.All() {
		b.WriteString(e.Message)
		for k, v := range e.ContextMap() {
			fmt.Fprintf(&b, " %s=%v", k, v)
		}
		b.WriteByte('\n')
	}
	return b.String()
}

// signGCI returns a presigned sts:GetCallerIdentity for endpoint, signed
// with the credentials, carrying (and signing) X-Imdsproxy-Issuer:
// issuerHdr unless it is empty.
func signGCI(t testing.TB, endpoint, issuerHdr string, creds aws.Credentials, at time.Time) *STSRequest {
	t.Helper()
	body := "Action=GetCallerIdentity&Version=2011-06-15"
	req, _ := http.NewRequest(http.MethodPost, endpoint, strings.NewReader(body))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded; charset=utf-8")
	if issuerHdr != "" {
		req.Header.Set(HeaderIssuer, issuerHdr)
	}
	sum := sha256.Sum256([]byte(body))
	if err := v4.NewSigner().SignHTTP(context.Background(), creds, req, hex.EncodeToString(sum[:]), "sts", "us-east-1", at); err != nil {
		t.Fatal(err)
	}
	h := map[string][]string{}
	for k, v := range req.Header {
		h[k] = v
	}
	return &STSRequest{Method: http.MethodPost, URL: endpoint, Headers: h, Body: body}
}

var (
	cryptoSHA256 = crypto.SHA256
	jwtShape     = regexp.MustCompile(`eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.`)
)

func b64(b []byte) string { return base64.RawURLEncoding.EncodeToString(b) }

func mustB64(t testing.TB, s string) []byte {
	t.Helper()
	b, err := base64.RawURLEncoding.DecodeString(s)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func mustJSON(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	return b
}

func newRegistry() *prometheus.Registry { return prometheus.NewPedanticRegistry() }
