package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"reflect"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"golang.org/x/sync/errgroup"

	"github.com/imdsproxy/imdsproxy/cache"
	"github.com/imdsproxy/imdsproxy/creds"
	"github.com/imdsproxy/imdsproxy/exchange"
	"github.com/imdsproxy/imdsproxy/intercept"
	"github.com/imdsproxy/imdsproxy/peer"
	"github.com/imdsproxy/imdsproxy/proxy"
)

const defaultConfigPath = "/etc/imdsproxy/config.yaml"

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
	logOut := &countingWriter{w: stderr}
	log, err := newLogger(*format, *level, logOut)
	if err != nil {
		fmt.Fprintf(stderr, "imdsproxy: %v\n", err)
		return exitUsage
	}
	defer func() { _ = log.Sync() }()

	cfg, err := loadConfig(*path)
	if err != nil {
		log.Error("invalid configuration", zap.Error(err))
		return exitConfig
	}
	d, err := newDaemon(ctx, *path, cfg, log, &logOut.errors)
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

// newLogger builds the daemon's logger writing to w.
func newLogger(format, level string, w io.Writer) (*zap.Logger, error) {
	lvl, err := zapcore.ParseLevel(level)
	if err != nil {
		return nil, fmt.Errorf("--log-level: %q is not one of debug, info, warn, error", level)
	}
	encCfg := zap.NewProductionEncoderConfig()
	encCfg.TimeKey = "ts"
	encCfg.EncodeTime = zapcore.ISO8601TimeEncoder
	var enc zapcore.Encoder
	switch format {
	case "json":
		enc = zapcore.NewJSONEncoder(encCfg)
	case "console":
		encCfg.EncodeLevel = zapcore.CapitalLevelEncoder
		enc = zapcore.NewConsoleEncoder(encCfg)
	default:
		return nil, fmt.Errorf("--log-format: %q is not json or console", format)
	}
	core := zapcore.NewCore(enc, zapcore.Lock(zapcore.AddSync(w)), lvl)
	return zap.New(core, zap.ErrorOutput(zapcore.Lock(zapcore.AddSync(w)))), nil
}

// daemon holds the running components and the state a reload changes.
type daemon struct {
	path string
	log  *zap.Logger
	reg  *prometheus.Registry

	mu  sync.Mutex // guards cfg and sessionName during reloads
	cfg Config
	// sessionName is the resolved STS session name, kept across reloads that
	// do not change role.session_name.
	sessionName string

	roleName atomic.Pointer[string] // the cache key and listed role name
	fetcher  *swapFetcher
	// peers identifies client processes; one for the daemon's life, so
	// that its cgroup map survives reloads and rollout switches.
	peers *peer.Resolver
	// gen holds the metrics of the components rebuilt on reload (the token
	// source); /metrics gathers it beside reg.
	gen   atomic.Pointer[prometheus.Registry]
	cache *cache.Cache
	proxy *proxy.Server

	reloadOK   prometheus.Gauge
	reloadTime prometheus.Gauge

	interceptMetrics *intercept.Metrics // lifecycle.go

	rollout *rolloutState // nil unless rollout.policy is set (rollout_wire.go)
}

// countingWriter counts the log writes that failed (a full disk, a closed
// pipe), so that losing the logs shows in the metrics.
type countingWriter struct {
	w      io.Writer
	errors atomic.Int64
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	if err != nil {
		c.errors.Add(1)
	}
	return n, err
}

