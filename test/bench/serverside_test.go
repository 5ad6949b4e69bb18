package bench

import (
	"cmp"
	"fmt"
	"io"
	"math"
	"net/http"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/imdsproxy/imdsproxy/test/e2e"
)

// The daemon's own view of its latency. The generator's latencies include
// the kernel's loopback, the generator's scheduling and its wake lag; the
// daemon's imdsproxy_http_request_duration_seconds histogram measures only
// the time from the handler receiving a request to its answer being written.
// Scraping it before and after a run and subtracting gives, for that run
// alone, the share of credential GETs answered within each bucket bound, and
// bounds the daemon-side p99 from above (the smallest bound holding 99%).

// durationMetric is the histogram scraped, route the label value counted.
const (
	durationMetric = "imdsproxy_http_request_duration_seconds"
	credsRoute     = "credentials"
)

// histogram is the cumulative bucket counts of one route: le[i] → cum[i],
// le ascending, the last +Inf.
type histogram struct {
	le  []float64
	cum []float64
}

// scrapeHistogram reads route's buckets of durationMetric from the daemon's
// /metrics at admin (http://host:port) through client.
func scrapeHistogram(client *http.Client, admin, route string) (histogram, error) {
	m, _, err := e2e.ScrapeMetrics(client, admin)
	if err != nil {
		return histogram{}, err
	}
	return histogramOf(m, durationMetric, route)
}

// parseHistogram reads name's buckets with route="route" from a Prometheus
// text exposition.
func parseHistogram(r io.Reader, name, route string) (histogram, error) {
	text, err := io.ReadAll(r)
	if err != nil {
		return histogram{}, err
	}
	m, err := e2e.ParseMetrics(string(text))
	if err != nil {
		return histogram{}, err
	}
	return histogramOf(m, name, route)
}

// histogramOf is name's buckets with route="route" in m.
func histogramOf(m e2e.Metrics, name, route string) (histogram, error) {
	type bucket struct{ le, n float64 }
	var bs []bucket
	for _, s := range m.Select(name+"_bucket", map[string]string{"route": route}) {
		le, err := strconv.ParseFloat(s.Labels["le"], 64) // "+Inf" parses
		if err != nil {
			return histogram{}, fmt.Errorf("%s: bad bucket bound le=%q", name, s.Labels["le"])
		}
		bs = append(bs, bucket{le, s.Value})
	}
	if len(bs) == 0 {
		return histogram{}, fmt.Errorf("%s: no buckets for route %q", name, route)
	}
	slices.SortFunc(bs, func(a, b bucket) int { return cmp.Compare(a.le, b.le) })
	var h histogram
	for _, b := range bs {
		h.le, h.cum = append(h.le, b.le), append(h.cum, b.n)
	}
	return h, nil
}

// since is h − before, bucket by bucket (the run between two scrapes).
func (h histogram) since(before histogram) (histogram, error) {
	if !slices.Equal(h.le, before.le) {
		return histogram{}, fmt.Errorf("bucket bounds changed between scrapes")
	}
	d := histogram{le: h.le, cum: make([]float64, len(h.cum))}
	for i := range h.cum {
		d.cum[i] = h.cum[i] - before.cum[i]
	}
	return d, nil
}

// count is the number of observations.
func (h histogram) count() float64 {
	if len(h.cum) == 0 {
		return 0
	}
	return h.cum[len(h.cum)-1]
}

// within is the share of observations ≤ bound (bound must be a bucket
// bound), NaN without observations or when bound is not one.
func (h histogram) within(bound float64) float64 {
	i := slices.Index(h.le, bound)
	if i < 0 || h.count() == 0 {
		return math.NaN()
	}
	return h.cum[i] / h.count()
}

// quantileBound is the smallest bucket bound holding at least q of the
// observations: an upper bound of the q-quantile. +Inf when only the last
// bucket does, NaN without observations.
func (h histogram) quantileBound(q float64) float64 {
	n := h.count()
	if n == 0 {
		return math.NaN()
	}
	for i, c := range h.cum {
		if c >= q*n {
			return h.le[i]
		}
	}
	return math.Inf(1)
}

// serverSide is what the daemon's histogram says of one run.
type serverSide struct {
	Count       float64       // credential GETs observed
	P99Bound    time.Duration // upper bound of the daemon-side p99
	Within500us float64       // share answered within 0.5 ms
	Within1ms   float64       // share answered within 1 ms
	Err         error         // why there is nothing, if so
}

// fmtServerSide renders s for the report: "≤ 250 µs (99.98% ≤ 0.5 ms)".
func fmtServerSide(s *serverSide) string {
	switch {
	case s == nil:
		return ""
	case s.Err != nil:
		return "n/a (" + s.Err.Error() + ")"
	case s.Count == 0:
		return "no credential GETs"
	}
	return fmt.Sprintf("≤ %.0f (%.2f%% ≤ 500 µs, %.2f%% ≤ 1 ms)", us(s.P99Bound), 100*s.Within500us, 100*s.Within1ms)
}

