package main

import (
	"cmp"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/url"
	"regexp"
	"strings"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/imdsproxy/imdsproxy/cache"
	"github.com/imdsproxy/imdsproxy/exchange"
	"github.com/imdsproxy/imdsproxy/token"
)

// defaultIdentityTimeout bounds identity.jwt_command and identity.jwt_url.
const defaultIdentityTimeout = 10 * time.Second

var (
	trustAnchorARNRe = regexp.MustCompile(`^arn:aws[a-z-]*:rolesanywhere:([a-z]{2}(?:-[a-z]+)+-[0-9]+):[0-9]{12}:trust-anchor/[0-9a-fA-F-]{36}$`)
	profileARNRe     = regexp.MustCompile(`^arn:aws[a-z-]*:rolesanywhere:([a-z]{2}(?:-[a-z]+)+-[0-9]+):[0-9]{12}:profile/[0-9a-fA-F-]{36}$`)
	externalIDRe     = regexp.MustCompile(`^[\w+=,.@:/-]+$`)
)

// validateIdentity checks identity: and the section of the chosen source.
// Every error names the key.
func (c *Config) validateIdentity() error {
	id := &c.Identity
	var jwt []string
	if id.JWTFile != "" {
		jwt = append(jwt, "jwt_file")
		if !strings.HasPrefix(id.JWTFile, "/") {
			return fmt.Errorf("config: identity.jwt_file: %q must be an absolute path", id.JWTFile)
		}
	}
	if len(id.JWTCommand) > 0 {
		jwt = append(jwt, "jwt_command")
		if !strings.HasPrefix(id.JWTCommand[0], "/") {
			return fmt.Errorf("config: identity.jwt_command: the program %q must be an absolute path", id.JWTCommand[0])
		}
		for i, a := range id.JWTCommand {
			if a == "" || strings.ContainsAny(a, "\x00\n\r") {
				return fmt.Errorf("config: identity.jwt_command[%d]: empty or holds a control character", i)
			}
		}
	}
	if id.JWTURL != "" {
		jwt = append(jwt, "jwt_url")
		if err := checkHTTPSURL(id.JWTURL); err != nil {
			return fmt.Errorf("config: identity.jwt_url: %w", err)
		}
	}
	if len(jwt) > 1 {
		return fmt.Errorf("config: identity: set only one of jwt_file, jwt_command, jwt_url (got %s)", strings.Join(jwt, ", "))
	}
	if id.CAFile != "" {
		if id.JWTURL == "" {
			return errors.New("config: identity.ca_file: only used with identity.jwt_url")
		}
		if !strings.HasPrefix(id.CAFile, "/") {
			return fmt.Errorf("config: identity.ca_file: %q must be an absolute path", id.CAFile)
		}
	}
	if id.Timeout == 0 {
		id.Timeout = Duration(defaultIdentityTimeout)
	}
	if d := id.Timeout.D(); d < time.Second || d > 5*time.Minute {
		return fmt.Errorf("config: identity.timeout: %s is outside 1s..5m", d)
	}
	if x := id.X509; x != nil {
		for key, p := range map[string]string{"cert": x.Cert, "key": x.Key} {
			if !strings.HasPrefix(p, "/") {
				return fmt.Errorf("config: identity.x509.%s: %q must be an absolute path", key, p)
			}
		}
		if x.Chain != "" && !strings.HasPrefix(x.Chain, "/") {
			return fmt.Errorf("config: identity.x509.chain: %q must be an absolute path", x.Chain)
		}
	}

	switch c.Source {
	case "web-identity":
		if len(jwt) == 0 {
			return errors.New("config: identity.jwt_file: required for source web-identity (or identity.jwt_command, identity.jwt_url)")
		}
		if id.X509 != nil {
			return errors.New("config: identity.x509: not used by source web-identity")
		}
	case "federation":
		if len(jwt) == 0 {
			return errors.New("config: identity.jwt_file: required for source federation (or identity.jwt_command, identity.jwt_url)")
		}
		if c.Federation.URL == "" {
			return errors.New("config: federation.url: required for source federation")
		}
		if err := checkHTTPSURL(c.Federation.URL); err != nil {
			return fmt.Errorf("config: federation.url: %w", err)
		}
		if c.Federation.CAFile != "" && !strings.HasPrefix(c.Federation.CAFile, "/") {
			return fmt.Errorf("config: federation.ca_file: %q must be an absolute path", c.Federation.CAFile)
		}
	case "roles-anywhere":
		if id.X509 == nil {
			return errors.New("config: identity.x509: required for source roles-anywhere")
		}
		if len(jwt) > 0 {
			return fmt.Errorf("config: identity.%s: not used by source roles-anywhere", jwt[0])
		}
		ta := trustAnchorARNRe.FindStringSubmatch(c.RolesAnywhere.TrustAnchorARN)
		if ta == nil {
			return fmt.Errorf("config: roles_anywhere.trust_anchor_arn: %q is not a trust anchor ARN such as arn:aws:rolesanywhere:us-east-1:222222222222:trust-anchor/<uuid>", c.RolesAnywhere.TrustAnchorARN)
		}
		pr := profileARNRe.FindStringSubmatch(c.RolesAnywhere.ProfileARN)
		if pr == nil {
			return fmt.Errorf("config: roles_anywhere.profile_arn: %q is not a profile ARN such as arn:aws:rolesanywhere:us-east-1:222222222222:profile/<uuid>", c.RolesAnywhere.ProfileARN)
		}
		if ta[1] != pr[1] {
			return fmt.Errorf("config: roles_anywhere.profile_arn: region %s differs from the trust anchor's %s", pr[1], ta[1])
		}
	case "assume-role", "instance-profile":
		if len(jwt) > 0 {
			return fmt.Errorf("config: identity.%s: not used by source %s", jwt[0], c.Source)
		}
		if id.X509 != nil {
			return fmt.Errorf("config: identity.x509: not used by source %s", c.Source)
		}
	}
	if c.Source == "assume-role" {
		return c.AssumeRole.validate()
	}
	return nil
}

