package token

import (
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
)

// CheckFileMode checks who besides the daemon may read or replace the file
// at path, which holds a secret the daemon reads (identity.jwt_file: a
// bearer token anyone who reads it can present to STS until it expires).
// It never reads the file.
//
// The contract, for callers such as `imdsproxy check-config` and NewFile:
//
//   - err is not nil when path cannot be examined: it wraps fs.ErrNotExist
//     when the file does not exist (yet: a token agent may write it after
//     the daemon starts; callers decide whether that is fatal), and is an
//     error of its own when path is not a regular file. A symbolic link is
//     followed: the file it names is what the daemon reads.
//   - warning is "" when the file is fine, otherwise one line naming the
//     file and every problem found, with the fix:
//     readable by its group or by others (mode & 0o044); writable by its
//     group or others (mode & 0o022: whoever can write it chooses the
//     identity the daemon presents); owned by a uid other than the
//     daemon's effective uid and root; in a directory that its group or
//     others may write without the sticky bit (anyone there can replace
//     the file; for a symbolic link, the link's directory and the
//     target's).
//   - Problems are warnings, not errors: the daemon works, and a token
//     agent that runs as another user may legitimately share the file
//     through a group. An operator who wants them fatal treats a non-empty
//     warning as an error.
//
// CheckFileMode is safe for concurrent use.
func CheckFileMode(path string) (warning string, err error) {
	st, err := os.Stat(path)
	if err != nil {
		return "", fmt.Errorf("token: %w", err)
	}
	if !st.Mode().IsRegular() {
		return "", fmt.Errorf("token: %s: not a regular file (%s)", path, fileType(st.Mode()))
	}
	perm := st.Mode().Perm()
	var problems []string
	if p := whom(perm, 0o040, 0o004); p != "" {
		problems = append(problems, "it is readable by "+p+": they can present the token and assume the role until it expires")
	}
	if p := whom(perm, 0o020, 0o002); p != "" {
		problems = append(problems, "it is writable by "+p+": they can choose the identity the daemon presents")
	}
	var fixes []string
	if perm&0o066 != 0 {
		fixes = append(fixes, "chmod 600 "+path)
	}
	if sys, ok := st.Sys().(*syscall.Stat_t); ok {
		if uid := int(sys.Uid); uid != 0 && uid != os.Geteuid() {
			problems = append(problems, fmt.Sprintf("it is owned by uid %d, not by the daemon's uid %d or root", uid, os.Geteuid()))
			fixes = append(fixes, fmt.Sprintf("chown %d %s", os.Geteuid(), path))
		}
	}
	dirs := []string{filepath.Dir(filepath.Clean(path))}
	if real, err := filepath.EvalSymlinks(path); err == nil && filepath.Dir(real) != dirs[0] {
		dirs = append(dirs, filepath.Dir(real)) // the link's and the target's
	}
	for _, dir := range dirs {
		if dst, err := os.Stat(dir); err == nil && dst.Mode()&fs.ModeSticky == 0 {
			if p := whom(dst.Mode().Perm(), 0o020, 0o002); p != "" {
				problems = append(problems, fmt.Sprintf("its directory %s is writable by %s without the sticky bit: they can replace the file", dir, p))
				fixes = append(fixes, "chmod go-w "+dir)
			}
		}
	}
	if len(problems) == 0 {
		return "", nil
	}
	return fmt.Sprintf("%s (mode %04o): %s; fix: %s", path, uint32(perm), strings.Join(problems, "; "), strings.Join(fixes, ", ")), nil
}

// whom says which of group (bit g) and others (bit o) perm grants.
func whom(perm fs.FileMode, g, o fs.FileMode) string {
	switch {
	case perm&g != 0 && perm&o != 0:
		return "group and others"
	case perm&g != 0:
		return "its group"
	case perm&o != 0:
		return "others"
	}
	return ""
}
