package test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/imdsproxy/imdsproxy/test/e2e"
)

// The interception of containers on a bridge, end to end. On top of
// newIcEnv's "host" and "imds" namespaces (see e2e_intercept_test.go):
//
//	ns "pod"   10.99.0.2/24, default route via 10.99.0.1: a client one routed
//	   │       hop behind the container (a pod in a kind node, a nested
//	   │       container); "ctr" forwards for it
//	ns "ctr"   eth0 172.31.250.2/24, fd00:b1d::2/64, default routes via the
//	   │       bridge's addresses: a container on Docker's default network
//	   │ veth, enslaved to the bridge
//	ns "host"  bridge icb… 172.31.250.1/24, fd00:b1d::1/64, listed in
//	   │       intercept.bridges (docker0's role), and bridge ico…
//	   │       172.31.249.1/24, not listed (a user-defined Docker network
//	   │       nobody told the daemon about) with ns "ctr2" (172.31.249.2) on
//	   │       it; IP forwarding on, as Docker sets it, so without the rules
//	   │       a container reaches the real IMDS through the host
//	ns "imds"  routes back to the container subnets; besides the real IMDS on
//	           169.254.169.254:80, a second instance of it on port 8080 and
//	           a plain HTTP server on 169.254.0.1:80 (other destinations)
//
// The daemon gets its sockets as systemd would give them with the drop-in
// deploy.md describes: 127.0.0.1:8169, [::1]:8169 and the bridge's
// 172.31.250.1:8169 and [fd00:b1d::1]:8169, plus the admin socket.

const (
	brAddr4     = "172.31.250.1"
	brAddr6     = "fd00:b1d::1"
	brCtrAddr4  = "172.31.250.2"
	brPodAddr4  = "10.99.0.2"
	brSideAddr  = "169.254.0.1" // the imds namespace's end of the veth
	brSideBody  = "not-the-metadata-service"
	brTokenPath = "/latest/api/token"
	// headerTokenTTLName is the header every token response carries.
	headerTokenTTLName = "X-Aws-Ec2-Metadata-Token-Ttl-Seconds"
)

type brEnv struct {
	*icEnv
	ctr, pod, ctr2 string // namespace names
	bridge, other  string // bridge names: listed in intercept.bridges, not listed
}

