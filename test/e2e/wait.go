package e2e

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"
)

// ErrExited is wrapped by WaitOK's error when the process it watched exited
// first.
var ErrExited = errors.New("process exited")

// FreePort returns a loopback TCP port that was free a moment ago, for a
// process the test starts to bind. It is chosen at random below the
// kernel's ephemeral range (net.ipv4.ip_local_port_range, 32768–60999 by
// default), where outgoing connections never take their source ports: a
// port the kernel hands out for ":0" is as likely to be taken by the next
// client connection as by the process it was meant for, which made daemons
// fail with "address already in use" on a busy machine. Ports already given
// out by this process are not given again.
func FreePort() (int, error) {
	lo, hi := portRange()
	freePorts.Lock()
	defer freePorts.Unlock()
	for range 1000 {
		port := lo + rand.IntN(hi-lo)
		if freePorts.given[port] {
			continue
		}
		ln, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port))
		if err != nil {
			continue
		}
		ln.Close()
		freePorts.given[port] = true
		return port, nil
	}
	return 0, errors.New("no free loopback port below the ephemeral range")
}

var freePorts = struct {
	sync.Mutex
	given map[int]bool
}{given: map[int]bool{}}

// portRange is where FreePort draws from: [10000, the ephemeral range's
// start), at least 4096 ports wide.
func portRange() (lo, hi int) {
	lo, hi = 10000, 32768
	if b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range"); err == nil {
		if f := strings.Fields(string(b)); len(f) == 2 {
			if start, err := strconv.Atoi(f[0]); err == nil && start-lo >= 4096 {
				hi = start
			}
		}
	}
	return lo, hi
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
