package issuer

import (
	"fmt"
	"net"
	"net/netip"
	"net/url"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/imdsproxy/imdsproxy/config"
	"github.com/imdsproxy/imdsproxy/creds"
)

// Attestation methods, as named in the token request's "method" and in
// policy match.methods.
const (
	MethodIID = "aws_iid"
	MethodIAM = "aws_iam"
)

// Defaults of the configuration.
const (
	DefaultAudience         = "sts.amazonaws.com"
	DefaultTTL              = time.Hour
	DefaultCacheControl     = "public, max-age=300"
	DefaultEC2CacheTTL      = 5 * time.Minute
	DefaultEC2NegativeTTL   = 30 * time.Second
	DefaultEC2CacheSize     = 100000
	DefaultUpstreamTimeout  = 5 * time.Second
	DefaultPerHostPerMinute = 60
	DefaultBurst            = 20
	DefaultMaxHosts         = 100000
	DefaultShutdownTimeout  = 10 * time.Second
	// DefaultMaxConnections bounds the listener's open connections: with
	// TLS about 50 KiB each, so about 400 MiB at most.
	DefaultMaxConnections = 8192
	// MaxConnectionsLimit is the most max_connections may be.
	MaxConnectionsLimit = 1 << 20
	// DefaultSTSEndpoint is where aws_iam requests are forwarded when
	// neither attestation.aws_iam.sts_endpoints nor AWS_ENDPOINT_URL_STS
	// is set.
	DefaultSTSEndpoint = "https://sts.amazonaws.com"
)

// Limits of the configuration, from STS (session tags) and common sense.
const (
	MinTTL          = time.Minute
	MaxTTL          = 24 * time.Hour
	MaxSessionTags  = 50
	MaxTagKeyLen    = 128
	MaxTagValueLen  = 256
	MaxSubjectLen   = creds.MaxSubject
	maxPlaceholders = 4
)

// Config is the issuer's YAML configuration (docs/issuer.md). Decode it
// with ParseConfig, which applies defaults and validates it.
type Config struct {
	// Listen is the HTTP(S) listener, host:port.
	Listen string `yaml:"listen"`
	// MaxConnections bounds the connections the listener keeps open; at
	// the bound a new one takes the place of the keep-alive connection
	// idle the longest (connlimit). Restart-only, as Listen.
	MaxConnections int `yaml:"max_connections"`
	// Issuer is the iss claim and the base URL relying parties fetch the
	// discovery document from.
	Issuer string `yaml:"issuer"`
	// TLS is the listener's certificate; nil only with a loopback Listen.
	TLS *TLSConfig `yaml:"tls"`
	// Signing holds the signing keys.
	Signing Signing `yaml:"signing"`
	// Attestation enables and tunes the attestation methods.
	Attestation Attestation `yaml:"attestation"`
	// Tokens sets the audience and lifetime of minted tokens.
	Tokens Tokens `yaml:"tokens"`
	// Policy decides which workloads an attested host may speak for.
	Policy []Rule `yaml:"policy"`
	// Publish is where `imdsproxy-issuer publish` writes the discovery
	// document and the JWKS.
	Publish *Publish `yaml:"publish"`
	// RateLimit bounds token requests per host.
	RateLimit RateLimit `yaml:"rate_limit"`
	// Shutdown tunes the SIGTERM drain.
	Shutdown Shutdown `yaml:"shutdown"`
}

// TLSConfig names the listener's certificate and key (PEM files, re-read
// on SIGHUP).
type TLSConfig struct {
	Cert string `yaml:"cert"`
	Key  string `yaml:"key"`
}

// Signing holds the keys. The first key signs; every key is published.
type Signing struct {
	Keys []KeyConfig `yaml:"keys"`
}

// KeyConfig is one signing key: exactly one of File and KMS.
type KeyConfig struct {
	// File is a PEM private key: EC P-256 (ES256) or RSA >= 2048 (RS256).
	File string `yaml:"file"`
	// KMS is the ARN of an AWS KMS asymmetric key (ECC_NIST_P256 or
	// RSA_2048/3072/4096, key usage SIGN_VERIFY).
	KMS string `yaml:"kms"`
	// PublishedAt is when the JWKS holding this key was first published
	// (RFC 3339). check-config warns when the signing key was published
	// less than tokens.ttl ago, or when it cannot tell.
	PublishedAt string `yaml:"published_at"`
}

