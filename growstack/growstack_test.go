package growstack

import (
	"runtime"
	"sync"
	"testing"
)

// stackInUse is the bytes of stack the runtime has in use, after n
// goroutines each ran f and parked: their stacks are all still held.
func stackInUse(t testing.TB, n int, f func()) uint64 {
	t.Helper()
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	var started sync.WaitGroup
	release := make(chan struct{})
	var done sync.WaitGroup
	for range n {
		started.Add(1)
		done.Add(1)
		go func() {
			defer done.Done()
			f()
			started.Done()
			<-release
		}()
	}
	started.Wait()
	runtime.ReadMemStats(&after)
	close(release)
	done.Wait()
	if after.StackInuse < before.StackInuse {
		return 0
	}
	return after.StackInuse - before.StackInuse
}

// TestGrow checks that Grow, called at the top of a new goroutine, leaves
// it a stack of at least 16 KiB, and that without it the goroutine's stack
// stays small: what the front doors' handlers rely on.
func TestGrow(t *testing.T) {
	const n = 200
	grown := stackInUse(t, n, Grow) / n
	plain := stackInUse(t, n, func() {}) / n
	t.Logf("stack per goroutine: %d bytes after Grow, %d without", grown, plain)
	if grown < 16<<10 {
		t.Errorf("stack per goroutine after Grow = %d bytes, want at least 16 KiB", grown)
	}
	if plain >= grown/2 {
		t.Errorf("stack per goroutine without Grow = %d bytes, after it %d: Grow made no difference", plain, grown)
	}
}

// frame is one level of deep: about 1 KiB of stack.
//
//go:noinline
func frame(n int, buf *[128]uint64) uint64 {
	var local [120]uint64
	local[n%len(local)] = uint64(n)
	if n == 0 {
		return local[0] + buf[0]
	}
	return frame(n-1, &[128]uint64{uint64(n)}) + local[n%len(local)]
}

// BenchmarkNewGoroutineDeepCall is a new goroutine per operation making a
// call chain that needs about 12 KiB of stack, as a connection's handler
// does: the stack grows 2→4→8→16 KiB, deeper and deeper; with Grow first,
// once, shallow.
func BenchmarkNewGoroutineDeepCall(b *testing.B) {
	for _, tc := range []struct {
		name string
		grow bool
	}{{"plain", false}, {"grow", true}} {
		b.Run(tc.name, func(b *testing.B) {
			done := make(chan uint64)
			for b.Loop() {
				go func() {
					if tc.grow {
						Grow()
					}
					done <- frame(10, &[128]uint64{})
				}()
				<-done
			}
		})
	}
}
