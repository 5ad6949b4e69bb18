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

var (
	binOnce sync.Once
	binPath string
	binErr  error
	binTmp  string // temporary build directory, removed by Cleanup
)

// DaemonBinary returns the imdsproxy binary: $IMDSPROXY_BIN (which must
// exist), else <repo>/bin/imdsproxy, else one built now with `go build
// ./cmd/imdsproxy` into a temporary directory that Cleanup removes. It
// decides once per process; safe for concurrent use.
func DaemonBinary() (string, error) {
	binOnce.Do(func() {
		if p := os.Getenv(BinEnv); p != "" {
			if _, err := os.Stat(p); err != nil {
				binErr = fmt.Errorf("%s=%s: %w", BinEnv, p, err)
			}
			binPath = p
			return
		}
		root, err := RepoRoot()
		if err != nil {
			binErr = err
			return
		}
		p := filepath.Join(root, "bin", "imdsproxy")
		if _, err := os.Stat(p); err == nil {
			binPath = p
			return
		}
		dir, err := os.MkdirTemp("", "imdsproxy-e2e-bin-")
		if err != nil {
			binErr = err
			return
		}
		binTmp = dir
		p = filepath.Join(dir, "imdsproxy")
		cmd := exec.Command("go", "build", "-o", p, "./cmd/imdsproxy")
		cmd.Dir = root
		out, err := cmd.CombinedOutput()
		if err != nil {
			binErr = fmt.Errorf("bin/imdsproxy is missing and `go build ./cmd/imdsproxy` failed: %v\n%s", err, out)
			return
		}
		binPath = p
	})
	return binPath, binErr
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
// daemon binary DaemonBinary built, if any. TestMain calls it after m.Run.
func Cleanup() {
	upMu.Lock()
	up := upstream
	upMu.Unlock()
	if up != nil {
		up.Stop()
	}
	if binTmp != "" {
		os.RemoveAll(binTmp)
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
