package proxy

import (
	"context"
	"encoding/json"
	"net/http"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/imdsproxy/imdsproxy/access"
	"github.com/imdsproxy/imdsproxy/cache"
	"github.com/imdsproxy/imdsproxy/creds"
)

// TestColdCredentialRequestBounded: with nothing cached and an exchange far
// slower than any SDK waits (here: until released, up to a minute — STS may
// take up to cache.fetch_timeout), a credential request through Serve is
// answered within the door's bound (access.DefaultWait, under the 1 s of
// botocore and JS) with the EC2 error document, not held until the exchange
// ends nor dropped by the listener's write timeout (UpstreamTimeout + 5 s);
// the exchange carries on, and once it has finished the next request is
// answered from memory (WIRE.md §8.7).
func TestColdCredentialRequestBounded(t *testing.T) {
	release := make(chan struct{})
	slow := cache.FetcherFunc[creds.Key](func(ctx context.Context, key creds.Key) (creds.Credentials, error) {
		select {
		case <-release:
		case <-ctx.Done():
			return creds.Credentials{}, ctx.Err()
		case <-time.After(time.Minute):
		}
		c := testCreds()
		c.Expires, c.LastUpdated = time.Now().Add(time.Hour), time.Now()
		return c, nil
	})
	c, err := cache.New[creds.Key](slow, cache.Config{}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewRegistry()
	broker, err := access.NewBroker(c, nil, nil, reg)
	if err != nil {
		t.Fatal(err)
	}
	s, err := New(Config{Plan: planOf(t, defaultPlanConfig()), UpstreamTimeout: 100 * time.Millisecond}, broker, nil, nil, reg)
	if err != nil {
		t.Fatal(err)
	}
	base, client := serveEnv(t, &testEnv{s: s})
	url := base + "/latest/meta-data/iam/security-credentials/" + testRole
	code := func(r reply) string {
		t.Helper()
		var doc struct{ Code, AccessKeyId string }
		if r.code != http.StatusOK {
			t.Fatalf("status %d %q, want 200 with a credential or error document", r.code, r.body)
		}
		if err := json.Unmarshal([]byte(r.body), &doc); err != nil {
			t.Fatalf("body %q: %v", r.body, err)
		}
		return doc.Code
	}

	start := time.Now()
	r := fetch(t, client, http.MethodGet, url, "")
	took := time.Since(start)
	if got := code(r); got != codeUnavailable {
		t.Fatalf("cold request during a slow exchange: Code %q (%s), want %q", got, r.body, codeUnavailable)
	}
	if took < access.DefaultWait {
		t.Errorf("answered after %s, before the bound %s: it did not wait for the exchange at all", took, access.DefaultWait)
	}
	// Far above the bound, far below the exchange: tolerant of a loaded host.
	if took > 10*time.Second {
		t.Errorf("answered after %s: the request waited on the exchange", took)
	}

	close(release)
	deadline := time.Now().Add(30 * time.Second)
	for {
		if got := code(fetch(t, client, http.MethodGet, url, "")); got == "Success" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the exchange went on after the bounded request, but its credentials were never served")
		}
		time.Sleep(20 * time.Millisecond)
	}
}
