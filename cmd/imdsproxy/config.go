package main

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/url"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/imdsproxy/imdsproxy/access"
	"github.com/imdsproxy/imdsproxy/admin"
	"github.com/imdsproxy/imdsproxy/cache"
	"github.com/imdsproxy/imdsproxy/config"
	"github.com/imdsproxy/imdsproxy/container"
	"github.com/imdsproxy/imdsproxy/credproc"
	"github.com/imdsproxy/imdsproxy/exchange"
	"github.com/imdsproxy/imdsproxy/intercept"
	"github.com/imdsproxy/imdsproxy/proxy"
	"github.com/imdsproxy/imdsproxy/rollout"
	"github.com/imdsproxy/imdsproxy/token"
)

// Config is the daemon's YAML configuration. The keys and their meaning are
// the contract of DESIGN.md; docs/configuration.md documents every key. Each
// section is declared and validated by the package that uses it; this file
// checks the top-level keys and what spans sections. Unknown keys are an
// error. Use loadConfig or parseConfig, which apply defaults and validate.
type Config struct {
	Listen          string                        `yaml:"listen"`
	AdminListen     string                        `yaml:"admin_listen"`
	Upstream        string                        `yaml:"upstream"`
	UpstreamTimeout config.Duration               `yaml:"upstream_timeout"`
	Region          string                        `yaml:"region"`
	IMDS            proxy.IMDSSection             `yaml:"imds"`
	Role            config.Role                   `yaml:"role"`
	Source          string                        `yaml:"source"`
	Identity        token.Section                 `yaml:"identity"`
	Federation      exchange.FederationSection    `yaml:"federation"`
	RolesAnywhere   exchange.RolesAnywhereSection `yaml:"roles_anywhere"`
	AssumeRole      exchange.AssumeRoleSection    `yaml:"assume_role"`
	Rollout         rollout.Section               `yaml:"rollout"`
	Cache           cache.Section                 `yaml:"cache"`
	Intercept       intercept.Section             `yaml:"intercept"`
	Access          access.Section                `yaml:"access"`
	Workloads       []access.Workload             `yaml:"workloads"`
	Container       container.Section             `yaml:"container"`
	CredProcess     credproc.Section              `yaml:"credential_process"`
}

func defaultConfig() Config {
	return Config{
		Listen:          "127.0.0.1:8169",
		AdminListen:     "127.0.0.1:8170",
		Upstream:        "http://169.254.169.254",
		UpstreamTimeout: config.Duration(2 * time.Second),
		IMDS:            proxy.DefaultIMDSSection(),
		Source:          exchange.SourceNameWebIdentity,
		Cache:           cache.DefaultSection(),
		Container:       container.DefaultSection(),
		CredProcess:     credproc.DefaultSection(),
	}
}

// loadConfig reads, parses and validates the file at path.
func loadConfig(path string) (Config, error) {
	data, err := config.ReadFile(path)
	if err != nil {
		return Config{}, err
	}
	cfg, err := parseConfig(data)
	if err != nil {
		return Config{}, fmt.Errorf("%s: %w", path, err)
	}
	return cfg, nil
}

// parseConfig parses YAML (unknown or duplicate keys and values of the wrong
// shape are refused, naming the key), applies defaults and validates.
func parseConfig(data []byte) (Config, error) {
	cfg := defaultConfig()
	if err := config.Decode(data, &cfg); err != nil {
		return Config{}, err
	}
	if err := cfg.validate(); err != nil {
		return Config{}, err
	}
	return cfg, nil
}

var regionRe = regexp.MustCompile(`^[a-z]{2}(-[a-z]+)+-[0-9]+$`)

