package peer

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"testing"
	"time"
)

// helperEnv makes the test binary act as a client process: it connects to
// the address in the variable, prints "connected" and waits for stdin to
// close.
const helperEnv = "PEER_TEST_HELPER_ADDR"

// modeHelperEnv makes the test binary print the Mode of a new Resolver
// and, on a second line, why BPFRequired fails ("ok" when it does not).
const modeHelperEnv = "PEER_TEST_MODE_HELPER"

func TestMain(m *testing.M) {
	if os.Getenv(modeHelperEnv) != "" {
		r, err := NewResolver(Options{})
		if err != nil {
			os.Stdout.WriteString("error: " + err.Error() + "\n")
			os.Exit(1)
		}
		os.Stdout.WriteString(r.Mode() + "\n")
		r.Close()
		why := "ok"
		if r, err := NewResolver(Options{BPF: BPFRequired}); err != nil {
			why = err.Error()
		} else {
			r.Close()
		}
		os.Stdout.WriteString(why + "\n")
		os.Exit(0)
	}
	if addr := os.Getenv(helperEnv); addr != "" {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			os.Exit(3)
		}
		os.Stdout.WriteString("connected\n")
		_, _ = io.Copy(io.Discard, os.Stdin)
		c.Close()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func skipIfUnsupported(t testing.TB) {
	t.Helper()
	if runtime.GOOS != "linux" {
		t.Skip("sock_diag is Linux-only")
	}
}

// pair returns both ends of a loopback TCP connection on network/addr.
func pair(t testing.TB, network, addr string) (client, server net.Conn) {
	t.Helper()
	ln, err := net.Listen(network, addr)
	if err != nil {
		t.Skipf("cannot listen on %s %s: %v", network, addr, err)
	}
	defer ln.Close()
	client, err = net.Dial(network, ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	server, err = ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close(); server.Close() })
	return client, server
}

func ownExe(t testing.TB) string {
	t.Helper()
	exe, err := os.Readlink("/proc/self/exe")
	if err != nil {
		t.Fatal(err)
	}
	return exe
}

// newTestResolver makes a Resolver with opts (the host's environment
// changed by env, when given) and closes it at the end of the test.
func newTestResolver(t testing.TB, opts Options, env ...func(*resolverEnv)) *Resolver {
	t.Helper()
	e := hostEnv()
	for _, f := range env {
		f(&e)
	}
	r, err := newResolver(opts, e)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return r
}

// bothModes runs f with a Resolver in each mode Process can have here:
// ModeEBPF when this process may load the programs (else that subtest
// skips), and ModeCgroupProcs.
func bothModes(t *testing.T, f func(t *testing.T, r *Resolver)) {
	t.Run("ebpf", func(t *testing.T) { f(t, ebpfResolver(t)) })
	t.Run("cgroup-procs", func(t *testing.T) {
		r := newTestResolver(t, Options{BPF: BPFOff})
		if r.Mode() == ModeNone {
			t.Skip("SKIPPED: no pid lookup on this platform")
		}
		f(t, r)
	})
}

// ebpfResolver returns a Resolver in ModeEBPF, or skips the test saying
// why eBPF cannot be used here.
func ebpfResolver(t testing.TB) *Resolver {
	t.Helper()
	skipIfUnsupported(t)
	r, err := newResolver(Options{BPF: BPFRequired}, hostEnv())
	if err != nil {
		t.Skipf("SKIPPED: eBPF is not permitted or not supported here (run as root on Linux >= 5.9 with a cgroup2 mount): %v", err)
	}
	t.Cleanup(func() { r.Close() })
	return r
}

