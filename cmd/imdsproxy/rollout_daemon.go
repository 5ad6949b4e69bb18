package main

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/imdsproxy/imdsproxy/cache"
	"github.com/imdsproxy/imdsproxy/creds"
	"github.com/imdsproxy/imdsproxy/exchange"
	"github.com/imdsproxy/imdsproxy/proxy"
	"github.com/imdsproxy/imdsproxy/rollout"
)

// ipKeyPrefix marks the cache key of the instance profile's credentials; a
// role name cannot hold '/', so it never collides with the workload key.
const ipKeyPrefix = "instance-profile/"

// rolloutState is the daemon's rollout machinery: which credentials this
// host serves, decided from the policy, the host's group and its bucket.
type rolloutState struct {
	cfg         RolloutConfig
	host        rollout.Host
	bucket      int
	fallback    rollout.Fallback
	workloadKey string
	ipRole      string // the role the real IMDS lists
	ipKey       string
	ipFetcher   *exchange.InstanceProfile
	loader      *rollout.Loader
	selector    *rollout.Selector
	verifier    *exchange.CallerIdentity
	// roles maps client processes to their workload's role (nil: no
	// workloads): the selector's choice of key while the workload kind is
	// served. Replaced on reload.
	roles atomic.Pointer[workloadRoles]

	mu sync.Mutex // serialises apply
}

// offPolicy is served until a policy has been loaded: the zero policy puts
// every host off, so it keeps the instance profile's credentials, as before
// the rollout.
var offPolicy = &rollout.Policy{}

// setupRollout builds the rollout machinery when rollout.policy is set and
// returns the fetcher the cache must use: the workload fetcher, plus the
// instance profile's for keys with ipKeyPrefix.
func (d *daemon) setupRollout(ctx context.Context, cfg Config, workload cache.Fetcher) (cache.Fetcher, error) {
	if !cfg.rolloutEnabled() {
		return workload, nil
	}
	log := d.log.Named("rollout")
	ip, err := exchange.NewInstanceProfile(exchange.InstanceProfileConfig{IMDSBase: cfg.Upstream}, d.log.Named("exchange"))
	if err != nil {
		return nil, err
	}
	sctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	ipRole, err := ip.RoleName(sctx)
	if err != nil {
		return nil, fmt.Errorf("rollout: the instance profile's role could not be read from %s: %w", cfg.Upstream, err)
	}
	host, err := rollout.DetectHost(sctx, cfg.Upstream, cfg.Rollout.GroupTag, cfg.Rollout.Group)
	if err != nil {
		return nil, fmt.Errorf("rollout: %w", err)
	}
	opts := rollout.LoaderOptions{Interval: cfg.Rollout.PollInterval.D()}
	if strings.HasPrefix(cfg.Rollout.Policy, "s3://") {
		if opts.S3, err = rollout.NewS3Getter(ctx, ip.Provider(), cfg.Region); err != nil {
			return nil, fmt.Errorf("rollout: %w", err)
		}
	}
	loader, err := rollout.NewLoader(cfg.Rollout.Policy, opts, log, d.reg)
	if err != nil {
		return nil, fmt.Errorf("rollout: %w", err)
	}
	verifier, err := exchange.NewCallerIdentity(ctx, cfg.Region, 10*time.Second)
	if err != nil {
		return nil, fmt.Errorf("rollout: %w", err)
	}
	r := &rolloutState{
		cfg: cfg.Rollout, host: host, bucket: rollout.Bucket(host.InstanceID),
		fallback: rollout.Fallback(cfg.Rollout.Fallback), workloadKey: cfg.Role.Name,
		ipRole: ipRole, ipKey: ipKeyPrefix + ipRole, ipFetcher: ip, loader: loader, verifier: verifier,
	}
	lctx, lcancel := context.WithTimeout(ctx, 10*time.Second)
	defer lcancel()
	if err := loader.Load(lctx); err != nil {
		log.Warn("rollout policy not loaded at start; serving the instance profile until it is", zap.Error(err))
	}
	log.Info("rollout host", zap.String("instance_id", host.InstanceID), zap.String("id_source", host.IDSource),
		zap.String("group", host.Group), zap.String("group_source", host.GroupSource), zap.Int("bucket", r.bucket))
	if host.IDSource == rollout.IDFromHostname {
		log.Warn("the instance id could not be read; the canary bucket is derived from the host name")
	}
	r.roles.Store(newWorkloadRoles(cfg.Workloads))
	d.rollout = r
	return routeFetcher{workload: workload, instanceProfile: ip}, nil
}