// Attestation configures the attestation methods; at least one is needed.
type Attestation struct {
	AWSIID *IIDConfig `yaml:"aws_iid"`
	AWSIAM *IAMConfig `yaml:"aws_iam"`
	EC2    EC2Config  `yaml:"ec2"`
}

// IIDConfig configures the signed instance identity document method.
type IIDConfig struct {
	// Certificates are PEM files of certificates trusted to sign instance
	// identity documents; empty means the AWS certificates shipped with
	// the issuer.
	Certificates []string `yaml:"certificates"`
	// MaxInstanceAge refuses documents whose pendingTime is older; 0 means
	// no limit.
	MaxInstanceAge config.Duration `yaml:"max_instance_age"`
	// VerifyInstance checks with EC2 DescribeInstances that the instance
	// is running and was launched at the document's pendingTime.
	VerifyInstance bool `yaml:"verify_instance"`
}

// IAMConfig configures the presigned sts:GetCallerIdentity method.
type IAMConfig struct {
	// STSEndpoints are the STS endpoints requests may be signed for and are
	// forwarded to; empty means AWS_ENDPOINT_URL_STS, else
	// DefaultSTSEndpoint.
	STSEndpoints []string `yaml:"sts_endpoints"`
	// VerifyInstance checks with EC2 DescribeInstances (in the region the
	// client names) that the instance is running; it is what makes the
	// region and the instance's tags known.
	VerifyInstance bool `yaml:"verify_instance"`
	// Timeout bounds the STS call; 0 means DefaultUpstreamTimeout.
	Timeout config.Duration `yaml:"timeout"`
	// MaxInFlight bounds the requests forwarded to STS at once, all
	// clients together; beyond it a request is refused (sts_busy, 503)
	// before anything is sent. 0 means DefaultSTSInFlight.
	MaxInFlight int `yaml:"max_in_flight"`
}

// Bounds of attestation.aws_iam.max_in_flight.
const (
	DefaultSTSInFlight = 128
	MaxSTSInFlight     = 4096
)

// EC2Config tunes EC2 DescribeInstances lookups (replay defence, tags,
// instance profiles).
type EC2Config struct {
	// Endpoint overrides the EC2 endpoint (else AWS_ENDPOINT_URL_EC2 or the
	// regional one).
	Endpoint string `yaml:"endpoint"`
	// AssumeRoleARN, when set, is assumed before calling EC2 in an
	// instance's account; {accountId} is replaced by the account.
	AssumeRoleARN string `yaml:"assume_role_arn"`
	// CacheTTL is how long an answer about a running instance is reused.
	CacheTTL config.Duration `yaml:"cache_ttl"`
	// NegativeCacheTTL is how long "not running / not found" is reused.
	NegativeCacheTTL config.Duration `yaml:"negative_cache_ttl"`
	// CacheSize bounds the cache (instances).
	CacheSize int `yaml:"cache_size"`
	// Timeout bounds one DescribeInstances call.
	Timeout config.Duration `yaml:"timeout"`
}

// Tokens sets the aud claim and the lifetime.
type Tokens struct {
	Audience string          `yaml:"audience"`
	TTL      config.Duration `yaml:"ttl"`
}

// Rule is one policy rule: hosts that match may get tokens for Subjects.
type Rule struct {
	// Name labels the rule in metrics and logs; default "rule-<index>".
	Name  string `yaml:"name"`
	Match Match  `yaml:"match"`
	// Subjects are the workloads (sub claims) a matching host may get;
	// a request without "workload" gets the first.
	Subjects []string `yaml:"subjects"`
	// PrincipalTags become STS session tags (claim
	// https://aws.amazon.com/tags). Values may hold {accountId},
	// {instanceId}, {region} and {workload}.
	PrincipalTags map[string]string `yaml:"principal_tags"`
	// TransitiveTagKeys are the tag keys that survive role chaining; each
	// must be a key of PrincipalTags.
	TransitiveTagKeys []string `yaml:"transitive_tag_keys"`
}

// Match is a conjunction: every non-empty field must match (any of its
// values). An empty Match matches every attested host.
type Match struct {
	Accounts []string `yaml:"accounts"`
	Regions  []string `yaml:"regions"`
	// InstanceProfiles are instance-profile or role ARNs or names.
	InstanceProfiles []string `yaml:"instance_profiles"`
	// Tags are EC2 instance tags that must all be present with these
	// values.
	Tags map[string]string `yaml:"tags"`
	// Methods restricts the attestation methods (aws_iid, aws_iam).
	Methods []string `yaml:"methods"`
}

