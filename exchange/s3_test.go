package exchange

import (
	"context"
	"errors"
	"io/fs"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync"
	"testing"

	"github.com/aws/aws-sdk-go-v2/aws"
)

const (
	testMaxObject = 4096
	testPolicy    = "version: \"1\"\ndefault: on\n"
)

// TestS3ObjectsEndpointOverride reads an object through the real SDK from an
// S3 stand-in named by AWS_ENDPOINT_URL_S3, which needs path-style requests.
func TestS3ObjectsEndpointOverride(t *testing.T) {
	var mu sync.Mutex
	var gotPath, gotAuth string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		gotPath, gotAuth = r.URL.Path, r.Header.Get("Authorization")
		mu.Unlock()
		switch r.URL.Path {
		case "/policies/fleet/rollout.yaml":
			w.Header().Set("ETag", `"abc"`)
			w.Write([]byte(testPolicy))
		case "/policies/big.yaml":
			w.Write([]byte(strings.Repeat("#", testMaxObject+1)))
		default:
			w.Header().Set("Content-Type", "application/xml")
			w.WriteHeader(http.StatusNotFound)
			w.Write([]byte(`<?xml version="1.0" encoding="UTF-8"?><Error><Code>NoSuchKey</Code><Message>no</Message></Error>`))
		}
	}))
	defer srv.Close()
	t.Setenv("AWS_ENDPOINT_URL_S3", srv.URL)
	t.Setenv("AWS_CONFIG_FILE", os.DevNull)
	t.Setenv("AWS_SHARED_CREDENTIALS_FILE", os.DevNull)
	provider := aws.CredentialsProviderFunc(func(context.Context) (aws.Credentials, error) {
		return aws.Credentials{AccessKeyID: "AKIDEXAMPLE", SecretAccessKey: "secret", SessionToken: "token", Source: "test"}, nil
	})
	g, err := NewS3Objects(context.Background(), provider, "us-east-1")
	if err != nil {
		t.Fatal(err)
	}
	data, etag, err := g.GetObject(context.Background(), "policies", "fleet/rollout.yaml", testMaxObject)
	if err != nil {
		t.Fatalf("GetObject: %v", err)
	}
	if string(data) != testPolicy || etag != `"abc"` {
		t.Errorf("GetObject = %q, %q", data, etag)
	}
	mu.Lock()
	if gotPath != "/policies/fleet/rollout.yaml" || !strings.Contains(gotAuth, "AKIDEXAMPLE") {
		t.Errorf("request path %q (want path style), auth %q", gotPath, gotAuth)
	}
	mu.Unlock()
	if data, _, err := g.GetObject(context.Background(), "policies", "big.yaml", testMaxObject); err != nil || len(data) != testMaxObject+1 {
		t.Errorf("oversize object: %d bytes, %v; want it cut at max+1", len(data), err)
	}
	if _, _, err := g.GetObject(context.Background(), "policies", "missing.yaml", testMaxObject); err == nil || !strings.Contains(err.Error(), "NoSuchKey") || !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("missing object: %v", err)
	}
}

func TestS3ObjectsNeedsRegion(t *testing.T) {
	t.Setenv("AWS_REGION", "")
	t.Setenv("AWS_DEFAULT_REGION", "")
	t.Setenv("AWS_CONFIG_FILE", os.DevNull)
	t.Setenv("AWS_SHARED_CREDENTIALS_FILE", os.DevNull)
	provider := aws.AnonymousCredentials{}
	if _, err := NewS3Objects(context.Background(), provider, ""); err == nil {
		t.Error("NewS3Objects without a region succeeded")
	}
	if _, err := NewS3Objects(context.Background(), nil, "us-east-1"); err == nil {
		t.Error("NewS3Objects without credentials succeeded")
	}
}
