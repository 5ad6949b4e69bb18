package main

import (
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
)

const baseYAML = `role: {arn: "arn:aws:iam::222222222222:role/app"}
identity: {jwt_file: /run/imdsproxy/token.jwt}
`

func TestInterceptConfig(t *testing.T) {
	for _, tc := range []struct {
		name, yaml, errKey string
		check              func(t *testing.T, c Config)
	}{
		{name: "defaults", yaml: "", check: func(t *testing.T, c Config) {
			ic := c.Intercept
			if ic.Enabled || ic.IPv6 == nil || !*ic.IPv6 || ic.ListenIPv6 != "[::1]:8169" || ic.CheckInterval.D() != 30*time.Second || ic.ExemptUID != nil {
				t.Errorf("defaults: %+v", ic)
			}
		}},
		{name: "full", yaml: "listen: 127.0.0.1:9000\nintercept: {enabled: true, ipv6: true, bridges: [docker0], check_interval: 1s, exempt_uid: 998}\nimds: {token_key_file: /run/imdsproxy/token.key}\n",
			check: func(t *testing.T, c Config) {
				rc, err := c.Intercept.Rules(c.Listen, 5)
				if err != nil {
					t.Fatal(err)
				}
				if rc.Port != 9000 || rc.Port6 != 9000 || rc.ExemptUID != 998 || len(rc.Bridges) != 1 {
					t.Errorf("rules config %+v", rc)
				}
				if c.IMDS.TokenKeyFile != "/run/imdsproxy/token.key" {
					t.Errorf("token_key_file %q", c.IMDS.TokenKeyFile)
				}
			}},
		{name: "ipv6 off", yaml: "intercept: {enabled: true, ipv6: false}\n", check: func(t *testing.T, c Config) {
			rc, _ := c.Intercept.Rules(c.Listen, 5)
			if rc.Port6 != 0 || rc.ExemptUID != 5 {
				t.Errorf("rules config %+v", rc)
			}
		}},
		{name: "listen not loopback", yaml: "listen: 10.0.0.1:8169\nintercept: {enabled: true}\n", errKey: "listen"},
		{name: "listen not loopback but disabled", yaml: "listen: 10.0.0.1:8169\nintercept: {enabled: false}\n"},
		{name: "bad listen_ipv6", yaml: "intercept: {listen_ipv6: nope}\n", errKey: "intercept.listen_ipv6"},
		{name: "listen_ipv6 not loopback", yaml: "intercept: {enabled: true, listen_ipv6: \"[fd00::1]:8169\"}\n", errKey: "intercept.listen_ipv6"},
		{name: "bad bridge", yaml: "intercept: {bridges: [\"a b\"]}\n", errKey: "intercept"},
		{name: "bad interval", yaml: "intercept: {check_interval: 1ms}\n", errKey: "intercept.check_interval"},
		{name: "bad uid", yaml: "intercept: {exempt_uid: -1}\n", errKey: "intercept.exempt_uid"},
		{name: "unknown key", yaml: "intercept: {enable: true}\n", errKey: "intercept.enable"},
		{name: "relative token key", yaml: "imds: {token_key_file: token.key}\n", errKey: "imds.token_key_file"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := parseConfig([]byte(baseYAML + tc.yaml))
			if tc.errKey != "" {
				if err == nil || !strings.Contains(err.Error(), tc.errKey) {
					t.Fatalf("error %v, want one naming %s", err, tc.errKey)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if tc.check != nil {
				tc.check(t, c)
			}
		})
	}
}

func TestSDNotify(t *testing.T) {
	dir, err := os.MkdirTemp("", "sdn") // short: unix socket paths are limited
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	sock := filepath.Join(dir, "n")
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	t.Setenv("NOTIFY_SOCKET", sock)
	notifyReady(zap.NewNop())
	notifyStopping(zap.NewNop())
	buf := make([]byte, 256)
	for _, want := range []string{"READY=1", "STOPPING=1"} {
		c.SetReadDeadline(time.Now().Add(2 * time.Second))
		n, err := c.Read(buf)
		if err != nil || !strings.Contains(string(buf[:n]), want) {
			t.Fatalf("got %q, %v; want %s", buf[:n], err, want)
		}
	}
	t.Setenv("NOTIFY_SOCKET", "")
	notifyReady(zap.NewNop()) // without NOTIFY_SOCKET: a no-op, no panic
}

// TestOpenListenersFromConfig: without socket activation the listeners come
// from the config, plus [::1] when intercepting IPv6.
func TestOpenListenersFromConfig(t *testing.T) {
	t.Setenv("LISTEN_FDS", "")
	cfg, err := parseConfig([]byte(baseYAML + "listen: 127.0.0.1:0\nadmin_listen: \"localhost:0\"\nintercept: {listen_ipv6: \"[::1]:0\"}\n"))
	if err != nil {
		t.Fatal(err)
	}
	cfg.Intercept.Enabled = true // port 0 is refused with interception in the file
	ls, err := openListeners(context.Background(), cfg)
	imds, admin := ls.imds, ls.admin
	if err != nil {
		if strings.Contains(err.Error(), "::1") {
			t.Skipf("SKIPPED: no IPv6 loopback here: %v", err)
		}
		t.Fatal(err)
	}
	defer admin.Close()
	if len(imds) != 2 || !strings.HasPrefix(imds[1].Addr().String(), "[::1]:") {
		t.Fatalf("imds listeners %v", imds)
	}
	for _, ln := range imds {
		ln.Close()
	}
}

// TestActivationIgnoresOtherPID: sockets meant for another process are not
// taken (the listeners come from the config), and the variables are cleared.
func TestActivationIgnoresOtherPID(t *testing.T) {
	t.Setenv("LISTEN_PID", "1")
	t.Setenv("LISTEN_FDS", "2")
	t.Setenv("LISTEN_FDNAMES", "imds:admin")
	cfg, err := parseConfig([]byte(baseYAML + "listen: 127.0.0.1:0\nadmin_listen: \"localhost:0\"\n"))
	if err != nil {
		t.Fatal(err)
	}
	ls, err := openListeners(context.Background(), cfg)
	imds, admin := ls.imds, ls.admin
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close()
	for _, ln := range imds {
		ln.Close()
	}
	if len(imds) != 1 || !strings.HasPrefix(imds[0].Addr().String(), "127.0.0.1:") {
		t.Fatalf("imds listeners %v", imds)
	}
	if os.Getenv("LISTEN_FDS") != "" {
		t.Error("LISTEN_FDS not cleared")
	}
}

// TestSystemdUnitsVerify runs `systemd-analyze verify` on the shipped units,
// with ExecStart pointed at a copy of a real executable in a temporary
// directory (verify needs the binaries to exist).
func TestSystemdUnitsVerify(t *testing.T) {
	sa, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Skip("SKIPPED (LOUDLY): systemd-analyze is not installed; the systemd units are NOT verified")
	}
	dir := t.TempDir()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "imdsproxy")
	data, err := os.ReadFile(self)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(bin, data, 0o755); err != nil {
		t.Fatal(err)
	}
	units := []string{"imdsproxy.service", "imdsproxy.socket", "imdsproxy-admin.socket", "imdsproxy-container.socket", "imdsproxy-credentials.socket"}
	var paths []string
	for _, u := range units {
		b, err := os.ReadFile(filepath.Join("..", "..", "systemd", u))
		if err != nil {
			t.Fatal(err)
		}
		s := strings.ReplaceAll(string(b), "/usr/local/bin/imdsproxy", bin)
		p := filepath.Join(dir, u)
		if err := os.WriteFile(p, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
		paths = append(paths, p)
	}
	cmd := exec.Command(sa, append([]string{"verify", "--man=no"}, paths...)...)
	cmd.Env = append(os.Environ(), "SYSTEMD_LOG_LEVEL=notice")
	out, err := cmd.CombinedOutput()
	if err != nil || strings.Contains(string(out), "imdsproxy") {
		t.Fatalf("systemd-analyze verify: %v\n%s", err, out)
	}
	for _, f := range []string{"imdsproxy.sysusers", "imdsproxy.tmpfiles"} {
		if _, err := os.Stat(filepath.Join("..", "..", "systemd", f)); err != nil {
			t.Error(err)
		}
	}
}
