package test

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/imdsproxy/imdsproxy/peer"
	"github.com/imdsproxy/imdsproxy/test/e2e"
)

// slowlorisUID is the uid of TestSlowClientsOfOneUID's hostile client.
const slowlorisUID = 64312

// slowlorisScript holds many connections to the IMDS listener, each with
// a request whose headers never end (so none is ever idle, and eviction
// cannot take one back), and opens a new one for each the server closes
// (after a pause once a round of closes is seen), for a while; it prints
// how many it held at most.
const slowlorisScript = `
import selectors, socket, sys, time
host, port, want, seconds, pause = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
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
        time.sleep(pause)
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
	holdSlots(t, e, []uint32{slowlorisUID}, 4400, 5*time.Millisecond)
	expectServedMeanwhile(t, e)
}

// TestSlowClientsOfOneUser: the same flood from four uids of one user's
// subordinate range (subuid(5): a user may run processes as any of them)
// is one user's, held to one share: another uid is still served within
// 1 s every time. The daemon runs in a mount namespace of its own whose
// /etc/subuid delegates 64400–64499 to uid 64399; keyed by uid, the four
// would take a quarter each, all the slots (another uid's requests failed
// 3 of 7–9 that way, in each of three runs).
func TestSlowClientsOfOneUser(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: the hostile clients run as other uids, the daemon in a mount namespace")
	}
	if _, err := os.Stat(peer.SubUIDFile); err != nil {
		t.Skipf("SKIPPED (LOUDLY): %s is missing (the passwd package makes it): the test mounts its own over it: %v", peer.SubUIDFile, err)
	}
	subuid := filepath.Join(t.TempDir(), "subuid")
	if err := os.WriteFile(subuid, []byte("64399:64400:100\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	e := startDaemon(t, envOptions{command: func(name string, args ...string) *exec.Cmd {
		// A private mount namespace in which /etc/subuid is the test's.
		script := `mount --bind "$1" ` + peer.SubUIDFile + ` && shift && exec "$@"`
		return exec.Command("unshare", append([]string{"--mount", "--propagation", "private", "sh", "-c", script, "sh", subuid, name}, args...)...)
	}})
	if !strings.Contains(e.logTail(400), `"subuid_ranges":1`) {
		t.Fatalf("the daemon did not read the test's subordinate uids:\n%s", e.logTail(60))
	}
	// Each client pauses 20 ms after the server closes some of its
	// connections (still far within the 2 s header timeout that frees
	// slots): four reopening at full speed would be a CPU flood, which
	// the unit's cgroup limits answer, not the shares under test.
	holdSlots(t, e, []uint32{64400, 64401, 64402, 64403}, 1100, 20*time.Millisecond)
	expectServedMeanwhile(t, e)
}

// holdSlots runs the slowloris script as each uid, each holding perUID
// connections for up to a minute (stopped when the test ends) and pausing
// for pause after closes, and returns once they hold more than half the
// IMDS listener's slots.
func holdSlots(t *testing.T, e *daemonEnv, uids []uint32, perUID int, pause time.Duration) {
	t.Helper()
	host, port, _ := strings.Cut(strings.TrimPrefix(e.imdsURL, "http://"), ":")
	ctx, cancel := context.WithCancel(t.Context())
	type client struct {
		uid            uint32
		cmd            *exec.Cmd
		stdout, stderr bytes.Buffer
	}
	var clients []*client
	t.Cleanup(func() {
		cancel()
		for _, c := range clients {
			_ = c.cmd.Wait()
			if t.Failed() {
				t.Logf("uid %d: %s%s", c.uid, c.stdout.String(), c.stderr.String())
			}
		}
	})
	for _, uid := range uids {
		c := &client{uid: uid}
		c.cmd = exec.CommandContext(ctx, python3Path, "-c", slowlorisScript, host, port, fmt.Sprint(perUID), "60",
			strconv.FormatFloat(pause.Seconds(), 'f', -1, 64))
		c.cmd.Dir = "/"
		c.cmd.Env = []string{"PATH=/usr/bin:/bin", "LANG=C.UTF-8"}
		c.cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: uid}}
		c.cmd.Stdout, c.cmd.Stderr = &c.stdout, &c.stderr
		if err := c.cmd.Start(); err != nil {
			t.Fatal(err)
		}
		clients = append(clients, c)
	}
	// Until the hostile clients hold more than half the slots.
	deadline := time.Now().Add(30 * time.Second)
	for e.scrape(t).Sum("imdsproxy_http_open_connections", nil) < 2500 {
		if time.Now().After(deadline) {
			t.Fatalf("the hostile clients did not get 2,500 connections open in 30 s")
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// expectServedMeanwhile is another uid (this process) doing what an SDK
// does at start, every 300 ms for longer than the header timeout (2 s)
// that recycles the hostile connections: new connections, a token, the
// credentials, 1 s budget each; every one must succeed, and some hostile
// connection must have been closed for being over its share.
func expectServedMeanwhile(t *testing.T, e *daemonEnv) {
	t.Helper()
	var failures []string
	tries, slowest := 0, time.Duration(0)
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
		slowest = max(slowest, time.Since(start))
	}
	m := e.scrape(t)
	t.Logf("%d tries, the slowest %v; open connections %v, over share %v", tries, slowest.Round(time.Millisecond),
		m.Sum("imdsproxy_http_open_connections", nil), m.Sum("imdsproxy_http_connections_over_share_total", nil))
	if len(failures) > 0 {
		t.Errorf("%d of %d token and credential requests of another uid failed while the slots were held: %v", len(failures), tries, failures)
	}
	if m.Sum("imdsproxy_http_connections_over_share_total", nil) == 0 {
		t.Error("no connection was closed for being over its owner's share")
	}
}
