package main

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promauto"
	"go.uber.org/zap"

	"github.com/imdsproxy/imdsproxy/connlimit"
	"github.com/imdsproxy/imdsproxy/issuer"
	"github.com/imdsproxy/imdsproxy/logging"
)

// Timeouts of the listener.
const (
	readHeaderTimeout = 10 * time.Second
	readTimeout       = 30 * time.Second
	writeTimeout      = 30 * time.Second
	idleTimeout       = 2 * time.Minute
	maxHeaderBytes    = 64 << 10
	reloadTimeout     = 30 * time.Second
	startTimeout      = time.Minute
)

func runServe(ctx context.Context, args []string, stderr io.Writer) int {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	fs.SetOutput(stderr)
	path := fs.String("config", "", "config file (required)")
	format := fs.String("log-format", "json", "log format: json or console")
	level := fs.String("log-level", "info", "log level: debug, info, warn, error")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return exitOK
		}
		return exitUsage
	}
	if *path == "" || fs.NArg() > 0 {
		fmt.Fprintln(stderr, "Usage: imdsproxy-issuer serve --config FILE [--log-format json|console] [--log-level LEVEL]")
		return exitUsage
	}
	log, err := logging.New(*format, *level, stderr)
	if err != nil {
		fmt.Fprintf(stderr, "imdsproxy-issuer: %v\n", err)
		return exitUsage
	}
	defer func() { _ = log.Sync() }()
	cfg, err := issuer.LoadConfig(*path)
	if err != nil {
		log.Error("invalid configuration", zap.String("config", *path), zap.Error(err))
		return exitConfig
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	startCtx, cancel := context.WithTimeout(ctx, startTimeout)
	srv, err := issuer.New(startCtx, cfg, issuer.Options{Log: log.Named("issuer"), Registerer: reg, Gatherer: reg})
	cancel()
	if err != nil {
		log.Error("cannot start", zap.String("config", *path), zap.Error(err))
		var ce *issuer.ConfigError
		if errors.As(err, &ce) {
			return exitConfig
		}
		return exitError
	}

	var lc net.ListenConfig
	ln, err := lc.Listen(ctx, "tcp", cfg.Listen)
	if err != nil {
		log.Error("cannot listen", zap.String("listen", cfg.Listen), zap.Error(err))
		return exitError
	}
	// Hosts of the fleet, and anyone who reaches the listener, connect here:
	// at most max_connections open, a new one taking the place of the
	// keep-alive connection idle the longest (connlimit), so that neither a
	// flood nor clients that keep connections open exhaust the descriptors.
	f := promauto.With(reg)
	lim := connlimit.NewListener(ln, cfg.MaxConnections, connlimit.Metrics{
		Open: f.NewGauge(prometheus.GaugeOpts{
			Name: "imdsproxy_issuer_open_connections",
			Help: "Client connections to the issuer's listener now open.",
		}),
		Reached: f.NewCounter(prometheus.CounterOpts{
			Name: "imdsproxy_issuer_connection_limit_reached_total",
			Help: "Times a new connection found max_connections open.",
		}),
		Evicted: f.NewCounter(prometheus.CounterOpts{
			Name: "imdsproxy_issuer_idle_connections_closed_total",
			Help: "Keep-alive connections closed while idle to make room for a new one at max_connections.",
		}),
	})
	hs := &http.Server{
		ConnState:         connlimit.TrackIdle,
		Handler:           srv.Handler(),
		ReadHeaderTimeout: readHeaderTimeout,
		ReadTimeout:       readTimeout,
		WriteTimeout:      writeTimeout,
		IdleTimeout:       idleTimeout,
		MaxHeaderBytes:    maxHeaderBytes,
		ErrorLog:          zap.NewStdLog(log.Named("http")),
	}
	useTLS := cfg.TLS != nil
	if useTLS {
		hs.TLSConfig = &tls.Config{MinVersion: tls.VersionTLS12, GetCertificate: srv.GetCertificate}
	}
	served := make(chan error, 1)
	go func() {
		if useTLS {
			served <- hs.ServeTLS(lim, "", "")
		} else {
			served <- hs.Serve(lim)
		}
	}()
	log.Info("serving", zap.String("address", ln.Addr().String()), zap.Bool("tls", useTLS),
		zap.String("issuer", cfg.Issuer), zap.String("version", buildVersion()))
	notify(log, "READY=1\nSTATUS=serving tokens")

	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	for {
		select {
		case <-hup:
			reload(ctx, srv, *path, log)
		case err := <-served:
			log.Error("listener failed", zap.Error(err))
			return exitError
		case <-ctx.Done():
			return shutdown(srv, hs, served, log)
		}
	}
}

// reload re-reads the config; a bad one is logged and the running one kept
// (Reload sets imdsproxy_issuer_config_last_reload_successful).
func reload(ctx context.Context, srv *issuer.Server, path string, log *zap.Logger) {
	cfg, err := issuer.LoadConfig(path)
	if err != nil {
		srv.RefuseReload(err)
		return
	}
	ctx, cancel := context.WithTimeout(ctx, reloadTimeout)
	defer cancel()
	_ = srv.Reload(ctx, cfg)
}

// shutdown drains: readiness fails at once, requests are still served for
// shutdown.drain_delay, then in-flight requests get shutdown.timeout.
func shutdown(srv *issuer.Server, hs *http.Server, served chan error, log *zap.Logger) int {
	cfg := srv.Config()
	notify(log, "STOPPING=1")
	srv.Drain()
	log.Info("draining", zap.Duration("drain_delay", cfg.Shutdown.DrainDelay.D()), zap.Duration("timeout", cfg.Shutdown.Timeout.D()))
	if d := cfg.Shutdown.DrainDelay.D(); d > 0 {
		t := time.NewTimer(d)
		select {
		case <-t.C:
		case err := <-served:
			log.Error("listener failed while draining", zap.Error(err))
			return exitError
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), cfg.Shutdown.Timeout.D())
	defer cancel()
	if err := hs.Shutdown(ctx); err != nil {
		log.Warn("in-flight requests cut at the shutdown timeout", zap.Error(err))
	}
	log.Info("stopped")
	return exitOK
}

// notify sends state to systemd when NOTIFY_SOCKET is set (sd_notify(3)).
func notify(log *zap.Logger, state string) {
	addr := os.Getenv("NOTIFY_SOCKET")
	if addr == "" {
		return
	}
	if addr[0] == '@' {
		addr = "\x00" + addr[1:]
	}
	c, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: addr, Net: "unixgram"})
	if err == nil {
		_, err = c.Write([]byte(state))
		c.Close()
	}
	if err != nil {
		log.Warn("cannot notify the service manager", zap.Error(err))
	}
}
