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

	"github.com/imdsproxy/imdsproxy/creds"
)

// FuzzInstanceProfileDocument serves arbitrary credential documents from a
// loopback IMDS stand-in. Fetch must never panic and must return either
// Complete credentials valid now or a classified *Error, never both and
// never neither.
func FuzzInstanceProfileDocument(f *testing.F) {
	exp := time.Now().Add(24 * time.Hour)
	good := profileCredDoc(profileTestKey, profileTestSecret, profileTestToken, exp)
	f.Add(good)
	f.Add(strings.Replace(good, `"Success"`, `"Failure"`, 1))
	f.Add(strings.Replace(good, `"Code" : "Success",`, "", 1))
	f.Add(strings.Replace(good, exp.UTC().Format(time.RFC3339), "2001-01-01T00:00:00Z", 1))
	f.Add(strings.Replace(good, exp.UTC().Format(time.RFC3339), "2099-01-01T00:00:00.123456789+02:00", 1))
	f.Add(`{"Code":"Success","AccessKeyId":1}`)
	f.Add(`{"Code":null,"AccessKeyId":"a","SecretAccessKey":"b","Token":"c","Expiration":"2099-01-01T00:00:00Z"}`)
	f.Add(`{"AccessKeyId":"a b","SecretAccessKey":"b","Token":"c","Expiration":"2099-01-01T00:00:00Z"}`)
	f.Add("")
	f.Add("null")
	f.Add("<html>")

	var mu sync.Mutex // serializes inputs: one server, one current document
	var body string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case r.Method == http.MethodPut && r.URL.Path == "/latest/api/token":
			w.Header().Set("X-aws-ec2-metadata-token-ttl-seconds", "300")
			_, _ = w.Write([]byte("token"))
		case r.URL.Path == "/latest/meta-data/iam/security-credentials/"+profileTestRole:
			_, _ = w.Write([]byte(body))
		default:
			http.NotFound(w, r)
		}
	}))
	f.Cleanup(srv.Close)
	p, err := NewInstanceProfile(InstanceProfileConfig{IMDSBase: srv.URL, RoleName: profileTestRole, Timeout: 5 * time.Second}, nil)
	if err != nil {
		f.Fatal(err)
	}

	f.Fuzz(func(t *testing.T, doc string) {
		mu.Lock()
		defer mu.Unlock()
		body = doc
		c, err := p.Fetch(context.Background(), creds.Role{})
		if err == nil {
			if !c.ValidAt(time.Now()) || c.Source != SourceInstanceProfile {
				t.Fatalf("incomplete or expired credentials without an error: %v", c)
			}
			return
		}
		if !c.IsZero() {
			t.Fatalf("credentials returned with an error: %v", c)
		}
		var e *Error
		if !errors.As(err, &e) || e.Class == "" || e.Permanent() {
			t.Fatalf("unclassified or permanent error %T: %v", err, err)
		}
	})
}