// newDaemon builds the daemon for cfg. logErrors counts failed log writes
// (nil: none are counted).
func newDaemon(ctx context.Context, path string, cfg Config, log *zap.Logger, logErrors *atomic.Int64) (*daemon, error) {
	d := &daemon{path: path, log: log, cfg: cfg, reg: prometheus.NewRegistry(), fetcher: &swapFetcher{},
		peers: peer.NewResolver(0)}
	d.reg.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	)
	buildInfo := prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "imdsproxy_build_info",
		Help: "Always 1; the labels name the running build.",
	}, []string{"version", "goversion"})
	buildInfo.WithLabelValues(buildVersion(), runtime.Version()).Set(1)
	d.reloadOK = prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "imdsproxy_config_last_reload_successful",
		Help: "1 if the last configuration load (start or SIGHUP) succeeded, else 0.",
	})
	d.reloadTime = prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "imdsproxy_config_last_reload_success_timestamp_seconds",
		Help: "Unix time of the last successful configuration load.",
	})
	if logErrors == nil {
		logErrors = new(atomic.Int64)
	}
	logWriteErrors := prometheus.NewCounterFunc(prometheus.CounterOpts{
		Name: "imdsproxy_log_write_errors_total",
		Help: "Log lines that could not be written (for example a full disk); the daemon keeps serving.",
	}, func() float64 { return float64(logErrors.Load()) })
	d.reg.MustRegister(buildInfo, d.reloadOK, d.reloadTime, logWriteErrors)
	d.interceptMetrics = newInterceptMetrics(d.reg) // lifecycle.go

	if err := resolveRoleName(ctx, &cfg, log); err != nil {
		return nil, err
	}
	d.cfg = cfg
	d.sessionName = resolveSessionName(ctx, cfg)
	f, gen, err := d.buildFetcher(ctx, cfg, d.sessionName)
	if err != nil {
		return nil, err
	}
	d.fetcher.set(f)
	d.gen.Store(gen)
	name := cfg.Role.Name
	d.roleName.Store(&name)

	fetcher, err := d.setupRollout(ctx, cfg, d.fetcher)
	if err != nil {
		return nil, err
	}
	d.cache, err = cache.New(fetcher, cacheConfig(cfg), log.Named("cache"), d.reg)
	if err != nil {
		return nil, fmt.Errorf("cache: %w", err)
	}
	src, err := d.credentialSource(ctx, cfg)
	if err != nil {
		return nil, err
	}
	pcfg := d.proxyConfig(cfg)
	if pcfg.TokenKey, err = loadTokenKey(cfg.IMDS.TokenKeyFile); err != nil { // lifecycle.go
		return nil, err
	}
	d.proxy, err = proxy.New(pcfg, src, log.Named("proxy"), d.reg)
	if err != nil {
		return nil, fmt.Errorf("proxy: %w", err)
	}
	d.reloadOK.Set(1)
	d.reloadTime.SetToCurrentTime()
	return d, nil
}

func cacheConfig(cfg Config) cache.Config {
	return cache.Config{
		Size:           cache.DefaultSize + maxWorkloads, // cache settings apply at restart: room for any reload
		FetchTimeout:   cfg.Cache.FetchTimeout.D(),
		BackoffInitial: cfg.Cache.BackoffInitial.D(),
		BackoffMax:     cfg.Cache.BackoffMax.D(),
		ExpiryMargin:   cfg.Cache.ExpiryMargin.D(),
	}
}

// proxyConfig is the IMDS API's part of cfg; the listed role is the one
// currently served (the rollout may serve the instance profile's).
func (d *daemon) proxyConfig(cfg Config) proxy.Config {
	u, _ := url.Parse(cfg.Upstream)         // validated in Config.validate
	pol, roles := proxyAccess(cfg, d.peers) // workloads.go
	roles = d.rolloutMapper(roles)          // rollout_daemon.go
	var access proxy.AccessControl
	if pol != nil {
		pol.active = roles // a workload is admitted only while its mapping is in force
		access = pol
	}
	return proxy.Config{
		RoleName:        *d.roleName.Load(),
		TokensRequired:  cfg.IMDS.Tokens == "required",
		HopLimit:        cfg.IMDS.HopLimit,
		Upstream:        u,
		UpstreamTimeout: cfg.UpstreamTimeout.D(),
		AllowedHosts:    cfg.IMDS.AllowedHosts, // hostcheck.go
		Access:          access,
		Roles:           roles,
		AuditLog:        d.auditLog(cfg.Access),
		AlsoServe:       d.rolloutRoleNames(cfg), // rollout_daemon.go
	}
}

