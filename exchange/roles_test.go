package exchange

import (
	"context"
	"fmt"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/imdsproxy/imdsproxy/creds"
	"github.com/imdsproxy/imdsproxy/test/fakes/rolesanywhere"
	fakests "github.com/imdsproxy/imdsproxy/test/fakes/sts"
)

// sentRole is what a fake saw of one call: the role ARN, the session name
// and the duration in seconds (0: none sent).
type sentRole struct {
	ARN     string
	Session string
	Seconds int
}

func (s sentRole) String() string { return fmt.Sprintf("%s/%s/%ds", s.ARN, s.Session, s.Seconds) }

// formRole reads a sentRole from the form of an STS call.
func formRole(r recorded) sentRole {
	n, _ := strconv.Atoi(r.form.Get("DurationSeconds"))
	return sentRole{ARN: r.form.Get("RoleArn"), Session: r.form.Get("RoleSessionName"), Seconds: n}
}

// roleAnswering answers every STS call with credentials of the role (and
// session) it asked for, in the shape of its Action.
func roleAnswering(_ int, r recorded) response {
	return response{status: 200, body: stsResultXML(r.form.Get("Action"),
		assumedARNOf(r.form.Get("RoleArn"), r.form.Get("RoleSessionName")), time.Now().Add(time.Hour))}
}

// staticBase is long-term base credentials for AssumeRole (no session token,
// so STS allows up to 12h, no role chaining).
func staticBase(key, secret string) aws.CredentialsProvider {
	return aws.CredentialsProviderFunc(func(context.Context) (aws.Credentials, error) {
		return aws.Credentials{AccessKeyID: key, SecretAccessKey: secret, Source: "test"}, nil
	})
}

// roleSource is one source under test: the source and what its fake saw.
type roleSource struct {
	name  string
	setup func(t *testing.T) (creds.Fetcher, func() []sentRole)
}

// stsRoleSources are the sources that call STS AssumeRole*; their fakes
// answer with the role asked for.
var stsRoleSources = []roleSource{
	{"web-identity", func(t *testing.T) (creds.Fetcher, func() []sentRole) {
		fake := newFakeSTSFunc(t, roleAnswering)
		w := newTestWebIdentity(t, fake.srv.URL, WebIdentityConfig{MaxAttempts: 1}, &tokenSource{tokens: []string{testJWT}}, nil)
		return w, func() []sentRole {
			var out []sentRole
			for _, c := range fake.calls() {
				out = append(out, formRole(c))
			}
			return out
		}
	}},
	{"assume-role", func(t *testing.T) (creds.Fetcher, func() []sentRole) {
		e := newAREnv(t, fakests.Config{}) // signatures verified
		e.sts.AllowRoles("arn:aws:iam::333333333333:role/jobs/batch")
		e.sts.AllowBase("AKIALONGTERMBASEKEY0", "longTermBaseSecretEXAMPLE")
		a := e.newAssumeRole(t, AssumeRoleConfig{MaxAttempts: 1, Base: staticBase("AKIALONGTERMBASEKEY0", "longTermBaseSecretEXAMPLE")}, nil)
		return a, func() []sentRole {
			var out []sentRole
			for _, c := range e.sts.CallLog() {
				if !c.SignatureValid {
					t.Errorf("call %+v not validly signed", c)
				}
				out = append(out, sentRole{ARN: c.RoleARN, Session: c.RoleSessionName, Seconds: c.DurationSeconds})
			}
			return out
		}
	}},
}