// routeFetcher sends instance-profile keys to the instance profile's
// fetcher and every other key to the workload's.
type routeFetcher struct{ workload, instanceProfile cache.Fetcher }

func (f routeFetcher) Fetch(ctx context.Context, key string) (creds.Credentials, error) {
	if strings.HasPrefix(key, ipKeyPrefix) {
		return f.instanceProfile.Fetch(ctx, key)
	}
	return f.workload.Fetch(ctx, key)
}

// credentialSource is what the IMDS API serves from: the cache, or under a
// rollout the selector in front of it (with the first decision applied, so
// the listed role is right from the first request).
func (d *daemon) credentialSource(_ context.Context, _ Config) (proxy.CredentialSource, error) {
	r := d.rollout
	if r == nil {
		return d.cache, nil
	}
	sel, err := rollout.NewSelector(rollout.SelectorConfig{
		Workload: d.cache, WorkloadKey: r.workloadKey,
		InstanceProfile: d.cache, InstanceProfileKey: r.ipKey,
		WorkloadKeyFor: r.workloadKeyFor,
		Fallback:       r.fallback, Host: r.host,
	}, d.log.Named("rollout"), d.reg)
	if err != nil {
		return nil, fmt.Errorf("rollout: %w", err)
	}
	r.selector = sel
	dec := r.decide()
	sel.Set(dec)
	name := r.servedName(dec)
	d.roleName.Store(&name)
	return sel, nil
}

// workloadKeyFor is the cache key served to the client of ctx while the
// host serves the workload kind: its workload's role, else the host's. It
// goes by the process itself, not by the name the client asked for or the
// listing it was shown, so a client never gets another workload's role or,
// being a workload, the host's, whatever the timing of a switch.
func (r *rolloutState) workloadKeyFor(ctx context.Context) string {
	if w := r.roles.Load(); w != nil {
		if p, ok := proxy.PeerFromContext(ctx); ok {
			if name, ok := w.RoleFor(p); ok {
				return name
			}
		}
	}
	return r.workloadKey
}

// rolloutRoles is the proxy's RoleMapper under a rollout: the workloads'
// mapping while the host serves the workload kind, no mapping while it
// serves the instance profile (every client is then listed the instance
// profile's role, as on EC2). It reads the selector's decision, so the
// listing follows a switch at once; the credentials themselves are chosen
// by the selector (workloadKeyFor).
type rolloutRoles struct {
	roles proxy.RoleMapper
	sel   *rollout.Selector
}

// RoleFor implements proxy.RoleMapper.
func (m rolloutRoles) RoleFor(p proxy.Peer) (string, bool) {
	if m.sel.Decision().Serve != rollout.KindWorkload {
		return "", false
	}
	return m.roles.RoleFor(p)
}

// forget drops key from c, unless the decision in force is no longer dec:
// a newer apply (a reload and a policy change racing) may need it, and its
// own pass decides. It runs under r.mu, as applyRollout's switch does.
func (r *rolloutState) forget(dec rollout.Decision, c *cache.Cache, key string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if cur := r.selector.Decision(); cur.Serve != dec.Serve || cur.Stage != dec.Stage || cur.Shadow != dec.Shadow {
		return false
	}
	return c.Forget(key)
}

