package admin

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/imdsproxy/imdsproxy/connlimit/connlimittest"
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
	go func() { done <- Serve(ctx, ln, Handler(prometheus.NewRegistry(), d), nil, zap.NewNop()) }()
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
		resp, _, err := connlimittest.RoundTrip(c, request, timeout)
		if err != nil {
			return err
		}
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

// TestServeShareByOwner: with an owner, connections of one owner that are
// never idle (silent, their headers awaited) cannot hold every slot: a
// connection of another owner is answered at once, and the first owner's
// connections beyond its share are closed.
func TestServeShareByOwner(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	victims := map[string]bool{} // client addresses of the second owner
	owner := func(c net.Conn) (uint32, bool) {
		mu.Lock()
		defer mu.Unlock()
		if victims[c.RemoteAddr().String()] {
			return 2, true
		}
		return 1, true
	}
	d := &readyDaemon{}
	d.ready.Store(true)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Serve(ctx, ln, Handler(prometheus.NewRegistry(), d), owner, zap.NewNop()) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	}()

	// Owner 1: as many silent connections as there are slots, and more.
	var silent []net.Conn
	defer func() {
		for _, c := range silent {
			c.Close()
		}
	}()
	for i := range maxConns + 8 {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatalf("connection %d: %v", i+1, err)
		}
		silent = append(silent, c)
	}
	// Owner 2, once owner 1's connections have been accepted or refused.
	time.Sleep(200 * time.Millisecond)
	mu.Lock()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		mu.Unlock()
		t.Fatal(err)
	}
	victims[c.LocalAddr().String()] = true
	mu.Unlock()
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(2 * time.Second)) // under the 5 s header timeout that would free slots
	if _, err := io.WriteString(c, "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("another owner's request with %d silent connections of one owner: %v", len(silent), err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Errorf("another owner's request: %s, want 200", resp.Status)
	}
	closed := 0
	for _, s := range silent {
		_ = s.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
		if _, err := s.Read(make([]byte, 1)); errors.Is(err, io.EOF) {
			closed++
		}
	}
	if want := maxConns + 8 - (maxConns/2 + 1 + maxConns/4); closed != want {
		t.Errorf("%d of owner 1's connections closed at once, want %d (beyond half the slots and its quarter)", closed, want)
	}
}