// Publish is the S3 location of the published documents.
type Publish struct {
	Bucket string `yaml:"bucket"`
	// Prefix is the key prefix matching the issuer URL's path on the CDN
	// ("imds" for https://oidc.example.com/imds).
	Prefix string `yaml:"prefix"`
	Region string `yaml:"region"`
	// Endpoint overrides the S3 endpoint (else AWS_ENDPOINT_URL_S3).
	Endpoint string `yaml:"endpoint"`
	// PathStyle uses path-style addressing (needed by most S3 stand-ins).
	PathStyle bool `yaml:"path_style"`
	// CacheControl is the objects' Cache-Control; default
	// DefaultCacheControl.
	CacheControl string `yaml:"cache_control"`
}

// RateLimit is a token bucket per attested instance id.
type RateLimit struct {
	// PerHostPerMinute is the sustained rate; 0 disables rate limiting.
	PerHostPerMinute int `yaml:"per_host_per_minute"`
	// Burst is the bucket size.
	Burst int `yaml:"burst"`
	// MaxHosts bounds the number of buckets kept (least recently used
	// evicted).
	MaxHosts int `yaml:"max_hosts"`
}

// Shutdown tunes SIGTERM: readiness fails at once, requests keep being
// served for DrainDelay (so load balancers notice), then in-flight requests
// get up to Timeout.
type Shutdown struct {
	DrainDelay config.Duration `yaml:"drain_delay"`
	Timeout    config.Duration `yaml:"timeout"`
}

// defaultConfig is what an omitted key means.
func defaultConfig() Config {
	return Config{
		Tokens: Tokens{Audience: DefaultAudience, TTL: config.Duration(DefaultTTL)},
		Attestation: Attestation{EC2: EC2Config{
			CacheTTL:         config.Duration(DefaultEC2CacheTTL),
			NegativeCacheTTL: config.Duration(DefaultEC2NegativeTTL),
			CacheSize:        DefaultEC2CacheSize,
			Timeout:          config.Duration(DefaultUpstreamTimeout),
		}},
		RateLimit:      RateLimit{PerHostPerMinute: DefaultPerHostPerMinute, Burst: DefaultBurst, MaxHosts: DefaultMaxHosts},
		Shutdown:       Shutdown{Timeout: config.Duration(DefaultShutdownTimeout)},
		MaxConnections: DefaultMaxConnections,
	}
}

// ConfigError is a configuration error naming the offending key.
type ConfigError struct {
	Key string // dotted path, e.g. "policy[1].subjects[0]"
	Msg string
}

func (e *ConfigError) Error() string { return "config: " + e.Key + ": " + e.Msg }

func keyErr(key, format string, args ...any) error {
	return &ConfigError{Key: key, Msg: fmt.Sprintf(format, args...)}
}

// LoadConfig reads and parses the file at path (see ParseConfig).
func LoadConfig(path string) (*Config, error) {
	data, err := config.ReadFile(path)
	if err != nil {
		return nil, err
	}
	return ParseConfig(data)
}

// ParseConfig decodes data strictly (unknown keys are errors naming the key
// path), applies defaults and validates the result. Files named in it are
// not read here (New and Check do).
func ParseConfig(data []byte) (*Config, error) {
	cfg := defaultConfig()
	if err := config.Decode(data, &cfg); err != nil {
		return nil, err
	}
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	return &cfg, nil
}

var (
	accountRe  = regexp.MustCompile(`^\d{12}$`)
	regionRe   = regexp.MustCompile(`^[a-z]{2}(-[a-z]+)+-\d{1,2}$`)
	ruleNameRe = regexp.MustCompile(`^[a-z0-9][a-z0-9_.-]{0,62}$`)
	// tagCharsRe is the character set STS accepts in session tag keys and
	// values.
	tagCharsRe  = regexp.MustCompile(`^[\p{L}\p{Z}\p{N}_.:/=+\-@]*$`)
	kmsARNRe    = regexp.MustCompile(`^arn:aws[a-z-]*:kms:([a-z0-9-]+):\d{12}:(key|alias)/.+$`)
	placeholder = regexp.MustCompile(`\{[^{}]*\}`)
)

