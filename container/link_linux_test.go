package container

import (
	"errors"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// netns makes a network namespace of its own for the test (ip netns) and
// returns its name and a file descriptor of it; skipped without root or
// iproute2.
func netns(t *testing.T) (string, int) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("SKIPPED: network namespaces need root")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("SKIPPED: no ip (iproute2)")
	}
	name := "imdsproxy-ct-" + strings.ReplaceAll(t.Name(), "/", "-")
	if len(name) > 40 {
		name = name[:40]
	}
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Skipf("SKIPPED: ip netns add: %v %s", err, out)
	}
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "delete", name).Run() })
	fd, err := unix.Open("/run/netns/"+name, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	return name, fd
}

func ipIn(t *testing.T, ns string, args ...string) string {
	t.Helper()
	out, err := exec.Command("ip", append([]string{"-n", ns}, args...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("ip -n %s %v: %v %s", ns, args, err, out)
	}
	return string(out)
}

func TestAddAddresses(t *testing.T) {
	for _, tc := range []struct {
		link    string
		created bool
	}{
		{"imdsproxy-t0", true}, // a dummy link of its own
		{"lo", false},          // an existing link: only the addresses
	} {
		t.Run(tc.link, func(t *testing.T) {
			ns, fd := netns(t)
			addrs := []netip.Addr{LinkLocalIPv4, LinkLocalIPv6}
			a, err := AddAddresses(tc.link, addrs, fd)
			if tc.created && errors.Is(err, unix.EOPNOTSUPP) {
				t.Skipf("SKIPPED: this kernel has no dummy links: %v", err)
			}
			if err != nil {
				t.Fatal(err)
			}
			out := ipIn(t, ns, "addr", "show", "dev", tc.link)
			for _, want := range []string{"169.254.170.23/32", "fd00:ec2::23/128", "UP"} {
				if !strings.Contains(out, want) {
					t.Errorf("ip addr show dev %s lacks %s:\n%s", tc.link, want, out)
				}
			}
			if strings.Contains(out, "tentative") {
				t.Errorf("the IPv6 address is tentative (duplicate address detection): it cannot be bound at once:\n%s", out)
			}
			// Adding again (a restart after a crash) is fine and adds nothing.
			b, err := AddAddresses(tc.link, addrs, fd)
			if err != nil {
				t.Fatalf("adding again: %v", err)
			}
			if len(b.Added()) != 0 {
				t.Errorf("adding again added %v", b.Added())
			}
			if err := a.Remove(); err != nil {
				t.Fatal(err)
			}
			gone, _ := exec.Command("ip", "-n", ns, "addr", "show", "dev", tc.link).CombinedOutput()
			out = string(gone)
			if strings.Contains(out, "169.254.170.23") || strings.Contains(out, "fd00:ec2::23") {
				t.Errorf("addresses left after Remove:\n%s", out)
			}
			if tc.created && !strings.Contains(out, "does not exist") {
				t.Errorf("the dummy link is left after Remove:\n%s", out)
			}
			if !tc.created && !strings.Contains(out, "LOOPBACK") {
				t.Errorf("lo is gone:\n%s", out)
			}
		})
	}
}

func TestAddAddressesRefusesBadLink(t *testing.T) {
	_, fd := netns(t)
	if _, err := AddAddresses("bad name", []netip.Addr{LinkLocalIPv4}, fd); err == nil {
		t.Error("a link with a space in its name was created")
	}
}
