package main

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/imdsproxy/imdsproxy/intercept"
	"github.com/imdsproxy/imdsproxy/proxy"
)

// The socket activation protocol of systemd (sd_listen_fds(3)) and the
// readiness protocol (sd_notify(3)) are implemented here with the standard
// library: they are a few environment variables and one datagram, not worth
// a dependency.

// listenFDsStart is the first file descriptor passed by socket activation.
const listenFDsStart = 3

// File descriptor names (FileDescriptorName= in the .socket units) that
// openListeners understands. Every socket named imds* is an IMDS listener
// (imds, imds6, …); admin is the admin listener.
const (
	fdNameAdmin      = "admin"
	fdNameIMDSPrefix = "imds"
)

// activationFiles returns the sockets passed by socket activation with their
// names ("" when LISTEN_FDNAMES is unset), and unsets the variables so that
// child processes do not see them. It returns nil when there are none.
func activationFiles() ([]*os.File, []string, error) {
	pid, fds, names := os.Getenv("LISTEN_PID"), os.Getenv("LISTEN_FDS"), os.Getenv("LISTEN_FDNAMES")
	if fds == "" {
		return nil, nil, nil
	}
	os.Unsetenv("LISTEN_PID")
	os.Unsetenv("LISTEN_FDS")
	os.Unsetenv("LISTEN_FDNAMES")
	if p, err := strconv.Atoi(pid); err != nil || p != os.Getpid() {
		return nil, nil, nil // meant for another process
	}
	n, err := strconv.Atoi(fds)
	if err != nil || n < 0 || n > 64 {
		return nil, nil, fmt.Errorf("socket activation: LISTEN_FDS=%q is not a small number", fds)
	}
	var nameList []string
	if names != "" {
		nameList = strings.Split(names, ":")
		if len(nameList) != n {
			return nil, nil, fmt.Errorf("socket activation: LISTEN_FDNAMES names %d sockets, LISTEN_FDS=%d", len(nameList), n)
		}
	}
	files := make([]*os.File, n)
	labels := make([]string, n)
	for i := range n {
		fd := listenFDsStart + i
		syscall.CloseOnExec(fd)
		if nameList != nil {
			labels[i] = nameList[i]
		}
		files[i] = os.NewFile(uintptr(fd), "LISTEN_FD_"+strconv.Itoa(fd))
	}
	return files, labels, nil
}

// exposedListenerWarning is logged (and printed by check-config) for an IMDS
// listener on a wildcard address: it hands this host's credentials to anyone
// who can reach the port from any interface, and the Host check does not
// stop a request sent straight to it.
const exposedListenerWarning = "the IMDS listener accepts connections on every interface: anyone who can reach this port from the network gets this host's credentials; " +
	"listen on 127.0.0.1 (and [::1]), and for containers on the bridges' own addresses (docs/deploy.md, Containers on a bridge)"

// wildcardAddr reports whether the host:port addr has an unspecified IP
// (0.0.0.0, ::) or no host at all.
func wildcardAddr(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if host == "" {
		return true
	}
	ip, err := netip.ParseAddr(host)
	return err == nil && ip.IsUnspecified()
}

// imdsListenAddrs are the IMDS listener addresses cfg opens itself (without
// socket activation).
func (c Config) imdsListenAddrs() []string {
	addrs := []string{c.Listen}
	if ic := c.Intercept; ic.Enabled && ic.IPv6 != nil && *ic.IPv6 {
		addrs = append(addrs, ic.ListenIPv6)
	}
	return addrs
}

// openListeners opens the IMDS listener(s) and the admin listener, before
// anything announces readiness.
//
// Sockets passed by systemd socket activation are used as they are: by name
// (imds*, admin) when LISTEN_FDNAMES is set, else the first is the IMDS
// listener, the second the admin listener and any more are IMDS listeners.
// What was not passed is opened from the config: listen, admin_listen, and
// intercept.listen_ipv6 when interception of IPv6 is enabled.
func openListeners(ctx context.Context, cfg Config) (imds []net.Listener, admin net.Listener, err error) {
	defer func() {
		if err != nil {
			for _, ln := range imds {
				ln.Close()
			}
			if admin != nil {
				admin.Close()
			}
			imds, admin = nil, nil
		}
	}()
	files, names, err := activationFiles()
	if err != nil {
		return nil, nil, err
	}
	for i, f := range files {
		ln, lerr := net.FileListener(f)
		f.Close() // FileListener dups it
		if lerr != nil {
			err = fmt.Errorf("socket activation: fd %d (%q): %w", listenFDsStart+i, names[i], lerr)
			continue // close the remaining files too
		}
		switch name := names[i]; {
		case name == fdNameAdmin, name == "" && i == 1:
			if admin != nil {
				ln.Close()
				err = errors.New("socket activation: more than one admin socket")
				continue
			}
			admin = ln
		case strings.HasPrefix(name, fdNameIMDSPrefix), name == "":
			imds = append(imds, ln)
		default:
			ln.Close()
			err = fmt.Errorf("socket activation: unknown socket name %q (want imds, imds6 or admin)", name)
		}
	}
	if err != nil {
		return imds, admin, err
	}
	var lc net.ListenConfig
	if len(imds) == 0 {
		for i, addr := range cfg.imdsListenAddrs() {
			ln, err := lc.Listen(ctx, "tcp", addr)
			if err != nil {
				key := "listen"
				if i > 0 {
					key = "intercept.listen_ipv6"
				}
				return imds, admin, fmt.Errorf("%s: %w", key, err)
			}
			imds = append(imds, ln)
		}
	}
	if admin == nil {
		admin, err = lc.Listen(ctx, "tcp", cfg.AdminListen)
		if err != nil {
			return imds, nil, fmt.Errorf("admin_listen: %w", err)
		}
	}
	return imds, admin, nil
}

