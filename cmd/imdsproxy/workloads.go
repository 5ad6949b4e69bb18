package main

import (
	"context"
	"fmt"
	"time"

	"go.uber.org/zap"

	"github.com/imdsproxy/imdsproxy/cache"
	"github.com/imdsproxy/imdsproxy/creds"
	"github.com/imdsproxy/imdsproxy/peer"
	"github.com/imdsproxy/imdsproxy/proxy"
)

// WorkloadCfg is one entry of the `workloads:` list: the processes of a
// systemd unit, or of a uid, served a role of their own instead of role:.
// docs/configuration.md, "Workloads".
type WorkloadCfg struct {
	// Unit matches the processes of this systemd unit (*.service, *.scope).
	Unit string `yaml:"unit"`
	// UID matches the processes of this uid. Exactly one of Unit and UID.
	UID *int `yaml:"uid"`
	// Role is the workload's role; session_name defaults to the host's
	// session name, duration to 1h.
	Role RoleConfig `yaml:"role"`
}

// maxWorkloads bounds the workloads: list (each is a cache key, a metric
// label value and an upstream exchange per refresh).
const maxWorkloads = 64

// defaultWorkloadDuration is a workload role's duration when not set.
const defaultWorkloadDuration = time.Hour

// validateWorkloads checks the workloads: list and fills the role defaults.
// It runs after role:, rollout: and cache: are valid. Every error names the
// key.
func (c *Config) validateWorkloads() error {
	if len(c.Workloads) == 0 {
		return nil
	}
	if len(c.Workloads) > maxWorkloads {
		return fmt.Errorf("config: workloads: %d entries, at most %d", len(c.Workloads), maxWorkloads)
	}
	switch c.Source {
	case "federation":
		return fmt.Errorf("config: workloads: not supported with source federation (the federation endpoint chooses the role, not imdsproxy)")
	case "instance-profile":
		return fmt.Errorf("config: workloads: not supported with source instance-profile (the instance profile has one role)")
	}
	names := map[string]string{c.Role.Name: "role.name"}
	units := map[string]int{}
	uids := map[int]int{}
	for i := range c.Workloads {
		w := &c.Workloads[i]
		key := fmt.Sprintf("workloads[%d]", i)
		switch {
		case w.Unit != "" && w.UID != nil:
			return fmt.Errorf("config: %s: set only one of unit and uid", key)
		case w.Unit == "" && w.UID == nil:
			return fmt.Errorf("config: %s: set one of unit (a systemd unit such as app.service) or uid", key)
		case w.Unit != "":
			if !isUnitName(w.Unit) {
				return fmt.Errorf("config: %s.unit: %q is not a systemd unit name such as app.service or run-1.scope", key, w.Unit)
			}
			if j, dup := units[w.Unit]; dup {
				return fmt.Errorf("config: %s.unit: %s is already matched by workloads[%d]", key, w.Unit, j)
			}
			units[w.Unit] = i
		default:
			u := *w.UID
			if u < 0 || u > maxUID {
				return fmt.Errorf("config: %s.uid: %d is not a uid (0..%d)", key, u, maxUID)
			}
			if j, dup := uids[u]; dup {
				return fmt.Errorf("config: %s.uid: %d is already matched by workloads[%d]", key, u, j)
			}
			uids[u] = i
		}
		r := &w.Role
		m := roleARNRe.FindStringSubmatch(r.ARN)
		if m == nil {
			return fmt.Errorf("config: %s.role.arn: %q is not an IAM role ARN such as arn:aws:iam::222222222222:role/app", key, r.ARN)
		}
		if r.Name == "" {
			r.Name = m[1]
		}
		if r.Duration == 0 {
			r.Duration = Duration(defaultWorkloadDuration)
		}
		if err := validateRoleFields(key+".role", r); err != nil {
			return err
		}
		if m := c.Cache.ExpiryMargin.D(); m >= r.Duration.D()/2 {
			return fmt.Errorf("config: %s.role.duration: cache.expiry_margin %s must be less than half of it", key, m)
		}
		if other, dup := names[r.Name]; dup {
			return fmt.Errorf("config: %s.role.name: %q is already used by %s (role names are listed under security-credentials/ and key the cache, so they must be unique; set role.name)", key, r.Name, other)
		}
		names[r.Name] = key + ".role.name"
	}
	return nil
}

