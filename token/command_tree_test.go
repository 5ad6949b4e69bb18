package token

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// procGone reports whether /proc has no entry for pid: the process is dead
// and reaped (a zombie still has an entry).
func procGone(pid int) bool {
	_, err := os.Stat(fmt.Sprintf("/proc/%d", pid))
	return errors.Is(err, os.ErrNotExist)
}

// procsWithArg lists the live processes (zombies excluded) whose command
// line holds arg.
func procsWithArg(t *testing.T, arg string) []int {
	t.Helper()
	ents, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatal(err)
	}
	var pids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if err != nil || len(b) == 0 {
			continue
		}
		for _, a := range bytes.Split(b, []byte{0}) {
			if string(a) == arg {
				pids = append(pids, pid)
			}
		}
	}
	return pids
}

// zombieChildren lists this process's children that are zombies: what
// was killed but not reaped.
func zombieChildren(t *testing.T) []int {
	t.Helper()
	procs, err := scanProcs()
	if err != nil {
		t.Fatal(err)
	}
	var z []int
	for _, p := range procs {
		if p.ppid == os.Getpid() && p.zombie {
			z = append(z, p.pid)
		}
	}
	return z
}

// readPIDs reads the pids a script wrote to path, one a line.
func readPIDs(t *testing.T, path string) []int {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var pids []int
	for _, f := range strings.Fields(string(b)) {
		pid, err := strconv.Atoi(f)
		if err != nil {
			t.Fatalf("pid file %q", b)
		}
		pids = append(pids, pid)
	}
	return pids
}

// waitGone waits up to 2 s for every pid to be gone and reaped, and for no
// live process to carry marker, and fails naming what is left.
// startedNothing reports whether a command killed by its timeout had not
// yet written pidFile — on a loaded machine the timeout can strike before
// the script starts the processes a test checks, and such an attempt checks
// nothing — and whether the test may try again: it then doubles *timeout,
// up to most, and says so.
func startedNothing(t *testing.T, pidFile string, timeout *time.Duration, most time.Duration) bool {
	t.Helper()
	if _, err := os.Stat(pidFile); !errors.Is(err, fs.ErrNotExist) || 2**timeout > most {
		return false
	}
	*timeout *= 2
	t.Logf("the command timed out before it started anything; again with a timeout of %v", *timeout)
	return true
}

func waitGone(t *testing.T, pids []int, marker string) {
	t.Helper()
	deadline := time.Now().Add(2 * time.Second)
	for {
		var left []string
		for _, pid := range pids {
			if !procGone(pid) {
				stat, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
				left = append(left, strings.TrimSpace(string(stat)))
			}
		}
		for _, pid := range procsWithArg(t, marker) {
			left = append(left, fmt.Sprintf("pid %d with %s", pid, marker))
		}
		for _, pid := range zombieChildren(t) {
			left = append(left, fmt.Sprintf("zombie child %d of the daemon", pid))
		}
		if len(left) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("processes left behind by the command:\n%s", strings.Join(left, "\n"))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestCommandKillsEveryDescendant: whatever the command leaves behind —
// a grandchild that setsid'd away, with the output closed or still
// holding it, a great-grandchild under a setsid'd shell, a double fork —
// is killed and reaped once Token returns, on success and on timeout.
func TestCommandKillsEveryDescendant(t *testing.T) {
	type tc struct {
		name    string
		body    string // %[1]s: pid file, %[2]s: marker argument of sleep, %[3]s: token file
		timeout bool
	}
	cases := []tc{
		{"setsid, output closed", `setsid sleep %[2]s </dev/null >/dev/null 2>&1 & echo $! >> %[1]s; cat %[3]s`, false},
		{"setsid, holding stdout", `setsid sleep %[2]s & echo $! >> %[1]s; cat %[3]s`, false},
		{"setsid shell with a child", `setsid sh -c 'sleep %[2]s & echo $! >> %[1]s; wait' </dev/null >/dev/null 2>&1 & echo $! >> %[1]s; cat %[3]s`, false},
		{"double fork", `(setsid sleep %[2]s </dev/null >/dev/null 2>&1 & echo $! >> %[1]s) ; sleep 0.1; cat %[3]s`, false},
		{"environment cleared", `env -i /usr/bin/setsid sleep %[2]s </dev/null >/dev/null 2>&1 & echo $! >> %[1]s; cat %[3]s`, false},
		{"four orphans", `for i in 1 2 3 4; do setsid sleep %[2]s </dev/null >/dev/null 2>&1 & echo $! >> %[1]s; done; cat %[3]s`, false},
		{"timeout", `setsid sleep %[2]s </dev/null >/dev/null 2>&1 & echo $! >> %[1]s; sleep %[2]s`, true},
		{"timeout, holding stdout", `setsid sleep %[2]s & echo $! >> %[1]s; exec sleep %[2]s`, true},
	}
	for i, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			tokFile := filepath.Join(dir, "token")
			write(t, tokFile, validJWT(t, "h"))
			pidFile := filepath.Join(dir, "pids")
			marker := fmt.Sprintf("60.%d%d", os.Getpid(), i) // a unique sleep argument
			argv := []string{script(t, dir, "cmd", fmt.Sprintf(c.body, pidFile, marker, tokFile))}
			timeout := 5 * time.Second
			if c.timeout {
				timeout = 500 * time.Millisecond
			}
			for {
				cmd, logs := newTestCommand(t, argv, CommandOptions{Timeout: timeout, Now: func() time.Time { return testNow }}, nil)
				start := time.Now()
				_, err := cmd.Token(context.Background())
				elapsed := time.Since(start)
				var te *Error
				switch {
				case c.timeout && (!errors.As(err, &te) || te.Reason != ReasonCommandTimeout):
					t.Fatalf("err = %v, want a timeout", err)
				case !c.timeout && err != nil:
					t.Fatalf("Token: %v\n%s", err, logText(logs))
				}
				// A grandchild holding the output does not keep Token waiting
				// (it is killed, not waited for).
				if !c.timeout && elapsed > timeout-time.Second {
					t.Errorf("Token took %v", elapsed)
				}
				if c.timeout && startedNothing(t, pidFile, &timeout, 8*time.Second) {
					continue
				}
				break
			}
			waitGone(t, readPIDs(t, pidFile), marker)
		})
	}
}

