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

	"github.com/imdsproxy/imdsproxy/test/fakes/rolesanywhere"
)

// FuzzRolesAnywhereResponse serves arbitrary status codes, error type
// headers and bodies from a loopback fake. Fetch must never panic, must
// return Complete, unexpired credentials or a classified *Error (never both,
// never neither).
func FuzzRolesAnywhereResponse(f *testing.F) {
	exp := time.Now().Add(24 * time.Hour)
	f.Add(201, "", raSuccessJSON(exp))
	f.Add(200, "", raSuccessJSON(exp))
	f.Add(201, "", `{"credentialSet":[]}`)
	f.Add(201, "", `{"credentialSet":[{"credentials":null}]}`)
	f.Add(201, "", `{"credentialSet":[{"credentials":{"accessKeyId":"A","secretAccessKey":"B","sessionToken":"C","expiration":"2099-01-01T00:00:00+01:00"}}]}`)
	f.Add(201, "", `{"credentialSet":{}}`)
	f.Add(201, "", `null`)
	f.Add(201, "", ``)
	f.Add(403, "AccessDeniedException:http://x", `{"message":"x"}`)
	f.Add(400, "", `{"__type":"a#ValidationException","message":5}`)
	f.Add(404, "", `{"code":"ResourceNotFoundException"}`)
	f.Add(429, "", ``)
	f.Add(500, "", `<html>`)
	f.Add(302, "", ``)

	var mu sync.Mutex // one server, one current answer
	var status int
	var errType, body string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if errType != "" {
			w.Header().Set("X-Amzn-ErrorType", errType)
		}
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(status)
		_, _ = w.Write([]byte(body))
	}))
	f.Cleanup(srv.Close)
	l, err := sharedCA(f).Issue(rolesanywhere.LeafOptions{Key: rolesanywhere.ECP256})
	if err != nil {
		f.Fatal(err)
	}
	src := &staticX509{leaf: l.Cert, chain: l.Chain, signer: l.Key}
	r := newTestRolesAnywhere(f, srv.URL, RolesAnywhereConfig{MaxAttempts: 1, Timeout: 5 * time.Second}, src, nil)

	f.Fuzz(func(t *testing.T, st int, et, b string) {
		mu.Lock()
		defer mu.Unlock()
		// Final statuses only; a 3xx with a Location would be followed.
		status, errType, body = 200+abs(st%400), strings.Map(headerSafe, et), b
		if status >= 300 && status < 400 {
			status += 100
		}
		c, err := r.Fetch(context.Background(), raRole)
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
		if len(e.Message) > maxMessage || len(e.Code) > 128 {
			t.Fatalf("unbounded error: %d/%d bytes", len(e.Message), len(e.Code))
		}
	})
}

// headerSafe keeps a fuzzed header value sendable.
func headerSafe(r rune) rune {
	if r < 0x20 || r >= 0x7f {
		return -1
	}
	return r
}
