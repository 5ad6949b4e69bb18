package e2e

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"time"
)

// ErrExited is wrapped by WaitOK's error when the process it watched exited
// first.
var ErrExited = errors.New("process exited")

// FreePort returns a loopback TCP port that was free a moment ago.
func FreePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

// WaitTCP waits until addr accepts a TCP connection, at most timeout.
func WaitTCP(addr string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
			return nil
		}
		if time.Now().After(deadline) {
			return err
		}
		time.Sleep(25 * time.Millisecond)
	}
}

// WaitOK GETs url with client every poll until it answers 200 OK. It
// returns an error once timeout has passed, or at once when p (unless nil)
// has exited (wrapping ErrExited).
func WaitOK(client *http.Client, url string, timeout, poll time.Duration, p *Process) error {
	deadline := time.Now().Add(timeout)
	var last string
	for {
		if p != nil && p.Exited() {
			return fmt.Errorf("%w: %v (GET %s, last: %s)", ErrExited, p.Err(), url, last)
		}
		st, body, err := get(client, url)
		if err == nil && st == http.StatusOK {
			return nil
		}
		last = fmt.Sprintf("status %d %q err %v", st, body, err)
		if time.Now().After(deadline) {
			return fmt.Errorf("GET %s not 200 after %v (last: %s)", url, timeout, last)
		}
		time.Sleep(poll)
	}
}
