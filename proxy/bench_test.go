package proxy

import (
	"context"
	"io"
	"net"
	"net/http"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/imdsproxy/imdsproxy/access"
	"github.com/imdsproxy/imdsproxy/creds"
	"github.com/imdsproxy/imdsproxy/peer"
)

// constSource always answers with the same valid credentials.
type constSource struct{ c creds.Credentials }

func (s constSource) GetWithin(context.Context, creds.Key, time.Duration) (creds.Credentials, error) {
	return s.c, nil
}

// benchServer is a Server on the real clock serving c from a constSource
// through plan pc, identifying every client as who.
func benchServer(b *testing.B, pc access.PlanConfig, who peer.Info) *Server {
	b.Helper()
	reg := prometheus.NewRegistry()
	broker, err := access.NewBroker(constSource{benchCreds()}, nil, nil, reg)
	if err != nil {
		b.Fatal(err)
	}
	plan, err := access.NewPlan(planDefaults(pc), nil, time.Now())
	if err != nil {
		b.Fatal(err)
	}
	id := &fakeID{info: who}
	s, err := New(Config{Plan: plan, TokensRequired: true}, broker, id, nil, reg)
	if err != nil {
		b.Fatal(err)
	}
	return s
}

func benchCreds() creds.Credentials {
	c := testCreds()
	c.Expires = time.Now().Add(time.Hour)
	return c
}

// benchServe serves h on a loopback listener and returns its base URL.
func benchServe(b *testing.B, serve func(ctx context.Context, ln net.Listener) error) string {
	b.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = serve(ctx, ln) }()
	b.Cleanup(func() { cancel(); <-done })
	return "http://" + ln.Addr().String()
}

// benchGet runs GETs of path with header hdr against base over keep-alive
// connections from b.RunParallel goroutines.
func benchGet(b *testing.B, base, path string, hdr http.Header) {
	b.Helper()
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 1, DisableCompression: true}}
		req, _ := http.NewRequest(http.MethodGet, base+path, nil)
		req.Header = hdr
		for pb.Next() {
			resp, err := client.Do(req)
			if err != nil {
				b.Error(err)
				return
			}
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				b.Errorf("status %d", resp.StatusCode)
				return
			}
		}
		client.CloseIdleConnections()
	})
}

// BenchmarkCredentialGET measures a cached credential GET through the real
// Server over loopback; BenchmarkCredentialGETCeiling serves the same bytes
// from a bare net/http handler in the same run, so the two are read as a
// ratio (see docs/benchmarks.md for the whole-binary numbers).
func BenchmarkCredentialGET(b *testing.B) {
	s := benchServer(b, defaultPlanConfig(), peer.Info{})
	tok, _, err := s.minter.mint(time.Now(), 21600, s.state.Load().cfg.Plan.Gen())
	if err != nil {
		b.Fatal(err)
	}
	base := benchServe(b, s.Serve)
	hdr := http.Header{"X-Aws-Ec2-Metadata-Token": {tok}}
	benchGet(b, base, "/latest/meta-data/iam/security-credentials/"+testRole, hdr)
}

func BenchmarkCredentialGETCeiling(b *testing.B) {
	c := testCreds()
	c.Expires = time.Now().Add(time.Hour)
	body := credentialDocument(c, time.Now(), false)
	h := http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		_, _ = w.Write(body)
	})
	base := benchServe(b, func(ctx context.Context, ln net.Listener) error {
		srv := &http.Server{Handler: h}
		go func() { <-ctx.Done(); _ = srv.Close() }()
		_ = srv.Serve(ln)
		return nil
	})
	benchGet(b, base, "/latest/meta-data/iam/security-credentials/"+testRole, http.Header{"X-Aws-Ec2-Metadata-Token": {"x"}})
}

// BenchmarkCredentialGETWorkload is BenchmarkCredentialGET for a client
// that the plan's workloads: map to a role of its own (identified once per
// keep-alive connection; audited to a no-op logger).
func BenchmarkCredentialGETWorkload(b *testing.B) {
	s := benchServer(b, withWorkloads(access.PlanConfig{}, uidWorkload(1001, "billing")), peer.Info{UID: 1001})
	tok, _, err := s.minter.mint(time.Now(), 21600, s.state.Load().cfg.Plan.Gen())
	if err != nil {
		b.Fatal(err)
	}
	base := benchServe(b, s.Serve)
	hdr := http.Header{"X-Aws-Ec2-Metadata-Token": {tok}}
	benchGet(b, base, "/latest/meta-data/iam/security-credentials/billing", hdr)
}
