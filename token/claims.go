package token

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"strings"
	"time"
)

// MaxTokenSize is the largest JWT, in bytes, that ParseClaims accepts. It is
// also the default FileOptions.MaxSize.
const MaxTokenSize = 64 << 10

// maxUnixSeconds is 9999-12-31T23:59:59Z; larger timestamps are refused so
// that time conversion cannot overflow.
const maxUnixSeconds = 253402300799

// Claims is the part of a JWT payload imdsproxy looks at. The zero value of a
// time field means the claim was absent. Claims carries no secret, but note
// that Subject may identify the host.
type Claims struct {
	// Issuer is the "iss" claim, "" when absent.
	Issuer string
	// Subject is the "sub" claim, "" when absent.
	Subject string
	// Audience is the "aud" claim; a single string becomes a one-element
	// slice; nil when absent.
	Audience []string
	// Expiry is the "exp" claim (always present in a parsed token), in UTC.
	Expiry time.Time
	// IssuedAt is the "iat" claim in UTC, zero when absent.
	IssuedAt time.Time
	// NotBefore is the "nbf" claim in UTC, zero when absent.
	NotBefore time.Time
}

// errMalformed is the base of every ParseClaims error. Messages never quote
// the input, so they are safe to log.
var errMalformed = errors.New("malformed JWT")

func malformed(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{errMalformed}, args...)...)
}

// ParseClaims checks the shape of a compact-serialized JWT and returns its
// claims. It does not verify the signature (STS does that): it checks that
// jwt has exactly three non-empty, dot-separated base64url parts (padding is
// tolerated), that the header is a JSON object whose "alg" is a string other
// than "none", and that the payload is a JSON object with a numeric "exp"
// (integer or fraction). The optional claims iss and sub must be strings, aud
// a string or an array of strings, iat and nbf numbers. Control characters and
// tokens larger than MaxTokenSize are refused. ParseClaims does not check
// expiry. Errors never contain any part of jwt.
func ParseClaims(jwt string) (Claims, error) {
	if len(jwt) > MaxTokenSize {
		return Claims{}, malformed("larger than %d bytes", MaxTokenSize)
	}
	for i := 0; i < len(jwt); i++ {
		if !isJWTChar(jwt[i]) {
			if jwt[i] < 0x20 || jwt[i] == 0x7f {
				return Claims{}, malformed("control character at offset %d", i)
			}
			return Claims{}, malformed("character outside base64url at offset %d", i)
		}
	}
	parts := strings.Split(jwt, ".")
	if len(parts) != 3 {
		return Claims{}, malformed("%d dot-separated parts, want 3", len(parts))
	}
	names := [3]string{"header", "payload", "signature"}
	var decoded [3][]byte
	for i, p := range parts {
		b, err := decodeSegment(p)
		if err != nil {
			return Claims{}, malformed("%s is not base64url", names[i])
		}
		if len(b) == 0 {
			return Claims{}, malformed("%s is empty", names[i])
		}
		decoded[i] = b
	}

	header, err := jsonObject(decoded[0])
	if err != nil {
		return Claims{}, malformed("header is not a JSON object")
	}
	var alg string
	if raw, ok := header["alg"]; !ok {
		return Claims{}, malformed(`header has no "alg"`)
	} else if err := strictString(raw, &alg); err != nil {
		return Claims{}, malformed(`header "alg" is not a string`)
	}
	if alg == "" || strings.EqualFold(alg, "none") {
		return Claims{}, malformed(`header "alg" is empty or "none"`)
	}

	payload, err := jsonObject(decoded[1])
	if err != nil {
		return Claims{}, malformed("payload is not a JSON object")
	}
	var c Claims
	raw, ok := payload["exp"]
	if !ok {
		return Claims{}, malformed(`payload has no "exp"`)
	}
	if c.Expiry, err = numericDate(raw); err != nil {
		return Claims{}, malformed(`"exp" %v`, err)
	}
	for _, f := range []struct {
		name string
		dst  *time.Time
	}{{"iat", &c.IssuedAt}, {"nbf", &c.NotBefore}} {
		if raw, ok := payload[f.name]; ok && !isNull(raw) {
			if *f.dst, err = numericDate(raw); err != nil {
				return Claims{}, malformed("%q %v", f.name, err)
			}
		}
	}
	for _, f := range []struct {
		name string
		dst  *string
	}{{"iss", &c.Issuer}, {"sub", &c.Subject}} {
		if raw, ok := payload[f.name]; ok && !isNull(raw) {
			if err := strictString(raw, f.dst); err != nil {
				return Claims{}, malformed("%q is not a string", f.name)
			}
		}
	}
	if raw, ok := payload["aud"]; ok && !isNull(raw) {
		if c.Audience, err = audience(raw); err != nil {
			return Claims{}, malformed(`"aud" is not a string or an array of strings`)
		}
	}
	return c, nil
}

func isJWTChar(b byte) bool {
	switch {
	case b >= 'A' && b <= 'Z', b >= 'a' && b <= 'z', b >= '0' && b <= '9':
		return true
	case b == '-', b == '_', b == '.', b == '=':
		return true
	}
	return false
}

// decodeSegment decodes one base64url segment, with or without padding.
func decodeSegment(s string) ([]byte, error) {
	trimmed := strings.TrimRight(s, "=")
	if pad := len(s) - len(trimmed); pad > 2 {
		return nil, errMalformed
	}
	return base64.RawURLEncoding.DecodeString(trimmed)
}

func jsonObject(b []byte) (map[string]json.RawMessage, error) {
	var m map[string]json.RawMessage
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, err
	}
	if m == nil { // the literal null
		return nil, errMalformed
	}
	return m, nil
}

func isNull(raw json.RawMessage) bool {
	return bytes.Equal(bytes.TrimSpace(raw), []byte("null"))
}

func strictString(raw json.RawMessage, dst *string) error {
	t := bytes.TrimSpace(raw)
	if len(t) == 0 || t[0] != '"' {
		return errMalformed
	}
	return json.Unmarshal(t, dst)
}

func audience(raw json.RawMessage) ([]string, error) {
	t := bytes.TrimSpace(raw)
	if len(t) > 0 && t[0] == '"' {
		var s string
		if err := json.Unmarshal(t, &s); err != nil {
			return nil, err
		}
		return []string{s}, nil
	}
	if len(t) == 0 || t[0] != '[' {
		return nil, errMalformed
	}
	var elems []json.RawMessage
	if err := json.Unmarshal(t, &elems); err != nil {
		return nil, err
	}
	out := make([]string, 0, len(elems))
	for _, e := range elems {
		var s string
		if err := strictString(e, &s); err != nil {
			return nil, err
		}
		out = append(out, s)
	}
	return out, nil
}

// numericDate decodes a JSON number of seconds since the Unix epoch.
func numericDate(raw json.RawMessage) (time.Time, error) {
	t := bytes.TrimSpace(raw)
	if len(t) == 0 || !(t[0] == '-' || (t[0] >= '0' && t[0] <= '9')) {
		return time.Time{}, errors.New("is not a number")
	}
	var n json.Number
	if err := json.Unmarshal(t, &n); err != nil {
		return time.Time{}, errors.New("is not a number")
	}
	f, err := n.Float64()
	if err != nil || math.IsNaN(f) || math.IsInf(f, 0) {
		return time.Time{}, errors.New("is not a finite number")
	}
	if f < 0 || f > maxUnixSeconds {
		return time.Time{}, errors.New("is out of range")
	}
	sec, frac := math.Modf(f)
	return time.Unix(int64(sec), int64(frac*1e9)).UTC(), nil
}
