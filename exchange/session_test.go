package exchange

import (
	"context"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync"
	"testing"
	"time"
)

// newIMDS is a minimal IMDSv2 on loopback that serves instance-id and counts
// requests.
func newIMDS(t *testing.T, instanceID string, calls *int) *httptest.Server {
	var mu sync.Mutex
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		*calls++
		mu.Unlock()
		switch {
		case r.Method == http.MethodPut && r.URL.Path == "/latest/api/token":
			w.Header().Set("X-Aws-Ec2-Metadata-Token-Ttl-Seconds", r.Header.Get("X-Aws-Ec2-Metadata-Token-Ttl-Seconds"))
			_, _ = w.Write([]byte("tok"))
		case r.Method == http.MethodGet && r.URL.Path == "/latest/meta-data/instance-id":
			if r.Header.Get("X-Aws-Ec2-Metadata-Token") != "tok" {
				w.WriteHeader(http.StatusUnauthorized)
				return
			}
			_, _ = w.Write([]byte(instanceID))
		default:
			http.NotFound(w, r)
		}
	}))
	t.Cleanup(srv.Close)
	return srv
}

func TestSanitizeSessionName(t *testing.T) {
	for in, want := range map[string]string{
		"i-0123456789abcdef0":    "i-0123456789abcdef0",
		"host.example.com":       "host.example.com",
		"a_b=c,d.e@f-g":          "a_b=c,d.e@f-g",
		"with space":             "with-space",
		"  trimmed\n":            "trimmed",
		"ünïcode/slash":          "-n-code-slash",
		"x":                      "imdsproxy-x",
		"":                       "imdsproxy",
		"!":                      "imdsproxy--",
		strings.Repeat("a", 100): strings.Repeat("a", 64),
		strings.Repeat("é", 100): strings.Repeat("-", 64),
	} {
		if got := SanitizeSessionName(in); got != want {
			t.Errorf("SanitizeSessionName(%q) = %q, want %q", in, got, want)
		}
	}
}

func FuzzSanitizeSessionName(f *testing.F) {
	f.Add("i-0123")
	f.Add("")
	f.Add("ü")
	f.Fuzz(func(t *testing.T, s string) {
		got := SanitizeSessionName(s)
		if len(got) < 2 || len(got) > 64 {
			t.Fatalf("length %d", len(got))
		}
		for _, r := range got {
			if !sessionNameChar(r) {
				t.Fatalf("bad char %q in %q", r, got)
			}
		}
		if SanitizeSessionName(got) != got {
			t.Fatalf("not idempotent: %q", got)
		}
	})
}

func TestSessionName(t *testing.T) {
	host, _ := os.Hostname()
	hostName := SanitizeSessionName(host)
	if host == "" {
		hostName = "imdsproxy"
	}
	var calls int
	good := newIMDS(t, "i-0abc123def4567890", &calls)
	html := newIMDS(t, "<html>captive portal</html>", &calls)
	v1only := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodPut {
			w.WriteHeader(http.StatusForbidden)
			return
		}
		_, _ = w.Write([]byte("i-0fromv1"))
	}))
	t.Cleanup(v1only.Close)
	slow := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-r.Context().Done():
		case <-time.After(5 * time.Second):
		}
	}))
	t.Cleanup(slow.Close)

	for _, tc := range []struct {
		name, configured, base, want string
	}{
		{"configured wins", "my session", good.URL, "my-session"},
		{"instance id", "", good.URL, "i-0abc123def4567890"},
		{"no imds", "", "", hostName},
		{"not an instance id", "", html.URL, hostName},
		{"v1 only refused", "", v1only.URL, hostName},
		{"slow imds", "", slow.URL, hostName},
	} {
		t.Run(tc.name, func(t *testing.T) {
			start := time.Now()
			if got := SessionName(context.Background(), tc.configured, tc.base); got != tc.want {
				t.Errorf("SessionName = %q, want %q", got, tc.want)
			}
			if d := time.Since(start); d > 2500*time.Millisecond {
				t.Errorf("took %v, want about 1s at most", d)
			}
		})
	}
}
