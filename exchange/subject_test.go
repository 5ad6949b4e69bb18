package exchange

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/imdsproxy/imdsproxy/creds"
)

// subjectSource is a token source with per-subject tokens, as token.Command
// and token.URL are: subject s's token is "<s>-<n>".
type subjectSource struct {
	tokenSource
	subjects map[string]*rememberingSource
}

func (s *subjectSource) ForSubject(subject string) (TokenSource, error) {
	if src, ok := s.subjects[subject]; ok {
		return src, nil
	}
	return nil, fmt.Errorf("no such subject %q", subject)
}

// TestWebIdentitySubjectToken: a role with a workload subject is assumed
// with that subject's token — never the host's — and a token STS refuses is
// forgotten by the subject's source, not the host's.
func TestWebIdentitySubjectToken(t *testing.T) {
	const hostJWT, billingJWT, billingJWT2 = "host.jwt.sig", "billing.jwt.sig", "billing.jwt.sig2"
	fake := newFakeSTS(t,
		response{status: 200, body: successXML(time.Now().Add(time.Hour))},
		response{status: 400, body: errorXML("Sender", "InvalidIdentityToken", "Couldn't retrieve verification key")},
		response{status: 200, body: successXML(time.Now().Add(time.Hour))})
	billing := &rememberingSource{tokenSource: tokenSource{tokens: []string{billingJWT, billingJWT2}}}
	src := &subjectSource{tokenSource: tokenSource{tokens: []string{hostJWT}}, subjects: map[string]*rememberingSource{"billing": billing}}
	w := newTestWebIdentity(t, fake.srv.URL, WebIdentityConfig{}, src, nil)

	if _, err := w.Fetch(context.Background(), testRole); err != nil {
		t.Fatal(err)
	}
	role := testRole
	role.Subject = "billing"
	if _, err := w.Fetch(context.Background(), role); err != nil {
		t.Fatal(err)
	}
	calls := fake.calls()
	var sent []string
	for _, c := range calls {
		sent = append(sent, c.form.Get("WebIdentityToken"))
	}
	if want := []string{hostJWT, billingJWT, billingJWT2}; fmt.Sprint(sent) != fmt.Sprint(want) {
		t.Errorf("tokens sent to STS = %q, want %q", sent, want)
	}
	if len(billing.forgot) != 1 || billing.forgot[0] != billingJWT {
		t.Errorf("the subject's source forgot %q, want the refused %q", billing.forgot, billingJWT)
	}
	if src.count() != 1 {
		t.Errorf("the host's source was read %d times, want once (for the host's role only)", src.count())
	}
}

// TestSubjectNeedsPerSubjectTokens: a role with a subject fails permanently,
// before any STS call, when the token source has one subject only (a
// jwt_file) or does not know the subject; and every source without
// per-workload identities refuses such a role instead of using the host's.
func TestSubjectNeedsPerSubjectTokens(t *testing.T) {
	fake := newFakeSTS(t, response{status: 200, body: successXML(time.Now().Add(time.Hour))})
	role := testRole
	role.Subject = "billing"
	for name, tokens := range map[string]TokenSource{
		"one subject only": &tokenSource{tokens: []string{"host.jwt.sig"}},
		"unknown subject":  &subjectSource{tokenSource: tokenSource{tokens: []string{"host.jwt.sig"}}},
	} {
		w := newTestWebIdentity(t, fake.srv.URL, WebIdentityConfig{}, tokens, nil)
		_, err := w.Fetch(context.Background(), role)
		assertSubjectRefused(t, name, err)
	}
	if n := len(fake.calls()); n != 0 {
		t.Errorf("%d STS calls, want none", n)
	}

	f, err := NewFederation(FederationConfig{URL: "http://127.0.0.1:1/"}, &tokenSource{tokens: []string{"host.jwt.sig"}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	_, err = f.Fetch(context.Background(), role)
	assertSubjectRefused(t, "federation", err)

	p, err := NewInstanceProfile(InstanceProfileConfig{IMDSBase: "http://127.0.0.1:1"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	_, err = p.Fetch(context.Background(), creds.Role{Name: "host", Subject: "billing"})
	assertSubjectRefused(t, "instance profile", err)

	for _, op := range []string{opAssumeRole, opCreateSession} {
		assertSubjectRefused(t, op, checkRole(op, role, true))
	}
}

func assertSubjectRefused(t *testing.T, name string, err error) {
	t.Helper()
	var e *Error
	if !errors.As(err, &e) || e.Class != ClassValidation || !e.Permanent() {
		t.Errorf("%s: err = %v, want a permanent validation error", name, err)
	}
}
