package oidc

import (
	"crypto"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestMintVerifiesAgainstServedJWKS(t *testing.T) {
	iss := Start(t)
	tok := iss.Mint(Claims{Subject: "host-7", Extra: map[string]any{"env": "test"}})

	resp, err := http.Get(iss.URL() + "/.well-known/openid-configuration")
	if err != nil {
		t.Fatal(err)
	}
	var disc struct {
		Issuer  string `json:"issuer"`
		JWKSURI string `json:"jwks_uri"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&disc); err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if disc.Issuer != iss.URL() || disc.JWKSURI != iss.URL()+"/jwks" {
		t.Fatalf("discovery = %+v", disc)
	}
	resp, err = http.Get(disc.JWKSURI)
	if err != nil {
		t.Fatal(err)
	}
	var raw json.RawMessage
	if err := json.NewDecoder(resp.Body).Decode(&raw); err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	keys, err := ParseJWKS(raw)
	if err != nil {
		t.Fatal(err)
	}

	parts := strings.Split(tok, ".")
	if len(parts) != 3 {
		t.Fatalf("token has %d parts", len(parts))
	}
	var hdr map[string]string
	hb, _ := base64.RawURLEncoding.DecodeString(parts[0])
	if err := json.Unmarshal(hb, &hdr); err != nil {
		t.Fatal(err)
	}
	if hdr["alg"] != "RS256" || hdr["kid"] != iss.KeyID() || hdr["typ"] != "JWT" {
		t.Fatalf("header = %v", hdr)
	}
	pub := keys[hdr["kid"]]
	if pub == nil {
		t.Fatalf("kid %q not in JWKS", hdr["kid"])
	}
	if pub.N.BitLen() != 2048 {
		t.Fatalf("key has %d bits", pub.N.BitLen())
	}
	sig, _ := base64.RawURLEncoding.DecodeString(parts[2])
	sum := sha256.Sum256([]byte(parts[0] + "." + parts[1]))
	if err := rsa.VerifyPKCS1v15(pub, crypto.SHA256, sum[:], sig); err != nil {
		t.Fatalf("signature: %v", err)
	}
	var claims map[string]any
	pb, _ := base64.RawURLEncoding.DecodeString(parts[1])
	if err := json.Unmarshal(pb, &claims); err != nil {
		t.Fatal(err)
	}
	if claims["iss"] != iss.URL() || claims["sub"] != "host-7" || claims["aud"] != DefaultAudience || claims["env"] != "test" {
		t.Fatalf("claims = %v", claims)
	}
	exp, iat := claims["exp"].(float64), claims["iat"].(float64)
	if exp-iat != 3600 {
		t.Fatalf("exp-iat = %v", exp-iat)
	}
}

func TestMintExpiredAndMultiAudience(t *testing.T) {
	iss, err := New(Options{URL: "https://issuer.test"})
	if err != nil {
		t.Fatal(err)
	}
	claimsOf := func(tok string) map[string]any {
		pb, _ := base64.RawURLEncoding.DecodeString(strings.Split(tok, ".")[1])
		var c map[string]any
		if err := json.Unmarshal(pb, &c); err != nil {
			t.Fatal(err)
		}
		return c
	}
	c := claimsOf(iss.MintExpired("h"))
	if int64(c["exp"].(float64)) >= time.Now().Unix() {
		t.Fatalf("MintExpired exp %v is not in the past", c["exp"])
	}
	c = claimsOf(iss.Mint(Claims{Audience: []string{"a", "b"}}))
	if aud, ok := c["aud"].([]any); !ok || len(aud) != 2 {
		t.Fatalf("aud = %#v", c["aud"])
	}
}

func TestWriteTokenFile(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "token.jwt")
	for _, v := range []string{"first", "second"} {
		if err := WriteTokenFile(p, v); err != nil {
			t.Fatal(err)
		}
		b, err := os.ReadFile(p)
		if err != nil || string(b) != v {
			t.Fatalf("read %q, %v; want %q", b, err, v)
		}
	}
	st, _ := os.Stat(p)
	if st.Mode().Perm() != 0o600 {
		t.Fatalf("mode %v", st.Mode())
	}
	ents, _ := os.ReadDir(dir)
	if len(ents) != 1 {
		t.Fatalf("temporary files left behind: %v", ents)
	}
}