// TestCommandStderrRedacted: a failing command's stderr is logged without
// JWTs (whole or cut), long-term key ids or secret keys.
func TestCommandStderrRedacted(t *testing.T) {
	jwt := validJWT(t, "leak-me")
	const akia, secret = "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
	body := `echo "using key ` + akia + `" >&2
echo "aws_secret_access_key=` + secret + `" >&2
echo "raw ` + secret + ` and a cut token ` + jwt[:50] + `" >&2
exit 2`
	dir := t.TempDir()
	c, logs := newTestCommand(t, []string{script(t, dir, "cmd", body)}, CommandOptions{}, nil)
	if _, err := c.Token(context.Background()); err == nil {
		t.Fatal("no error")
	}
	text := logText(logs)
	if !strings.Contains(text, "using key AKIA…<redacted>") {
		t.Fatalf("stderr not logged:\n%s", text)
	}
	for _, s := range []string{akia, secret, jwt[:20]} {
		if strings.Contains(text, s) {
			t.Fatalf("%q logged:\n%s", s, text)
		}
	}
}

// TestCommandStderrCutMidSecret: stderr beyond MaxCommandStderr is dropped
// without leaving the start of a secret cut by the limit.
func TestCommandStderrCutMidSecret(t *testing.T) {
	const secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
	pad := strings.Repeat("p ", (MaxCommandStderr-20)/2)
	dir := t.TempDir()
	c, logs := newTestCommand(t, []string{script(t, dir, "cmd", `printf '%s' "`+pad+secret+`" >&2; exit 1`)}, CommandOptions{}, nil)
	if _, err := c.Token(context.Background()); err == nil {
		t.Fatal("no error")
	}
	if text := logText(logs); strings.Contains(text, secret[:15]) {
		t.Fatalf("the start of a cut secret was logged:\n%s", text[len(text)-200:])
	}
}

// TestCommandKillsEveryDescendantUnprivileged runs the test above in a
// copy of this test binary as an unprivileged user (nobody, no
// capabilities): killing what the command leaves behind needs no
// privilege. It runs where the tests run as root, and is skipped elsewhere
// (there the test above already ran unprivileged).
func TestCommandKillsEveryDescendantUnprivileged(t *testing.T) {
	if os.Getenv("IMDSPROXY_TEST_UNPRIVILEGED") != "" {
		if os.Getuid() == 0 {
			t.Fatal("still root")
		}
		return
	}
	if os.Getuid() != 0 {
		t.Skip("not root: TestCommandKillsEveryDescendant already ran unprivileged")
	}
	dir, err := os.MkdirTemp("", "unpriv")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	self, err := os.ReadFile("/proc/self/exe")
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "token.test")
	if err := os.WriteFile(bin, self, 0o755); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "-test.run=^(TestCommandKillsEveryDescendant|TestCommandKillsEveryDescendantUnprivileged|TestCommandDescendantsOfConcurrentRuns)$", "-test.v", "-test.count=1")
	cmd.Env = append(os.Environ(), "IMDSPROXY_TEST_UNPRIVILEGED=1", "TMPDIR="+os.TempDir())
	cmd.Dir = dir
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "--- PASS: TestCommandKillsEveryDescendant ") ||
		!strings.Contains(string(out), "--- PASS: TestCommandDescendantsOfConcurrentRuns ") {
		t.Fatalf("as nobody: %v\n%s", err, out)
	}
}

// TestCommandDescendantsOfConcurrentRuns: runs for two subjects overlap;
// the end of the short one does not kill what the long one still runs,
// and each run's leftovers die with it.
func TestCommandDescendantsOfConcurrentRuns(t *testing.T) {
	dir := t.TempDir()
	write(t, filepath.Join(dir, "token-fast"), validJWT(t, "fast"))
	write(t, filepath.Join(dir, "token-slow"), validJWT(t, "slow"))
	marker := fmt.Sprintf("61.%d", os.Getpid())
	// The slow run's helper must live until the slow run is done: it
	// checks it is still there just before printing the token.
	body := `w=$IMDSPROXY_WORKLOAD
setsid sleep ` + marker + ` </dev/null >/dev/null 2>&1 & h=$!; echo $h >> "` + dir + `/pids"
if [ "$w" = slow ]; then sleep 0.6; kill -0 $h || exit 7; fi
cat "` + dir + `/token-$w"`
	c, logs := newTestCommand(t, []string{script(t, dir, "cmd", body)}, CommandOptions{Now: func() time.Time { return testNow }}, nil)
	slow, err := c.For("slow")
	if err != nil {
		t.Fatal(err)
	}
	fast, err := c.For("fast")
	if err != nil {
		t.Fatal(err)
	}
	errc := make(chan error, 1)
	go func() { _, err := slow.Token(context.Background()); errc <- err }()
	time.Sleep(200 * time.Millisecond)
	if _, err := fast.Token(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := <-errc; err != nil {
		t.Fatalf("slow run: %v (its helper was killed by the fast run's end?)\n%s", err, logText(logs))
	}
	waitGone(t, readPIDs(t, filepath.Join(dir, "pids")), marker)
}
