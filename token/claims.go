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
	c, _, err := parseJWT(jwt)
	return c, err
}

// jwtShape is what parseJWT learns about a token beyond its claims: enough
// to tell whether its signature has the length its algorithm produces.
type jwtShape struct {
	alg    string // the header's "alg"
	sigLen int    // decoded signature length in bytes
}

// parseJWT is ParseClaims, also returning the token's shape (meaningful
// only without an error).
func parseJWT(jwt string) (Claims, jwtShape, error) {
	var shape jwtShape
	if len(jwt) > MaxTokenSize {
		return Claims{}, shape, malformed("larger than %d bytes", MaxTokenSize)
	}
	for i := 0; i < len(jwt); i++ {
		if !isJWTChar(jwt[i]) {
			if jwt[i] < 0x20 || jwt[i] == 0x7f {
				return Claims{}, shape, malformed("control character at offset %d", i)
			}
			return Claims{}, shape, malformed("character outside base64url at offset %d", i)
		}
	}
	parts := strings.Split(jwt, ".")
	if len(parts) != 3 {
		return Claims{}, shape, malformed("%d dot-separated parts, want 3", len(parts))
	}
	names := [3]string{"header", "payload", "signature"}
	var decoded [3][]byte
	for i, p := range parts {
		b, err := decodeSegment(p)
		if err != nil {
			return Claims{}, shape, malformed("%s is not base64url", names[i])
		}
		if len(b) == 0 {
			return Claims{}, shape, malformed("%s is empty", names[i])
		}
		decoded[i] = b
	}
	shape.sigLen = len(decoded[2])

	header, err := jsonObject(decoded[0])
	if err != nil {
		return Claims{}, shape, malformed("header is not a JSON object")
	}
	var alg string
	if raw, ok := header["alg"]; !ok {
		return Claims{}, shape, malformed(`header has no "alg"`)
	} else if err := strictString(raw, &alg); err != nil {
		return Claims{}, shape, malformed(`header "alg" is not a string`)
	}
	if alg == "" || strings.EqualFold(alg, "none") {
		return Claims{}, shape, malformed(`header "alg" is empty or "none"`)
	}
	shape.alg = alg

	payload, err := jsonObject(decoded[1])
	if err != nil {
		return Claims{}, shape, malformed("payload is not a JSON object")
	}
	var c Claims
	raw, ok := payload["exp"]
	if !ok {
		return Claims{}, shape, malformed(`payload has no "exp"`)
	}
	if c.Expiry, err = numericDate(raw); err != nil {
		return Claims{}, shape, malformed(`"exp" %v`, err)
	}
	for _, f := range []struct {
		name string
		dst  *time.Time
	}{{"iat", &c.IssuedAt}, {"nbf", &c.NotBefore}} {
		if raw, ok := payload[f.name]; ok && !isNull(raw) {
			if *f.dst, err = numericDate(raw); err != nil {
				return Claims{}, shape, malformed("%q %v", f.name, err)
			}
		}
	}
	for _, f := range []struct {
		name string
		dst  *string
	}{{"iss", &c.Issuer}, {"sub", &c.Subject}} {
		if raw, ok := payload[f.name]; ok && !isNull(raw) {
			if err := strictString(raw, f.dst); err != nil {
				return Claims{}, shape, malformed("%q is not a string", f.name)
			}
		}
	}
	if raw, ok := payload["aud"]; ok && !isNull(raw) {
		if c.Audience, err = audience(raw); err != nil {
			return Claims{}, shape, malformed(`"aud" is not a string or an array of strings`)
		}
	}
	return c, shape, nil
}

// signatureLengths maps the JWS algorithms of RFC 7518 and RFC 8037 whose
// signature length is fixed to the allowed lengths in bytes. RSA algorithms
// (RS*, PS*) are handled by plausibleSignature: their signature is as long
// as the key's modulus.
var signatureLengths = map[string][]int{
	"HS256": {32}, "HS384": {48}, "HS512": {64},
	"ES256": {64}, "ES256K": {64}, "ES384": {96}, "ES512": {132},
	"EdDSA": {64, 114}, // Ed25519, Ed448
}

// plausibleSignature reports whether a token's decoded signature has a
// length its algorithm produces, and when not, describes what was expected.
// A signature cut short (a token file read while its writer was half-way
// through) still decodes, and only its length gives it away. RSA signatures
// are as long as the modulus: 256 to 2048 bytes in steps of 128 (keys of
// 2048, 3072, 4096, … bits) are plausible; odd key sizes are not, although
// legal, so callers must treat a false result as a suspicion, not a proof.
// An algorithm it does not know is always plausible.
func plausibleSignature(s jwtShape) (ok bool, want string) {
	switch s.alg {
	case "RS256", "RS384", "RS512", "PS256", "PS384", "PS512":
		if s.sigLen >= 256 && s.sigLen <= 2048 && s.sigLen%128 == 0 {
			return true, ""
		}
		return false, "a multiple of 128 bytes from 256 (a 2048-bit RSA key)"
	}
	lens, known := signatureLengths[s.alg]
	if !known {
		return true, ""
	}
	for i, n := range lens {
		if n == s.sigLen {
			return true, ""
		}
		if i > 0 {
			want += " or "
		}
		want += fmt.Sprintf("%d bytes", n)
	}
	return false, want
}

// jwtPrefix reports whether s could be the beginning of a compact JWT that
// was cut short: nothing but base64url characters and at most two dots.
func jwtPrefix(s string) bool {
	if strings.Count(s, ".") > 2 {
		return false
	}
	for i := 0; i < len(s); i++ {
		if !isJWTChar(s[i]) {
			return false
		}
	}
	return true
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
