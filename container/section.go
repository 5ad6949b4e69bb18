package container

import (
	"fmt"
	"net"
	"net/netip"
	"path"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/imdsproxy/imdsproxy/access"
	"github.com/imdsproxy/imdsproxy/config"
)

// Section is the `container:` section of the daemon's config: the container
// credentials endpoint. docs/configuration.md, "Container credentials
// endpoint".
type Section struct {
	// Enabled opens the endpoint. Off by default.
	Enabled bool `yaml:"enabled"`
	// Listen are the endpoint's addresses (IP:port): loopback, and the
	// link-local addresses SDKs accept, 169.254.170.23 and [fd00:ec2::23].
	Listen []string `yaml:"listen"`
	// Link is where the daemon adds the link-local addresses of Listen
	// (and removes them at exit): an existing link (lo, the default), or
	// a dummy link it creates and deletes. "" leaves addresses to the
	// operator.
	Link string `yaml:"link"`
	// Path is the one path answered.
	Path string `yaml:"path"`
	// TokenDir holds a directory per workload with its token file.
	TokenDir string `yaml:"token_dir"`
	// RotateInterval is how often every token is replaced (±10% jitter).
	RotateInterval config.Duration `yaml:"rotate_interval"`
	// RotateOverlap is how long a replaced token is still accepted.
	RotateOverlap config.Duration `yaml:"rotate_overlap"`
	// TokenOwners maps the unit of a unit workload to the uid its token
	// file is made readable by (default 0: root). A uid workload's file
	// belongs to that uid.
	TokenOwners map[string]int `yaml:"token_owners"`
}

// Defaults of the section.
const (
	DefaultListen         = "127.0.0.1:8171"
	DefaultLink           = "lo"
	DefaultPath           = "/v1/credentials"
	DefaultTokenDir       = "/run/imdsproxy/container"
	DefaultRotateInterval = time.Hour
	DefaultRotateOverlap  = 5 * time.Minute
)

// The link-local addresses of the container credentials provider that SDKs
// accept over plain HTTP besides loopback (EKS Pod Identity's).
var (
	LinkLocalIPv4 = netip.MustParseAddr("169.254.170.23")
	LinkLocalIPv6 = netip.MustParseAddr("fd00:ec2::23")
)

// DefaultSection is the section's defaults.
func DefaultSection() Section {
	return Section{
		Listen:         []string{DefaultListen},
		Link:           DefaultLink,
		Path:           DefaultPath,
		TokenDir:       DefaultTokenDir,
		RotateInterval: config.Duration(DefaultRotateInterval),
		RotateOverlap:  config.Duration(DefaultRotateOverlap),
	}
}

var (
	pathRe = regexp.MustCompile(`^(/[A-Za-z0-9_.~-]+)+$`)
	linkRe = regexp.MustCompile(`^[A-Za-z0-9_.-]{1,15}$`)
)

// maxListen bounds container.listen.
const maxListen = 8

