package main

import (
	"context"
	"fmt"
	"net"
	"strings"

	"github.com/coreos/go-systemd/v22/activation"
	sddaemon "github.com/coreos/go-systemd/v22/daemon"
	"go.uber.org/zap"
)

// Socket activation (sd_listen_fds(3)) and readiness (sd_notify(3)) come
// from coreos/go-systemd: the protocol details (LISTEN_PID, FD numbering,
// names, abstract notify sockets) are its job, not ours.

// File descriptor names (FileDescriptorName= in the .socket units) that
// openListeners understands. Every socket named imds* is an IMDS listener
// (imds, imds6, …); admin is the admin listener; container the container
// credentials endpoint's (several); credentials the credential_process
// socket.
const (
	fdNameAdmin       = "admin"
	fdNameIMDSPrefix  = "imds"
	fdNameContainer   = "container"
	fdNameCredentials = "credentials"
)

// noKeepAlive is the ListenConfig.KeepAlive of every listener the daemon
// opens: no TCP keep-alive on accepted connections. Go enables it by
// default with four setsockopt calls per accepted connection (of the
// dozen system calls a one-request connection costs), and it is redundant
// here: every connection is closed after idleTimeout without a request,
// and a request in progress is bounded by the read and write timeouts, so
// no connection outlives a vanished peer by more than a minute, sooner
// than keep-alive probes would notice. A listener passed by socket
// activation cannot be configured so (net.FileListener accepts with Go's
// defaults); its connections keep the probes and their cost.
const noKeepAlive = -1

// listeners are the daemon's open sockets.
type listeners struct {
	imds      []net.Listener
	admin     net.Listener
	container []net.Listener // container.enabled
	process   net.Listener   // credential_process.enabled
}

func (ls listeners) close() {
	for _, ln := range append(append(ls.imds, ls.container...), ls.admin, ls.process) {
		if ln != nil {
			ln.Close()
		}
	}
}

// openListeners opens the daemon's listeners before anything announces
// readiness.
//
// Sockets passed by systemd socket activation are used as they are: by name
// (imds*, admin, container, credentials) when LISTEN_FDNAMES is set, else
// the first is the IMDS listener, the second the admin listener and any
// more are IMDS listeners. What was not passed is opened from the config:
// listen, admin_listen, intercept.listen_ipv6 when interception of IPv6 is
// enabled, container.listen and credential_process.socket when enabled. A
// container or credentials socket passed for a section that is not enabled
// is an error.
func openListeners(ctx context.Context, cfg Config) (ls listeners, err error) {
	defer func() {
		if err != nil {
			ls.close()
			ls = listeners{}
		}
	}()
	for i, f := range activation.Files(true) {
		name := f.Name()
		if strings.HasPrefix(name, "LISTEN_FD_") {
			name = "" // unnamed: by position
		}
		ln, lerr := net.FileListener(f)
		f.Close() // FileListener dups it
		if lerr != nil {
			err = fmt.Errorf("socket activation: socket %d (%q): %w", i, name, lerr)
			continue // close the remaining files too
		}
		switch {
		case name == fdNameAdmin && ls.admin == nil, name == "" && i == 1:
			ls.admin = ln
		case name == fdNameContainer && cfg.Container.Enabled:
			ls.container = append(ls.container, ln)
		case name == fdNameCredentials && cfg.CredProcess.Enabled && ls.process == nil:
			ls.process = ln
		case strings.HasPrefix(name, fdNameIMDSPrefix), name == "":
			ls.imds = append(ls.imds, ln)
		default:
			ln.Close()
			err = fmt.Errorf("socket activation: socket %q: a second admin or credentials socket, a socket of a section not enabled, or an unknown name (want imds, imds6, admin, container or credentials)", name)
		}
	}
	if err != nil {
		return ls, err
	}
	lc := net.ListenConfig{KeepAlive: noKeepAlive}
	if len(ls.imds) == 0 {
		for i, addr := range cfg.imdsListenAddrs() {
			ln, err := lc.Listen(ctx, "tcp", addr)
			if err != nil {
				key := "listen"
				if i > 0 {
					key = "intercept.listen_ipv6"
				}
				return ls, fmt.Errorf("%s: %w", key, err)
			}
			ls.imds = append(ls.imds, ln)
		}
	}
	if ls.admin == nil {
		if ls.admin, err = lc.Listen(ctx, "tcp", cfg.AdminListen); err != nil {
			return ls, fmt.Errorf("admin_listen: %w", err)
		}
	}
	for i, addr := range cfg.Container.Listen {
		if !cfg.Container.Enabled || len(ls.container) > i {
			break
		}
		ln, err := lc.Listen(ctx, "tcp", addr)
		if err != nil {
			return ls, fmt.Errorf("container.listen[%d]: %w", i, err)
		}
		ls.container = append(ls.container, ln)
	}
	if cfg.CredProcess.Enabled && ls.process == nil {
		ls.process, err = cfg.CredProcess.Listen()
	}
	return ls, err
}

// notifyReady tells a supervisor that the daemon serves credentials: the
// listeners are open and the first credentials are cached.
func notifyReady(log *zap.Logger) {
	if _, err := sddaemon.SdNotify(false, "READY=1\nSTATUS=serving credentials"); err != nil {
		log.Warn("cannot notify the service manager", zap.Error(err))
	}
}

// notifyStopping tells a supervisor that the daemon is shutting down.
func notifyStopping(log *zap.Logger) {
	if _, err := sddaemon.SdNotify(false, sddaemon.SdNotifyStopping); err != nil {
		log.Warn("cannot notify the service manager", zap.Error(err))
	}
}
