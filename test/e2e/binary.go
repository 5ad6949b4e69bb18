package e2e

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
)

// Environment variables naming the binaries the harnesses run.
const (
	// BinEnv names the imdsproxy binary under test (DaemonBinary).
	BinEnv = "IMDSPROXY_BIN"
	// AEMMEnv names the amazon-ec2-metadata-mock binary (AEMMBinary).
	AEMMEnv = "AEMM_BIN"
	// IssuerBinEnv names the imdsproxy-issuer binary (IssuerBinary).
	IssuerBinEnv = "IMDSPROXY_ISSUER_BIN"
)

// RoleARN and RoleName are the role the harnesses' daemons serve by default
// and their fake STS lets them assume.
const (
	RoleARN  = "arn:aws:iam::222222222222:role/app"
	RoleName = "app"
)

var repoRoot = sync.OnceValues(func() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("go.mod not found above the working directory")
		}
		dir = parent
	}
})

// RepoRoot returns the directory holding go.mod, searched from the working
// directory up (go test runs a test binary in its package's directory).
func RepoRoot() (string, error) { return repoRoot() }

// built is one binary found or built once per process.
type built struct {
	once sync.Once
	path string
	err  error
	tmp  string // temporary build directory, removed by Cleanup
}

var (
	daemonBin built
	issuerBin built
)

// find returns $env (which must exist), else <repo>/bin/name, else a
// binary built now with `go build ./cmd/name` into a temporary directory
// that Cleanup removes. It decides once per process.
func (b *built) find(env, name string) (string, error) {
	b.once.Do(func() {
		if p := os.Getenv(env); p != "" {
			if _, err := os.Stat(p); err != nil {
				b.err = fmt.Errorf("%s=%s: %w", env, p, err)
			}
			b.path = p
			return
		}
		root, err := RepoRoot()
		if err != nil {
			b.err = err
			return
		}
		p := filepath.Join(root, "bin", name)
		if _, err := os.Stat(p); err == nil {
			b.path = p
			return
		}
		dir, err := os.MkdirTemp("", name+"-e2e-bin-")
		if err != nil {
			b.err = err
			return
		}
		b.tmp = dir
		p = filepath.Join(dir, name)
		cmd := exec.Command("go", "build", "-o", p, "./cmd/"+name)
		cmd.Dir = root
		out, err := cmd.CombinedOutput()
		if err != nil {
			b.err = fmt.Errorf("bin/%s is missing and `go build ./cmd/%s` failed: %v\n%s", name, name, err, out)
			return
		}
		b.path = p
	})
	return b.path, b.err
}

// DaemonBinary returns the imdsproxy binary: $IMDSPROXY_BIN (which must
// exist), else <repo>/bin/imdsproxy, else one built now with `go build
// ./cmd/imdsproxy` into a temporary directory that Cleanup removes. It
// decides once per process; safe for concurrent use.
func DaemonBinary() (string, error) { return daemonBin.find(BinEnv, "imdsproxy") }

// IssuerBinary returns the imdsproxy-issuer binary the same way:
// $IMDSPROXY_ISSUER_BIN, else <repo>/bin/imdsproxy-issuer (`make build`
// builds both), else one built now.
func IssuerBinary() (string, error) { return issuerBin.find(IssuerBinEnv, "imdsproxy-issuer") }

var (
	toolsMu sync.Mutex
	tools   = map[string]*built{}
)

// Tool returns a binary of the main package pkg (a path relative to the
// repository, such as ./test/fakes/cmd/imdsclient), built once per process
// into a temporary directory that Cleanup removes. The directory and the
// binary are readable and executable by every uid, so that a test may run
// it as another user. Safe for concurrent use.
func Tool(pkg string) (string, error) {
	toolsMu.Lock()
	b, ok := tools[pkg]
	if !ok {
		b = &built{}
		tools[pkg] = b
	}
	toolsMu.Unlock()
	b.once.Do(func() {
		root, err := RepoRoot()
		if err != nil {
			b.err = err
			return
		}
		if b.tmp, err = os.MkdirTemp("", "imdsproxy-e2e-tool-"); err != nil {
			b.err = err
			return
		}
		if err := os.Chmod(b.tmp, 0o755); err != nil {
			b.err = err
			return
		}
		p := filepath.Join(b.tmp, filepath.Base(pkg))
		cmd := exec.Command("go", "build", "-o", p, pkg)
		cmd.Dir = root
		if out, err := cmd.CombinedOutput(); err != nil {
			b.err = fmt.Errorf("go build %s: %v\n%s", pkg, err, out)
			return
		}
		b.path = p
	})
	return b.path, b.err
}

// AEMMBinary returns $AEMM_BIN, else <repo>/bin/tools/ec2-metadata-mock
// (where `make tools` installs amazon-ec2-metadata-mock). It does not check
// that the file exists.
func AEMMBinary() string {
	if p := os.Getenv(AEMMEnv); p != "" {
		return p
	}
	root, _ := RepoRoot() // "" on error: the path is then relative
	return filepath.Join(root, "bin", "tools", "ec2-metadata-mock")
}

// Cleanup stops the shared upstream IMDS (SharedUpstream) and removes the
// binaries DaemonBinary, IssuerBinary and Tool built, if any. TestMain calls it
// after m.Run.
func Cleanup() {
	upMu.Lock()
	up := upstream
	upMu.Unlock()
	if up != nil {
		up.Stop()
	}
	toolsMu.Lock()
	all := []*built{&daemonBin, &issuerBin}
	for _, b := range tools {
		all = append(all, b)
	}
	toolsMu.Unlock()
	for _, b := range all {
		if b.tmp != "" {
			os.RemoveAll(b.tmp)
		}
	}
}

// SanitizeEnv removes from this process's environment every variable that
// would make an in-process SDK client (or anything else) look elsewhere for
// credentials, a CA bundle or a proxy (the variables Environ leaves out),
// and sets NO_PROXY=*.
func SanitizeEnv() {
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		if dropEnv(k) {
			os.Unsetenv(k)
		}
	}
	os.Setenv("NO_PROXY", "*")
	os.Setenv("no_proxy", "*")
}

// Environ returns this process's environment without AWS_*, CA bundles
// (SSL_CERT_FILE, SSL_CERT_DIR) and proxies (HTTP_PROXY, HTTPS_PROXY,
// ALL_PROXY, NO_PROXY, in any case), and without the variables named in
// drop: the start of a daemon's hermetic environment.
func Environ(drop ...string) []string {
	var env []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		if dropEnv(k) || slices.Contains(drop, k) {
			continue
		}
		env = append(env, kv)
	}
	return env
}

func dropEnv(k string) bool {
	if strings.HasPrefix(k, "AWS_") {
		return true
	}
	switch strings.ToUpper(k) {
	case "SSL_CERT_FILE", "SSL_CERT_DIR", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY":
		return true
	}
	return false
}