func TestLookupSelf(t *testing.T) {
	skipIfUnsupported(t)
	for _, tc := range []struct{ name, network, addr string }{
		{"ipv4", "tcp4", "127.0.0.1:0"},
		{"ipv6", "tcp6", "[::1]:0"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			bothModes(t, func(t *testing.T, r *Resolver) {
				_, server := pair(t, tc.network, tc.addr) // after the Resolver: its table sees the socket made
				ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
				defer cancel()
				for _, lookup := range []func() (Info, error){
					func() (Info, error) { return r.Lookup(ctx, server.LocalAddr(), server.RemoteAddr()) },
					func() (Info, error) { return r.LookupConn(ctx, server) },
				} {
					info, err := lookup()
					if err != nil {
						t.Fatal(err)
					}
					if info.UID != os.Getuid() || info.PID != 0 || info.Exe != "" {
						t.Errorf("Lookup = %+v, want uid %d and no pid or exe", info, os.Getuid())
					}
					got := r.Process(ctx, info)
					want := info
					want.PID, want.Exe = os.Getpid(), ownExe(t)
					if got.Cgroup == "/" || got.Cgroup == "" {
						want.Unit = got.Unit // from /proc/<pid>/cgroup
					}
					switch {
					case got == want:
					case r.Mode() == ModeCgroupProcs && got == info:
						// Not among the newest processes of a crowded cgroup.
						t.Logf("ModeCgroupProcs did not find this process in its cgroup (%s)", info.Cgroup)
					default:
						t.Errorf("Process = %+v, want %+v", got, want)
					}
				}
			})
		})
	}
}

// TestLookupNotFound checks that from the client's side the peer is the
// server's socket, that a made-up tuple is not found and that other address
// types are refused.
func TestLookupNotFound(t *testing.T) {
	skipIfUnsupported(t)
	client, server := pair(t, "tcp4", "127.0.0.1:0")
	r := newTestResolver(t, Options{BPF: BPFOff})
	if _, err := r.Lookup(t.Context(), client.LocalAddr(), client.RemoteAddr()); err != nil {
		t.Errorf("reverse lookup: %v", err)
	}
	bogus := &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 1}
	if _, err := r.Lookup(t.Context(), server.LocalAddr(), bogus); !errors.Is(err, ErrNotFound) {
		t.Errorf("bogus tuple: err = %v, want ErrNotFound", err)
	}
	if _, err := r.Lookup(t.Context(), &net.UnixAddr{Name: "x"}, bogus); !errors.Is(err, ErrUnsupported) {
		t.Errorf("unix address: err = %v, want ErrUnsupported", err)
	}
	if _, err := r.Lookup(t.Context(), server.LocalAddr(), &net.TCPAddr{IP: net.IPv6loopback, Port: 1}); !errors.Is(err, ErrUnsupported) {
		t.Errorf("mixed families: err = %v, want ErrUnsupported", err)
	}
	// An Info made by hand has no socket to go by.
	if got := r.Process(t.Context(), Info{UID: 1}); got != (Info{UID: 1}) {
		t.Errorf("Process of a hand-made Info = %+v", got)
	}
}

// startHelper starts the test binary as a client of a new listener and
// returns the process and the server's end of its connection.
func startHelper(t *testing.T) (*exec.Cmd, io.WriteCloser, net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	cmd := exec.Command(ownExe(t), "-test.run=^$")
	cmd.Env = append(os.Environ(), helperEnv+"="+ln.Addr().String())
	isolate(t, cmd)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { stdin.Close(); _ = cmd.Wait() })
	if line, err := bufio.NewReader(stdout).ReadString('\n'); err != nil || line != "connected\n" {
		t.Fatalf("helper: %q, %v", line, err)
	}
	server, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { server.Close() })
	return cmd, stdin, server
}

