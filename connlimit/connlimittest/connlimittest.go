// Package connlimittest helps test the shutdown of servers on a
// connlimit.Listener.
package connlimittest

import (
	"net"
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