// placeholderMax is the longest value each tag placeholder can expand to
// ({workload} is bounded by the rule's longest subject).
var placeholderMax = map[string]int{"{accountId}": 12, "{instanceId}": 19, "{region}": 32, "{workload}": MaxSubjectLen}

func (c *Config) validate() error {
	if c.Listen == "" {
		return keyErr("listen", "required (host:port)")
	}
	host, _, err := net.SplitHostPort(c.Listen)
	if err != nil {
		return keyErr("listen", "%q is not host:port", c.Listen)
	}
	if c.Issuer == "" {
		return keyErr("issuer", "required (the https URL of the issuer, the iss claim)")
	}
	u, err := url.Parse(c.Issuer)
	if err != nil || u.Host == "" || u.RawQuery != "" || u.Fragment != "" || u.User != nil {
		return keyErr("issuer", "%q is not an absolute URL without query, fragment or user info", c.Issuer)
	}
	if u.Scheme != "https" && !(u.Scheme == "http" && loopbackHost(u.Hostname())) {
		return keyErr("issuer", "must be https (STS fetches the discovery document over https); http only to a loopback host, for tests")
	}
	if strings.HasSuffix(c.Issuer, "/") {
		return keyErr("issuer", "must not end with a slash (the iss claim must equal the URL STS is told about, exactly)")
	}
	if c.TLS == nil {
		if !loopbackHost(host) {
			return keyErr("tls", "required: plain HTTP is allowed only when listen is a loopback address (listen is %s)", c.Listen)
		}
	} else {
		if c.TLS.Cert == "" {
			return keyErr("tls.cert", "required with tls")
		}
		if c.TLS.Key == "" {
			return keyErr("tls.key", "required with tls")
		}
	}
	if len(c.Signing.Keys) == 0 {
		return keyErr("signing.keys", "at least one key is required")
	}
	for i, k := range c.Signing.Keys {
		key := fmt.Sprintf("signing.keys[%d]", i)
		switch {
		case k.File == "" && k.KMS == "":
			return keyErr(key, "set file or kms")
		case k.File != "" && k.KMS != "":
			return keyErr(key, "set only one of file and kms")
		case k.KMS != "" && !kmsARNRe.MatchString(k.KMS):
			return keyErr(key+".kms", "%q is not a KMS key ARN (arn:aws:kms:REGION:ACCOUNT:key/ID)", k.KMS)
		}
		if k.PublishedAt != "" {
			if _, err := time.Parse(time.RFC3339, k.PublishedAt); err != nil {
				return keyErr(key+".published_at", "%q is not an RFC 3339 time such as 2026-11-25T12:00:00Z", k.PublishedAt)
			}
		}
	}
	if err := c.Attestation.validate(); err != nil {
		return err
	}
	if c.Tokens.Audience == "" {
		return keyErr("tokens.audience", "must not be empty")
	}
	if ttl := c.Tokens.TTL.D(); ttl < MinTTL || ttl > MaxTTL {
		return keyErr("tokens.ttl", "%s is outside %s..%s", ttl, MinTTL, MaxTTL)
	}
	if len(c.Policy) == 0 {
		return keyErr("policy", "at least one rule is required (no rule: every request is refused)")
	}
	names := map[string]int{}
	for i := range c.Policy {
		if err := c.Policy[i].validate(i, c.Attestation); err != nil {
			return err
		}
		n := c.Policy[i].label(i)
		if j, dup := names[n]; dup {
			return keyErr(fmt.Sprintf("policy[%d].name", i), "%q is also the name of policy[%d]", n, j)
		}
		names[n] = i
	}
	if p := c.Publish; p != nil {
		if p.Bucket == "" {
			return keyErr("publish.bucket", "required with publish")
		}
		if p.Region == "" {
			return keyErr("publish.region", "required with publish")
		}
		if p.Endpoint != "" {
			if eu, err := url.Parse(p.Endpoint); err != nil || (eu.Scheme != "https" && eu.Scheme != "http") || eu.Host == "" {
				return keyErr("publish.endpoint", "%q is not an http(s) URL", p.Endpoint)
			}
		}
	}
	if c.MaxConnections < 1 || c.MaxConnections > MaxConnectionsLimit {
		return keyErr("max_connections", "%d is not between 1 and %d", c.MaxConnections, MaxConnectionsLimit)
	}
	if r := c.RateLimit; r.PerHostPerMinute < 0 || r.Burst < 0 || r.MaxHosts < 0 {
		return keyErr("rate_limit", "values must not be negative")
	}
	if r := c.RateLimit; r.PerHostPerMinute > 0 && (r.Burst < 1 || r.MaxHosts < 1) {
		return keyErr("rate_limit.burst", "burst and max_hosts must be at least 1 when per_host_per_minute is set")
	}
	return nil
}