func TestInterceptContainerBridge(t *testing.T) {
	aemm := requireNetnsTest(t, "the container interception end-to-end test", "network namespaces, bridges and nftables rules")
	b := &brEnv{icEnv: newIcEnv(t, aemm, "")}
	b.setupContainers(aemm)
	b.configure(1)

	for range 2 {
		b.nsRun(b.host, nil, b.bin, "intercept", "install", "--config", b.config)
	}
	table := b.nsMust(b.host, nil, "nft", "list", "table", "inet", "imdsproxy")
	pre := brChainText(table, "prerouting")
	if pre == "" || !strings.Contains(pre, "hook prerouting priority") {
		t.Fatalf("no prerouting chain after install:\n%s", table)
	}
	if n := strings.Count(pre, fmt.Sprintf(`iifname "%s"`, b.bridge)); n != 2 {
		t.Errorf("prerouting chain matches iifname %q in %d rules, want 2 (IPv4 + IPv6):\n%s", b.bridge, n, pre)
	}
	if n := strings.Count(pre, "redirect to :8169"); n != 2 {
		t.Errorf("prerouting chain has %d redirects, want 2:\n%s", n, pre)
	}
	if strings.Contains(table, b.other) {
		t.Errorf("the rules name bridge %s, which is not in intercept.bridges:\n%s", b.other, table)
	}
	if n := strings.Count(table, "redirect to :8169"); n != 4 {
		t.Errorf("after installing twice nft lists %d redirects, want 4 (output and prerouting, IPv4 and IPv6):\n%s", n, table)
	}
	b.nsMust(b.host, nil, b.bin, "intercept", "status", "--config", b.config)

	b.openBridgeSockets()
	d := b.startDaemon()

	t.Run("the container gets the daemon's answers", func(t *testing.T) {
		if got := b.nsMust(b.ctr, nil, b.client, "get", "/latest/meta-data/iam/security-credentials/"); got != e2e.RoleName {
			t.Errorf("role listing in the container: %q, want the workload role %q", got, e2e.RoleName)
		}
		b.checkIssued(t, "Go SDK v2 in the container", b.nsMust(b.ctr, b.clientEnv(), b.client, "creds"))
		if got := b.nsMust(b.ctr, nil, b.client, "get", "/latest/meta-data/instance-id"); got != icInstanceID {
			t.Errorf("instance-id in the container: %q, want the real IMDS's %q passed through", got, icInstanceID)
		}
		if got := b.nsMust(b.ctr, nil, b.client, "get", "-base", "http://[fd00:ec2::254]", "/latest/meta-data/iam/security-credentials/"); got != e2e.RoleName {
			t.Errorf("role listing in the container over [fd00:ec2::254]: %q, want %q", got, e2e.RoleName)
		}
	})

	t.Run("only the metadata address and port are redirected", func(t *testing.T) {
		if got := b.nsMust(b.ctr, nil, "curl", "-sS", "-m", "10", "http://"+brSideAddr+"/marker"); got != brSideBody {
			t.Errorf("container to http://%s/ (another host, port 80): %q, want that server's %q", brSideAddr, got, brSideBody)
		}
		if got := b.nsMust(b.ctr, nil, "curl", "-sS", "-m", "10", "http://169.254.169.254:8080/latest/meta-data/iam/security-credentials/"); got == "" || got == e2e.RoleName {
			t.Errorf("container to 169.254.169.254:8080: role listing %q; want the real IMDS's instance profile (port 8080 is not redirected)", got)
		}
		// Nothing listens on the bridge's port 80: refused, not redirected.
		out, code := b.nsExit(b.ctr, 15*time.Second, "curl", "-s", "-o", "/dev/null", "-m", "10", "http://"+brAddr4+"/latest/meta-data/")
		if code != 7 {
			t.Errorf("container to http://%s/ (the bridge, port 80): curl exit %d (%s), want 7 (connection refused)", brAddr4, code, out)
		}
		if got := b.nsMust(b.ctr2, nil, "curl", "-sS", "-m", "10", "http://169.254.169.254/latest/meta-data/iam/security-credentials/"); got == "" || got == e2e.RoleName {
			t.Errorf("container on the unlisted bridge %s: role listing %q; want the real IMDS's (only intercept.bridges are redirected)", b.other, got)
		}
	})

	t.Run("hop limit 1: a container on the bridge gets tokens", func(t *testing.T) {
		// The daemon answers on the host itself: its reply to a container
		// on the bridge is delivered on the bridge, not forwarded, so it
		// arrives with TTL 1 and the container gets its token. A counter in
		// the container shows the TTL.
		b.nsMust(b.ctr, nil, "nft", "add table ip ttlprobe; "+
			"add chain ip ttlprobe in { type filter hook input priority 0; policy accept; }; "+
			"add rule ip ttlprobe in ip saddr 169.254.169.254 tcp sport 80 ip ttl 1 counter")
		tok := b.nsMust(b.ctr, nil, "curl", "-sS", "-m", "10", "-X", "PUT", "-H", "X-aws-ec2-metadata-token-ttl-seconds: 60", "http://169.254.169.254"+brTokenPath)
		if tok == "" {
			t.Errorf("container on the bridge: empty token with hop_limit 1")
		}
		if n := brCounterPackets(b.nsMust(b.ctr, nil, "nft", "list", "chain", "ip", "ttlprobe", "in")); n == 0 {
			t.Errorf("the container received no packet with TTL 1 from 169.254.169.254:80: the token response was not sent with the hop limit")
		}
		if got := b.nsMust(b.ctr, nil, b.client, "get", "/latest/meta-data/iam/security-credentials/"); got != e2e.RoleName {
			t.Errorf("role listing in the container with hop_limit 1: %q, want %q", got, e2e.RoleName)
		}
		if got := b.nsMust(b.host, nil, b.client, "get", "/latest/meta-data/iam/security-credentials/"); got != e2e.RoleName {
			t.Errorf("role listing on the host with hop_limit 1: %q, want %q", got, e2e.RoleName)
		}
		// Only token responses carry the hop limit: one routed hop further,
		// a GET without a token reaches the daemon and gets its 401
		// (imds.tokens: required).
		if got := b.nsMust(b.pod, nil, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-m", "10", "http://169.254.169.254/latest/meta-data/iam/security-credentials/"); got != "401" {
			t.Errorf("pod, GET without a token: status %s, want the daemon's 401", got)
		}
	})

	t.Run("hop limit 1: a client one routed hop further gets no token", func(t *testing.T) {
		// The token response leaves with TTL 1 and dies in "ctr", which
		// would have to forward it: the PUT times out. A counter in ctr's
		// prerouting shows the TTL-1 segments that arrive there.
		b.nsMust(b.ctr, nil, "nft", "add chain ip ttlprobe pre { type filter hook prerouting priority -300; policy accept; }; "+
			"add rule ip ttlprobe pre ip saddr 169.254.169.254 ip daddr "+brPodAddr4+" tcp sport 80 ip ttl 1 counter")
		out, code := b.nsExit(b.pod, 30*time.Second, "curl", "-s", "-o", "/dev/null", "-w", "%{time_total}", "-m", "4",
			"-X", "PUT", "-H", "X-aws-ec2-metadata-token-ttl-seconds: 60", "http://169.254.169.254"+brTokenPath)
		dropped := brCounterPackets(b.nsMust(b.ctr, nil, "nft", "list", "chain", "ip", "ttlprobe", "pre"))
		t.Logf("token PUT from the pod: curl exit %d after %ss; TTL-1 segments that reached ctr: %d", code, strings.TrimSpace(out), dropped)
		// Every transmission of the response, retransmissions included,
		// must carry TTL 1: the daemon keeps the limit on the connection
		// until its next request (proxy/hoplimit.go). Before that fix a
		// retransmission with the restored TTL delivered the token after
		// about 200 ms.
		if code != 28 || dropped == 0 {
			t.Errorf("pod one hop behind the container, token PUT with hop_limit 1: curl exit %d, %d TTL-1 segments at ctr; want exit 28 (timed out: every response segment dropped at ctr)", code, dropped)
		}
	})

	t.Run("hop limit 1: a request sent blind after the PUT does not release the token", func(t *testing.T) {
		// The pod sends its PUT and, without waiting for the answer, a GET
		// on the same connection. The daemon reads the GET while the token
		// response is still unacknowledged (every copy dropped at ctr); were
		// the normal TTL restored then, a retransmission would carry the
		// token to the pod. Nothing of the token response may arrive.
		const script = `import socket, sys, time
s = socket.create_connection(("169.254.169.254", 80), timeout=5)
s.sendall(b"PUT /latest/api/token HTTP/1.1\r\nHost: 169.254.169.254\r\nX-aws-ec2-metadata-token-ttl-seconds: 60\r\nContent-Length: 0\r\n\r\n")
time.sleep(0.05)
s.sendall(b"GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n")
s.settimeout(0.5)
buf, end = b"", time.time() + 4
while time.time() < end:
    try:
        d = s.recv(65536)
    except socket.timeout:
        continue
    if not d:
        break
    buf += d
sys.stdout.write(buf.decode("latin-1"))
`
		out, code := b.nsExit(b.pod, 30*time.Second, "python3", "-c", script)
		t.Logf("pipelined PUT + GET from the pod: exit %d, %d bytes received", code, len(out))
		if code != 0 {
			t.Fatalf("the pipelined client failed (exit %d): %s", code, out)
		}
		if strings.Contains(strings.ToLower(out), strings.ToLower(headerTokenTTLName)) {
			t.Errorf("the token response reached the pod one routed hop away with hop_limit 1 (pipelined request):\n%s", out)
		}
	})

	t.Run("a flushed prerouting chain is repaired", func(t *testing.T) {
		b.nsMust(b.host, nil, "nft", "flush", "chain", "inet", "imdsproxy", "prerouting")
		waitFor(t, 10*time.Second, "the keeper to reinstall the rules", func() bool {
			_, err := b.nsOutput(b.host, nil, b.bin, "intercept", "status", "--config", b.config)
			return err == nil
		})
		if got := b.nsMust(b.ctr, nil, b.client, "get", "/latest/meta-data/iam/security-credentials/"); got != e2e.RoleName {
			t.Errorf("role listing in the container after the repair: %q, want %q", got, e2e.RoleName)
		}
		if !strings.Contains(d.log.String(), "interception rules were missing or altered; reinstalled") {
			t.Errorf("no repair log line")
		}
	})

	t.Run("hop limit 2", func(t *testing.T) {
		if code := d.stop(); code != 0 {
			t.Errorf("daemon exited %d on SIGTERM", code)
		}
		b.configure(2)
		d = b.startDaemon()
		tok := b.nsMust(b.pod, nil, "curl", "-sS", "-m", "10", "-X", "PUT", "-H", "X-aws-ec2-metadata-token-ttl-seconds: 60", "http://169.254.169.254"+brTokenPath)
		if tok == "" {
			t.Fatalf("pod one hop behind the container: empty token with hop_limit 2")
		}
		if got := b.nsMust(b.pod, nil, b.client, "get", "/latest/meta-data/iam/security-credentials/"); got != e2e.RoleName {
			t.Errorf("role listing in the pod with hop_limit 2: %q, want %q", got, e2e.RoleName)
		}
		b.checkIssued(t, "Go SDK v2 in the pod", b.nsMust(b.pod, b.clientEnv(), b.client, "creds"))
		if got := b.nsMust(b.ctr, nil, b.client, "get", "/latest/meta-data/iam/security-credentials/"); got != e2e.RoleName {
			t.Errorf("role listing in the container with hop_limit 2: %q, want %q", got, e2e.RoleName)
		}
	})

	t.Run("remove leaves no container rule", func(t *testing.T) {
		if code := d.stop(); code != 0 {
			t.Errorf("daemon exited %d on SIGTERM", code)
		}
		b.nsMust(b.host, nil, b.bin, "intercept", "remove", "--config", b.config)
		rs := b.nsMust(b.host, nil, "nft", "list", "ruleset")
		for _, s := range []string{"imdsproxy", "prerouting", b.bridge, "redirect"} {
			if strings.Contains(rs, s) {
				t.Errorf("ruleset after remove still holds %q:\n%s", s, rs)
			}
		}
		// As with Docker and no proxy: forwarded to the real IMDS.
		if got := b.nsMust(b.ctr, nil, "curl", "-sS", "-m", "10", "http://169.254.169.254/latest/meta-data/iam/security-credentials/"); got == "" || got == e2e.RoleName {
			t.Errorf("container after remove: role listing %q; want the real IMDS's", got)
		}
	})
}

