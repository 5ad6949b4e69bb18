package main

import (
	"context"
	"crypto/ed25519"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/url"
	"os"
	"os/signal"
	"reflect"
	"runtime"
	"runtime/debug"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promauto"
	dto "github.com/prometheus/client_model/go"
	"go.uber.org/zap"
	"golang.org/x/sync/errgroup"

	"github.com/imdsproxy/imdsproxy/access"
	"github.com/imdsproxy/imdsproxy/admin"
	"github.com/imdsproxy/imdsproxy/cache"
	"github.com/imdsproxy/imdsproxy/container"
	"github.com/imdsproxy/imdsproxy/credproc"
	"github.com/imdsproxy/imdsproxy/creds"
	"github.com/imdsproxy/imdsproxy/exchange"
	"github.com/imdsproxy/imdsproxy/intercept"
	"github.com/imdsproxy/imdsproxy/logging"
	"github.com/imdsproxy/imdsproxy/metadata"
	"github.com/imdsproxy/imdsproxy/peer"
	"github.com/imdsproxy/imdsproxy/proxy"
	"github.com/imdsproxy/imdsproxy/rollout"
	"github.com/imdsproxy/imdsproxy/token"
)

const defaultConfigPath = "/etc/imdsproxy/config.yaml"

// runServe is `imdsproxy serve`: load the config, build the daemon, run it
// until SIGTERM.
func runServe(ctx context.Context, args []string, _ io.Writer, stderr io.Writer) int {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	fs.SetOutput(stderr)
	path := fs.String("config", defaultConfigPath, "path of the YAML config file")
	format := fs.String("log-format", "json", "log format: json or console")
	level := fs.String("log-level", "info", "log level: debug, info, warn or error")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "Usage: imdsproxy serve --config FILE [--log-format json|console] [--log-level LEVEL]")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return flagExit(err)
	}
	if fs.NArg() != 0 {
		fs.Usage()
		return exitUsage
	}
	logOut := &logging.CountingWriter{W: stderr}
	log, err := newLogger(*format, *level, logOut)
	if err != nil {
		fmt.Fprintf(stderr, "imdsproxy: %v\n", err)
		return exitUsage
	}
	defer func() { _ = log.Sync() }()
	gogc, from := tuneGC(os.Getenv)
	log.Info("garbage collector", zap.String("gogc", gogc), zap.String("from", from))

	cfg, err := loadConfig(*path)
	if err != nil {
		log.Error("invalid configuration", zap.Error(err))
		return exitConfig
	}
	d, err := newDaemon(ctx, *path, cfg, log, logOut.Failures)
	if err != nil {
		log.Error("cannot start", zap.Error(err))
		return exitError
	}
	if err := d.run(ctx); err != nil {
		log.Error("stopped with an error", zap.Error(err))
		return exitError
	}
	log.Info("stopped")
	return exitOK
}

// defaultGCPercent is the daemon's GOGC unless the environment sets one.
// The runtime's default, 100, collects whenever the heap reaches 4 MB: with
// a live heap of about 1 MB, under a client's burst (50 connections asking
// at once) a cycle every 25 ms, each marking for about 2 ms on a busy CPU,
// which is the daemon's p99. 200 halves the cycles for about 4 MB more
// resident memory (26 MB peak against 22 MB at saturation in make bench,
// p99 1.33× the bare net/http ceiling's against 1.55×, the best peer
// 1.42×; docs/benchmarks.md). GOGC or GOMEMLIMIT in the unit's
// environment override it (docs/deploy.md, "Memory").
const defaultGCPercent = 200

// tuneGC sets GOGC to defaultGCPercent unless getenv has GOGC, and returns
// the setting in force and where it comes from ("default" or
// "environment"), for the log.
func tuneGC(getenv func(string) string) (gogc, from string) {
	if v := getenv("GOGC"); v != "" {
		return v, "environment"
	}
	debug.SetGCPercent(defaultGCPercent)
	return strconv.Itoa(defaultGCPercent), "default"
}

// newLogger builds the daemon's logger writing to w.
var newLogger = logging.New

