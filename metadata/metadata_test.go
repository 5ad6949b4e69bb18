package metadata

import (
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
)

// fakeIMDS serves an instance id and counts token PUTs; it answers 401 to a
// GET with a token it did not issue last.
func fakeIMDS(t *testing.T, id string) (*httptest.Server, *atomic.Int32) {
	var puts atomic.Int32
	var current atomic.Value
	current.Store("")
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case r.Method == http.MethodPut && r.URL.Path == "/latest/api/token":
			if r.Header.Get("X-Aws-Ec2-Metadata-Token-Ttl-Seconds") == "" {
				w.WriteHeader(http.StatusBadRequest)
				return
			}
			n := puts.Add(1)
			tok := "tok" + string(rune('0'+n))
			current.Store(tok)
			_, _ = w.Write([]byte(tok))
		case r.Header.Get("X-Aws-Ec2-Metadata-Token") != current.Load():
			w.WriteHeader(http.StatusUnauthorized)
		case r.URL.Path == "/latest/meta-data/instance-id":
			_, _ = w.Write([]byte(id))
		case r.URL.Path == "/latest/big":
			_, _ = w.Write([]byte(strings.Repeat("x", MaxBody+1)))
		default:
			w.WriteHeader(http.StatusNotFound)
		}
	}))
	t.Cleanup(srv.Close)
	return srv, &puts
}

func TestInstanceIDAndTokenReuse(t *testing.T) {
	srv, puts := fakeIMDS(t, "i-0123456789abcdef0\n")
	c, err := New(srv.URL, 0)
	if err != nil {
		t.Fatal(err)
	}
	for range 3 {
		id, err := c.InstanceID(t.Context())
		if err != nil || id != "i-0123456789abcdef0" {
			t.Fatalf("InstanceID = %q, %v", id, err)
		}
	}
	if n := puts.Load(); n != 1 {
		t.Errorf("token PUTs = %d, want 1 (reused)", n)
	}
	// A token upstream no longer honours: one retry with a new one.
	c.mu.Lock()
	c.token = "stale"
	c.mu.Unlock()
	if _, err := c.InstanceID(t.Context()); err != nil {
		t.Fatalf("after a stale token: %v", err)
	}
	if _, err := c.Get(t.Context(), "/latest/meta-data/tags/instance/x"); !IsNotFound(err) {
		t.Errorf("missing path: %v, want a 404 StatusError", err)
	}
	if _, err := c.Get(t.Context(), "/latest/big"); err == nil || !strings.Contains(err.Error(), "larger than") {
		t.Errorf("oversized answer: %v", err)
	}
}

func TestInstanceIDValidated(t *testing.T) {
	srv, _ := fakeIMDS(t, "<html>not an id</html>")
	c, _ := New(srv.URL, 0)
	if _, err := c.InstanceID(t.Context()); err == nil {
		t.Fatal("a malformed instance id was accepted")
	}
	for _, bad := range []string{"", "http://", "ftp://x", "http://x/path", "http://u:p@x"} {
		if _, err := New(bad, 0); err == nil {
			t.Errorf("New(%q) succeeded", bad)
		}
	}
}