func (a *Attestation) validate() error {
	if a.AWSIID == nil && a.AWSIAM == nil {
		return keyErr("attestation", "enable at least one method: aws_iid or aws_iam")
	}
	if iam := a.AWSIAM; iam != nil {
		if iam.MaxInFlight < 0 || iam.MaxInFlight > MaxSTSInFlight {
			return keyErr("attestation.aws_iam.max_in_flight", "%d is out of range 0..%d (0: %d)", iam.MaxInFlight, MaxSTSInFlight, DefaultSTSInFlight)
		}
		for i, e := range iam.STSEndpoints {
			u, err := url.Parse(e)
			if err != nil || (u.Scheme != "https" && !(u.Scheme == "http" && loopbackHost(u.Hostname()))) ||
				u.Host == "" || (u.Path != "" && u.Path != "/") || u.RawQuery != "" {
				return keyErr(fmt.Sprintf("attestation.aws_iam.sts_endpoints[%d]", i),
					"%q is not an https URL without path (http only to loopback)", e)
			}
		}
	}
	if ar := a.EC2.AssumeRoleARN; ar != "" && !strings.HasPrefix(ar, "arn:") {
		return keyErr("attestation.ec2.assume_role_arn", "%q is not a role ARN", ar)
	}
	if e := a.EC2.Endpoint; e != "" {
		if u, err := url.Parse(e); err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" {
			return keyErr("attestation.ec2.endpoint", "%q is not an http(s) URL", e)
		}
	}
	if a.EC2.CacheSize < 1 {
		return keyErr("attestation.ec2.cache_size", "must be at least 1")
	}
	return nil
}

// label is the rule's name for metrics and logs.
func (r *Rule) label(i int) string {
	if r.Name != "" {
		return r.Name
	}
	return fmt.Sprintf("rule-%d", i)
}

func (r *Rule) validate(i int, att Attestation) error {
	key := fmt.Sprintf("policy[%d]", i)
	if r.Name != "" && !ruleNameRe.MatchString(r.Name) {
		return keyErr(key+".name", "%q: use 1-63 lower-case letters, digits, '_', '.', '-'", r.Name)
	}
	for j, a := range r.Match.Accounts {
		if !accountRe.MatchString(a) {
			return keyErr(fmt.Sprintf("%s.match.accounts[%d]", key, j), "%q is not a 12-digit account id (quote it in YAML)", a)
		}
	}
	for j, g := range r.Match.Regions {
		if !regionRe.MatchString(g) {
			return keyErr(fmt.Sprintf("%s.match.regions[%d]", key, j), "%q is not a region such as us-east-1", g)
		}
	}
	for j, p := range r.Match.InstanceProfiles {
		if p == "" || strings.ContainsAny(p, " \t*") {
			return keyErr(fmt.Sprintf("%s.match.instance_profiles[%d]", key, j), "%q is not an ARN or a name", p)
		}
	}
	for k := range r.Match.Tags {
		if k == "" {
			return keyErr(key+".match.tags", "an empty tag key")
		}
	}
	for j, m := range r.Match.Methods {
		if m != MethodIID && m != MethodIAM {
			return keyErr(fmt.Sprintf("%s.match.methods[%d]", key, j), "%q: use aws_iid or aws_iam", m)
		}
		if (m == MethodIID && att.AWSIID == nil) || (m == MethodIAM && att.AWSIAM == nil) {
			return keyErr(fmt.Sprintf("%s.match.methods[%d]", key, j), "%s is not enabled under attestation", m)
		}
	}
	if len(r.Subjects) == 0 {
		return keyErr(key+".subjects", "at least one subject (workload) is required")
	}
	longest := 0
	for j, s := range r.Subjects {
		if !creds.ValidSubject(s) {
			return keyErr(fmt.Sprintf("%s.subjects[%d]", key, j), "%q: 1-%d characters of A-Z a-z 0-9 . _ : / @ + = -, starting with a letter or digit (as the daemon's token.URL.For accepts)", s, MaxSubjectLen)
		}
		if slices.Index(r.Subjects, s) != j {
			return keyErr(fmt.Sprintf("%s.subjects[%d]", key, j), "%q is listed twice", s)
		}
		longest = max(longest, len(s))
	}
	if len(r.PrincipalTags) > MaxSessionTags {
		return keyErr(key+".principal_tags", "%d tags; STS allows at most %d session tags", len(r.PrincipalTags), MaxSessionTags)
	}
	for k, v := range r.PrincipalTags {
		tk := key + ".principal_tags." + k
		switch {
		case k == "" || len(k) > MaxTagKeyLen:
			return keyErr(tk, "tag keys are 1-%d characters", MaxTagKeyLen)
		case !tagCharsRe.MatchString(k) || strings.ContainsAny(k, "{}"):
			return keyErr(tk, "the key holds characters STS refuses in tag keys (letters, digits, spaces and _ . : / = + - @ only; no placeholders)")
		case strings.HasPrefix(strings.ToLower(k), "aws:"):
			return keyErr(tk, "keys starting with aws: are reserved")
		}
		if err := checkTagTemplate(tk, v, longest); err != nil {
			return err
		}
	}
	for j, k := range r.TransitiveTagKeys {
		if _, ok := r.PrincipalTags[k]; !ok {
			return keyErr(fmt.Sprintf("%s.transitive_tag_keys[%d]", key, j), "%q is not a key of principal_tags", k)
		}
	}
	return nil
}

