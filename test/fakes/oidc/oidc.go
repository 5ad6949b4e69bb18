// Package oidc is a fake OpenID Connect issuer for tests: it holds an RSA-2048
// signing key (generated at construction, with a random key id), serves the
// discovery document and the JWKS over HTTP, and mints RS256 JWTs with any
// claims a test wants, valid or not.
//
// The fake is what an internal host-identity issuer looks like to STS
// AssumeRoleWithWebIdentity. Pair it with test/fakes/sts, which verifies the
// tokens minted here against the JWKS.
//
// All methods are safe for concurrent use.
package oidc

import (
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"math/big"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

// DefaultAudience is the audience AWS STS expects by default.
const DefaultAudience = "sts.amazonaws.com"

// Issuer is a fake OIDC issuer. Create it with New or Start.
type Issuer struct {
	mu  sync.RWMutex
	key *rsa.PrivateKey
	kid string
	url string
}

// Options configure New. The zero value is usable.
type Options struct {
	// URL is the issuer URL put in the iss claim and the discovery document.
	// It may be set later with SetURL (Start does so).
	URL string
	// KeyID is the kid of the signing key; empty means a random one.
	KeyID string
	// Key is the signing key; nil means a fresh RSA-2048 key.
	Key *rsa.PrivateKey
}

// New returns an issuer with a fresh RSA-2048 key (unless opts.Key is set).
func New(opts Options) (*Issuer, error) {
	key := opts.Key
	if key == nil {
		var err error
		key, err = rsa.GenerateKey(rand.Reader, 2048)
		if err != nil {
			return nil, fmt.Errorf("oidc: generate key: %w", err)
		}
	}
	kid := opts.KeyID
	if kid == "" {
		b := make([]byte, 8)
		if _, err := rand.Read(b); err != nil {
			return nil, fmt.Errorf("oidc: key id: %w", err)
		}
		kid = hex.EncodeToString(b)
	}
	return &Issuer{key: key, kid: kid, url: opts.URL}, nil
}

// Start returns an issuer served by an httptest server on loopback, with its
// URL set to the server's URL. The server is closed when the test ends.
func Start(tb testing.TB) *Issuer {
	tb.Helper()
	iss, err := New(Options{})
	if err != nil {
		tb.Fatal(err)
	}
	srv := httptest.NewServer(iss.Handler())
	tb.Cleanup(srv.Close)
	iss.SetURL(srv.URL)
	return iss
}

// URL returns the issuer URL (the iss claim).
func (i *Issuer) URL() string {
	i.mu.RLock()
	defer i.mu.RUnlock()
	return i.url
}

// SetURL sets the issuer URL.
func (i *Issuer) SetURL(u string) {
	i.mu.Lock()
	defer i.mu.Unlock()
	i.url = u
}

// KeyID returns the kid of the current signing key.
func (i *Issuer) KeyID() string {
	i.mu.RLock()
	defer i.mu.RUnlock()
	return i.kid
}

// PublicKeys returns the verification keys by kid.
func (i *Issuer) PublicKeys() map[string]*rsa.PublicKey {
	i.mu.RLock()
	defer i.mu.RUnlock()
	return map[string]*rsa.PublicKey{i.kid: &i.key.PublicKey}
}

// JWK is one RSA key of a JWKS document.
type JWK struct {
	Kty string `json:"kty"`
	Use string `json:"use,omitempty"`
	Alg string `json:"alg,omitempty"`
	Kid string `json:"kid"`
	N   string `json:"n"`
	E   string `json:"e"`
}

// JWKSet is a JWKS document.
type JWKSet struct {
	Keys []JWK `json:"keys"`
}

// JWKS returns the JWKS document (JSON) holding the issuer's public key.
func (i *Issuer) JWKS() []byte {
	set := JWKSet{}
	for kid, pub := range i.PublicKeys() {
		set.Keys = append(set.Keys, JWK{
			Kty: "RSA", Use: "sig", Alg: "RS256", Kid: kid,
			N: base64.RawURLEncoding.EncodeToString(pub.N.Bytes()),
			E: base64.RawURLEncoding.EncodeToString(big.NewInt(int64(pub.E)).Bytes()),
		})
	}
	b, _ := json.Marshal(set)
	return b
}

// ParseJWKS decodes a JWKS document into RSA public keys by kid. Keys that
// are not RSA are ignored.
func ParseJWKS(doc []byte) (map[string]*rsa.PublicKey, error) {
	var set JWKSet
	if err := json.Unmarshal(doc, &set); err != nil {
		return nil, fmt.Errorf("oidc: parse jwks: %w", err)
	}
	keys := make(map[string]*rsa.PublicKey, len(set.Keys))
	for _, k := range set.Keys {
		if k.Kty != "RSA" {
			continue
		}
		n, err := base64.RawURLEncoding.DecodeString(k.N)
		if err != nil {
			return nil, fmt.Errorf("oidc: jwk %s: n: %w", k.Kid, err)
		}
		e, err := base64.RawURLEncoding.DecodeString(k.E)
		if err != nil {
			return nil, fmt.Errorf("oidc: jwk %s: e: %w", k.Kid, err)
		}
		ei := new(big.Int).SetBytes(e)
		if !ei.IsInt64() || ei.Int64() < 3 || ei.Int64() > 1<<31 {
			return nil, fmt.Errorf("oidc: jwk %s: bad exponent", k.Kid)
		}
		keys[k.Kid] = &rsa.PublicKey{N: new(big.Int).SetBytes(n), E: int(ei.Int64())}
	}
	return keys, nil
}

// Handler serves /.well-known/openid-configuration and /jwks.
func (i *Issuer) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /.well-known/openid-configuration", func(w http.ResponseWriter, r *http.Request) {
		u := i.URL()
		doc := map[string]any{
			"issuer":                                u,
			"jwks_uri":                              u + "/jwks",
			"response_types_supported":              []string{"id_token"},
			"subject_types_supported":               []string{"public"},
			"id_token_signing_alg_values_supported": []string{"RS256"},
			"claims_supported":                      []string{"sub", "aud", "exp", "iat", "iss", "nbf"},
		}
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(doc)
	})
	mux.HandleFunc("GET /jwks", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write(i.JWKS())
	})
	return mux
}