// storeRolloutRoles makes list the workloads the rollout's selector maps
// clients by, and returns the previous mapping for restoreRolloutRoles. It
// does nothing without a rollout. A reload calls it before the proxy's
// Update, so that the selector never lags the listing.
func (d *daemon) storeRolloutRoles(list []WorkloadCfg) *workloadRoles {
	if d.rollout == nil {
		return nil
	}
	return d.rollout.roles.Swap(newWorkloadRoles(list))
}

// restoreRolloutRoles puts back the mapping storeRolloutRoles replaced.
func (d *daemon) restoreRolloutRoles(prev *workloadRoles) {
	if d.rollout != nil {
		d.rollout.roles.Store(prev)
	}
}

// rolloutMapper wraps the workloads' RoleMapper for a rollout (nil stays
// nil; without a rollout it is returned as is).
func (d *daemon) rolloutMapper(roles proxy.RoleMapper) proxy.RoleMapper {
	if roles == nil || d.rollout == nil || d.rollout.selector == nil {
		return roles
	}
	return rolloutRoles{roles: roles, sel: d.rollout.selector}
}

func (r *rolloutState) decide() rollout.Decision {
	p, _ := r.loader.Current()
	if p == nil {
		p = offPolicy
	}
	return rollout.Decide(p, r.host.Group, r.bucket)
}

func (r *rolloutState) servedName(d rollout.Decision) string {
	if d.Serve == rollout.KindInstanceProfile {
		return r.ipRole
	}
	return r.workloadKey
}

func (r *rolloutState) servedKey(d rollout.Decision) string {
	if d.Serve == rollout.KindInstanceProfile {
		return r.ipKey
	}
	return r.workloadKey
}

// servedKey is the cache key of the credentials served now.
func (d *daemon) servedKey() string {
	if r := d.rollout; r != nil && r.selector != nil {
		return r.servedKey(r.selector.Decision())
	}
	return *d.roleName.Load()
}

// startServing makes the credentials the host serves available: without a
// rollout the workload role's, with one whatever the decision needs.
func (d *daemon) startServing(ctx context.Context) bool {
	if d.rollout == nil {
		return d.prefetch(ctx)
	}
	return d.applyRollout(ctx)
}

// applyRollout recomputes the decision from the current policy, switches
// what is served (for new requests at once), keeps the credentials the
// decision needs warm and reports whether the served ones are cached. The
// workloads' roles are needed only while the workload kind is served: they
// are fetched in the background when it starts and forgotten when it ends
// (shadow verifies the host's role only).
func (d *daemon) applyRollout(ctx context.Context) bool {
	r := d.rollout
	r.mu.Lock()
	dec := r.decide()
	prev := r.selector.Decision()
	r.selector.Set(dec)
	name := r.servedName(dec)
	if *d.roleName.Load() != name {
		old := d.roleName.Load()
		d.roleName.Store(&name)
		// Under d.mu, like a reload's Update: a config read before a
		// reload must not be applied after it (lock order: r.mu, d.mu).
		d.mu.Lock()
		err := d.proxy.Update(d.proxyConfig(d.cfg))
		d.mu.Unlock()
		if err != nil {
			d.roleName.Store(old)
			d.log.Error("rollout: cannot switch the listed role", zap.String("role_name", name), zap.Error(err))
		}
	}
	r.mu.Unlock()
	if prev.Stage != dec.Stage || prev.Serve != dec.Serve || prev.Percent != dec.Percent {
		d.log.Info("rollout decision", zap.String("stage", string(dec.Stage)), zap.String("serve", string(dec.Serve)),
			zap.Bool("shadow", dec.Shadow), zap.String("reason", dec.Reason), zap.String("policy_version", dec.PolicyVersion))
	}

	needWorkload, needIP := dec.Needs(r.fallback)
	served := r.servedKey(dec)
	warm := func(key string) bool {
		for _, e := range d.cache.Snapshot() {
			if e.Key == key && e.Valid {
				return true
			}
		}
		if err := d.cache.Prefetch(ctx, key); err != nil {
			if ctx.Err() == nil {
				d.log.Warn("rollout: credentials not cached yet; retrying in the background", zap.String("key", key), zap.Error(err))
			}
			return false
		}
		return true
	}
	needs := map[string]bool{r.workloadKey: needWorkload, r.ipKey: needIP}
	for _, w := range d.config().Workloads {
		needs[w.Role.Name] = dec.Serve == rollout.KindWorkload
	}
	for key, need := range needs {
		switch {
		case key == served:
		case need:
			go warm(key)
		case r.forget(dec, d.cache, key):
			// No longer served, verified or kept for a fallback: stop
			// refreshing it (no STS or IMDS calls for nothing).
			d.log.Info("rollout: credentials no longer needed; not refreshed any more", zap.String("key", key))
		}
	}
	return warm(served)
}