// setupContainers creates the bridges and the ctr, pod and ctr2 namespaces,
// the routes back from the imds namespace, and the two extra servers there.
// A cleanup kills what runs in the new namespaces and deletes them and the
// bridges.
func (b *brEnv) setupContainers(aemm string) {
	t := b.t
	base := strings.TrimSuffix(b.host, "-host")
	b.ctr, b.pod, b.ctr2 = base+"-ctr", base+"-pod", base+"-ctr2"
	// interface names: at most 15 bytes, unique per test process and run
	id := fmt.Sprintf("%d-%d", os.Getpid()%100000, icSeq.Load())
	b.bridge, b.other = "icb"+id, "ico"+id
	vc, vp, v2 := "icc"+id, "icp"+id, "icq"+id
	t.Cleanup(func() {
		for _, ns := range []string{b.pod, b.ctr, b.ctr2} {
			if out, err := exec.Command("ip", "netns", "pids", ns).Output(); err == nil {
				for _, p := range strings.Fields(string(out)) {
					var pid int
					if _, err := fmt.Sscan(p, &pid); err == nil && pid > 1 {
						_ = syscall.Kill(pid, syscall.SIGKILL)
					}
				}
			}
			_ = exec.Command("ip", "netns", "del", ns).Run()
		}
		for _, br := range []string{b.bridge, b.other} {
			_ = exec.Command("ip", "-n", b.host, "link", "del", br).Run()
		}
	})
	steps := [][]string{
		{"netns", "add", b.ctr},
		{"netns", "add", b.pod},
		{"netns", "add", b.ctr2},
		// the bridges, in the host namespace
		{"-n", b.host, "link", "add", b.bridge, "type", "bridge"},
		{"-n", b.host, "addr", "add", brAddr4 + "/24", "dev", b.bridge},
		{"-n", b.host, "addr", "add", brAddr6 + "/64", "dev", b.bridge, "nodad"},
		{"-n", b.host, "link", "set", b.bridge, "up"},
		{"-n", b.host, "link", "add", b.other, "type", "bridge"},
		{"-n", b.host, "addr", "add", "172.31.249.1/24", "dev", b.other},
		{"-n", b.host, "link", "set", b.other, "up"},
		// ctr on the listed bridge
		{"link", "add", vc, "netns", b.host, "type", "veth", "peer", "name", "eth0", "netns", b.ctr},
		{"-n", b.host, "link", "set", vc, "master", b.bridge, "up"},
		{"-n", b.ctr, "link", "set", "lo", "up"},
		{"-n", b.ctr, "addr", "add", brCtrAddr4 + "/24", "dev", "eth0"},
		{"-n", b.ctr, "addr", "add", "fd00:b1d::2/64", "dev", "eth0", "nodad"},
		{"-n", b.ctr, "link", "set", "eth0", "up"},
		{"-n", b.ctr, "route", "add", "default", "via", brAddr4},
		{"-n", b.ctr, "-6", "route", "add", "default", "via", brAddr6},
		// pod behind ctr, which routes for it
		{"link", "add", vp, "netns", b.ctr, "type", "veth", "peer", "name", "eth0", "netns", b.pod},
		{"-n", b.ctr, "addr", "add", "10.99.0.1/24", "dev", vp},
		{"-n", b.ctr, "link", "set", vp, "up"},
		{"-n", b.pod, "link", "set", "lo", "up"},
		{"-n", b.pod, "addr", "add", brPodAddr4 + "/24", "dev", "eth0"},
		{"-n", b.pod, "link", "set", "eth0", "up"},
		{"-n", b.pod, "route", "add", "default", "via", "10.99.0.1"},
		{"-n", b.host, "route", "add", "10.99.0.0/24", "via", brCtrAddr4},
		// ctr2 on the bridge that is not listed
		{"link", "add", v2, "netns", b.host, "type", "veth", "peer", "name", "eth0", "netns", b.ctr2},
		{"-n", b.host, "link", "set", v2, "master", b.other, "up"},
		{"-n", b.ctr2, "link", "set", "lo", "up"},
		{"-n", b.ctr2, "addr", "add", "172.31.249.2/24", "dev", "eth0"},
		{"-n", b.ctr2, "link", "set", "eth0", "up"},
		{"-n", b.ctr2, "route", "add", "default", "via", "172.31.249.1"},
		// the way back from the real IMDS (Docker would masquerade instead)
		{"-n", b.imds, "route", "add", "172.31.250.0/24", "via", "169.254.0.2"},
		{"-n", b.imds, "route", "add", "172.31.249.0/24", "via", "169.254.0.2"},
		{"-n", b.imds, "route", "add", "10.99.0.0/24", "via", "169.254.0.2"},
		{"-n", b.imds, "-6", "route", "add", "fd00:b1d::/64", "via", "fd00:ec2:1::2"},
	}
	for _, s := range steps {
		if out, err := exec.Command("ip", s...).CombinedOutput(); err != nil {
			t.Fatalf("ip %s: %v: %s", strings.Join(s, " "), err, out)
		}
	}
	for ns, keys := range map[string][]string{
		b.host: {"net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"},
		b.ctr:  {"net.ipv4.ip_forward=1"},
	} {
		for _, k := range keys {
			b.nsRun(ns, nil, "sysctl", "-qw", k)
		}
	}

	// Other destinations: the real IMDS on another port, and another
	// server on port 80.
	aemmHome := filepath.Join(b.dir, "aemm")
	b.startBackground("aemm 169.254.169.254:8080", b.imds, nil, aemmHome, []string{"HOME=" + aemmHome, "PATH=/usr/bin:/bin"},
		aemm, "-n", "169.254.169.254", "-p", "8080")
	www := filepath.Join(b.dir, "www")
	icMust(t, os.Mkdir(www, 0o755))
	icMust(t, os.WriteFile(filepath.Join(www, "marker"), []byte(brSideBody), 0o644))
	b.startBackground("http.server "+brSideAddr+":80", b.imds, nil, www, []string{"PATH=/usr/bin:/bin"},
		"python3", "-m", "http.server", "80", "--bind", brSideAddr, "--directory", www)
	waitFor(t, 15*time.Second, "the other servers from the container", func() bool {
		a, err1 := b.nsOutput(b.ctr, nil, "curl", "-s", "-m", "1", "http://"+brSideAddr+"/marker")
		c, err2 := b.nsOutput(b.ctr, nil, "curl", "-s", "-m", "1", "http://169.254.169.254:8080/latest/meta-data/instance-id")
		return err1 == nil && a == brSideBody && err2 == nil && c == icInstanceID
	})
	// Before any rule: the containers reach the real IMDS, as on a Docker
	// host without the proxy.
	for _, ns := range []string{b.ctr, b.ctr2, b.pod} {
		if got := b.nsMust(ns, nil, "curl", "-sS", "-m", "10", "http://169.254.169.254/latest/meta-data/iam/security-credentials/"); got == "" || got == e2e.RoleName {
			t.Fatalf("namespace %s without rules: role listing %q; want the real IMDS's", ns, got)
		}
	}
}

