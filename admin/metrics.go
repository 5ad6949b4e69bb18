package admin

import (
	"github.com/prometheus/client_golang/prometheus"
)

// RegisterReady registers with reg the imdsproxy_ready gauge: 1 while d's
// status says ready, else 0, read from d.Status at every scrape, so it is
// by construction what /readyz answers (200: 1, 503: 0). Register it once
// d can answer Status (the daemon's first snapshot is published).
func RegisterReady(reg prometheus.Registerer, d Daemon) error {
	return reg.Register(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "imdsproxy_ready",
		Help: "1 while /readyz answers 200 (the credentials of the role served are cached, valid and their last refresh did not fail permanently), else 0; computed at scrape time.",
	}, func() float64 {
		if d.Status().Ready {
			return 1
		}
		return 0
	}))
}
