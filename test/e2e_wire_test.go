package test

import (
	"context"
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/imdsproxy/imdsproxy/test/e2e"
)

func doReq(t *testing.T, method, url string, hdr map[string]string) (*http.Response, string) {
	t.Helper()
	req, err := http.NewRequest(method, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := e2e.Client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp, string(b)
}

const ttlHeader = "X-aws-ec2-metadata-token-ttl-seconds"

func TestWireTokens(t *testing.T) {
	t.Parallel()
	e := startDaemon(t, envOptions{})
	tokenURL := e.imdsURL + "/latest/api/token"
	for _, tt := range []struct {
		name   string
		hdr    map[string]string
		status int
	}{
		{"no ttl", nil, 400},
		{"ttl 0", map[string]string{ttlHeader: "0"}, 400},
		{"ttl 21601", map[string]string{ttlHeader: "21601"}, 400},
		{"ttl not a number", map[string]string{ttlHeader: "abc"}, 400},
		{"x-forwarded-for", map[string]string{ttlHeader: "300", "X-Forwarded-For": "10.0.0.1"}, 400},
		{"ttl 1", map[string]string{ttlHeader: "1"}, 200},
		{"ttl 300 (Go)", map[string]string{ttlHeader: "300"}, 200},
		{"ttl 21600 lower-case (botocore, JS)", map[string]string{"x-aws-ec2-metadata-token-ttl-seconds": "21600"}, 200},
	} {
		t.Run(tt.name, func(t *testing.T) {
			resp, body := doReq(t, http.MethodPut, tokenURL, tt.hdr)
			if resp.StatusCode != tt.status {
				t.Fatalf("status %d, want %d (body %q)", resp.StatusCode, tt.status, body)
			}
			if tt.status != 200 {
				return
			}
			want := tt.hdr[ttlHeader]
			if want == "" {
				want = "21600"
			}
			if got := resp.Header.Get(ttlHeader); got != want {
				t.Fatalf("TTL header %q, want %q", got, want)
			}
			if body == "" || strings.ContainsAny(body, "\r\n ") {
				t.Fatalf("token %q is empty or not header-safe", body)
			}
		})
	}
	t.Run("GET on token path", func(t *testing.T) {
		resp, _ := doReq(t, http.MethodGet, tokenURL, map[string]string{ttlHeader: "300"})
		if resp.StatusCode == 200 {
			t.Fatal("GET /latest/api/token answered 200")
		}
	})
}

func TestWireCredentialRoutes(t *testing.T) {
	t.Parallel()
	e := startDaemon(t, envOptions{})
	ctx := context.Background()
	tok, err := e2e.IMDSToken(ctx, e2e.Client, e.imdsURL, 300)
	if err != nil {
		t.Fatal(err)
	}
	withTok := map[string]string{"X-aws-ec2-metadata-token": tok}

	t.Run("no token is 401", func(t *testing.T) {
		for _, p := range []string{credPath, "/latest/meta-data/iam/security-credentials/", "/latest/meta-data/instance-id"} {
			if resp, body := doReq(t, http.MethodGet, e.imdsURL+p, nil); resp.StatusCode != 401 {
				t.Errorf("GET %s without token: %d %q, want 401", p, resp.StatusCode, body)
			}
		}
	})
	t.Run("invalid token is 401", func(t *testing.T) {
		if resp, _ := doReq(t, http.MethodGet, e.imdsURL+credPath, map[string]string{"X-aws-ec2-metadata-token": "AQAEAnot-a-real-token"}); resp.StatusCode != 401 {
			t.Fatalf("status %d, want 401", resp.StatusCode)
		}
	})
	t.Run("listing is exactly the role", func(t *testing.T) {
		for _, p := range []string{"/latest/meta-data/iam/security-credentials/", "/latest/meta-data/iam/security-credentials"} {
			resp, body := doReq(t, http.MethodGet, e.imdsURL+p, withTok)
			if resp.StatusCode != 200 || body != e2e.RoleName {
				t.Errorf("GET %s: %d %q, want 200 %q", p, resp.StatusCode, body, e2e.RoleName)
			}
		}
	})
	t.Run("credential document", func(t *testing.T) {
		d, err := e2e.GetCredDoc(ctx, e2e.Client, e.imdsURL, e2e.RoleName, tok)
		if err != nil {
			t.Fatal(err)
		}
		if err := e.checkServed(d); err != nil {
			t.Fatal(err)
		}
		last, _ := e.sts.Last()
		if d.AccessKeyId != last.AccessKeyID {
			t.Fatalf("served %s, STS last issued %s", d.AccessKeyId, last.AccessKeyID)
		}
		resp, body := doReq(t, http.MethodGet, e.imdsURL+credPath+"/", withTok)
		if resp.StatusCode != 200 || !strings.Contains(body, `"Success"`) {
			t.Errorf("with trailing slash: %d", resp.StatusCode)
		}
	})
	t.Run("unknown role is 404", func(t *testing.T) {
		if resp, _ := doReq(t, http.MethodGet, e.imdsURL+"/latest/meta-data/iam/security-credentials/other-role", withTok); resp.StatusCode != 404 {
			t.Fatalf("status %d, want 404", resp.StatusCode)
		}
	})
	t.Run("PUT on credentials is not served", func(t *testing.T) {
		resp, _ := doReq(t, http.MethodPut, e.imdsURL+credPath, withTok)
		if resp.StatusCode == 200 {
			t.Fatal("PUT on the credential path answered 200")
		}
	})
	if n := e.sts.Calls(); n != 1 {
		t.Errorf("STS calls %d, want 1 (one prefetch, then cache)", n)
	}
}

func TestWirePassThrough(t *testing.T) {
	t.Parallel()
	e := startDaemon(t, envOptions{})
	ctx := context.Background()
	upTok, err := e2e.IMDSToken(ctx, e2e.Client, e.upstream.URL, 60)
	if err != nil {
		t.Fatal(err)
	}
	tok, err := e2e.IMDSToken(ctx, e2e.Client, e.imdsURL, 300)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{
		"/latest/meta-data/instance-id",
		"/latest/dynamic/instance-identity/document",
		"/latest/meta-data/placement/region",
	} {
		t.Run(strings.TrimPrefix(p, "/latest/"), func(t *testing.T) {
			wst, want, err := e2e.IMDSGet(ctx, e2e.Client, e.upstream.URL, p, upTok)
			if err != nil || wst != 200 {
				t.Fatalf("upstream %s: %d %v", p, wst, err)
			}
			st, got, err := e2e.IMDSGet(ctx, e2e.Client, e.imdsURL, p, tok)
			if err != nil {
				t.Fatal(err)
			}
			if st != 200 || got != want {
				t.Fatalf("GET %s through the daemon: %d %q\nupstream answered %q", p, st, got, want)
			}
		})
	}
	// The upstream's tokens are not the daemon's: the client's token must not
	// be forwarded verbatim, nor the upstream's accepted by the daemon.
	if st, _, _ := e2e.IMDSGet(ctx, e2e.Client, e.imdsURL, "/latest/meta-data/instance-id", upTok); st != 401 {
		t.Errorf("daemon accepted an upstream IMDS token: %d, want 401", st)
	}
}
