package main

import (
	"context"
	"io"

	"github.com/imdsproxy/imdsproxy/admin"
)

// Exit codes of `imdsproxy status` beyond exitOK (ready), exitUsage and
// exitConfig (an unreadable --config file): admin.StatusCommand's.
const (
	exitStatusNotReady    = admin.ExitNotReady    // the daemon answered: not ready
	exitStatusUnreachable = admin.ExitUnreachable // the admin endpoint did not answer /debug/status
)

// runStatus is `imdsproxy status` (admin.StatusCommand); a --config file is
// read for admin_listen, leniently when the daemon would refuse it.
func runStatus(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	return admin.StatusCommand(ctx, args, stdout, stderr, func(path string) (string, error) {
		if cfg, err := loadConfig(path); err == nil {
			return cfg.AdminListen, nil
		}
		return admin.LenientAdminListen(path, defaultConfig().AdminListen)
	})
}
