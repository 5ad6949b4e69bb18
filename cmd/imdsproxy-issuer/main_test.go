package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/smallstep/pkcs7"

	"github.com/imdsproxy/imdsproxy/connlimit/connlimittest"
	fakes3 "github.com/imdsproxy/imdsproxy/test/fakes/s3"
	"github.com/imdsproxy/imdsproxy/token"
)

// bin is the binary built by TestMain.
var bin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "imdsproxy-issuer-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	bin = filepath.Join(dir, "imdsproxy-issuer")
	build := exec.Command("go", "build", "-o", bin, ".")
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "go build:", err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// fixture is a test CA standing in for AWS's identity document signer, and
// an ES256 signing key, written to dir.
type fixture struct {
	dir     string
	caCert  *x509.Certificate
	caKey   *rsa.PrivateKey
	caFile  string
	keyFile string
}

var (
	fixOnce sync.Once
	fixCA   *x509.Certificate
	fixKey  *rsa.PrivateKey
	fixCPEM []byte
)

func newFixture(t *testing.T) *fixture {
	t.Helper()
	fixOnce.Do(func() {
		fixKey, _ = rsa.GenerateKey(rand.Reader, 2048)
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(42), Subject: pkix.Name{CommonName: "test region signer"},
			NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour)}
		der, _ := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &fixKey.PublicKey, fixKey)
		fixCA, _ = x509.ParseCertificate(der)
		fixCPEM = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	})
	dir := t.TempDir()
	ec, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	kder, _ := x509.MarshalPKCS8PrivateKey(ec)
	f := &fixture{dir: dir, caCert: fixCA, caKey: fixKey}
	f.caFile = f.write(t, "ca.pem", fixCPEM)
	f.keyFile = f.write(t, "signing.pem", pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder}))
	return f
}

