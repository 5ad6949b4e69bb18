package sts

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"math/big"
	"slices"
	"sort"
	"unicode/utf8"

	"github.com/go-jose/go-jose/v4"

	"github.com/imdsproxy/imdsproxy/test/fakes/oidc"
)

// TagsClaim is the claim STS reads session tags from.
const TagsClaim = "https://aws.amazon.com/tags"

// Trust is a role's trust policy for AssumeRoleWithWebIdentity, as the
// conditions an IAM role trusting an OIDC provider holds:
//
//	"Condition": {"StringEquals": {"<provider>:aud": Audience},
//	              "StringLike":   {"<provider>:sub": Subjects}}
//
// plus whether sts:TagSession is allowed. Set it with SetTrust.
type Trust struct {
	// Subjects are the sub values allowed; * matches any run of characters
	// and ? one character (StringLike). Empty allows no subject.
	Subjects []string
	// Audience is the required aud; "" means Config.Audience.
	Audience string
	// TagSession allows session tags (the https://aws.amazon.com/tags
	// claim); without it a token carrying tags is AccessDenied, as a
	// trust policy without sts:TagSession.
	TagSession bool
}

// SetTrust gives roleARN a trust policy: its AssumeRoleWithWebIdentity
// calls must present a token whose sub and aud meet t (else AccessDenied).
// A role with a trust policy may be assumed even when Config.RoleARN names
// another one. Roles without one keep the Config-wide rules.
func (s *Server) SetTrust(roleARN string, t Trust) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.trust == nil {
		s.trust = map[string]Trust{}
	}
	s.trust[roleARN] = t
}

func (s *Server) trustOf(roleARN string) (Trust, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	t, ok := s.trust[roleARN]
	return t, ok
}

// checkTrust applies roleARN's trust policy, if any, to the verified token.
func (s *Server) checkTrust(roleARN string, v *verified) *stsError {
	t, ok := s.trustOf(roleARN)
	if !ok {
		return nil
	}
	denied := sender(403, "AccessDenied", "Not authorized to perform sts:AssumeRoleWithWebIdentity")
	aud := t.Audience
	if aud == "" {
		aud = s.cfg.Audience
	}
	if !slices.Contains(v.audiences, aud) {
		return denied
	}
	if !slices.ContainsFunc(t.Subjects, func(p string) bool { return stringLike(p, v.sub) }) {
		return denied
	}
	if v.tags != nil && !t.TagSession {
		return denied
	}
	return nil
}

// stringLike matches s against an IAM StringLike pattern (* and ?).
func stringLike(pattern, s string) bool {
	for pattern != "" {
		switch pattern[0] {
		case '*':
			for i := len(s); i >= 0; i-- {
				if stringLike(pattern[1:], s[i:]) {
					return true
				}
			}
			return false
		case '?':
			if s == "" {
				return false
			}
			_, n := utf8.DecodeRuneInString(s)
			pattern, s = pattern[1:], s[n:]
		default:
			if s == "" || s[0] != pattern[0] {
				return false
			}
			pattern, s = pattern[1:], s[1:]
		}
	}
	return s == ""
}

// verificationKey is one key of the issuer's JWKS.
type verificationKey struct {
	pub crypto.PublicKey
	alg string // the JWK's alg, "" when the JWK has none
}

// parseJWKS reads RSA and EC P-256 keys by kid.
func parseJWKS(doc []byte) (map[string]verificationKey, error) {
	var set jose.JSONWebKeySet
	if err := json.Unmarshal(doc, &set); err != nil {
		return nil, fmt.Errorf("parse jwks: %w", err)
	}
	keys := map[string]verificationKey{}
	for _, k := range set.Keys {
		if !k.Valid() || !k.IsPublic() || k.KeyID == "" {
			continue
		}
		switch k.Key.(type) {
		case *rsa.PublicKey, *ecdsa.PublicKey:
			keys[k.KeyID] = verificationKey{pub: k.Key, alg: k.Algorithm}
		}
	}
	return keys, nil
}

// inProcessKeys are the keys of Config.Issuer.
func inProcessKeys(iss *oidc.Issuer) map[string]verificationKey {
	out := map[string]verificationKey{}
	for kid, k := range iss.PublicKeys() {
		out[kid] = verificationKey{pub: k, alg: "RS256"}
	}
	return out
}

// checkSignature verifies an RS256 or ES256 JWS signature with key.
func checkSignature(alg string, key verificationKey, signingInput string, sig []byte) bool {
	if key.alg != "" && key.alg != alg {
		return false
	}
	sum := sha256.Sum256([]byte(signingInput))
	switch pub := key.pub.(type) {
	case *rsa.PublicKey:
		return alg == "RS256" && rsa.VerifyPKCS1v15(pub, crypto.SHA256, sum[:], sig) == nil
	case *ecdsa.PublicKey:
		if alg != "ES256" || len(sig) != 64 || pub.Curve.Params().BitSize != 256 {
			return false
		}
		return ecdsa.Verify(pub, sum[:], new(big.Int).SetBytes(sig[:32]), new(big.Int).SetBytes(sig[32:]))
	}
	return false
}

// sessionTags reads the tags claim the way STS does: principal_tags maps
// each key to a one-element list, transitive_tag_keys are among them; at
// most 50 tags, keys 1-128 and values 0-256 characters of STS's set.
func sessionTags(v any) (map[string]string, []string, *stsError) {
	if v == nil {
		return nil, nil, nil
	}
	bad := func(msg string) (map[string]string, []string, *stsError) {
		return nil, nil, sender(400, "InvalidIdentityToken", "Invalid session tags in the token: "+msg)
	}
	obj, ok := v.(map[string]any)
	if !ok {
		return bad("the tags claim is not an object")
	}
	pt, ok := obj["principal_tags"].(map[string]any)
	if !ok {
		return bad("principal_tags is missing or not an object")
	}
	if len(pt) > 50 {
		return bad(fmt.Sprintf("%d tags; at most 50 are allowed", len(pt)))
	}
	tags := map[string]string{}
	for k, vv := range pt {
		list, ok := vv.([]any)
		if !ok || len(list) != 1 {
			return bad("the value of tag " + k + " is not a list of one string")
		}
		val, ok := list[0].(string)
		switch {
		case !ok:
			return bad("the value of tag " + k + " is not a string")
		case k == "" || utf8.RuneCountInString(k) > 128 || !tagRe.MatchString(k):
			return bad("tag key " + k + " is invalid")
		case utf8.RuneCountInString(val) > 256 || !tagRe.MatchString(val):
			return bad("the value of tag " + k + " is invalid")
		}
		tags[k] = val
	}
	var trans []string
	if tk, present := obj["transitive_tag_keys"]; present {
		list, ok := tk.([]any)
		if !ok {
			return bad("transitive_tag_keys is not a list")
		}
		for _, x := range list {
			k, ok := x.(string)
			if _, tagged := tags[k]; !ok || !tagged {
				return bad("transitive tag key is not a principal tag")
			}
			trans = append(trans, k)
		}
		sort.Strings(trans)
	}
	return tags, trans, nil
}
