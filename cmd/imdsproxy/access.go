package main

import (
	"context"
	"fmt"
	"net"
	"strings"

	"github.com/imdsproxy/imdsproxy/peer"
	"github.com/imdsproxy/imdsproxy/proxy"
)

// AccessConfig is the `access:` section: which local processes may read
// credentials, and the audit log. docs/configuration.md, "Access control".
type AccessConfig struct {
	// AllowUIDs and AllowUnits, when either is set, admit only peers whose
	// uid is in AllowUIDs or whose systemd unit is in AllowUnits.
	AllowUIDs  []int    `yaml:"allow_uids"`
	AllowUnits []string `yaml:"allow_units"`
	// DenyUIDs refuses these uids whatever the allow lists say.
	DenyUIDs []int `yaml:"deny_uids"`
	// Audit logs one line per credential hand-out naming the client
	// process. Nil means true. With no lists and audit false, clients are
	// not identified at all (today's behaviour, no lookup cost).
	Audit *bool `yaml:"audit"`
}

// maxUID is the largest valid uid ((uid_t)-1 is "no uid").
const maxUID = 1<<32 - 2

// validateAccess checks the access: section; every error names the key.
func (c *Config) validateAccess() error {
	a := &c.Access
	for key, list := range map[string][]int{"allow_uids": a.AllowUIDs, "deny_uids": a.DenyUIDs} {
		for i, u := range list {
			if u < 0 || u > maxUID {
				return fmt.Errorf("config: access.%s[%d]: %d is not a uid (0..%d)", key, i, u, maxUID)
			}
		}
	}
	for i, u := range a.AllowUnits {
		if !isUnitName(u) {
			return fmt.Errorf("config: access.allow_units[%d]: %q is not a systemd unit name such as app.service or run-1.scope", i, u)
		}
	}
	return nil
}

// isUnitName reports whether u looks like the name of a systemd service or
// scope unit, as package peer reports it.
func isUnitName(u string) bool {
	return !strings.ContainsAny(u, "/ \t\n\x00") &&
		(len(u) > len(".service") && strings.HasSuffix(u, ".service") || len(u) > len(".scope") && strings.HasSuffix(u, ".scope"))
}

// restricted reports whether any list is set.
func (a AccessConfig) restricted() bool {
	return len(a.AllowUIDs)+len(a.AllowUnits)+len(a.DenyUIDs) > 0
}

// accessControl is the proxy's AccessControl for a, or nil when clients
// need not be identified (no lists, audit off).
func accessControl(a AccessConfig) proxy.AccessControl {
	if p := newAccessPolicy(a, nil, nil); p != nil {
		return p
	}
	return nil
}

// newAccessPolicy is the policy of a and the workload roles w (nil: none),
// or nil when clients need not be identified (no lists, audit off, no
// workloads).
func newAccessPolicy(a AccessConfig, w *workloadRoles, res *peer.Resolver) *accessPolicy {
	if w == nil && !a.restricted() && a.Audit != nil && !*a.Audit {
		return nil
	}
	if res == nil {
		res = peer.NewResolver(0)
	}
	p := &accessPolicy{
		res:        res,
		restricted: a.restricted(),
		allowAll:   len(a.AllowUIDs)+len(a.AllowUnits) == 0,
		allowUIDs:  set(a.AllowUIDs),
		denyUIDs:   set(a.DenyUIDs),
		allowUnits: set(a.AllowUnits),
		roles:      w,
	}
	if w != nil {
		p.active = w
	}
	return p
}

func set[T comparable](list []T) map[T]bool {
	m := make(map[T]bool, len(list))
	for _, v := range list {
		m[v] = true
	}
	return m
}

// accessPolicy implements proxy.AccessControl with a peer.Resolver and the
// lists of an AccessConfig, and with workloads proxy.RoleMapper. It is
// immutable; a reload builds a new one.
type accessPolicy struct {
	res        *peer.Resolver
	restricted bool // any list set
	allowAll   bool // no allow list set
	allowUIDs  map[int]bool
	denyUIDs   map[int]bool
	allowUnits map[string]bool
	roles      *workloadRoles // nil without workloads
	// active is the workloads' mapping in force, which Allow admits by
	// itself: roles, or under a rollout roles gated by its decision (set
	// by the daemon), so that a workload process is not admitted while the
	// host serves the instance profile. Nil without workloads.
	active proxy.RoleMapper
}

// Identify finds the process behind conn: its uid from the kernel, its pid,
// executable and unit best effort (see package peer).
func (p *accessPolicy) Identify(ctx context.Context, conn net.Conn) (proxy.Peer, error) {
	info, err := p.res.LookupConn(ctx, conn)
	if err != nil {
		return proxy.Peer{}, fmt.Errorf("access: identify %s: %w", conn.RemoteAddr(), err)
	}
	return proxy.Peer{Known: true, UID: info.UID, PID: info.PID, Exe: info.Exe, Unit: info.Unit, Cgroup: info.Cgroup, UnitUnknown: info.UnitUnknown}, nil
}

// Allow applies the lists: everyone when none is set; else an unidentified
// peer never, a denied uid never, and with allow lists only a listed uid or
// unit, or a workload (an entry of workloads: is an allow of its own; the
// allow lists decide who may read the host's role).
func (p *accessPolicy) Allow(who proxy.Peer) bool {
	switch {
	case !p.restricted:
		return true
	case !who.Known, p.denyUIDs[who.UID]:
		return false
	case p.allowAll:
		return true
	}
	if p.allowUIDs[who.UID] || (who.Unit != "" && p.allowUnits[who.Unit]) {
		return true
	}
	if p.active == nil {
		return false
	}
	_, workload := p.active.RoleFor(who)
	return workload
}

// RoleFor implements proxy.RoleMapper with the workloads: list.
func (p *accessPolicy) RoleFor(who proxy.Peer) (string, bool) {
	if p.roles == nil {
		return "", false
	}
	return p.roles.RoleFor(who)
}
