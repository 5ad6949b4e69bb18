package container

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"testing/synctest"
	"time"
)

// tokensClock is a settable clock for Tokens.
type tokensClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *tokensClock) now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *tokensClock) add(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

func newTestTokens(t *testing.T) (*Tokens, *tokensClock, string) {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "tokens")
	tk, err := NewTokens(dir, time.Hour, time.Minute, nil)
	if err != nil {
		t.Fatal(err)
	}
	clk := &tokensClock{t: time.Date(2026, 12, 7, 12, 0, 0, 0, time.UTC)}
	tk.now = clk.now
	return tk, clk, dir
}

func fileToken(t *testing.T, dir, id string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, dirName(id), tokenFileName))
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestTokenFiles(t *testing.T) {
	tk, _, dir := newTestTokens(t)
	owners := map[string]int{"uid:64101": owner(64101), "backup.service": owner(0)}
	if err := tk.Sync(owners); err != nil {
		t.Fatal(err)
	}
	for id, uid := range owners {
		path := filepath.Join(dir, dirName(id), tokenFileName)
		st, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode().Perm() != 0o400 {
			t.Errorf("%s: mode %v, want 0400", path, st.Mode().Perm())
		}
		if got := int(st.Sys().(*syscall.Stat_t).Uid); got != uid {
			t.Errorf("%s: owner %d, want %d", path, got, uid)
		}
		dst, _ := os.Stat(filepath.Dir(path))
		if dst.Mode().Perm() != 0o711 {
			t.Errorf("%s: mode %v, want 0711", filepath.Dir(path), dst.Mode().Perm())
		}
		tok := fileToken(t, dir, id)
		if got, ok := tk.Lookup(tok); !ok || got != id {
			t.Errorf("Lookup(token of %s) = %q, %v", id, got, ok)
		}
		entries, _ := os.ReadDir(filepath.Dir(path))
		if len(entries) != 1 {
			t.Errorf("%s holds %d entries, want only the token file", filepath.Dir(path), len(entries))
		}
	}
	if _, ok := tk.Lookup(""); ok {
		t.Error("the empty token is accepted")
	}
	if _, ok := tk.Lookup("not-a-token"); ok {
		t.Error("a made-up token is accepted")
	}
}

// TestTokenRotation: after a rotation both tokens are accepted until the
// overlap ends; the file holds the new one; rotations in a row keep every
// token younger than the overlap, up to maxRetired.
func TestTokenRotation(t *testing.T) {
	tk, clk, dir := newTestTokens(t)
	if err := tk.Sync(map[string]int{"uid:64101": owner(64101)}); err != nil {
		t.Fatal(err)
	}
	old := fileToken(t, dir, "uid:64101")
	if err := tk.Rotate(); err != nil {
		t.Fatal(err)
	}
	cur := fileToken(t, dir, "uid:64101")
	if cur == old {
		t.Fatal("the token file did not change on rotation")
	}
	for _, tok := range []string{old, cur} {
		if id, ok := tk.Lookup(tok); !ok || id != "uid:64101" {
			t.Errorf("within the overlap: Lookup = %q %v", id, ok)
		}
	}
	clk.add(59 * time.Second)
	if _, ok := tk.Lookup(old); !ok {
		t.Error("the replaced token was refused within the overlap")
	}
	clk.add(2 * time.Second)
	if _, ok := tk.Lookup(old); ok {
		t.Error("the replaced token is accepted after the overlap")
	}
	if _, ok := tk.Lookup(cur); !ok {
		t.Error("the current token is refused")
	}
	if lr := tk.LastRotation(); lr.IsZero() {
		t.Error("no last rotation time")
	}
	// Rotations in a row.
	seen := []string{cur}
	for range maxRetired + 2 {
		if err := tk.Rotate(); err != nil {
			t.Fatal(err)
		}
		seen = append(seen, fileToken(t, dir, "uid:64101"))
	}
	accepted := 0
	for _, tok := range seen {
		if _, ok := tk.Lookup(tok); ok {
			accepted++
		}
	}
	if accepted != maxRetired+1 {
		t.Errorf("%d of the last tokens accepted, want the current and %d replaced", accepted, maxRetired)
	}
}

