package rollout

import (
	"context"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync"
	"testing"

	"github.com/imdsproxy/imdsproxy/metadata"
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
			&fakeIMDS{instanceID: "i-01", tags: map[string]string{"team%2Fgroup": "api-asg"}},
			"team/group", "",
			Host{InstanceID: "i-01", Group: "api-asg", GroupSource: GroupFromTag, IDSource: IDFromIMDS}, false, false},
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
			md, err := metadata.New(base, 0)
			if err != nil {
				t.Fatal(err)
			}
			id, _ := md.InstanceID(context.Background())
			h, err := DetectHost(context.Background(), md, id, tc.tagKey, tc.fallback)
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
