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
// connections open, so a local process cannot exhaust the daemon's file
// descriptors, and it cannot lock scrapes out by merely keeping them open:
// with maxConns keep-alive connections idle after a request each, one more
// is answered at once (the one idle the longest gives way); with maxConns
// silent new connections held, one more waits in the listen backlog and is
// answered once one of them closes.
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
	// hold opens maxConns connections, each idle after a request when
	// asking, else silent.
	hold := func(asking bool) []net.Conn {
		held := make([]net.Conn, 0, maxConns)
		for i := range maxConns {
			c, err := net.Dial("tcp", ln.Addr().String())
			if err != nil {
				t.Fatalf("connection %d: %v", i+1, err)
			}
			held = append(held, c)
			if asking {
				if err := get(c, 20*time.Second); err != nil {
					t.Fatalf("connection %d of %d: %v", i+1, maxConns, err)
				}
			}
		}
		return held
	}
	closeAll := func(cs []net.Conn) {
		for _, c := range cs {
			c.Close()
		}
	}

	idle := hold(true)
	extra, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	if err := get(extra, 20*time.Second); err != nil {
		t.Fatalf("connection %d with %d idle keep-alive ones held: %v", maxConns+1, maxConns, err)
	}
	extra.Close()
	closeAll(idle)

	// The slots free up as the server sees the closes; then maxConns
	// silent connections hold every slot (for readHeaderTimeout, 5 s).
	time.Sleep(200 * time.Millisecond)
	silent := hold(false)
	defer closeAll(silent)
	extra, err = net.Dial("tcp", ln.Addr().String())
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
		t.Fatalf("connection %d with %d silent ones held: read %d bytes, %v; want it to wait", maxConns+1, maxConns, n, err)
	}
	// A held connection closes (or the read-header timeout closes them
	// all): the waiting one is accepted and answered.
	silent[0].Close()
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
