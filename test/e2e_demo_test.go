package test

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/imdsproxy/imdsproxy/test/e2e"
)

// The demo (scripts/demo.sh, `make demo`) and what a newcomer types: the
// README's commands and the ones the demo prints, run as written.

// demoBinaries are what scripts/demo.sh runs; `make test` builds them.
var demoBinaries = []string{"bin/imdsproxy", "bin/imdsproxy-issuer", "bin/fakests", "bin/tools/ec2-metadata-mock"}

func requireDemoBinaries(t *testing.T) {
	t.Helper()
	requireClient(t, awsCLIPath, "AWS CLI v2 (Debian package awscli)")
	for _, p := range demoBinaries {
		if _, err := os.Stat(filepath.Join(repoRoot, p)); err != nil {
			if os.Getenv("IMDSPROXY_E2E_ALLOW_MISSING") == "1" {
				t.Skipf("%s missing (make test builds it)", p)
			}
			t.Fatalf("%s missing: run `make test` (it builds the demo's tools)", p)
		}
	}
}

// jwtRe matches a compact JWS whose header and payload are JSON objects.
var jwtRe = regexp.MustCompile(`eyJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}\.`)

// checkDemoSecrets fails t if text holds a JWT, the stand-in instance
// profile's secret key or session token (read from the demo's work
// directory), or the issuer's signing key.
func checkDemoSecrets(t *testing.T, where, text, work string) {
	t.Helper()
	if jwtRe.MatchString(text) {
		t.Errorf("%s holds a JWT", where)
	}
	var cfg struct {
		Metadata struct {
			Values struct {
				Creds struct{ SecretAccessKey, Token string } `json:"iam-security-credentials"`
			} `json:"values"`
		} `json:"metadata"`
	}
	b, err := os.ReadFile(filepath.Join(work, "instance", "aemm-config.json"))
	if err != nil || json.Unmarshal(b, &cfg) != nil || cfg.Metadata.Values.Creds.SecretAccessKey == "" {
		t.Fatalf("the demo's stand-in instance config: %v", err)
	}
	c := cfg.Metadata.Values.Creds
	for name, s := range map[string]string{"the instance profile's secret key": c.SecretAccessKey,
		"the instance profile's session token": c.Token[len(c.Token)/2-16 : len(c.Token)/2+16]} {
		if strings.Contains(text, s) {
			t.Errorf("%s holds %s", where, name)
		}
	}
	if key, err := os.ReadFile(filepath.Join(work, "issuer", "signing.pem")); err == nil {
		lines := strings.Split(strings.TrimSpace(string(key)), "\n")
		if len(lines) > 2 && strings.Contains(text, lines[1]) {
			t.Errorf("%s holds the issuer's signing key", where)
		}
	}
	for _, word := range []string{"SecretAccessKey", "SessionToken", "AWS_SECRET_ACCESS_KEY=", "AWS_SESSION_TOKEN="} {
		if strings.Contains(text, word) {
			t.Errorf("%s prints %s", where, word)
		}
	}
}

// checkDemoLogs checks that the demo kept its logs in work and that none
// holds a secret.
func checkDemoLogs(t *testing.T, work string) {
	t.Helper()
	for _, name := range []string{"sts.log", "imds.log", "issuer.log", "imdsproxy.log"} {
		b, err := os.ReadFile(filepath.Join(work, name))
		if err != nil || len(b) == 0 {
			t.Errorf("the demo did not keep %s: %v", name, err)
			continue
		}
		checkDemoSecrets(t, name, string(b), work)
	}
}