// daemon is the running imdsproxy: the components that live as long as the
// process, and the snapshot in force. Every request loads the snapshot's
// plan once (through the proxy); a reload or a rollout change builds a new
// snapshot whole and publishes it (publish), under mu.
type daemon struct {
	path       string
	log        *zap.Logger
	reg        *prometheus.Registry
	md         *metadata.Client
	instanceID string // read once at start; "" when unknown
	cache      *cache.Cache[creds.Key]
	broker     *access.Broker
	rollout    *rollout.Controller
	proxy      *proxy.Server
	peers      *peer.Resolver
	container  *container.Server // nil: container.enabled false
	tokens     *container.Tokens
	process    *credproc.Server // nil: credential_process.enabled false

	mu   sync.Mutex // serialises reload and publish
	snap atomic.Pointer[snapshot]
	trim *time.Timer // the next Keep after a grace period ends; guarded by mu

	reload           *admin.Reloads
	interceptMetrics *intercept.Metrics
}

// snapshot is one published state: a configuration generation, the rollout
// decision it was combined with, and the access plan built from both.
type snapshot struct {
	gen      *generation
	decision rollout.Decision
	rollout  bool // a rollout policy decides
	plan     *access.Plan
}

// newDaemon builds the daemon for cfg and publishes its first snapshot.
// logErrors counts failed log writes (nil: none are counted).
func newDaemon(ctx context.Context, path string, cfg Config, log *zap.Logger, logErrors func() int64) (_ *daemon, err error) {
	d := &daemon{path: path, log: log, reg: prometheus.NewRegistry()}
	if err := d.registerMetrics(logErrors); err != nil {
		return nil, err
	}
	if d.peers, err = peer.NewResolver(peer.Options{Log: log.Named("peer")}); err != nil {
		return nil, err
	}
	registerCgroupMetrics(d.reg, d.peers.CgroupStats)
	defer func() {
		if err != nil {
			d.close()
		}
	}()
	if d.md, err = metadata.New(cfg.Upstream, 2*time.Second); err != nil {
		return nil, err
	}
	d.instanceID = readInstanceID(ctx, d.md, log)
	c := cfg.Cache.Tuning()
	c.Size = cacheSize
	if d.cache, err = cache.New(cache.FetcherFunc[creds.Key](fetchKey), c, log.Named("cache"), d.reg); err != nil {
		return nil, err
	}
	if d.broker, err = access.NewBroker(d.cache, log.Named("access"), log.Named("audit"), d.reg); err != nil {
		return nil, err
	}
	if d.rollout, err = rollout.NewController(d.md, d.instanceID, log.Named("rollout"), d.reg); err != nil {
		return nil, err
	}
	g, err := d.build(ctx, cfg, nil)
	if err != nil {
		return nil, err
	}
	if _, _, err := d.rollout.Configure(ctx, g.rolloutSettings()); err != nil {
		return nil, err
	}
	key, err := proxy.LoadTokenKey(cfg.IMDS.TokenKeyFile)
	if err != nil {
		return nil, err
	}
	plan, dec, on, err := d.plan(g, nil)
	if err != nil {
		return nil, err
	}
	pc := g.proxyConfig(plan)
	pc.TokenKey = key
	if d.proxy, err = proxy.New(pc, d.broker, d.peers, log.Named("proxy"), d.reg); err != nil {
		return nil, err
	}
	if err := d.newDoors(g, plan); err != nil {
		return nil, err
	}
	d.mu.Lock()
	d.publishLocked(&snapshot{gen: g, decision: dec, rollout: on, plan: plan})
	d.mu.Unlock()
	if err := admin.RegisterReady(d.reg, d); err != nil { // reads the snapshot: after the first publish
		return nil, err
	}
	select {
	case <-d.rollout.Changed(): // the first decision, published above
	default:
	}
	d.reload.Record(nil, nil)
	return d, nil
}

// newDoors builds the container endpoint (its tokens written for g's
// workloads) and the credential_process socket's server when enabled.
func (d *daemon) newDoors(g *generation, plan *access.Plan) (err error) {
	if c := g.cfg.Container; c.Enabled {
		if d.tokens, err = container.NewTokens(c.TokenDir, c.RotateInterval.D(), c.RotateOverlap.D(), d.log.Named("container")); err != nil {
			return err
		}
		if d.container, err = container.New(container.Config{Plan: plan, Path: c.Path}, d.tokens, d.broker, d.peers, d.log.Named("container"), d.reg); err != nil {
			return err
		}
	}
	if g.cfg.CredProcess.Enabled {
		if d.process, err = credproc.New(plan, d.broker, d.log.Named("process"), d.reg); err != nil {
			return err
		}
		d.process.MapUsers(d.peers.Users())
	}
	return d.updateDoors(g, plan)
}

