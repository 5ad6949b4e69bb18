package creds

import (
	"context"
	"errors"
	"regexp"
	"strings"
	"time"
)

// Kind is a kind of credentials a host can serve.
type Kind string

// The kinds of credentials.
const (
	// KindWorkload is a workload role's credentials, exchanged from the
	// host's identity (web identity, federation, Roles Anywhere, assume-role).
	KindWorkload Kind = "workload"
	// KindInstanceProfile is the instance profile's credentials, as the real
	// IMDS hands them out.
	KindInstanceProfile Kind = "instance-profile"
)

// Role is everything an exchange needs to know of the role it fetches
// credentials for. It is comparable, so it can be part of a cache key: two
// Roles that differ in any field are different credentials.
type Role struct {
	// Name is the name listed under security-credentials/ (an IAM role
	// name, 1..64 of [A-Za-z0-9+=,.@_-]).
	Name string
	// ARN is the role's ARN; "" for the instance profile's role, which the
	// real IMDS names.
	ARN string
	// SessionName is the RoleSessionName; "" where the source chooses.
	SessionName string
	// Duration is the session duration asked for; 0 lets the service
	// choose.
	Duration time.Duration
	// Subject is the workload subject of the identity token the role is
	// assumed with (workloads[].subject: the "sub" an issuer mints for the
	// workload, which the role's trust policy names); "" is the host's
	// default token. Only web identity uses it.
	Subject string
}

// MaxSubject is the longest workload subject, in bytes.
const MaxSubject = 128

var subjectRe = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._:@/+=-]*$`)

// ValidSubject reports whether s is a valid workload subject: 1..MaxSubject
// ASCII letters, digits and "._:@/+=-", starting with a letter or digit.
// Such a subject is safe in an environment variable, a command line, a JSON
// string and a JWT "sub" claim; the daemon and the issuer apply this rule.
func ValidSubject(s string) bool { return len(s) <= MaxSubject && subjectRe.MatchString(s) }

// ValidRoleName reports whether s is a valid IAM role name: 1..64 of
// [A-Za-z0-9+=,.@_-]. Such a name is safe in a URL path and a header.
func ValidRoleName(s string) bool { return iamName(s, 1, 64) }

// ValidSessionName reports whether s is a valid STS role session name:
// 2..64 of [A-Za-z0-9+=,.@_-].
func ValidSessionName(s string) bool { return iamName(s, 2, 64) }

// iamName reports whether s is least..most bytes of IAM's name characters,
// [\w+=,.@-]. (Written out rather than a regular expression: a counted
// repetition compiles to a program of 27 KB that every GC cycle marks.)
func iamName(s string, least, most int) bool {
	if len(s) < least || len(s) > most {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || strings.IndexByte("_+=,.@-", c) >= 0) {
			return false
		}
	}
	return true
}

// Fetcher obtains fresh credentials for a role from upstream: an exchange
// source (STS web identity, Roles Anywhere, the instance profile, …). It must
// honour ctx, be safe for concurrent use, use the role it is handed (never a
// role of its own choosing) and never put a secret into its error. Errors may
// carry ErrorClass and Permanent (see Classify).
type Fetcher interface {
	Fetch(ctx context.Context, role Role) (Credentials, error)
}

// Key names one set of credentials the daemon keeps: its kind, its role, and
// the source that fetches it. Keys are comparable values; two keys with
// different sources are different entries, so a reload that changes the
// host's identity never mixes credentials of the old and the new source.
// Via must be a pointer (or another comparable value): Keys are map keys.
type Key struct {
	Kind Kind
	Role Role
	Via  Fetcher
}

// String names the key for logs, metrics and /debug/cache: the role name
// for the workload kind, instance-profile/<name> for the instance profile.
// A role name cannot hold '/', so the two never collide.
func (k Key) String() string {
	if k.Kind == KindInstanceProfile {
		return string(k.Kind) + "/" + k.Role.Name
	}
	return k.Role.Name
}

// IsZero reports whether k names nothing.
func (k Key) IsZero() bool { return k == Key{} }

// Fetch fetches k's credentials through its source. It is the one fetcher
// of every Key: the decision that chose the key chose the source too.
func (k Key) Fetch(ctx context.Context) (Credentials, error) {
	if k.Via == nil {
		return Credentials{}, errors.New("creds: key " + k.String() + " has no source")
	}
	return k.Via.Fetch(ctx, k.Role)
}

// Classify returns the class and permanence of an error that crossed a
// package boundary (docs/architecture.md, "Error classification"): its
// ErrorClass() when it has one (found with errors.As), else "other"; its
// Permanent() when it has one, else false (retryable).
func Classify(err error) (class string, permanent bool) {
	class = "other"
	var ce interface{ ErrorClass() string }
	if errors.As(err, &ce) && ce.ErrorClass() != "" {
		class = ce.ErrorClass()
	}
	var pe interface{ Permanent() bool }
	if errors.As(err, &pe) {
		permanent = pe.Permanent()
	}
	return class, permanent
}
