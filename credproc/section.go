package credproc

import (
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"os/user"
	"path"
	"strconv"
	"time"
)

// Section is the `credential_process:` section of the daemon's config: the
// unix socket `imdsproxy credential-process` asks. docs/configuration.md,
// "credential_process".
type Section struct {
	// Enabled opens the socket. Off by default.
	Enabled bool `yaml:"enabled"`
	// Socket is the socket's path.
	Socket string `yaml:"socket"`
	// SocketMode is the socket file's mode, in octal ("0666": every local
	// user may ask; the access: policy decides what each gets).
	SocketMode string `yaml:"socket_mode"`
	// SocketGroup, when set, is the group (name or gid) of the socket file.
	SocketGroup string `yaml:"socket_group"`
}

// Defaults of the section.
const (
	DefaultSocket     = "/run/imdsproxy/credentials.sock"
	DefaultSocketMode = "0666"
)

// DefaultSection is the section's defaults.
func DefaultSection() Section {
	return Section{Socket: DefaultSocket, SocketMode: DefaultSocketMode}
}

// maxSocketPath is the longest path of a unix socket (sun_path, with its
// terminating NUL).
const maxSocketPath = 107

// Validate checks the section; every error names the key.
func (s *Section) Validate() error {
	if s.Socket == "" || s.Socket[0] != '/' || path.Clean(s.Socket) != s.Socket || len(s.Socket) > maxSocketPath {
		return fmt.Errorf("config: credential_process.socket: %q must be a clean absolute path of at most %d bytes", s.Socket, maxSocketPath)
	}
	if _, err := s.mode(); err != nil {
		return err
	}
	if s.SocketGroup != "" && !validGroup(s.SocketGroup) {
		return fmt.Errorf("config: credential_process.socket_group: %q is not a group name or gid", s.SocketGroup)
	}
	return nil
}

// validGroup reports whether s is a group name as useradd accepts it
// ([a-z_][a-z0-9_-]{0,31}) or a gid (1..10 digits); the group is looked up
// when the socket is made.
func validGroup(s string) bool {
	if s == "" {
		return false
	}
	digits, name := len(s) <= 10, len(s) <= 32 && (s[0] == '_' || 'a' <= s[0] && s[0] <= 'z')
	for i := 0; i < len(s); i++ {
		c := s[i]
		isDigit := '0' <= c && c <= '9'
		digits = digits && isDigit
		name = name && ('a' <= c && c <= 'z' || isDigit || c == '_' || c == '-')
	}
	return digits || name
}

func (s Section) mode() (fs.FileMode, error) {
	m, err := strconv.ParseUint(s.SocketMode, 8, 32)
	if err != nil || m > 0o777 || len(s.SocketMode) > 4 {
		return 0, fmt.Errorf("config: credential_process.socket_mode: %q is not an octal file mode such as 0666 or 0660", s.SocketMode)
	}
	return fs.FileMode(m), nil
}

func (s Section) gid() (int, error) {
	if n, err := strconv.Atoi(s.SocketGroup); err == nil && n >= 0 {
		return n, nil
	}
	g, err := user.LookupGroup(s.SocketGroup)
	if err != nil {
		return 0, fmt.Errorf("config: credential_process.socket_group: %q: %v", s.SocketGroup, err)
	}
	return strconv.Atoi(g.Gid)
}

// Listen opens the socket of s: a socket file left by an earlier run that
// nobody answers on is replaced; anything else at the path is refused. The
// file gets SocketMode and SocketGroup (the daemon must be a member of the
// group, or hold CAP_CHOWN). The listener removes the file when closed.
func (s Section) Listen() (net.Listener, error) {
	mode, err := s.mode()
	if err != nil {
		return nil, err
	}
	if st, err := os.Lstat(s.Socket); err == nil {
		if st.Mode()&fs.ModeSocket == 0 {
			return nil, fmt.Errorf("credential_process.socket: %s exists and is not a socket", s.Socket)
		}
		if c, err := net.DialTimeout("unix", s.Socket, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("credential_process.socket: %s: another process answers on it", s.Socket)
		}
		if err := os.Remove(s.Socket); err != nil {
			return nil, fmt.Errorf("credential_process.socket: %w", err)
		}
	} else if !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("credential_process.socket: %w", err)
	}
	if err := os.MkdirAll(path.Dir(s.Socket), 0o755); err != nil {
		return nil, fmt.Errorf("credential_process.socket: %w", err)
	}
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: s.Socket, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("credential_process.socket: %w", err)
	}
	ln.SetUnlinkOnClose(true)
	if err := os.Chmod(s.Socket, mode); err != nil {
		ln.Close()
		return nil, fmt.Errorf("credential_process.socket_mode: %w", err)
	}
	if s.SocketGroup != "" {
		gid, err := s.gid()
		if err == nil {
			err = os.Chown(s.Socket, -1, gid)
		}
		if err != nil {
			ln.Close()
			return nil, fmt.Errorf("credential_process.socket_group: %w", err)
		}
	}
	return ln, nil
}