// updateDoors hands plan, and g's settings, to every front door; the
// container tokens follow g's workloads (a workload removed loses its
// token at once).
func (d *daemon) updateDoors(g *generation, plan *access.Plan) error {
	if err := d.proxy.Update(g.proxyConfig(plan)); err != nil {
		return err
	}
	if c := g.cfg.Container; d.container != nil {
		if err := d.container.Update(container.Config{Plan: plan, Path: c.Path}); err != nil {
			return err
		}
		d.tokens.SetSchedule(c.RotateInterval.D(), c.RotateOverlap.D())
		if err := d.tokens.Sync(c.Owners(g.cfg.Workloads)); err != nil {
			d.log.Error("cannot write every workload's token file", zap.Error(err))
		}
	}
	if d.process != nil {
		return d.process.Update(plan)
	}
	return nil
}

// fetchKey fetches a key through the source it names: the decision that
// chose the key chose the source.
func fetchKey(ctx context.Context, k creds.Key) (creds.Credentials, error) { return k.Fetch(ctx) }

// cacheSize bounds the keys cached: each role of a generation, for each
// kind, and the generations retained for a switch's grace period.
const cacheSize = 4 * (access.MaxWorkloads + 2)

// readInstanceID reads the instance id once (the session name and the
// rollout bucket derive from it); "" when the real IMDS does not answer.
func readInstanceID(ctx context.Context, md *metadata.Client, log *zap.Logger) string {
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	id, err := md.InstanceID(ctx)
	if err != nil {
		log.Info("no instance id from the instance metadata service; the host name stands in for it", zap.Error(err))
		return ""
	}
	return id
}

// run opens the listeners, then runs every task until ctx ends or one fails.
func (d *daemon) run(ctx context.Context) error {
	g := d.snap.Load().gen
	cfg := g.cfg
	if c := cfg.Container; c.Enabled && c.Link != "" && len(c.LinkLocal()) > 0 {
		added, err := container.AddAddresses(c.Link, c.LinkLocal(), -1)
		if err != nil {
			return err
		}
		defer func() {
			if err := added.Remove(); err != nil {
				d.log.Warn("cannot remove the container endpoint's addresses", zap.Error(err))
			}
		}()
	}
	ls, err := openListeners(ctx, cfg)
	if err != nil {
		return err
	}
	imdsLns, adminLn := ls.imds, ls.admin
	addrs := make([]string, 0, len(imdsLns))
	for _, ln := range imdsLns {
		addrs = append(addrs, ln.Addr().String())
		if proxy.Exposed(ln.Addr().String()) {
			d.log.Warn(proxy.ExposedWarning, zap.String("listen", ln.Addr().String()))
		}
	}
	if admin.Exposed(adminLn.Addr().String()) {
		d.log.Warn(admin.ExposedWarning, zap.String("admin_listen", adminLn.Addr().String()))
	}
	d.log.Info("listening",
		zap.Strings("listen", addrs),
		zap.String("admin_listen", adminLn.Addr().String()),
		zap.Int("container_listeners", len(ls.container)), zap.Bool("credential_process", ls.process != nil),
		zap.String("role", cfg.Role.ARN), zap.String("role_name", cfg.Role.Name),
		zap.String("source", cfg.Source), zap.String("session_name", g.session),
		zap.Int("workloads", len(cfg.Workloads)),
		zap.String("version", buildVersion()))

	tasks := []func(context.Context) error{
		d.cache.Run,
		d.broker.Run,
		d.rollout.Run,
		d.followRollout,
		d.reloadOnHUP,
		d.verifyShadow,
		func(ctx context.Context) error {
			return admin.Serve(ctx, adminLn, admin.Handler(d.gatherer(), d), access.ConnOwner(d.peers), d.log.Named("admin"))
		},
		func(ctx context.Context) error {
			if d.warm(ctx) {
				d.log.Info("credentials cached; ready", zap.Stringer("key", d.snap.Load().servedKey()))
				notifyReady(d.log)
			}
			return nil
		},
	}
	for _, ln := range imdsLns {
		tasks = append(tasks, func(ctx context.Context) error { return d.proxy.Serve(ctx, ln) })
	}
	for _, ln := range ls.container {
		tasks = append(tasks, func(ctx context.Context) error { return d.container.Serve(ctx, ln) })
	}
	if d.tokens != nil {
		tasks = append(tasks, d.tokens.Run)
	}
	if ls.process != nil {
		tasks = append(tasks, func(ctx context.Context) error { return d.process.Serve(ctx, ls.process) })
	}
	if cfg.Intercept.Enabled {
		rules, err := cfg.Intercept.NewRules(cfg.Listen, true)
		if err != nil {
			return fmt.Errorf("intercept: %w", err)
		}
		keeper, err := intercept.NewKeeper(rules, cfg.Intercept.CheckInterval.D(), d.log.Named("intercept"), d.interceptMetrics)
		if err != nil {
			return fmt.Errorf("intercept: %w", err)
		}
		tasks = append(tasks, keeper.Run)
	}
	grp, gctx := errgroup.WithContext(ctx)
	for _, task := range tasks {
		grp.Go(func() error { return task(gctx) })
	}
	err = grp.Wait()
	notifyStopping(d.log)
	d.close()
	return err
}

