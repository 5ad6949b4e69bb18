package issuer

import (
	"encoding/base64"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	fakeec2 "github.com/imdsproxy/imdsproxy/test/fakes/ec2"
)

func TestIIDSignatures(t *testing.T) {
	ca, other := cas()
	doc := iidDocument(testAccount, testInstance, testRegion, testPending)
	good := signIID(t, doc, ca)
	der, _ := base64.StdEncoding.DecodeString(good)
	tampered := append([]byte(nil), der...)
	tampered[len(tampered)-10] ^= 0xff // inside the signature value
	otherDoc := iidDocument(testAccount, "i-0fffffffffffffff0", testRegion, testPending)
	e := newEnv(t, baseYAML)
	for _, tc := range []struct {
		name   string
		req    map[string]string
		status int
		code   string
	}{
		{"pkcs7 by trusted certificate", map[string]string{"document": doc, "pkcs7": good}, 200, ""},
		{"rsa2048 alone", map[string]string{"document": doc, "rsa2048": good}, 200, ""},
		{"with line breaks as IMDS serves it", map[string]string{"document": doc, "pkcs7": wrap64(good)}, 200, ""},
		{"untrusted certificate", map[string]string{"document": doc, "pkcs7": signIID(t, doc, other)}, 403, reasonUntrusted},
		{"signature does not verify", map[string]string{"document": doc, "pkcs7": base64.StdEncoding.EncodeToString(tampered)}, 403, reasonBadSignature},
		{"signed content differs from document", map[string]string{"document": otherDoc, "pkcs7": good}, 403, reasonDocumentMismatch},
		{"one of two signatures differs", map[string]string{"document": doc, "pkcs7": good, "rsa2048": signIID(t, otherDoc, ca)}, 403, reasonDocumentMismatch},
		{"not base64", map[string]string{"document": doc, "pkcs7": "!!!"}, 400, reasonMalformed},
		{"not PKCS7", map[string]string{"document": doc, "pkcs7": base64.StdEncoding.EncodeToString([]byte("hello"))}, 400, reasonMalformed},
		{"no signature", map[string]string{"document": doc}, 400, reasonMalformed},
		{"no document", map[string]string{"pkcs7": good}, 400, reasonMalformed},
		{"document is not an identity document", map[string]string{"document": "{}", "pkcs7": signIID(t, "{}", ca)}, 400, reasonMalformed},
	} {
		t.Run(tc.name, func(t *testing.T) {
			status, out := e.post(tc.req)
			if status != tc.status || out["code"] != tc.code {
				t.Fatalf("status %d code %q (%s); want %d %q", status, out["code"], out["message"], tc.status, tc.code)
			}
			if status == 200 {
				_, c := e.verifyToken(out["token"])
				if c["sub"] != "app" {
					t.Fatalf("sub %v", c["sub"])
				}
			}
		})
	}
}

func wrap64(s string) string {
	var b strings.Builder
	for len(s) > 64 {
		b.WriteString(s[:64] + "\n")
		s = s[64:]
	}
	return b.String() + s
}

