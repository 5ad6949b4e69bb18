package exchange

import (
	"os"
	"strings"
)

// Session name limits of STS (RoleSessionName).
const (
	minSessionName = 2
	maxSessionName = 64
	// sessionNamePrefix pads names shorter than minSessionName and is the
	// name of last resort.
	sessionNamePrefix = "imdsproxy"
)

// SessionName resolves the RoleSessionName: configured when it is not blank;
// else the instance id (as read from the instance metadata service by the
// caller, "" when unknown); else the host name; else "imdsproxy". The result
// is always passed through SanitizeSessionName. SessionName never fails.
func SessionName(configured, instanceID string) string {
	for _, s := range []string{configured, instanceID} {
		if strings.TrimSpace(s) != "" {
			return SanitizeSessionName(s)
		}
	}
	if h, err := os.Hostname(); err == nil && strings.TrimSpace(h) != "" {
		return SanitizeSessionName(h)
	}
	return sessionNamePrefix
}

// SanitizeSessionName makes s acceptable to STS as a RoleSessionName:
// surrounding whitespace is trimmed, every character outside IAM's
// [A-Za-z0-9_+=,.@-] (what config accepts as role.session_name) becomes '-', the result is cut to 64 bytes, and a result shorter than 2
// bytes is prefixed with "imdsproxy-" (an empty one becomes "imdsproxy").
// A valid name is returned unchanged.
func SanitizeSessionName(s string) string {
	s = strings.TrimSpace(s)
	var b strings.Builder
	for _, r := range s {
		if b.Len() >= maxSessionName {
			break
		}
		if sessionNameChar(r) {
			b.WriteRune(r)
		} else {
			b.WriteByte('-')
		}
	}
	out := b.String()
	switch {
	case out == "":
		return sessionNamePrefix
	case len(out) < minSessionName:
		return sessionNamePrefix + "-" + out
	}
	return out
}

func sessionNameChar(r rune) bool {
	switch {
	case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9':
		return true
	}
	return strings.ContainsRune("_+=,.@-", r)
}
