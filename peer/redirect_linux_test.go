package peer

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"

	"golang.org/x/sys/unix"
)

var nsSeq atomic.Int64

// testNetns creates a network namespace of its own (removed at the end of
// the test) with loopback up and a veth pair whose first end carries the
// routes to
// the IMDS addresses, as eth0 does on EC2. It skips without root,
// iproute2 or nft.
func testNetns(t *testing.T) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("SKIPPED: a network namespace and nftables rules need root")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("SKIPPED: `ip` (iproute2) is not installed")
	}
	if _, err := exec.LookPath("nft"); err != nil {
		t.Skip("SKIPPED: `nft` is not installed")
	}
	name := fmt.Sprintf("imdsproxy-peer-%d-%d", os.Getpid(), nsSeq.Add(1))
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Skipf("SKIPPED: `ip netns add` failed: %v: %s", err, out)
	}
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", name).Run() })
	for _, args := range [][]string{
		{"link", "set", "lo", "up"},
		{"link", "add", "imds0", "type", "veth", "peer", "name", "imds1"},
		{"link", "set", "imds1", "up"},
		{"link", "set", "imds0", "up"},
		{"addr", "add", "10.254.0.1/24", "dev", "imds0"},
		{"-6", "addr", "add", "fd00:ec2::1/64", "dev", "imds0", "nodad"},
		{"route", "add", "169.254.169.254/32", "dev", "imds0"},
	} {
		if out, err := exec.Command("ip", append([]string{"-n", name}, args...)...).CombinedOutput(); err != nil {
			t.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, out)
		}
	}
	return name
}

// inNetns runs f on a thread that has entered the network namespace ns
// (sockets f makes live there), and brings the thread back.
func inNetns(t *testing.T, ns string, f func()) {
	t.Helper()
	nsf, err := os.Open("/run/netns/" + ns)
	if err != nil {
		t.Fatal(err)
	}
	defer nsf.Close()
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		self, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			runtime.UnlockOSThread()
			done <- err
			return
		}
		defer self.Close()
		if err := unix.Setns(int(nsf.Fd()), unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			done <- err
			return
		}
		defer func() {
			// If it cannot go back it stays locked and exits with this
			// goroutine.
			if unix.Setns(int(self.Fd()), unix.CLONE_NEWNET) == nil {
				runtime.UnlockOSThread()
			}
		}()
		f()
		done <- nil
	}()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// TestLookupRedirected: a client connecting to the IMDS address, redirected
// to the listener by an nftables redirect in the output hook (as
// `imdsproxy intercept` installs), is found through conntrack's original
// destination, over IPv4 and IPv6; with eBPF its pid too.
func TestLookupRedirected(t *testing.T) {
	skipIfUnsupported(t)
	for _, tc := range []struct{ name, family, listen, imds string }{
		{"ipv4", "ip", "127.0.0.1:0", "169.254.169.254:80"},
		{"ipv6", "ip6", "[::1]:0", "[fd00:ec2::254]:80"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			bothModes(t, func(t *testing.T, r *Resolver) {
				ns := testNetns(t)
				var ln net.Listener
				inNetns(t, ns, func() { ln, _ = net.Listen("tcp", tc.listen) })
				if ln == nil {
					t.Fatalf("cannot listen on %s in the namespace", tc.listen)
				}
				defer ln.Close()
				port := ln.Addr().(*net.TCPAddr).Port
				rules := fmt.Sprintf("table %s imdsproxy_peer_test { chain out { type nat hook output priority -100; %s daddr %s tcp dport 80 redirect to :%d; }; }",
					tc.family, tc.family, strings.Trim(strings.TrimSuffix(tc.imds, ":80"), "[]"), port)
				if out, err := exec.Command("ip", "netns", "exec", ns, "nft", rules).CombinedOutput(); err != nil {
					t.Skipf("SKIPPED: nftables redirect: %v: %s", err, out)
				}
				var client net.Conn
				var derr error
				inNetns(t, ns, func() { client, derr = net.Dial("tcp", tc.imds) })
				if derr != nil {
					t.Fatal(derr)
				}
				defer client.Close()
				server, err := ln.Accept()
				if err != nil {
					t.Fatal(err)
				}
				defer server.Close()
				if server.RemoteAddr().String() != client.LocalAddr().String() || server.LocalAddr().String() == client.RemoteAddr().String() {
					t.Fatalf("not redirected: client %s -> %s, server %s <- %s", client.LocalAddr(), client.RemoteAddr(), server.LocalAddr(), server.RemoteAddr())
				}
				var info Info
				var lerr error
				inNetns(t, ns, func() {
					// The plain 4-tuple is not the client's socket.
					if _, err := r.Lookup(t.Context(), server.LocalAddr(), server.RemoteAddr()); err != ErrNotFound {
						t.Errorf("Lookup of the redirected tuple: %v, want ErrNotFound", err)
					}
					info, lerr = r.LookupConn(t.Context(), server)
				})
				if lerr != nil {
					t.Fatal(lerr)
				}
				if info.UID != os.Getuid() || info.Cgroup != ownCgroup(t) || info.UnitUnknown {
					t.Errorf("LookupConn = %+v, want uid %d cgroup %s", info, os.Getuid(), ownCgroup(t))
				}
				got := r.Process(t.Context(), info)
				if r.Mode() == ModeEBPF && got.PID != os.Getpid() {
					t.Errorf("Process = %+v, want pid %d", got, os.Getpid())
				}
				if got.PID != 0 && got.PID != os.Getpid() {
					t.Errorf("Process = %+v: another process", got)
				}
			})
		})
	}
}
