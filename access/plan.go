// Package access decides, for each client process, whether it may read
// credentials and which role's: the `access:` lists, the `workloads:`
// mapping and what the host serves now (its own role, or the instance
// profile's under a rollout) combined into one immutable Plan per
// configuration generation. Every front door (the IMDS listener, and any
// other) asks the same Plan and serves through the same Broker, so one
// decision is taken per request, in one place, and passed down.
//
// A Plan is built whole (NewPlan), validated, and published by the daemon
// with one atomic pointer swap; a request loads it once. Decide and
// DecideName are pure and cheap (map lookups), safe for concurrent use.
//
// # Consistency across a switch
//
// An SDK reads credentials in several requests (PUT token, GET the role
// listing, optionally GET iam/info, GET the credentials of the listed
// name). When the decision changes between two of them (a reload, a rollout
// stage change), the client must see the old answer or the new one for the
// role it listed, never the listing of one role and the credentials of
// another. The rule: a Plan keeps the plans it replaced for Grace after
// they were replaced, and
//
//   - a request carrying the generation it started under (the IMDSv2
//     session token records the generation it was minted in) is answered by
//     that generation's plan while it is retained, so listing, iam/info and
//     credentials of one SDK fetch agree;
//   - a credential request naming a role that the current plan does not
//     list for the client is answered with the credentials that name stood
//     for, for this client, in the newest retained plan that listed it;
//   - whether the client may read credentials at all is always decided by
//     the current plan: a deny or a removed allow takes effect at once.
//
// After Grace an old name is a 404, like any unknown role.
package access

import (
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/imdsproxy/imdsproxy/creds"
	"github.com/imdsproxy/imdsproxy/peer"
)

// Grace is how long a replaced plan still answers the requests that started
// under it (see the package doc). An SDK's whole credential fetch takes well
// under a second; Grace covers a host so loaded that it takes much longer,
// and bounds how long a client may keep getting the role it was listed
// before a change.
const Grace = 10 * time.Second

// maxRetired bounds the replaced plans kept (a reload storm).
const maxRetired = 8

// Client is the process at the other end of a request, as far as the front
// door could tell. The zero Client is one that was not identified because
// the plan did not ask for it (Plan.Identify false), or that is not a
// process of this host (another host or network namespace).
type Client struct {
	// Local reports that the client was identified as a process of this
	// host; Info is then set.
	Local bool
	// Unresolved reports that the client may be a process of this host but
	// could not be identified in time: nothing that depends on who it is
	// can be decided, so such a client is told to retry (Retry), never
	// given the host's role or a denial it might not deserve.
	Unresolved bool
	peer.Info
	// slot is the audit's memo of the connection this Client was found
	// on (ConnClient), nil for a Client built otherwise.
	slot *auditSlot
}

// Outcome is what a Decision tells the front door to do.
type Outcome int

const (
	// Serve: hand out the credentials of Key (or Fallback).
	Serve Outcome = iota
	// Deny: the client may not read credentials (HTTP 403).
	Deny
	// Retry: the client could not be identified well enough to decide; it
	// should retry (HTTP 503). Counted; never the host's role.
	Retry
)

// Decision is the outcome of a Plan for one client. It is a value; front
// doors pass it down as is.
type Decision struct {
	Outcome Outcome
	// Name is the role name listed to the client and answered under
	// security-credentials/<Name>.
	Name string
	// Key is the credentials served.
	Key creds.Key
	// Fallback, when not zero, is served instead when Key has nothing
	// valid (rollout.fallback: instance-profile).
	Fallback creds.Key
	// Host reports that Key is the host's own role (not a workload's).
	Host bool
	// Audit reports that the hand-out is to be audited.
	Audit bool
	// Gen is the generation of the plan that decided.
	Gen uint32
	// At is the time given to Decide or DecideName. The broker measures
	// from it whether a hand-out waited on a fetch, and stamps the audit
	// with it (zero: the broker reads the clock).
	At time.Time
	// Why says why a Deny or Retry, for the debug log and metrics: a short
	// snake_case reason.
	Why string
}

