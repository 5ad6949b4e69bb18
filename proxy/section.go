package proxy

import (
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"

	"github.com/imdsproxy/imdsproxy/access"
	"github.com/imdsproxy/imdsproxy/config"
)

// IMDSSection is the `imds:` section of the daemon's config.
type IMDSSection struct {
	// Tokens is required (IMDSv2 only) or optional (IMDSv1 allowed).
	Tokens string `yaml:"tokens"`
	// HopLimit is the IP TTL of token responses, 1..64.
	HopLimit int `yaml:"hop_limit"`
	// TokenKeyFile keeps the session token key, so tokens survive a
	// restart ("" : a random key per process). Read at start only.
	TokenKeyFile string `yaml:"token_key_file"`
	// AllowedHosts are Host header values accepted besides the defaults
	// (Config.AllowedHosts).
	AllowedHosts []string `yaml:"allowed_hosts"`
	// Passthrough is what the pass-through refuses to which clients.
	Passthrough access.PassthroughSection `yaml:"passthrough"`
}

// DefaultIMDSSection is the section's defaults.
func DefaultIMDSSection() IMDSSection { return IMDSSection{Tokens: "required", HopLimit: 1} }

// Validate checks the section; every error names the key.
func (s *IMDSSection) Validate() error {
	if s.Tokens != "required" && s.Tokens != "optional" {
		return fmt.Errorf("config: imds.tokens: must be \"required\" or \"optional\", got %q", s.Tokens)
	}
	if s.HopLimit < 1 || s.HopLimit > 64 {
		return fmt.Errorf("config: imds.hop_limit: %d is outside 1..64", s.HopLimit)
	}
	if err := config.AbsPath("imds.token_key_file", s.TokenKeyFile); err != nil {
		return err
	}
	if _, err := normalizeHosts(s.AllowedHosts); err != nil {
		return fmt.Errorf("config: imds.allowed_hosts: %s", strings.TrimPrefix(err.Error(), "proxy: "))
	}
	return s.Passthrough.Validate()
}

// LoadTokenKey returns the IMDSv2 token key kept in path, creating the file
// (mode 0600, TokenKeySize random bytes) when it does not exist; several
// processes creating it at once all end up with the first one's key. An
// empty path gives nil: a random key per process. A key file readable by
// others, or of the wrong size, is refused.
func LoadTokenKey(path string) ([]byte, error) {
	if path == "" {
		return nil, nil
	}
	key, err := readTokenKey(path)
	if err == nil || !errors.Is(err, fs.ErrNotExist) {
		return key, err
	}
	key = make([]byte, TokenKeySize)
	if _, err := rand.Read(key); err != nil {
		return nil, fmt.Errorf("imds.token_key_file: %w", err)
	}
	f, err := os.CreateTemp(filepath.Dir(path), ".token.key-*")
	if err != nil {
		return nil, fmt.Errorf("imds.token_key_file: %w", err)
	}
	tmp := f.Name()
	_, werr := f.Write(key)
	if cerr := f.Close(); werr == nil {
		werr = cerr
	}
	if werr == nil {
		// Link, not rename: if another process created the file meanwhile,
		// both use the first one.
		werr = os.Link(tmp, path)
	}
	os.Remove(tmp)
	if werr != nil && !errors.Is(werr, fs.ErrExist) {
		return nil, fmt.Errorf("imds.token_key_file: %w", werr)
	}
	return readTokenKey(path)
}

func readTokenKey(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("imds.token_key_file: %w", err)
	}
	defer f.Close()
	if st, err := f.Stat(); err == nil && st.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("imds.token_key_file: %s is readable by others (mode %v); it must be 0600", path, st.Mode().Perm())
	}
	key := make([]byte, TokenKeySize+1)
	n, err := io.ReadFull(f, key)
	if n != TokenKeySize || !errors.Is(err, io.ErrUnexpectedEOF) {
		return nil, fmt.Errorf("imds.token_key_file: %s must hold exactly %d bytes", path, TokenKeySize)
	}
	return key[:n], nil
}

// ExposedWarning is logged (and printed by check-config) for an IMDS
// listener on a wildcard address: it hands this host's credentials to anyone
// who can reach the port from any interface, and the Host check does not
// stop a request sent straight to it.
const ExposedWarning = "the IMDS listener accepts connections on every interface: anyone who can reach this port from the network gets this host's credentials; " +
	"listen on 127.0.0.1 (and [::1]), and for containers on the bridges' own addresses (docs/deploy.md, Containers on a bridge)"

// Exposed reports whether the listen address addr (host:port) has an
// unspecified IP (0.0.0.0, ::) or no host at all.
func Exposed(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if host == "" {
		return true
	}
	ip, err := netip.ParseAddr(host)
	return err == nil && ip.IsUnspecified()
}
