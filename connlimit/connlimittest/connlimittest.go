// Package connlimittest helps test servers on a connlimit.Listener: their
// shutdown, and what a kept-alive connection gets at the limit.
package connlimittest

import (
	"bufio"
	"context"
	"io"
	"net"
	"net/http"
	"testing"
	"time"
)

// PausingListener is a listener whose Accept, once the kernel has handed
// it a connection, signals on Accepted and pauses for Pause before it
// returns the connection: the moment between accept(2) and the server
// seeing the connection, which a busy host can stretch, made long enough
// to begin a shutdown in.
type PausingListener struct {
	net.Listener
	Accepted chan struct{}
	Pause    time.Duration
}

// NewPausingListener wraps ln; Accepted holds one signal.
func NewPausingListener(ln net.Listener, pause time.Duration) *PausingListener {
	return &PausingListener{Listener: ln, Accepted: make(chan struct{}, 1), Pause: pause}
}

// Accept accepts from the wrapped listener, signals and pauses.
func (l *PausingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.Accepted <- struct{}{}
		time.Sleep(l.Pause)
	}
	return c, err
}

// Paused is a server running on a PausingListener (StartPaused).
type Paused struct {
	*PausingListener
	Addr     string // where to dial it
	Shutdown context.CancelFunc
}

// StartPaused runs serve (a front door's Serve: until its context ends,
// then a drain) on a PausingListener over a new loopback listener, pausing
// for pause at each accept. Shutdown begins the shutdown; when the test
// ends it is begun if it was not, and serve must have returned nil within
// 10 s.
func StartPaused(t testing.TB, pause time.Duration, serve func(context.Context, net.Listener) error) *Paused {
	t.Helper()
	raw, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	p := &Paused{PausingListener: NewPausingListener(raw, pause), Addr: raw.Addr().String(), Shutdown: cancel}
	done := make(chan error, 1)
	go func() { done <- serve(ctx, p.PausingListener) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Serve: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Error("Serve did not return within 10s of the shutdown")
		}
	})
	return p
}

// RoundTrip writes request (raw HTTP/1.1) on c and reads one response and
// its body, all within timeout.
func RoundTrip(c net.Conn, request string, timeout time.Duration) (*http.Response, []byte, error) {
	_ = c.SetDeadline(time.Now().Add(timeout))
	if _, err := io.WriteString(c, request); err != nil {
		return nil, nil, err
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		return nil, nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	return resp, body, err
}
