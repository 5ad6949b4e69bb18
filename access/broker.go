package access

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promauto"
	"go.uber.org/zap"

	"github.com/imdsproxy/imdsproxy/creds"
)

// Source supplies credentials by key; the credential cache implements it.
// It must answer from memory whenever it holds valid credentials, wait at
// most maxWait (0: no bound but ctx) for an upstream fetch, and be safe for
// concurrent use. Errors may carry ErrorClass and Permanent.
type Source interface {
	GetWithin(ctx context.Context, key creds.Key, maxWait time.Duration) (creds.Credentials, error)
}

// DefaultWait bounds how long a request through the IMDS or the container
// door waits for an upstream fetch when nothing valid is in memory (a key
// fetched for the first time, or after its credentials ran out): just under
// the 1 s after which botocore and the JavaScript SDK give up (Go gives up
// after 0.5 s to the first byte, and asks again). The client is then
// answered with the EC2 error document instead of being dropped, and the
// fetch carries on for its next attempt (WIRE.md §8.7). The credential_process
// door has no bound: the SDK waits for the process, which has its own
// --timeout.
const DefaultWait = 900 * time.Millisecond

// fallbackWarnEvery rate-limits the Warn line logged when the instance
// profile's credentials are served in place of a workload role's.
const fallbackWarnEvery = 30 * time.Second

// Broker hands out the credentials a Decision names, for every front door:
// it gets them from the Source, serves the fallback when the decision has
// one and the key has nothing valid, counts what was served by kind, and
// writes the audit line. Create it with NewBroker; safe for concurrent use.
type Broker struct {
	src Source
	log *zap.Logger

	served    *prometheus.CounterVec
	byKind    sync.Map // doorKind -> prometheus.Counter: served's children, bound once
	fallbacks prometheus.Counter
	refused   *prometheus.CounterVec

	audits     *auditor
	auditEvery time.Duration

	mu          sync.Mutex
	lastWarn    time.Time
	nSuppressed int
}

// NewBroker returns a Broker serving from src, logging to log and writing
// audit lines to audit (nil: none). It registers its metrics with reg (nil:
// none).
func NewBroker(src Source, log, audit *zap.Logger, reg prometheus.Registerer) (*Broker, error) {
	if src == nil {
		return nil, errors.New("access: nil credential source")
	}
	if log == nil {
		log = zap.NewNop()
	}
	if audit == nil {
		audit = zap.NewNop()
	}
	factory := promauto.With(reg)
	b := &Broker{
		src: src,
		log: log,
		served: factory.NewCounterVec(prometheus.CounterOpts{
			Name: "imdsproxy_rollout_served_total",
			Help: "Credentials handed out, by front door (imds, container, process) and kind (workload: the host's or a workload's role; instance-profile).",
		}, []string{"door", "kind"}),
		fallbacks: factory.NewCounter(prometheus.CounterOpts{
			Name: "imdsproxy_rollout_fallbacks_total",
			Help: "Requests served the instance profile's credentials because the workload credentials could not be obtained (rollout.fallback: instance-profile).",
		}),
		auditEvery: AuditInterval,
		refused: factory.NewCounterVec(prometheus.CounterOpts{
			Name: "imdsproxy_access_refused_total",
			Help: "Credential requests refused by the access decision, by front door (imds, container, process), outcome (deny: 403; retry: the client could not be identified well enough, 503) and reason.",
		}, []string{"door", "outcome", "reason"}),
	}
	b.audits = newAuditor(audit, factory.NewCounterVec(prometheus.CounterOpts{
		Name: "imdsproxy_audit_handouts_total",
		Help: "Credential hand-outs audited, by client: its systemd unit, else uid:<n>, or unidentified; after 64 distinct clients, other. Says who hammers the daemon without a log line per request.",
	}, []string{"client"}))
	b.AddDoor(DoorIMDS)
	return b, nil
}

// waitOf is door's bound on a wait for an upstream fetch (0: none, the
// credential_process door).
func waitOf(door string) time.Duration {
	if door == DoorProcess {
		return 0
	}
	return DefaultWait
}

// Front doors: the door label of the metrics and the door field of the
// audit lines.
const (
	DoorIMDS      = "imds"      // the IMDS listener (package proxy)
	DoorContainer = "container" // the container credentials endpoint
	DoorProcess   = "process"   // the credential_process socket
)

// doorKind keys the served counter's children bound once.
type doorKind struct {
	door string
	kind creds.Kind
}

// AddDoor creates the series of door (a front door's name: DoorContainer,
// …) so that they exist, at 0, from the start, and binds its served
// counters once (no label hashing per hand-out). NewBroker adds DoorIMDS.
func (b *Broker) AddDoor(door string) {
	for _, k := range []creds.Kind{creds.KindWorkload, creds.KindInstanceProfile} {
		b.byKind.Store(doorKind{door, k}, b.served.WithLabelValues(door, string(k)))
	}
	reasons := []struct{ o, why string }{
		{"deny", whyNotLocal}, {"deny", whyDeniedUID}, {"deny", whyNotAllowed}, {"retry", whyUnresolved},
	}
	if door == DoorContainer {
		reasons = append(reasons, struct{ o, why string }{"deny", whyNotWorkload}, struct{ o, why string }{"deny", whyPeerMismatch})
	}
	for _, r := range reasons {
		b.refused.WithLabelValues(door, r.o, r.why)
	}
}

