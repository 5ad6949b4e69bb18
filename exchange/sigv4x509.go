package exchange

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"sort"
	"strings"
	"time"
)

// SigV4-X509, the signing process of IAM Roles Anywhere (shared/WIRE.md §5.3
// and §10): SigV4's canonical request and string to sign, with the
// certificate's serial as the "access key", the service "rolesanywhere", and
// an RSA PKCS#1 v1.5 or ECDSA ASN.1 signature over SHA-256(string to sign)
// instead of the HMAC chain.
const (
	algX509RSA   = "AWS4-X509-RSA-SHA256"
	algX509ECDSA = "AWS4-X509-ECDSA-SHA256"

	amzDateFormat = "20060102T150405Z"
	// canonicalURI is the literal path of CreateSession: the canonical URI is
	// "/sessions" even when the endpoint has a path prefix (WIRE.md §10).
	canonicalURI = "/sessions"
)

// unsignedHeaders are never signed (lowercase names).
var unsignedHeaders = map[string]bool{"authorization": true, "user-agent": true, "x-amzn-trace-id": true}

// signX509 signs req for Roles Anywhere: it sets X-Amz-Date, X-Amz-X509,
// X-Amz-X509-Chain (only when chain is non-empty; intermediates only) and
// Authorization. body must be the exact bytes req will send. Every header
// present at signing time is signed except Authorization, User-Agent and
// X-Amzn-Trace-Id, and host is always signed (req.Host, else req.URL.Host),
// so headers must not be added afterwards. The signer's key must match the
// leaf's public key; it is asked for a signature of SHA-256(string to sign)
// with crypto.SHA256 as the hash.
func signX509(req *http.Request, body []byte, region string, now time.Time,
	leaf *x509.Certificate, chain []*x509.Certificate, signer crypto.Signer) error {
	if leaf == nil || signer == nil {
		return errors.New("sigv4x509: nil certificate or signer")
	}
	if region == "" {
		return errors.New("sigv4x509: empty region")
	}
	var alg string
	switch signer.Public().(type) {
	case *rsa.PublicKey:
		alg = algX509RSA
	case *ecdsa.PublicKey:
		alg = algX509ECDSA
	default:
		return fmt.Errorf("sigv4x509: unsupported key type %T", signer.Public())
	}

	amzDate := now.UTC().Format(amzDateFormat)
	scope := amzDate[:8] + "/" + region + "/rolesanywhere/aws4_request"
	req.Header.Del("Authorization")
	req.Header.Set("X-Amz-Date", amzDate)
	req.Header.Set("X-Amz-X509", base64.StdEncoding.EncodeToString(leaf.Raw))
	if len(chain) > 0 {
		parts := make([]string, len(chain))
		for i, c := range chain {
			parts[i] = base64.StdEncoding.EncodeToString(c.Raw)
		}
		req.Header.Set("X-Amz-X509-Chain", strings.Join(parts, ","))
	} else {
		req.Header.Del("X-Amz-X509-Chain")
	}

	canon, signed := canonicalRequest(req, body)
	sts := stringToSign(alg, amzDate, scope, canon)
	digest := sha256.Sum256([]byte(sts))
	sig, err := signer.Sign(rand.Reader, digest[:], crypto.SHA256)
	if err != nil {
		return fmt.Errorf("sigv4x509: sign: %w", err)
	}
	req.Header.Set("Authorization", alg+" Credential="+leaf.SerialNumber.String()+"/"+scope+
		", SignedHeaders="+signed+", Signature="+hex.EncodeToString(sig))
	return nil
}