// workloadRoles maps a client process to its workload's role name: the
// first entry of the workloads: list, in list order, whose unit is the
// process's systemd unit or whose uid is its uid. It is immutable; a reload
// builds a new one.
type workloadRoles struct {
	names  []string       // role name by entry index
	byUnit map[string]int // unit → entry index
	byUID  map[int]int    // uid → entry index
}

// newWorkloadRoles builds the matcher of a validated list, nil when empty.
func newWorkloadRoles(list []WorkloadCfg) *workloadRoles {
	if len(list) == 0 {
		return nil
	}
	w := &workloadRoles{names: make([]string, len(list)), byUnit: map[string]int{}, byUID: map[int]int{}}
	for i, e := range list {
		w.names[i] = e.Role.Name
		if e.UID != nil {
			w.byUID[*e.UID] = i
		} else {
			w.byUnit[e.Unit] = i
		}
	}
	return w
}

// RoleFor implements proxy.RoleMapper: an unidentified client matches
// nothing; a client whose unit is unknown matches by uid only.
func (w *workloadRoles) RoleFor(p proxy.Peer) (string, bool) {
	if !p.Known || p.UnitUnknown && len(w.byUnit) > 0 {
		// Unidentified, or a unit entry might have matched had the unit
		// been known: matching by uid alone could hand it another
		// workload's role. It is served the host's role meanwhile.
		return "", false
	}
	i, ok := w.byUID[p.UID]
	if p.Unit != "" {
		if j, unitOK := w.byUnit[p.Unit]; unitOK && (!ok || j < i) {
			i, ok = j, true
		}
	}
	if !ok {
		return "", false
	}
	return w.names[i], true
}

// proxyAccess is the proxy's AccessControl and RoleMapper for cfg: both nil
// when clients need not be identified (no access lists, audit off, no
// workloads); the RoleMapper nil without workloads.
func proxyAccess(cfg Config, res *peer.Resolver) (*accessPolicy, proxy.RoleMapper) {
	p := newAccessPolicy(cfg.Access, newWorkloadRoles(cfg.Workloads), res)
	switch {
	case p == nil:
		return nil, nil
	case p.roles == nil:
		return p, nil
	}
	return p, p
}

// roleFetcher sends each key (a role name) to the exchange of that role:
// the host's role and every workload's, all built on the one identity
// source. It is immutable; a reload builds a new one.
type roleFetcher map[string]cache.Fetcher

// Fetch implements cache.Fetcher.
func (f roleFetcher) Fetch(ctx context.Context, key string) (creds.Credentials, error) {
	r, ok := f[key]
	if !ok {
		return creds.Credentials{}, fmt.Errorf("no role named %q is configured", key)
	}
	return r.Fetch(ctx, key)
}

// warmWorkloads fetches the credentials of every workload role in the
// background, so that a workload's first request does not wait and the
// cache refreshes them ahead from then on. Failures are logged and retried
// by the cache; they do not affect readiness, which is about the host's
// role (docs/configuration.md, "Workloads").
func (d *daemon) warmWorkloads(ctx context.Context, list []WorkloadCfg) {
	for _, w := range list {
		go func(name string) {
			if err := d.cache.Prefetch(ctx, name); err != nil && ctx.Err() == nil {
				d.log.Warn("initial credential fetch for a workload role failed; retrying in the background",
					zap.String("role_name", name), zap.Error(err))
			}
		}(w.Role.Name)
	}
}

// workloadRolesChanged reports whether a reload changes any workload's role
// (its credentials must then be fetched anew), as opposed to only which
// processes match.
func workloadRolesChanged(prev, next []WorkloadCfg) bool {
	if len(prev) != len(next) {
		return true
	}
	old := make(map[string]RoleConfig, len(prev))
	for _, w := range prev {
		old[w.Role.Name] = w.Role
	}
	for _, w := range next {
		if r, ok := old[w.Role.Name]; !ok || r != w.Role {
			return true
		}
	}
	return false
}
