// Command fleetsim simulates a fleet of imdsproxy daemons refreshing their
// credentials from one STS with a rate quota, to show what the daemon's
// refresh schedule does at scale: STS calls per second, credential age, and
// what a fleet-wide STS outage does.
//
// Each simulated host runs the daemon's real schedule, cache.RefreshAt
// (refresh-ahead at about half-life with ±10% jitter, or 30–36 minutes
// before expiry if sooner, at least every 6 h) and cache.RetryAt
// (capped exponential backoff with jitter, pulled forward to the end of
// servability), in a discrete-event simulation: a min-heap of next events on
// a simulated clock, nothing sleeps. STS is a token bucket (calls beyond the
// quota are throttled, a retryable failure) with a fixed latency, and can be
// made to fail every call during an outage window.
//
// Usage:
//
//	fleetsim [-hosts N] [-quota RPS] [-latency D] [-outage D] [-boot spread|once] ...
//	fleetsim -report   # the representative set of docs/scale.md, as a markdown table
//
// Only background refreshes are modelled: a client's request never triggers
// an STS call while the cache holds servable credentials, and when it holds
// none the request joins the same schedule (Get honours the backoff).
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"time"
)

// Exit codes.
const (
	exitOK    = 0
	exitError = 1
	exitUsage = 2
)

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("fleetsim", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var (
		p      Params
		boot   string
		report bool
	)
	fs.IntVar(&p.Hosts, "hosts", 10000, "number of hosts (100 to 100000 are typical)")
	fs.Float64Var(&p.Quota, "quota", 600, "STS rate quota, requests per second")
	fs.Float64Var(&p.Burst, "burst", 0, "STS token bucket size (0: one second of quota)")
	fs.DurationVar(&p.Latency, "latency", 100*time.Millisecond, "latency of every STS call")
	fs.DurationVar(&p.Session, "session", time.Hour, "credential lifetime")
	fs.DurationVar(&p.Duration, "duration", 0, "simulated time (0: 4h, or outage-at + outage + 2h)")
	fs.StringVar(&boot, "boot", "spread", "spread: hosts boot uniformly over the first hour; once: all at 0")
	fs.DurationVar(&p.Outage, "outage", 0, "length of a fleet-wide STS outage (0: none)")
	fs.DurationVar(&p.OutageAt, "outage-at", 2*time.Hour, "when the outage starts")
	fs.DurationVar(&p.BackoffInitial, "backoff-initial", 0, "cache.backoff_initial (0: daemon default)")
	fs.DurationVar(&p.BackoffMax, "backoff-max", 0, "cache.backoff_max (0: daemon default)")
	fs.DurationVar(&p.ExpiryMargin, "expiry-margin", 0, "cache.expiry_margin (0: daemon default)")
	fs.DurationVar(&p.FetchTimeout, "fetch-timeout", 0, "cache.fetch_timeout (0: daemon default)")
	fs.Uint64Var(&p.Seed, "seed", 1, "random seed")
	fs.BoolVar(&report, "report", false, "run the representative set and print a markdown table")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return exitOK
		}
		return exitUsage
	}
	if report {
		writeReport(stdout, reportSet())
		return exitOK
	}
	switch boot {
	case "spread":
		p.BootSpread = time.Hour
	case "once":
	default:
		fmt.Fprintf(stderr, "fleetsim: -boot: %q is not spread or once\n", boot)
		return exitUsage
	}
	if p.Duration == 0 {
		p.Duration = 4 * time.Hour
		if p.Outage > 0 {
			p.Duration = p.OutageAt + p.Outage + 2*time.Hour
		}
	}
	if p.Hosts < 1 || p.Quota <= 0 || p.Duration <= 0 || p.Latency < 0 || p.Outage < 0 {
		fmt.Fprintln(stderr, "fleetsim: -hosts, -quota and -duration must be positive, -latency and -outage not negative")
		return exitUsage
	}
	start := time.Now()
	r := Simulate(p)
	writeResult(stdout, r)
	fmt.Fprintf(stdout, "simulated in %s\n", time.Since(start).Round(time.Millisecond))
	return exitOK
}

