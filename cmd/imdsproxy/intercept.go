package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/user"
	"strconv"
	"time"

	"github.com/imdsproxy/imdsproxy/intercept"
)

// InterceptConfig is the `intercept:` section: transparent interception of
// 169.254.169.254 (and [fd00:ec2::254]) with nftables.
type InterceptConfig struct {
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
	CheckInterval Duration `yaml:"check_interval"`
	// ExemptUID is the uid whose connections are not redirected (the
	// daemon's). Unset: serve uses its own uid; `intercept install` run as
	// root uses the uid of the user imdsproxy.
	ExemptUID *int `yaml:"exempt_uid"`
}

// defaultInterceptCheck is intercept.check_interval when unset.
const defaultInterceptCheck = 30 * time.Second

// validateDeployment validates the deployment keys (intercept:, and
// imds.token_key_file) and fills their defaults.
func (c *Config) validateDeployment() error {
	if f := c.IMDS.TokenKeyFile; f != "" && f[0] != '/' {
		return fmt.Errorf("config: imds.token_key_file: %q must be an absolute path", f)
	}
	return c.Intercept.validate(c.Listen)
}

// validate checks the section against the IMDS listen address and fills
// defaults.
func (c *InterceptConfig) validate(listen string) error {
	if c.IPv6 == nil {
		on := true
		c.IPv6 = &on
	}
	if c.CheckInterval == 0 {
		c.CheckInterval = Duration(defaultInterceptCheck)
	}
	if d := c.CheckInterval.D(); d < 100*time.Millisecond || d > time.Hour {
		return fmt.Errorf("config: intercept.check_interval: %s is outside 100ms..1h", d)
	}
	host, port, err := net.SplitHostPort(listen)
	if err != nil {
		return nil // listen is reported by Config.validate
	}
	if c.ListenIPv6 == "" {
		c.ListenIPv6 = net.JoinHostPort("::1", port)
	}
	h6, p6, err := net.SplitHostPort(c.ListenIPv6)
	if err != nil || p6 == "" {
		return fmt.Errorf("config: intercept.listen_ipv6: %q is not a host:port address such as [::1]:8169", c.ListenIPv6)
	}
	if c.ExemptUID != nil && (*c.ExemptUID < 0 || *c.ExemptUID > 1<<32-2) {
		return fmt.Errorf("config: intercept.exempt_uid: %d is not a uid", *c.ExemptUID)
	}
	if err := (intercept.Config{Port: 1, Bridges: c.Bridges}).Validate(); err != nil {
		return fmt.Errorf("config: intercept.bridges: %w", err)
	}
	if !c.Enabled {
		return nil
	}
	if _, err := c.rulesConfig(listen, 0); err != nil {
		return fmt.Errorf("config: intercept: %w (interception needs fixed ports)", err)
	}
	// A redirect in the output hook delivers to 127.0.0.1 and [::1].
	if host != "127.0.0.1" && host != "0.0.0.0" {
		return fmt.Errorf("config: listen: %q: with intercept.enabled the IMDS listener must be on 127.0.0.1 (redirected connections arrive there)", listen)
	}
	if *c.IPv6 && h6 != "::1" && h6 != "::" {
		return fmt.Errorf("config: intercept.listen_ipv6: %q must be on [::1] (redirected IPv6 connections arrive there)", c.ListenIPv6)
	}
	return nil
}

// rulesConfig is the intercept.Config of this section: ports from listen and
// listen_ipv6, and the given exempt uid unless exempt_uid is set.
func (c *InterceptConfig) rulesConfig(listen string, uid uint32) (intercept.Config, error) {
	_, port, _ := net.SplitHostPort(listen)
	p, err := strconv.ParseUint(port, 10, 16)
	if err != nil || p == 0 {
		return intercept.Config{}, fmt.Errorf("listen port %q is not a TCP port", port)
	}
	rc := intercept.Config{Port: uint16(p), ExemptUID: uid, Bridges: c.Bridges}
	if c.IPv6 == nil || *c.IPv6 {
		_, port6, _ := net.SplitHostPort(c.ListenIPv6)
		p6, err := strconv.ParseUint(port6, 10, 16)
		if err != nil || p6 == 0 {
			return intercept.Config{}, fmt.Errorf("listen_ipv6 port %q is not a TCP port", port6)
		}
		rc.Port6 = uint16(p6)
	}
	if c.ExemptUID != nil {
		rc.ExemptUID = uint32(*c.ExemptUID)
	}
	return rc, rc.Validate()
}

// daemonUser is the system user of the packaged service (systemd/imdsproxy.sysusers).
const daemonUser = "imdsproxy"

