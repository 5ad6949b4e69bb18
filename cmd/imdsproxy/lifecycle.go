package main

import (
	"context"
	"errors"
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
// (imds, imds6, …); admin is the admin listener.
const (
	fdNameAdmin      = "admin"
	fdNameIMDSPrefix = "imds"
)

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
