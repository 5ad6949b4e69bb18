//go:build !rolloutwire

package main

import (
	"context"

	"github.com/imdsproxy/imdsproxy/cache"
	"github.com/imdsproxy/imdsproxy/proxy"
)

// Temporary until the rollout package lands: rollout is off.

type rolloutState struct{}

func (d *daemon) setupRollout(_ context.Context, _ Config, f cache.Fetcher) (cache.Fetcher, error) {
	return f, nil
}

func (d *daemon) credentialSource(context.Context, Config) (proxy.CredentialSource, error) {
	return d.cache, nil
}

func (d *daemon) rolloutTasks() []func(context.Context) error { return nil }

func (d *daemon) startServing(ctx context.Context) bool { return d.prefetch(ctx) }

func (d *daemon) servedKey() string { return *d.roleName.Load() }

func (d *daemon) rolloutStatus() any { return map[string]bool{"enabled": false} }
