package s3

import (
	"context"
	"crypto/md5"
	"encoding/hex"
	"errors"
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials"
	awss3 "github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/aws/smithy-go"
)

func client(url, key, secret, token string) *awss3.Client {
	return awss3.New(awss3.Options{
		Region:       "us-east-1",
		BaseEndpoint: aws.String(url),
		UsePathStyle: true,
		Credentials:  credentials.NewStaticCredentialsProvider(key, secret, token),
	})
}

func apiCode(err error) string {
	var ae smithy.APIError
	if errors.As(err, &ae) {
		return ae.ErrorCode()
	}
	return ""
}

func TestGetAndHeadObjectWithTheSDK(t *testing.T) {
	s := Start(t)
	body := []byte("version: \"1\"\ndefault: off\n")
	s.Put("fleet-config", "imdsproxy/rollout.yaml", body)
	s.AllowSigned("ASIAGOOD", "secret-good", "session-good")
	s.Allow("AKIAUNCHECKED")
	sum := md5.Sum(body)
	wantETag := `"` + hex.EncodeToString(sum[:]) + `"`
	ctx := context.Background()

	c := client(s.URL, "ASIAGOOD", "secret-good", "session-good")
	out, err := c.GetObject(ctx, &awss3.GetObjectInput{Bucket: aws.String("fleet-config"), Key: aws.String("imdsproxy/rollout.yaml")})
	if err != nil {
		t.Fatalf("GetObject: %v", err)
	}
	got, _ := io.ReadAll(out.Body)
	out.Body.Close()
	if string(got) != string(body) || aws.ToString(out.ETag) != wantETag {
		t.Fatalf("GetObject = %q ETag %s, want %q ETag %s", got, aws.ToString(out.ETag), body, wantETag)
	}
	head, err := c.HeadObject(ctx, &awss3.HeadObjectInput{Bucket: aws.String("fleet-config"), Key: aws.String("imdsproxy/rollout.yaml")})
	if err != nil || aws.ToString(head.ETag) != wantETag || aws.ToInt64(head.ContentLength) != int64(len(body)) {
		t.Fatalf("HeadObject = %+v, %v", head, err)
	}
	last := s.CallLog()[s.Calls()-1]
	if last.Method != http.MethodHead || last.AccessKeyID != "ASIAGOOD" || !last.SignatureValid || last.Status != http.StatusOK ||
		last.Bucket != "fleet-config" || last.Key != "imdsproxy/rollout.yaml" {
		t.Errorf("last call %+v", last)
	}

	// Conditional GET: the SDK reports 304 as an error.
	_, err = c.GetObject(ctx, &awss3.GetObjectInput{Bucket: aws.String("fleet-config"),
		Key: aws.String("imdsproxy/rollout.yaml"), IfNoneMatch: aws.String(wantETag)})
	if last := s.CallLog()[s.Calls()-1]; err == nil || last.Status != http.StatusNotModified {
		t.Errorf("GetObject If-None-Match = %v, status %d; want 304", err, last.Status)
	}

	// An allowed key whose signature is not checked.
	if _, err := client(s.URL, "AKIAUNCHECKED", "anything", "").GetObject(ctx,
		&awss3.GetObjectInput{Bucket: aws.String("fleet-config"), Key: aws.String("imdsproxy/rollout.yaml")}); err != nil {
		t.Errorf("GetObject with Allow()ed key: %v", err)
	}

	// Replacing the object changes the ETag.
	s.Put("fleet-config", "imdsproxy/rollout.yaml", []byte("version: \"2\"\n"))
	if e, _ := s.ETag("fleet-config", "imdsproxy/rollout.yaml"); e == wantETag {
		t.Error("ETag unchanged after Put")
	}
}

