// Package admin is the daemon's admin listener: /metrics, /healthz,
// /readyz, /debug/cache and /debug/status, and the client side of
// `imdsproxy status`. It must only ever be bound to a loopback address:
// /debug/cache names access key ids.
//
// Requests whose Host header does not name a loopback address or the
// listener's own address are refused (403), as on the IMDS listener: a web
// page in a browser on the host cannot read the admin API through DNS
// rebinding.
package admin

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.uber.org/zap"

	"github.com/imdsproxy/imdsproxy/connlimit"
)

// Daemon is what the admin API reports on; the daemon implements it. Both
// methods must be cheap and safe for concurrent use.
type Daemon interface {
	// Status is the /debug/status document (readiness included).
	Status() Status
	// Cache is the redacted view of every cached key.
	Cache() []CacheEntry
}

// Handler serves the admin API of d, with the metrics gathered from g.
func Handler(g prometheus.Gatherer, d Daemon) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(g, promhttp.HandlerOpts{
		ErrorHandling:       promhttp.ContinueOnError,
		MaxRequestsInFlight: 4,
		Timeout:             10 * time.Second,
	}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		writeText(w, http.StatusOK, "ok\n")
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		st := d.Status()
		status := http.StatusOK
		if !st.Ready {
			status = http.StatusServiceUnavailable
		}
		writeText(w, status, st.ReadyReason+"\n")
	})
	mux.HandleFunc("GET /debug/cache", func(w http.ResponseWriter, _ *http.Request) {
		st := d.Status()
		writeJSON(w, struct {
			Role    string       `json:"role"`
			Source  string       `json:"source"`
			Entries []CacheEntry `json:"entries"`
		}{Role: st.RoleARN, Source: st.Source, Entries: d.Cache()})
	})
	mux.HandleFunc("GET /debug/status", func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, d.Status())
	})
	return hostChecked(mux)
}

// hostChecked refuses requests whose Host is not a loopback name or address
// or the listener's own address (DNS-rebinding defence).
func hostChecked(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !hostAllowed(r) {
			writeText(w, http.StatusForbidden, "forbidden: the Host header does not name this admin listener\n")
			return
		}
		h.ServeHTTP(w, r)
	})
}

func hostAllowed(r *http.Request) bool {
	host := r.Host
	if host == "" {
		return true // HTTP/1.0
	}
	name := host
	if h, port, err := net.SplitHostPort(host); err == nil {
		for _, c := range port {
			if c < '0' || c > '9' {
				return false
			}
		}
		name = h
	} else if strings.Contains(host, ":") {
		return false
	}
	if strings.EqualFold(name, "localhost") {
		return true
	}
	ip := net.ParseIP(name)
	if ip == nil {
		return false
	}
	if ip.IsLoopback() {
		return true
	}
	if la, ok := r.Context().Value(http.LocalAddrContextKey).(net.Addr); ok {
		if ta, ok := la.(*net.TCPAddr); ok && ta.IP.Equal(ip) {
			return true
		}
	}
	return false
}

// Bounds of the admin listener. Any local user can reach it, so it must
// not let one hold what the other listeners need: each connection is a
// goroutine, buffers and a file descriptor.
const (
	// maxConns bounds the connections kept open at once: plenty for
	// scrapes and `imdsproxy status`. At the bound a new connection takes
	// the place of the keep-alive connection idle the longest (connlimit),
	// else waits in the listen backlog until one closes.
	maxConns          = 64
	readHeaderTimeout = 5 * time.Second
	readTimeout       = 10 * time.Second
	writeTimeout      = 30 * time.Second // /metrics gives up after 10s
	idleTimeout       = 30 * time.Second // an idle keep-alive connection frees its slot
	maxHeaderBytes    = 16 << 10
	shutdownWait      = 5 * time.Second
)

// Serve serves h on ln, at most 64 connections at once, until ctx ends,
// then drains (at most 5s). With owner (nil: none), no one owner holds
// more than about three quarters of the slots with connections that are
// not idle (connlimit.Listener.ShareByOwner).
func Serve(ctx context.Context, ln net.Listener, h http.Handler, owner connlimit.OwnerFunc, log *zap.Logger) error {
	srv := &http.Server{
		ConnState:         connlimit.TrackIdle,
		Handler:           h,
		ReadHeaderTimeout: readHeaderTimeout,
		ReadTimeout:       readTimeout,
		WriteTimeout:      writeTimeout,
		IdleTimeout:       idleTimeout,
		MaxHeaderBytes:    maxHeaderBytes,
		ErrorLog:          zap.NewStdLog(log),
	}
	errc := make(chan error, 1)
	lim := connlimit.NewListener(ln, maxConns, connlimit.Metrics{})
	if owner != nil {
		lim.ShareByOwner(owner)
	}
	go func() { errc <- srv.Serve(lim) }()
	select {
	case err := <-errc:
		return fmt.Errorf("admin listener: %w", err)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), shutdownWait)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		return fmt.Errorf("admin listener: shutdown: %w", err)
	}
	return nil
}

// Exposed reports whether addr (host:port) would expose the admin API
// beyond this host: a wildcard or a non-loopback address.
func Exposed(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if host == "" || strings.EqualFold(host, "localhost") {
		return host == ""
	}
	ip := net.ParseIP(host)
	return ip == nil || !ip.IsLoopback()
}

// ExposedWarning is logged (and printed by check-config) for an admin
// listener that is not on loopback.
const ExposedWarning = "the admin listener is not on a loopback address: /debug/cache and /debug/status name access key ids and the rollout state to anyone who can reach it; use 127.0.0.1 or [::1]"

func writeText(w http.ResponseWriter, status int, body string) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	_, _ = w.Write([]byte(body))
}

func writeJSON(w http.ResponseWriter, v any) {
	body, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		writeText(w, http.StatusInternalServerError, "cannot encode the document\n")
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	_, _ = w.Write(append(body, '\n'))
}
