package bench

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"testing"
)

// TestMain either runs as the ceiling server or the raw replay (when
// re-executed with ceilingEnv set) or runs the benchmarks, prints the markdown report and
// stops the subprocesses.
func TestMain(m *testing.M) {
	if spec := os.Getenv(ceilingEnv); spec != "" {
		os.Exit(runCeiling(spec, os.Getenv(rawEnv) != ""))
	}
	flag.Parse()
	if err := applyPin(); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(2)
	}
	code := m.Run()
	printReport(os.Stdout)
	teardownEnv()
	os.Exit(code)
}

func signalContext() (context.Context, context.CancelFunc) {
	return signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
}