// Refused counts a Deny or Retry decision at door (front doors call it
// when they answer 403 or 503, or the like).
func (b *Broker) Refused(d Decision, door string) {
	switch d.Outcome {
	case Deny:
		b.refused.WithLabelValues(door, "deny", d.Why).Inc()
	case Retry:
		b.refused.WithLabelValues(door, "retry", d.Why).Inc()
	}
}

// Credentials returns the credentials of d (whose Outcome must be Serve) for
// c, asked for through door (a front door: DoorIMDS, …) and route (what was
// asked, for the audit): Key's, or Fallback's when Key has nothing valid and
// the request was not cancelled. A wait for an upstream fetch is bounded by
// door's (waitOf), for the key and again for the fallback. It counts the
// hand-out and, when d.Audit,
// writes the audit line (requested is the name the client asked for, when
// it differs from d.Name).
func (b *Broker) Credentials(ctx context.Context, d Decision, c Client, door, route, requested string) (creds.Credentials, error) {
	if d.Outcome != Serve {
		return creds.Credentials{}, errors.New("access: credentials asked for a decision that is not Serve")
	}
	start := d.At
	if start.IsZero() {
		start = time.Now()
	}
	wait := waitOf(door)
	cr, err := b.src.GetWithin(ctx, d.Key, wait)
	served := d.Key
	if err != nil && !d.Fallback.IsZero() && ctx.Err() == nil {
		fc, ferr := b.src.GetWithin(ctx, d.Fallback, wait)
		if ferr != nil {
			b.log.Warn("workload credentials unavailable and the instance-profile fallback failed too",
				zap.Stringer("key", d.Key), zap.Error(err), zap.NamedError("fallback_error", ferr))
			return creds.Credentials{}, err
		}
		b.fallbacks.Inc()
		b.warnFallback(d.Key, err)
		cr, err, served = fc, nil, d.Fallback
	}
	if err != nil {
		return creds.Credentials{}, err
	}
	if c, ok := b.byKind.Load(doorKind{door, served.Kind}); ok {
		c.(prometheus.Counter).Inc()
	} else {
		b.served.WithLabelValues(door, string(served.Kind)).Inc()
	}
	if d.Audit {
		b.auditLine(c, door, route, requested, d, served, cr, start)
	}
	return cr, nil
}

// Info returns the credentials of d like Credentials, fallback included,
// without counting or auditing a hand-out: for answers derived from the
// credentials that do not hand them out (iam/info, on the IMDS door, whose
// bound on a wait applies).
func (b *Broker) Info(ctx context.Context, d Decision) (creds.Credentials, error) {
	if d.Outcome != Serve {
		return creds.Credentials{}, errors.New("access: credentials asked for a decision that is not Serve")
	}
	wait := waitOf(DoorIMDS)
	cr, err := b.src.GetWithin(ctx, d.Key, wait)
	if err != nil && !d.Fallback.IsZero() && ctx.Err() == nil {
		if fc, ferr := b.src.GetWithin(ctx, d.Fallback, wait); ferr == nil {
			return fc, nil
		}
	}
	return cr, err
}

func (b *Broker) warnFallback(key creds.Key, err error) {
	now := time.Now()
	b.mu.Lock()
	if !b.lastWarn.IsZero() && now.Sub(b.lastWarn) < fallbackWarnEvery {
		b.nSuppressed++
		b.mu.Unlock()
		return
	}
	suppressed := b.nSuppressed
	b.lastWarn, b.nSuppressed = now, 0
	b.mu.Unlock()
	b.log.Warn("workload credentials unavailable; serving instance-profile credentials (rollout.fallback: instance-profile)",
		zap.Stringer("key", key), zap.Error(err), zap.Int("suppressed", suppressed))
}

// auditLine accounts for one hand-out (audit.go). kind is "fetch" when the
// credentials were obtained from upstream while the request waited (stored
// at or after start), else "cache".
func (b *Broker) auditLine(c Client, door, route, requested string, d Decision, served creds.Key, cr creds.Credentials, start time.Time) {
	kind := "cache"
	if !cr.LastUpdated.Before(start) {
		kind = "fetch"
	}
	b.audits.record(c, d, served.Role.Name, cr.AccessKeyID, cr.RoleARN, door, route, requested, kind, served != d.Key, start)
}

// ClientFields are the log fields naming c; never a secret.
func ClientFields(c Client) []zap.Field {
	if !c.Local {
		return []zap.Field{zap.Bool("identified", false), zap.Bool("unresolved", c.Unresolved)}
	}
	return []zap.Field{
		zap.Bool("identified", true),
		zap.Int("uid", c.UID),
		zap.Int("pid", c.PID),
		zap.String("exe", c.Exe),
		zap.String("unit", c.Unit),
		zap.String("cgroup", c.Cgroup),
	}
}