// newServerSide computes serverSide from two scrapes.
func newServerSide(before, after histogram) *serverSide {
	d, err := after.since(before)
	if err != nil {
		return &serverSide{Err: err}
	}
	s := &serverSide{Count: d.count(), Within500us: d.within(0.0005), Within1ms: d.within(0.001)}
	if b := d.quantileBound(0.99); !math.IsInf(b, 0) && !math.IsNaN(b) {
		s.P99Bound = time.Duration(b * float64(time.Second))
	}
	return s
}

// histogram scrapes s's credential-route histogram; a zero histogram and no
// error for servers without an admin listener.
func (s *server) histogram() (histogram, error) {
	if s.admin == "" {
		return histogram{}, nil
	}
	tr := &http.Transport{Proxy: nil, DisableKeepAlives: true, DialContext: s.dial}
	defer tr.CloseIdleConnections()
	return scrapeHistogram(&http.Client{Timeout: 5 * time.Second, Transport: tr}, s.admin, credsRoute)
}

// measured runs run and, for a server with an admin listener (the daemon),
// also returns what its own histogram says of that run; nil for the others.
func (s *server) measured(run func() error) (*serverSide, error) {
	before, herr := s.histogram()
	err := run()
	if s.admin == "" {
		return nil, err
	}
	after, herr2 := s.histogram()
	if herr = cmp.Or(herr, herr2); herr != nil {
		return &serverSide{Err: herr}, err
	}
	return newServerSide(before, after), err
}

// reportSide reports side's p99 bound as daemon_side_p99_le_us, when there
// is one.
func reportSide(b *testing.B, side *serverSide) {
	if side != nil && side.Err == nil && side.Count > 0 {
		b.ReportMetric(us(side.P99Bound), "daemon_side_p99_le_us")
	}
}

// pacedRuns holds the timed runs of one generator by pacedKey: each runs once
// per process, and later calls of the same sub-benchmark report the same
// numbers. Guarded by pacedMu.
type pacedRuns[R any] struct {
	res  map[string]*R
	side map[string]*serverSide // the daemon's own view of its runs
	err  map[string]error
}

func newPacedRuns[R any]() *pacedRuns[R] {
	return &pacedRuns[R]{res: map[string]*R{}, side: map[string]*serverSide{}, err: map[string]error{}}
}

// once returns key's result, running run against srv (and measuring the
// daemon side) the first time; later calls return the first call's result
// or error.
func (p *pacedRuns[R]) once(key string, srv *server, run func() (R, error)) (*R, *serverSide, error) {
	pacedMu.Lock()
	res, done := p.res[key]
	err := p.err[key]
	pacedMu.Unlock()
	if !done && err == nil {
		time.Sleep(250 * time.Millisecond) // let the previous run's connections close
		var r R
		side, rerr := srv.measured(func() (err error) {
			r, err = run()
			return err
		})
		pacedMu.Lock()
		if rerr != nil {
			p.err[key] = rerr
		} else {
			res = &r
			p.res[key] = res
			if side != nil {
				p.side[key] = side
			}
		}
		pacedMu.Unlock()
		err = rerr
	}
	pacedMu.Lock()
	defer pacedMu.Unlock()
	return res, p.side[key], err
}

// checkPaced fails b when the paced run of target on srv (key) failed, its
// server crashed or exited, or operations failed, and reports the latency,
// throughput and CPU metrics both generators share.
func checkPaced(b *testing.B, env *benchEnv, srv *server, target, key string, res *pacedResult, err error) {
	b.Helper()
	env.checkAEMMCrash(b, srv, key)
	if err != nil {
		b.Fatalf("%s: %v; end of server output:\n%s", target, err, tail(srv.out.String(), 4000))
	}
	if srv.exited() {
		b.Fatalf("%s exited during the run (%s); end of output:\n%s", target, srv.state(), tail(srv.out.String(), 4000))
	}
	if res.Errors > 0 {
		b.Errorf("%s: %d of %d operations failed; first: %v", target, res.Errors, res.Ops, res.FirstErr)
	}
	b.ReportMetric(0, "ns/op")
	b.ReportMetric(us(res.P50), "p50_us")
	b.ReportMetric(us(res.P99), "p99_us")
	b.ReportMetric(us(res.P999), "p999_us")
	b.ReportMetric(us(res.Max), "max_us")
	b.ReportMetric(res.ReqPerSec, "req/s")
	b.ReportMetric(res.CPUPer1k(), "cpu_ms/1k")
	b.ReportMetric(float64(res.Late), "late_ops")
}
