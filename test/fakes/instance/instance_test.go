package instance_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"net/http/httptest"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/smallstep/pkcs7"

	"github.com/imdsproxy/imdsproxy/issuer"
	"github.com/imdsproxy/imdsproxy/test/e2e"
	"github.com/imdsproxy/imdsproxy/test/fakes/instance"
)

// verify checks that sig (base64, wrapped) is a PKCS7 signed by ca with
// content, and that it carries it.
func verify(t *testing.T, ca *instance.CA, sig, content string) {
	t.Helper()
	der, err := base64.StdEncoding.DecodeString(strings.Join(strings.Fields(sig), ""))
	if err != nil {
		t.Fatalf("not base64: %v", err)
	}
	p7, err := pkcs7.Parse(der)
	if err != nil {
		t.Fatal(err)
	}
	if strings.TrimSpace(string(p7.Content)) != strings.TrimSpace(content) {
		t.Fatalf("signed content %q, want %q", p7.Content, content)
	}
	p7.Certificates = []*x509.Certificate{ca.Cert}
	if err := p7.Verify(); err != nil {
		t.Fatalf("signature does not verify with the CA: %v", err)
	}
}

func TestNew(t *testing.T) {
	pending := time.Date(2026, 3, 4, 5, 6, 7, 890, time.UTC)
	in, err := instance.New(instance.Options{AccountID: "123456789012", Region: "eu-west-1", PendingTime: pending})
	if err != nil {
		t.Fatal(err)
	}
	var doc map[string]any
	if err := json.Unmarshal([]byte(in.Document), &doc); err != nil {
		t.Fatal(err)
	}
	if doc["accountId"] != "123456789012" || doc["region"] != "eu-west-1" || doc["instanceId"] != in.InstanceID ||
		doc["pendingTime"] != "2026-03-04T05:06:07Z" || doc["availabilityZone"] != "eu-west-1a" {
		t.Fatalf("document %v", doc)
	}
	if !strings.HasPrefix(in.InstanceID, "i-") || len(in.InstanceID) != 19 {
		t.Fatalf("instance id %q", in.InstanceID)
	}
	verify(t, in.CA, in.PKCS7, in.Document)
	verify(t, in.CA, in.RSA2048, in.Document)
	for _, line := range strings.Split(in.PKCS7, "\n") {
		if len(line) > 64 {
			t.Fatalf("pkcs7 not wrapped at 64: %d", len(line))
		}
	}
	if in.ProfileRoleARN() != "arn:aws:iam::123456789012:role/imdsproxy-host" {
		t.Fatalf("profile role %s", in.ProfileRoleARN())
	}
	if _, err := in.AEMMConfig(); err == nil {
		t.Fatal("AEMMConfig without credentials accepted")
	}
	in.Credentials = instance.Credentials{AccessKeyID: "ASIAEXAMPLE", SecretAccessKey: "s3cr3t", SessionToken: "t0k3n", Expiration: time.Now().Add(time.Hour)}
	if s := fmt.Sprintf("%v %+v %#v %s", in.Credentials, in.Credentials, in.Credentials, in.Credentials); strings.Contains(s, "s3cr3t") || strings.Contains(s, "t0k3n") {
		t.Fatalf("credentials print their secret: %s", s)
	}

	for _, bad := range []instance.Options{{AccountID: "1234"}, {InstanceID: "x-1"}, {Region: "mars"}, {ProfileRole: "a/b"}} {
		if _, err := instance.New(bad); err == nil {
			t.Errorf("New(%+v) accepted", bad)
		}
	}
}