// configure rewrites newIcEnv's config: the bridge in intercept.bridges and
// imds.hop_limit = hops.
func (b *brEnv) configure(hops int) {
	t := b.t
	raw, err := os.ReadFile(b.config)
	icMust(t, err)
	cfg := string(raw)
	lines := strings.Split(cfg, "\n")
	var n, m int
	for i, l := range lines {
		if strings.HasPrefix(l, "imds: {") {
			f := strings.Split(strings.TrimSuffix(strings.TrimPrefix(l, "imds: {"), "}"), ", ")
			for j, kv := range f {
				if strings.HasPrefix(kv, "hop_limit: ") {
					f[j] = fmt.Sprintf("hop_limit: %d", hops)
					n++
				}
			}
			lines[i] = "imds: {" + strings.Join(f, ", ") + "}"
		}
		if strings.HasPrefix(l, "intercept: {") && !strings.Contains(l, "bridges:") {
			lines[i] = strings.Replace(l, "intercept: {", "intercept: {bridges: ["+b.bridge+"], ", 1)
			m++
		}
	}
	if n != 1 || (m != 1 && !strings.Contains(cfg, "bridges: ["+b.bridge+"]")) {
		t.Fatalf("newIcEnv's config changed shape (imds.hop_limit found %d times, intercept: %d); update configure:\n%s", n, m, cfg)
	}
	icMust(t, os.WriteFile(b.config, []byte(strings.Join(lines, "\n")), 0o644))
	b.nsMust(b.host, nil, b.bin, "check-config", b.config)
}