// TestDemo runs `make demo`'s script in its check mode: the whole chain on
// its fixed loopback ports — the stand-in instance, imdsproxy-issuer, the
// daemon with a workload, the fake STS verifying the issuer's tokens — and
// the unmodified AWS CLI getting the workload's credentials through the
// daemon. Nothing secret is printed or logged, and the logs are kept.
func TestDemo(t *testing.T) {
	requireDemoBinaries(t)
	work := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, filepath.Join(repoRoot, "scripts", "demo.sh"), "--check")
	cmd.Dir = repoRoot
	cmd.Env = append(os.Environ(), "IMDSPROXY_DEMO_DIR="+work)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("demo.sh --check: %v\n%s", err, out)
	}
	text := string(out)
	for _, want := range []string{":assumed-role/demo-app/i-", "got demo-app's credentials through imdsproxy",
		"STS verified the issuer's token for it: sub=demo-app kid=", "alg=ES256", "workload=demo-app",
		"Logs kept: " + work + "/sts.log"} {
		if !strings.Contains(text, want) {
			t.Errorf("the demo's output lacks %q:\n%s", want, text)
		}
	}
	checkDemoSecrets(t, "the demo's output", text, work)
	checkDemoLogs(t, work)
}

// fakeAWSv1 is an `aws` that fails the way an AWS CLI v1 from a Python
// environment does on a v2 command (--version aside), and notes the
// arguments of every run in the file ran beside it.
const fakeAWSv1 = `#!/bin/sh
echo "$*" >>"$(dirname "$0")/ran"
if [ "$*" = "--version" ]; then echo "aws-cli/1.18.69 Python/3.8.10 Linux/5.4.0 botocore/1.17.0"; exit 0; fi
echo "usage: aws [options] <command> <subcommand> [<subcommand> ...] [parameters]" >&2
echo "To see help text, you can run:" >&2
echo "aws: error: argument subcommand: Invalid choice, valid choices are:" >&2
exit 2
`

// readmeSkips are README commands a test cannot run, each with why.
var readmeSkips = []struct {
	re  *regexp.Regexp
	why string
}{
	{regexp.MustCompile(`^make test\b`), "it is make test itself, which runs this test"},
	{regexp.MustCompile(`(^|\s)(sudo|systemctl|apt-get)\s|^make (install|uninstall)\b`), "it changes the host (installs files or services)"},
	{regexp.MustCompile(`^git clone\b`), "the test runs in the clone already"},
}