// TestLookupChild checks pid and exe of another process: the test binary
// re-executed as a client, in a cgroup of its own where the test may make
// one (else the newest process of this test's cgroup).
func TestLookupChild(t *testing.T) {
	skipIfUnsupported(t)
	bothModes(t, func(t *testing.T, r *Resolver) {
		cmd, stdin, server := startHelper(t)
		info, err := r.LookupConn(t.Context(), server)
		if err != nil {
			t.Fatal(err)
		}
		info = r.Process(t.Context(), info)
		if info.UID != os.Getuid() || info.PID != cmd.Process.Pid || info.Exe != ownExe(t) {
			t.Errorf("LookupConn+Process = %+v, want uid %d pid %d exe %s", info, os.Getuid(), cmd.Process.Pid, ownExe(t))
		}

		// After the client exits its socket is gone (or orphaned, without a
		// process): never attributed to a process that does not hold it.
		stdin.Close()
		_ = cmd.Wait()
		time.Sleep(10 * time.Millisecond)
		info, err = r.LookupConn(t.Context(), server)
		if err == nil {
			if info = r.Process(t.Context(), info); info.PID != 0 {
				t.Errorf("after exit: %+v, want no pid", info)
			}
		}
	})
}

func TestUnitFromCgroup(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"0::/system.slice/app.service\n", "app.service"},
		{"0::/system.slice/app.service/worker\n", "app.service"},
		// The outermost unit: names below user@1000.service are the user's.
		{"0::/user.slice/user-1000.slice/user@1000.service/app.slice/run-r1.scope\n", "user@1000.service"},
		{"0::/user.slice/user-1000.slice/user@1000.service/app.slice/backup.service\n", "user@1000.service"},
		{"0::/user.slice/user-1000.slice/session-3.scope\n", "session-3.scope"},
		{"0::/system.slice/docker.service/delegated/x.service\n", "docker.service"},
		{"0::/\n", ""},
		{"12:memory:/x\n1:name=systemd:/system.slice/cron.service\n0::/\n", "cron.service"},
		{"1:name=systemd:/system.slice/cron.service\n0::/system.slice/ssh.service\n", "ssh.service"},
		{"0::/system.slice/.service\n", ""},
		{"garbage", ""},
		{"", ""},
	} {
		if got := unitFromCgroup(tc.in); got != tc.want {
			t.Errorf("unitFromCgroup(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}

func TestUnitOfSelf(t *testing.T) {
	skipIfUnsupported(t)
	_, server := pair(t, "tcp4", "127.0.0.1:0")
	info, err := newTestResolver(t, Options{BPF: BPFOff}).LookupConn(t.Context(), server)
	if err != nil {
		t.Fatal(err)
	}
	cg, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(os.Getpid()), "cgroup"))
	if err != nil {
		t.Skip(err)
	}
	if want := unitFromCgroup(string(cg)); info.Unit != want {
		t.Errorf("Unit = %q, want %q", info.Unit, want)
	}
}

// TestProcCache: an entry is trusted for procCacheTTL from its first read,
// not after, not before it (a clock that went back), and an update keeps
// the time of the first read; a full cache is emptied.
func TestProcCache(t *testing.T) {
	var c procCache
	t0 := time.Unix(1000, 0)
	if _, ok := c.get(7, t0); ok {
		t.Fatal("an empty cache answered")
	}
	c.put(7, procEntry{start: 5, exe: "/usr/bin/aws"}, t0)
	if e, ok := c.get(7, t0.Add(procCacheTTL-time.Millisecond)); !ok || e.start != 5 || e.exe != "/usr/bin/aws" {
		t.Fatalf("within the TTL: %+v %v", e, ok)
	}
	e, _ := c.get(7, t0)
	e.unit, e.unitRead = "app.service", true
	c.put(7, e, t0.Add(procCacheTTL/2))
	if _, ok := c.get(7, t0.Add(procCacheTTL)); ok {
		t.Error("an entry outlived its TTL (an update must not extend it)")
	}
	if _, ok := c.get(7, t0.Add(-time.Second)); ok {
		t.Error("an entry was trusted before it was read")
	}
	for pid := range maxProcCache + 1 {
		c.put(100+pid, procEntry{start: 1}, t0)
	}
	if n := len(c.m); n > maxProcCache {
		t.Errorf("%d entries, want at most %d", n, maxProcCache)
	}
}