// openBridgeSockets creates the daemon's listening sockets inside the host
// namespace, as imdsproxy.socket would with a drop-in for the bridge: the
// loopback ones, the bridge's two addresses, and the admin socket. See
// openSockets for why the thread goes back to its namespace.
func (b *brEnv) openBridgeSockets() {
	socks := []icSocket{
		{"imds", fmt.Sprintf("127.0.0.1:%d", icIMDSPort)},
		{"imds6", fmt.Sprintf("[::1]:%d", icIMDSPort)},
		{"imds-bridge", fmt.Sprintf("%s:%d", brAddr4, icIMDSPort)},
		{"imds-bridge6", fmt.Sprintf("[%s]:%d", brAddr6, icIMDSPort)},
		{"admin", fmt.Sprintf("127.0.0.1:%d", icAdminPort)},
	}
	b.openSocketsAt(socks)
}

// nsExit runs args in namespace ns with the clients' environment and returns
// the combined output and the exit code (-1 if it did not run or exit).
func (b *brEnv) nsExit(ns string, timeout time.Duration, args ...string) (string, int) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", ns}, args...)...)
	cmd.Env, cmd.Dir = b.clientEnv(), b.dir
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	switch {
	case err == nil:
		return string(out), 0
	case errors.As(err, &ee) && ee.Exited():
		return string(out), ee.ExitCode()
	}
	return string(out) + err.Error(), -1
}

