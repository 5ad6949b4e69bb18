package admin

import (
	"slices"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promauto"
)

// Reloads is what the admin API and the metrics say about the daemon's
// configuration loads (start and every SIGHUP). Safe for concurrent use.
type Reloads struct {
	mu            sync.Mutex
	at            time.Time
	ok            bool
	err           string
	restartNeeded []string

	okGauge, timeGauge, restartGauge prometheus.Gauge
}

// NewReloads returns a Reloads registering its gauges with reg (nil: none).
func NewReloads(reg prometheus.Registerer) *Reloads {
	f := promauto.With(reg)
	return &Reloads{
		okGauge: f.NewGauge(prometheus.GaugeOpts{
			Name: "imdsproxy_config_last_reload_successful",
			Help: "1 if the last configuration load (start or SIGHUP) succeeded, else 0 (the running configuration was kept).",
		}),
		timeGauge: f.NewGauge(prometheus.GaugeOpts{
			Name: "imdsproxy_config_last_reload_success_timestamp_seconds",
			Help: "Unix time of the last successful configuration load.",
		}),
		restartGauge: f.NewGauge(prometheus.GaugeOpts{
			Name: "imdsproxy_config_restart_required",
			Help: "1 if the config file changes a setting that takes effect only at a restart (listen, admin_listen, upstream, intercept, imds.token_key_file, container.enabled/listen/link/token_dir, credential_process): the reload was refused.",
		}),
	}
}

// Record notes the outcome of a configuration load: err nil for success;
// restart names the settings that need a restart when that is why it was
// refused.
func (r *Reloads) Record(err error, restart []string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.at, r.ok, r.err, r.restartNeeded = time.Now(), err == nil, "", slices.Clone(restart)
	if err != nil {
		r.err = err.Error()
		r.okGauge.Set(0)
	} else {
		r.okGauge.Set(1)
		r.timeGauge.SetToCurrentTime()
	}
	switch {
	case len(restart) > 0:
		r.restartGauge.Set(1)
	case err == nil:
		r.restartGauge.Set(0)
	}
}

// Status is the configuration part of the status document of the config
// at path, whose current plan generation is gen.
func (r *Reloads) Status(path string, gen uint32) ConfigStatus {
	r.mu.Lock()
	defer r.mu.Unlock()
	return ConfigStatus{Path: path, Generation: gen, LastReload: rfc3339(r.at),
		LastReloadOK: r.ok, LastReloadError: r.err, RestartNeeded: slices.Clone(r.restartNeeded)}
}