// exemptUID is the uid left alone by the rules when intercept.exempt_uid is
// unset: for the daemon its own; for the command run as root, the uid of the
// user imdsproxy.
func exemptUID(forDaemon bool) (uint32, error) {
	if forDaemon || os.Geteuid() != 0 {
		return uint32(os.Geteuid()), nil
	}
	u, err := user.Lookup(daemonUser)
	if err != nil {
		return 0, fmt.Errorf("intercept.exempt_uid is unset and there is no user %q (%v): set intercept.exempt_uid to the daemon's uid", daemonUser, err)
	}
	uid, err := strconv.ParseUint(u.Uid, 10, 32)
	if err != nil {
		return 0, fmt.Errorf("user %s: uid %q: %w", daemonUser, u.Uid, err)
	}
	return uint32(uid), nil
}

func interceptRules(cfg Config, forDaemon bool) (*intercept.Rules, error) {
	uid := uint32(0)
	if cfg.Intercept.ExemptUID == nil {
		var err error
		if uid, err = exemptUID(forDaemon); err != nil {
			return nil, err
		}
	}
	rc, err := cfg.Intercept.rulesConfig(cfg.Listen, uid)
	if err != nil {
		return nil, err
	}
	return intercept.New(rc)
}

const interceptUsage = `Usage: imdsproxy intercept install|remove|status [--config FILE]

  install  make the nftables rules match the config: with intercept.enabled,
           write table inet imdsproxy (replacing it atomically; installing twice
           leaves one set of rules); with intercept.enabled false, remove it.
  remove   delete table inet imdsproxy (nothing else); no-op when absent.
  status   print present, absent or drifted (and what differs); exit 0 only
           when that is what the config asks for (present and correct with
           intercept.enabled, absent without).

Needs CAP_NET_ADMIN. Exit codes: 0 ok, 1 failure (or status not present),
2 usage error, 3 invalid configuration.
`

// runIntercept is `imdsproxy intercept install|remove|status`.
func runIntercept(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 || args[0] == "help" || args[0] == "-h" || args[0] == "--help" {
		fmt.Fprint(stderr, interceptUsage)
		if len(args) == 0 {
			return exitUsage
		}
		return exitOK
	}
	verb := args[0]
	fs := flag.NewFlagSet("intercept "+verb, flag.ContinueOnError)
	fs.SetOutput(stderr)
	path := fs.String("config", defaultConfigPath, "path of the YAML config file")
	fs.Usage = func() { fmt.Fprint(stderr, interceptUsage) }
	if err := fs.Parse(args[1:]); err != nil {
		return flagExit(err)
	}
	if fs.NArg() != 0 || (verb != "install" && verb != "remove" && verb != "status") {
		fs.Usage()
		return exitUsage
	}
	cfg, err := loadConfig(*path)
	if err != nil {
		fmt.Fprintf(stderr, "imdsproxy: %v\n", err)
		return exitConfig
	}
	rules, err := interceptRules(cfg, false)
	if err != nil {
		fmt.Fprintf(stderr, "imdsproxy: intercept: %v\n", err)
		return exitConfig
	}
	fail := func(err error) int {
		fmt.Fprintf(stderr, "imdsproxy: %v\n", err)
		if errors.Is(err, os.ErrPermission) {
			fmt.Fprintln(stderr, "imdsproxy: managing nftables needs CAP_NET_ADMIN (run as root)")
		}
		return exitError
	}
	switch verb {
	case "install":
		if !cfg.Intercept.Enabled {
			removed, err := rules.Remove()
			if err != nil {
				return fail(err)
			}
			fmt.Fprintf(stdout, "intercept.enabled is false: no rules installed (removed table inet %s: %v)\n", intercept.TableName, removed)
			return exitOK
		}
		if err := rules.Install(); err != nil {
			return fail(err)
		}
		fmt.Fprintf(stdout, "installed:\n%s", rules.Describe())
	case "remove":
		removed, err := rules.Remove()
		if err != nil {
			return fail(err)
		}
		if removed {
			fmt.Fprintf(stdout, "removed table inet %s\n", intercept.TableName)
		} else {
			fmt.Fprintf(stdout, "table inet %s was not present\n", intercept.TableName)
		}
	case "status":
		st, err := rules.Check()
		if err != nil {
			return fail(err)
		}
		if st.Detail != "" {
			fmt.Fprintf(stdout, "%s: %s\n", st.State, st.Detail)
		} else {
			fmt.Fprintln(stdout, st.State)
		}
		want := intercept.Present
		if !cfg.Intercept.Enabled {
			want = intercept.Absent // what the config asks for
		}
		if st.State != want {
			return exitError
		}
	}
	return exitOK
}
