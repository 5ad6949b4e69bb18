package exchange

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"
)

// FuzzSTSResponse serves arbitrary status codes and bodies from a fake STS.
// Fetch must never panic, must return Complete credentials or an *Error-
// classified failure (never both, never neither), and must never put the
// token into an error.
func FuzzSTSResponse(f *testing.F) {
	exp := time.Now().Add(24 * time.Hour)
	f.Add(200, successXML(exp))
	f.Add(200, strings.Replace(successXML(exp), "<SecretAccessKey>", "<Nope>", 1))
	f.Add(200, strings.Replace(successXML(exp), "<Expiration>", "<Expiration>not-a-date", 1))
	f.Add(200, "<AssumeRoleWithWebIdentityResponse/>")
	f.Add(200, "")
	f.Add(400, errorXML("Sender", "InvalidIdentityToken", "x"))
	f.Add(403, errorXML("Sender", "AccessDenied", "x"))
	f.Add(429, "")
	f.Add(500, "<ErrorResponse><Error><Code>")
	f.Add(503, "<html>")
	f.Add(302, "")

	var mu sync.Mutex // serializes inputs: one server, one current answer
	var status int
	var body string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/xml")
		w.WriteHeader(status)
		_, _ = w.Write([]byte(body))
	}))
	f.Cleanup(srv.Close)
	w := newTestWebIdentity(f, srv.URL, WebIdentityConfig{MaxAttempts: 1, Timeout: 5 * time.Second},
		&tokenSource{tokens: []string{testJWT}}, nil)
	w.retryDelay = 0

	f.Fuzz(func(t *testing.T, st int, b string) {
		mu.Lock()
		defer mu.Unlock()
		// Final statuses only: 1xx are informational, and a 3xx with a
		// Location would be followed by the client.
		status, body = 200+abs(st%400), b
		if status >= 300 && status < 400 {
			status += 100
		}
		c, err := w.Fetch(context.Background(), testRole)
		if err == nil {
			if !c.Complete() || !c.Expires.After(time.Now()) {
				t.Fatalf("status %d: incomplete or expired credentials without an error: %v", status, c)
			}
			return
		}
		if !c.IsZero() {
			t.Fatalf("credentials returned with an error: %v", c)
		}
		var e *Error
		if !errors.As(err, &e) || e.Class == "" {
			t.Fatalf("unclassified error %T: %v", err, err)
		}
		if strings.Contains(err.Error(), testJWT) {
			t.Fatalf("token in error: %v", err)
		}
	})
}

func abs(n int) int {
	if n < 0 {
		return -n
	}
	return n
}