// auditLog is the logger of the audit lines: none with access.audit false
// (clients may still be identified, for access lists or workloads).
func (d *daemon) auditLog(a AccessConfig) *zap.Logger {
	if a.Audit != nil && !*a.Audit {
		return zap.NewNop()
	}
	return d.log.Named("audit")
}

// resolveSessionName picks the STS session name: the configured one, else the
// instance id from upstream, else the host name.
func resolveSessionName(ctx context.Context, cfg Config) string {
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	return exchange.SessionName(ctx, cfg.Role.SessionName, cfg.Upstream)
}

// run opens both listeners, then runs every task until ctx ends or one fails.
func (d *daemon) run(ctx context.Context) error {
	cfg := d.config()
	imdsLns, adminLn, err := openListeners(ctx, cfg)
	if err != nil {
		return err
	}
	addrs := make([]string, 0, len(imdsLns))
	for _, ln := range imdsLns {
		addrs = append(addrs, ln.Addr().String())
		if wildcardAddr(ln.Addr().String()) {
			d.log.Warn(exposedListenerWarning, zap.String("listen", ln.Addr().String()))
		}
	}
	d.log.Info("listening",
		zap.Strings("listen", addrs),
		zap.String("admin_listen", adminLn.Addr().String()),
		zap.String("role", cfg.Role.ARN), zap.String("role_name", cfg.Role.Name),
		zap.String("source", cfg.Source), zap.String("session_name", d.sessionName),
		zap.Int("workloads", len(cfg.Workloads)),
		zap.String("version", buildVersion()))

	g, gctx := errgroup.WithContext(ctx)
	for _, ln := range imdsLns {
		g.Go(func() error { return d.proxy.Serve(gctx, ln) })
	}
	g.Go(func() error { return serveAdmin(gctx, adminLn, d.adminHandler(), d.log) })
	g.Go(func() error { return d.cache.Run(gctx) })
	g.Go(func() error {
		if d.startServing(gctx) {
			notifyReady(d.log)
		}
		return nil
	})
	g.Go(func() error { d.reloadLoop(gctx); return nil })
	for _, task := range append(d.backgroundTasks(), d.rolloutTasks()...) {
		g.Go(func() error { return task(gctx) })
	}
	err = g.Wait()
	notifyStopping(d.log)
	return err
}

// prefetch fills the cache for the served key; readiness waits for it. A
// failure is already logged and scheduled for retry by the cache. The
// workload roles are fetched beside it, in the background.
func (d *daemon) prefetch(ctx context.Context) bool {
	d.warmWorkloads(ctx, d.config().Workloads) // workloads.go
	role := d.servedKey()
	if err := d.cache.Prefetch(ctx, role); err != nil {
		if ctx.Err() == nil {
			d.log.Warn("initial credential fetch failed; retrying in the background", zap.String("role_name", role), zap.Error(err))
		}
		return false
	}
	d.log.Info("credentials cached; ready", zap.String("role_name", role))
	return true
}

func (d *daemon) config() Config {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.cfg
}

// reloadLoop reloads the config on every SIGHUP until ctx ends.
func (d *daemon) reloadLoop(ctx context.Context) {
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	for {
		select {
		case <-ctx.Done():
			return
		case <-hup:
			if err := d.reload(ctx); err != nil {
				d.reloadOK.Set(0)
				d.log.Error("reload refused; keeping the running configuration", zap.String("config", d.path), zap.Error(err))
				continue
			}
			d.reloadOK.Set(1)
			d.reloadTime.SetToCurrentTime()
		}
	}
}