func (a *AssumeRoleCfg) validate() error {
	if a.Base == "" {
		a.Base = "instance-profile"
	}
	if a.Base != "instance-profile" && a.Base != "sdk-chain" {
		return fmt.Errorf("config: assume_role.base: must be \"instance-profile\" or \"sdk-chain\", got %q", a.Base)
	}
	if a.ExternalID != "" && (len(a.ExternalID) < 2 || len(a.ExternalID) > 1224 || !externalIDRe.MatchString(a.ExternalID)) {
		return fmt.Errorf("config: assume_role.external_id: may hold only letters, digits and _+=,.@:/- (2 to 1224)")
	}
	if a.SourceIdentity != "" && !sessionNameRe.MatchString(a.SourceIdentity) {
		return fmt.Errorf("config: assume_role.source_identity: %q may hold only letters, digits and _+=,.@- (2 to 64)", a.SourceIdentity)
	}
	if len(a.Tags) > 50 {
		return fmt.Errorf("config: assume_role.tags: %d tags, STS allows at most 50", len(a.Tags))
	}
	for k, v := range a.Tags {
		if k == "" || len(k) > 128 || len(v) > 256 || strings.HasPrefix(strings.ToLower(k), "aws:") {
			return fmt.Errorf("config: assume_role.tags.%s: keys are 1..128 characters (not aws:…), values at most 256", k)
		}
	}
	return nil
}

// checkHTTPSURL accepts https URLs, and http only to a loopback host.
func checkHTTPSURL(raw string) error {
	u, err := url.Parse(raw)
	if err != nil || u.Host == "" || u.User != nil {
		return fmt.Errorf("%q is not an absolute URL", raw)
	}
	switch u.Scheme {
	case "https":
		return nil
	case "http":
		if ip := net.ParseIP(u.Hostname()); ip != nil && ip.IsLoopback() || u.Hostname() == "localhost" {
			return nil
		}
		return fmt.Errorf("%q: use https (plain http is allowed only to loopback)", raw)
	}
	return fmt.Errorf("%q: the scheme must be https", raw)
}