// validate checks every value and fills derived defaults. Every error names
// the offending key.
func (c *Config) validate() error {
	for key, addr := range map[string]string{"listen": c.Listen, "admin_listen": c.AdminListen} {
		if _, port, err := net.SplitHostPort(addr); err != nil || port == "" {
			return fmt.Errorf("config: %s: %q is not a host:port address", key, addr)
		}
	}
	if c.Listen == c.AdminListen {
		return errors.New("config: admin_listen: must differ from listen")
	}
	u, err := url.Parse(c.Upstream)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || (u.Path != "" && u.Path != "/") || u.RawQuery != "" || u.User != nil {
		return fmt.Errorf("config: upstream: %q must be a base URL such as http://169.254.169.254", c.Upstream)
	}
	if c.UpstreamTimeout.D() < 100*time.Millisecond || c.UpstreamTimeout.D() > time.Minute {
		return fmt.Errorf("config: upstream_timeout: %s is outside 100ms..1m", c.UpstreamTimeout.D())
	}
	if c.Region != "" && !regionRe.MatchString(c.Region) {
		return fmt.Errorf("config: region: %q is not an AWS region name such as us-east-1", c.Region)
	}
	if err := c.IMDS.Validate(); err != nil {
		return err
	}
	if err := c.Intercept.Validate(c.Listen); err != nil {
		return err
	}
	if !slices.Contains(exchange.SourceNames, c.Source) {
		return fmt.Errorf("config: source: %q is not one of %s", c.Source, strings.Join(exchange.SourceNames, ", "))
	}
	// The instance profile's role is named by the real IMDS unless
	// role.name says it.
	if err := c.Role.Validate("role", c.Source == exchange.SourceNameInstanceProfile, time.Hour); err != nil {
		return err
	}
	if err := c.validateSource(); err != nil {
		return err
	}
	if err := c.Rollout.Validate(); err != nil {
		return err
	}
	if c.Rollout.Enabled() && c.Source == exchange.SourceNameInstanceProfile {
		return errors.New("config: rollout.policy: not used with source instance-profile (it already serves the instance profile)")
	}
	if err := c.Access.Validate(); err != nil {
		return err
	}
	if len(c.Workloads) > 0 && (c.Source == exchange.SourceNameFederation || c.Source == exchange.SourceNameInstanceProfile) {
		why := "the federation endpoint chooses the role, not imdsproxy"
		if c.Source == exchange.SourceNameInstanceProfile {
			why = "the instance profile has one role"
		}
		return fmt.Errorf("config: workloads: not supported with source %s (%s)", c.Source, why)
	}
	for i, w := range c.Workloads {
		if w.Subject != "" && (c.Source != exchange.SourceNameWebIdentity || c.Identity.JWTFile != "") {
			return fmt.Errorf("config: workloads[%d].subject: needs source web-identity with identity.jwt_url or identity.jwt_command (a jwt_file holds one subject)", i)
		}
	}
	if err := c.Cache.Validate(c.Role.Duration.D()); err != nil {
		return err
	}
	if err := access.ValidateWorkloads(c.Workloads, c.Role.Name, c.Cache.ExpiryMargin.D()); err != nil {
		return err
	}
	if err := c.Container.Validate(c.Workloads); err != nil {
		return err
	}
	return c.CredProcess.Validate()
}

// validateSource checks identity: and the section of the chosen source.
func (c *Config) validateSource() error {
	id := &c.Identity
	if err := id.Validate(); err != nil {
		return err
	}
	jwt := id.JWTKeys()
	switch c.Source {
	case exchange.SourceNameWebIdentity, exchange.SourceNameFederation:
		if len(jwt) == 0 {
			return fmt.Errorf("config: identity.jwt_file: required for source %s (or identity.jwt_command, identity.jwt_url)", c.Source)
		}
		if c.Source == exchange.SourceNameWebIdentity && id.X509 != nil {
			return errors.New("config: identity.x509: not used by source web-identity")
		}
		if c.Source == exchange.SourceNameFederation {
			return c.Federation.Validate()
		}
	case exchange.SourceNameRolesAnywhere:
		if id.X509 == nil {
			return errors.New("config: identity.x509: required for source roles-anywhere")
		}
		if len(jwt) > 0 {
			return fmt.Errorf("config: identity.%s: not used by source roles-anywhere", jwt[0])
		}
		return c.RolesAnywhere.Validate()
	case exchange.SourceNameAssumeRole, exchange.SourceNameInstanceProfile:
		if len(jwt) > 0 {
			return fmt.Errorf("config: identity.%s: not used by source %s", jwt[0], c.Source)
		}
		if id.X509 != nil {
			return fmt.Errorf("config: identity.x509: not used by source %s", c.Source)
		}
		if c.Source == exchange.SourceNameAssumeRole {
			return c.AssumeRole.Validate()
		}
	}
	return nil
}

