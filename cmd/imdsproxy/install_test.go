package main

import (
	"bytes"
	"context"
	"io/fs"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"
)

// installServiceManagers are the commands `make install` and `make uninstall`
// must not run (docs/deploy.md: "It starts nothing and changes no other
// file"): TestMakeInstall puts a stub of each first on PATH that records
// its invocation.
var installServiceManagers = []string{
	"systemctl", "systemd-sysusers", "systemd-tmpfiles", "systemd-run", "service", "update-rc.d",
	"deb-systemd-invoke", "deb-systemd-helper", "useradd", "groupadd", "adduser", "addgroup", "ldconfig",
}

// installMakeEnv are the variables the Makefile reads (with ?=) or make
// passes down to a sub-make; TestMakeInstall drops them from its
// environment so that the installed set is the Makefile's defaults.
var installMakeEnv = []string{
	"DESTDIR", "PREFIX", "SYSTEMDDIR", "SYSUSERSDIR", "TMPFILESDIR", "GO",
	"MAKEFLAGS", "MFLAGS", "GNUMAKEFLAGS", "MAKELEVEL", "MAKEFILES",
}

// docCode matches a `code span` in Markdown.
var docCode = regexp.MustCompile("`([^`]+)`")

// TestMakeInstall runs the Makefile's install and uninstall targets into a
// DESTDIR and holds them to docs/deploy.md ("1. Install"): the files
// installed are exactly those of the doc's table (parsed from the doc, so
// the two cannot drift apart), the binaries run, the units' Exec lines
// point at $(PREFIX)/bin/imdsproxy, install and uninstall run no service
// manager (systemctl, systemd-sysusers, …) and name no path outside DESTDIR,
// and `make uninstall` removes every file but config.yaml. Both with the
// default PREFIX=/usr/local and with PREFIX=/opt/imdsproxy, which the units
// are rewritten for. The binaries are built into a temporary directory
// (BIN=, ISSUER_BIN=), so the test writes nothing in the repository.
func TestMakeInstall(t *testing.T) {
	makeBin, err := exec.LookPath("make")
	if err != nil {
		t.Skip("make is not installed: the Makefile's install and uninstall targets are NOT tested")
	}
	root, err := filepath.Abs(filepath.Join("..", ".."))
	if err != nil {
		t.Fatal(err)
	}
	table := installTable(t, filepath.Join(root, "docs", "deploy.md"))

	stubs := t.TempDir()
	calls := filepath.Join(stubs, "calls.log")
	for _, name := range installServiceManagers {
		script := "#!/bin/sh\necho \"$0 $*\" >> '" + calls + "'\n"
		if err := os.WriteFile(filepath.Join(stubs, name), []byte(script), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	env := []string{"PATH=" + stubs + string(os.PathListSeparator) + os.Getenv("PATH")}
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		if k != "PATH" && !slices.Contains(installMakeEnv, k) {
			env = append(env, kv)
		}
	}
	build := t.TempDir()
	binVars := []string{"BIN=" + filepath.Join(build, "imdsproxy"), "ISSUER_BIN=" + filepath.Join(build, "imdsproxy-issuer")}

	// runMake runs make in the repository root; a cold build cache on a
	// loaded machine takes minutes, hence the long bound.
	runMake := func(args ...string) string {
		t.Helper()
		ctx, cancel := context.WithTimeout(t.Context(), 8*time.Minute)
		defer cancel()
		cmd := exec.CommandContext(ctx, makeBin, append(args, binVars...)...)
		cmd.Dir = root
		cmd.Env = env
		cmd.WaitDelay = 10 * time.Second
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("make %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return string(out)
	}

	for i, prefix := range []string{"/usr/local", "/opt/imdsproxy"} {
		destdir := t.TempDir()
		vars := []string{"DESTDIR=" + destdir, "PREFIX=" + prefix}
		var want []string
		for _, p := range table {
			want = append(want, strings.ReplaceAll(p, "$(PREFIX)", prefix))
		}
		slices.Sort(want)

		// The recipes, as make would run them: every absolute path they
		// name lies under DESTDIR (or is a binary just built). Checked
		// before they run, so that a recipe that forgot $(DESTDIR) fails
		// here instead of writing to this machine's /etc or /usr.
		for _, target := range []string{"install", "uninstall"} {
			dry := runMake(append([]string{"-n", target}, vars...)...)
			for _, p := range recipePaths(dry) {
				if !within(p, destdir) && !within(p, build) && p != "/dev/null" {
					t.Fatalf("PREFIX=%s: make %s names %s, outside DESTDIR:\n%s", prefix, target, p, dry)
				}
			}
		}

		// The first round builds through install's own dependency; the
		// second reuses those binaries (-o build: do not remake build).
		if i == 0 {
			runMake(append([]string{"install"}, vars...)...)
		} else {
			runMake(append([]string{"-o", "build", "install"}, vars...)...)
		}
		files, _ := walkDestdir(t, destdir)
		if !slices.Equal(files, want) {
			t.Errorf("PREFIX=%s: make install installed\n  %s\ndocs/deploy.md lists\n  %s",
				prefix, strings.Join(files, "\n  "), strings.Join(want, "\n  "))
		}

		for _, name := range []string{"imdsproxy", "imdsproxy-issuer"} {
			bin := filepath.Join(destdir, prefix, "bin", name)
			if fi, err := os.Stat(bin); err != nil || fi.Mode()&0o111 == 0 {
				t.Errorf("PREFIX=%s: %s is not an executable file (%v)", prefix, bin, err)
				continue
			}
			ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
			out, err := exec.CommandContext(ctx, bin, "version").CombinedOutput()
			cancel()
			if err != nil || !strings.HasPrefix(string(out), name+" ") {
				t.Errorf("PREFIX=%s: %s version: %v: %q", prefix, bin, err, out)
			}
		}

		checkUnitExec(t, destdir, prefix, want)

		// Your config.yaml survives the uninstall; every other file goes.
		config := filepath.Join(destdir, "etc", "imdsproxy", "config.yaml")
		configData := []byte("# the operator's config\n")
		if err := os.WriteFile(config, configData, 0o600); err != nil {
			t.Fatal(err)
		}
		runMake(append([]string{"uninstall"}, vars...)...)
		files, dirs := walkDestdir(t, destdir)
		if !slices.Equal(files, []string{"/etc/imdsproxy/config.yaml"}) {
			t.Errorf("PREFIX=%s: after make uninstall, DESTDIR holds %q, want only /etc/imdsproxy/config.yaml", prefix, files)
		}
		if got, err := os.ReadFile(config); err != nil || !bytes.Equal(got, configData) {
			t.Errorf("PREFIX=%s: make uninstall changed config.yaml: %q, %v", prefix, got, err)
		}
		// The shared directories (/usr/local/bin, /etc/systemd/system, …)
		// stay, empty here; imdsproxy's own go, but for the one holding
		// config.yaml.
		for _, d := range dirs {
			if strings.Contains(path.Base(d), "imdsproxy") && d != "/etc/imdsproxy" && !within(prefix, d) {
				t.Errorf("PREFIX=%s: make uninstall left the directory %s", prefix, d)
			}
		}
		t.Logf("PREFIX=%s: after make uninstall: config.yaml and the directories %s", prefix, strings.Join(dirs, " "))
	}

	if data, err := os.ReadFile(calls); err == nil {
		t.Errorf("make install or uninstall ran a service manager, though docs/deploy.md says it starts nothing:\n%s", data)
	} else if !os.IsNotExist(err) {
		t.Fatal(err)
	}
}

// installTable returns the files of the table docs/deploy.md gives after
// "`make install` installs", as absolute paths that may start with
// $(PREFIX). A row naming several files gives the first one's directory
// once: "/etc/systemd/system/imdsproxy.service, `imdsproxy.socket`, …".
func installTable(t *testing.T, doc string) []string {
	t.Helper()
	data, err := os.ReadFile(doc)
	if err != nil {
		t.Fatal(err)
	}
	_, after, ok := strings.Cut(string(data), "`make install` installs")
	if !ok {
		t.Fatalf("%s: no sentence \"`make install` installs\" before the table of installed files", doc)
	}
	var files []string
	inTable := false
	for _, line := range strings.Split(after, "\n") {
		if !strings.HasPrefix(line, "|") {
			if inTable {
				break
			}
			continue
		}
		inTable = true
		cells := strings.Split(line, "|")
		if len(cells) < 3 {
			continue
		}
		dir := ""
		for _, m := range docCode.FindAllStringSubmatch(cells[1], -1) {
			p := m[1]
			if strings.HasPrefix(p, "/") || strings.HasPrefix(p, "$(PREFIX)/") {
				dir = path.Dir(p)
			} else if dir == "" {
				t.Fatalf("%s: the table names %q without a directory", doc, p)
			} else {
				p = path.Join(dir, p)
			}
			files = append(files, p)
		}
	}
	// A parser that finds too little would pass on an empty install.
	if len(files) < 8 {
		t.Fatalf("%s: found only %d files in the table of installed files: %q", doc, len(files), files)
	}
	return files
}

// walkDestdir returns the regular files and the directories under destdir,
// as absolute paths on the target system, sorted. Anything else (a
// symlink, a device) is an error.
func walkDestdir(t *testing.T, destdir string) (files, dirs []string) {
	t.Helper()
	err := filepath.WalkDir(destdir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || p == destdir {
			return err
		}
		rel, err := filepath.Rel(destdir, p)
		if err != nil {
			return err
		}
		target := "/" + filepath.ToSlash(rel)
		switch {
		case d.IsDir():
			dirs = append(dirs, target)
		case d.Type().IsRegular():
			files = append(files, target)
		default:
			t.Errorf("DESTDIR holds %s, of type %v", target, d.Type())
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(files)
	slices.Sort(dirs)
	return files, dirs
}

// checkUnitExec: in every installed unit, each Exec*= command that is one
// of ours runs $(PREFIX)/bin/…, and imdsproxy.service starts
// $(PREFIX)/bin/imdsproxy.
func checkUnitExec(t *testing.T, destdir, prefix string, installed []string) {
	t.Helper()
	execStart := ""
	for _, f := range installed {
		if path.Dir(f) != "/etc/systemd/system" {
			continue
		}
		data, err := os.ReadFile(filepath.Join(destdir, f))
		if err != nil {
			t.Error(err)
			continue
		}
		for _, line := range strings.Split(string(data), "\n") {
			key, value, ok := strings.Cut(strings.TrimSpace(line), "=")
			if !ok || !strings.HasPrefix(key, "Exec") {
				continue
			}
			fields := strings.Fields(strings.TrimLeft(value, "@-:+!"))
			if len(fields) == 0 {
				continue
			}
			if key == "ExecStart" && path.Base(f) == "imdsproxy.service" {
				execStart = fields[0]
			}
			if strings.HasPrefix(path.Base(fields[0]), "imdsproxy") && fields[0] != prefix+"/bin/"+path.Base(fields[0]) {
				t.Errorf("PREFIX=%s: %s: %s runs %s, not %s/bin/…", prefix, f, key, fields[0], prefix)
			}
		}
	}
	if execStart != prefix+"/bin/imdsproxy" {
		t.Errorf("PREFIX=%s: the installed imdsproxy.service's ExecStart runs %q, want %s/bin/imdsproxy", prefix, execStart, prefix)
	}
}

// recipePaths returns the absolute paths named in the commands make -n
// printed: the words (or the parts after a redirection) that start with /.
func recipePaths(commands string) []string {
	var paths []string
	for _, word := range strings.Fields(commands) {
		word = strings.TrimLeft(word, "0123456789<>&'\"(;")
		word = strings.TrimRight(word, "'\";)")
		if strings.HasPrefix(word, "/") {
			paths = append(paths, word)
		}
	}
	return paths
}

// within reports whether p is dir or lies under it.
func within(p, dir string) bool {
	return p == dir || strings.HasPrefix(p, dir+"/")
}
