package sts

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
)

// jwksIssuer is a minimal OIDC issuer with one EC and one RSA key, serving
// discovery and JWKS, for the URL mode.
type jwksIssuer struct {
	url    string
	ec     *ecdsa.PrivateKey
	rsa    *rsa.PrivateKey
	mu     sync.Mutex
	issuer string // the discovery document's issuer; "" = url
	ecAlg  string // the EC JWK's alg
}

func startJWKSIssuer(t *testing.T) *jwksIssuer {
	t.Helper()
	ec, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	rk, _ := rsa.GenerateKey(rand.Reader, 2048)
	j := &jwksIssuer{ec: ec, rsa: rk, ecAlg: "ES256"}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /.well-known/openid-configuration", func(w http.ResponseWriter, r *http.Request) {
		j.mu.Lock()
		iss := j.issuer
		j.mu.Unlock()
		if iss == "" {
			iss = j.url
		}
		_ = json.NewEncoder(w).Encode(map[string]any{"issuer": iss, "jwks_uri": j.url + "/keys"})
	})
	mux.HandleFunc("GET /keys", func(w http.ResponseWriter, r *http.Request) {
		j.mu.Lock()
		alg := j.ecAlg
		j.mu.Unlock()
		_ = json.NewEncoder(w).Encode(jose.JSONWebKeySet{Keys: []jose.JSONWebKey{
			{Key: &ec.PublicKey, KeyID: "ec1", Algorithm: alg, Use: "sig"},
			{Key: &rk.PublicKey, KeyID: "rsa1", Algorithm: "RS256", Use: "sig"},
		}})
	})
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	j.url = srv.URL
	return j
}

// mint signs claims with the EC key (ES256, kid ec1) or the RSA key.
func (j *jwksIssuer) mint(t *testing.T, alg jose.SignatureAlgorithm, kid string, claims map[string]any) string {
	t.Helper()
	var key any = j.ec
	if alg == jose.RS256 {
		key = j.rsa
	}
	s, err := jose.NewSigner(jose.SigningKey{Algorithm: alg, Key: key}, (&jose.SignerOptions{}).WithHeader("kid", kid).WithType("JWT"))
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now().Unix()
	c := map[string]any{"iss": j.url, "sub": "app", "aud": "sts.amazonaws.com", "iat": now, "nbf": now, "exp": now + 3600}
	for k, v := range claims {
		if v == nil {
			delete(c, k)
		} else {
			c[k] = v
		}
	}
	b, _ := json.Marshal(c)
	obj, err := s.Sign(b)
	if err != nil {
		t.Fatal(err)
	}
	tok, _ := obj.CompactSerialize()
	return tok
}