// brChainText returns the block of chain name in nft's listing of a table, or
// "" when there is none.
func brChainText(table, name string) string {
	i := strings.Index(table, "chain "+name+" {")
	if i < 0 {
		return ""
	}
	rest := table[i:]
	if j := strings.Index(rest, "\n\t}"); j >= 0 {
		return rest[:j]
	}
	return rest
}

// brCounterPackets sums the "counter packets N" of an nft listing.
func brCounterPackets(listing string) int {
	total := 0
	for _, f := range strings.Split(listing, "counter packets ")[1:] {
		var n int
		if _, err := fmt.Sscan(f, &n); err == nil {
			total += n
		}
	}
	return total
}

// TestContainerEndpointOnBridge: a container on a bridge reaches the
// container credentials endpoint at 169.254.170.23, the address SDKs accept
// beside loopback (docs/deploy.md, "The container credentials endpoint").
// The daemon, in the host namespace with CAP_NET_ADMIN, adds the address
// to lo at start and removes it at stop. In the container, the Go SDK's
// default chain, pointed at the endpoint with the workload's token file,
// gets the credentials STS issued for the workload's role (the client is
// in another network namespace, so the token is its identity); a wrong
// token gets 401.
func TestContainerEndpointOnBridge(t *testing.T) {
	aemm := requireNetnsTest(t, "the container endpoint over a bridge test", "network namespaces and a bridge")
	b := &brEnv{icEnv: newIcEnv(t, aemm, "")}
	b.setupContainers(aemm)
	b.configure(1)
	const (
		ctrRole = "arn:aws:iam::444455556666:role/bridge-app"
		ctrPort = 8171
	)
	tokenDir := filepath.Join(b.dir, "container-tokens")
	raw, err := os.ReadFile(b.config)
	icMust(t, err)
	cfg := string(raw) + fmt.Sprintf(`workloads:
- {uid: %d, role: {arn: %q, name: bridge-app, duration: 1h}}
container: {enabled: true, listen: ["169.254.170.23:%d"], link: lo, token_dir: %q}
`, icUID, ctrRole, ctrPort, tokenDir)
	icMust(t, os.WriteFile(b.config, []byte(cfg), 0o644))
	b.nsMust(b.host, nil, b.bin, "check-config", b.config)
	b.openBridgeSockets()
	d := b.startDaemon()

	if out := b.nsMust(b.host, nil, "ip", "-o", "addr", "show", "dev", "lo"); !strings.Contains(out, "169.254.170.23/32") {
		t.Fatalf("the daemon did not add 169.254.170.23 to lo:\n%s", out)
	}
	tokenFile := filepath.Join(tokenDir, fmt.Sprintf("uid-%d", icUID), "token")
	url := fmt.Sprintf("http://169.254.170.23:%d/v1/credentials", ctrPort)
	env := append(b.clientEnv(), "AWS_EC2_METADATA_DISABLED=true",
		"AWS_CONTAINER_CREDENTIALS_FULL_URI="+url, "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE="+tokenFile)
	out := b.nsMust(b.ctr, env, b.client, "creds")
	var got struct{ AccessKeyId, Source string }
	if err := json.Unmarshal([]byte(out), &got); err != nil || got.AccessKeyId == "" {
		t.Fatalf("the Go SDK in the container printed %q (%v)", out, err)
	}
	if got.Source != "CredentialsEndpointProvider" {
		t.Errorf("the Go SDK in the container used provider %q, want the container provider (CredentialsEndpointProvider)", got.Source)
	}
	if !regexp.MustCompile(`role=` + regexp.QuoteMeta(ctrRole) + ` .* access_key_id=` + regexp.QuoteMeta(got.AccessKeyId) + ` `).MatchString(b.sts.String()) {
		t.Errorf("the Go SDK in the container got %s (source %s), which the fake STS did not issue for %s", got.AccessKeyId, got.Source, ctrRole)
	}
	if code := b.nsMust(b.ctr, nil, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-m", "10",
		"-H", "Authorization: not-the-token", url); code != "401" {
		t.Errorf("a wrong token from the container: HTTP %s, want 401", code)
	}

	if code := d.stop(); code != 0 {
		t.Errorf("daemon exit code %d\n%s", code, d.log.String())
	}
	if out := b.nsMust(b.host, nil, "ip", "-o", "addr", "show", "dev", "lo"); strings.Contains(out, "169.254.170.23") {
		t.Errorf("169.254.170.23 is still on lo after the daemon stopped:\n%s", out)
	}
}