// reload applies the config file anew. Nothing changes unless the whole new
// config is valid and its identity source can be built.
func (d *daemon) reload(ctx context.Context) error {
	next, err := loadConfig(d.path)
	if err != nil {
		return err
	}
	if err := resolveRoleName(ctx, &next, d.log); err != nil {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	prev := d.cfg
	if next.Listen != prev.Listen || next.AdminListen != prev.AdminListen {
		d.log.Warn("listen and admin_listen changes take effect at restart; keeping the current listeners")
		next.Listen, next.AdminListen = prev.Listen, prev.AdminListen
	}
	if next.Cache != prev.Cache {
		d.log.Warn("cache settings take effect at restart")
		next.Cache = prev.Cache
	}
	if d.rollout != nil || next.rolloutEnabled() {
		if next.Rollout != prev.Rollout || next.Role.Name != prev.Role.Name {
			d.log.Warn("rollout settings and role.name take effect at restart under a rollout; the policy itself is re-read now")
			next.Rollout, next.Role.Name = prev.Rollout, prev.Role.Name
		}
	}
	identityChanged := next.Source != prev.Source || next.Role != prev.Role || next.Region != prev.Region ||
		!reflect.DeepEqual(next.Identity, prev.Identity) ||
		workloadRolesChanged(prev.Workloads, next.Workloads) // workloads.go
	if identityChanged {
		session := d.sessionName
		if next.Role.SessionName != prev.Role.SessionName {
			session = resolveSessionName(ctx, next)
		}
		f, gen, err := d.buildFetcher(ctx, next, session)
		if err != nil {
			return err
		}
		prevName := *d.roleName.Load()
		if d.rollout == nil {
			name := next.Role.Name
			d.roleName.Store(&name)
		}
		// The new exchanges and an empty cache first, then the new mapping:
		// no request may match a new role and be fetched by old exchanges.
		prevFetcher, prevGen := d.fetcher.get(), d.gen.Load()
		d.fetcher.set(f)
		d.gen.Store(gen)
		d.cache.Purge()
		prevRoles := d.storeRolloutRoles(next.Workloads)
		if err := d.proxy.Update(d.proxyConfig(next)); err != nil {
			d.roleName.Store(&prevName)
			d.fetcher.set(prevFetcher)
			d.gen.Store(prevGen)
			d.cache.Purge()
			d.restoreRolloutRoles(prevRoles)
			return err
		}
		d.sessionName = session
		go d.startServing(ctx)
	} else {
		prevRoles := d.storeRolloutRoles(next.Workloads)
		if err := d.proxy.Update(d.proxyConfig(next)); err != nil {
			d.restoreRolloutRoles(prevRoles)
			return err
		}
	}
	d.cfg = next
	d.reloadRolloutPolicy(ctx)
	d.log.Info("configuration reloaded", zap.String("config", d.path), zap.Bool("identity_changed", identityChanged))
	return nil
}

// swapFetcher is a cache.Fetcher whose implementation a reload can replace.
type swapFetcher struct{ p atomic.Pointer[cache.Fetcher] }

func (s *swapFetcher) set(f cache.Fetcher) { s.p.Store(&f) }

// get returns the current fetcher (nil before the first set).
func (s *swapFetcher) get() cache.Fetcher {
	if p := s.p.Load(); p != nil {
		return *p
	}
	return nil
}

func (s *swapFetcher) Fetch(ctx context.Context, key string) (creds.Credentials, error) {
	f := s.p.Load()
	if f == nil {
		return creds.Credentials{}, errors.New("no credential source configured")
	}
	return (*f).Fetch(ctx, key)
}

// serveAdmin serves the admin handler on ln until ctx ends, then drains.
func serveAdmin(ctx context.Context, ln net.Listener, h http.Handler, log *zap.Logger) error {
	srv := &http.Server{
		Handler:           h,
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       10 * time.Second,
		WriteTimeout:      30 * time.Second,
		IdleTimeout:       60 * time.Second,
		MaxHeaderBytes:    16 << 10,
		ErrorLog:          zap.NewStdLog(log.Named("admin")),
	}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		return fmt.Errorf("admin listener: %w", err)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		return fmt.Errorf("admin listener: shutdown: %w", err)
	}
	return nil
}
