package creds

import "regexp"

// Replacements written by RedactText. None contains a run of base64
// characters that could join with its neighbours into a new match, so
// RedactText is idempotent.
const (
	RedactedJWT          = "<redacted-jwt>"
	RedactedSecret       = "<redacted>"
	RedactedSessionToken = "<redacted-session-token>"
	RedactedBlob         = "<redacted-blob>"
	// redactedKeyID follows the kept "AKIA" prefix of a long-term key id.
	redactedKeyID = "…<redacted>"
)

var (
	// A JWT (or a JWS/JWE) whose header starts with `{"`, whole or cut
	// off: "eyJ" and the dot-separated base64url parts after it. Matches
	// shorter than minJWTMatch are kept.
	reJWTPrefix = regexp.MustCompile(`eyJ[A-Za-z0-9_=-]*(?:\.[A-Za-z0-9_=-]+)*`)
	// Any other compact JWS: three dot-separated base64url parts of at
	// least 16 characters each (a header that does not start with `{"`).
	// Parts of 16 or more keep ordinary host names out of it.
	reJWS = regexp.MustCompile(`[A-Za-z0-9_-]{16,}\.[A-Za-z0-9_-]{16,}\.[A-Za-z0-9_-]{16,}=*`)
	// An STS session token, by the prefixes its encoding starts with.
	reSessionToken = regexp.MustCompile(`(?:IQoJb3JpZ2luX2Vj|FwoGZXIvYXdz|FQoGZXIvYXdz|AQoDYXdzE|AQoJb3JpZ2luX2Vj)[A-Za-z0-9/+=]*`)
	// The value after a secret's or a session token's name: name, a
	// separator (=, :, ">" of an XML element, quotes, spaces), then at
	// least 16 characters of base64.
	reNamedSecret = regexp.MustCompile(`(?i)((?:aws_?)?secret(?:_?access)?(?:_?key)?|(?:aws_?)?session_?token|x-amz-security-token|"token")(\s*"?\s*[:=]\s*"?\s*|>\s*|\s+)[A-Za-z0-9/+=]{16,}`)
	// A long-term access key id, even glued to other characters.
	reLongTermKeyID = regexp.MustCompile(`AKIA[A-Z0-9]{16}`)
	// Runs of standard base64 without padding (the secret-key rule) and
	// of base64 in either alphabet (the blob rule).
	reStdBase64Run = regexp.MustCompile(`[A-Za-z0-9/+]+`)
	reBase64Run    = regexp.MustCompile(`[A-Za-z0-9/+_=-]+`)
)

// Sizes of what RedactText removes.
const (
	minJWTMatch  = 13  // "eyJ" and 10 more characters
	secretKeyLen = 40  // an AWS secret access key
	minBlobLen   = 200 // a base64 blob: a session token, a key, a signature
)

// RedactText returns s with everything that looks like a secret replaced,
// so that text quoted from upstream (an STS error message, a command's
// stderr, an HTTP error body) can be put in an error or a log line. It is
// meant for messages, never for credentials themselves. The rules, in
// order:
//
//   - JWTs: "eyJ" (the base64url of `{"`, how every JWT header starts)
//     with the base64url characters and dot-separated parts after it,
//     13 characters or more in all, becomes "<redacted-jwt>". This also
//     catches a JWT cut off anywhere after its 13th character (one part,
//     two parts, a partial signature). Any other compact JWS (three
//     dot-separated base64url parts of at least 16 characters) is replaced
//     too. So the output never contains "eyJ" followed by 10 or more
//     base64url characters.
//   - STS session tokens (base64 starting "IQoJb3JpZ2luX2Vj",
//     "FwoGZXIvYXdz", "FQoGZXIvYXdz", "AQoDYXdzE", "AQoJb3JpZ2luX2Vj")
//     become "<redacted-session-token>".
//   - A value named as a secret key or a session token ("secret",
//     "SecretAccessKey", "aws_secret_access_key", "SessionToken",
//     "session_token", "X-Amz-Security-Token", `"token"`; any case)
//     followed by "=", ":", the ">" of an XML element or spaces, then at
//     least 16 base64 characters: the value becomes "<redacted>", the name
//     stays.
//   - A long-term access key id, "AKIA" and 16 upper-case letters or
//     digits (wherever it is, even glued to other letters), becomes
//     "AKIA…<redacted>". Temporary key ids ("ASIA…") are
//     kept: they are not secret, they expire, and they are what operators
//     grep CloudTrail for.
//   - A run of exactly 40 characters of standard base64 without padding
//     ([A-Za-z0-9/+], the shape of an AWS secret access key) holding an
//     upper-case letter, a lower-case letter and a digit becomes
//     "<redacted>" wherever it is (a lower-case hex digest such as a SHA-1
//     is not touched).
//   - A run of 200 or more base64 or base64url characters holding an
//     upper-case letter, a lower-case letter and a digit becomes
//     "<redacted-blob>": nothing that long and random belongs in a message.
//
// RedactText is idempotent, changes nothing else (no trimming, no control
// character handling: callers sanitize as before) and is safe for
// concurrent use. Redact before cutting a message to length: a cut can
// leave the start of a secret no rule recognises any more (the rules for
// JWTs are the exception, by design).
func RedactText(s string) string {
	if s == "" {
		return s
	}
	s = reJWTPrefix.ReplaceAllStringFunc(s, func(m string) string {
		if len(m) < minJWTMatch {
			return m
		}
		return RedactedJWT
	})
	s = reJWS.ReplaceAllLiteralString(s, RedactedJWT)
	s = reSessionToken.ReplaceAllLiteralString(s, RedactedSessionToken)
	s = reNamedSecret.ReplaceAllString(s, "${1}${2}"+RedactedSecret)
	s = reLongTermKeyID.ReplaceAllStringFunc(s, func(id string) string { return id[:4] + redactedKeyID })
	s = reStdBase64Run.ReplaceAllStringFunc(s, func(run string) string {
		if len(run) == secretKeyLen && mixedAlnum(run) {
			return RedactedSecret
		}
		return run
	})
	return reBase64Run.ReplaceAllStringFunc(s, func(run string) string {
		if len(run) >= minBlobLen && mixedAlnum(run) {
			return RedactedBlob
		}
		return run
	})
}

// mixedAlnum reports whether s holds an upper-case letter, a lower-case
// letter and a digit.
func mixedAlnum(s string) bool {
	var upper, lower, digit bool
	for i := 0; i < len(s); i++ {
		switch c := s[i]; {
		case c >= 'A' && c <= 'Z':
			upper = true
		case c >= 'a' && c <= 'z':
			lower = true
		case c >= '0' && c <= '9':
			digit = true
		}
	}
	return upper && lower && digit
}