// close releases what newDaemon holds beyond memory: the identification's
// cgroup watcher and eBPF programs. Call it once nothing serves.
func (d *daemon) close() {
	if err := d.peers.Close(); err != nil {
		d.log.Warn("closing the client identification", zap.Error(err))
	}
}

// followRollout publishes a new snapshot whenever the rollout decision
// changes (a new policy, a reload).
func (d *daemon) followRollout(ctx context.Context) error {
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-d.rollout.Changed():
			d.mu.Lock()
			if err := d.republishLocked(); err != nil {
				d.log.Error("cannot apply the rollout decision; the previous one stays in force", zap.Error(err))
			}
			d.mu.Unlock()
			go d.warm(ctx)
		}
	}
}

// verifyShadow verifies the workload credentials while the rollout is in
// the shadow stage.
func (d *daemon) verifyShadow(ctx context.Context) error {
	return d.rollout.RunShadow(ctx, shadowVerifier{d}, d.cache)
}

// shadowVerifier verifies with the current generation's verifier.
type shadowVerifier struct{ d *daemon }

func (v shadowVerifier) Verify(ctx context.Context, c creds.Credentials) (string, error) {
	ver := v.d.snap.Load().gen.src.Verifier
	if ver == nil {
		return "", errors.New("no sts:GetCallerIdentity client (no region?)")
	}
	return ver.Verify(ctx, c)
}

// reloadOnHUP reloads the config on every SIGHUP, and rotates the container
// tokens on every SIGUSR1, until ctx ends.
func (d *daemon) reloadOnHUP(ctx context.Context) error {
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP, syscall.SIGUSR1)
	defer signal.Stop(hup)
	for {
		select {
		case <-ctx.Done():
			return nil
		case sig := <-hup:
			if sig == syscall.SIGHUP {
				d.reloadConfig(ctx)
			} else if d.tokens != nil && d.tokens.Rotate() == nil {
				d.log.Info("container tokens rotated (SIGUSR1); the replaced ones are accepted for container.rotate_overlap")
			}
		}
	}
}

// reloadConfig applies the config file anew. Nothing changes unless the
// whole new config is valid and its generation can be built; a setting that
// takes effect only at a restart refuses the whole reload, and says so.
func (d *daemon) reloadConfig(ctx context.Context) {
	restart, err := d.tryReload(ctx)
	d.reload.Record(err, restart)
	if err != nil {
		d.log.Error("reload refused; keeping the running configuration", zap.String("config", d.path),
			zap.Strings("restart_needed", restart), zap.Error(err))
		return
	}
	d.log.Info("configuration reloaded", zap.String("config", d.path), zap.Uint32("generation", d.snap.Load().plan.Gen()))
	go d.warm(ctx)
}

