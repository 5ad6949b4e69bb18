package peer

import (
	"context"
	"net"
	"testing"
	"time"
)

// BenchmarkLookup measures one lookup of a new connection: sock_diag plus a
// full /proc scan (cold), and one answered from the inode cache (warm,
// sock_diag plus exe and cgroup reads), a scan of every process that does
// not find the socket (the worst case), and sock_diag alone.
func BenchmarkLookup(b *testing.B) {
	skipIfUnsupported(b)
	_, server := pair(b, "tcp4", "127.0.0.1:0")
	ctx := context.Background()
	b.Run("cold", func(b *testing.B) {
		for b.Loop() {
			if _, err := NewResolver(0).LookupConn(ctx, server); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("warm", func(b *testing.B) {
		r := NewResolver(time.Hour)
		for b.Loop() {
			if _, err := r.LookupConn(ctx, server); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("full_scan", func(b *testing.B) {
		for b.Loop() {
			scanProc(ctx, "/proc", 0, -1, map[uint64]int{})
		}
	})
	b.Run("sock_diag", func(b *testing.B) {
		l, rm := server.LocalAddr().(*net.TCPAddr), server.RemoteAddr().(*net.TCPAddr)
		for b.Loop() {
			if _, _, err := sockDiag(ctx, rm, l); err != nil {
				b.Fatal(err)
			}
		}
	})
}
