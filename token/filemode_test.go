package token

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
)

func TestCheckFileMode(t *testing.T) {
	dir := t.TempDir()
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name  string
		mode  fs.FileMode
		owner int    // -1: the test's own uid
		want  string // "" no warning, else a substring of it
	}{
		{"private", 0o600, -1, ""},
		{"read-only private", 0o400, -1, ""},
		{"group-readable", 0o640, -1, "readable by its group"},
		{"world-readable", 0o644, -1, "readable by group and others"},
		{"others only", 0o604, -1, "readable by others"},
		{"group-writable", 0o620, -1, "writable by its group"},
		{"world-writable", 0o606, -1, "writable by others"},
		{"another owner", 0o600, 4242, "owned by uid 4242"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(dir, strings.ReplaceAll(tc.name, " ", "-"))
			write(t, p, "x")
			if err := os.Chmod(p, tc.mode); err != nil {
				t.Fatal(err)
			}
			if tc.owner >= 0 {
				if os.Geteuid() != 0 {
					t.Skip("chown needs root")
				}
				if err := os.Chown(p, tc.owner, tc.owner); err != nil {
					t.Fatal(err)
				}
			}
			warning, err := CheckFileMode(p)
			if err != nil {
				t.Fatal(err)
			}
			switch {
			case tc.want == "" && warning != "":
				t.Fatalf("warning %q for mode %v", warning, tc.mode)
			case tc.want != "" && !strings.Contains(warning, tc.want):
				t.Fatalf("warning %q, want it to say %q", warning, tc.want)
			case tc.want != "" && !strings.Contains(warning, p):
				t.Fatalf("warning %q does not name the file", warning)
			}
		})
	}
}

func TestCheckFileModeDirectory(t *testing.T) {
	base := t.TempDir()
	open := filepath.Join(base, "open")
	sticky := filepath.Join(base, "sticky")
	for _, d := range []string{open, sticky} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
		write(t, filepath.Join(d, "token.jwt"), "x")
		if err := os.Chmod(filepath.Join(d, "token.jwt"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Chmod(open, 0o777); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(sticky, 0o777|fs.ModeSticky); err != nil {
		t.Fatal(err)
	}
	if w, err := CheckFileMode(filepath.Join(open, "token.jwt")); err != nil || !strings.Contains(w, "directory "+open+" is writable by group and others") {
		t.Fatalf("open directory: %q, %v", w, err)
	}
	if w, err := CheckFileMode(filepath.Join(sticky, "token.jwt")); err != nil || w != "" {
		t.Fatalf("sticky directory: %q, %v", w, err)
	}
}

func TestCheckFileModeErrors(t *testing.T) {
	dir := t.TempDir()
	if _, err := CheckFileMode(filepath.Join(dir, "missing")); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("missing: %v, want fs.ErrNotExist", err)
	}
	if _, err := CheckFileMode(dir); err == nil {
		t.Fatal("a directory accepted")
	}
	// A symbolic link is judged by the file it names: that is what is read.
	target := filepath.Join(dir, "target")
	write(t, target, "x")
	if err := os.Chmod(target, 0o644); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(dir, "link")
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
	if w, err := CheckFileMode(link); err != nil || !strings.Contains(w, "readable by group and others") {
		t.Fatalf("link: %q, %v", w, err)
	}
}

// TestNewFileWarnsAboutMode: NewFile logs CheckFileMode's warning once, at
// start, and nothing when the file is private or does not exist yet.
func TestNewFileWarnsAboutMode(t *testing.T) {
	dir := t.TempDir()
	loose := filepath.Join(dir, "loose.jwt")
	write(t, loose, validJWT(t, "h"))
	if err := os.Chmod(loose, 0o644); err != nil {
		t.Fatal(err)
	}
	private := filepath.Join(dir, "private.jwt")
	write(t, private, validJWT(t, "h"))
	if err := os.Chmod(private, 0o600); err != nil {
		t.Fatal(err)
	}
	for path, want := range map[string]int{loose: 1, private: 0, filepath.Join(dir, "later.jwt"): 0} {
		core, logs := observer.New(zap.InfoLevel)
		if _, err := NewFile(path, FileOptions{}, zap.New(core), nil); err != nil {
			t.Fatal(err)
		}
		got := logs.FilterMessage("identity token file permissions").FilterLevelExact(zap.WarnLevel)
		if got.Len() != want {
			t.Fatalf("%s: %d warnings, want %d: %v", path, got.Len(), want, logs.All())
		}
		if want == 1 && !strings.Contains(got.All()[0].ContextMap()["warning"].(string), "chmod 600") {
			t.Fatalf("the warning says no fix: %v", got.All()[0].ContextMap())
		}
	}
}
