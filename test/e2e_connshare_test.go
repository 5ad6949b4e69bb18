package test

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/imdsproxy/imdsproxy/test/e2e"
)

// slowlorisUID is the uid of TestSlowClientsOfOneUID's hostile client.
const slowlorisUID = 64312

// slowlorisScript holds many connections to the IMDS listener, each with
// a request whose headers never end (so none is ever idle, and eviction
// cannot take one back), and opens a new one for each the server closes,
// for a while; it prints how many it held at most.
const slowlorisScript = `
import selectors, socket, sys, time
host, port, want, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
sel = selectors.DefaultSelector()
held, most, opened, failed = 0, 0, 0, 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    while held < want and time.monotonic() < end:
        try:
            s = socket.create_connection((host, port), timeout=2)
            s.sendall(b"GET /latest/meta-data/ HTTP/1.1\r\nHost: 169.254.169.254\r\nX-Slow: ")
        except OSError:
            failed += 1
            time.sleep(0.01)
            break
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
        held, opened = held + 1, opened + 1
    most = max(most, held)
    closed = 0
    for key, _ in sel.select(timeout=0.05):
        sel.unregister(key.fileobj)
        key.fileobj.close()
        held, closed = held - 1, closed + 1
    if closed:
        time.sleep(0.005)
print("held at most %d, opened %d, failed %d" % (most, opened, failed))
`

// TestSlowClientsOfOneUID: one local uid holding more connections than
// the IMDS listener keeps open (4,096), each with unfinished headers and
// reopened as soon as the server closes it, must not lock other processes
// out: the listener attributes new connections to their uid once more than
// half its slots are taken and closes at once those of a uid holding a
// quarter, so another uid's SDK still gets a token and credentials on new
// connections within its 1 s budget, every time.
func TestSlowClientsOfOneUID(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: the hostile client runs as another uid")
	}
	e := startDaemon(t, envOptions{})
	host, port, _ := strings.Cut(strings.TrimPrefix(e.imdsURL, "http://"), ":")
	const hold = 4400
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	cmd := exec.CommandContext(ctx, python3Path, "-c", slowlorisScript, host, port, fmt.Sprint(hold), "60")
	cmd.Dir = "/"
	cmd.Env = []string{"PATH=/usr/bin:/bin", "LANG=C.UTF-8"}
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: slowlorisUID, Gid: slowlorisUID}}
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		cancel()
		_ = cmd.Wait()
		if t.Failed() {
			t.Logf("uid %d: %s%s", slowlorisUID, stdout.String(), stderr.String())
		}
	}()

	// Until the hostile client holds more than half the slots.
	deadline := time.Now().Add(30 * time.Second)
	for e.scrape(t).Sum("imdsproxy_http_open_connections", nil) < 2500 {
		if time.Now().After(deadline) {
			t.Fatalf("the hostile client did not get 2,500 connections open in 30 s: %s%s", stdout.String(), stderr.String())
		}
		time.Sleep(100 * time.Millisecond)
	}

	// Another uid (this process), as an SDK does at start: new
	// connections, a token, the credentials, 1 s budget each; for longer
	// than the header timeout (2 s) that recycles the hostile connections.
	var failures []string
	tries := 0
	for end := time.Now().Add(6 * time.Second); time.Now().Before(end); time.Sleep(300 * time.Millisecond) {
		tries++
		c := &http.Client{Timeout: time.Second, Transport: &http.Transport{Proxy: nil, DisableKeepAlives: true}}
		start := time.Now()
		tok, err := e2e.IMDSToken(context.Background(), c, e.imdsURL, 21600)
		if err == nil {
			var st int
			st, _, err = e2e.IMDSGet(context.Background(), c, e.imdsURL, credPath, tok)
			if err == nil && st != http.StatusOK {
				err = fmt.Errorf("status %d", st)
			}
		}
		if err != nil {
			failures = append(failures, fmt.Sprintf("after %v: %v", time.Since(start).Round(time.Millisecond), err))
		}
	}
	m := e.scrape(t)
	t.Logf("%d tries; open connections %v, over share %v", tries, m.Sum("imdsproxy_http_open_connections", nil),
		m.Sum("imdsproxy_http_connections_over_share_total", nil))
	if len(failures) > 0 {
		t.Errorf("%d of %d token and credential requests of another uid failed while one uid held the slots: %v", len(failures), tries, failures)
	}
	if m.Sum("imdsproxy_http_connections_over_share_total", nil) == 0 {
		t.Error("no connection was closed for being over its uid's share")
	}
}
