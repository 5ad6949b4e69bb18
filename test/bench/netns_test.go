package bench

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/imdsproxy/imdsproxy/test/e2e"
)

// The interception benchmark: a network namespace of this run's own, with
// loopback and a veth pair (both ends inside) whose first end carries the
// route to 169.254.169.254, as eth0 does on EC2; nothing answers there. Inside it run a second daemon with
// `intercept: {enabled: true}` (its rules installed first with `imdsproxy
// intercept install`, as the unit's ExecStartPre does) and, on the
// namespace's loopback, the fake STS and the 404 upstream, served by this
// process from listeners opened inside the namespace. The load generator is
// this process too: its connections are dialled from a thread that has
// entered the namespace, so each socket belongs to the namespace for its
// whole life, and the same workers reach the daemon either at
// http://169.254.169.254/ (redirected by the nftables rule) or at
// http://127.0.0.1:PORT/ (direct).
//
// The daemon runs as root; the rules exempt nsExemptUID instead of the
// daemon's uid, so that this process's root-owned connections are
// redirected and the daemon's own (only to loopback here) would be too, which
// does not matter since it never dials 169.254.169.254.

// nsExemptUID is intercept.exempt_uid of the namespaced daemon: nobody, a uid
// neither the daemon nor the load generator uses.
const nsExemptUID = 65534

// nsPrefix names this harness's namespaces: nsPrefix + pid of the bench.
const nsPrefix = "imdsproxy-bench-"

type nsEnv struct {
	name     string
	handle   *os.File // /run/netns/<name>
	srvs     []*http.Server
	stsURL   string
	upstream string
	direct   *server // the daemon at 127.0.0.1:PORT
	redirect *server // the same daemon at 169.254.169.254:80
	once     sync.Once
}

// setupNetns builds the namespace and its daemon. It returns a reason to
// skip instead of an error: the rest of the run does not depend on it.
func (e *benchEnv) setupNetns() (_ *nsEnv, skip string) {
	if os.Geteuid() != 0 {
		return nil, "not root: creating a network namespace and nftables rules needs root"
	}
	for _, tool := range []string{"ip", "nft"} {
		if _, err := exec.LookPath(tool); err != nil {
			return nil, tool + " is not installed (iproute2 and nftables are needed)"
		}
	}
	if out, err := exec.Command("ip", "netns", "list").CombinedOutput(); err != nil {
		return nil, fmt.Sprintf("`ip netns` is unavailable: %v: %s", err, strings.TrimSpace(string(out)))
	}
	removeStaleNetns()
	n := &nsEnv{name: nsPrefix + strconv.Itoa(os.Getpid())}
	ok := false
	defer func() {
		if !ok {
			n.teardown()
		}
	}()
	steps := [][]string{
		{"netns", "add", n.name},
		{"-n", n.name, "link", "set", "lo", "up"},
		{"-n", n.name, "link", "add", "imdsb0", "type", "veth", "peer", "name", "imdsb1"},
		{"-n", n.name, "addr", "add", "169.254.0.2/30", "dev", "imdsb0"},
		{"-n", n.name, "link", "set", "imdsb0", "up"},
		{"-n", n.name, "link", "set", "imdsb1", "up"},
		{"-n", n.name, "route", "add", "169.254.169.254/32", "dev", "imdsb0"},
	}
	for _, s := range steps {
		if out, err := exec.Command("ip", s...).CombinedOutput(); err != nil {
			return nil, fmt.Sprintf("ip %s: %v: %s", strings.Join(s, " "), err, strings.TrimSpace(string(out)))
		}
	}
	var err error
	if n.handle, err = os.Open("/run/netns/" + n.name); err != nil {
		return nil, err.Error()
	}
	serve := func(h http.Handler) (string, error) {
		ln, err := n.listen("127.0.0.1:0")
		if err != nil {
			return "", err
		}
		srv := &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second}
		n.srvs = append(n.srvs, srv)
		go func() { _ = srv.Serve(ln) }()
		return "http://" + ln.Addr().String(), nil
	}
	if n.stsURL, err = serve(e.fakes.STS.Handler()); err != nil {
		return nil, "listen in the namespace: " + err.Error()
	}
	if n.upstream, err = serve(http.NotFoundHandler()); err != nil {
		return nil, "listen in the namespace: " + err.Error()
	}
	if n.direct, _, err = e.startDaemonIn(n); err != nil {
		return nil, "daemon in the namespace: " + err.Error()
	}
	table, err := exec.Command("ip", "netns", "exec", n.name, "nft", "list", "table", "inet", "imdsproxy").CombinedOutput()
	if err != nil || !strings.Contains(string(table), "redirect to :") {
		return nil, fmt.Sprintf("no redirect rule in the namespace after intercept install (%v):\n%s", err, table)
	}
	d := n.direct
	r := *d
	r.name, r.base = "daemon (netns, redirected)", "http://169.254.169.254"
	n.redirect = &r
	// One flow each way; the token of the direct one serves both.
	for _, s := range []*server{d, n.redirect} {
		c := newClientDial(n.dial)
		tr, err := roundTrip(c, http.MethodPut, s.base+e2e.TokenPath, "")
		if err == nil && tr.Status == http.StatusOK {
			var cr wireResponse
			cr, err = roundTrip(c, http.MethodGet, s.base+e2e.CredentialsPath+e2e.RoleName, string(tr.Body))
			if err == nil && cr.Status != http.StatusOK {
				err = fmt.Errorf("GET credentials: status %d: %.200q", cr.Status, cr.Body)
			}
		} else if err == nil {
			err = fmt.Errorf("PUT token: status %d: %.200q", tr.Status, tr.Body)
		}
		c.CloseIdleConnections()
		if err != nil {
			return nil, fmt.Sprintf("%s at %s: %v; daemon output:\n%s", s.name, s.base, err, d.out)
		}
		if s == d {
			d.tok = string(tr.Body)
			n.redirect.tok = d.tok
		}
	}
	ok = true
	return n, ""
}

