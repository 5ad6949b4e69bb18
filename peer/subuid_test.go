package peer

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

func writeFile(t *testing.T, name, text string) {
	t.Helper()
	if err := os.WriteFile(name, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestUsers: a subordinate uid belongs to the user its range is delegated
// to (by name through passwd, or by uid), any other uid to itself; a name
// passwd does not know still groups its ranges; bad lines are skipped and
// counted; missing files delegate nothing; a nil *Users maps to itself.
func TestUsers(t *testing.T) {
	dir := t.TempDir()
	passwd, subuid := filepath.Join(dir, "passwd"), filepath.Join(dir, "subuid")
	writeFile(t, passwd, "root:x:0:0:root:/root:/bin/bash\nalice:x:1000:1000::/home/alice:/bin/sh\nbob:x:1001:1001::/home/bob:/bin/sh\nbroken line\nalice:x:7:7::/:/bin/sh\n")
	writeFile(t, subuid, strings.Join([]string{
		"# delegated ranges",
		"alice:100000:65536",
		"",
		"1001:165536:65536",
		"ldapuser:231072:10",
		"carol:300000:0",       // empty range: skipped
		"dave:4294967290:10",   // past the last uid: skipped
		"eve:notanumber:5",     // skipped
		"too:many:fields:here", // skipped
	}, "\n"))
	core, logs := observer.New(zapcore.WarnLevel)
	u := NewUsers(subuid, passwd, zap.New(core))
	for _, tc := range []struct {
		uid, want uint32
	}{
		{1000, 1000},     // alice herself
		{100000, 1000},   // her first subordinate uid
		{165535, 1000},   // her last
		{165536, 1001},   // bob's first (by uid)
		{231071, 1001},   // bob's last
		{99999, 99999},   // before every range
		{400000, 400000}, // after every range
		{0, 0},
	} {
		if got := u.Of(tc.uid); got != tc.want {
			t.Errorf("Of(%d) = %d, want %d", tc.uid, got, tc.want)
		}
	}
	if a, b := u.Of(231072), u.Of(231081); a != b || a < 1<<31 {
		t.Errorf("an unknown name's range: Of = %d and %d, want one made-up uid with the high bit", a, b)
	}
	if got := u.Of(231082); got != 231082 {
		t.Errorf("past the unknown name's range: %d", got)
	}
	if logs.FilterMessage("lines of the subordinate uids skipped").Len() != 1 ||
		logs.FilterMessage("lines of the subordinate uids skipped").All()[0].ContextMap()["lines"] != int64(4) {
		t.Errorf("skipped lines not reported as 4: %v", logs.All())
	}

	none := NewUsers(filepath.Join(dir, "nope"), filepath.Join(dir, "nope2"), nil)
	if got := none.Of(100000); got != 100000 {
		t.Errorf("without the files: Of(100000) = %d", got)
	}
	var nilUsers *Users
	if got := nilUsers.Of(100000); got != 100000 {
		t.Errorf("nil Users: Of(100000) = %d", got)
	}
}

// TestUsersReload: a change of the file is picked up in the background
// after the check interval; Of answers from the table in force meanwhile
// and never waits for the file.
func TestUsersReload(t *testing.T) {
	dir := t.TempDir()
	passwd, subuid := filepath.Join(dir, "passwd"), filepath.Join(dir, "subuid")
	writeFile(t, passwd, "alice:x:1000:1000::/:/bin/sh\nbob:x:1001:1001::/:/bin/sh\n")
	writeFile(t, subuid, "alice:100000:65536\n")
	u := NewUsers(subuid, passwd, nil)
	u.every = 20 * time.Millisecond
	if got := u.Of(100000); got != 1000 {
		t.Fatalf("Of(100000) = %d, want 1000", got)
	}
	writeFile(t, subuid, "bob:100000:65536\nalice:200000:10\n")
	future := time.Now().Add(time.Second) // a different mtime even on a coarse clock
	if err := os.Chtimes(subuid, future, future); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for u.Of(100000) != 1001 || u.Of(200005) != 1000 {
		if time.Now().After(deadline) {
			t.Fatalf("the change was not picked up: Of(100000) = %d, Of(200005) = %d", u.Of(100000), u.Of(200005))
		}
		time.Sleep(5 * time.Millisecond)
	}
	if err := os.Remove(subuid); err != nil {
		t.Fatal(err)
	}
	for u.Of(100000) != 100000 {
		if time.Now().After(deadline) {
			t.Fatal("a removed file still delegates")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestResolverUserOf: a Resolver maps subordinate uids with the files of
// its environment (the host's: /etc/subuid and /etc/passwd); a nil
// Resolver has no table.
func TestResolverUserOf(t *testing.T) {
	dir := t.TempDir()
	passwd, subuid := filepath.Join(dir, "passwd"), filepath.Join(dir, "subuid")
	writeFile(t, passwd, "alice:x:1000:1000::/:/bin/sh\n")
	writeFile(t, subuid, "alice:100000:65536\n")
	r, err := newResolver(Options{BPF: BPFOff}, resolverEnv{proc: "/proc", fs: osFS{}, subuid: subuid, passwd: passwd,
		locate: func() (string, string, error) { return "", "", nil }})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if n := r.Users().Ranges(); n != 1 {
		t.Errorf("%d ranges, want 1", n)
	}
	if got := r.UserOf(123456); got != 1000 {
		t.Errorf("UserOf(123456) = %d, want 1000", got)
	}
	if got := r.UserOf(1000); got != 1000 {
		t.Errorf("UserOf(1000) = %d", got)
	}
	if (*Resolver)(nil).Users() != nil {
		t.Error("a nil Resolver has users")
	}
}
