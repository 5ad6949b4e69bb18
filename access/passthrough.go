package access

import (
	"fmt"
	"strings"
)

// PassthroughSection is the `imds.passthrough:` section: which metadata paths
// forwarded to the real IMDS are refused to which local processes.
//
// Identity material — the signed instance identity document and its
// signatures (dynamic/instance-identity/…) and the instance's own identity
// credentials (meta-data/identity-credentials/…) — proves to a token issuer
// that the caller is this host. With `identity: auto` (the default) it is
// refused to every client whenever the daemon itself proves the host's
// identity with it (identity.jwt_url) or clients are told apart (access:
// or workloads: is set): otherwise any local process, a refused one
// included, could trade it for the host's token. `identity: deny` refuses
// it always, `allow` never. Deny lists more paths refused the same way
// (user-data, say). AllowUIDs and AllowUnits name the processes that may
// still read everything refused here (an agent that needs the document).
type PassthroughSection struct {
	Identity   string   `yaml:"identity"`
	Deny       []string `yaml:"deny"`
	AllowUIDs  []int    `yaml:"allow_uids"`
	AllowUnits []string `yaml:"allow_units"`
}

// identityPaths are the identity material, relative to /<version>/.
var identityPaths = []string{"dynamic/instance-identity", "meta-data/identity-credentials"}

// Validate checks the section and fills its default; every error names the
// key.
func (s *PassthroughSection) Validate() error {
	switch s.Identity {
	case "":
		s.Identity = "auto"
	case "auto", "deny", "allow":
	default:
		return fmt.Errorf("config: imds.passthrough.identity: must be auto, deny or allow, got %q", s.Identity)
	}
	for i, p := range s.Deny {
		c := strings.Trim(p, "/")
		if c == "" || strings.ContainsAny(c, "?#%\\\x00") || strings.Contains("/"+c+"/", "/../") || strings.Contains("/"+c+"/", "/./") {
			return fmt.Errorf("config: imds.passthrough.deny[%d]: %q is not a metadata path such as user-data or meta-data/public-keys (relative to /latest/)", i, p)
		}
		s.Deny[i] = c
	}
	for i, u := range s.AllowUIDs {
		if u < 0 || u > MaxUID {
			return fmt.Errorf("config: imds.passthrough.allow_uids[%d]: %d is not a uid (0..%d)", i, u, MaxUID)
		}
	}
	for i, u := range s.AllowUnits {
		if !IsUnitName(u) {
			return fmt.Errorf("config: imds.passthrough.allow_units[%d]: %q is not a systemd unit name such as app.service", i, u)
		}
	}
	return nil
}

// Protection is what a plan refuses on the pass-through: resolved from a
// PassthroughSection and whether the daemon uses the instance identity.
type Protection struct {
	// Prefixes are the refused paths, relative to /<version>/, without
	// slashes at either end.
	Prefixes   []string
	allowUIDs  map[int]bool
	allowUnits map[string]bool
}

// Resolve turns the section into the Protection of a configuration: usesIdentity
// says whether the daemon proves the host's identity with the document, and
// tellsApart whether clients are told apart (access: or workloads: set).
func (s PassthroughSection) Resolve(usesIdentity, tellsApart bool) Protection {
	p := Protection{allowUIDs: set(s.AllowUIDs), allowUnits: set(s.AllowUnits)}
	if s.Identity == "deny" || (s.Identity != "allow" && (usesIdentity || tellsApart)) {
		p.Prefixes = append(p.Prefixes, identityPaths...)
	}
	p.Prefixes = append(p.Prefixes, s.Deny...)
	return p
}

// Protected reports whether the pass-through path (absolute, canonical) is
// refused to clients the protection does not allow.
func (p Protection) Protected(path string) bool {
	segs := strings.FieldsFunc(path, func(r rune) bool { return r == '/' }) // doubled slashes are one
	if len(segs) < 2 {
		return false
	}
	rest := strings.ToLower(strings.Join(segs[1:], "/"))
	for _, pre := range p.Prefixes {
		pre = strings.ToLower(pre)
		if rest == pre || strings.HasPrefix(rest, pre+"/") {
			return true
		}
	}
	return false
}

// AllowPath decides for c on a protected pass-through path: Serve for a
// client the protection allows, Retry when it could not be identified,
// Deny otherwise (403).
func (p Protection) AllowPath(c Client) Decision {
	switch {
	case c.Unresolved || c.Local && c.UnitUnknown && len(p.allowUnits) > 0 && !p.allowUIDs[c.UID]:
		return Decision{Outcome: Retry, Why: whyUnresolved}
	case c.Local && (p.allowUIDs[c.UID] || c.Unit != "" && p.allowUnits[c.Unit]):
		return Decision{Outcome: Serve}
	case !c.Local:
		return Decision{Outcome: Deny, Why: whyNotLocal}
	}
	return Decision{Outcome: Deny, Why: whyNotAllowed}
}
