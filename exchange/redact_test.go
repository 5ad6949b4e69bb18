package exchange

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strings"
	"sync"
	"testing"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

// jwtFragment is what must never survive redaction: the start of a JWT
// header followed by enough of it to carry claims.
var jwtFragment = regexp.MustCompile(`eyJ[A-Za-z0-9_-]{10,}`)

// TestTokenEchoCutByTruncation: STS echoes the token in a long message,
// so that the 256-byte cut falls inside the token. Neither the error (what
// /debug/cache shows as last_error) nor the log may keep any of it: the
// message is redacted before it is cut, and a cut-off JWT is redacted too.
func TestTokenEchoCutByTruncation(t *testing.T) {
	for _, pad := range []int{0, 100, 180, 200, 230, 250, 260} {
		t.Run(fmt.Sprint(pad), func(t *testing.T) {
			msg := strings.Repeat("x", pad) + " Request ... WebIdentityToken=" + testJWT + "&amp;RoleArn=" + testRoleARN
			fake := newFakeSTS(t, response{status: 403, body: errorXML("Sender", "AccessDenied", msg)})
			core, logs := observer.New(zapcore.DebugLevel)
			w := newTestWebIdentity(t, fake.srv.URL, WebIdentityConfig{MaxAttempts: 1},
				&tokenSource{tokens: []string{testJWT}}, zap.New(core))
			_, err := w.Fetch(context.Background(), testRole)
			var e *Error
			if !errors.As(err, &e) {
				t.Fatal(err)
			}
			text := err.Error() + "\n" + fmt.Sprintf("%+v", err)
			for _, l := range logs.All() {
				text += fmt.Sprintf("\n%s %v", l.Message, l.ContextMap())
			}
			if m := jwtFragment.FindString(text); m != "" {
				t.Fatalf("a JWT fragment %q survived:\n%s", m, text)
			}
			if len(e.Message) > maxMessage {
				t.Fatalf("message of %d bytes", len(e.Message))
			}
		})
	}
}

// TestClassifyRedactsEveryPath: Classify redacts JWT-shaped text and
// long-term key ids whatever the path (an STS error document, a transport
// error whose tail is kept), before cutting.
func TestClassifyRedactsEveryPath(t *testing.T) {
	long := strings.Repeat("y", 300)
	for name, err := range map[string]error{
		"transport tail": fmt.Errorf("%s Post \"https://sts.example/?WebIdentityToken=%s\": connection reset", long, testJWT),
	} {
		e := Classify(err)
		if m := jwtFragment.FindString(e.Message); m != "" {
			t.Errorf("%s: JWT fragment %q in %q", name, m, e.Message)
		}
	}
	// An STS error document (the head is kept): a cut-off token and a
	// long-term key id.
	msg := "signed by AKIAIOSFODNN7EXAMPLE with token " + testJWT[:60] + " " + long
	fake := newFakeSTS(t, response{status: 400, body: errorXML("Sender", "ValidationError", msg)})
	w := newTestWebIdentity(t, fake.srv.URL, WebIdentityConfig{MaxAttempts: 1}, &tokenSource{tokens: []string{testJWT}}, nil)
	_, err := w.Fetch(context.Background(), testRole)
	var e *Error
	if !errors.As(err, &e) || e.Code != "ValidationError" {
		t.Fatalf("err = %v", err)
	}
	if m := jwtFragment.FindString(err.Error()); m != "" {
		t.Errorf("JWT fragment %q in %q", m, err)
	}
	if strings.Contains(err.Error(), "AKIAIOSFODNN7EXAMPLE") || !strings.Contains(err.Error(), "AKIA…<redacted>") {
		t.Errorf("long-term key id not redacted: %q", err)
	}
}

// TestFederationEchoCutByTruncation: a federation endpoint's error body
// quoting the bearer token, in JSON or as plain text, wherever the cut to
// 256 bytes falls.
func TestFederationEchoCutByTruncation(t *testing.T) {
	var mu sync.Mutex
	var ctype, body string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		defer mu.Unlock()
		w.Header().Set("Content-Type", ctype)
		w.WriteHeader(http.StatusUnauthorized)
		_, _ = io.WriteString(w, body)
	}))
	t.Cleanup(srv.Close)
	core, logs := observer.New(zapcore.DebugLevel)
	fed, err := NewFederation(FederationConfig{URL: srv.URL}, &tokenSource{tokens: []string{testJWT}}, zap.New(core))
	if err != nil {
		t.Fatal(err)
	}
	for _, pad := range []int{0, 150, 200, 230, 250, 16370, 20000} {
		for _, ct := range []string{"application/json", "text/plain"} {
			mu.Lock()
			ctype = ct
			text := strings.Repeat("z", pad) + " Authorization: Bearer " + testJWT + " key AKIAIOSFODNN7EXAMPLE"
			body = text
			if ct == "application/json" {
				body = `{"code":"Unauthorized","message":"` + text + `"}`
			}
			mu.Unlock()
			_, err := fed.Fetch(context.Background(), testRole)
			if err == nil {
				t.Fatal("no error")
			}
			if m := jwtFragment.FindString(err.Error()); m != "" || strings.Contains(err.Error(), "AKIAIOSFODNN7EXAMPLE") {
				t.Fatalf("pad %d %s: %q leaks", pad, ct, err)
			}
		}
	}
	for _, l := range logs.All() {
		if s := fmt.Sprint(l.ContextMap()); jwtFragment.MatchString(s) {
			t.Fatalf("log line %q leaks: %s", l.Message, s)
		}
	}
}

// FuzzMessageRedaction: for any text with a JWT put at any offset and any
// cut length, from the head or the tail, the message kept never contains
// "eyJ" followed by 10 or more base64url characters.
func FuzzMessageRedaction(f *testing.F) {
	f.Add("WebIdentityToken=", "&RoleArn=x", uint16(17), uint16(256), false)
	f.Add(strings.Repeat("x", 240), "", uint16(240), uint16(256), false)
	f.Add("Post \"https://sts/?t=", "\": EOF", uint16(21), uint16(40), true)
	f.Fuzz(func(t *testing.T, before, after string, where, max uint16, keepTail bool) {
		at := int(where) % (len(before) + 1)
		n := int(max)%1024 + 8 // room for the ellipsis
		for _, in := range []string{
			before[:at] + testJWT + before[at:] + after,
			before[:at] + testJWT[:len(testJWT)*int(where%7)/7] + before[at:] + after,
		} {
			out := sanitizeMessage(in, n, keepTail)
			if m := jwtFragment.FindString(out); m != "" {
				t.Fatalf("sanitizeMessage(%q, %d, %v) = %q keeps %q", in, n, keepTail, out, m)
			}
			if len(out) > n {
				t.Fatalf("%d bytes, max %d", len(out), n)
			}
			e := &Error{Op: "op", Class: ClassOther, Message: in, Code: in}
			if m := jwtFragment.FindString(e.Error()); m != "" {
				t.Fatalf("Error() keeps %q", m)
			}
		}
	})
}
