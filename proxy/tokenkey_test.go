package proxy

import (
	"bytes"
	"net/http"
	"net/http/httptest"
	"testing"
)

// TestTokenKeySharedAcrossServers: two Servers (two daemon processes across a
// restart) given the same TokenKey accept each other's session tokens;
// servers with another or a random key refuse them.
func TestTokenKeySharedAcrossServers(t *testing.T) {
	key := bytes.Repeat([]byte{7}, TokenKeySize)
	other := bytes.Repeat([]byte{8}, TokenKeySize)
	newServer := func(k []byte) *Server {
		t.Helper()
		return newEnv(t, Config{TokensRequired: true, TokenKey: k}).s
	}
	old := newServer(key)
	put := httptest.NewRequest(http.MethodPut, "/latest/api/token", nil)
	put.Header.Set("X-aws-ec2-metadata-token-ttl-seconds", "300")
	rec := httptest.NewRecorder()
	old.Handler().ServeHTTP(rec, put)
	if rec.Code != http.StatusOK {
		t.Fatalf("PUT: %d", rec.Code)
	}
	tok := rec.Body.String()
	key[0] = 9 // New copied the key: changing the caller's slice changes nothing
	for _, tc := range []struct {
		name string
		s    *Server
		want int
	}{
		{"same server", old, http.StatusOK},
		{"new server, same key", newServer(bytes.Repeat([]byte{7}, TokenKeySize)), http.StatusOK},
		{"other key", newServer(other), http.StatusUnauthorized},
		{"random key", newServer(nil), http.StatusUnauthorized},
	} {
		t.Run(tc.name, func(t *testing.T) {
			get := httptest.NewRequest(http.MethodGet, "/latest/meta-data/iam/security-credentials/", nil)
			get.Header.Set("X-aws-ec2-metadata-token", tok)
			rec := httptest.NewRecorder()
			tc.s.Handler().ServeHTTP(rec, get)
			if rec.Code != tc.want {
				t.Fatalf("GET with the old server's token: %d, want %d", rec.Code, tc.want)
			}
		})
	}
}

func TestTokenKeyLength(t *testing.T) {
	for _, n := range []int{0, 16, 31, 33, 64} {
		if _, err := New(Config{Plan: planOf(t, defaultPlanConfig()), TokenKey: make([]byte, n)}, newTestBroker(t, nil), nil, nil, nil); err == nil {
			t.Errorf("New accepted a %d-byte token key", n)
		}
	}
}
