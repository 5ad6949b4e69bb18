package container

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"testing"
	"time"

	"github.com/imdsproxy/imdsproxy/access"
)

// fixedToken is the token minted from 32 zero bytes.
const fixedToken = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"

// handlerEnv is a Server whose billing workload has fixedToken, without
// a listener (the handler is called directly).
func handlerEnv(t testing.TB) *Server {
	t.Helper()
	broker, err := access.NewBroker(&fakeSource{}, nil, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	tk, err := NewTokens(filepath.Join(t.TempDir(), "tokens"), time.Hour, time.Minute, nil)
	if err != nil {
		t.Fatal(err)
	}
	tk.random = bytes.NewReader(make([]byte, tokenBytes))
	srv, err := New(Config{Plan: testPlan(t, access.Section{}), Path: DefaultPath}, tk, broker, nil, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := tk.Sync(map[string]int{"uid:64101": owner(64101)}); err != nil {
		t.Fatal(err)
	}
	return srv
}

// FuzzRequest: whatever request arrives, the answer is one of the
// documented statuses with a JSON body, and credentials are served only
// to a GET of the path with exactly the workload's token.
func FuzzRequest(f *testing.F) {
	for _, seed := range []string{
		"GET /v1/credentials HTTP/1.1\r\nHost: 127.0.0.1:8171\r\nAuthorization: " + fixedToken + "\r\n\r\n",
		"GET /v1/credentials HTTP/1.1\r\nHost: 169.254.170.23\r\nAccept: application/json\r\nAuthorization: " + fixedToken + "\r\n\r\n",
		"GET /v1/credentials HTTP/1.1\r\nHost: [fd00:ec2::23]\r\nAuthorization: " + fixedToken + "x\r\n\r\n",
		"GET /v1/credentials HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
		"GET /v1/credentials?a=b HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: " + fixedToken + "\r\n\r\n",
		"GET /v1/../v1/credentials HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: " + fixedToken + "\r\n\r\n",
		"GET http://evil/v1/credentials HTTP/1.1\r\nHost: evil\r\nAuthorization: " + fixedToken + "\r\n\r\n",
		"POST /v1/credentials HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 3\r\nAuthorization: " + fixedToken + "\r\n\r\nabc",
		"GET /v1/credentials HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\nAuthorization: " + fixedToken + "\r\n\r\n0\r\n\r\n",
		"GET /v1/credentials HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: " + fixedToken + "\r\nAuthorization: " + fixedToken + "\r\n\r\n",
		"GET /v1/credentials HTTP/1.0\r\nAuthorization: " + fixedToken + "\r\n\r\n",
	} {
		f.Add([]byte(seed))
	}
	srv := handlerEnv(f)
	h := srv.Handler()
	local := &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 8171}
	f.Fuzz(func(t *testing.T, raw []byte) {
		req, err := http.ReadRequest(bufio.NewReader(bytes.NewReader(raw)))
		if err != nil {
			return
		}
		req = req.WithContext(context.WithValue(req.Context(), http.LocalAddrContextKey, net.Addr(local)))
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		switch rec.Code {
		case 200, 400, 401, 403, 404, 405, 413, 414, 503:
		default:
			t.Fatalf("status %d", rec.Code)
		}
		if rec.Header().Get("Content-Type") != "application/json" {
			t.Fatalf("Content-Type %q", rec.Header().Get("Content-Type"))
		}
		var doc map[string]string
		if err := json.Unmarshal(rec.Body.Bytes(), &doc); err != nil {
			t.Fatalf("body %q: %v", rec.Body.Bytes(), err)
		}
		if rec.Code == 200 {
			auth := req.Header.Values("Authorization")
			if req.Method != http.MethodGet || req.URL.Path != DefaultPath || req.URL.RawQuery != "" || len(auth) != 1 || auth[0] != fixedToken {
				t.Fatalf("credentials served to %s %q with Authorization %q", req.Method, req.URL, auth)
			}
			if doc["AccessKeyId"] != "ASIAbilling" || doc["Expiration"] == "" {
				t.Fatalf("document %v", doc)
			}
		} else if doc["code"] == "" || doc["message"] == "" {
			t.Fatalf("error document %v", doc)
		}
	})
}