// sdNotify sends state to the service manager when NOTIFY_SOCKET is set; it
// is a no-op otherwise.
func sdNotify(state string) error {
	addr := os.Getenv("NOTIFY_SOCKET")
	if addr == "" {
		return nil
	}
	if addr[0] == '@' {
		addr = "\x00" + addr[1:] // abstract namespace
	} else if addr[0] != '/' {
		return fmt.Errorf("NOTIFY_SOCKET=%q is neither a path nor an abstract socket", addr)
	}
	c, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: addr, Net: "unixgram"})
	if err != nil {
		return fmt.Errorf("sd_notify: %w", err)
	}
	defer c.Close()
	if _, err := c.Write([]byte(state)); err != nil {
		return fmt.Errorf("sd_notify: %w", err)
	}
	return nil
}

// notifyReady tells a supervisor that the daemon serves credentials: the
// listeners are open and the first credentials are cached.
func notifyReady(log *zap.Logger) {
	if err := sdNotify("READY=1\nSTATUS=serving credentials"); err != nil {
		log.Warn("cannot notify the service manager", zap.Error(err))
	}
}

// notifyStopping tells a supervisor that the daemon is shutting down.
func notifyStopping(log *zap.Logger) {
	if err := sdNotify("STOPPING=1"); err != nil {
		log.Warn("cannot notify the service manager", zap.Error(err))
	}
}

// backgroundTasks are extra long-running tasks of the daemon; each runs
// until its context ends, and an error stops the daemon. With
// intercept.enabled that is the keeper of the interception rules.
func (d *daemon) backgroundTasks() []func(context.Context) error {
	cfg := d.config()
	if !cfg.Intercept.Enabled {
		return nil
	}
	keeper, err := newInterceptKeeper(cfg, d)
	if err != nil {
		return []func(context.Context) error{func(context.Context) error { return err }}
	}
	return []func(context.Context) error{keeper.Run}
}

func newInterceptKeeper(cfg Config, d *daemon) (*intercept.Keeper, error) {
	rules, err := interceptRules(cfg, true)
	if err != nil {
		return nil, fmt.Errorf("intercept: %w", err)
	}
	return intercept.NewKeeper(rules, cfg.Intercept.CheckInterval.D(), d.log.Named("intercept"), d.interceptMetrics)
}

// newInterceptMetrics registers the interception metrics on reg, whether or
// not interception is enabled (rules_present then stays 0).
func newInterceptMetrics(reg prometheus.Registerer) *intercept.Metrics {
	m, err := intercept.NewMetrics(reg)
	if err != nil {
		panic(err) // like MustRegister: a fresh registry cannot hold them already
	}
	return m
}

// loadTokenKey returns the IMDSv2 token key kept in path, creating the file
// (mode 0600, proxy.TokenKeySize random bytes) when it does not exist. An
// empty path gives nil: a random key per process.
func loadTokenKey(path string) ([]byte, error) {
	if path == "" {
		return nil, nil
	}
	key, err := readTokenKey(path)
	if err == nil || !errors.Is(err, fs.ErrNotExist) {
		return key, err
	}
	key = make([]byte, proxy.TokenKeySize)
	if _, err := rand.Read(key); err != nil {
		return nil, fmt.Errorf("imds.token_key_file: %w", err)
	}
	f, err := os.CreateTemp(filepath.Dir(path), ".token.key-*")
	if err != nil {
		return nil, fmt.Errorf("imds.token_key_file: %w", err)
	}
	tmp := f.Name()
	_, werr := f.Write(key)
	if cerr := f.Close(); werr == nil {
		werr = cerr
	}
	if werr == nil {
		// Link, not rename: if another process created the file meanwhile,
		// both use the first one.
		werr = os.Link(tmp, path)
	}
	os.Remove(tmp)
	if werr != nil && !errors.Is(werr, fs.ErrExist) {
		return nil, fmt.Errorf("imds.token_key_file: %w", werr)
	}
	return readTokenKey(path)
}

func readTokenKey(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("imds.token_key_file: %w", err)
	}
	defer f.Close()
	if st, err := f.Stat(); err == nil && st.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("imds.token_key_file: %s is readable by others (mode %v); it must be 0600", path, st.Mode().Perm())
	}
	key := make([]byte, proxy.TokenKeySize+1)
	n, err := io.ReadFull(f, key)
	if n != proxy.TokenKeySize || !errors.Is(err, io.ErrUnexpectedEOF) {
		return nil, fmt.Errorf("imds.token_key_file: %s must hold exactly %d bytes", path, proxy.TokenKeySize)
	}
	return key[:n], nil
}
