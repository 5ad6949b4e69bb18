// Package sigv4 verifies AWS Signature Version 4 (the Authorization header
// form) for the test fakes of services the daemon signs requests to (STS
// AssumeRole and GetCallerIdentity, S3), as documented in "Create a signed
// AWS API request" of the IAM user guide. It recomputes the signature from
// the request alone and the secret of the access key it names; the fakes
// decide which keys exist and word their own service's errors.
package sigv4

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"net/http"
	"net/url"
	"slices"
	"sort"
	"strconv"
	"strings"
)

// Algorithm is the only algorithm accepted.
const Algorithm = "AWS4-HMAC-SHA256"

// Parse errors.
var (
	ErrAlgorithm = errors.New("Authorization header requires the AWS4-HMAC-SHA256 algorithm")
	ErrMalformed = errors.New("Authorization header requires 'Credential', 'SignedHeaders' and 'Signature' parameters")
	ErrScope     = errors.New("Credential should be scoped to a valid region, service and aws4_request terminator")
)

// Auth is a parsed Authorization header.
type Auth struct {
	AccessKeyID   string
	Date          string // YYYYMMDD of the credential scope
	Region        string
	Service       string
	SignedHeaders []string // lower case, as listed
	Signature     string   // hex
}

// Parse parses "AWS4-HMAC-SHA256 Credential=AKID/YYYYMMDD/region/service/
// aws4_request, SignedHeaders=a;b;c, Signature=hex".
func Parse(h string) (*Auth, error) {
	alg, rest, ok := strings.Cut(strings.TrimSpace(h), " ")
	if !ok || alg != Algorithm {
		return nil, ErrAlgorithm
	}
	fields := map[string]string{}
	for _, part := range strings.Split(rest, ",") {
		k, v, ok := strings.Cut(strings.TrimSpace(part), "=")
		if !ok {
			return nil, ErrMalformed
		}
		fields[k] = v
	}
	cred, sh, sig := fields["Credential"], fields["SignedHeaders"], fields["Signature"]
	if cred == "" || sh == "" || sig == "" {
		return nil, ErrMalformed
	}
	scope := strings.Split(cred, "/")
	if len(scope) != 5 || scope[0] == "" || len(scope[1]) != 8 || scope[4] != "aws4_request" {
		return nil, ErrScope
	}
	return &Auth{AccessKeyID: scope[0], Date: scope[1], Region: scope[2], Service: scope[3],
		SignedHeaders: strings.Split(sh, ";"), Signature: sig}, nil
}

// Signs reports whether header (lower case) is among the signed headers.
func (a *Auth) Signs(header string) bool { return slices.Contains(a.SignedHeaders, header) }

// Matches reports whether a.Signature is the signature of r made with
// secret, over a payload whose lowercase hex SHA-256 is payloadHash, with
// the X-Amz-Date header of r. The comparison takes constant time.
func (a *Auth) Matches(r *http.Request, secret, payloadHash string) bool {
	var canon strings.Builder
	path := r.URL.EscapedPath()
	if path == "" {
		path = "/"
	}
	canon.WriteString(r.Method + "\n" + path + "\n" + canonicalQuery(r.URL.RawQuery) + "\n")
	for _, name := range a.SignedHeaders {
		canon.WriteString(name + ":" + canonicalHeaderValue(r, name) + "\n")
	}
	canon.WriteString("\n" + strings.Join(a.SignedHeaders, ";") + "\n" + payloadHash)

	creq := sha256.Sum256([]byte(canon.String()))
	scope := a.Date + "/" + a.Region + "/" + a.Service + "/aws4_request"
	stringToSign := Algorithm + "\n" + r.Header.Get("X-Amz-Date") + "\n" + scope + "\n" + hex.EncodeToString(creq[:])
	key := hmacSHA256([]byte("AWS4"+secret), a.Date)
	key = hmacSHA256(key, a.Region)
	key = hmacSHA256(key, a.Service)
	key = hmacSHA256(key, "aws4_request")
	want := hex.EncodeToString(hmacSHA256(key, stringToSign))
	return hmac.Equal([]byte(want), []byte(strings.ToLower(a.Signature)))
}

// PayloadHash is the lowercase hex SHA-256 of body.
func PayloadHash(body []byte) string {
	sum := sha256.Sum256(body)
	return hex.EncodeToString(sum[:])
}

func hmacSHA256(key []byte, data string) []byte {
	m := hmac.New(sha256.New, key)
	m.Write([]byte(data))
	return m.Sum(nil)
}

// canonicalHeaderValue is the trimmed value of one signed header; several
// values are joined with commas. Go's server moves Host and Content-Length
// out of the header map.
func canonicalHeaderValue(r *http.Request, name string) string {
	switch name {
	case "host":
		return r.Host
	case "content-length":
		if r.ContentLength >= 0 {
			return strconv.FormatInt(r.ContentLength, 10)
		}
	}
	vals := r.Header.Values(name)
	out := make([]string, len(vals))
	for i, v := range vals {
		out[i] = strings.Join(strings.Fields(v), " ")
	}
	return strings.Join(out, ",")
}

// canonicalQuery sorts the query parameters by name and value and encodes
// them the SigV4 way.
func canonicalQuery(raw string) string {
	if raw == "" {
		return ""
	}
	q, _ := url.ParseQuery(raw)
	var pairs []string
	for k, vs := range q {
		for _, v := range vs {
			pairs = append(pairs, uriEncode(k)+"="+uriEncode(v))
		}
	}
	sort.Strings(pairs)
	return strings.Join(pairs, "&")
}

// uriEncode percent-encodes every byte except the unreserved characters
// A-Z a-z 0-9 - _ . ~, with upper-case hex.
func uriEncode(s string) string {
	const hexDigits = "0123456789ABCDEF"
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c >= 'A' && c <= 'Z' || c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c == '_' || c == '.' || c == '~' {
			b.WriteByte(c)
			continue
		}
		b.WriteByte('%')
		b.WriteByte(hexDigits[c>>4])
		b.WriteByte(hexDigits[c&15])
	}
	return b.String()
}