// TestAEMMServesIt runs amazon-ec2-metadata-mock with the instance's config
// and checks it serves exactly the signed document, both signatures and the
// instance profile's credentials.
func TestAEMMServesIt(t *testing.T) {
	if _, err := os.Stat(e2e.AEMMBinary()); err != nil {
		if os.Getenv("IMDSPROXY_E2E_ALLOW_MISSING") == "1" {
			t.Skip("amazon-ec2-metadata-mock is not installed")
		}
		t.Fatalf("amazon-ec2-metadata-mock (%s) is not installed: `make tools` installs it", e2e.AEMMBinary())
	}
	in, err := instance.New(instance.Options{})
	if err != nil {
		t.Fatal(err)
	}
	in.Credentials = instance.Credentials{AccessKeyID: "ASIAEXAMPLEEXAMPLE00", SecretAccessKey: strings.Repeat("k", 40),
		SessionToken: "IQoJexample", Expiration: time.Now().Add(6 * time.Hour)}
	home := t.TempDir()
	if err := in.WriteAEMMConfig(home); err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(home + "/" + instance.AEMMConfigFile); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("config file: %v %v", fi, err)
	}
	a, err := e2e.StartAEMM(e2e.AEMMOptions{Home: home, IMDSv2Only: true})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Stop(5 * time.Second)
	get := func(path string) string {
		t.Helper()
		st, body, err := e2e.IMDSGet(context.Background(), e2e.Client, a.URL, path, a.Token)
		if err != nil || st != 200 {
			t.Fatalf("GET %s: %d %v\n%s", path, st, err, a.Out)
		}
		return body
	}
	if doc := get("/latest/dynamic/instance-identity/document"); strings.TrimSpace(doc) != strings.TrimSpace(in.Document) {
		t.Fatalf("AEMM serves the document\n%s\nbut the signed one is\n%s", doc, in.Document)
	}
	verify(t, in.CA, get("/latest/dynamic/instance-identity/pkcs7"), in.Document)
	verify(t, in.CA, get("/latest/dynamic/instance-identity/rsa2048"), in.Document)
	if got := get("/latest/meta-data/instance-id"); got != in.InstanceID {
		t.Fatalf("instance-id %q", got)
	}
	if got := get("/latest/meta-data/placement/region"); got != in.Region {
		t.Fatalf("region %q", got)
	}
	if got := get(e2e.CredentialsPath); got != in.ProfileRole {
		t.Fatalf("role listing %q", got)
	}
	d, err := e2e.GetCredDoc(context.Background(), e2e.Client, a.URL, in.ProfileRole, a.Token)
	if err != nil {
		t.Fatal(err)
	}
	c := in.Credentials
	if d.AccessKeyId != c.AccessKeyID || d.SecretAccessKey != c.SecretAccessKey || d.Token != c.SessionToken ||
		d.Expiration != c.Expiration.UTC().Format("2006-01-02T15:04:05Z") {
		t.Fatalf("AEMM serves other credentials: %s (want %s)", d.AccessKeyId, c)
	}
	var info struct{ Code, InstanceProfileArn string }
	if err := json.Unmarshal([]byte(get("/latest/meta-data/iam/info")), &info); err != nil || info.InstanceProfileArn != in.InstanceProfileARN() {
		t.Fatalf("iam/info %+v %v", info, err)
	}
}

// TestIssuerVerifies: imdsproxy-issuer's aws_iid method, trusting the CA,
// accepts the document with either signature and refuses it under another
// CA.
func TestIssuerVerifies(t *testing.T) {
	in, err := instance.New(instance.Options{})
	if err != nil {
		t.Fatal(err)
	}
	other, err := instance.NewCA("another signer")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	ca, wrong := dir+"/ca.pem", dir+"/other.pem"
	if err := in.CA.WriteCert(ca); err != nil {
		t.Fatal(err)
	}
	if err := other.WriteCert(wrong); err != nil {
		t.Fatal(err)
	}
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	der, _ := x509.MarshalPKCS8PrivateKey(key)
	if err := os.WriteFile(dir+"/k.pem", pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name, certs string
		fields      map[string]string
		want        int
	}{
		{"pkcs7", ca, map[string]string{"pkcs7": in.PKCS7}, 200},
		{"rsa2048", ca, map[string]string{"rsa2048": in.RSA2048}, 200},
		{"both", ca, map[string]string{"pkcs7": in.PKCS7, "rsa2048": in.RSA2048}, 200},
		{"untrusted CA", wrong, map[string]string{"pkcs7": in.PKCS7}, 403},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg, err := issuer.ParseConfig([]byte(fmt.Sprintf(`listen: 127.0.0.1:0
issuer: https://oidc.example.com
signing: {keys: [{file: %q}]}
attestation: {aws_iid: {certificates: [%q], max_instance_age: 1h}}
policy:
  - match: {accounts: [%q], regions: [%q]}
    subjects: [app]
`, dir+"/k.pem", tc.certs, in.AccountID, in.Region)))
			if err != nil {
				t.Fatal(err)
			}
			srv, err := issuer.New(context.Background(), cfg, issuer.Options{Registerer: prometheus.NewRegistry()})
			if err != nil {
				t.Fatal(err)
			}
			body := map[string]string{"document": in.Document}
			for k, v := range tc.fields {
				body[k] = v
			}
			b, _ := json.Marshal(body)
			req := httptest.NewRequest("POST", "/v1/token", bytes.NewReader(b))
			req.Header.Set("Content-Type", "application/json")
			rec := httptest.NewRecorder()
			srv.Handler().ServeHTTP(rec, req)
			if rec.Code != tc.want {
				t.Fatalf("status %d, want %d: %s", rec.Code, tc.want, rec.Body)
			}
		})
	}
}