func (d *daemon) tryReload(ctx context.Context) ([]string, error) {
	cfg, err := loadConfig(d.path)
	if err != nil {
		return nil, err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	cur := d.snap.Load().gen
	if keys := cur.cfg.restartOnly(cfg); len(keys) > 0 {
		return keys, fmt.Errorf("%v changed: these take effect only at a restart (systemctl restart imdsproxy); nothing else was applied", keys)
	}
	g, err := d.build(ctx, cfg, cur)
	if err != nil {
		return nil, err
	}
	if _, _, err := d.rollout.Configure(ctx, g.rolloutSettings()); err != nil {
		return nil, err
	}
	if err := d.cache.Tune(cfg.Cache.Tuning()); err != nil {
		return nil, err
	}
	plan, dec, on, err := d.plan(g, d.snap.Load().plan)
	if err != nil {
		return nil, err
	}
	if err := d.updateDoors(g, plan); err != nil {
		return nil, err
	}
	d.publishLocked(&snapshot{gen: g, decision: dec, rollout: on, plan: plan})
	return nil, nil
}

// republishLocked builds a new plan of the current generation (the rollout
// decision changed, or a grace period ended) and publishes it. d.mu must be
// held.
func (d *daemon) republishLocked() error {
	cur := d.snap.Load()
	plan, dec, on, err := d.plan(cur.gen, cur.plan)
	if err != nil {
		return err
	}
	if err := d.updateDoors(cur.gen, plan); err != nil {
		return err
	}
	d.publishLocked(&snapshot{gen: cur.gen, decision: dec, rollout: on, plan: plan})
	return nil
}

// plan builds the access plan of g under the rollout decision in force,
// replacing prev.
func (d *daemon) plan(g *generation, prev *access.Plan) (*access.Plan, rollout.Decision, bool, error) {
	dec, on := d.rollout.Decision()
	pc := access.PlanConfig{
		Access:          g.cfg.Access,
		Workloads:       g.cfg.Workloads,
		WorkloadKeys:    g.workloadKeys,
		Host:            g.hostKey,
		InstanceProfile: g.profileKey,
		Serve:           creds.KindWorkload,
		// The daemon proves the host's identity with the signed document
		// when it reads its token from an issuer (identity.jwt_url).
		Passthrough: g.cfg.IMDS.Passthrough.Resolve(g.cfg.Identity.JWTURL != "",
			g.cfg.Access.Restricted() || len(g.cfg.Workloads) > 0),
	}
	switch {
	case g.cfg.Source == exchange.SourceNameInstanceProfile:
		pc.Serve = creds.KindInstanceProfile
	case on:
		pc.Serve = dec.Serve
		pc.Fallback = g.cfg.Rollout.Fallback == string(rollout.FallbackInstanceProfile)
	}
	plan, err := access.NewPlan(pc, prev, time.Now())
	return plan, dec, on, err
}

// publishLocked makes s the snapshot in force (the proxy has its plan
// already), declares the keys it needs to the cache (every other key is
// dropped: nothing is refreshed for nothing) and arms the next trim for
// when its oldest retained plan stops being answered. d.mu must be held.
func (d *daemon) publishLocked(s *snapshot) {
	prev := d.snap.Swap(s)
	now := time.Now()
	if dropped := d.cache.Keep(s.keys(now)); len(dropped) > 0 {
		d.log.Info("credentials no longer needed; not refreshed any more", zap.Strings("keys", dropped))
	}
	if prev == nil || prev.plan.Serving() != s.plan.Serving() || prev.gen != s.gen {
		d.log.Info("serving", zap.Uint32("generation", s.plan.Gen()), zap.String("kind", string(s.plan.Serving())),
			zap.Stringer("key", s.servedKey()), zap.Int("workloads", len(s.gen.workloadKeys)))
	}
	if d.trim != nil {
		d.trim.Stop()
	}
	if end := s.plan.GraceEnds(); !end.IsZero() {
		d.trim = time.AfterFunc(time.Until(end)+time.Second, func() {
			d.mu.Lock()
			defer d.mu.Unlock()
			cur := d.snap.Load()
			d.cache.Keep(cur.keys(time.Now()))
		})
	}
}

// keys are the keys s needs kept fresh at now: what its plan (and the plans
// it retains) may serve, plus what the rollout keeps warm so a switch does
// not wait: the instance profile's in canary, shadow or with the fallback,
// the host's workload role in shadow (it is verified).
func (s *snapshot) keys(now time.Time) []creds.Key {
	keys := s.plan.Keys(now)
	if s.rollout {
		fb, _ := rollout.ParseFallback(s.gen.cfg.Rollout.Fallback)
		workload, profile := s.decision.Needs(fb)
		if workload && !slices.Contains(keys, s.gen.hostKey) {
			keys = append(keys, s.gen.hostKey)
		}
		if profile && !s.gen.profileKey.IsZero() && !slices.Contains(keys, s.gen.profileKey) {
			keys = append(keys, s.gen.profileKey)
		}
	}
	return keys
}

// servedKey is the key served to a client no workload matches.
func (s *snapshot) servedKey() creds.Key {
	if s.plan.Serving() == creds.KindInstanceProfile {
		return s.gen.profileKey
	}
	return s.gen.hostKey
}

// warm fetches what the snapshot in force needs: the served key at once
// (readiness waits for it), every other needed key in the background so that
// no client's first request waits and the cache refreshes them ahead from
// then on. Failures are logged and retried by the cache. It reports whether
// the served credentials are cached.
func (d *daemon) warm(ctx context.Context) bool {
	s := d.snap.Load()
	served := s.servedKey()
	for _, k := range s.keys(time.Now()) {
		if k == served {
			continue
		}
		if e, ok := d.cache.Lookup(k); ok && e.Valid {
			continue
		}
		go func() {
			if err := d.cache.Prefetch(ctx, k); err != nil && ctx.Err() == nil {
				d.log.Warn("credential fetch failed; retrying in the background", zap.Stringer("key", k), zap.Error(err))
			}
		}()
	}
	if e, ok := d.cache.Lookup(served); ok && e.Valid {
		return true
	}
	if err := d.cache.Prefetch(ctx, served); err != nil {
		if ctx.Err() == nil {
			d.log.Warn("credential fetch failed; retrying in the background", zap.Stringer("key", served), zap.Error(err))
		}
		return false
	}
	return true
}

// generation is everything built from one config file: the exchanges (kept
// across reloads that do not change them, so their cache keys stay the
// same) and the keys of every role the config names.
type generation struct {
	cfg          Config
	src          *sources
	session      string    // the resolved STS session name
	hostKey      creds.Key // role: (the instance profile's for source instance-profile)
	workloadKeys []creds.Key
	profileKey   creds.Key // the instance profile's role; zero when not served
	policyKeys   []ed25519.PublicKey
}

// sources are the exchanges of a config, built from its sourceSpec, and the
// registry of their identity sources' metrics.
type sources struct {
	*exchange.Sources
	spec sourceSpec
	reg  *prometheus.Registry
}

// sourceSpec is every setting the sources depend on; equal specs build
// equal sources.
type sourceSpec struct {
	exchange.SourcesSpec
	Identity token.Section
}

func specOf(cfg Config) sourceSpec {
	s := sourceSpec{Identity: cfg.Identity, SourcesSpec: exchange.SourcesSpec{
		SourceSpec: exchange.SourceSpec{Source: cfg.Source, Region: cfg.Region},
		Upstream:   cfg.Upstream, S3: cfg.Rollout.S3(), Verify: cfg.Rollout.Enabled(),
	}}
	switch cfg.Source {
	case exchange.SourceNameFederation:
		s.Federation = cfg.Federation
	case exchange.SourceNameRolesAnywhere:
		s.RolesAnywhere = cfg.RolesAnywhere
	case exchange.SourceNameAssumeRole:
		s.AssumeRole = cfg.AssumeRole
	case exchange.SourceNameInstanceProfile:
		s.ProfileRole = cfg.Role.Name
	}
	s.NeedProfile = cfg.Rollout.Enabled() || cfg.Source == exchange.SourceNameInstanceProfile ||
		(cfg.Source == exchange.SourceNameAssumeRole && cfg.AssumeRole.Base != "sdk-chain")
	return s
}

// build builds the generation of cfg, reusing prev's sources when cfg does
// not change them.
func (d *daemon) build(ctx context.Context, cfg Config, prev *generation) (*generation, error) {
	if cfg.iamAttestedSubjectsWithRollout() { // at start and on every reload, as check-config
		d.log.Warn(iamAttestationWarning)
	}
	spec := specOf(cfg)
	var src *sources
	if prev != nil && reflect.DeepEqual(prev.src.spec, spec) {
		src = prev.src
		// A reload is how an operator says "try again" after raising a
		// role's MaxSessionDuration (docs/configuration.md, role.duration).
		src.ForgetDurationCaps()
	} else {
		var err error
		if src, err = d.newSources(ctx, spec); err != nil {
			return nil, err
		}
	}
	g := &generation{cfg: cfg, src: src, session: exchange.SessionName(cfg.Role.SessionName, d.instanceID)}
	var err error
	if g.policyKeys, err = cfg.Rollout.Keys(); err != nil {
		return nil, err
	}
	// Roles Anywhere sends a session name only when one is configured (the
	// profile must accept it): the host's role.session_name, which is also
	// the default of a workload's, never the instance id or host name.
	session := g.session
	if cfg.Source == exchange.SourceNameRolesAnywhere {
		session = cfg.Role.SessionName
	}
	if src.Profile != nil {
		g.profileKey = creds.Key{Kind: creds.KindInstanceProfile, Role: creds.Role{Name: src.ProfileRole}, Via: src.Profile}
	}
	if cfg.Source == exchange.SourceNameInstanceProfile {
		g.hostKey = g.profileKey
	} else {
		g.hostKey = creds.Key{Kind: creds.KindWorkload, Role: cfg.Role.Creds(session), Via: src.Workload}
	}
	for _, w := range cfg.Workloads {
		g.workloadKeys = append(g.workloadKeys, w.Key(session, src.Workload))
	}
	return g, nil
}

// newSources builds the exchanges of spec, on the identity sources of its
// identity: section.
func (d *daemon) newSources(ctx context.Context, spec sourceSpec) (*sources, error) {
	s := &sources{spec: spec, reg: prometheus.NewRegistry()}
	var tokens exchange.TokenSource
	if len(spec.Identity.JWTKeys()) > 0 {
		jwt, err := spec.Identity.NewJWT(spec.Upstream, d.log.Named("token"), s.reg)
		if err != nil {
			return nil, err
		}
		tokens = jwt
	}
	var x exchange.X509Source
	if spec.Identity.X509 != nil {
		xs, err := spec.Identity.NewX509(d.log.Named("token"), s.reg)
		if err != nil {
			return nil, err
		}
		x = xs
	}
	var err error
	s.Sources, err = exchange.NewSources(ctx, spec.SourcesSpec, tokens, x, d.log.Named("exchange"))
	return s, err
}

// rolloutSettings is the rollout part of g.
func (g *generation) rolloutSettings() rollout.Settings {
	s := rollout.Settings{Config: g.cfg.Rollout, ShadowKey: g.hostKey, PolicyKeys: g.policyKeys}
	if g.src.S3 != nil {
		s.S3 = g.src.S3
	}
	return s
}

// proxyConfig is the IMDS API's part of g, with plan.
func (g *generation) proxyConfig(plan *access.Plan) proxy.Config {
	u, _ := url.Parse(g.cfg.Upstream) // validated in Config.validate
	return proxy.Config{
		Plan:            plan,
		TokensRequired:  g.cfg.IMDS.Tokens == "required",
		HopLimit:        g.cfg.IMDS.HopLimit,
		Upstream:        u,
		UpstreamTimeout: g.cfg.UpstreamTimeout.D(),
		AllowedHosts:    g.cfg.IMDS.AllowedHosts,
	}
}

// Status implements admin.Daemon.
func (d *daemon) Status() admin.Status {
	s := d.snap.Load()
	cfg := s.gen.cfg
	served := s.servedKey()
	var ready bool
	var why string
	if e, ok := d.cache.Lookup(served); ok {
		ready, why = admin.Readiness(served.Role.Name, &e)
	} else {
		ready, why = admin.Readiness(served.Role.Name, nil)
	}
	st := admin.Status{
		Ready: ready, ReadyReason: why, Version: buildVersion(), Source: cfg.Source,
		RoleARN: cfg.Role.ARN, RoleName: cfg.Role.Name,
		ServedRoleName: served.Role.Name, ServedKind: string(served.Kind),
		Config:  d.reload.Status(d.path, s.plan.Gen()),
		Rollout: admin.RolloutStatus{Status: d.rollout.Status()},
		Cache:   d.Cache(),
	}
	st.Doors = append(st.Doors, admin.DoorStatus{Door: access.DoorIMDS, Listen: cfg.imdsListenAddrs()})
	if d.container != nil {
		interval, overlap := d.tokens.Schedule()
		door := admin.DoorStatus{Door: access.DoorContainer, Listen: cfg.Container.Listen, URL: cfg.Container.URL(false),
			Tokens: d.tokens.Count(), RotateInterval: interval.String(), RotateOverlap: overlap.String()}
		if t := d.tokens.LastRotation(); !t.IsZero() {
			door.LastRotation = t.UTC().Format(time.RFC3339)
		}
		st.Doors = append(st.Doors, door)
	}
	if d.process != nil {
		st.Doors = append(st.Doors, admin.DoorStatus{Door: access.DoorProcess, Listen: []string{cfg.CredProcess.Socket}})
	}
	st.Rollout.Workloads = admin.WorkloadsStatus{Configured: len(cfg.Workloads),
		Active: len(cfg.Workloads) > 0 && s.plan.Serving() == creds.KindWorkload}
	return st
}

// Cache implements admin.Daemon.
func (d *daemon) Cache() []admin.CacheEntry {
	snap := d.cache.Snapshot()
	out := make([]admin.CacheEntry, 0, len(snap))
	for _, e := range snap {
		out = append(out, admin.Entry(e))
	}
	return out
}

// registerMetrics registers the daemon's own metrics.
func (d *daemon) registerMetrics(logErrors func() int64) error {
	if logErrors == nil {
		logErrors = func() int64 { return 0 }
	}
	d.reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	factory := promauto.With(d.reg)
	factory.NewGaugeVec(prometheus.GaugeOpts{
		Name: "imdsproxy_build_info",
		Help: "Always 1; the labels name the running build.",
	}, []string{"version", "goversion"}).WithLabelValues(buildVersion(), runtime.Version()).Set(1)
	d.reload = admin.NewReloads(d.reg)
	factory.NewCounterFunc(prometheus.CounterOpts{
		Name: "imdsproxy_log_write_errors_total",
		Help: "Log lines that could not be written (for example a full disk); the daemon keeps serving.",
	}, func() float64 { return float64(logErrors()) })
	var err error
	d.interceptMetrics, err = intercept.NewMetrics(d.reg)
	return err
}

// registerCgroupMetrics exports what client identification's map of the
// cgroup2 tree holds and could not hold (peer.CgroupStats).
func registerCgroupMetrics(reg prometheus.Registerer, stats func() peer.CgroupStats) {
	factory := promauto.With(reg)
	factory.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "imdsproxy_cgroups_mapped",
		Help: "Cgroups that client identification maps to their units now.",
	}, func() float64 { return float64(stats().Mapped) })
	factory.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "imdsproxy_cgroups_mapped_below_units",
		Help: "Of imdsproxy_cgroups_mapped, those below a unit's own cgroup (made by the unit's processes: a user's user@UID.service).",
	}, func() float64 { return float64(stats().BelowUnits) })
	factory.NewCounterFunc(prometheus.CounterOpts{
		Name: "imdsproxy_cgroup_walks_total",
		Help: "Walks of the whole cgroup2 tree by client identification (at start, after an inotify overflow, when cgroups could not all be watched).",
	}, func() float64 { return float64(stats().Walks) })
	help := "Cgroups that client identification did not map (their processes' unit is unknown), each time one was met, by reason: limit (65,536 in all), unit_share (4,096 below one unit), units_share (32,768 below all units)."
	for reason, n := range map[string]func(peer.CgroupStats) int64{
		"limit":       func(s peer.CgroupStats) int64 { return s.RefusedLimit },
		"unit_share":  func(s peer.CgroupStats) int64 { return s.RefusedUnitShare },
		"units_share": func(s peer.CgroupStats) int64 { return s.RefusedUnitsShare },
	} {
		factory.NewCounterFunc(prometheus.CounterOpts{
			Name:        "imdsproxy_cgroups_refused_total",
			Help:        help,
			ConstLabels: prometheus.Labels{"reason": reason},
		}, func() float64 { return float64(n(stats())) })
	}
}

// gatherer gathers the daemon's registry and the current generation's
// (the identity sources' metrics, rebuilt with them on reload).
func (d *daemon) gatherer() prometheus.Gatherer {
	return prometheus.GathererFunc(func() ([]*dto.MetricFamily, error) {
		return prometheus.Gatherers{d.reg, d.snap.Load().gen.src.reg}.Gather()
	})
}
