package issuer

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"os"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"
)

// benchYAML is the benchmark issuer: an ES256 file key, aws_iid with a test
// CA, no rate limit (every request comes from one host).
var benchYAML = strings.Replace(baseYAML, "policy:", "rate_limit: {per_host_per_minute: 0}\npolicy:", 1)

// BenchmarkMint is one token request through the whole HTTP handler:
// JSON parse, PKCS7 verification (RSA-2048 test CA), policy with session
// tags, ES256 signature, JSON answer.
func BenchmarkMint(b *testing.B) {
	e := newEnv(b, benchYAML)
	body, _ := json.Marshal(iidRequest(b, "billing"))
	b.ReportAllocs()
	b.ResetTimer()
	start := time.Now()
	for i := 0; i < b.N; i++ {
		req := httptest.NewRequest(http.MethodPost, PathToken, bytes.NewReader(body))
		req.Header.Set("Content-Type", "application/json")
		rec := httptest.NewRecorder()
		e.h.ServeHTTP(rec, req)
		if rec.Code != 200 {
			b.Fatalf("status %d %s", rec.Code, rec.Body.Bytes())
		}
	}
	b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "mints/s")
}

// BenchmarkSignES256 is the bare signature of a token's claims with the
// ES256 file key: the ceiling of BenchmarkMint.
func BenchmarkSignES256(b *testing.B) {
	e := newEnv(b, benchYAML)
	k := e.srv.state.Load().keys[0]
	claims := []byte(`{"iss":"https://oidc.example.com/imds","sub":"billing","aud":"sts.amazonaws.com","iat":1767225600,"nbf":1767225600,"exp":1767229200,"jti":"AAAAAAAAAAAAAAAAAAAAAA"}`)
	ctx := context.Background()
	b.ReportAllocs()
	b.ResetTimer()
	start := time.Now()
	for i := 0; i < b.N; i++ {
		if _, err := k.signJWT(ctx, claims); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "signs/s")
}

// TestPacedMintLatency sends token requests over real HTTP at a fixed 500
// per second for 10 s and reports the latency percentiles. It runs only
// with IMDSPROXY_ISSUER_BENCH=1 (make bench): it is a measurement, and
// takes the machine for 10 s.
func TestPacedMintLatency(t *testing.T) {
	if os.Getenv("IMDSPROXY_ISSUER_BENCH") != "1" {
		t.Skip("set IMDSPROXY_ISSUER_BENCH=1 to measure the p99 at 500 mints/s")
	}
	const rate, dur = 500, 10 * time.Second
	e := newEnv(t, benchYAML)
	srv := httptest.NewServer(e.h)
	defer srv.Close()
	body, _ := json.Marshal(iidRequest(t, "billing"))
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 256, MaxConnsPerHost: 256}, Timeout: 10 * time.Second}
	n := int(rate * dur / time.Second)
	lat := make([]time.Duration, n)
	var failed sync.Map
	var wg sync.WaitGroup
	start := time.Now()
	for i := 0; i < n; i++ {
		due := start.Add(time.Duration(i) * time.Second / rate)
		if d := time.Until(due); d > 0 {
			time.Sleep(d)
		}
		wg.Add(1)
		go func(i int, due time.Time) {
			defer wg.Done()
			resp, err := client.Post(srv.URL+PathToken, "application/json", bytes.NewReader(body))
			if err != nil || resp.StatusCode != 200 {
				failed.Store(i, err)
			}
			if resp != nil {
				_, _ = bytes.NewBuffer(nil).ReadFrom(resp.Body)
				resp.Body.Close()
			}
			lat[i] = time.Since(due) // from when it was due: the generator's lag counts
		}(i, due)
	}
	wg.Wait()
	elapsed := time.Since(start)
	nFailed := 0
	failed.Range(func(any, any) bool { nFailed++; return true })
	sort.Slice(lat, func(a, b int) bool { return lat[a] < lat[b] })
	pct := func(p float64) time.Duration { return lat[int(p*float64(n-1))] }
	t.Logf("paced mints: %d requests at %d/s in %s, %d failed; latency p50 %s p90 %s p99 %s max %s",
		n, rate, elapsed.Round(time.Millisecond), nFailed, pct(.5), pct(.9), pct(.99), lat[n-1])
	if nFailed > 0 {
		t.Fatalf("%d requests failed", nFailed)
	}
}