// inNetns runs f on a thread that has entered the namespace. The thread is
// never unlocked, so it exits with the goroutine and no other goroutine runs
// in the namespace by accident. Sockets f creates stay in the namespace.
func (n *nsEnv) inNetns(f func() error) error {
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		if err := unix.Setns(int(n.handle.Fd()), unix.CLONE_NEWNET); err != nil {
			done <- fmt.Errorf("setns %s: %w", n.name, err)
			return
		}
		done <- f()
	}()
	return <-done
}

func (n *nsEnv) listen(addr string) (ln net.Listener, err error) {
	err = n.inNetns(func() error {
		ln, err = net.Listen("tcp", addr)
		return err
	})
	return ln, err
}

// dial is the load generator's dialer inside the namespace. A numeric
// address is dialled by the calling goroutine, so socket(2) runs on the
// thread that has entered the namespace.
func (n *nsEnv) dial(ctx context.Context, network, addr string) (c net.Conn, err error) {
	err = n.inNetns(func() error {
		c, err = (&net.Dialer{Timeout: 2 * time.Second, KeepAlive: 30 * time.Second}).DialContext(ctx, network, addr)
		return err
	})
	return c, err
}

// teardown stops the daemon and the servers, kills anything left in the
// namespace and deletes it (the dummy link and the rules go with it).
func (n *nsEnv) teardown() {
	if n == nil {
		return
	}
	n.once.Do(func() {
		n.direct.stop()
		for _, s := range n.srvs {
			_ = s.Close()
		}
		killNetns(n.name)
		if n.handle != nil {
			n.handle.Close()
		}
		if out, err := exec.Command("ip", "netns", "del", n.name).CombinedOutput(); err != nil &&
			!strings.Contains(string(out), "No such file") {
			fmt.Fprintf(os.Stderr, "bench: ip netns del %s: %v: %s\n", n.name, err, out)
		}
	})
}

func killNetns(name string) {
	out, err := exec.Command("ip", "netns", "pids", name).Output()
	if err != nil {
		return
	}
	for _, p := range strings.Fields(string(out)) {
		if pid, err := strconv.Atoi(p); err == nil && pid > 1 && pid != os.Getpid() {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
}

// removeStaleNetns deletes namespaces of earlier bench runs whose process is
// gone (killed before it could clean up).
func removeStaleNetns() {
	out, err := exec.Command("ip", "netns", "list").Output()
	if err != nil {
		return
	}
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) == 0 || !strings.HasPrefix(f[0], nsPrefix) {
			continue
		}
		pid, err := strconv.Atoi(strings.TrimPrefix(f[0], nsPrefix))
		if err != nil || pid == os.Getpid() {
			continue
		}
		if err := syscall.Kill(pid, 0); errors.Is(err, syscall.ESRCH) {
			killNetns(f[0])
			_ = exec.Command("ip", "netns", "del", f[0]).Run()
		}
	}
}
