package token

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/imdsproxy/imdsproxy/test/fakes/rolesanywhere"
)

// setMtime sets path's mtime (and atime) to exactly mtime.
func setMtime(t *testing.T, path string, mtime time.Time) {
	t.Helper()
	if err := os.Chtimes(path, mtime, mtime); err != nil {
		t.Fatal(err)
	}
}

func TestStaleMtimes(t *testing.T) {
	var w staleMtimes
	old := time.Now().Add(-time.Hour)
	a := fileStamp{ino: 1, size: 800, mtime: old}
	if w.young(a) || w.young(a) {
		t.Fatal("unchanged stamps reported young")
	}
	// Touched (new mtime, any size): a real modification, judged by mtime.
	if w.young(fileStamp{ino: 1, size: 900, mtime: old.Add(time.Minute)}) {
		t.Fatal("a file whose mtime moved reported young by the watch")
	}
	// Size changed, mtime did not: the mtime is stale.
	if !w.young(fileStamp{ino: 1, size: 0, mtime: old.Add(time.Minute)}) {
		t.Fatal("a size change under an unchanged mtime not reported young")
	}
	// It stays young for SettleTime, whatever comes next.
	if !w.young(fileStamp{ino: 1, size: 0, mtime: old.Add(time.Minute)}) {
		t.Fatal("not young right after a stale mtime")
	}
	w.stale = time.Now().Add(-SettleTime - time.Millisecond)
	if w.young(fileStamp{ino: 1, size: 0, mtime: old.Add(time.Minute)}) {
		t.Fatal("still young SettleTime after the stale mtime")
	}
	// A replaced inode under the same mtime is stale too; several files
	// are watched together.
	var m staleMtimes
	x, y := fileStamp{ino: 1, size: 10, mtime: old}, fileStamp{ino: 2, size: 20, mtime: old}
	m.young(x, y)
	if !m.young(x, fileStamp{ino: 3, size: 20, mtime: old}) {
		t.Fatal("a new inode under the same mtime not reported young")
	}
}

// TestTokenStaleMtime: the token file is truncated for an in-place rewrite,
// and a reader sees the new (empty, then partial) content under the old
// mtime, as it can while ext4 is still inside the truncate. The content must
// count as being written (ReasonChanging), not as a settled empty or
// malformed file.
func TestTokenStaleMtime(t *testing.T) {
	path := filepath.Join(t.TempDir(), "token.jwt")
	tok := validJWT(t, "host-1")
	write(t, path, tok)
	old := time.Now().Add(-time.Minute).Truncate(time.Second)
	setMtime(t, path, old)
	f, err := NewFile(path, FileOptions{Now: func() time.Time { return testNow }}, zap.NewNop(), nil)
	if err != nil {
		t.Fatal(err)
	}
	if got, err := f.Token(context.Background()); err != nil || got != tok {
		t.Fatalf("settled token: %q, %v", got, err)
	}
	for _, torn := range []string{"", tok[:len(tok)/2]} {
		write(t, path, torn)
		setMtime(t, path, old) // the size changed, the mtime did not (yet)
		_, err := f.Token(context.Background())
		var te *Error
		if !errors.As(err, &te) || te.Reason != ReasonChanging || te.Permanent() {
			t.Errorf("torn file (%d bytes) under a stale mtime: %v, want the transient %s", len(torn), err, ReasonChanging)
		}
	}
}

// TestX509StaleMtime: the same for the certificate: while its mtime is
// stale the torn file is "changing" and the identity loaded before is kept.
func TestX509StaleMtime(t *testing.T) {
	l0 := issue(t, rolesanywhere.LeafOptions{Key: rolesanywhere.ECP256})
	cert, key, chain := identityFiles(t, l0)
	old := time.Now().Add(-time.Minute).Truncate(time.Second)
	for _, p := range []string{cert, key, chain} {
		if p != "" {
			setMtime(t, p, old)
		}
	}
	x, err := NewX509(cert, key, chain, X509Options{}, zap.NewNop(), nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, torn := range []string{"", string(l0.CertPEM[:len(l0.CertPEM)/3])} {
		write(t, cert, torn)
		setMtime(t, cert, old)
		leaf, _, _, err := x.X509(context.Background())
		if err != nil || leaf.SerialNumber.Cmp(l0.Cert.SerialNumber) != 0 {
			t.Errorf("torn certificate (%d bytes) under a stale mtime: %v; want the identity loaded before", len(torn), err)
		}
	}
}