// PlanConfig is everything a Plan is built from.
type PlanConfig struct {
	// Access is the validated access: section.
	Access Section
	// Workloads is the validated workloads: list, and WorkloadKeys the key
	// of each entry's role (same length, same order).
	Workloads    []Workload
	WorkloadKeys []creds.Key
	// Host is the key of the host's own role (role.name): served to every
	// client no workload matches. Required.
	Host creds.Key
	// InstanceProfile is the key of the instance profile's role; zero when
	// the daemon does not serve it.
	InstanceProfile creds.Key
	// Serve is what the host serves now: creds.KindWorkload (Host and the
	// workloads' roles), or creds.KindInstanceProfile (InstanceProfile to
	// every client: a rollout off or in shadow).
	Serve creds.Kind
	// Fallback serves InstanceProfile when a workload-kind key has nothing
	// valid (rollout.fallback: instance-profile).
	Fallback bool
	// Passthrough is what is refused on the pass-through to the real IMDS.
	Passthrough Protection
}

// Plan is one generation's decision state. It is immutable; build it with
// NewPlan.
type Plan struct {
	gen        uint32
	restricted bool // any access list set
	allowAll   bool // no allow list set
	allowUIDs  map[int]bool
	denyUIDs   map[int]bool
	allowUnits map[string]bool
	audit      bool
	identify   bool
	decides    bool // decisions depend on the client (access lists, workloads)

	byUnit  map[string]int // unit → workload index
	byUID   map[int]int    // uid → workload index
	byID    map[string]int // Workload.ID → workload index
	wlKeys  []creds.Key
	unitsOn bool // some workload entry matches by unit

	serve    creds.Kind
	host     creds.Key
	profile  creds.Key
	fallback bool

	passthrough Protection

	retired []retired // newest first
}

type retired struct {
	plan  *Plan // with retired nil
	until time.Time
}

// NewPlan validates cfg and builds its plan. prev is the plan it replaces
// (nil for the first): its generation is one more than prev's, and it keeps
// prev and prev's retained plans until Grace after now.
func NewPlan(cfg PlanConfig, prev *Plan, now time.Time) (*Plan, error) {
	if cfg.Host.IsZero() || !creds.ValidRoleName(cfg.Host.Role.Name) {
		return nil, errors.New("access: plan without a valid host role")
	}
	if len(cfg.WorkloadKeys) != len(cfg.Workloads) {
		return nil, fmt.Errorf("access: %d workloads but %d workload keys", len(cfg.Workloads), len(cfg.WorkloadKeys))
	}
	switch cfg.Serve {
	case creds.KindWorkload:
	case creds.KindInstanceProfile:
		if cfg.InstanceProfile.IsZero() {
			return nil, errors.New("access: serving the instance profile needs its key")
		}
	default:
		return nil, fmt.Errorf("access: unknown kind %q to serve", cfg.Serve)
	}
	if cfg.Fallback && cfg.InstanceProfile.IsZero() {
		return nil, errors.New("access: the instance-profile fallback needs its key")
	}
	a := cfg.Access
	p := &Plan{
		restricted: a.Restricted(),
		allowAll:   len(a.AllowUIDs)+len(a.AllowUnits) == 0,
		allowUIDs:  set(a.AllowUIDs),
		denyUIDs:   set(a.DenyUIDs),
		allowUnits: set(a.AllowUnits),
		audit:      a.AuditOn(),
		byUnit:     map[string]int{},
		byUID:      map[int]int{},
		byID:       map[string]int{},
		wlKeys:     slices.Clone(cfg.WorkloadKeys),
		serve:      cfg.Serve,
		host:       cfg.Host,
		profile:    cfg.InstanceProfile,
		fallback:   cfg.Fallback,

		passthrough: cfg.Passthrough,
	}
	for i, w := range cfg.Workloads {
		if k := cfg.WorkloadKeys[i]; k.IsZero() || !creds.ValidRoleName(k.Role.Name) {
			return nil, fmt.Errorf("access: workloads[%d] has no valid key", i)
		}
		p.byID[w.ID()] = i
		if w.UID != nil {
			p.byUID[*w.UID] = i
		} else {
			p.byUnit[w.Unit] = i
			p.unitsOn = true
		}
	}
	p.decides = p.restricted || len(p.wlKeys) > 0
	p.identify = p.decides || p.audit || len(p.passthrough.Prefixes) > 0
	if prev != nil {
		p.gen = prev.gen + 1
		if p.gen == 0 {
			p.gen = 1 // 0 means "no generation" in tokens
		}
		old := *prev
		old.retired = nil
		p.retired = append(p.retired, retired{plan: &old, until: now.Add(Grace)})
		for _, r := range prev.retired {
			if now.Before(r.until) && len(p.retired) < maxRetired {
				p.retired = append(p.retired, r)
			}
		}
	} else {
		p.gen = 1
	}
	// A retained plan that tells clients apart must see them as they are
	// for as long as it answers.
	for _, r := range p.retired {
		p.identify = p.identify || r.plan.identify
		p.decides = p.decides || r.plan.decides
	}
	return p, nil
}