func writeResult(w io.Writer, r Result) {
	p := r.Params
	fmt.Fprintf(w, "hosts %d, quota %g rps, latency %s, session %s, boot spread %s, simulated %s\n",
		p.Hosts, p.Quota, p.Latency, p.Session, p.BootSpread, p.Duration)
	fmt.Fprintf(w, "STS calls: %d (throttled %d, failed %d); peak %d/s, mean %.1f/s\n",
		r.Calls, r.Throttled, r.Failed, r.PeakRPS, r.MeanRPS)
	fmt.Fprintf(w, "first credentials within %s of boot; hosts that never got any: %d\n", dur(r.FirstCreds), r.NeverGotCreds)
	fmt.Fprintf(w, "served credentials: oldest %s, least remaining lifetime %s\n", r.MaxAge.Round(time.Second), r.MinRemaining.Round(time.Second))
	fmt.Fprintf(w, "hosts that ran out of valid credentials after having some: %d (longest gap %s); waits of one STS call: %d\n",
		r.HostsWithout, r.WithoutTime.Round(time.Second), r.WaitedOneCall)
	if p.Outage > 0 {
		fmt.Fprintf(w, "outage %s at %s: %d calls during it (peak %d/s), peak %d/s in the 10 min after\n",
			p.Outage, p.OutageAt, r.OutageCalls, r.OutagePeakRPS, r.AfterPeakRPS)
		fmt.Fprintf(w, "hosts without valid credentials during the outage: %d, still without at its end: %d\n",
			r.HostsWithoutDuring, r.HostsWithoutAfter)
		fmt.Fprintf(w, "after the outage: all hosts valid again within %s, all refreshed within %s\n",
			r.RecoverValid.Round(time.Second), r.RecoverFresh.Round(time.Second))
	}
}

// scenario is one row of the report.
type scenario struct {
	name string
	p    Params
}

// reportSet is the representative set of docs/scale.md.
func reportSet() []scenario {
	base := func(hosts int) Params {
		return Params{Hosts: hosts, Quota: 600, Latency: 100 * time.Millisecond, Duration: 4 * time.Hour,
			BootSpread: time.Hour, Seed: 1}
	}
	var out []scenario
	for _, n := range []int{100, 1000, 10000, 100000} {
		out = append(out, scenario{"steady, boot spread over 1h", base(n)})
	}
	for _, n := range []int{1000, 100000} {
		p := base(n)
		p.BootSpread = 0
		out = append(out, scenario{"all boot at once", p})
	}
	for _, lat := range []time.Duration{2 * time.Second, 25 * time.Second} {
		p := base(100000)
		p.Latency = lat
		out = append(out, scenario{fmt.Sprintf("STS slow (%s per call)", lat), p})
	}
	for _, o := range []time.Duration{5 * time.Minute, 30 * time.Minute, 90 * time.Minute} {
		p := base(100000)
		p.OutageAt, p.Outage, p.Duration = 2*time.Hour, o, 2*time.Hour+o+2*time.Hour
		out = append(out, scenario{fmt.Sprintf("STS outage %s at 2h", o), p})
	}
	return out
}

func writeReport(w io.Writer, set []scenario) {
	fmt.Fprintln(w, "| scenario | hosts | STS calls | peak rps | mean rps | throttled | first creds after boot | oldest served | least remaining | hosts ran out (longest) | one-call waits | outage calls (peak rps) | without during / at end | all valid again | all refreshed | peak rps 10 min after |")
	fmt.Fprintln(w, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
	start := time.Now()
	for _, s := range set {
		r := Simulate(s.p)
		outage := "–"
		during, valid, fresh, after := "–", "–", "–", "–"
		if s.p.Outage > 0 {
			outage = fmt.Sprintf("%d (%d)", r.OutageCalls, r.OutagePeakRPS)
			during = fmt.Sprintf("%d / %d", r.HostsWithoutDuring, r.HostsWithoutAfter)
			valid = dur(r.RecoverValid)
			fresh = dur(r.RecoverFresh)
			after = fmt.Sprint(r.AfterPeakRPS)
		}
		fmt.Fprintf(w, "| %s | %d | %d | %d | %.1f | %d | %s | %s | %s | %d (%s) | %d | %s | %s | %s | %s | %s |\n",
			s.name, s.p.Hosts, r.Calls, r.PeakRPS, r.MeanRPS, r.Throttled, dur(r.FirstCreds),
			dur(r.MaxAge), dur(r.MinRemaining), r.HostsWithout, dur(r.WithoutTime), r.WaitedOneCall, outage, during, valid, fresh, after)
	}
	fmt.Fprintf(w, "\nSTS quota 600 rps (burst 600), latency 100 ms unless stated, sessions 1h, daemon defaults (backoff 2s..5m, expiry margin 1m, fetch timeout 30s), seed 1. Simulated in %s.\n",
		time.Since(start).Round(100*time.Millisecond))
}

// dur prints a duration compactly, rounded to the second.
func dur(d time.Duration) string {
	if d == 0 {
		return "0s"
	}
	if d < time.Second {
		return d.Round(time.Millisecond).String()
	}
	return d.Round(time.Second).String()
}