// TestIIDDSA verifies what EC2 really serves at /pkcs7: SHA-1 with DSA,
// streamed BER. Go's x509 no longer verifies DSA; the issuer does.
func TestIIDDSA(t *testing.T) {
	read := func(p string) string {
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	t.Run("openssl-made DSA signer", func(t *testing.T) {
		certs, err := parseCertificates([]byte(read("testdata/dsa-cert.pem")), "dsa-cert.pem")
		if err != nil {
			t.Fatal(err)
		}
		ts := &trustStore{certs: certs}
		content, err := ts.verifyPKCS7(read("testdata/dsa-document.pkcs7"))
		if err != nil {
			t.Fatal(err)
		}
		if string(content) != read("testdata/dsa-document.json") {
			t.Fatal("signed content differs from the document")
		}
		// The AWS certificates do not trust it; a flipped byte breaks it.
		aws, _ := loadTrustStore(nil)
		if _, err := aws.verifyPKCS7(read("testdata/dsa-document.pkcs7")); reasonOf(err) != reasonUntrusted {
			t.Fatalf("AWS certificates: %v", err)
		}
		der, _ := base64.StdEncoding.DecodeString(strings.Join(strings.Fields(read("testdata/dsa-document.pkcs7")), ""))
		der[len(der)-12] ^= 1
		if _, err := ts.verifyPKCS7(base64.StdEncoding.EncodeToString(der)); err == nil {
			t.Fatal("a tampered DSA signature verified")
		}
	})
	t.Run("document signed by AWS in us-east-1, with the shipped certificates", func(t *testing.T) {
		// A real document (instance i-f79fe56c, 2016) as EC2 served it at
		// /latest/dynamic/instance-identity/pkcs7, from public PKCS7 test
		// suites: it proves the shipped certificate and the DSA path.
		aws, err := loadTrustStore(nil)
		if err != nil {
			t.Fatal(err)
		}
		content, err := aws.verifyPKCS7(read("testdata/aws-us-east-1-2016.pkcs7"))
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(string(content), `"instanceId" : "i-f79fe56c"`) {
			t.Fatalf("content %q", content)
		}
	})
}

func TestIIDShippedCertificates(t *testing.T) {
	ts, err := loadTrustStore(nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(ts.certs) < 40 {
		t.Fatalf("%d shipped certificates", len(ts.certs))
	}
	for _, c := range ts.certs {
		if c.NotAfter.Before(time.Now()) {
			t.Errorf("shipped certificate %s expired %s", c.Subject, c.NotAfter)
		}
	}
}

func TestIIDReplayDefences(t *testing.T) {
	ca, _ := cas()
	yaml := strings.Replace(baseYAML, "certificates: [\"CA\"]", "certificates: [\"CA\"]\n    verify_instance: true\n    max_instance_age: 8760h", 1)
	profile := "arn:aws:iam::111111111111:instance-profile/app-host"
	for _, tc := range []struct {
		name    string
		setup   func(f *fakeec2.Server)
		pending time.Time
		status  int
		code    string
	}{
		{"running, launch time matches", func(f *fakeec2.Server) {
			f.Put(testRegion, fakeec2.Instance{ID: testInstance, State: "running", LaunchTime: testPending, InstanceProfileARN: profile})
		}, testPending, 200, ""},
		{"terminated", func(f *fakeec2.Server) {
			f.Put(testRegion, fakeec2.Instance{ID: testInstance, State: "terminated", LaunchTime: testPending})
		}, testPending, 403, reasonNotRunning},
		{"unknown to EC2", func(f *fakeec2.Server) {}, testPending, 403, reasonNotRunning},
		{"in another region", func(f *fakeec2.Server) {
			f.Put("eu-west-1", fakeec2.Instance{ID: testInstance, State: "running", LaunchTime: testPending})
		}, testPending, 403, reasonNotRunning},
		{"document of an earlier launch", func(f *fakeec2.Server) {
			f.Put(testRegion, fakeec2.Instance{ID: testInstance, State: "running", LaunchTime: testPending.Add(48 * time.Hour)})
		}, testPending, 403, reasonLaunchMismatch},
		{"instance older than max_instance_age", func(f *fakeec2.Server) {
			f.Put(testRegion, fakeec2.Instance{ID: testInstance, State: "running", LaunchTime: testPending})
		}, time.Now().Add(-9000 * time.Hour), 403, reasonTooOld},
		{"EC2 unavailable", func(f *fakeec2.Server) { f.SetFail(true) }, testPending, 503, reasonEC2Unavailable},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, yaml)
			tc.setup(e.ec2)
			doc := iidDocument(testAccount, testInstance, testRegion, tc.pending)
			req := map[string]string{"document": doc, "pkcs7": signIID(t, doc, ca)}
			status, out := e.post(req)
			if status != tc.status || out["code"] != tc.code {
				t.Fatalf("status %d code %q (%s); want %d %q", status, out["code"], out["message"], tc.status, tc.code)
			}
			if status == http.StatusOK {
				// Cached: a second request does not ask EC2 again.
				calls := e.ec2.Calls()
				if status, _ := e.post(req); status != 200 || e.ec2.Calls() != calls {
					t.Fatalf("second request: status %d, EC2 calls %d → %d", status, calls, e.ec2.Calls())
				}
			}
		})
	}
}