// Claims are the claims of a minted token. Zero fields get defaults, see Mint.
type Claims struct {
	// Issuer is the iss claim; empty means the issuer's URL.
	Issuer string
	// Subject is the sub claim; empty means "host-1".
	Subject string
	// Audience is the aud claim; nil means [DefaultAudience]. One value is
	// written as a JSON string, several as an array.
	Audience []string
	// ExpiresAt is the exp claim; zero means one hour after IssuedAt.
	ExpiresAt time.Time
	// IssuedAt is the iat claim; zero means now.
	IssuedAt time.Time
	// NotBefore is the nbf claim; zero means IssuedAt.
	NotBefore time.Time
	// Extra holds more claims (they may override the standard ones).
	Extra map[string]any
}

// Mint returns a signed RS256 JWT for c. It panics only if the system's
// random source fails.
func (i *Issuer) Mint(c Claims) string {
	now := time.Now()
	if c.IssuedAt.IsZero() {
		c.IssuedAt = now
	}
	if c.ExpiresAt.IsZero() {
		c.ExpiresAt = c.IssuedAt.Add(time.Hour)
	}
	if c.NotBefore.IsZero() {
		c.NotBefore = c.IssuedAt
	}
	if c.Issuer == "" {
		c.Issuer = i.URL()
	}
	if c.Subject == "" {
		c.Subject = "host-1"
	}
	if c.Audience == nil {
		c.Audience = []string{DefaultAudience}
	}
	payload := map[string]any{
		"iss": c.Issuer,
		"sub": c.Subject,
		"exp": c.ExpiresAt.Unix(),
		"iat": c.IssuedAt.Unix(),
		"nbf": c.NotBefore.Unix(),
	}
	if len(c.Audience) == 1 {
		payload["aud"] = c.Audience[0]
	} else {
		payload["aud"] = c.Audience
	}
	for k, v := range c.Extra {
		payload[k] = v
	}
	header := map[string]any{"alg": "RS256", "typ": "JWT", "kid": i.KeyID()}
	return i.Sign(header, payload)
}

// MintExpired returns a correctly signed token for subject whose exp is one
// minute in the past.
func (i *Issuer) MintExpired(subject string) string {
	now := time.Now()
	return i.Mint(Claims{Subject: subject, IssuedAt: now.Add(-time.Hour), ExpiresAt: now.Add(-time.Minute)})
}

// Sign encodes header and payload as JSON and signs them with RS256 using the
// issuer's key, whatever alg the header claims. Tests use it to build
// malformed tokens.
func (i *Issuer) Sign(header, payload map[string]any) string {
	hb, err := json.Marshal(header)
	if err != nil {
		panic(fmt.Sprintf("oidc: marshal header: %v", err))
	}
	pb, err := json.Marshal(payload)
	if err != nil {
		panic(fmt.Sprintf("oidc: marshal payload: %v", err))
	}
	signingInput := base64.RawURLEncoding.EncodeToString(hb) + "." + base64.RawURLEncoding.EncodeToString(pb)
	sum := sha256.Sum256([]byte(signingInput))
	i.mu.RLock()
	key := i.key
	i.mu.RUnlock()
	sig, err := rsa.SignPKCS1v15(rand.Reader, key, crypto.SHA256, sum[:])
	if err != nil {
		panic(fmt.Sprintf("oidc: sign: %v", err))
	}
	return signingInput + "." + base64.RawURLEncoding.EncodeToString(sig)
}

// WriteTokenFile writes jwt to path atomically (temporary file in the same
// directory, then rename), mode 0600, as a token agent would.
func WriteTokenFile(path, jwt string) error {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return fmt.Errorf("oidc: write token file: %w", err)
	}
	tmp := f.Name()
	if _, err := f.WriteString(jwt); err != nil {
		f.Close()
		os.Remove(tmp)
		return fmt.Errorf("oidc: write token file: %w", err)
	}
	if err := f.Chmod(0o600); err != nil {
		f.Close()
		os.Remove(tmp)
		return fmt.Errorf("oidc: write token file: %w", err)
	}
	if err := f.Close(); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("oidc: write token file: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("oidc: write token file: %w", err)
	}
	return nil
}
