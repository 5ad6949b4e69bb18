package token

import (
	"encoding/base64"
	"errors"
	"reflect"
	"strings"
	"testing"
	"time"
	"unicode/utf8"
)

func seg(s string) string { return base64.RawURLEncoding.EncodeToString([]byte(s)) }

const goodHeader = `{"alg":"RS256","typ":"JWT"}`

func jwtOf(header, payload string) string { return seg(header) + "." + seg(payload) + "." + seg("sig") }

func TestParseClaims(t *testing.T) {
	exp := time.Unix(1900000000, 0).UTC()
	tests := []struct {
		name string
		jwt  string
		want Claims
	}{
		{"minimal", jwtOf(goodHeader, `{"exp":1900000000}`), Claims{Expiry: exp}},
		{"full", jwtOf(goodHeader, `{"iss":"https://i","sub":"host","aud":"sts.amazonaws.com","exp":1900000000,"iat":1899990000,"nbf":1899990000.5,"other":{"x":[1]}}`),
			Claims{Issuer: "https://i", Subject: "host", Audience: []string{"sts.amazonaws.com"}, Expiry: exp,
				IssuedAt: time.Unix(1899990000, 0).UTC(), NotBefore: time.Unix(1899990000, 5e8).UTC()}},
		{"aud array", jwtOf(goodHeader, `{"aud":["a","b"],"exp":1900000000}`), Claims{Audience: []string{"a", "b"}, Expiry: exp}},
		{"float exp", jwtOf(goodHeader, `{"exp":1900000000.25}`), Claims{Expiry: exp.Add(250 * time.Millisecond)}},
		{"exponent exp", jwtOf(goodHeader, `{"exp":1.9e9}`), Claims{Expiry: exp}},
		{"null optional claims", jwtOf(goodHeader, `{"exp":1900000000,"iss":null,"aud":null,"iat":null}`), Claims{Expiry: exp}},
		{"padded segments", base64.URLEncoding.EncodeToString([]byte(goodHeader+" ")) + "." +
			base64.URLEncoding.EncodeToString([]byte(`{"exp":1900000000}`)) + "." + base64.URLEncoding.EncodeToString([]byte("si")),
			Claims{Expiry: exp}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseClaims(tc.jwt)
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Errorf("got %+v\nwant %+v", got, tc.want)
			}
		})
	}
}

