package main

import (
	"context"
	"fmt"
	"net"

	"go.uber.org/zap"
)

// openListeners opens the IMDS listener(s) and the admin listener, before
// anything announces readiness.
func openListeners(ctx context.Context, cfg Config) (imds []net.Listener, admin net.Listener, err error) {
	var lc net.ListenConfig
	ln, err := lc.Listen(ctx, "tcp", cfg.Listen)
	if err != nil {
		return nil, nil, fmt.Errorf("listen: %w", err)
	}
	admin, err = lc.Listen(ctx, "tcp", cfg.AdminListen)
	if err != nil {
		ln.Close()
		return nil, nil, fmt.Errorf("admin_listen: %w", err)
	}
	return []net.Listener{ln}, admin, nil
}

// notifyReady tells a supervisor that the daemon serves credentials: the
// listeners are open and the first credentials are cached.
func notifyReady(*zap.Logger) {}

// notifyStopping tells a supervisor that the daemon is shutting down.
func notifyStopping(*zap.Logger) {}

// backgroundTasks are extra long-running tasks of the daemon; each runs
// until its context ends, and an error stops the daemon.
func (d *daemon) backgroundTasks() []func(context.Context) error { return nil }
