// Package creds holds the one credentials type every other package of
// imdsproxy passes around. It is a leaf: it imports nothing of the project.
//
// The type is built so that secrets cannot leak by accident: String, GoString,
// Format (every verb) and the zap ObjectMarshaler print only the access key id,
// the account, the role ARN and the expiry, never the secret access key or the
// session token. Code that really needs a secret (the IMDS credential document)
// reads the fields directly.
package creds

import (
	"fmt"
	"strings"
	"time"

	"go.uber.org/zap/zapcore"
)

// Credentials is one set of temporary AWS credentials plus what is known about
// the identity behind them. The zero value is "no credentials". Values are
// immutable by convention and safe to share between goroutines.
type Credentials struct {
	// AccessKeyID is the access key id (ASIA… for temporary credentials). Not secret.
	AccessKeyID string
	// SecretAccessKey is the secret key. Never log it.
	SecretAccessKey string
	// SessionToken is the session token. Never log it.
	SessionToken string
	// Expires is when the credentials stop working (UTC or any zone).
	Expires time.Time
	// LastUpdated is when the credentials were obtained from upstream.
	LastUpdated time.Time
	// AccountID is the 12-digit account the role lives in, "" when unknown.
	AccountID string
	// RoleARN is the ARN of the assumed role (or the assumed-role session ARN), "" when unknown.
	RoleARN string
	// Source names where the credentials came from, for example "web-identity".
	Source string
}

// IsZero reports whether c holds no credentials at all.
func (c Credentials) IsZero() bool {
	return c.AccessKeyID == "" && c.SecretAccessKey == "" && c.SessionToken == ""
}

// Complete reports whether every field an SDK needs is present.
func (c Credentials) Complete() bool {
	return c.AccessKeyID != "" && c.SecretAccessKey != "" && c.SessionToken != "" && !c.Expires.IsZero()
}

// ValidAt reports whether the credentials are complete and still valid at now.
func (c Credentials) ValidAt(now time.Time) bool {
	return c.Complete() && now.Before(c.Expires)
}

// Remaining returns how long the credentials are valid after now (negative
// once expired).
func (c Credentials) Remaining(now time.Time) time.Duration {
	return c.Expires.Sub(now)
}

// String prints a redacted form: key id, account, role and expiry only.
func (c Credentials) String() string {
	return fmt.Sprintf("Credentials{AccessKeyID:%s Account:%s Role:%s Expires:%s Secret:%s Token:%s}",
		c.AccessKeyID, c.AccountID, c.RoleARN, c.Expires.UTC().Format(time.RFC3339),
		redacted(c.SecretAccessKey), redacted(c.SessionToken))
}

// GoString is the redacted form for %#v.
func (c Credentials) GoString() string { return c.String() }

// Format makes every fmt verb (%v, %+v, %#v, %s, %q, …) print the redacted form.
func (c Credentials) Format(f fmt.State, verb rune) {
	s := c.String()
	if verb == 'q' {
		s = fmt.Sprintf("%q", s)
	}
	_, _ = f.Write([]byte(s))
}

// MarshalLogObject writes the redacted form to a zap log line.
func (c Credentials) MarshalLogObject(enc zapcore.ObjectEncoder) error {
	enc.AddString("access_key_id", c.AccessKeyID)
	if c.AccountID != "" {
		enc.AddString("account_id", c.AccountID)
	}
	if c.RoleARN != "" {
		enc.AddString("role_arn", c.RoleARN)
	}
	if !c.Expires.IsZero() {
		enc.AddTime("expires", c.Expires.UTC())
	}
	if c.Source != "" {
		enc.AddString("source", c.Source)
	}
	return nil
}

func redacted(s string) string {
	if s == "" {
		return "<empty>"
	}
	return "<redacted>"
}

// AccountFromARN returns the account id (field 5) of an ARN such as
// arn:aws:sts::123456789012:assumed-role/app/session, or "" when the ARN is
// malformed or the field is not twelve digits.
func AccountFromARN(arn string) string {
	parts := strings.SplitN(arn, ":", 6)
	if len(parts) < 6 || parts[0] != "arn" {
		return ""
	}
	acct := parts[4]
	if len(acct) != 12 {
		return ""
	}
	for _, r := range acct {
		if r < '0' || r > '9' {
			return ""
		}
	}
	return acct
}