// shellBlocks returns the commands of the markdown's sh, shell, bash and
// console code blocks: continuation lines joined, prompts and comments
// removed.
func shellBlocks(markdown string) []string {
	var cmds []string
	in, cur := false, ""
	sc := bufio.NewScanner(strings.NewReader(markdown))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if strings.HasPrefix(line, "```") {
			lang := strings.TrimSpace(strings.TrimPrefix(line, "```"))
			switch {
			case in:
				in = false
			case lang == "sh" || lang == "shell" || lang == "bash" || lang == "console":
				in = true
			default:
				// another language: skip to its closing fence
				for sc.Scan() && !strings.HasPrefix(strings.TrimSpace(sc.Text()), "```") {
				}
			}
			continue
		}
		if !in {
			continue
		}
		line = stripComment(strings.TrimPrefix(line, "$ "))
		if strings.HasSuffix(line, `\`) {
			cur += strings.TrimSuffix(line, `\`) + " "
			continue
		}
		if line = strings.TrimSpace(cur + line); line != "" {
			cmds = append(cmds, line)
		}
		cur = ""
	}
	return cmds
}

// stripComment drops a shell comment: a # at the start or after a blank,
// outside quotes.
func stripComment(s string) string {
	var quote rune
	for i, r := range s {
		switch {
		case quote != 0:
			if r == quote {
				quote = 0
			}
		case r == '\'' || r == '"':
			quote = r
		case r == '#' && (i == 0 || s[i-1] == ' ' || s[i-1] == '\t'):
			return strings.TrimSpace(s[:i])
		}
	}
	return s
}

// printedCommands returns the commands the demo printed for the reader to
// type: the indented lines between "Try it" and "Ctrl-C stops everything",
// comments left out, continuation lines joined (as the shell would).
func printedCommands(out string) []string {
	start := strings.Index(out, "\nTry it")
	end := strings.Index(out, "\nCtrl-C stops everything")
	if start < 0 || end < start {
		return nil
	}
	var cmds []string
	cur := ""
	for _, line := range strings.Split(out[start:end], "\n") {
		if !strings.HasPrefix(line, "  ") {
			continue
		}
		line = strings.TrimSpace(line)
		if strings.HasPrefix(line, "#") {
			continue
		}
		if strings.HasSuffix(line, `\`) {
			cur += strings.TrimSuffix(line, `\`) + " "
			continue
		}
		cmds = append(cmds, strings.TrimSpace(cur+line))
		cur = ""
	}
	return cmds
}

// newcomerEnv is the environment of someone who just cloned the repository
// on a machine set up for something else: an AWS CLI v1 first on PATH, an
// AWS profile and keys of their own exported. Make's own variables (this
// test may run under make) are left out.
func newcomerEnv(t *testing.T) (env []string, fakeBin string) {
	t.Helper()
	fakeBin = t.TempDir()
	if err := os.WriteFile(filepath.Join(fakeBin, "aws"), []byte(fakeAWSv1), 0o755); err != nil {
		t.Fatal(err)
	}
	for _, kv := range os.Environ() {
		k, v, _ := strings.Cut(kv, "=")
		switch {
		case strings.HasPrefix(k, "AWS_"), k == "MAKEFLAGS", k == "MAKELEVEL", k == "MFLAGS", k == "GNUMAKEFLAGS", k == "IMDSPROXY_DEMO_DIR":
			continue
		case k == "PATH":
			kv = "PATH=" + fakeBin + ":" + v
		}
		env = append(env, kv)
	}
	return append(env, "AWS_PROFILE=newcomer-has-no-such-profile", "AWS_ACCESS_KEY_ID=AKIANEWCOMEREXAMPLE0",
		"AWS_SECRET_ACCESS_KEY=newcomer-own-secret-not-for-the-demo", "AWS_DEFAULT_REGION=eu-central-1"), fakeBin
}

// startWithDefaultSIGINT starts cmd in a process group of its own with
// SIGINT at its default disposition, as a shell's foreground job in a
// terminal has it: a test binary started in the background inherits
// SIGINT ignored, and a child would keep ignoring it. (A signal the Go
// runtime handles is reset to the default across exec, so SIGINT is
// handled while the child starts.)
func startWithDefaultSIGINT(cmd *exec.Cmd) (*e2e.Process, error) {
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT)
	defer signal.Stop(sig)
	return e2e.Start(cmd)
}

// TestNewcomerCommands runs, as written, every command of the README's
// shell code blocks (but those readmeSkips names, each with its reason)
// and every command `make demo` prints for the reader, in the environment
// of newcomerEnv: an `aws` on PATH that is not Debian's and fails like AWS
// CLI v1, and AWS settings of the user's own. `make demo` (from the README)
// runs the whole chain; the other README commands and the printed ones run
// while it does; then Ctrl-C (SIGINT to its process group, as a terminal
// sends it) stops it, and its logs must still be where it said.
func TestNewcomerCommands(t *testing.T) {
	requireDemoBinaries(t)
	readme, err := os.ReadFile(filepath.Join(repoRoot, "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	var demo bool
	var others []string
	for _, c := range shellBlocks(string(readme)) {
		skipped := false
		for _, s := range readmeSkips {
			if s.re.MatchString(c) {
				t.Logf("README command not run: %q: %s", c, s.why)
				skipped = true
				break
			}
		}
		switch {
		case skipped:
		case c == "make demo":
			demo = true
		default:
			others = append(others, c)
		}
	}
	if !demo {
		t.Fatal("the README's code blocks no longer show `make demo`: this test runs it and what it prints")
	}
	env, fakeBin := newcomerEnv(t)

	out := &e2e.LockedBuffer{}
	cmd := exec.Command("make", "demo")
	cmd.Dir, cmd.Env, cmd.Stdout, cmd.Stderr = repoRoot, env, out, out
	p, err := startWithDefaultSIGINT(cmd)
	if err != nil {
		t.Fatal(err)
	}
	pgid := p.Pid()
	stopped := false
	var work string
	defer func() {
		if !stopped {
			_ = syscall.Kill(-pgid, syscall.SIGKILL)
			p.Stop(5 * time.Second)
		}
		if work != "" && strings.HasPrefix(work, "/tmp/imdsproxy-demo.") {
			os.RemoveAll(work)
		}
	}()
	deadline := time.Now().Add(4 * time.Minute)
	for !strings.Contains(out.String(), "\nCtrl-C stops everything") {
		if p.Exited() || time.Now().After(deadline) {
			t.Fatalf("make demo did not come up (exited: %v %v):\n%s", p.Exited(), p.Err(), out)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if m := regexp.MustCompile(`demo: work directory (\S+) `).FindStringSubmatch(out.String()); m != nil {
		work = m[1]
	} else {
		t.Fatalf("make demo did not say where its work directory is:\n%s", out)
	}
	printed := printedCommands(out.String())
	if len(printed) < 3 || !strings.Contains(printed[0], "sts get-caller-identity") {
		t.Fatalf("make demo printed no AWS CLI command to try, or not first: %q\n%s", printed, out)
	}

	run := func(what string, cmds []string) string {
		t.Helper()
		script := "set -euo pipefail\n"
		for _, c := range cmds {
			script += fmt.Sprintf("printf '+ %%s\\n' %s\n%s\n", shellQuote(c), c)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		sh := exec.CommandContext(ctx, "/bin/bash", "-c", script)
		sh.Dir, sh.Env = repoRoot, env
		b, err := sh.CombinedOutput()
		if err != nil {
			t.Errorf("%s failed as written: %v\n%s", what, err, b)
		}
		return string(b)
	}
	got := run("the commands make demo printed", printed)
	for _, want := range []string{":assumed-role/demo-app/i-", `"jwks_uri"`, `"kty"`, "imdsproxy_cache_", "ready"} {
		if !strings.Contains(got, want) {
			t.Errorf("the printed commands' output lacks %q:\n%s", want, got)
		}
	}
	checkDemoSecrets(t, "the printed commands' output", got, work)
	if len(others) > 0 {
		checkDemoSecrets(t, "the README commands' output", run("the README's commands", others), work)
	}
	// The demo may ask the other CLI its version (to say which one the
	// commands do not use), nothing else.
	ran, _ := os.ReadFile(filepath.Join(fakeBin, "ran"))
	for _, args := range strings.Fields(strings.ReplaceAll(string(ran), "--version", "")) {
		t.Errorf("a command ran the `aws` first on PATH (an AWS CLI v1 here) with %q instead of naming /usr/bin/aws", args)
	}
	if !strings.Contains(out.String(), "note: 'aws' on your PATH is "+fakeBin+"/aws (aws-cli/1.18.69") {
		t.Errorf("make demo did not point out the other aws on PATH:\n%s", out)
	}

	// Ctrl-C.
	if err := syscall.Kill(-pgid, syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	select {
	case <-p.Done():
	case <-time.After(30 * time.Second):
		t.Fatalf("make demo did not stop on Ctrl-C:\n%s", out)
	}
	stopped = true
	if !strings.Contains(out.String(), "demo: stopped. Logs kept: "+work+"/sts.log") {
		t.Errorf("make demo did not say where its logs are when stopped:\n%s", e2e.TailLines(out.String(), 10))
	}
	checkDemoLogs(t, work)
	checkDemoSecrets(t, "make demo's output", out.String(), work)
}

// shellQuote quotes s for bash as one word.
func shellQuote(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }
