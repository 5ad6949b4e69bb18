package token

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
)

// TestCommandFor: a workload's Command runs the same program with
// IMDSPROXY_WORKLOAD=<subject>; the default subject's runs never have it,
// even when the daemon's environment does; each subject's token is cached
// on its own, exactly like the default one.
func TestCommandFor(t *testing.T) {
	t.Setenv(WorkloadEnv, "inherited-from-the-daemon")
	dir := t.TempDir()
	clock := newTestClock(testNow)
	for _, s := range []string{"default", "payments", "spiffe:__example.org_ns_app"} {
		write(t, filepath.Join(dir, "token-"+s), validJWT(t, s))
	}
	// Records the subject of every run, then prints that subject's token.
	body := `if [ "${` + WorkloadEnv + `+set}" = set ]; then w=$` + WorkloadEnv + `; else w=default; fi
echo "$w" >> "` + dir + `/runs"
cat "` + dir + `/token-$(echo "$w" | tr '/' '_')"`
	c, logs := newTestCommand(t, []string{script(t, dir, "mint", body)}, CommandOptions{Now: clock.Now}, nil)
	ctx := context.Background()

	pay, err := c.For("payments")
	if err != nil {
		t.Fatal(err)
	}
	if again, _ := c.For("payments"); again != pay {
		t.Fatal("For twice: two Commands for one subject")
	}
	if def, _ := c.For(""); def != c {
		t.Fatal(`For("") is not the default subject`)
	}
	spiffe, err := c.For("spiffe://example.org/ns/app")
	if err != nil {
		t.Fatal(err)
	}
	if pay.Subject() != "payments" || c.Subject() != "" || pay.Path() != c.Path() {
		t.Fatalf("Subject/Path: %q %q %q", pay.Subject(), c.Subject(), pay.Path())
	}
	for i := range 3 {
		for _, tc := range []struct {
			src *Command
			sub string
		}{{c, "default"}, {pay, "payments"}, {spiffe, "spiffe:__example.org_ns_app"}} {
			tok, err := tc.src.Token(ctx)
			if err != nil {
				t.Fatalf("round %d %s: %v\n%s", i, tc.sub, err, logText(logs))
			}
			if cl, _ := ParseClaims(tok); cl.Subject != tc.sub {
				t.Fatalf("round %d: %s got the token of %q", i, tc.sub, cl.Subject)
			}
		}
	}
	b, _ := os.ReadFile(filepath.Join(dir, "runs"))
	if got := strings.Fields(string(b)); strings.Join(got, " ") != "default payments spiffe://example.org/ns/app" {
		t.Fatalf("runs %q: want one per subject, cached after", got)
	}
	// Forgetting one subject's token runs the program for it alone.
	tok, _ := pay.Token(ctx)
	pay.Forget(tok)
	if _, err := pay.Token(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Token(ctx); err != nil {
		t.Fatal(err)
	}
	b, _ = os.ReadFile(filepath.Join(dir, "runs"))
	if n := strings.Count(string(b), "payments"); n != 2 || strings.Count(string(b), "default") != 1 {
		t.Fatalf("runs after Forget:\n%s", b)
	}
	// Past reuse, every subject runs again.
	clock.Add(55 * time.Minute)
	for _, s := range []string{"default", "payments", "spiffe:__example.org_ns_app"} {
		write(t, filepath.Join(dir, "token-"+s), makeJWT(t, map[string]any{"sub": s, "exp": clock.Now().Add(time.Hour).Unix()}))
	}
	for _, src := range []*Command{c, pay, spiffe} {
		if _, err := src.Token(ctx); err != nil {
			t.Fatal(err)
		}
	}
	b, _ = os.ReadFile(filepath.Join(dir, "runs"))
	if n := len(strings.Fields(string(b))); n != 7 {
		t.Fatalf("%d runs, want 7:\n%s", n, b)
	}
}

// TestCommandForErrorsNameTheWorkload: a subject's failure says which
// subject, in the error and the log line.
func TestCommandForErrorsNameTheWorkload(t *testing.T) {
	dir := t.TempDir()
	c, logs := newTestCommand(t, []string{script(t, dir, "mint", `echo "no token for $`+WorkloadEnv+`" >&2; exit 1`)}, CommandOptions{}, nil)
	w, err := c.For("batch")
	if err != nil {
		t.Fatal(err)
	}
	_, err = w.Token(context.Background())
	var te *Error
	if !errors.As(err, &te) || te.Workload != "batch" || !strings.HasPrefix(err.Error(), "token: "+c.Path()+" (workload batch): command_failed") {
		t.Fatalf("err = %v", err)
	}
	if l := logs.FilterField(zapString("workload", "batch")).Len(); l != 1 {
		t.Fatalf("%d log lines name the workload:\n%s", l, logText(logs))
	}
	if !strings.Contains(logText(logs), "no token for batch") {
		t.Fatalf("stderr:\n%s", logText(logs))
	}
}

func TestCommandForRefusesBadSubjects(t *testing.T) {
	c, _ := newTestCommand(t, []string{"/bin/true"}, CommandOptions{}, nil)
	for _, s := range []string{
		"-rf", ".hidden", "a b", "a\nb", "a\x00b", "a;b", "$(id)", "a`b`", "é", "a\"b", "a'b",
		strings.Repeat("a", MaxWorkloadSubject+1),
	} {
		if _, err := c.For(s); err == nil {
			t.Errorf("For(%q) accepted", s)
		} else if strings.ContainsAny(err.Error(), "\n\x00") {
			t.Errorf("For(%q): control characters in %q", s, err)
		}
	}
	for _, s := range []string{"a", "payments-api", "team.app_1", "spiffe://example.org/ns/app", "app@prod", "k=v+w:x", strings.Repeat("a", MaxWorkloadSubject)} {
		if _, err := c.For(s); err != nil {
			t.Errorf("For(%q): %v", s, err)
		}
	}
	w, _ := c.For("a")
	if _, err := w.For("b"); err == nil {
		t.Error("For on a workload's Command accepted")
	}
}

func zapString(k, v string) zap.Field { return zap.String(k, v) }
