package exchange

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"regexp"
	"strings"
	"time"

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

// Sources are the exchanges of one configuration: the workload-kind
// exchange of its source, the instance profile, and what a rollout needs.
type Sources struct {
	// Workload fetches the workload-kind roles; nil for source
	// instance-profile.
	Workload creds.Fetcher
	// Profile reads the instance profile's credentials; nil when nothing
	// needs them. ProfileRole is its role name.
	Profile     *InstanceProfile
	ProfileRole string
	// S3 reads an s3:// rollout policy; nil otherwise.
	S3 *S3Objects
	// Verifier verifies workload credentials in the rollout's shadow
	// stage; nil without a rollout.
	Verifier *CallerIdentity
}

// ForgetDurationCaps makes the workload exchange ask for each role's
// configured duration again after STS refused it as longer than the role
// allows (it then asks for 1 h). The daemon calls it on every reload that
// keeps these Sources, so that raising the role's MaxSessionDuration and
// reloading is enough.
func (s *Sources) ForgetDurationCaps() {
	if c, ok := s.Workload.(interface{ forgetDurationCaps() }); ok {
		c.forgetDurationCaps()
	}
}

// SourcesSpec is what Sources are built from.
type SourcesSpec struct {
	SourceSpec
	// Upstream is the real IMDS.
	Upstream string
	// ProfileRole names the instance profile's role (role.name of source
	// instance-profile); "" discovers it from the real IMDS.
	ProfileRole string
	// NeedProfile, S3 and Verify say what to build besides the workload
	// exchange: the instance profile (a rollout, source instance-profile,
	// assume-role on the instance profile's credentials), the S3 reader of
	// the policy, the shadow verifier.
	NeedProfile, S3, Verify bool
}

// profileDiscovery bounds reading the instance profile's role at start: the
// real IMDS may still be coming up at boot.
const profileDiscovery = 15 * time.Second

// NewSources builds the exchanges of spec with the identity sources given
// (nil when the source uses none).
func NewSources(ctx context.Context, spec SourcesSpec, tokens TokenSource, x X509Source, log *zap.Logger) (*Sources, error) {
	s := &Sources{}
	if spec.NeedProfile || spec.S3 {
		p, err := NewInstanceProfile(InstanceProfileConfig{IMDSBase: spec.Upstream, RoleName: spec.ProfileRole}, log)
		if err != nil {
			return nil, err
		}
		if s.ProfileRole, err = p.waitRoleName(ctx, profileDiscovery); err != nil {
			return nil, err
		}
		log.Info("the instance profile's role", zap.String("role_name", s.ProfileRole))
		s.Profile = p
	}
	var err error
	if s.Workload, err = NewSource(ctx, spec.SourceSpec, tokens, x, s.Profile, log); err != nil {
		return nil, err
	}
	if spec.S3 {
		if s.S3, err = NewS3Objects(ctx, s.Profile.Provider(), spec.Region); err != nil {
			return nil, fmt.Errorf("rollout: %w", err)
		}
	}
	if spec.Verify {
		if s.Verifier, err = NewCallerIdentity(ctx, spec.Region, 10*time.Second); err != nil {
			return nil, fmt.Errorf("rollout: %w", err)
		}
	}
	return s, nil
}

// waitRoleName is RoleName, retried every second for at most within.
func (p *InstanceProfile) waitRoleName(ctx context.Context, within time.Duration) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, within)
	defer cancel()
	for {
		name, err := p.RoleName(ctx)
		if err == nil {
			return name, nil
		}
		select {
		case <-ctx.Done():
			return "", fmt.Errorf("the instance profile's role could not be read from the real IMDS: %w", err)
		case <-time.After(time.Second):
		}
	}
}
