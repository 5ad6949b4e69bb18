package exchange

import (
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/imdsproxy/imdsproxy/creds"
)

// durationTable remembers, per role, the duration to ask for: a role whose
// configured duration STS refused is asked for fallbackDuration from then on,
// until the exchange is rebuilt (restart, or a reload that changes the
// identity). The zero value is ready; safe for concurrent use. It holds one
// entry per role ever fetched (the roles of one configuration).
type durationTable struct {
	mu sync.Mutex
	m  map[creds.Role]*sessionDuration
}

// of returns role's sessionDuration.
func (t *durationTable) of(role creds.Role) *sessionDuration {
	t.mu.Lock()
	defer t.mu.Unlock()
	if d, ok := t.m[role]; ok {
		return d
	}
	if t.m == nil {
		t.m = map[creds.Role]*sessionDuration{}
	}
	d := &sessionDuration{want: role.Duration.Truncate(time.Second), arn: role.ARN}
	t.m[role] = d
	return d
}

// forget drops every cap: each role's configured duration is asked for again.
func (t *durationTable) forget() {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.m = nil
}

// fallbackDuration is asked for when the configured duration is longer than
// the role allows: every role's MaxSessionDuration is at least one hour, and
// role chaining allows one hour.
const fallbackDuration = time.Hour

// sessionDuration is the STS DurationSeconds to ask for: the configured
// duration (0: STS's default), or fallbackDuration from the moment STS
// refused the configured one as longer than the role allows. Safe for
// concurrent use.
type sessionDuration struct {
	arn    string // the role, for the log line
	want   time.Duration
	capped atomic.Bool
}

// get is the duration to request now.
func (d *sessionDuration) get() time.Duration {
	if d.capped.Load() {
		return fallbackDuration
	}
	return d.want
}

// refused reports whether err is STS refusing DurationSeconds as longer
// than the role's MaxSessionDuration (or the one hour of role chaining)
// while a shorter duration is still possible. Then it caps the duration for
// every later call and logs why, once.
func (d *sessionDuration) refused(err error, log *zap.Logger) bool {
	if d.capped.Load() || d.want <= fallbackDuration {
		return false
	}
	e := Classify(err)
	if e.Code != "ValidationError" ||
		!(strings.Contains(e.Message, "MaxSessionDuration") || strings.Contains(e.Message, "role chaining")) {
		return false
	}
	if d.capped.CompareAndSwap(false, true) {
		log.Warn("role.duration is longer than STS allows for this role (its MaxSessionDuration, or 1h for role chaining); asking for 1h instead until the next reload or restart (raise MaxSessionDuration or lower role.duration)",
			zap.String("role", d.arn), zap.Duration("configured", d.want), zap.Duration("using", fallbackDuration))
	}
	return true
}
