package access

import (
	"context"
	"strconv"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
)

// The audit keeps every hand-out accounted for without a log line per
// request: the first hand-out of an access key id to a client identity is
// logged at once ("credentials served"); repeats are counted in memory and
// reported as one "credentials served again" line per identity and key id,
// with the count, every AuditInterval, when the identity is handed a new key
// id (rotation), when the table is full, and at shutdown (Broker.Run).
// docs/security.md, "The audit log".

// AuditInterval is how often the counts of repeated hand-outs are logged.
const AuditInterval = 5 * time.Minute

// maxAuditEntries bounds the identities × key ids counted between two
// flushes; a full table is flushed at once.
const maxAuditEntries = 4096

// maxClientLabels bounds the client label of
// imdsproxy_audit_handouts_total; later clients count as "other".
const maxClientLabels = 64

// identity is who got credentials, as far as it is known.
type identity struct {
	local      bool
	uid, pid   int
	unit, exe  string
	cgroup     string
	unresolved bool
}

func identityOf(c Client) identity {
	if !c.Local {
		return identity{unresolved: c.Unresolved}
	}
	return identity{local: true, uid: c.UID, unit: c.Unit, exe: c.Exe, cgroup: c.Cgroup}
}

func (id identity) fields() []zap.Field {
	if !id.local {
		return []zap.Field{zap.Bool("identified", false), zap.Bool("unresolved", id.unresolved)}
	}
	return []zap.Field{zap.Bool("identified", true), zap.Int("uid", id.uid), zap.String("exe", id.exe),
		zap.String("unit", id.unit), zap.String("cgroup", id.cgroup)}
}

// label is the identity's client label: its unit, else its uid.
func (id identity) label() string {
	switch {
	case !id.local:
		return "unidentified"
	case id.unit != "":
		return id.unit
	}
	return "uid:" + strconv.Itoa(id.uid)
}

type auditKey struct {
	who   identity
	keyID string
}

type auditEntry struct {
	role, roleARN string
	door          string
	repeats       int64 // hand-outs since the line that reported the last ones
	first, last   time.Time
	// handed is the identity's child of imdsproxy_audit_handouts_total,
	// bound at the first hand-out: a repeat is a map lookup and two
	// increments, no label hashing and no log field.
	handed prometheus.Counter
}

// auditor is the audit's state; guarded by mu.
type auditor struct {
	log     *zap.Logger
	handed  *prometheus.CounterVec
	mu      sync.Mutex
	entries map[auditKey]*auditEntry
	latest  map[identity]string // the key id each identity was handed last
	labels  map[string]bool
}

func newAuditor(log *zap.Logger, handed *prometheus.CounterVec) *auditor {
	return &auditor{log: log, handed: handed, entries: map[auditKey]*auditEntry{},
		latest: map[identity]string{}, labels: map[string]bool{}}
}

// record accounts for one hand-out at now.
func (a *auditor) record(c Client, d Decision, served string, keyID, roleARN, door, route, requested, kind string, fallback bool, now time.Time) {
	who := identityOf(c)
	k := auditKey{who, keyID}
	a.mu.Lock()
	if e, ok := a.entries[k]; ok {
		e.repeats++
		e.last = now
		e.handed.Inc()
		a.mu.Unlock()
		return
	}
	label := who.label()
	if !a.labels[label] {
		if len(a.labels) >= maxClientLabels {
			label = "other"
		} else {
			a.labels[label] = true
		}
	}
	handed := a.handed.WithLabelValues(label)
	handed.Inc()
	var rotated []zap.Field
	if prev, ok := a.latest[who]; ok && prev != keyID {
		// The previous key id's entry stays until the next flush: a
		// request that got the old credentials just before the cache
		// swapped them, and records after this one, is a repeat counted
		// in a later summary, not a second first line.
		if e, ok := a.entries[auditKey{who, prev}]; ok {
			rotated = a.summaryLocked(auditKey{who, prev}, e)
		}
	}
	var full [][]zap.Field
	if len(a.entries) >= maxAuditEntries {
		full = a.flushLocked()
	}
	a.entries[k] = &auditEntry{role: served, roleARN: roleARN, door: door, first: now, last: now, handed: handed}
	a.latest[who] = keyID
	a.mu.Unlock()

	for _, f := range full {
		a.log.Info("credentials served again", f...)
	}
	if rotated != nil {
		a.log.Info("credentials served again", rotated...)
	}
	fields := who.fields()
	if c.Local {
		fields = append(fields, zap.Int("pid", c.PID))
	}
	if requested != "" && requested != d.Name {
		fields = append(fields, zap.String("requested_role_name", requested))
	}
	if fallback {
		fields = append(fields, zap.Bool("fallback", true))
	}
	a.log.Info("credentials served", append(fields,
		zap.String("role_name", served), zap.String("role", roleARN), zap.String("access_key_id", keyID),
		zap.String("kind", kind), zap.String("door", door), zap.String("route", route))...)
}

// summaryLocked is the line of e's repeats, nil when there are none.
func (a *auditor) summaryLocked(k auditKey, e *auditEntry) []zap.Field {
	if e.repeats == 0 {
		return nil
	}
	f := append(k.who.fields(), zap.String("role_name", e.role), zap.String("role", e.roleARN),
		zap.String("access_key_id", k.keyID), zap.String("door", e.door), zap.Int64("count", e.repeats),
		zap.Time("since", e.first), zap.Time("last", e.last))
	e.repeats, e.first = 0, e.last
	return f
}

// flushLocked reports every count and forgets the entries, keeping the
// latest key id of each identity (a repeat later is a new first line).
func (a *auditor) flushLocked() [][]zap.Field {
	var out [][]zap.Field
	for k, e := range a.entries {
		if f := a.summaryLocked(k, e); f != nil {
			out = append(out, f)
		}
	}
	clear(a.entries)
	if len(a.latest) > maxAuditEntries {
		clear(a.latest)
	}
	return out
}

// flush logs every count of repeated hand-outs. An entry of an identity's
// latest key id is kept: its key id was logged, so the next hand-out stays
// a repeat. An entry of a key id the identity has moved on from is dropped
// once reported: an interval is ample for requests in flight at the
// rotation.
func (a *auditor) flush() {
	a.mu.Lock()
	var out [][]zap.Field
	for k, e := range a.entries {
		if f := a.summaryLocked(k, e); f != nil {
			out = append(out, f)
		}
		if a.latest[k.who] != k.keyID {
			delete(a.entries, k)
		}
	}
	if len(a.entries) >= maxAuditEntries/2 {
		clear(a.entries) // bounded between flushes; a key id seen again is logged again
	}
	a.mu.Unlock()
	for _, f := range out {
		a.log.Info("credentials served again", f...)
	}
}

// Run logs the counts of repeated hand-outs every AuditInterval, and once
// more when ctx ends (shutdown); then it returns nil.
func (b *Broker) Run(ctx context.Context) error {
	t := time.NewTicker(b.auditEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			b.audits.flush()
			return nil
		case <-t.C:
			b.audits.flush()
		}
	}
}