func (f *fixture) write(t *testing.T, name string, data []byte) string {
	t.Helper()
	p := filepath.Join(f.dir, name)
	if err := os.WriteFile(p, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// config is a valid issuer config listening on addr.
func (f *fixture) config(addr, extra string) string {
	return fmt.Sprintf(`listen: %s
issuer: https://oidc.example.com/imds
signing:
  keys:
    - {file: %q}
attestation:
  aws_iid:
    certificates: [%q]
tokens:
  audience: sts.amazonaws.com
  ttl: 1h
policy:
  - match: {accounts: ["111111111111"]}
    subjects: ["app", "billing"]
%s`, addr, f.keyFile, f.caFile, extra)
}

func (f *fixture) document() (doc, sig string) {
	doc = `{
  "accountId" : "111111111111",
  "instanceId" : "i-0123456789abcdef0",
  "pendingTime" : "2026-01-02T03:04:05Z",
  "region" : "us-east-1"
}`
	sd, _ := pkcs7.NewSignedData([]byte(doc))
	_ = sd.AddSigner(f.caCert, f.caKey, pkcs7.SignerInfoConfig{})
	der, _ := sd.Finish()
	return doc, base64.StdEncoding.EncodeToString(der)
}

// runBin runs the binary to completion and returns its exit code and
// output.
func runBin(t *testing.T, env []string, args ...string) (int, string, string) {
	t.Helper()
	cmd := exec.Command(bin, args...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	cmd.Env = append(cleanEnv(), env...)
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return code, out.String(), errb.String()
}

// cleanEnv is the environment without AWS settings of the machine.
func cleanEnv() []string {
	var env []string
	for _, e := range os.Environ() {
		if !strings.HasPrefix(e, "AWS_") {
			env = append(env, e)
		}
	}
	return append(env, "AWS_EC2_METADATA_DISABLED=true", "AWS_CONFIG_FILE=/nonexistent", "AWS_SHARED_CREDENTIALS_FILE=/nonexistent")
}

func TestCheckConfig(t *testing.T) {
	f := newFixture(t)
	valid := f.config("127.0.0.1:8443", "")
	for _, tc := range []struct {
		name, yaml string
		code       int
		want       string // in stdout (0) or stderr
	}{
		{"valid", valid, 0, "ok (issuer https://oidc.example.com/imds"},
		{"unknown key", strings.Replace(valid, "ttl: 1h", "tll: 1h", 1), 3, "unknown key tokens.tll"},
		{"bad value", strings.Replace(valid, "ttl: 1h", "ttl: 100h", 1), 3, "tokens.ttl"},
		{"bad account", strings.Replace(valid, `"111111111111"`, `"1234"`, 1), 3, "policy[0].match.accounts[0]"},
		{"missing key file", strings.Replace(valid, f.keyFile, "/nonexistent/key.pem", 1), 3, "signing.keys[0].file"},
		{"plain HTTP off loopback", strings.Replace(valid, "127.0.0.1:8443", "0.0.0.0:8443", 1), 3, "tls"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := f.write(t, "c.yaml", []byte(tc.yaml))
			code, out, errOut := runBin(t, nil, "check-config", p)
			got := out
			if tc.code != 0 {
				got = errOut
			}
			if code != tc.code || !strings.Contains(got, tc.want) {
				t.Fatalf("exit %d, stdout %q, stderr %q; want %d and %q", code, out, errOut, tc.code, tc.want)
			}
		})
	}
	t.Run("rotation warning", func(t *testing.T) {
		two := strings.Replace(valid, fmt.Sprintf("    - {file: %q}", f.keyFile),
			fmt.Sprintf("    - {file: %q, published_at: %q}\n    - {file: %q}", f.keyFile, time.Now().UTC().Format(time.RFC3339), f.keyFile+"2"), 1)
		f.write(t, "signing.pem2", mustRead(t, f.keyFile))
		code, _, errOut := runBin(t, nil, "check-config", f.write(t, "two.yaml", []byte(two)))
		if code != 0 || !strings.Contains(errOut, "warning: signing.keys[0].published_at") {
			t.Fatalf("exit %d stderr %q", code, errOut)
		}
	})
	if code, _, _ := runBin(t, nil, "check-config"); code != 2 {
		t.Fatalf("no file: exit %d", code)
	}
	if code, out, _ := runBin(t, nil, "version"); code != 0 || !strings.HasPrefix(out, "imdsproxy-issuer ") {
		t.Fatalf("version: %d %q", code, out)
	}
}

func mustRead(t *testing.T, p string) []byte {
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// daemon is a running `imdsproxy-issuer serve`.
type daemon struct {
	cmd    *exec.Cmd
	base   string
	mu     sync.Mutex
	stderr bytes.Buffer
	done   chan error
}

func startServe(t *testing.T, cfgPath, addr string) *daemon {
	t.Helper()
	d := &daemon{base: "http://" + addr, done: make(chan error, 1)}
	d.cmd = exec.Command(bin, "serve", "--config", cfgPath, "--log-level", "debug")
	d.cmd.Env = cleanEnv()
	pr, pw := io.Pipe()
	d.cmd.Stderr = pw
	go func() {
		s := bufio.NewScanner(pr)
		for s.Scan() {
			d.mu.Lock()
			d.stderr.WriteString(s.Text() + "\n")
			d.mu.Unlock()
		}
	}()
	if err := d.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { d.done <- d.cmd.Wait(); pw.Close() }()
	t.Cleanup(func() {
		_ = d.cmd.Process.Kill()
	})
	deadline := time.Now().Add(20 * time.Second)
	for {
		resp, err := http.Get(d.base + "/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return d
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("not ready in time; stderr:\n%s", d.logs())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (d *daemon) logs() string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.stderr.String()
}

func getBody(t *testing.T, url string) []byte {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 {
		t.Fatalf("GET %s: %d %s", url, resp.StatusCode, b)
	}
	return b
}

// mint asks the daemon for a token and verifies it against the served
// JWKS; it returns the claims.
func (d *daemon) mint(t *testing.T, f *fixture, workload string) (string, map[string]any) {
	t.Helper()
	doc, sig := f.document()
	body, _ := json.Marshal(map[string]string{"document": doc, "pkcs7": sig, "workload": workload})
	resp, err := http.Post(d.base+"/v1/token", "application/json", bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var out map[string]string
	_ = json.NewDecoder(resp.Body).Decode(&out)
	if resp.StatusCode != 200 {
		t.Fatalf("mint: %d %v", resp.StatusCode, out)
	}
	return out["token"], verify(t, out["token"], getBody(t, d.base+"/.well-known/jwks.json"))
}

func verify(t *testing.T, tok string, jwks []byte) map[string]any {
	t.Helper()
	var set jose.JSONWebKeySet
	if err := json.Unmarshal(jwks, &set); err != nil {
		t.Fatal(err)
	}
	jws, err := jose.ParseSigned(tok, []jose.SignatureAlgorithm{jose.ES256, jose.RS256})
	if err != nil {
		t.Fatal(err)
	}
	keys := set.Key(jws.Signatures[0].Header.KeyID)
	if len(keys) != 1 {
		t.Fatal("kid not in the JWKS")
	}
	payload, err := jws.Verify(keys[0].Key)
	if err != nil {
		t.Fatal(err)
	}
	var c map[string]any
	_ = json.Unmarshal(payload, &c)
	return c
}

func TestServe(t *testing.T) {
	f := newFixture(t)
	addr := freeAddr(t)
	cfgPath := f.write(t, "issuer.yaml", []byte(f.config(addr, "")))
	d := startServe(t, cfgPath, addr)

	var disc map[string]any
	_ = json.Unmarshal(getBody(t, d.base+"/.well-known/openid-configuration"), &disc)
	if disc["issuer"] != "https://oidc.example.com/imds" || disc["jwks_uri"] != "https://oidc.example.com/imds/.well-known/jwks.json" {
		t.Fatalf("discovery %v", disc)
	}
	tok, c := d.mint(t, f, "")
	if c["sub"] != "app" || c["exp"].(float64)-c["iat"].(float64) != 3600 {
		t.Fatalf("claims %v", c)
	}
	if _, c := d.mint(t, f, "billing"); c["sub"] != "billing" {
		t.Fatalf("claims %v", c)
	}

	// The daemon's own issuer client (token.URL) against the binary.
	imds := startIMDS(t, f)
	u, err := token.NewURL(d.base+"/v1/token", token.URLOptions{IMDSBase: imds}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	got, err := u.Token(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if c, _ := token.ParseClaims(got); c.Subject != "app" {
		t.Fatalf("token.URL sub %q", c.Subject)
	}
	billing, err := u.For("billing")
	if err != nil {
		t.Fatal(err)
	}
	got, err = billing.Token(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if c, _ := token.ParseClaims(got); c.Subject != "billing" {
		t.Fatalf("token.URL.For(billing) sub %q", c.Subject)
	}

	// SIGHUP: a good config is applied, a bad one refused and the old kept.
	if err := os.WriteFile(cfgPath, []byte(strings.Replace(f.config(addr, ""), "ttl: 1h", "ttl: 30m", 1)), 0o600); err != nil {
		t.Fatal(err)
	}
	_ = d.cmd.Process.Signal(syscall.SIGHUP)
	waitFor(t, func() bool { _, c := d.mint(t, f, ""); return c["exp"].(float64)-c["iat"].(float64) == 1800 }, "reload to ttl 30m")
	if err := os.WriteFile(cfgPath, []byte(strings.Replace(f.config(addr, ""), "ttl: 1h", "bogus: 1", 1)), 0o600); err != nil {
		t.Fatal(err)
	}
	_ = d.cmd.Process.Signal(syscall.SIGHUP)
	waitFor(t, func() bool {
		return bytes.Contains(getBody(t, d.base+"/metrics"), []byte("imdsproxy_issuer_config_last_reload_successful 0"))
	}, "the reload gauge at 0")
	if _, c := d.mint(t, f, ""); c["exp"].(float64)-c["iat"].(float64) != 1800 {
		t.Fatal("the last good config was not kept")
	}

	// SIGTERM drains and exits 0.
	_ = d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-d.done:
		if err != nil {
			t.Fatalf("exit after SIGTERM: %v\n%s", err, d.logs())
		}
	case <-time.After(15 * time.Second):
		t.Fatal("no exit after SIGTERM")
	}
	logs := d.logs()
	if strings.Contains(logs, tok) || strings.Contains(logs, strings.Split(tok, ".")[2]) || strings.Contains(logs, "PRIVATE KEY") {
		t.Fatal("the logs hold a token or a key")
	}
	if !strings.Contains(logs, `"token minted"`) || !strings.Contains(logs, "configuration refused") {
		t.Fatalf("expected log lines missing:\n%s", logs)
	}
}

// TestServeConnectionLimit: the listener keeps at most max_connections
// open, and clients that merely keep connections open cannot lock others
// out: with every slot held by an idle keep-alive connection, a new client
// is answered at once (the one idle the longest gives way).
func TestServeConnectionLimit(t *testing.T) {
	f := newFixture(t)
	addr := freeAddr(t)
	const limit = 4
	cfgPath := f.write(t, "issuer.yaml", []byte(f.config(addr, fmt.Sprintf("max_connections: %d\n", limit))))
	d := startServe(t, cfgPath, addr)
	http.DefaultClient.CloseIdleConnections() // startServe's readiness checks

	get := func(c net.Conn) error {
		resp, _, err := connlimittest.RoundTrip(c, "GET /healthz HTTP/1.1\r\nHost: "+addr+"\r\n\r\n", 5*time.Second)
		if err != nil {
			return err
		}
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("status %s", resp.Status)
		}
		return nil
	}
	for i := range limit + 2 {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		// Answered at once, the slots full of idle connections from the
		// fifth on; far below the 2-minute idle timeout.
		if err := get(c); err != nil {
			t.Fatalf("connection %d with %d slots: %v", i+1, limit, err)
		}
	}
	metrics := string(getBody(t, d.base+"/metrics"))
	for _, want := range []string{
		fmt.Sprintf("imdsproxy_issuer_open_connections %d", limit),
		"imdsproxy_issuer_idle_connections_closed_total 3",
		"imdsproxy_issuer_connection_limit_reached_total 3",
	} {
		if !strings.Contains(metrics, want) {
			t.Errorf("metrics lack %q", want)
		}
	}
}

func waitFor(t *testing.T, cond func() bool, what string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// startIMDS serves the instance identity document and its signature with
// IMDSv2, as the daemon reads them.
func startIMDS(t *testing.T, f *fixture) string {
	t.Helper()
	doc, sig := f.document()
	mux := http.NewServeMux()
	mux.HandleFunc("PUT /latest/api/token", func(w http.ResponseWriter, r *http.Request) { _, _ = io.WriteString(w, "tok") })
	mux.HandleFunc("GET /latest/dynamic/instance-identity/document", func(w http.ResponseWriter, r *http.Request) { _, _ = io.WriteString(w, doc) })
	mux.HandleFunc("GET /latest/dynamic/instance-identity/pkcs7", func(w http.ResponseWriter, r *http.Request) { _, _ = io.WriteString(w, wrap(sig)) })
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: mux}
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() { srv.Close() })
	return "http://" + ln.Addr().String()
}

func wrap(s string) string {
	var b strings.Builder
	for len(s) > 64 {
		b.WriteString(s[:64] + "\n")
		s = s[64:]
	}
	return b.String() + s
}

func TestPublishCommand(t *testing.T) {
	f := newFixture(t)
	s3 := fakes3.Start(t)
	s3.CreateBucket("oidc")
	s3.AllowSigned("AKIAPUBLISHER0000000", "publisher-secret", "")
	cfg := f.config("127.0.0.1:8443", fmt.Sprintf("publish: {bucket: oidc, prefix: imds, region: us-east-1, endpoint: %q, path_style: true}\n", s3.URL))
	p := f.write(t, "issuer.yaml", []byte(cfg))
	code, out, errOut := runBin(t, []string{"AWS_ACCESS_KEY_ID=AKIAPUBLISHER0000000", "AWS_SECRET_ACCESS_KEY=publisher-secret", "AWS_REGION=us-east-1"},
		"publish", "--config", p)
	if code != 0 || !strings.Contains(out, "published s3://oidc/imds/.well-known/openid-configuration") {
		t.Fatalf("exit %d\n%s\n%s", code, out, errOut)
	}
	o, ok := s3.Object("oidc", "imds/.well-known/jwks.json")
	if !ok || o.ContentType != "application/json" || !bytes.Contains(o.Body, []byte(`"ES256"`)) {
		t.Fatalf("jwks object %+v", o)
	}
	code, _, errOut = runBin(t, []string{"AWS_ACCESS_KEY_ID=AKIAPUBLISHER0000000", "AWS_SECRET_ACCESS_KEY=wrong", "AWS_REGION=us-east-1"},
		"publish", "--config", p)
	if code != 1 || !strings.Contains(errOut, "SignatureDoesNotMatch") {
		t.Fatalf("wrong secret: exit %d %s", code, errOut)
	}
	code, _, errOut = runBin(t, nil, "publish", "--config", f.write(t, "nopub.yaml", []byte(f.config("127.0.0.1:8443", ""))))
	if code != 3 || !strings.Contains(errOut, "publish") {
		t.Fatalf("without publish: exit %d %s", code, errOut)
	}
}

// TestDrain: after SIGTERM /readyz fails at once while tokens are still
// served for shutdown.drain_delay, then the process exits 0.
func TestDrain(t *testing.T) {
	f := newFixture(t)
	addr := freeAddr(t)
	d := startServe(t, f.write(t, "issuer.yaml", []byte(f.config(addr, "shutdown: {drain_delay: 3s, timeout: 5s}\n"))), addr)
	_ = d.cmd.Process.Signal(syscall.SIGTERM)
	waitFor(t, func() bool {
		resp, err := http.Get(d.base + "/readyz")
		if err != nil {
			return false
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode == http.StatusServiceUnavailable && strings.Contains(string(b), "shutting down")
	}, "readyz to fail after SIGTERM")
	if _, c := d.mint(t, f, ""); c["sub"] != "app" {
		t.Fatal("no token while draining")
	}
	select {
	case err := <-d.done:
		if err != nil {
			t.Fatalf("exit: %v", err)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("no exit after the drain")
	}
}