// rolloutTasks poll the policy, apply every change and verify workload
// credentials in the shadow stage.
func (d *daemon) rolloutTasks() []func(context.Context) error {
	r := d.rollout
	if r == nil {
		return nil
	}
	changes := r.loader.Subscribe()
	return []func(context.Context) error{
		r.loader.Run,
		func(ctx context.Context) error {
			for {
				select {
				case <-ctx.Done():
					return nil
				case <-changes:
					d.applyRollout(ctx)
				}
			}
		},
		func(ctx context.Context) error {
			return r.selector.RunShadow(ctx, r.verifier, r.cfg.ShadowInterval.D())
		},
	}
}

// reloadRolloutPolicy re-reads the policy (SIGHUP); a change is applied by
// the subscription loop.
func (d *daemon) reloadRolloutPolicy(ctx context.Context) {
	if r := d.rollout; r != nil {
		if err := r.loader.Load(ctx); err != nil {
			d.log.Error("rollout policy refused; keeping the last good one", zap.Error(err))
		}
	}
}

// rolloutStatus is the rollout part of /debug/status.
func (d *daemon) rolloutStatus() any {
	r := d.rollout
	if r == nil || r.selector == nil {
		return map[string]bool{"enabled": false}
	}
	dec := r.selector.Decision()
	n := len(d.config().Workloads)
	_, ls := r.loader.Current()
	sh := r.selector.Shadow()
	return map[string]any{
		"enabled": true, "stage": dec.Stage, "percent": dec.Percent, "group": r.host.Group,
		"group_source": r.host.GroupSource, "bucket": r.bucket, "serve": dec.Serve, "shadow": dec.Shadow,
		"kill_switch": dec.KillSwitch, "reason": dec.Reason, "fallback": r.fallback,
		"workloads": map[string]any{
			"configured": n, "active": n > 0 && dec.Serve == rollout.KindWorkload,
		},
		"policy": map[string]string{
			"source": ls.Source, "version": ls.Version, "last_load": rfc3339(ls.LastLoad),
			"last_success": rfc3339(ls.LastSuccess), "last_error": ls.LastError,
		},
		"shadow_status": map[string]string{
			"last_check": rfc3339(sh.LastCheck), "last_result": sh.LastResult, "last_arn": sh.LastARN, "last_error": sh.LastError,
		},
	}
}

// rolloutRoleNames are the role names a rollout may have listed to some
// client: the host's role, the instance profile's and, with workloads, each
// workload's (the current name included, since a workload client is not
// listed it). Their credential paths serve every client what it is served
// now (the proxy passes the served role, and the selector goes by the
// process), so a client that read the listing just before a switch gets
// credentials, not a 404.
func (d *daemon) rolloutRoleNames(cfg Config) []string {
	r := d.rollout
	if r == nil {
		return nil
	}
	names := []string{r.workloadKey, r.ipRole}
	for _, w := range cfg.Workloads {
		names = append(names, w.Role.Name)
	}
	var out []string
	for _, n := range names {
		if n != "" && !slices.Contains(out, n) {
			out = append(out, n)
		}
	}
	return out
}
