package proxy

import (
	"bytes"
	"crypto/sha256"
	"encoding/base32"
	"encoding/json"
	"strings"
	"time"

	"github.com/imdsproxy/imdsproxy/creds"
)

// imdsTimeLayout is the timestamp format of every IMDS document: UTC, whole
// seconds. time.Format drops the fraction, i.e. truncates (never rounds up).
const imdsTimeLayout = "2006-01-02T15:04:05Z"

func imdsTime(t time.Time) string { return t.UTC().Format(imdsTimeLayout) }

// field is one key of an IMDS JSON document.
type field struct{ key, value string }

// writeDocument renders fields the way EC2 does: one key per line, 2-space
// indentation, a space before and after the colon, no trailing newline.
func writeDocument(fields []field) []byte {
	var b bytes.Buffer
	b.WriteString("{\n")
	for i, f := range fields {
		b.WriteString("  ")
		b.Write(jsonString(f.key))
		b.WriteString(" : ")
		b.Write(jsonString(f.value))
		if i < len(fields)-1 {
			b.WriteByte(',')
		}
		b.WriteByte('\n')
	}
	b.WriteByte('}')
	return b.Bytes()
}

func jsonString(s string) []byte {
	b, err := json.Marshal(s) // cannot fail for a string; invalid UTF-8 becomes U+FFFD
	if err != nil {
		return []byte(`""`)
	}
	return b
}

// usable reports whether c may be served at now: complete, not expired, and
// its advertised Expiration (truncated to the second) still in the future, so
// that a served document never shows an expiry in the past.
func usable(c creds.Credentials, now time.Time) bool {
	return c.ValidAt(now) && c.Expires.Truncate(time.Second).After(now)
}

// lastUpdated is c.LastUpdated, or now when the source did not set it.
func lastUpdated(c creds.Credentials, now time.Time) time.Time {
	if c.LastUpdated.IsZero() {
		return now
	}
	return c.LastUpdated
}

// accountID is the account of c: AccountID, else parsed from RoleARN, else "".
func accountID(c creds.Credentials) string {
	if c.AccountID != "" {
		return c.AccountID
	}
	return creds.AccountFromARN(c.RoleARN)
}

// credentialDocument is the body of security-credentials/<role>, and with
// extended of security-credentials-extended/<role> (which adds AccountId when
// the account is known).
func credentialDocument(c creds.Credentials, now time.Time, extended bool) []byte {
	fields := []field{
		{"Code", "Success"},
		{"LastUpdated", imdsTime(lastUpdated(c, now))},
		{"Type", "AWS-HMAC"},
		{"AccessKeyId", c.AccessKeyID},
		{"SecretAccessKey", c.SecretAccessKey},
		{"Token", c.SessionToken},
		{"Expiration", imdsTime(c.Expires)},
	}
	if extended {
		if acct := accountID(c); acct != "" {
			fields = append(fields, field{"AccountId", acct})
		}
	}
	return writeDocument(fields)
}

// errorDocument is the HTTP 200 document EC2 serves when it has no
// credentials: Code other than "Success", LastUpdated, a short Message.
func errorDocument(code, message string, now time.Time) []byte {
	return writeDocument([]field{
		{"Code", code},
		{"LastUpdated", imdsTime(now)},
		{"Message", message},
	})
}

// Error codes and messages of the error document, by error class of the
// credential source (see docs/architecture.md). The Message is a fixed text
// per class: the source's error text is logged, never served, because it may
// contain anything (an upstream response, an identity token, a path).
//
//	access_denied                        AssumeRoleUnauthorizedAccess (EC2's code when the role cannot be assumed)
//	invalid_token, expired_token,
//	identity                             InvalidIdentityToken
//	throttling                           Throttling
//	server, timeout, network, idp        ServiceUnavailable
//	validation, region_disabled          InvalidConfiguration
//	credentials expired or incomplete    CredentialsUnavailable
//	anything else (other, no class)      InternalError
const (
	codeUnauthorized  = "AssumeRoleUnauthorizedAccess"
	codeIdentity      = "InvalidIdentityToken"
	codeThrottling    = "Throttling"
	codeUnavailable   = "ServiceUnavailable"
	codeConfiguration = "InvalidConfiguration"
	codeNoCredentials = "CredentialsUnavailable"
	codeInternal      = "InternalError"
	codeNoProfile     = "InstanceProfileUnknown"
)

var errorMessages = map[string]string{
	codeUnauthorized:  "Access denied when assuming the workload role.",
	codeIdentity:      "The host identity token was rejected or could not be read.",
	codeThrottling:    "Credential requests are being throttled upstream; retry later.",
	codeUnavailable:   "The upstream credential service is unavailable; retry later.",
	codeConfiguration: "The credential request was rejected as invalid; check the imdsproxy configuration.",
	codeNoCredentials: "No valid credentials are available; retry later.",
	codeInternal:      "Credentials are temporarily unavailable; retry later.",
	codeNoProfile:     "The instance profile ARN is not known.",
}

// errorCode maps an error class to the Code of the error document.
func errorCode(class string) string {
	switch class {
	case "access_denied":
		return codeUnauthorized
	case "invalid_token", "expired_token", "identity":
		return codeIdentity
	case "throttling":
		return codeThrottling
	case "server", "timeout", "network", "idp":
		return codeUnavailable
	case "validation", "region_disabled":
		return codeConfiguration
	default:
		return codeInternal
	}
}

// instanceProfileARN is cfg's InstanceProfileARN for the host's role (host
// true), or one derived from the credentials served as role:
// arn:<partition>:iam::<account>:instance-profile/<role>, the partition
// taken from the role ARN (default "aws"). "" when the account is unknown.
func instanceProfileARN(cfg *Config, role string, host bool, c creds.Credentials) string {
	if host && cfg.InstanceProfileARN != "" {
		return cfg.InstanceProfileARN
	}
	acct := accountID(c)
	if acct == "" {
		return ""
	}
	partition := "aws"
	if parts := strings.SplitN(c.RoleARN, ":", 3); len(parts) == 3 && parts[0] == "arn" && isPartition(parts[1]) {
		partition = parts[1]
	}
	return "arn:" + partition + ":iam::" + acct + ":instance-profile/" + role
}

func isPartition(p string) bool {
	if p == "" || len(p) > 32 {
		return false
	}
	for _, r := range p {
		if (r < 'a' || r > 'z') && (r < '0' || r > '9') && r != '-' {
			return false
		}
	}
	return true
}

// instanceProfileID derives an EC2-looking instance profile id from arn:
// "AIPA" followed by the first 17 characters of the base32 (A-Z, 2-7) of
// SHA-256(arn). Deterministic, so it is stable across restarts and hosts.
func instanceProfileID(arn string) string {
	sum := sha256.Sum256([]byte(arn))
	return "AIPA" + base32.StdEncoding.EncodeToString(sum[:])[:17]
}

// iamInfoDocument is the body of iam/info.
func iamInfoDocument(arn string, c creds.Credentials, now time.Time) []byte {
	return writeDocument([]field{
		{"Code", "Success"},
		{"LastUpdated", imdsTime(lastUpdated(c, now))},
		{"InstanceProfileArn", arn},
		{"InstanceProfileId", instanceProfileID(arn)},
	})
}