func set[T comparable](list []T) map[T]bool {
	m := make(map[T]bool, len(list))
	for _, v := range list {
		m[v] = true
	}
	return m
}

// Gen returns the plan's generation (1 for the first, then one more per
// plan; never 0).
func (p *Plan) Gen() uint32 { return p.gen }

// Identify reports whether clients must be identified for this plan (access
// lists, the audit or workloads, its own or a retained plan's); without, the
// zero Client is passed.
func (p *Plan) Identify() bool { return p.identify }

// Decides reports whether Decide and DecideName depend on the client (access
// lists or workloads, its own or a retained plan's). When they do not, a
// request that hands nothing out (the role listing, iam/info) needs no
// identification even with the audit on: the zero Client gets the same
// decision.
func (p *Plan) Decides() bool { return p.decides }

// Audit reports whether hand-outs are audited (access.audit): the audit
// line names the client's pid and executable, which cost more to find than
// what decisions need.
func (p *Plan) Audit() bool { return p.audit }

// Passthrough is what the plan refuses on the pass-through (the current
// plan's always: a path refused now is refused at once).
func (p *Plan) Passthrough() Protection { return p.passthrough }

// Serving returns the kind the host serves.
func (p *Plan) Serving() creds.Kind { return p.serve }

// HostKey returns the key of the host's own role.
func (p *Plan) HostKey() creds.Key { return p.host }

// Keys returns every key this plan may serve at now, its retained plans'
// included: the keys to keep fresh. The host's role and the workloads'
// when serving the workload kind (and the instance profile's with the
// fallback); the instance profile's when serving it.
func (p *Plan) Keys(now time.Time) []creds.Key {
	var out []creds.Key
	add := func(k creds.Key) {
		if !k.IsZero() && !slices.Contains(out, k) {
			out = append(out, k)
		}
	}
	for _, q := range p.chain(now) {
		if q.serve == creds.KindInstanceProfile {
			add(q.profile)
			continue
		}
		add(q.host)
		for _, k := range q.wlKeys {
			add(k)
		}
		if q.fallback {
			add(q.profile)
		}
	}
	return out
}

// GraceEnds returns when the oldest retained plan stops being answered
// (zero when none is retained): Keys changes then.
func (p *Plan) GraceEnds() time.Time {
	var t time.Time
	for _, r := range p.retired {
		if r.until.After(t) {
			t = r.until
		}
	}
	return t
}

// chain is p and its plans retained at now, newest first.
func (p *Plan) chain(now time.Time) []*Plan {
	out := []*Plan{p}
	for _, r := range p.retired {
		if now.Before(r.until) {
			out = append(out, r.plan)
		}
	}
	return out
}

// Decide decides for c on a credential request that names no role (the
// role listing, iam/info). pin is the generation the request's session
// started under (0: none): a plan of that generation still retained at now
// decides the role, so the steps of one SDK fetch agree; whether c may read
// credentials at all is always the current plan's decision.
func (p *Plan) Decide(c Client, pin uint32, now time.Time) Decision {
	d := p.decide(c)
	d.At = now
	if d.Outcome != Serve || pin == 0 || pin == p.gen {
		return d
	}
	for _, q := range p.chain(now)[1:] {
		if q.gen == pin {
			if od := q.decide(c); od.Outcome == Serve {
				od.Audit, od.At = d.Audit, now
				return od
			}
			break
		}
	}
	return d
}

// DecideName decides for c on a request for the credentials of name, and
// reports whether name is answered for c: the name Decide lists to it, or a
// name a retained plan listed to it (answered with what it stood for then).
// A Deny or Retry outcome is returned with true whatever the name.
func (p *Plan) DecideName(c Client, pin uint32, name string, now time.Time) (Decision, bool) {
	d := p.Decide(c, pin, now)
	if d.Outcome != Serve || d.Name == name {
		return d, true
	}
	for _, q := range p.chain(now) {
		if od := q.decide(c); od.Outcome == Serve && od.Name == name {
			od.Audit, od.At = d.Audit, now
			return od, true
		}
	}
	return d, false
}