// preflight runs the checks serve runs at start that need no network: the
// AWS region where a source or the rollout calls AWS (the SDK's resolution:
// region:, AWS_REGION, the shared config), the rollout's policy keys. It
// returns what is worth a warning: listeners reachable from the network, a
// token file others may read.
func (c Config) preflight(ctx context.Context) (warnings []string, err error) {
	if c.Source == exchange.SourceNameWebIdentity || c.Source == exchange.SourceNameAssumeRole || c.Rollout.Enabled() {
		if err := exchange.CheckRegion(ctx, c.Region); err != nil {
			return nil, err
		}
	}
	if _, err := c.Rollout.Keys(); err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	for _, addr := range c.imdsListenAddrs() {
		if proxy.Exposed(addr) {
			warnings = append(warnings, addr+": "+proxy.ExposedWarning)
		}
	}
	if admin.Exposed(c.AdminListen) {
		warnings = append(warnings, "admin_listen "+c.AdminListen+": "+admin.ExposedWarning)
	}
	if c.iamAttestedSubjectsWithRollout() {
		warnings = append(warnings, iamAttestationWarning)
	}
	if f := c.Identity.JWTFile; f != "" {
		switch w, err := token.CheckFileMode(f); {
		case errors.Is(err, fs.ErrNotExist):
			warnings = append(warnings, "identity.jwt_file "+f+" does not exist yet: the daemon waits for it (not ready until it is written)")
		case err != nil:
			warnings = append(warnings, "identity.jwt_file: "+err.Error())
		case w != "":
			warnings = append(warnings, "identity.jwt_file: "+w)
		}
	}
	return warnings, nil
}

// iamAttestationWarning: what aws_iam attestation rests on, the instance
// profile's credentials, is what a rollout hands to clients in some stages.
const iamAttestationWarning = "identity.attestation aws_iam with workloads[].subject and a rollout: whenever this host hands the instance profile's credentials to clients " +
	"(rollout off or shadow, a bucket not selected, rollout.fallback: instance-profile), a local process that gets them can sign the sts:GetCallerIdentity request aws_iam rests on " +
	"and ask the issuer for any workload token this host may have; during the rollout use attestation aws_iid (the identity document is refused to clients), " +
	"or let the issuer's policy allow this host only its own subject (docs/security.md, \"Workload tokens and the instance profile\")"

// iamAttestedSubjectsWithRollout reports whether workloads get tokens of
// their own from an issuer that accepts the instance profile's signature
// while a rollout may serve the instance profile's credentials to clients.
func (c Config) iamAttestedSubjectsWithRollout() bool {
	if c.Identity.JWTURL == "" || c.Identity.Attestation != token.URLMethodIAM || !c.Rollout.Enabled() {
		return false
	}
	for _, w := range c.Workloads {
		if w.Subject != "" {
			return true
		}
	}
	return false
}

// imdsListenAddrs are the IMDS listener addresses cfg opens itself (without
// socket activation).
func (c Config) imdsListenAddrs() []string {
	return append([]string{c.Listen}, c.Intercept.ListenAddrs()...)
}

// restartOnly names the settings of next that differ from c and take effect
// only at a restart: the listeners (they are open sockets, perhaps passed by
// systemd: the container endpoint's and its addresses, the
// credential_process socket), the interception (it decides which listeners
// exist), the upstream (the instance id and tags the daemon was started
// with come from it), the token keys (tokens already issued are signed
// with the old one; the container tokens' directory holds the files given
// out).
func (c Config) restartOnly(next Config) []string {
	var keys []string
	if c.Listen != next.Listen {
		keys = append(keys, "listen")
	}
	if c.AdminListen != next.AdminListen {
		keys = append(keys, "admin_listen")
	}
	if c.Upstream != next.Upstream {
		keys = append(keys, "upstream")
	}
	if !reflect.DeepEqual(c.Intercept, next.Intercept) {
		keys = append(keys, "intercept")
	}
	if c.IMDS.TokenKeyFile != next.IMDS.TokenKeyFile {
		keys = append(keys, "imds.token_key_file")
	}
	cc, nc := c.Container, next.Container
	for _, k := range []struct {
		key     string
		changed bool
	}{
		{"container.enabled", cc.Enabled != nc.Enabled},
		{"container.listen", !slices.Equal(cc.Listen, nc.Listen)},
		{"container.link", cc.Link != nc.Link},
		{"container.token_dir", cc.TokenDir != nc.TokenDir},
		{"credential_process", c.CredProcess != next.CredProcess},
	} {
		if k.changed {
			keys = append(keys, k.key)
		}
	}
	return keys
}
