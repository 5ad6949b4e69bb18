package intercept

import (
	"fmt"
	"net"
	"os"
	"os/user"
	"strconv"
	"time"

	"github.com/imdsproxy/imdsproxy/config"
)

// Section is the `intercept:` section of the daemon's config: transparent
// interception of 169.254.169.254 (and [fd00:ec2::254]) with nftables. The
// whole section is read at start: changing it needs a restart (it decides
// which listeners the daemon opens).
type Section struct {
	// Enabled makes serve listen on ListenIPv6 too and keep the rules in
	// place (check and repair every CheckInterval); `intercept install`
	// installs the rules only when it is true (else it removes them).
	Enabled bool `yaml:"enabled"`
	// IPv6 also redirects [fd00:ec2::254]:80 to ListenIPv6. Unset: true.
	IPv6 *bool `yaml:"ipv6"`
	// ListenIPv6 is the IMDS listener for redirected IPv6 connections; a
	// redirect in the output hook targets [::1]. Default [::1]:<port of listen>.
	ListenIPv6 string `yaml:"listen_ipv6"`
	// Bridges are interfaces (docker0, cni0, …) whose incoming connections to
	// the metadata addresses are redirected too.
	Bridges []string `yaml:"bridges"`
	// CheckInterval is how often serve checks and repairs the rules. Default 30s.
	CheckInterval config.Duration `yaml:"check_interval"`
	// ExemptUID is the uid whose connections are not redirected (the
	// daemon's). Unset: serve uses its own uid; `intercept install` run as
	// root uses the uid of the user imdsproxy.
	ExemptUID *int `yaml:"exempt_uid"`
}

// DefaultCheckInterval is intercept.check_interval when unset.
const DefaultCheckInterval = 30 * time.Second

// DaemonUser is the system user of the packaged service
// (systemd/imdsproxy.sysusers).
const DaemonUser = "imdsproxy"

// Validate checks the section against the IMDS listen address and fills
// defaults; every error names the key.
func (s *Section) Validate(listen string) error {
	if s.IPv6 == nil {
		on := true
		s.IPv6 = &on
	}
	if s.CheckInterval == 0 {
		s.CheckInterval = config.Duration(DefaultCheckInterval)
	}
	if d := s.CheckInterval.D(); d < 100*time.Millisecond || d > time.Hour {
		return fmt.Errorf("config: intercept.check_interval: %s is outside 100ms..1h", d)
	}
	host, port, err := net.SplitHostPort(listen)
	if err != nil {
		return nil // listen is reported by its own check
	}
	if s.ListenIPv6 == "" {
		s.ListenIPv6 = net.JoinHostPort("::1", port)
	}
	h6, p6, err := net.SplitHostPort(s.ListenIPv6)
	if err != nil || p6 == "" {
		return fmt.Errorf("config: intercept.listen_ipv6: %q is not a host:port address such as [::1]:8169", s.ListenIPv6)
	}
	if s.ExemptUID != nil && (*s.ExemptUID < 0 || *s.ExemptUID > 1<<32-2) {
		return fmt.Errorf("config: intercept.exempt_uid: %d is not a uid", *s.ExemptUID)
	}
	if err := (Config{Port: 1, Bridges: s.Bridges}).Validate(); err != nil {
		return fmt.Errorf("config: intercept.bridges: %w", err)
	}
	if !s.Enabled {
		return nil
	}
	if _, err := s.Rules(listen, 0); err != nil {
		return fmt.Errorf("config: intercept: %w (interception needs fixed ports)", err)
	}
	// A redirect in the output hook delivers to 127.0.0.1 and [::1].
	if host != "127.0.0.1" && host != "0.0.0.0" {
		return fmt.Errorf("config: listen: %q: with intercept.enabled the IMDS listener must be on 127.0.0.1 (redirected connections arrive there)", listen)
	}
	if *s.IPv6 && h6 != "::1" && h6 != "::" {
		return fmt.Errorf("config: intercept.listen_ipv6: %q must be on [::1] (redirected IPv6 connections arrive there)", s.ListenIPv6)
	}
	return nil
}

// ListenAddrs are the IMDS listener addresses the section adds to listen:
// listen_ipv6 when enabled with IPv6.
func (s Section) ListenAddrs() []string {
	if s.Enabled && s.IPv6 != nil && *s.IPv6 {
		return []string{s.ListenIPv6}
	}
	return nil
}

// Rules is the Config of the section: ports from listen and listen_ipv6,
// and the given exempt uid unless exempt_uid is set.
func (s Section) Rules(listen string, uid uint32) (Config, error) {
	_, port, _ := net.SplitHostPort(listen)
	p, err := strconv.ParseUint(port, 10, 16)
	if err != nil || p == 0 {
		return Config{}, fmt.Errorf("listen port %q is not a TCP port", port)
	}
	rc := Config{Port: uint16(p), ExemptUID: uid, Bridges: s.Bridges}
	if s.IPv6 == nil || *s.IPv6 {
		_, port6, _ := net.SplitHostPort(s.ListenIPv6)
		p6, err := strconv.ParseUint(port6, 10, 16)
		if err != nil || p6 == 0 {
			return Config{}, fmt.Errorf("listen_ipv6 port %q is not a TCP port", port6)
		}
		rc.Port6 = uint16(p6)
	}
	if s.ExemptUID != nil {
		rc.ExemptUID = uint32(*s.ExemptUID)
	}
	return rc, rc.Validate()
}

// NewRules builds the rules of the section. The exempt uid, when
// exempt_uid is unset, is the daemon's own (forDaemon, or any caller that
// is not root), else the uid of DaemonUser.
func (s Section) NewRules(listen string, forDaemon bool) (*Rules, error) {
	uid := uint32(0)
	if s.ExemptUID == nil {
		var err error
		if uid, err = exemptUID(forDaemon); err != nil {
			return nil, err
		}
	}
	rc, err := s.Rules(listen, uid)
	if err != nil {
		return nil, err
	}
	return New(rc)
}

func exemptUID(forDaemon bool) (uint32, error) {
	if forDaemon || os.Geteuid() != 0 {
		return uint32(os.Geteuid()), nil
	}
	u, err := user.Lookup(DaemonUser)
	if err != nil {
		return 0, fmt.Errorf("intercept.exempt_uid is unset and there is no user %q (%v): set intercept.exempt_uid to the daemon's uid", DaemonUser, err)
	}
	uid, err := strconv.ParseUint(u.Uid, 10, 32)
	if err != nil {
		return 0, fmt.Errorf("user %s: uid %q: %w", DaemonUser, u.Uid, err)
	}
	return uint32(uid), nil
}
