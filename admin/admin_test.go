package admin

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
)

// TestServeConnectionLimit: the admin listener keeps at most maxConns
// connections open, so a local process holding keep-alive connections
// cannot exhaust the daemon's file descriptors. One more connection waits
// in the listen backlog while they are held, and is served once one of them
// closes.
func TestServeConnectionLimit(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	d := &readyDaemon{}
	d.ready.Store(true)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Serve(ctx, ln, Handler(prometheus.NewRegistry(), d), zap.NewNop()) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	}()

	const request = "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
	// get sends request on c and reads the answer, which must be a 200
	// that keeps the connection open.
	get := func(c net.Conn, timeout time.Duration) error {
		_ = c.SetDeadline(time.Now().Add(timeout))
		if _, err := io.WriteString(c, request); err != nil {
			return err
		}
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			return err
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK || resp.Close {
			return errors.New("answer " + resp.Status + " or a closed connection, want a 200 kept alive")
		}
		return nil
	}

	held := make([]net.Conn, 0, maxConns)
	defer func() {
		for _, c := range held {
			c.Close()
		}
	}()
	for i := range maxConns {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatalf("connection %d: %v", i+1, err)
		}
		held = append(held, c)
		if err := get(c, 20*time.Second); err != nil {
			t.Fatalf("connection %d of %d: %v", i+1, maxConns, err)
		}
	}

	// One more: the kernel completes the handshake, the daemon does not
	// accept it while the others are held. (A slow machine can only make
	// this pass wrongly, never fail wrongly.)
	extra, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer extra.Close()
	_ = extra.SetDeadline(time.Now().Add(time.Second))
	if _, err := io.WriteString(extra, request); err != nil {
		t.Fatal(err)
	}
	var one [1]byte
	n, err := extra.Read(one[:])
	var ne net.Error
	if n != 0 || !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("connection %d with %d held: read %d bytes, %v; want it to wait", maxConns+1, maxConns, n, err)
	}

	// A held connection closes: the waiting one is accepted and answered.
	held[0].Close()
	held = held[1:]
	_ = extra.SetDeadline(time.Now().Add(20 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(extra), nil)
	if err != nil {
		t.Fatalf("connection %d after one closed: %v", maxConns+1, err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Errorf("connection %d after one closed: %s, want 200", maxConns+1, resp.Status)
	}
}
