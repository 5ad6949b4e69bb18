package proxy

import (
	"context"
	"io"
	"net"
	"net/http"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/imdsproxy/imdsproxy/access"
	"github.com/imdsproxy/imdsproxy/creds"
	"github.com/imdsproxy/imdsproxy/peer"
)

// discardRW is a ResponseWriter that keeps nothing.
type discardRW struct{ h http.Header }

func (d *discardRW) Header() http.Header         { return d.h }
func (d *discardRW) Write(b []byte) (int, error) { return len(b), nil }
func (d *discardRW) WriteHeader(int)             {}

// BenchmarkCredentialHandler is the handler's own cost for a cached
// credential GET (no loopback, no net/http server), with the default
// config (audit on: a repeat hand-out is counted, not logged) and with
// access: {audit: false}; the client identified once, as on a keep-alive
// connection. `-cpuprofile` on it shows the hot path (docs/benchmarks.md).
func BenchmarkCredentialHandler(b *testing.B) {
	for _, audit := range []bool{true, false} {
		b.Run(map[bool]string{true: "audit", false: "noaudit"}[audit], func(b *testing.B) {
			reg := prometheus.NewRegistry()
			enc := zapcore.NewJSONEncoder(zap.NewProductionEncoderConfig())
			lg := zap.New(zapcore.NewCore(enc, zapcore.AddSync(io.Discard), zap.InfoLevel))
			broker, _ := access.NewBroker(constSource{benchCreds()}, lg, lg, reg)
			sec := access.Section{Audit: &audit}
			plan, err := access.NewPlan(planDefaults(access.PlanConfig{Host: roleKey(testRole), Access: sec, Serve: creds.KindWorkload}), nil, time.Now())
			if err != nil {
				b.Fatal(err)
			}
			id := &fakeID{info: peer.Info{UID: 1000, Unit: "app.service", Cgroup: "/system.slice/app.service"}}
			s, err := New(Config{Plan: plan, TokensRequired: true}, broker, id, lg, reg)
			if err != nil {
				b.Fatal(err)
			}
			tok, _, _ := s.minter.mint(time.Now(), 21600, plan.Gen())
			ln, _ := net.Listen("tcp", "127.0.0.1:0")
			defer ln.Close()
			c, _ := net.Dial("tcp", ln.Addr().String())
			defer c.Close()
			ctx := connAccessContext(context.Background(), c)
			req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://127.0.0.1:8169/latest/meta-data/iam/security-credentials/"+testRole, nil)
			req.RequestURI = req.URL.RequestURI()
			req.Header.Set("X-Aws-Ec2-Metadata-Token", tok)
			w := &discardRW{h: http.Header{}}
			b.ReportAllocs()
			b.ResetTimer()
			for b.Loop() {
				clear(w.h)
				s.handler.ServeHTTP(w, req)
			}
		})
	}
}