func TestParseClaimsRejects(t *testing.T) {
	good := jwtOf(goodHeader, `{"exp":1900000000}`)
	p := strings.Split(good, ".")
	tests := map[string]string{
		"empty":              "",
		"two parts":          p[0] + "." + p[1],
		"four parts":         good + "." + p[2],
		"empty signature":    p[0] + "." + p[1] + ".",
		"empty header":       "." + p[1] + "." + p[2],
		"std base64 chars":   p[0] + "." + p[1] + ".ab+/",
		"space":              p[0] + " ." + p[1] + "." + p[2],
		"newline":            p[0] + "." + p[1] + "\n." + p[2],
		"NUL":                p[0] + "\x00." + p[1] + "." + p[2],
		"DEL":                p[0] + "." + p[1] + "." + p[2] + "\x7f",
		"non-ASCII":          p[0] + "." + p[1] + "." + p[2] + "é",
		"too much padding":   p[0] + "===." + p[1] + "." + p[2],
		"bad base64 length":  p[0] + "." + p[1] + "." + "a",
		"header not json":    seg("hello") + "." + p[1] + "." + p[2],
		"header array":       jwtOf(`["alg"]`, `{"exp":1900000000}`),
		"header null":        jwtOf(`null`, `{"exp":1900000000}`),
		"header no alg":      jwtOf(`{"typ":"JWT"}`, `{"exp":1900000000}`),
		"alg none":           jwtOf(`{"alg":"none"}`, `{"exp":1900000000}`),
		"alg NONE":           jwtOf(`{"alg":"NONE"}`, `{"exp":1900000000}`),
		"alg empty":          jwtOf(`{"alg":""}`, `{"exp":1900000000}`),
		"alg number":         jwtOf(`{"alg":256}`, `{"exp":1900000000}`),
		"payload not object": jwtOf(goodHeader, `"exp"`),
		"payload null":       jwtOf(goodHeader, `null`),
		"payload trailing":   jwtOf(goodHeader, `{"exp":1900000000} {}`),
		"no exp":             jwtOf(goodHeader, `{"sub":"x"}`),
		"exp string":         jwtOf(goodHeader, `{"exp":"1900000000"}`),
		"exp null":           jwtOf(goodHeader, `{"exp":null}`),
		"exp bool":           jwtOf(goodHeader, `{"exp":true}`),
		"exp negative":       jwtOf(goodHeader, `{"exp":-1}`),
		"exp huge":           jwtOf(goodHeader, `{"exp":1e300}`),
		"exp overflow":       jwtOf(goodHeader, `{"exp":1e400}`),
		"iat string":         jwtOf(goodHeader, `{"exp":1900000000,"iat":"now"}`),
		"nbf object":         jwtOf(goodHeader, `{"exp":1900000000,"nbf":{}}`),
		"iss number":         jwtOf(goodHeader, `{"exp":1900000000,"iss":1}`),
		"sub array":          jwtOf(goodHeader, `{"exp":1900000000,"sub":["a"]}`),
		"aud number":         jwtOf(goodHeader, `{"exp":1900000000,"aud":1}`),
		"aud mixed array":    jwtOf(goodHeader, `{"exp":1900000000,"aud":["a",1]}`),
		"too large":          jwtOf(goodHeader, `{"exp":1900000000,"x":"`+strings.Repeat("a", MaxTokenSize)+`"}`),
	}
	for name, jwt := range tests {
		t.Run(name, func(t *testing.T) {
			c, err := ParseClaims(jwt)
			if err == nil {
				t.Fatalf("accepted: %+v", c)
			}
			if !errors.Is(err, errMalformed) {
				t.Errorf("error %v does not wrap errMalformed", err)
			}
			if !reflect.DeepEqual(c, Claims{}) {
				t.Errorf("claims returned with an error: %+v", c)
			}
		})
	}
}

// FuzzParseClaims: ParseClaims never panics; anything it accepts has exactly
// three base64url parts and an expiry in range; its errors never quote the
// input.
func FuzzParseClaims(f *testing.F) {
	f.Add(jwtOf(goodHeader, `{"exp":1900000000}`))
	f.Add(jwtOf(goodHeader, `{"iss":"https://i","sub":"host","aud":["a","b"],"exp":1900000000.5,"iat":1,"nbf":2}`))
	f.Add(jwtOf(`{"alg":"none"}`, `{"exp":1}`))
	f.Add(jwtOf(goodHeader, `{"exp":1e308}`))
	f.Add(jwtOf(goodHeader, `{"exp":"1"}`))
	f.Add(jwtOf(`null`, `null`))
	f.Add("a.b.c")
	f.Add("..")
	f.Add("eyJhbGciOiJSUzI1NiJ9==.e30=.c2ln")
	f.Add("")
	f.Fuzz(func(t *testing.T, jwt string) {
		c, err := ParseClaims(jwt)
		if err != nil {
			if len(jwt) >= 16 && strings.Contains(err.Error(), jwt) {
				t.Fatalf("error quotes the input: %v", err)
			}
			return
		}
		if strings.Count(jwt, ".") != 2 || !utf8.ValidString(jwt) {
			t.Fatalf("accepted a token without three parts: %q", jwt)
		}
		if c.Expiry.Unix() < 0 || c.Expiry.Unix() > maxUnixSeconds {
			t.Fatalf("expiry out of range: %v", c.Expiry)
		}
		// What File uses to spot a token cut short agrees with ParseClaims.
		c2, shape, err := parseJWT(jwt)
		if err != nil || !reflect.DeepEqual(c, c2) || shape.alg == "" || shape.sigLen == 0 {
			t.Fatalf("parseJWT disagrees: %v %+v", err, shape)
		}
		if ok, want := plausibleSignature(shape); !ok && want == "" {
			t.Fatalf("implausible signature without saying what is expected: %+v", shape)
		}
		if !jwtPrefix(jwt) {
			t.Fatalf("an accepted token is not a JWT prefix")
		}
	})
}