// checkTagTemplate checks a tag value template: known placeholders only,
// STS's characters in the literal parts, and at most MaxTagValueLen
// characters once the placeholders are expanded to their longest.
func checkTagTemplate(key, v string, longestSubject int) error {
	n := 0
	for _, p := range placeholder.FindAllString(v, -1) {
		m, ok := placeholderMax[p]
		if !ok {
			return keyErr(key, "unknown placeholder %s (use {accountId}, {instanceId}, {region}, {workload})", p)
		}
		if p == "{workload}" {
			m = longestSubject
		}
		n += m - len(p)
	}
	lit := placeholder.ReplaceAllString(v, "")
	if strings.ContainsAny(lit, "{}") || !tagCharsRe.MatchString(lit) {
		return keyErr(key, "the value holds characters STS refuses in tag values (letters, digits, spaces and _ . : / = + - @ only)")
	}
	if len([]rune(v))+n > MaxTagValueLen {
		return keyErr(key, "the value can reach %d characters once expanded; STS allows %d", len([]rune(v))+n, MaxTagValueLen)
	}
	return nil
}

// loopbackHost reports whether h is a loopback IP or "localhost".
func loopbackHost(h string) bool {
	if strings.EqualFold(h, "localhost") {
		return true
	}
	ip, err := netip.ParseAddr(h)
	return err == nil && ip.IsLoopback()
}

// Warnings returns what check-config prints as warnings for a valid cfg at
// now: rotation hazards and risky policy.
func (c *Config) Warnings(now time.Time) []string {
	var w []string
	ttl := c.Tokens.TTL.D()
	first := c.Signing.Keys[0]
	switch {
	case len(c.Signing.Keys) > 1 && first.PublishedAt == "":
		w = append(w, "signing.keys[0].published_at: not set, so the issuer cannot tell whether the signing key has been published long enough; "+
			"set it to the time the JWKS holding this key was first published (docs/issuer.md, Key rotation)")
	case first.PublishedAt != "":
		t, _ := time.Parse(time.RFC3339, first.PublishedAt)
		if age := now.Sub(t); age < ttl {
			w = append(w, fmt.Sprintf("signing.keys[0].published_at: the signing key was published %s ago, less than tokens.ttl (%s): "+
				"relying parties and caches may still hold a JWKS without it; wait before moving it first (docs/issuer.md, Key rotation)",
				age.Round(time.Second), ttl))
		}
	}
	for i := range c.Policy {
		r := &c.Policy[i]
		m := r.Match
		if len(m.Accounts) == 0 && len(m.Regions) == 0 && len(m.InstanceProfiles) == 0 && len(m.Tags) == 0 {
			w = append(w, fmt.Sprintf("policy[%d]: matches every attested host of any account", i))
		}
	}
	if c.Attestation.AWSIID != nil && !c.Attestation.AWSIID.VerifyInstance && c.Attestation.AWSIID.MaxInstanceAge == 0 {
		w = append(w, "attestation.aws_iid: neither verify_instance nor max_instance_age is set: a copied instance identity document stays usable forever (docs/issuer.md, Replay)")
	}
	return w
}
