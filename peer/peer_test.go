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

func TestMain(m *testing.M) {
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

func TestLookupSelf(t *testing.T) {
	skipIfUnsupported(t)
	for _, tc := range []struct{ name, network, addr string }{
		{"ipv4", "tcp4", "127.0.0.1:0"},
		{"ipv6", "tcp6", "[::1]:0"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, server := pair(t, tc.network, tc.addr)
			r := NewResolver(0)
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
				want := Info{UID: os.Getuid(), PID: os.Getpid(), Exe: ownExe(t), Unit: info.Unit, Cgroup: info.Cgroup}
				if info != want {
					t.Errorf("Lookup = %+v, want %+v", info, want)
				}
			}
		})
	}
}

// TestLookupNotFound checks that from the client's side the peer is the
// server's socket, that a made-up tuple is not found and that other address
// types are refused.
func TestLookupNotFound(t *testing.T) {
	skipIfUnsupported(t)
	client, server := pair(t, "tcp4", "127.0.0.1:0")
	r := NewResolver(0)
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
}

// TestLookupChild checks pid and exe of another process: the test binary
// re-executed as a client.
func TestLookupChild(t *testing.T) {
	skipIfUnsupported(t)
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	exe := ownExe(t)
	cmd := exec.Command(exe, "-test.run=^$")
	cmd.Env = append(os.Environ(), helperEnv+"="+ln.Addr().String())
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
	defer func() { stdin.Close(); _ = cmd.Wait() }()
	if line, err := bufio.NewReader(stdout).ReadString('\n'); err != nil || line != "connected\n" {
		t.Fatalf("helper: %q, %v", line, err)
	}
	server, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer server.Close()

	r := NewResolver(time.Minute)
	info, err := r.LookupConn(t.Context(), server)
	if err != nil {
		t.Fatal(err)
	}
	if info.UID != os.Getuid() || info.PID != cmd.Process.Pid || info.Exe != exe {
		t.Errorf("LookupConn = %+v, want uid %d pid %d exe %s", info, os.Getuid(), cmd.Process.Pid, exe)
	}
	// The second lookup is answered from the inode cache.
	if again, err := r.LookupConn(t.Context(), server); err != nil || again != info {
		t.Errorf("cached LookupConn = %+v, %v; want %+v", again, err, info)
	}

	// After the client exits its socket is gone (or orphaned, without a
	// process): never attributed to a process that does not hold it.
	stdin.Close()
	_ = cmd.Wait()
	time.Sleep(10 * time.Millisecond)
	info, err = NewResolver(0).LookupConn(t.Context(), server)
	if err == nil && info.PID != 0 {
		t.Errorf("after exit: %+v, want no pid", info)
	}
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
	info, err := NewResolver(0).LookupConn(t.Context(), server)
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
