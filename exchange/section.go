package exchange

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"regexp"
	"strings"

	"github.com/aws/aws-sdk-go-v2/aws"
	"go.uber.org/zap"

	"github.com/imdsproxy/imdsproxy/config"
	"github.com/imdsproxy/imdsproxy/creds"
)

// The sources of the daemon's `source:` key.
const (
	SourceNameWebIdentity     = "web-identity"
	SourceNameFederation      = "federation"
	SourceNameRolesAnywhere   = "roles-anywhere"
	SourceNameAssumeRole      = "assume-role"
	SourceNameInstanceProfile = "instance-profile"
)

// SourceNames lists every source, in documentation order.
var SourceNames = []string{SourceNameWebIdentity, SourceNameFederation, SourceNameRolesAnywhere, SourceNameAssumeRole, SourceNameInstanceProfile}

// FederationSection is the `federation:` section.
type FederationSection struct {
	URL          string `yaml:"url"`
	CAFile       string `yaml:"ca_file"`
	InsecureHTTP bool   `yaml:"insecure_http"` // allow http:// to a loopback address
}

// Validate checks the section (required: used by source federation).
func (s FederationSection) Validate() error {
	if s.URL == "" {
		return errors.New("config: federation.url: required for source federation")
	}
	if err := config.CheckURL(s.URL, s.InsecureHTTP); err != nil {
		return fmt.Errorf("config: federation.url: %w", err)
	}
	return config.AbsPath("federation.ca_file", s.CAFile)
}

// RolesAnywhereSection is the `roles_anywhere:` section.
type RolesAnywhereSection struct {
	TrustAnchorARN string `yaml:"trust_anchor_arn"`
	ProfileARN     string `yaml:"profile_arn"`
}

var (
	trustAnchorARNRe = regexp.MustCompile(`^arn:aws[a-z-]*:rolesanywhere:([a-z]{2}(?:-[a-z]+)+-[0-9]+):[0-9]{12}:trust-anchor/[0-9a-fA-F-]{36}$`)
	profileARNRe     = regexp.MustCompile(`^arn:aws[a-z-]*:rolesanywhere:([a-z]{2}(?:-[a-z]+)+-[0-9]+):[0-9]{12}:profile/[0-9a-fA-F-]{36}$`)
)

// Validate checks the section (used by source roles-anywhere).
func (s RolesAnywhereSection) Validate() error {
	ta := trustAnchorARNRe.FindStringSubmatch(s.TrustAnchorARN)
	if ta == nil {
		return fmt.Errorf("config: roles_anywhere.trust_anchor_arn: %q is not a trust anchor ARN such as arn:aws:rolesanywhere:us-east-1:222222222222:trust-anchor/<uuid>", s.TrustAnchorARN)
	}
	pr := profileARNRe.FindStringSubmatch(s.ProfileARN)
	if pr == nil {
		return fmt.Errorf("config: roles_anywhere.profile_arn: %q is not a profile ARN such as arn:aws:rolesanywhere:us-east-1:222222222222:profile/<uuid>", s.ProfileARN)
	}
	if ta[1] != pr[1] {
		return fmt.Errorf("config: roles_anywhere.profile_arn: region %s differs from the trust anchor's %s", pr[1], ta[1])
	}
	return nil
}

// AssumeRoleSection is the `assume_role:` section.
type AssumeRoleSection struct {
	Base           string            `yaml:"base"` // instance-profile | sdk-chain
	ExternalID     string            `yaml:"external_id"`
	SourceIdentity string            `yaml:"source_identity"`
	Tags           map[string]string `yaml:"tags"`
}

// Validate checks the section and fills its default (base instance-profile).
func (s *AssumeRoleSection) Validate() error {
	if s.Base == "" {
		s.Base = "instance-profile"
	}
	if s.Base != "instance-profile" && s.Base != "sdk-chain" {
		return fmt.Errorf("config: assume_role.base: must be \"instance-profile\" or \"sdk-chain\", got %q", s.Base)
	}
	if err := validateExternalID(s.ExternalID); err != nil {
		return fmt.Errorf("config: assume_role.external_id: may hold only letters, digits and _+=,.@:/- (2 to 1224)")
	}
	if err := validateSourceIdentity(s.SourceIdentity); err != nil {
		return fmt.Errorf("config: assume_role.source_identity: %q may hold only letters, digits and _+=,.@- (2 to 64)", s.SourceIdentity)
	}
	if _, err := sessionTags(s.Tags); err != nil {
		return fmt.Errorf("config: assume_role.tags: %s", strings.TrimPrefix(err.Error(), "exchange: "))
	}
	return nil
}

// SourceSpec is everything the exchange of a `source:` is built from.
type SourceSpec struct {
	// Source is one of SourceNames.
	Source        string
	Region        string
	Federation    FederationSection
	RolesAnywhere RolesAnywhereSection
	AssumeRole    AssumeRoleSection
}

// NewSource builds the workload-kind exchange of spec: it fetches the
// credentials of any role it is handed, with the identity of tokens (web
// identity, federation) or x509 (Roles Anywhere, and the federation's client
// certificate when set), or signed with the instance profile's credentials
// ip (assume-role with base instance-profile). Source instance-profile has
// no workload exchange: it returns nil, nil. ctx bounds the loading of the
// SDK configuration only.
func NewSource(ctx context.Context, spec SourceSpec, tokens TokenSource, x X509Source, ip *InstanceProfile, log *zap.Logger) (creds.Fetcher, error) {
	switch spec.Source {
	case SourceNameWebIdentity:
		return fetcher(NewWebIdentity(ctx, WebIdentityConfig{Region: spec.Region}, tokens, log))
	case SourceNameFederation:
		fc := FederationConfig{URL: spec.Federation.URL, CAFile: spec.Federation.CAFile}
		if x != nil {
			fc.ClientCertificate = ClientCertificate(x)
		}
		return fetcher(NewFederation(fc, tokens, log))
	case SourceNameRolesAnywhere:
		return fetcher(NewRolesAnywhere(ctx, RolesAnywhereConfig{
			TrustAnchorARN: spec.RolesAnywhere.TrustAnchorARN, ProfileARN: spec.RolesAnywhere.ProfileARN,
		}, x, log))
	case SourceNameAssumeRole:
		var base aws.CredentialsProvider
		if spec.AssumeRole.Base != "sdk-chain" {
			if ip == nil {
				return nil, errors.New("exchange: assume-role with base instance-profile needs the instance profile")
			}
			base = ip.Provider()
		}
		a := spec.AssumeRole
		return fetcher(NewAssumeRole(ctx, AssumeRoleConfig{
			ExternalID: a.ExternalID, SourceIdentity: a.SourceIdentity, Tags: a.Tags, Region: spec.Region, Base: base,
		}, log))
	case SourceNameInstanceProfile:
		return nil, nil
	}
	return nil, fmt.Errorf("exchange: source %q is not supported", spec.Source)
}

// fetcher converts a constructor's result, keeping a failed one nil (not a
// nil pointer in a non-nil interface).
func fetcher[F creds.Fetcher](f F, err error) (creds.Fetcher, error) {
	if err != nil {
		return nil, err
	}
	return f, nil
}

// ClientCertificate presents an X.509 identity as a TLS client certificate,
// re-read (and so rotated) on every handshake.
func ClientCertificate(x X509Source) func(context.Context) (*tls.Certificate, error) {
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