// buildFetcher builds the identity source and the exchange of cfg's source.
// With workloads it builds one exchange per role (the host's and each
// workload's), all on the same identity source, behind a roleFetcher that
// dispatches by cache key (the role name). Their metrics go to a registry of
// their own, returned to be swapped in together with them on reload.
func (d *daemon) buildFetcher(ctx context.Context, cfg Config, sessionName string) (cache.Fetcher, *prometheus.Registry, error) {
	gen := prometheus.NewRegistry()
	log := d.log.Named("exchange")
	// perRole builds the exchange of one role; nil for sources whose role
	// is not a parameter of the exchange (workloads are refused there).
	var perRole func(r RoleConfig) (cache.Fetcher, error)
	switch cfg.Source {
	case "web-identity":
		tok, err := d.jwtSource(cfg, gen)
		if err != nil {
			return nil, nil, err
		}
		perRole = func(r RoleConfig) (cache.Fetcher, error) {
			return fetcherOf(exchange.NewWebIdentity(ctx, exchange.WebIdentityConfig{
				RoleARN:     r.ARN,
				SessionName: cmp.Or(r.SessionName, sessionName),
				Duration:    r.Duration.D(),
				Region:      cfg.Region,
			}, tok, log))
		}
	case "federation":
		tok, err := d.jwtSource(cfg, gen)
		if err != nil {
			return nil, nil, err
		}
		fc := exchange.FederationConfig{URL: cfg.Federation.URL, CAFile: cfg.Federation.CAFile}
		if cfg.Identity.X509 != nil {
			x, err := d.x509Source(cfg, gen)
			if err != nil {
				return nil, nil, err
			}
			fc.ClientCertificate = clientCertificate(x)
		}
		f, err := exchange.NewFederation(fc, tok, log)
		return oneRole(cfg, f, gen, err)
	case "roles-anywhere":
		x, err := d.x509Source(cfg, gen)
		if err != nil {
			return nil, nil, err
		}
		perRole = func(r RoleConfig) (cache.Fetcher, error) {
			return fetcherOf(exchange.NewRolesAnywhere(ctx, exchange.RolesAnywhereConfig{
				TrustAnchorARN: cfg.RolesAnywhere.TrustAnchorARN,
				ProfileARN:     cfg.RolesAnywhere.ProfileARN,
				RoleARN:        r.ARN,
				SessionName:    cmp.Or(r.SessionName, cfg.Role.SessionName), // sent only when set: the profile must accept it
				Duration:       r.Duration.D(),
			}, x, log))
		}
	case "assume-role":
		var base aws.CredentialsProvider
		if cfg.AssumeRole.Base == "instance-profile" {
			ip, err := exchange.NewInstanceProfile(exchange.InstanceProfileConfig{IMDSBase: cfg.Upstream}, log)
			if err != nil {
				return nil, nil, err
			}
			base = ip.Provider()
		}
		perRole = func(r RoleConfig) (cache.Fetcher, error) {
			return fetcherOf(exchange.NewAssumeRole(ctx, exchange.AssumeRoleConfig{
				RoleARN:        r.ARN,
				SessionName:    cmp.Or(r.SessionName, sessionName),
				Duration:       r.Duration.D(),
				ExternalID:     cfg.AssumeRole.ExternalID,
				SourceIdentity: cfg.AssumeRole.SourceIdentity,
				Tags:           cfg.AssumeRole.Tags,
				Region:         cfg.Region,
				Base:           base,
			}, log))
		}
	case "instance-profile":
		f, err := exchange.NewInstanceProfile(exchange.InstanceProfileConfig{IMDSBase: cfg.Upstream}, log)
		return oneRole(cfg, f, gen, err)
	default:
		return nil, nil, fmt.Errorf("source %q is not supported", cfg.Source)
	}
	host, err := perRole(cfg.Role)
	if err != nil {
		return nil, nil, err
	}
	if len(cfg.Workloads) == 0 {
		// Keyed even for one role: the exchange ignores the key, and a
		// request for a name this config does not serve (racing a reload
		// that adds a workload) must fail, not get the host's credentials.
		return roleFetcher{cfg.Role.Name: host}, gen, nil
	}
	rf := roleFetcher{cfg.Role.Name: host}
	for i, w := range cfg.Workloads {
		f, err := perRole(w.Role)
		if err != nil {
			return nil, nil, fmt.Errorf("workloads[%d]: %w", i, err)
		}
		rf[w.Role.Name] = f
	}
	return rf, gen, nil
}

