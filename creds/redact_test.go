package creds

import (
	"regexp"
	"strings"
	"testing"
)

const (
	testJWT = "eyJhbGciOiJSUzI1NiIsImtpZCI6InRlc3QifQ.eyJzdWIiOiJob3N0LWEiLCJleHAiOjE5MDAwMDAwMDB9.U0VDUkVUU0lHTkFUVVJFVkFMVUU"
	// A JWS whose header is `{ "alg": "ES256" }` (a space after the brace).
	spacedJWS     = "eyAiYWxnIjogIkVTMjU2IiB9.eyAic3ViIjogImhvc3QtYSIgfQ.c2lnbmF0dXJlLXNpZ25hdHVyZS1zaWduYXR1cmU"
	testSecret    = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
	testSession   = "IQoJb3JpZ2luX2VjEJr//////////wEaCXVzLWVhc3QtMSJHMEUCIQD6"
	testLongTerm  = "AKIAIOSFODNN7EXAMPLE"
	testTemporary = "ASIAIOSFODNN7EXAMPLE"
)

// jwtFragment is what RedactText must never leave behind.
var jwtFragment = regexp.MustCompile(`eyJ[A-Za-z0-9_-]{10,}`)

func TestRedactText(t *testing.T) {
	cases := []struct{ in, want string }{
		{"", ""},
		{"nothing to see: AccessDenied (HTTP 403)", "nothing to see: AccessDenied (HTTP 403)"},
		{"WebIdentityToken=" + testJWT + "&RoleArn=x", "WebIdentityToken=<redacted-jwt>&RoleArn=x"},
		{"token " + testJWT + ".", "token <redacted-jwt>."},
		// Cut off: two parts, one part, a part and a dot.
		{"cut " + testJWT[:60], "cut <redacted-jwt>"},
		{"cut " + testJWT[:38] + ".", "cut <redacted-jwt>."},
		{"cut " + testJWT[:20] + "…", "cut <redacted-jwt>…"},
		// Too little of it left to carry anything: kept.
		{"eyJhbGciOi", "eyJhbGciOi"},
		{"bearer " + spacedJWS + " refused", "bearer <redacted-jwt> refused"},
		// Host names are not JWTs.
		{"lookup sts.us-east-1.amazonaws.com: no such host", "lookup sts.us-east-1.amazonaws.com: no such host"},
		{"key " + testLongTerm + " is disabled", "key AKIA…<redacted> is disabled"},
		{"key " + testTemporary + " expired", "key " + testTemporary + " expired"},
		{"id=" + testLongTerm + "/20260101/us-east-1/sts/aws4_request", "id=AKIA…<redacted>/20260101/us-east-1/sts/aws4_request"},
		{"xAKIAIOSFODNN7EXAMPLEX", "xAKIA…<redacted>X"}, // glued: redacted all the same
		{"secret=" + testSecret, "secret=<redacted>"},
		{`"SecretAccessKey": "` + testSecret + `"`, `"SecretAccessKey": "<redacted>"`},
		{"<SecretAccessKey>" + testSecret + "</SecretAccessKey>", "<SecretAccessKey><redacted></SecretAccessKey>"},
		{"aws_secret_access_key = abcdefghijklmnopqrstuvwxyzabcdefghijklmn", "aws_secret_access_key = <redacted>"},
		{"got " + testSecret + " back", "got <redacted> back"},
		// A SHA-1 hex digest is 40 characters too, but not a secret.
		{"commit 2fd4e1c67a2d28fced849ee1bb76e7391b93eb12", "commit 2fd4e1c67a2d28fced849ee1bb76e7391b93eb12"},
		{"<SessionToken>" + testSession + "</SessionToken>", "<SessionToken><redacted-session-token></SessionToken>"},
		{"X-Amz-Security-Token: c2Vzc2lvbi10b2tlbi12YWx1ZQ==", "X-Amz-Security-Token: <redacted>"},
		{`{"token":"c2Vzc2lvbi10b2tlbi12YWx1ZQ"}`, `{"token":"<redacted>"}`},
		{"blob " + strings.Repeat("QUJDx9", 40) + " end", "blob <redacted-blob> end"},
		{"padding " + strings.Repeat("m", 300), "padding " + strings.Repeat("m", 300)},
	}
	for _, tc := range cases {
		if got := RedactText(tc.in); got != tc.want {
			t.Errorf("RedactText(%q)\n  = %q\nwant %q", tc.in, got, tc.want)
		}
		if got := RedactText(tc.want); got != tc.want {
			t.Errorf("not idempotent: RedactText(%q) = %q", tc.want, got)
		}
	}
}

// checkRedacted fails when out holds a JWT fragment, a long-term key id or
// the secret key.
func checkRedacted(t *testing.T, in, out string) {
	t.Helper()
	if m := jwtFragment.FindString(out); m != "" {
		t.Fatalf("RedactText(%q) = %q keeps the JWT fragment %q", in, out, m)
	}
	if strings.Contains(out, testLongTerm) || strings.Contains(out, testSecret) {
		t.Fatalf("RedactText(%q) = %q keeps a key", in, out)
	}
	if again := RedactText(out); again != out {
		t.Fatalf("not idempotent: %q then %q", out, again)
	}
}

// FuzzRedactText: whatever the text around it, wherever a JWT is put and
// wherever the text is cut (a message cut to length before it reaches
// RedactText), no "eyJ" followed by 10 or more base64url characters
// survives; neither do a long-term key id nor a secret key put next to it.
func FuzzRedactText(f *testing.F) {
	f.Add("WebIdentityToken=", "&RoleArn=arn", uint16(0), uint16(300))
	f.Add("", "", uint16(5), uint16(40))
	f.Add("eyJ", "eyJhbGciOiJIUzI1NiJ9", uint16(7), uint16(65535))
	f.Add("x.", ".y", uint16(100), uint16(90))
	f.Add("AKIA", "====", uint16(3), uint16(17))
	f.Fuzz(func(t *testing.T, before, after string, where, cut uint16) {
		out := RedactText(before + after)
		if m := jwtFragment.FindString(out); m != "" && !strings.Contains(before+after, m) {
			t.Fatalf("RedactText(%q) made up %q", before+after, m)
		}
		checkRedacted(t, before+after, out)

		mid := int(where) % (len(before) + 1)
		for _, secret := range []string{testJWT, testLongTerm, testSecret} {
			in := before[:mid] + " " + secret + " " + before[mid:] + after
			checkRedacted(t, in, RedactText(in))
			n := int(cut) % (len(in) + 1)
			checkRedacted(t, in[:n], RedactText(in[:n]))
		}
		// A JWT glued to whatever is around it.
		in := before[:mid] + testJWT + before[mid:] + after
		n := int(cut) % (len(in) + 1)
		checkRedacted(t, in[:n], RedactText(in[:n]))
	})
}