func TestWebIdentityTheWaySTSDoes(t *testing.T) {
	j := startJWKSIssuer(t)
	fake := Start(t, Config{IssuerURL: j.url})
	const app = "arn:aws:iam::222222222222:role/app"
	const billing = "arn:aws:iam::222222222222:role/billing"
	fake.SetTrust(app, Trust{Subjects: []string{"app"}, TagSession: true})
	fake.SetTrust(billing, Trust{Subjects: []string{"billing-*"}, Audience: "billing.example.com"})
	tags := map[string]any{"principal_tags": map[string]any{"team": []any{"payments"}, "host": []any{"i-0abc"}},
		"transitive_tag_keys": []any{"team"}}
	many := map[string]any{}
	for i := 0; i < 51; i++ {
		many[fmt.Sprintf("k%d", i)] = []any{"v"}
	}
	now := time.Now().Unix()
	for _, tc := range []struct {
		name, role, tok, code string
	}{
		{"ES256 with session tags", app, j.mint(t, jose.ES256, "ec1", map[string]any{TagsClaim: tags}), ""},
		{"RS256", app, j.mint(t, jose.RS256, "rsa1", nil), ""},
		{"sub not in the trust policy", app, j.mint(t, jose.ES256, "ec1", map[string]any{"sub": "billing"}), "AccessDenied"},
		{"StringLike sub and the role's own aud", billing, j.mint(t, jose.ES256, "ec1", map[string]any{"sub": "billing-eu", "aud": "billing.example.com"}), ""},
		{"aud other than the trust policy's", billing, j.mint(t, jose.ES256, "ec1", map[string]any{"sub": "billing-eu"}), "AccessDenied"},
		{"aud no provider accepts", app, j.mint(t, jose.ES256, "ec1", map[string]any{"aud": "nobody"}), "AccessDenied"},
		{"tags without sts:TagSession", billing, j.mint(t, jose.ES256, "ec1", map[string]any{"sub": "billing-eu", "aud": "billing.example.com", TagsClaim: tags}), "AccessDenied"},
		{"kid of the other algorithm", app, j.mint(t, jose.ES256, "rsa1", nil), "InvalidIdentityToken"},
		{"unknown kid", app, j.mint(t, jose.ES256, "nope", nil), "InvalidIdentityToken"},
		{"ES384 unsupported", app, withAlg(j.mint(t, jose.ES256, "ec1", nil), "ES384"), "InvalidIdentityToken"},
		{"iss of another provider", app, j.mint(t, jose.ES256, "ec1", map[string]any{"iss": "https://evil.example"}), "InvalidIdentityToken"},
		{"expired", app, j.mint(t, jose.ES256, "ec1", map[string]any{"exp": now - 10}), "ExpiredTokenException"},
		{"not yet valid", app, j.mint(t, jose.ES256, "ec1", map[string]any{"nbf": now + 3600}), "InvalidIdentityToken"},
		{"51 session tags", app, j.mint(t, jose.ES256, "ec1", map[string]any{TagsClaim: map[string]any{"principal_tags": many}}), "InvalidIdentityToken"},
		{"tag value too long", app, j.mint(t, jose.ES256, "ec1", map[string]any{TagsClaim: map[string]any{"principal_tags": map[string]any{"k": []any{strings.Repeat("v", 257)}}}}), "InvalidIdentityToken"},
		{"tag value not a list", app, j.mint(t, jose.ES256, "ec1", map[string]any{TagsClaim: map[string]any{"principal_tags": map[string]any{"k": "v"}}}), "InvalidIdentityToken"},
		{"transitive key not a tag", app, j.mint(t, jose.ES256, "ec1", map[string]any{TagsClaim: map[string]any{"principal_tags": map[string]any{"k": []any{"v"}}, "transitive_tag_keys": []any{"x"}}}), "InvalidIdentityToken"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := form(tc.tok)
			f.Set("RoleArn", tc.role)
			status, body := post(t, fake.URL, f)
			if tc.code == "" {
				if status != 200 {
					t.Fatalf("status %d: %s", status, body)
				}
				return
			}
			if got := errCode(t, body); got != tc.code {
				t.Fatalf("code %s, want %s: %s", got, tc.code, body)
			}
		})
	}
	var withTags *Issued
	for _, is := range fake.Issued() {
		if is.Tags != nil {
			is := is
			withTags = &is
		}
	}
	if withTags == nil || withTags.Tags["team"] != "payments" || withTags.Tags["host"] != "i-0abc" ||
		len(withTags.TransitiveTagKeys) != 1 || withTags.TransitiveTagKeys[0] != "team" || withTags.Subject != "app" ||
		withTags.Audience != "sts.amazonaws.com" {
		t.Fatalf("issued with tags: %+v", withTags)
	}

	t.Run("JWK alg differs from the token's", func(t *testing.T) {
		j.mu.Lock()
		j.ecAlg = "ES384"
		j.mu.Unlock()
		defer func() { j.mu.Lock(); j.ecAlg = "ES256"; j.mu.Unlock() }()
		_, body := post(t, fake.URL, form(j.mint(t, jose.ES256, "ec1", nil)))
		if got := errCode(t, body); got != "InvalidIdentityToken" {
			t.Fatalf("code %s", got)
		}
	})
	t.Run("discovery of another issuer", func(t *testing.T) {
		j.mu.Lock()
		j.issuer = "https://elsewhere.example"
		j.mu.Unlock()
		defer func() { j.mu.Lock(); j.issuer = ""; j.mu.Unlock() }()
		_, body := post(t, fake.URL, form(j.mint(t, jose.ES256, "ec1", nil)))
		if got := errCode(t, body); got != "IDPCommunicationError" {
			t.Fatalf("code %s", got)
		}
	})
}

// withAlg rewrites the header's alg (the signature no longer matters: the
// algorithm is refused first).
func withAlg(tok, alg string) string {
	parts := strings.Split(tok, ".")
	h, _ := base64.RawURLEncoding.DecodeString(parts[0])
	var m map[string]any
	_ = json.Unmarshal(h, &m)
	m["alg"] = alg
	nh, _ := json.Marshal(m)
	return base64.RawURLEncoding.EncodeToString(nh) + "." + parts[1] + "." + parts[2]
}

func TestStringLike(t *testing.T) {
	for _, tc := range []struct {
		p, s string
		ok   bool
	}{
		{"app", "app", true}, {"app", "apps", false}, {"app-*", "app-eu", true}, {"app-*", "app-", true},
		{"*", "", true}, {"a?c", "abc", true}, {"a?c", "ac", false}, {"*-prod", "billing-prod", true}, {"*-prod", "billing-dev", false},
	} {
		if got := stringLike(tc.p, tc.s); got != tc.ok {
			t.Errorf("stringLike(%q, %q) = %v", tc.p, tc.s, got)
		}
	}
}