// TestTokenSync: a removed workload's token dies at once with its
// directory; a new owner gets a new token; directories left by an earlier
// run are removed, unless they hold something else.
func TestTokenSync(t *testing.T) {
	tk, _, dir := newTestTokens(t)
	stale := filepath.Join(dir, "gone.service")
	if err := os.MkdirAll(stale, 0o711); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(stale, tokenFileName), []byte("x"), 0o400)
	os.WriteFile(filepath.Join(stale, ".token-123"), []byte("x"), 0o600)
	foreign := filepath.Join(dir, "keep")
	os.MkdirAll(foreign, 0o700)
	os.WriteFile(filepath.Join(foreign, "notes"), []byte("x"), 0o600)

	if err := tk.Sync(map[string]int{"uid:64101": owner(64101), "backup.service": owner(0)}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(stale); !os.IsNotExist(err) {
		t.Errorf("the directory of a workload no longer configured is still there: %v", err)
	}
	if _, err := os.Stat(filepath.Join(foreign, "notes")); err != nil {
		t.Errorf("a directory that is not a token directory was touched: %v", err)
	}
	billing, backup := fileToken(t, dir, "uid:64101"), fileToken(t, dir, "backup.service")
	if err := tk.Sync(map[string]int{"backup.service": owner(64102)}); err != nil {
		t.Fatal(err)
	}
	if _, ok := tk.Lookup(billing); ok {
		t.Error("a removed workload's token is still accepted")
	}
	if _, err := os.Stat(filepath.Join(dir, "uid-64101")); !os.IsNotExist(err) {
		t.Errorf("a removed workload's directory is still there: %v", err)
	}
	if os.Geteuid() == 0 {
		if _, ok := tk.Lookup(backup); ok {
			t.Error("the token given to the old owner is still accepted")
		}
		if fileToken(t, dir, "backup.service") == backup {
			t.Error("a new owner got the old token")
		}
	}
	if tk.Count() != 1 {
		t.Errorf("Count = %d, want 1", tk.Count())
	}
}

// TestTokenDirReachable: a token directory made under a strict umask is
// opened up to 0711 so workloads reach their files.
func TestTokenDirReachable(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "tokens")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if _, err := NewTokens(dir, time.Hour, time.Minute, nil); err != nil {
		t.Fatal(err)
	}
	if st, _ := os.Stat(dir); st.Mode().Perm() != 0o711 {
		t.Errorf("token directory mode %v, want 0711", st.Mode().Perm())
	}
}

func TestTokenDirRefused(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "open")
	if err := os.Mkdir(dir, 0o777); err != nil {
		t.Fatal(err)
	}
	os.Chmod(dir, 0o777)
	if _, err := NewTokens(dir, time.Hour, time.Minute, nil); err == nil {
		t.Error("a world-writable token directory was accepted")
	}
	file := filepath.Join(t.TempDir(), "file")
	os.WriteFile(file, nil, 0o600)
	if _, err := NewTokens(file, time.Hour, time.Minute, nil); err == nil {
		t.Error("a file was accepted as the token directory")
	}
}

// TestTokenWriteFailure: a workload whose file cannot be written keeps its
// previous token.
func TestTokenWriteFailure(t *testing.T) {
	tk, _, dir := newTestTokens(t)
	if err := tk.Sync(map[string]int{"uid:64101": owner(64101)}); err != nil {
		t.Fatal(err)
	}
	cur := fileToken(t, dir, "uid:64101")
	tk.random = bytes.NewReader(nil) // no randomness: minting fails
	if err := tk.Rotate(); err == nil {
		t.Fatal("Rotate without randomness succeeded")
	}
	if _, ok := tk.Lookup(cur); !ok {
		t.Error("the current token was dropped by a failed rotation")
	}
}

// TestTokenRun: Run rotates within the interval's jitter and drops
// replaced tokens after the overlap.
func TestTokenRun(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		dir := filepath.Join(t.TempDir(), "tokens")
		tk, err := NewTokens(dir, 10*time.Minute, time.Minute, nil)
		if err != nil {
			t.Fatal(err)
		}
		if err := tk.Sync(map[string]int{"uid:64101": owner(64101)}); err != nil {
			t.Fatal(err)
		}
		first := fileToken(t, dir, "uid:64101")
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan struct{})
		go func() { _ = tk.Run(ctx); close(done) }()
		time.Sleep(8 * time.Minute)
		synctest.Wait()
		if fileToken(t, dir, "uid:64101") != first {
			t.Fatal("rotated before 90% of the interval")
		}
		time.Sleep(3*time.Minute + wakeEvery)
		synctest.Wait()
		second := fileToken(t, dir, "uid:64101")
		if second == first {
			t.Fatal("not rotated after 110% of the interval")
		}
		time.Sleep(time.Minute + wakeEvery)
		synctest.Wait()
		if _, ok := tk.Lookup(first); ok {
			t.Error("the replaced token is accepted after the overlap")
		}
		if got := testutilGauge(tk); got != 1 {
			t.Errorf("tokens gauge %v after the overlap, want 1", got)
		}
		cancel()
		<-done
	})
}
