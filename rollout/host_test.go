package rollout

import (
	"context"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync"
	"testing"

	"github.com/aws/aws-sdk-go-v2/aws"
)

// fakeIMDS is an IMDSv2-only stand-in: GETs without a valid token get 401.
type fakeIMDS struct {
	mu         sync.Mutex
	instanceID string
	tags       map[string]string // escaped path segment -> value
	tagStatus  int               // non-zero: answer tag GETs with this status
	tokenless  int               // GETs refused for lacking a token
	paths      []string
}

const fakeIMDSToken = "tok-123"

func (f *fakeIMDS) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.paths = append(f.paths, r.Method+" "+r.URL.EscapedPath())
	if r.Method == http.MethodPut && r.URL.Path == "/latest/api/token" {
		if r.Header.Get("X-Aws-Ec2-Metadata-Token-Ttl-Seconds") == "" {
			w.WriteHeader(http.StatusBadRequest)
			return
		}
		w.Write([]byte(fakeIMDSToken))
		return
	}
	if r.Method != http.MethodGet {
		w.WriteHeader(http.StatusMethodNotAllowed)
		return
	}
	if r.Header.Get("X-Aws-Ec2-Metadata-Token") != fakeIMDSToken {
		f.tokenless++
		w.WriteHeader(http.StatusUnauthorized)
		return
	}
	switch p := r.URL.EscapedPath(); {
	case p == "/latest/meta-data/instance-id" && f.instanceID != "":
		w.Write([]byte(f.instanceID))
	case strings.HasPrefix(p, "/latest/meta-data/tags/instance/"):
		if f.tagStatus != 0 {
			w.WriteHeader(f.tagStatus)
			return
		}
		v, ok := f.tags[strings.TrimPrefix(p, "/latest/meta-data/tags/instance/")]
		if !ok {
			http.NotFound(w, r)
			return
		}
		w.Write([]byte(v))
	default:
		http.NotFound(w, r)
	}
}

func TestDetectHost(t *testing.T) {
	hostname, _ := os.Hostname()
	cases := []struct {
		name     string
		imds     *fakeIMDS
		tagKey   string
		fallback string
		want     Host
		wantErr  bool
		noIMDS   bool
	}{
		{"tag present (default key, escaped)",
			&fakeIMDS{instanceID: "i-0123456789abcdef0", tags: map[string]string{"aws:autoscaling:groupName": "web-asg"}},
			"", "cfg-group",
			Host{InstanceID: "i-0123456789abcdef0", Group: "web-asg", GroupSource: GroupFromTag, IDSource: IDFromIMDS}, false, false},
		{"custom tag key with a slash is escaped",
			&fakeIMDS{instanceID: "i-1", tags: map[string]string{"team%2Fgroup": "api-asg"}},
			"team/group", "",
			Host{InstanceID: "i-1", Group: "api-asg", GroupSource: GroupFromTag, IDSource: IDFromIMDS}, false, false},
		{"tag 404 falls back to config",
			&fakeIMDS{instanceID: "i-2"}, "", "cfg-group",
			Host{InstanceID: "i-2", Group: "cfg-group", GroupSource: GroupFromConfig, IDSource: IDFromIMDS}, false, false},
		{"tag 404 and no config: no group",
			&fakeIMDS{instanceID: "i-3"}, "", "",
			Host{InstanceID: "i-3", GroupSource: GroupNone, IDSource: IDFromIMDS}, false, false},
		{"tag 500 is an error",
			&fakeIMDS{instanceID: "i-4", tagStatus: http.StatusInternalServerError}, "", "cfg-group",
			Host{}, true, false},
		{"no instance id: host name stands in",
			&fakeIMDS{}, "", "cfg-group",
			Host{InstanceID: hostname, Group: "cfg-group", GroupSource: GroupFromConfig, IDSource: IDFromHostname}, false, false},
		{"no IMDS at all: host name stands in",
			&fakeIMDS{}, "", "",
			Host{InstanceID: hostname, GroupSource: GroupNone, IDSource: IDFromHostname}, false, true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			f := tc.imds
			srv := httptest.NewServer(f)
			base := srv.URL
			if tc.noIMDS {
				srv.Close()
			} else {
				defer srv.Close()
			}
			h, err := DetectHost(context.Background(), base+"/", tc.tagKey, tc.fallback)
			if tc.wantErr {
				if err == nil {
					t.Fatalf("DetectHost = %+v, want an error", h)
				}
				return
			}
			if err != nil {
				t.Fatalf("DetectHost: %v", err)
			}
			if h != tc.want {
				t.Errorf("DetectHost = %+v, want %+v", h, tc.want)
			}
			f.mu.Lock()
			defer f.mu.Unlock()
			if f.tokenless != 0 {
				t.Errorf("%d GETs without an IMDSv2 token", f.tokenless)
			}
		})
	}
}

func TestDetectHostBadBase(t *testing.T) {
	for _, base := range []string{"", "169.254.169.254", "ftp://x", "http://user:pw@x"} {
		if _, err := DetectHost(context.Background(), base, "", ""); err == nil {
			t.Errorf("DetectHost(%q) accepted", base)
		}
	}
}

// TestS3GetterEndpointOverride reads an object through the real SDK from an
// S3 stand-in named by AWS_ENDPOINT_URL_S3, which needs path-style requests.
func TestS3GetterEndpointOverride(t *testing.T) {
	var mu sync.Mutex
	var gotPath, gotAuth string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		gotPath, gotAuth = r.URL.Path, r.Header.Get("Authorization")
		mu.Unlock()
		switch r.URL.Path {
		case "/policies/fleet/rollout.yaml":
			w.Header().Set("ETag", `"abc"`)
			w.Write([]byte(policyV1))
		case "/policies/big.yaml":
			w.Write([]byte(strings.Repeat("#", MaxPolicySize+1)))
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
	g, err := NewS3Getter(context.Background(), provider, "us-east-1")
	if err != nil {
		t.Fatal(err)
	}
	data, etag, err := g.GetObject(context.Background(), "policies", "fleet/rollout.yaml")
	if err != nil {
		t.Fatalf("GetObject: %v", err)
	}
	if string(data) != policyV1 || etag != `"abc"` {
		t.Errorf("GetObject = %q, %q", data, etag)
	}
	mu.Lock()
	if gotPath != "/policies/fleet/rollout.yaml" || !strings.Contains(gotAuth, "AKIDEXAMPLE") {
		t.Errorf("request path %q (want path style), auth %q", gotPath, gotAuth)
	}
	mu.Unlock()
	if _, _, err := g.GetObject(context.Background(), "policies", "big.yaml"); err == nil || !strings.Contains(err.Error(), "larger") {
		t.Errorf("oversize object: %v", err)
	}
	if _, _, err := g.GetObject(context.Background(), "policies", "missing.yaml"); err == nil || !strings.Contains(err.Error(), "NoSuchKey") {
		t.Errorf("missing object: %v", err)
	}
}

func TestS3GetterNeedsRegion(t *testing.T) {
	t.Setenv("AWS_REGION", "")
	t.Setenv("AWS_DEFAULT_REGION", "")
	t.Setenv("AWS_CONFIG_FILE", os.DevNull)
	t.Setenv("AWS_SHARED_CREDENTIALS_FILE", os.DevNull)
	provider := aws.AnonymousCredentials{}
	if _, err := NewS3Getter(context.Background(), provider, ""); err == nil {
		t.Error("NewS3Getter without a region succeeded")
	}
	if _, err := NewS3Getter(context.Background(), nil, "us-east-1"); err == nil {
		t.Error("NewS3Getter without credentials succeeded")
	}
}