// fetcherOf converts a constructor's result, keeping a failed one nil (not
// a nil pointer in a non-nil interface).
func fetcherOf[F cache.Fetcher](f F, err error) (cache.Fetcher, error) {
	if err != nil {
		return nil, err
	}
	return f, nil
}

// oneRole is the result of buildFetcher for a source that serves one role
// only; config validation refuses workloads with it.
func oneRole[F cache.Fetcher](cfg Config, f F, gen *prometheus.Registry, err error) (cache.Fetcher, *prometheus.Registry, error) {
	if err != nil {
		return nil, nil, err
	}
	if len(cfg.Workloads) > 0 {
		return nil, nil, fmt.Errorf("workloads: not supported with source %s", cfg.Source)
	}
	return f, gen, nil
}

// jwtSource builds the identity token source of cfg.identity.
func (d *daemon) jwtSource(cfg Config, reg prometheus.Registerer) (exchange.TokenSource, error) {
	id := cfg.Identity
	log := d.log.Named("token")
	switch {
	case id.JWTFile != "":
		return token.NewFile(id.JWTFile, token.FileOptions{}, log, reg)
	case len(id.JWTCommand) > 0:
		return token.NewCommand(id.JWTCommand, token.CommandOptions{Timeout: id.Timeout.D()}, log, reg)
	case id.JWTURL != "":
		return token.NewURL(id.JWTURL, token.URLOptions{IMDSBase: cfg.Upstream, CAFile: id.CAFile, Timeout: id.Timeout.D()}, log, reg)
	}
	return nil, errors.New("identity: no JWT source configured")
}

// x509Source loads the X.509 identity of cfg.identity.x509.
func (d *daemon) x509Source(cfg Config, reg prometheus.Registerer) (*token.X509, error) {
	x := cfg.Identity.X509
	return token.NewX509(x.Cert, x.Key, x.Chain, token.X509Options{}, d.log.Named("token"), reg)
}

// clientCertificate presents the X.509 identity as a TLS client certificate,
// re-read (and so rotated) on every handshake.
func clientCertificate(x *token.X509) func(context.Context) (*tls.Certificate, error) {
	return func(ctx context.Context) (*tls.Certificate, error) {
		leaf, chain, signer, err := x.X509(ctx)
		if err != nil {
			return nil, err
		}
		c := &tls.Certificate{Certificate: [][]byte{leaf.Raw}, PrivateKey: signer, Leaf: leaf}
		for _, ic := range chain {
			c.Certificate = append(c.Certificate, ic.Raw)
		}
		return c, nil
	}
}

// resolveRoleName fills cfg.Role.Name for source instance-profile from the
// role the real IMDS lists, retrying for a bounded time (the IMDS may still
// be coming up at boot).
func resolveRoleName(ctx context.Context, cfg *Config, log *zap.Logger) error {
	if cfg.Role.Name != "" {
		return nil
	}
	ip, err := exchange.NewInstanceProfile(exchange.InstanceProfileConfig{IMDSBase: cfg.Upstream}, log)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	for {
		name, err := ip.RoleName(ctx)
		if err == nil {
			cfg.Role.Name = name
			log.Info("serving the instance profile's role", zap.String("role_name", name))
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("role.name: not set, and the instance profile's role could not be read from %s: %w", cfg.Upstream, err)
		case <-time.After(time.Second):
		}
	}
}
