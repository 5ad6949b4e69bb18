package proxy

import (
	"math/rand/v2"
	"net/http"
	"net/url"
	"regexp"
	"strings"
	"testing"
	"time"
)

// versionReference is the plain statement of isVersion.
var versionReference = regexp.MustCompile(`^(latest|1\.0|[0-9]{4}-[0-9]{2}-[0-9]{2})$`)

// routeOfReference is the plain statement of routeOf (the non-empty
// segments, split with an allocation); routeOf must agree with it.
func routeOfReference(path string) (route, role string) {
	segs := strings.FieldsFunc(path, func(r rune) bool { return r == '/' })
	if len(segs) == 3 && segs[0] == "latest" && segs[1] == "api" && segs[2] == "token" {
		return routeToken, ""
	}
	if len(segs) > 0 && !versionReference.MatchString(segs[0]) {
		return routeNotFound, ""
	}
	if len(segs) < 3 || !strings.EqualFold(segs[1], "meta-data") || !strings.EqualFold(segs[2], "iam") {
		return routePassthrough, ""
	}
	rest := segs[3:]
	switch {
	case len(rest) == 0:
		return routeIAMList, ""
	case len(rest) == 1 && rest[0] == "info":
		return routeIAMInfo, ""
	case len(rest) == 1 && (rest[0] == "security-credentials" || rest[0] == "security-credentials-extended"):
		return routeRoleList, ""
	case len(rest) == 2 && rest[0] == "security-credentials":
		return routeCredentials, rest[1]
	case len(rest) == 2 && rest[0] == "security-credentials-extended":
		return routeCredentialsExtended, rest[1]
	}
	return routeNotFound, ""
}

// badPathReference is the plain statement of badPath.
func badPathReference(u *url.URL) bool {
	p := u.Path
	if p == "" || p[0] != '/' || strings.ContainsRune(p, '\\') {
		return true
	}
	for i := 0; i < len(p); i++ {
		if p[i] < 0x20 || p[i] == 0x7f {
			return true
		}
	}
	for seg := range strings.SplitSeq(p, "/") {
		if seg == "." || seg == ".." {
			return true
		}
	}
	if raw := strings.ToLower(u.RawPath); raw != "" {
		for _, esc := range []string{"%2f", "%2e", "%5c"} {
			if strings.Contains(raw, esc) {
				return true
			}
		}
	}
	return false
}

// TestRouteOfAndBadPathAgreeWithReference: the allocation-free routeOf and
// badPath (they run on every request) decide every path of random
// concatenations of the interesting pieces as their plain statements do.
func TestRouteOfAndBadPathAgreeWithReference(t *testing.T) {
	parts := []string{"/", "//", "latest", "latest", "1.0", "2021-07-15", "2021-7-15", "Latest", "api", "token", "meta-data", "META-DATA", "iam", "info", "security-credentials", "security-credentials-extended", "role", ".", "..", "\\", "\x00", "\x7f", "%2F", "%2e", "a", "é", ""}
	r := rand.New(rand.NewPCG(1, 2))
	for range 200000 {
		var b strings.Builder
		n := r.IntN(12)
		for range n {
			b.WriteString(parts[r.IntN(len(parts))])
		}
		p := b.String()
		r1, o1 := routeOfReference(p)
		r2, o2 := routeOf(p)
		if r1 != r2 || o1 != o2 {
			t.Fatalf("routeOf(%q) = %q, %q; the reference says %q, %q", p, r2, o2, r1, o1)
		}
		u := &url.URL{Path: p}
		if r.IntN(3) == 0 {
			u.RawPath = strings.ReplaceAll(p, "/", "%2F")
		}
		if badPathReference(u) != badPath(u) {
			t.Fatalf("badPath(%q, raw %q) = %v, the reference says %v", p, u.RawPath, badPath(u), badPathReference(u))
		}
	}
}

// TestTokenRememberedPerConnection: a token verified once on a connection
// is not verified again there while it is the same string, but its expiry
// still ends it, and any other string on that connection is verified in
// full.
func TestTokenRememberedPerConnection(t *testing.T) {
	e := newEnv(t, Config{Plan: planOf(t, defaultPlanConfig()), TokensRequired: true})
	base, c := serveEnv(t, e)
	url := base + "/latest/meta-data/iam/security-credentials/" + testRole
	tok, _, err := e.s.minter.mint(e.clock.now(), 2, e.plan.Gen())
	if err != nil {
		t.Fatal(err)
	}
	for i := range 3 {
		if r := fetch(t, c, http.MethodGet, url, tok); r.code != http.StatusOK {
			t.Fatalf("request %d with a valid token: %d %q", i, r.code, r.body)
		}
	}
	// A forged token of the same length, on the same connection.
	forged := []byte(tok)
	forged[len(forged)-2] ^= 1
	if r := fetch(t, c, http.MethodGet, url, string(forged)); r.code != http.StatusUnauthorized {
		t.Fatalf("a forged token after a valid one: %d %q", r.code, r.body)
	}
	if r := fetch(t, c, http.MethodGet, url, tok); r.code != http.StatusOK {
		t.Fatalf("the valid token again: %d %q", r.code, r.body)
	}
	e.clock.add(3 * time.Second)
	if r := fetch(t, c, http.MethodGet, url, tok); r.code != http.StatusUnauthorized {
		t.Fatalf("the remembered token after its expiry: %d %q", r.code, r.body)
	}
}
