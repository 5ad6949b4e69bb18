package issuer

import (
	"context"
	"crypto/x509"
	"encoding/base64"
	"os"
	"strings"
	"testing"
)

func FuzzParseTokenRequest(f *testing.F) {
	for _, s := range []string{
		`{"document":"{}","pkcs7":"MIAG"}`,
		`{"document":"{}","pkcs7":"MIAG","workload":"app"}`,
		`{"method":"aws_iam","sts_request":{"method":"POST","url":"https://sts.amazonaws.com/","headers":{"Authorization":["AWS4-HMAC-SHA256 Credential=a/20260101/us-east-1/sts/aws4_request, SignedHeaders=host;x-imdsproxy-issuer, Signature=00"]},"body":"Action=GetCallerIdentity&Version=2011-06-15"},"region":"us-east-1"}`,
		`{"method":"aws_iid","rsa2048":"x"}`, `{}`, `[]`, `null`, `{"workload":1}`, `{"a":1}`, ``,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		req, err := ParseTokenRequest(body)
		if err != nil {
			if reasonOf(err) != reasonBadRequest && reasonOf(err) != reasonTooLarge {
				t.Fatalf("reason %s", reasonOf(err))
			}
			if strings.Contains(err.Error(), string(body)) && len(body) > 16 {
				t.Fatal("the error quotes the body")
			}
			return
		}
		if req.Method != MethodIID && req.Method != MethodIAM {
			t.Fatalf("method %q", req.Method)
		}
	})
}

// FuzzVerifyPKCS7 feeds hostile signatures to the PKCS7 verification: it
// must never panic nor accept anything not signed by a trusted certificate.
func FuzzVerifyPKCS7(f *testing.F) {
	ca, _ := cas()
	doc := iidDocument(testAccount, testInstance, testRegion, testPending)
	good := signIID(f, doc, ca)
	der, _ := base64.StdEncoding.DecodeString(good)
	f.Add(der)
	for _, p := range []string{"testdata/dsa-document.pkcs7", "testdata/aws-us-east-1-2016.pkcs7"} {
		b, _ := os.ReadFile(p)
		d, _ := base64.StdEncoding.DecodeString(strings.Join(strings.Fields(string(b)), ""))
		f.Add(d)
	}
	f.Add([]byte{0x30, 0x80, 0x00, 0x00})
	f.Add([]byte{})
	ts := &trustStore{certs: []*x509.Certificate{ca.cert}}
	f.Fuzz(func(t *testing.T, data []byte) {
		content, err := ts.verifyPKCS7(base64.StdEncoding.EncodeToString(data))
		if err == nil && string(content) != doc {
			t.Fatalf("accepted content %q", content)
		}
	})
}

// FuzzParseConfig: the strict decoder and the policy validation never
// panic, and a config they accept compiles into a policy that decides.
func FuzzParseConfig(f *testing.F) {
	f.Add([]byte(minimalYAML))
	f.Add([]byte(strings.Replace(baseYAML, "KEY1", "/k", 1)))
	f.Add([]byte(minimalYAML + "  - match: {tags: {a: b}, regions: [us-east-1]}\n    subjects: [x]\n    principal_tags: {k: \"{workload}-{region}\"}\n"))
	f.Add([]byte("policy: [{match: {}, subjects: []}]"))
	f.Fuzz(func(t *testing.T, data []byte) {
		cfg, err := ParseConfig(data)
		if err != nil {
			return
		}
		p := compilePolicy(cfg.Policy)
		id := &Identity{Method: MethodIID, AccountID: "111111111111", InstanceID: "i-0123456789abcdef0", Region: "us-east-1", RegionVerified: true}
		if d, err := p.Decide(context.Background(), id, ""); err == nil && d.Subject == "" {
			t.Fatal("a decision without a subject")
		}
	})
}
