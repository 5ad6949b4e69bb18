package cache

import (
	"context"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
)

// BenchmarkGetHit measures the request path: a parallel Get of a key with
// valid cached credentials.
func BenchmarkGetHit(b *testing.B) {
	c, err := New[string](newFake(succeed(time.Hour)), Config{}, zap.NewNop(), prometheus.NewRegistry())
	if err != nil {
		b.Fatal(err)
	}
	ctx := context.Background()
	if err := c.Prefetch(ctx, "app"); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := c.Get(ctx, "app"); err != nil {
				b.Fatal(err)
			}
		}
	})
}
