package access

import (
	"context"
	"strconv"
	"sync"
	"sync/atomic"
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
	k             auditKey
	role, roleARN string
	door          string
	first         time.Time // since: guarded by auditor.mu
	// repeats are the hand-outs since the line that reported the last
	// ones, last the time of the latest (unix nanoseconds): counted
	// without the lock by a connection's slot (count), read and reset
	// under it.
	repeats atomic.Int64
	last    atomic.Int64
	// dropped is set, under auditor.mu, when the entry leaves the table:
	// a slot that still holds it must not count there any more.
	dropped atomic.Bool
	// handed is the identity's child of imdsproxy_audit_handouts_total,
	// bound at the first hand-out: a repeat is two atomic additions, no
	// label hashing and no log field.
	handed prometheus.Counter
}

// count accounts for one repeated hand-out at now without the auditor's
// lock; false when the entry was dropped from the table (flushed), in
// which case the caller records the hand-out through the table, together
// with the counts of others that raced the flush.
func (e *auditEntry) count(now time.Time) bool {
	e.handed.Inc() // the identity's counter, whichever entry ends up with the count
	e.repeats.Add(1)
	if e.dropped.Load() {
		return false
	}
	e.seen(now)
	return true
}

// seen moves last forward to now (concurrent repeats may arrive out of
// order).
func (e *auditEntry) seen(now time.Time) {
	t := now.UnixNano()
	for {
		old := e.last.Load()
		if t <= old || e.last.CompareAndSwap(old, t) {
			return
		}
	}
}

// drop takes e out of the table's accounting; under auditor.mu, before
// its last count is read.
func (e *auditEntry) drop() { e.dropped.Store(true) }

// auditSlot remembers the audit entry of a connection's last hand-out, so
// that a repeat of the same key id to the same identity — what an SDK
// looping on its connection does — is counted with two atomic additions,
// without hashing the identity or taking the audit's lock. ConnClient puts
// one in the Clients it returns; a Client without one is counted through
// the table.
type auditSlot struct{ e atomic.Pointer[auditEntry] }

func (s *auditSlot) entry() *auditEntry {
	if s == nil {
		return nil
	}
	return s.e.Load()
}

func (s *auditSlot) remember(e *auditEntry) {
	if s != nil {
		s.e.Store(e)
	}
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
	n := int64(1)    // the hand-outs this call accounts for
	metered := false // whether they are in imdsproxy_audit_handouts_total already
	if e := c.slot.entry(); e != nil && e.k == k {
		if e.count(now) {
			return
		}
		// Dropped by a flush, which read its count under the lock:
		// what was added since is this call's to record.
		a.mu.Lock()
		if n = e.repeats.Swap(0); n == 0 {
			a.mu.Unlock() // the flush, or a concurrent repeat, took this one
			return
		}
		metered = true
	} else {
		a.mu.Lock()
	}
	if e, ok := a.entries[k]; ok {
		e.repeats.Add(n)
		e.seen(now)
		if !metered {
			e.handed.Add(float64(n))
		}
		a.mu.Unlock()
		c.slot.remember(e)
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
	if !metered {
		handed.Add(float64(n))
	}
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
	e := &auditEntry{k: k, role: served, roleARN: roleARN, door: door, first: now, handed: handed}
	e.repeats.Store(n - 1) // reclaimed from a dropped entry: the rest are repeats
	e.last.Store(now.UnixNano())
	a.entries[k] = e
	a.latest[who] = keyID
	a.mu.Unlock()
	c.slot.remember(e)

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
	n := e.repeats.Swap(0)
	if n == 0 {
		return nil
	}
	last := time.Unix(0, e.last.Load())
	f := append(k.who.fields(), zap.String("role_name", e.role), zap.String("role", e.roleARN),
		zap.String("access_key_id", k.keyID), zap.String("door", e.door), zap.Int64("count", n),
		zap.Time("since", e.first), zap.Time("last", last))
	e.first = last
	return f
}

// flushLocked reports every count and forgets the entries, keeping the
// latest key id of each identity (a repeat later is a new first line).
func (a *auditor) flushLocked() [][]zap.Field {
	var out [][]zap.Field
	for k, e := range a.entries {
		e.drop()
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
		keep := a.latest[k.who] == k.keyID
		if !keep {
			e.drop()
		}
		if f := a.summaryLocked(k, e); f != nil {
			out = append(out, f)
		}
		if !keep {
			delete(a.entries, k)
		}
	}
	if len(a.entries) >= maxAuditEntries/2 {
		// Bounded between flushes; a key id seen again is logged again.
		// A repeat counted without the lock since the loop above is
		// reported too.
		for k, e := range a.entries {
			e.drop()
			if f := a.summaryLocked(k, e); f != nil {
				out = append(out, f)
			}
		}
		clear(a.entries)
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
