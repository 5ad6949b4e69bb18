package sigv4

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	v4 "github.com/aws/aws-sdk-go-v2/aws/signer/v4"
)

// TestMatchesTheSDKSigner: a request signed by aws-sdk-go-v2's own SigV4
// signer verifies; any change to it, or the wrong secret, does not.
func TestMatchesTheSDKSigner(t *testing.T) {
	body := "Action=GetCallerIdentity&Version=2011-06-15"
	sign := func() *http.Request {
		r := httptest.NewRequest(http.MethodPost, "http://sts.example.test/?b=2&a=1%202", strings.NewReader(body))
		r.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		err := v4.NewSigner().SignHTTP(context.Background(),
			aws.Credentials{AccessKeyID: "AKIDEXAMPLE", SecretAccessKey: "secret"},
			r, PayloadHash([]byte(body)), "sts", "us-east-1", time.Now())
		if err != nil {
			t.Fatal(err)
		}
		return r
	}
	r := sign()
	a, err := Parse(r.Header.Get("Authorization"))
	if err != nil {
		t.Fatal(err)
	}
	if a.AccessKeyID != "AKIDEXAMPLE" || a.Service != "sts" || a.Region != "us-east-1" || !a.Signs("host") {
		t.Fatalf("parsed %+v", a)
	}
	if !a.Matches(r, "secret", PayloadHash([]byte(body))) {
		t.Fatal("a request signed by the SDK does not verify")
	}
	for name, tamper := range map[string]func(*http.Request) (string, string){
		"secret": func(*http.Request) (string, string) { return "other", PayloadHash([]byte(body)) },
		"body":   func(*http.Request) (string, string) { return "secret", PayloadHash([]byte(body + "x")) },
		"query": func(r *http.Request) (string, string) {
			r.URL.RawQuery = "a=1&b=3"
			return "secret", PayloadHash([]byte(body))
		},
		"host": func(r *http.Request) (string, string) {
			r.Host = "evil.test"
			return "secret", PayloadHash([]byte(body))
		},
		"date": func(r *http.Request) (string, string) {
			r.Header.Set("X-Amz-Date", "20000101T000000Z")
			return "secret", PayloadHash([]byte(body))
		},
		"headers": func(r *http.Request) (string, string) {
			r.Header.Set("Content-Type", "text/plain")
			return "secret", PayloadHash([]byte(body))
		},
	} {
		r := sign()
		a, _ := Parse(r.Header.Get("Authorization"))
		secret, hash := tamper(r)
		if a.Matches(r, secret, hash) {
			t.Errorf("%s changed, yet the signature verifies", name)
		}
	}
}

func TestParseRefuses(t *testing.T) {
	for h, want := range map[string]error{
		"":                              ErrAlgorithm,
		"AWS4-HMAC-SHA512 Credential=x": ErrAlgorithm,
		"AWS4-HMAC-SHA256 Credential":   ErrMalformed,
		"AWS4-HMAC-SHA256 Credential=AKID/20260101/us-east-1/sts/aws4_request, Signature=ab":                 ErrMalformed,
		"AWS4-HMAC-SHA256 Credential=AKID/2026/us-east-1/sts/aws4_request, SignedHeaders=host, Signature=ab": ErrScope,
		"AWS4-HMAC-SHA256 Credential=AKID/20260101/us-east-1/sts/other, SignedHeaders=host, Signature=ab":    ErrScope,
		"AWS4-HMAC-SHA256 Credential=/20260101/us-east-1/sts/aws4_request, SignedHeaders=host, Signature=ab": ErrScope,
	} {
		if _, err := Parse(h); err != want {
			t.Errorf("Parse(%q) = %v, want %v", h, err, want)
		}
	}
}