// canonicalRequest returns the canonical request of req and its signed
// headers list.
func canonicalRequest(req *http.Request, body []byte) (canon, signedHeaders string) {
	headers := map[string][]string{}
	for k, vs := range req.Header {
		lk := strings.ToLower(k)
		if unsignedHeaders[lk] || lk == "host" {
			continue
		}
		headers[lk] = append(headers[lk], vs...)
	}
	host := req.Host
	if host == "" && req.URL != nil {
		host = req.URL.Host
	}
	headers["host"] = []string{host}
	names := make([]string, 0, len(headers))
	for k := range headers {
		names = append(names, k)
	}
	sort.Strings(names)

	var b strings.Builder
	b.WriteString(req.Method)
	b.WriteString("\n")
	b.WriteString(canonicalURI)
	b.WriteString("\n")
	if req.URL != nil {
		b.WriteString(canonicalQueryString(req.URL.RawQuery))
	}
	b.WriteString("\n")
	for _, n := range names {
		vals := headers[n]
		trimmed := make([]string, len(vals))
		for i, v := range vals {
			trimmed[i] = collapseSpaces(v)
		}
		b.WriteString(n)
		b.WriteString(":")
		b.WriteString(strings.Join(trimmed, ","))
		b.WriteString("\n")
	}
	signedHeaders = strings.Join(names, ";")
	b.WriteString("\n")
	b.WriteString(signedHeaders)
	b.WriteString("\n")
	h := sha256.Sum256(body)
	b.WriteString(hex.EncodeToString(h[:]))
	return b.String(), signedHeaders
}

// stringToSign is alg \n amzDate \n scope \n hex(sha256(canonical request)).
func stringToSign(alg, amzDate, scope, canon string) string {
	h := sha256.Sum256([]byte(canon))
	return alg + "\n" + amzDate + "\n" + scope + "\n" + hex.EncodeToString(h[:])
}

// canonicalQueryString parses raw (the query as sent) and returns it sorted
// by key, then value, with keys and values RFC 3986 encoded. A query that
// does not parse is used as is (the request would then fail upstream).
func canonicalQueryString(raw string) string {
	if raw == "" {
		return ""
	}
	q, err := url.ParseQuery(raw)
	if err != nil {
		return raw
	}
	type pair struct{ k, v string }
	pairs := make([]pair, 0, len(q))
	for k, vs := range q {
		for _, v := range vs {
			pairs = append(pairs, pair{uriEncode(k), uriEncode(v)})
		}
	}
	// Sort by encoded key, then encoded value (not by "k=v": '=' sorts
	// after '-', '.' and digits).
	sort.Slice(pairs, func(i, j int) bool {
		if pairs[i].k != pairs[j].k {
			return pairs[i].k < pairs[j].k
		}
		return pairs[i].v < pairs[j].v
	})
	var b strings.Builder
	for i, p := range pairs {
		if i > 0 {
			b.WriteByte('&')
		}
		b.WriteString(p.k)
		b.WriteByte('=')
		b.WriteString(p.v)
	}
	return b.String()
}

// encodeQuery renders q in canonical form: what is sent is what is signed.
func encodeQuery(q url.Values) string {
	return canonicalQueryString(q.Encode())
}

// uriEncode percent-encodes every byte outside A-Za-z0-9-_.~ as %XX
// (uppercase hex); a space becomes %20.
func uriEncode(s string) string {
	const hexUpper = "0123456789ABCDEF"
	var b strings.Builder
	b.Grow(len(s))
	for i := 0; i < len(s); i++ {
		c := s[i]
		if 'A' <= c && c <= 'Z' || 'a' <= c && c <= 'z' || '0' <= c && c <= '9' || c == '-' || c == '_' || c == '.' || c == '~' {
			b.WriteByte(c)
			continue
		}
		b.WriteByte('%')
		b.WriteByte(hexUpper[c>>4])
		b.WriteByte(hexUpper[c&15])
	}
	return b.String()
}

// collapseSpaces trims v and replaces each run of spaces with one space.
func collapseSpaces(v string) string {
	v = strings.TrimSpace(v)
	if !strings.Contains(v, "  ") {
		return v
	}
	var b strings.Builder
	prevSpace := false
	for i := 0; i < len(v); i++ {
		c := v[i]
		if c == ' ' {
			if prevSpace {
				continue
			}
			prevSpace = true
		} else {
			prevSpace = false
		}
		b.WriteByte(c)
	}
	return b.String()
}
