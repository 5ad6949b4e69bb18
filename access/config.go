package access

import (
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/imdsproxy/imdsproxy/config"
	"github.com/imdsproxy/imdsproxy/creds"
)

// Section is the `access:` section: which local processes may read
// credentials, and the audit log. docs/configuration.md, "Access control".
type Section struct {
	// AllowUIDs and AllowUnits, when either is set, admit only clients
	// whose uid is in AllowUIDs or whose systemd unit is in AllowUnits (and
	// the workloads, which are an allow of their own).
	AllowUIDs  []int    `yaml:"allow_uids"`
	AllowUnits []string `yaml:"allow_units"`
	// DenyUIDs refuses these uids whatever the allow lists say.
	DenyUIDs []int `yaml:"deny_uids"`
	// Audit logs the credential hand-outs with the client process. Nil
	// means true. With no lists, no workloads and audit false, clients
	// are not identified at all (no lookup cost).
	Audit *bool `yaml:"audit"`
}

// MaxUID is the largest valid uid ((uid_t)-1 is "no uid").
const MaxUID = 1<<32 - 2

// Validate checks the section; every error names the key.
func (c *Section) Validate() error {
	for _, l := range []struct {
		key  string
		list []int
	}{{"allow_uids", c.AllowUIDs}, {"deny_uids", c.DenyUIDs}} {
		for i, u := range l.list {
			if u < 0 || u > MaxUID {
				return fmt.Errorf("config: access.%s[%d]: %d is not a uid (0..%d)", l.key, i, u, MaxUID)
			}
		}
	}
	for i, u := range c.AllowUnits {
		if !IsUnitName(u) {
			return fmt.Errorf("config: access.allow_units[%d]: %q is not a systemd unit name such as app.service or run-1.scope", i, u)
		}
	}
	return nil
}

// Restricted reports whether any list is set.
func (c Section) Restricted() bool {
	return len(c.AllowUIDs)+len(c.AllowUnits)+len(c.DenyUIDs) > 0
}

// AuditOn reports whether hand-outs are audited (Audit unset or true).
func (c Section) AuditOn() bool { return c.Audit == nil || *c.Audit }

// IsUnitName reports whether u looks like the name of a systemd service or
// scope unit, as package peer reports it.
func IsUnitName(u string) bool {
	return !strings.ContainsAny(u, "/ \t\n\x00") &&
		(len(u) > len(".service") && strings.HasSuffix(u, ".service") || len(u) > len(".scope") && strings.HasSuffix(u, ".scope"))
}

// Workload is one entry of the `workloads:` list: the processes of a
// systemd unit, or of a uid, served a role of their own instead of role:.
// docs/configuration.md, "Workloads".
type Workload struct {
	// Unit matches the processes of this systemd unit (*.service, *.scope).
	Unit string `yaml:"unit"`
	// UID matches the processes of this uid. Exactly one of Unit and UID.
	UID *int `yaml:"uid"`
	// Role is the workload's role; session_name defaults to the host's
	// session name, duration to DefaultWorkloadDuration.
	Role config.Role `yaml:"role"`
	// Subject is the workload's own identity: the role is assumed with a
	// token minted for this subject (identity.jwt_url asks the issuer for
	// it, identity.jwt_command gets it in IMDSPROXY_WORKLOAD), so the
	// role's trust policy can name exactly this workload. "" uses the
	// host's token.
	Subject string `yaml:"subject"`
}

// Key is the cache key of w's credentials, its role fetched through via
// with session as the session name when the role names none.
func (w Workload) Key(session string, via creds.Fetcher) creds.Key {
	r := w.Role.Creds(session)
	r.Subject = w.Subject
	return creds.Key{Kind: creds.KindWorkload, Role: r, Via: via}
}

// ID names the entry by what it matches, stably across reloads: its unit
// ("app.service"), or "uid:<n>". Front doors that hand a workload a
// credential of their own (the container endpoint's token) key it by ID.
func (w Workload) ID() string {
	if w.UID != nil {
		return "uid:" + strconv.Itoa(*w.UID)
	}
	return w.Unit
}

// MaxWorkloads bounds the workloads: list (each is a cache key, a metric
// label value and an upstream exchange per refresh).
const MaxWorkloads = 64

// DefaultWorkloadDuration is a workload role's duration when not set.
const DefaultWorkloadDuration = time.Hour

// ValidateWorkloads checks the workloads: list and fills the role defaults.
// hostRole is role.name (no workload may reuse it); margin is
// cache.expiry_margin, which must be less than half of every duration.
// Every error names the key.
func ValidateWorkloads(list []Workload, hostRole string, margin time.Duration) error {
	if len(list) > MaxWorkloads {
		return fmt.Errorf("config: workloads: %d entries, at most %d", len(list), MaxWorkloads)
	}
	names := map[string]string{hostRole: "role.name"}
	units := map[string]int{}
	uids := map[int]int{}
	subjects := map[string]int{}
	for i := range list {
		w := &list[i]
		key := fmt.Sprintf("workloads[%d]", i)
		switch {
		case w.Unit != "" && w.UID != nil:
			return fmt.Errorf("config: %s: set only one of unit and uid", key)
		case w.Unit == "" && w.UID == nil:
			return fmt.Errorf("config: %s: set one of unit (a systemd unit such as app.service) or uid", key)
		case w.Unit != "":
			if !IsUnitName(w.Unit) {
				return fmt.Errorf("config: %s.unit: %q is not a systemd unit name such as app.service or run-1.scope", key, w.Unit)
			}
			if j, dup := units[w.Unit]; dup {
				return fmt.Errorf("config: %s.unit: %s is already matched by workloads[%d]", key, w.Unit, j)
			}
			units[w.Unit] = i
		default:
			u := *w.UID
			if u < 0 || u > MaxUID {
				return fmt.Errorf("config: %s.uid: %d is not a uid (0..%d)", key, u, MaxUID)
			}
			if j, dup := uids[u]; dup {
				return fmt.Errorf("config: %s.uid: %d is already matched by workloads[%d]", key, u, j)
			}
			uids[u] = i
		}
		if w.Subject != "" {
			if !creds.ValidSubject(w.Subject) {
				return fmt.Errorf("config: %s.subject: %q is not a subject: 1..%d letters, digits or ._:@/+=-, starting with a letter or digit", key, w.Subject, creds.MaxSubject)
			}
			if j, dup := subjects[w.Subject]; dup {
				return fmt.Errorf("config: %s.subject: %s is already the subject of workloads[%d] (each workload's role trusts its own subject)", key, w.Subject, j)
			}
			subjects[w.Subject] = i
		}
		if err := w.Role.Validate(key+".role", false, DefaultWorkloadDuration); err != nil {
			return err
		}
		if margin >= w.Role.Duration.D()/2 {
			return fmt.Errorf("config: %s.role.duration: cache.expiry_margin %s must be less than half of it", key, margin)
		}
		if other, dup := names[w.Role.Name]; dup {
			return fmt.Errorf("config: %s.role.name: %q is already used by %s (role names are listed under security-credentials/ and key the cache, so they must be unique; set role.name)", key, w.Role.Name, other)
		}
		names[w.Role.Name] = key + ".role.name"
	}
	return nil
}
