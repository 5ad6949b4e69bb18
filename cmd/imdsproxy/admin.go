package main

import (
	"encoding/json"
	"fmt"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	dto "github.com/prometheus/client_model/go"

	"github.com/imdsproxy/imdsproxy/cache"
)

// adminHandler serves /metrics, /healthz, /readyz and /debug/cache. It must
// only ever be bound to the admin listener: /debug/cache names access key ids.
func (d *daemon) adminHandler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(d.gatherer(), promhttp.HandlerOpts{
		ErrorHandling:       promhttp.ContinueOnError,
		MaxRequestsInFlight: 4,
		Timeout:             10 * time.Second,
	}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		writeText(w, http.StatusOK, "ok\n")
	})
	mux.HandleFunc("GET /readyz", d.handleReady)
	mux.HandleFunc("GET /debug/cache", d.handleDebugCache)
	mux.HandleFunc("GET /debug/status", d.handleDebugStatus)
	return mux
}

// gatherer gathers the fixed registry and the current generation of the
// components a reload rebuilds.
func (d *daemon) gatherer() prometheus.Gatherer {
	return prometheus.GathererFunc(func() ([]*dto.MetricFamily, error) {
		return prometheus.Gatherers{d.reg, d.gen.Load()}.Gather()
	})
}

// readiness tells whether credentials for the served role are cached and
// valid, and why not.
func (d *daemon) readiness() (bool, string) {
	role := *d.roleName.Load()
	key := d.servedKey()
	for _, e := range d.cache.Snapshot() {
		if e.Key == key {
			return entryReadiness(role, &e)
		}
	}
	return entryReadiness(role, nil)
}

// entryReadiness is the readiness of role given its cache entry, nil when the
// cache holds none.
func entryReadiness(role string, e *cache.Entry) (bool, string) {
	switch {
	case e == nil:
	case e.Valid && e.Permanent:
		return false, fmt.Sprintf("not ready: the last refresh for role %s failed with a permanent error (%s: %s); still serving cached credentials valid until %s",
			role, e.ErrorClass, e.LastError, e.Expires.UTC().Format(time.RFC3339))
	case e.Valid:
		return true, fmt.Sprintf("ready: credentials for role %s valid until %s", role, e.Expires.UTC().Format(time.RFC3339))
	case e.LastError != "":
		return false, fmt.Sprintf("not ready: no valid credentials for role %s: %s: %s", role, e.ErrorClass, e.LastError)
	case e.AccessKeyID != "":
		// Held, no failure, yet not servable: they ran out without a failed
		// refresh, most often because the wall clock stepped forward; the
		// cache refreshes within seconds.
		return false, fmt.Sprintf("not ready: the cached credentials for role %s expire at %s, too soon by the local clock; refreshing (check the host clock if this persists)",
			role, e.Expires.UTC().Format(time.RFC3339))
	}
	return false, fmt.Sprintf("not ready: credentials for role %s not fetched yet", role)
}

func (d *daemon) handleReady(w http.ResponseWriter, _ *http.Request) {
	ok, why := d.readiness()
	status := http.StatusOK
	if !ok {
		status = http.StatusServiceUnavailable
	}
	writeText(w, status, why+"\n")
}

// debugEntry is the /debug/cache view of one cache entry: never a secret.
type debugEntry struct {
	Key                 string `json:"key"`
	AccessKeyID         string `json:"access_key_id"`
	Expires             string `json:"expires,omitempty"`
	LastUpdated         string `json:"last_updated,omitempty"`
	LastRefresh         string `json:"last_refresh,omitempty"`
	NextRefresh         string `json:"next_refresh,omitempty"`
	LastError           string `json:"last_error"`
	ErrorClass          string `json:"error_class"`
	Permanent           bool   `json:"permanent"`
	ConsecutiveFailures int    `json:"consecutive_failures"`
	Valid               bool   `json:"valid"`
}

func (d *daemon) handleDebugCache(w http.ResponseWriter, _ *http.Request) {
	snap := d.cache.Snapshot()
	out := struct {
		Role    string       `json:"role"`
		Source  string       `json:"source"`
		Entries []debugEntry `json:"entries"`
	}{Role: d.config().Role.ARN, Source: d.config().Source, Entries: make([]debugEntry, 0, len(snap))}
	for _, e := range snap {
		out.Entries = append(out.Entries, toDebugEntry(e))
	}
	body, err := json.MarshalIndent(out, "", "  ")
	if err != nil {
		writeText(w, http.StatusInternalServerError, "cannot encode the cache view\n")
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	_, _ = w.Write(append(body, '\n'))
}

func toDebugEntry(e cache.Entry) debugEntry {
	return debugEntry{
		Key:                 e.Key,
		AccessKeyID:         e.AccessKeyID,
		Expires:             rfc3339(e.Expires),
		LastUpdated:         rfc3339(e.LastUpdated),
		LastRefresh:         rfc3339(e.LastRefresh),
		NextRefresh:         rfc3339(e.NextRefresh),
		LastError:           e.LastError,
		ErrorClass:          e.ErrorClass,
		Permanent:           e.Permanent,
		ConsecutiveFailures: e.ConsecutiveFailures,
		Valid:               e.Valid,
	}
}

func rfc3339(t time.Time) string {
	if t.IsZero() {
		return ""
	}
	return t.UTC().Format(time.RFC3339)
}

func writeText(w http.ResponseWriter, status int, body string) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	_, _ = w.Write([]byte(body))
}

// statusCacheEntry is one cache entry of /debug/status.
type statusCacheEntry struct {
	Key         string `json:"key"`
	AccessKeyID string `json:"access_key_id"`
	Expires     string `json:"expires,omitempty"`
	NextRefresh string `json:"next_refresh,omitempty"`
	LastError   string `json:"last_error"`
	ErrorClass  string `json:"error_class"`
	Valid       bool   `json:"valid"`
}

// handleDebugStatus serves the summary `imdsproxy status` prints: readiness,
// the rollout decision and the cache, never a secret.
func (d *daemon) handleDebugStatus(w http.ResponseWriter, _ *http.Request) {
	cfg := d.config()
	ready, why := d.readiness()
	out := struct {
		Ready          bool               `json:"ready"`
		ReadyReason    string             `json:"ready_reason"`
		Version        string             `json:"version"`
		Source         string             `json:"source"`
		RoleARN        string             `json:"role_arn"`
		RoleName       string             `json:"role_name"`
		Rollout        any                `json:"rollout"`
		ServedRoleName string             `json:"served_role_name"`
		Cache          []statusCacheEntry `json:"cache"`
	}{
		Ready: ready, ReadyReason: why, Version: buildVersion(), Source: cfg.Source,
		RoleARN: cfg.Role.ARN, RoleName: cfg.Role.Name, Rollout: d.rolloutStatus(),
		ServedRoleName: *d.roleName.Load(), Cache: []statusCacheEntry{},
	}
	for _, e := range d.cache.Snapshot() {
		out.Cache = append(out.Cache, statusCacheEntry{
			Key: e.Key, AccessKeyID: e.AccessKeyID, Expires: rfc3339(e.Expires), NextRefresh: rfc3339(e.NextRefresh),
			LastError: e.LastError, ErrorClass: e.ErrorClass, Valid: e.Valid,
		})
	}
	body, err := json.MarshalIndent(out, "", "  ")
	if err != nil {
		writeText(w, http.StatusInternalServerError, "cannot encode the status\n")
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	_, _ = w.Write(append(body, '\n'))
}
