package token

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/imdsproxy/imdsproxy/config"
)

// Section is the `identity:` section of the daemon's config: how the host
// proves who it is. At most one JWT source (jwt_file, jwt_command,
// jwt_url); x509 for Roles Anywhere (and as the client certificate of a
// federation endpoint).
type Section struct {
	JWTFile    string   `yaml:"jwt_file"`
	JWTCommand []string `yaml:"jwt_command"`
	JWTURL     string   `yaml:"jwt_url"`
	// Attestation is how jwt_url proves the host: aws_iid (the signed
	// instance identity document, the default) or aws_iam (an
	// sts:GetCallerIdentity request signed with the instance profile's
	// credentials, bound to Issuer).
	Attestation string `yaml:"attestation"`
	// Issuer is the issuer's identifier (its `issuer`, the iss of its
	// tokens) that an aws_iam request is bound to.
	Issuer   string          `yaml:"issuer"`
	CAFile   string          `yaml:"ca_file"`       // extra CA bundle for jwt_url
	Timeout  config.Duration `yaml:"timeout"`       // bound on jwt_command / jwt_url
	X509     *X509Section    `yaml:"x509"`          // cert, key, chain
	Insecure bool            `yaml:"insecure_http"` // allow http:// jwt_url to loopback
}

// X509Section names the PEM files of an X.509 identity.
type X509Section struct {
	Cert  string `yaml:"cert"`
	Key   string `yaml:"key"`
	Chain string `yaml:"chain"`
}

// DefaultTimeout bounds identity.jwt_command and identity.jwt_url when
// identity.timeout is unset.
const DefaultTimeout = 10 * time.Second

// JWTKeys names the JWT sources set (jwt_file, jwt_command, jwt_url).
func (s Section) JWTKeys() []string {
	var keys []string
	if s.JWTFile != "" {
		keys = append(keys, "jwt_file")
	}
	if len(s.JWTCommand) > 0 {
		keys = append(keys, "jwt_command")
	}
	if s.JWTURL != "" {
		keys = append(keys, "jwt_url")
	}
	return keys
}

// Validate checks the section on its own and fills its defaults; which
// sources a daemon's `source:` needs is its caller's check. Every error
// names the key.
func (s *Section) Validate() error {
	if err := config.AbsPath("identity.jwt_file", s.JWTFile); err != nil {
		return err
	}
	if len(s.JWTCommand) > 0 {
		if !strings.HasPrefix(s.JWTCommand[0], "/") {
			return fmt.Errorf("config: identity.jwt_command: the program %q must be an absolute path", s.JWTCommand[0])
		}
		for i, a := range s.JWTCommand {
			if a == "" || strings.ContainsAny(a, "\x00\n\r") {
				return fmt.Errorf("config: identity.jwt_command[%d]: empty or holds a control character", i)
			}
		}
	}
	if s.JWTURL != "" {
		if err := config.CheckURL(s.JWTURL, s.Insecure); err != nil {
			return fmt.Errorf("config: identity.jwt_url: %w", err)
		}
	} else if s.Insecure {
		return errors.New("config: identity.insecure_http: only used with an http:// identity.jwt_url")
	}
	if err := s.validateAttestation(); err != nil {
		return err
	}
	if keys := s.JWTKeys(); len(keys) > 1 {
		return fmt.Errorf("config: identity: set only one of jwt_file, jwt_command, jwt_url (got %s)", strings.Join(keys, ", "))
	}
	if s.CAFile != "" {
		if s.JWTURL == "" {
			return errors.New("config: identity.ca_file: only used with identity.jwt_url")
		}
		if err := config.AbsPath("identity.ca_file", s.CAFile); err != nil {
			return err
		}
	}
	if s.Timeout == 0 {
		s.Timeout = config.Duration(DefaultTimeout)
	}
	if d := s.Timeout.D(); d < time.Second || d > 5*time.Minute {
		return fmt.Errorf("config: identity.timeout: %s is outside 1s..5m", d)
	}
	if x := s.X509; x != nil {
		if x.Cert == "" || x.Key == "" {
			return errors.New("config: identity.x509: cert and key are required")
		}
		for _, f := range []struct{ key, path string }{{"cert", x.Cert}, {"key", x.Key}, {"chain", x.Chain}} {
			if err := config.AbsPath("identity.x509."+f.key, f.path); err != nil {
				return err
			}
		}
	}
	return nil
}

// validateAttestation checks attestation and issuer.
func (s *Section) validateAttestation() error {
	switch {
	case s.Attestation != "" && s.JWTURL == "":
		return errors.New("config: identity.attestation: only used with identity.jwt_url")
	case s.Attestation == "" || s.Attestation == URLMethodIID:
		if s.Issuer != "" {
			return errors.New("config: identity.issuer: only used with identity.attestation: aws_iam")
		}
		return nil
	case s.Attestation != URLMethodIAM:
		return fmt.Errorf("config: identity.attestation: %q is not one of %s, %s", s.Attestation, URLMethodIID, URLMethodIAM)
	}
	u, err := url.Parse(s.Issuer)
	if s.Issuer == "" || err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" || u.User != nil {
		return errors.New("config: identity.issuer: aws_iam needs the issuer's identifier, the https:// URL of its `issuer` setting")
	}
	return nil
}

// JWTSource returns the current identity token; File, Command and URL
// implement it. It is an alias of an interface literal, so that the
// exchange's TokenSource (the same literal) is the identical type and
// ForSubject satisfies the exchange's interface without an import.
type JWTSource = interface {
	Token(ctx context.Context) (string, error)
}

// NewJWT builds the section's JWT source; imdsBase is the IMDS jwt_url reads
// the instance identity from (the daemon's upstream).
func (s Section) NewJWT(imdsBase string, log *zap.Logger, reg prometheus.Registerer) (JWTSource, error) {
	switch {
	case s.JWTFile != "":
		return NewFile(s.JWTFile, FileOptions{}, log, reg)
	case len(s.JWTCommand) > 0:
		return NewCommand(s.JWTCommand, CommandOptions{Timeout: s.Timeout.D()}, log, reg)
	case s.JWTURL != "":
		return NewURL(s.JWTURL, URLOptions{IMDSBase: imdsBase, CAFile: s.CAFile, Timeout: s.Timeout.D(),
			Method: s.Attestation, IAM: URLIAMOptions{Issuer: s.Issuer}}, log, reg)
	}
	return nil, errors.New("token: identity: no JWT source configured")
}

// NewX509 loads the section's X.509 identity.
func (s Section) NewX509(log *zap.Logger, reg prometheus.Registerer) (*X509, error) {
	if s.X509 == nil {
		return nil, errors.New("token: identity.x509 is not configured")
	}
	return NewX509(s.X509.Cert, s.X509.Key, s.X509.Chain, X509Options{}, log, reg)
}