// DecideWorkload decides for c on a request that authenticated as the
// workload id (Workload.ID) with a credential of the front door's own, such
// as the container endpoint's authorization token. The current plan
// decides (there is no session to pin).
//
//   - id is no workload of the plan: Deny (not_a_workload).
//   - c is a process of this host: the plan decides for c as for any
//     request (access lists, workloads), and the decision must name the
//     credentials id stands for: a token presented by another process (a
//     stolen token file) is refused (Deny, peer_mismatch).
//   - c could not be identified in time: Retry.
//   - c is not a process of this host (a container on a bridge, in
//     another network namespace): the token is its identity and it is
//     served what id stands for.
//
// What id stands for is its role's key while the host serves the workload
// kind, and the instance profile's (to everyone) while it serves that.
func (p *Plan) DecideWorkload(id string, c Client) Decision {
	i, ok := p.byID[id]
	if !ok {
		return Decision{Outcome: Deny, Why: whyNotWorkload, Gen: p.gen, Audit: p.audit}
	}
	want := Decision{Outcome: Serve, Gen: p.gen, Audit: p.audit}
	if p.serve == creds.KindInstanceProfile {
		want.Key, want.Host = p.profile, true
	} else {
		want.Key = p.wlKeys[i]
		if p.fallback {
			want.Fallback = p.profile
		}
	}
	want.Name = want.Key.Role.Name
	if !c.Local && !c.Unresolved {
		return want
	}
	d := p.decide(c)
	switch {
	case d.Outcome != Serve:
		return d
	case d.Key != want.Key:
		return Decision{Outcome: Deny, Why: whyPeerMismatch, Gen: p.gen, Audit: p.audit}
	}
	return d
}

// decide is p's own decision for c, without retained plans.
func (p *Plan) decide(c Client) Decision {
	d := Decision{Gen: p.gen, Audit: p.audit}
	match, workload, unsure := p.workload(c)
	if why, ok := p.allow(c, workload, unsure); !ok {
		d.Outcome, d.Why = Deny, why
		if why == whyUnresolved {
			d.Outcome = Retry
		}
		return d
	}
	switch {
	case p.serve == creds.KindInstanceProfile:
		d.Name, d.Key, d.Host = p.profile.Role.Name, p.profile, true
		return d
	case unsure:
		// A workload entry might match it: never the host's role.
		d.Outcome, d.Why = Retry, whyUnresolved
		return d
	case workload:
		d.Key = p.wlKeys[match]
	default:
		d.Key, d.Host = p.host, true
	}
	d.Name = d.Key.Role.Name
	if p.fallback {
		d.Fallback = p.profile
	}
	return d
}

// Reasons of Deny and Retry decisions.
const (
	whyUnresolved = "unresolved"  // identification failed or timed out, or the unit could not be told
	whyNotLocal   = "not_local"   // not a process of this host, with access lists set
	whyDeniedUID  = "denied_uid"  // in access.deny_uids
	whyNotAllowed = "not_allowed" // on no allow list and not a workload
	// DecideWorkload only:
	whyNotWorkload  = "not_a_workload" // the front door's credential names no workload of the plan
	whyPeerMismatch = "peer_mismatch"  // the process presenting it is not that workload's
)

// workload returns the index of c's workload entry when it has one, and
// whether c is one of the workloads' processes; unsure reports that an
// entry might match but c could not be identified well enough to tell.
// Workloads matter only while the host serves the workload kind.
func (p *Plan) workload(c Client) (idx int, ok, unsure bool) {
	if p.serve != creds.KindWorkload || len(p.wlKeys) == 0 {
		return 0, false, false
	}
	switch {
	case c.Unresolved:
		return 0, false, true
	case !c.Local:
		return 0, false, false // another host or network namespace: no entry can match it
	case c.UnitUnknown && p.unitsOn:
		// A unit entry might match, and a uid match could hand it another
		// workload's role: decide nothing.
		return 0, false, true
	}
	i, ok := p.byUID[c.UID]
	if c.Unit != "" {
		if j, unitOK := p.byUnit[c.Unit]; unitOK && (!ok || j < i) {
			i, ok = j, true
		}
	}
	return i, ok, false
}

// allow applies the access lists: everyone when none is set; else never a
// client that is not local or a denied uid, and with allow lists only a
// listed uid or unit, or a workload of the mapping in force.
func (p *Plan) allow(c Client, workload, unsure bool) (why string, ok bool) {
	switch {
	case !p.restricted:
		return "", true
	case c.Unresolved:
		return whyUnresolved, false
	case !c.Local:
		return whyNotLocal, false
	case p.denyUIDs[c.UID]:
		return whyDeniedUID, false
	case p.allowAll, p.allowUIDs[c.UID], c.Unit != "" && p.allowUnits[c.Unit], workload:
		return "", true
	case unsure, c.UnitUnknown && len(p.allowUnits) > 0:
		return whyUnresolved, false
	}
	return whyNotAllowed, false
}