// TestSourcesUseHandedRole: one source object fetches whichever role it is
// handed — ARN, session name (sanitized) and duration go to the service as
// given on each call, and the credentials are the handed role's — also
// when several roles are fetched concurrently.
func TestSourcesUseHandedRole(t *testing.T) {
	roleOne := creds.Role{Name: "app", ARN: testRoleARN, SessionName: "sess-one", Duration: 2 * time.Hour}
	roleTwo := creds.Role{Name: "batch", ARN: "arn:aws:iam::333333333333:role/jobs/batch", SessionName: "sess two", Duration: 45 * time.Minute}
	sentOne := sentRole{ARN: roleOne.ARN, Session: "sess-one", Seconds: 7200}
	sentTwo := sentRole{ARN: roleTwo.ARN, Session: "sess-two", Seconds: 2700}

	sources := append([]roleSource(nil), stsRoleSources...)
	sources = append(sources, roleSource{"roles-anywhere", func(t *testing.T) (creds.Fetcher, func() []sentRole) {
		fake := rolesanywhere.Start(t, rolesanywhere.Config{ // any role; signatures verified
			Roots: sharedCA(t).Pool(), TrustAnchorARN: testTrustAnchor, ProfileARN: testProfile,
		})
		r := newTestRolesAnywhere(t, fake.URL, RolesAnywhereConfig{MaxAttempts: 1}, issueLeaf(t, rolesanywhere.LeafOptions{}), nil)
		return r, func() []sentRole {
			if n := len(fake.CallLog()); n != len(fake.Issued()) {
				t.Errorf("%d calls, %d issued: %+v", n, len(fake.Issued()), fake.CallLog())
			}
			var out []sentRole
			for _, is := range fake.Issued() {
				out = append(out, sentRole{ARN: is.RoleARN, Session: is.RoleSessionName, Seconds: is.DurationSeconds})
			}
			return out
		}
	}})

	for _, src := range sources {
		t.Run(src.name, func(t *testing.T) {
			f, seen := src.setup(t)
			steps := []struct {
				role creds.Role
				sent sentRole
			}{{roleOne, sentOne}, {roleTwo, sentTwo}, {roleOne, sentOne}}
			var want []sentRole
			for i, st := range steps {
				c, err := f.Fetch(context.Background(), st.role)
				if err != nil {
					t.Fatalf("fetch %d (%s): %v", i, st.role.Name, err)
				}
				if wantARN := assumedARNOf(st.role.ARN, st.sent.Session); c.RoleARN != wantARN ||
					c.AccountID != creds.AccountFromARN(st.role.ARN) || !c.Complete() {
					t.Errorf("fetch %d: credentials of %q (account %q), want %q", i, c.RoleARN, c.AccountID, wantARN)
				}
				want = append(want, st.sent)
			}
			if got := seen(); fmt.Sprint(got) != fmt.Sprint(want) {
				t.Fatalf("the service saw\n%v\nwant\n%v", got, want)
			}

			// Concurrently: every caller gets its own role's credentials.
			var wg sync.WaitGroup
			errs := make(chan error, 8)
			for i := 0; i < 8; i++ {
				role, session := roleOne, sentOne.Session
				if i%2 == 1 {
					role, session = roleTwo, sentTwo.Session
				}
				wg.Add(1)
				go func() {
					defer wg.Done()
					c, err := f.Fetch(context.Background(), role)
					switch {
					case err != nil:
						errs <- err
					case c.RoleARN != assumedARNOf(role.ARN, session):
						errs <- fmt.Errorf("asked for %s, got credentials of %s", role.ARN, c.RoleARN)
					}
				}()
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Error(err)
			}
			counts := map[sentRole]int{}
			for _, s := range seen()[len(want):] {
				counts[s]++
			}
			if counts[sentOne] != 4 || counts[sentTwo] != 4 || len(counts) != 2 {
				t.Errorf("concurrent calls sent %v, want 4 of each role", counts)
			}
		})
	}
}

// TestDurationCapPerRole: when STS refuses role A's duration as longer than
// A allows, A is asked for 1h from then on, but role B (same configured
// duration, same source) is still asked for its own duration first.
func TestDurationCapPerRole(t *testing.T) {
	roleA := creds.Role{Name: "app", ARN: testRoleARN, SessionName: "host-1", Duration: 12 * time.Hour}
	roleB := creds.Role{Name: "batch", ARN: "arn:aws:iam::222222222222:role/batch", SessionName: "host-1", Duration: 12 * time.Hour}
	tooLong := errorXML("Sender", "ValidationError", "The requested DurationSeconds exceeds the MaxSessionDuration set for this role.")
	// Role A's MaxSessionDuration is 1h; role B's is 12h.
	answer := func(n int, r recorded) response {
		if s := formRole(r); s.ARN == roleA.ARN && s.Seconds > 3600 {
			return response{status: 400, body: tooLong}
		}
		return roleAnswering(n, r)
	}
	for _, tc := range []struct {
		name string
		new  func(t *testing.T, url string, log *zap.Logger) creds.Fetcher
	}{
		{"web-identity", func(t *testing.T, url string, log *zap.Logger) creds.Fetcher {
			return newTestWebIdentity(t, url, WebIdentityConfig{MaxAttempts: 1}, &tokenSource{tokens: []string{testJWT}}, log)
		}},
		{"assume-role", func(t *testing.T, url string, log *zap.Logger) creds.Fetcher {
			isolateAWSEnv(t)
			t.Setenv("AWS_ENDPOINT_URL_STS", url)
			a, err := NewAssumeRole(context.Background(), AssumeRoleConfig{MaxAttempts: 1, Base: staticBase("AKIALONGTERMBASEKEY0", "secret")}, log)
			if err != nil {
				t.Fatal(err)
			}
			return a
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fake := newFakeSTSFunc(t, answer)
			core, logs := observer.New(zapcore.WarnLevel)
			f := tc.new(t, fake.srv.URL, zap.New(core))
			for i, role := range []creds.Role{roleA, roleB, roleA, roleB} {
				c, err := f.Fetch(context.Background(), role)
				if err != nil {
					t.Fatalf("fetch %d (%s): %v", i, role.Name, err)
				}
				if c.RoleARN != assumedARNOf(role.ARN, role.SessionName) {
					t.Fatalf("fetch %d: credentials of %s", i, c.RoleARN)
				}
			}
			var got []sentRole
			for _, c := range fake.calls() {
				got = append(got, formRole(c))
			}
			want := []sentRole{
				{roleA.ARN, "host-1", 43200}, // refused
				{roleA.ARN, "host-1", 3600},  // repeated with 1h
				{roleB.ARN, "host-1", 43200}, // B is not capped by A's refusal
				{roleA.ARN, "host-1", 3600},  // A stays capped
				{roleB.ARN, "host-1", 43200},
			}
			if fmt.Sprint(got) != fmt.Sprint(want) {
				t.Fatalf("STS was asked\n%v\nwant\n%v", got, want)
			}
			if n := logs.FilterMessageSnippet("MaxSessionDuration").Len(); n != 1 {
				t.Errorf("%d warnings about MaxSessionDuration, want 1 (role A only): %v", n, logs.All())
			}
		})
	}
}