func TestErrors(t *testing.T) {
	s := Start(t)
	s.Put("fleet-config", "a.yaml", []byte("x"))
	s.AllowSigned("ASIAGOOD", "secret-good", "session-good")
	ctx := context.Background()
	get := func(c *awss3.Client, bucket, key string) error {
		out, err := c.GetObject(ctx, &awss3.GetObjectInput{Bucket: aws.String(bucket), Key: aws.String(key)})
		if err == nil {
			out.Body.Close()
		}
		return err
	}
	good := client(s.URL, "ASIAGOOD", "secret-good", "session-good")
	for _, tc := range []struct {
		name   string
		c      *awss3.Client
		bucket string
		key    string
		code   string
		status int
	}{
		{"no such key", good, "fleet-config", "b.yaml", "NoSuchKey", 404},
		{"no such bucket", good, "other", "a.yaml", "NoSuchBucket", 404},
		{"unknown key id", client(s.URL, "ASIAOTHER", "secret-good", "session-good"), "fleet-config", "a.yaml", "AccessDenied", 403},
		{"wrong secret", client(s.URL, "ASIAGOOD", "secret-bad", "session-good"), "fleet-config", "a.yaml", "SignatureDoesNotMatch", 403},
		{"wrong session token", client(s.URL, "ASIAGOOD", "secret-good", "session-bad"), "fleet-config", "a.yaml", "InvalidToken", 403},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := get(tc.c, tc.bucket, tc.key)
			if apiCode(err) != tc.code {
				t.Fatalf("GetObject error %v, want code %s", err, tc.code)
			}
			last := s.CallLog()[s.Calls()-1]
			if last.Status != tc.status || last.Code != tc.code {
				t.Errorf("call %+v, want %d %s", last, tc.status, tc.code)
			}
		})
	}
	// HeadObject of a missing key: 404 without a body.
	_, err := good.HeadObject(ctx, &awss3.HeadObjectInput{Bucket: aws.String("fleet-config"), Key: aws.String("missing")})
	if err == nil || !strings.Contains(err.Error(), "404") {
		t.Errorf("HeadObject missing = %v, want a 404", err)
	}
	// Anonymous requests are refused.
	resp, err := http.Get(s.URL + "/fleet-config/a.yaml")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusForbidden || !strings.Contains(string(b), "<Code>AccessDenied</Code>") {
		t.Errorf("anonymous GET = %d %s", resp.StatusCode, b)
	}
}

func TestPutObjectWithTheSDK(t *testing.T) {
	s := Start(t)
	s.CreateBucket("oidc")
	s.AllowSigned("ASIAWRITER", "secret-w", "")
	s.Allow("AKIAREADONLY")
	ctx := context.Background()
	body := `{"keys":[]}`
	put := func(c *awss3.Client, bucket string) error {
		_, err := c.PutObject(ctx, &awss3.PutObjectInput{Bucket: aws.String(bucket), Key: aws.String("imds/.well-known/jwks.json"),
			Body: strings.NewReader(body), ContentType: aws.String("application/json"), CacheControl: aws.String("max-age=60")})
		return err
	}
	if err := put(client(s.URL, "ASIAWRITER", "secret-w", ""), "oidc"); err != nil {
		t.Fatalf("PutObject: %v", err)
	}
	o, ok := s.Object("oidc", "imds/.well-known/jwks.json")
	if !ok || string(o.Body) != body || o.ContentType != "application/json" || o.CacheControl != "max-age=60" {
		t.Fatalf("stored %+v %v", o, ok)
	}
	if last := s.CallLog()[s.Calls()-1]; last.Method != http.MethodPut || !last.SignatureValid || last.Status != 200 {
		t.Fatalf("call %+v", last)
	}
	for _, tc := range []struct {
		name   string
		c      *awss3.Client
		bucket string
		code   string
	}{
		{"read-only key", client(s.URL, "AKIAREADONLY", "whatever", ""), "oidc", "AccessDenied"},
		{"wrong secret", client(s.URL, "ASIAWRITER", "wrong", ""), "oidc", "SignatureDoesNotMatch"},
		{"no such bucket", client(s.URL, "ASIAWRITER", "secret-w", ""), "nope", "NoSuchBucket"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := apiCode(put(tc.c, tc.bucket)); got != tc.code {
				t.Fatalf("code %q, want %s", got, tc.code)
			}
		})
	}

	// A signed PUT whose body is not the one signed.
	req, _ := http.NewRequest(http.MethodPut, s.URL+"/oidc/x", strings.NewReader("tampered"))
	req.Header.Set("X-Amz-Content-Sha256", strings.Repeat("0", 64))
	req.Header.Set("Authorization", "AWS4-HMAC-SHA256 Credential=AKIAREADONLY/20260101/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=00")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusForbidden {
		t.Fatalf("unsigned PUT: %d", resp.StatusCode)
	}

	// Anonymous reads only from a public bucket.
	get := func() int {
		resp, err := http.Get(s.URL + "/oidc/imds/.well-known/jwks.json")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		if resp.StatusCode == 200 && (resp.Header.Get("Content-Type") != "application/json" || resp.Header.Get("Cache-Control") != "max-age=60") {
			t.Fatalf("headers %v", resp.Header)
		}
		return resp.StatusCode
	}
	if got := get(); got != http.StatusForbidden {
		t.Fatalf("anonymous GET of a private bucket: %d", got)
	}
	s.SetPublicRead("oidc", true)
	if got := get(); got != http.StatusOK {
		t.Fatalf("anonymous GET of a public bucket: %d", got)
	}
	req, _ = http.NewRequest(http.MethodPut, s.URL+"/oidc/x", strings.NewReader("x"))
	if resp, err := http.DefaultClient.Do(req); err != nil || resp.StatusCode != http.StatusForbidden {
		t.Fatalf("anonymous PUT to a public bucket: %v %v", resp.StatusCode, err)
	}
}