// Validate checks the section against the workloads: list; every error
// names the key.
func (s *Section) Validate(workloads []access.Workload) error {
	if len(s.Listen) == 0 || len(s.Listen) > maxListen {
		return fmt.Errorf("config: container.listen: %d addresses, want 1..%d", len(s.Listen), maxListen)
	}
	for i, l := range s.Listen {
		ap, err := netip.ParseAddrPort(l)
		if err != nil || ap.Port() == 0 {
			return fmt.Errorf("config: container.listen[%d]: %q is not an IP:port address such as 127.0.0.1:8171 or [fd00:ec2::23]:80", i, l)
		}
		if a := ap.Addr(); !a.IsLoopback() && a.Unmap() != LinkLocalIPv4 && a != LinkLocalIPv6 {
			return fmt.Errorf("config: container.listen[%d]: %s: the endpoint listens only on loopback, %s or [%s] (SDKs fetch container credentials over plain HTTP from those and 169.254.170.2, which is ECS's agent's)", i, a, LinkLocalIPv4, LinkLocalIPv6)
		}
	}
	if s.Link != "" && (!linkRe.MatchString(s.Link) || s.Link == "." || s.Link == "..") {
		return fmt.Errorf("config: container.link: %q is not a network interface name (1..15 letters, digits, _ . -)", s.Link)
	}
	if len(s.Path) > 128 || !pathRe.MatchString(s.Path) || slices.ContainsFunc(strings.Split(s.Path, "/"), func(seg string) bool { return seg == "." || seg == ".." }) {
		return fmt.Errorf("config: container.path: %q is not an absolute URL path such as /v1/credentials (letters, digits, _ . ~ -; no query)", s.Path)
	}
	if s.TokenDir == "" || path.Clean(s.TokenDir) != s.TokenDir || s.TokenDir == "/" {
		return fmt.Errorf("config: container.token_dir: %q must be a clean absolute path of a directory of its own, such as %s", s.TokenDir, DefaultTokenDir)
	}
	if err := config.AbsPath("container.token_dir", s.TokenDir); err != nil {
		return err
	}
	if d := s.RotateInterval.D(); d < time.Minute || d > 24*time.Hour {
		return fmt.Errorf("config: container.rotate_interval: %s is outside 1m..24h", d)
	}
	if d := s.RotateOverlap.D(); d < time.Second || d > time.Hour || d > s.RotateInterval.D()/2 {
		return fmt.Errorf("config: container.rotate_overlap: %s is outside 1s..1h or more than half of container.rotate_interval", d)
	}
	units := map[string]bool{}
	for _, w := range workloads {
		if w.UID == nil {
			units[w.Unit] = true
		}
	}
	for unit, uid := range s.TokenOwners {
		if !units[unit] {
			return fmt.Errorf("config: container.token_owners: %q is not the unit of a workloads: entry", unit)
		}
		if uid < 0 || uid > access.MaxUID {
			return fmt.Errorf("config: container.token_owners.%s: %d is not a uid (0..%d)", unit, uid, access.MaxUID)
		}
	}
	if s.Enabled && len(workloads) == 0 {
		return fmt.Errorf("config: container.enabled: the endpoint serves the workloads: (each gets a token); there are none")
	}
	return nil
}

// Owner is the uid the token file of w is made readable by.
func (s Section) Owner(w access.Workload) int {
	if w.UID != nil {
		return *w.UID
	}
	return s.TokenOwners[w.Unit]
}

// Owners maps the ID of each workload to its Owner.
func (s Section) Owners(workloads []access.Workload) map[string]int {
	m := make(map[string]int, len(workloads))
	for _, w := range workloads {
		m[w.ID()] = s.Owner(w)
	}
	return m
}

// LinkLocal returns the link-local addresses of Listen, each once: those
// the daemon adds to Link.
func (s Section) LinkLocal() []netip.Addr {
	var out []netip.Addr
	for _, l := range s.Listen {
		if ap, err := netip.ParseAddrPort(l); err == nil && !ap.Addr().IsLoopback() && !slices.Contains(out, ap.Addr().Unmap()) {
			out = append(out, ap.Addr().Unmap())
		}
	}
	return out
}

// TokenFile is the path of the token file of the workload with ID id.
func (s Section) TokenFile(id string) string {
	return path.Join(s.TokenDir, dirName(id), tokenFileName)
}

// URL is the endpoint's URL for AWS_CONTAINER_CREDENTIALS_FULL_URI on the
// first listen address that is link-local when linkLocal is true (for
// containers on a bridge), else on the first loopback one; "" when there
// is none.
func (s Section) URL(linkLocal bool) string {
	for _, l := range s.Listen {
		ap, err := netip.ParseAddrPort(l)
		if err != nil || ap.Addr().IsLoopback() == linkLocal {
			continue
		}
		host := ap.Addr().Unmap().String()
		if ap.Port() != 80 {
			host = net.JoinHostPort(host, fmt.Sprint(ap.Port()))
		} else if ap.Addr().Is6() && !ap.Addr().Is4In6() {
			host = "[" + host + "]"
		}
		return "http://" + host + s.Path
	}
	return ""
}
