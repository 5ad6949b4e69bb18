package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"
)

// maxConfigSize bounds the config file; a real one is a few hundred bytes.
const maxConfigSize = 1 << 20

// Config is the daemon's YAML configuration. The keys and their meaning are the
// contract of DESIGN.md; docs/configuration.md documents every key. Unknown keys
// are an error. The zero value is not valid; use loadConfig or parseConfig,
// which apply defaults and validate.
type Config struct {
	Listen          string          `yaml:"listen"`
	AdminListen     string          `yaml:"admin_listen"`
	Upstream        string          `yaml:"upstream"`
	UpstreamTimeout Duration        `yaml:"upstream_timeout"`
	Region          string          `yaml:"region"`
	IMDS            IMDSConfig      `yaml:"imds"`
	Role            RoleConfig      `yaml:"role"`
	Source          string          `yaml:"source"`
	Identity        IdentityConfig  `yaml:"identity"`
	Federation      FederationCfg   `yaml:"federation"`
	RolesAnywhere   RolesAnywhere   `yaml:"roles_anywhere"`
	AssumeRole      AssumeRoleCfg   `yaml:"assume_role"`
	Rollout         RolloutConfig   `yaml:"rollout"`
	Cache           CacheConfig     `yaml:"cache"`
	Intercept       InterceptConfig `yaml:"intercept"` // see intercept.go
	Access          AccessConfig    `yaml:"access"`    // see access.go
	Workloads       []WorkloadCfg   `yaml:"workloads"` // see workloads.go
}

// IMDSConfig is the `imds:` section.
type IMDSConfig struct {
	Tokens       string   `yaml:"tokens"`
	HopLimit     int      `yaml:"hop_limit"`
	TokenKeyFile string   `yaml:"token_key_file"` // see intercept.go, lifecycle.go
	AllowedHosts []string `yaml:"allowed_hosts"`  // see hostcheck.go
}

// RoleConfig is the `role:` section.
type RoleConfig struct {
	ARN         string   `yaml:"arn"`
	Name        string   `yaml:"name"`
	SessionName string   `yaml:"session_name"`
	Duration    Duration `yaml:"duration"`
}

// IdentityConfig is the `identity:` section: how the host proves who it is.
type IdentityConfig struct {
	JWTFile    string      `yaml:"jwt_file"`
	JWTCommand []string    `yaml:"jwt_command"`
	JWTURL     string      `yaml:"jwt_url"`
	CAFile     string      `yaml:"ca_file"` // extra CA bundle for jwt_url
	Timeout    Duration    `yaml:"timeout"` // bound on jwt_command / jwt_url
	X509       *X509Config `yaml:"x509"`
}

// X509Config names the PEM files of an X.509 identity.
type X509Config struct {
	Cert  string `yaml:"cert"`
	Key   string `yaml:"key"`
	Chain string `yaml:"chain"`
}

// FederationCfg is the `federation:` section.
type FederationCfg struct {
	URL    string `yaml:"url"`
	CAFile string `yaml:"ca_file"`
}

// RolesAnywhere is the `roles_anywhere:` section.
type RolesAnywhere struct {
	TrustAnchorARN string `yaml:"trust_anchor_arn"`
	ProfileARN     string `yaml:"profile_arn"`
}

// AssumeRoleCfg is the `assume_role:` section (source assume-role).
type AssumeRoleCfg struct {
	Base           string            `yaml:"base"` // instance-profile | sdk-chain
	ExternalID     string            `yaml:"external_id"`
	SourceIdentity string            `yaml:"source_identity"`
	Tags           map[string]string `yaml:"tags"`
}

// RolloutConfig is the `rollout:` section.
type RolloutConfig struct {
	Policy         string   `yaml:"policy"` // path | https:// URL | s3://bucket/key; "" = no rollout
	PollInterval   Duration `yaml:"poll_interval"`
	GroupTag       string   `yaml:"group_tag"`
	Group          string   `yaml:"group"`
	Fallback       string   `yaml:"fallback"` // none | instance-profile
	ShadowInterval Duration `yaml:"shadow_interval"`
}

// CacheConfig is the `cache:` section: refresh and retry tuning.
type CacheConfig struct {
	BackoffInitial Duration `yaml:"backoff_initial"`
	BackoffMax     Duration `yaml:"backoff_max"`
	ExpiryMargin   Duration `yaml:"expiry_margin"`
	FetchTimeout   Duration `yaml:"fetch_timeout"`
}

// Duration is a time.Duration written as a Go duration string ("90s", "1h").
type Duration time.Duration

// D returns the value as a time.Duration.
func (d Duration) D() time.Duration { return time.Duration(d) }

// UnmarshalYAML parses a Go duration string. Key checking in checkNode has
// already produced a path-named error for bad values; this is the fallback.
func (d *Duration) UnmarshalYAML(n *yaml.Node) error {
	v, err := time.ParseDuration(n.Value)
	if err != nil {
		return fmt.Errorf("line %d: %q is not a duration (use Go syntax such as 90s, 15m, 1h)", n.Line, n.Value)
	}
	*d = Duration(v)
	return nil
}

// MarshalYAML writes the duration as a Go duration string.
func (d Duration) MarshalYAML() (any, error) { return time.Duration(d).String(), nil }

// Sources this build can serve, and all sources of the contract.
var (
	knownSources = []string{"web-identity", "federation", "roles-anywhere", "assume-role", "instance-profile"}
)

func defaultConfig() Config {
	return Config{
		Listen:          "127.0.0.1:8169",
		AdminListen:     "127.0.0.1:8170",
		Upstream:        "http://169.254.169.254",
		UpstreamTimeout: Duration(2 * time.Second),
		IMDS:            IMDSConfig{Tokens: "required", HopLimit: 1},
		Role:            RoleConfig{Duration: Duration(time.Hour)},
		Source:          "web-identity",
		Cache: CacheConfig{
			BackoffInitial: Duration(2 * time.Second),
			BackoffMax:     Duration(5 * time.Minute),
			ExpiryMargin:   Duration(time.Minute),
			FetchTimeout:   Duration(30 * time.Second),
		},
	}
}

// loadConfig reads, parses and validates the file at path.
func loadConfig(path string) (Config, error) {
	f, err := os.Open(path)
	if err != nil {
		return Config{}, fmt.Errorf("config: %w", err)
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, maxConfigSize+1))
	if err != nil {
		return Config{}, fmt.Errorf("config: read %s: %w", path, err)
	}
	if len(data) > maxConfigSize {
		return Config{}, fmt.Errorf("config: %s is larger than %d bytes", path, maxConfigSize)
	}
	cfg, err := parseConfig(data)
	if err != nil {
		return Config{}, fmt.Errorf("%s: %w", path, err)
	}
	return cfg, nil
}

// parseConfig parses YAML, refuses unknown or duplicate keys and values of the
// wrong shape (naming the key), applies defaults and validates.
func parseConfig(data []byte) (Config, error) {
	cfg := defaultConfig()
	var doc yaml.Node
	dec := yaml.NewDecoder(bytes.NewReader(data))
	if err := dec.Decode(&doc); err != nil {
		if errors.Is(err, io.EOF) {
			return Config{}, errors.New("config: the file is empty")
		}
		return Config{}, fmt.Errorf("config: %w", err)
	}
	var extra yaml.Node
	if err := dec.Decode(&extra); !errors.Is(err, io.EOF) {
		return Config{}, errors.New("config: more than one YAML document")
	}
	if len(doc.Content) != 1 || doc.Content[0].Kind != yaml.MappingNode {
		return Config{}, errors.New("config: the top level must be a mapping of keys")
	}
	if err := checkNode(doc.Content[0], reflect.TypeOf(cfg), ""); err != nil {
		return Config{}, err
	}
	if err := doc.Content[0].Decode(&cfg); err != nil {
		return Config{}, fmt.Errorf("config: %w", err)
	}
	if err := cfg.validate(); err != nil {
		return Config{}, err
	}
	return cfg, nil
}

var durationType = reflect.TypeOf(Duration(0))

// checkNode walks the YAML tree against the Go type and reports the first key
// that is unknown, duplicated or of the wrong shape, by its dotted path.
func checkNode(n *yaml.Node, t reflect.Type, path string) error {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if n.Kind == yaml.AliasNode {
		return fmt.Errorf("config: line %d: %s: YAML aliases are not supported", n.Line, name(path))
	}
	if n.Tag == "!!null" {
		return nil
	}
	switch {
	case t == durationType:
		if n.Kind != yaml.ScalarNode {
			return fmt.Errorf("config: line %d: %s: must be a duration such as 90s or 1h", n.Line, name(path))
		}
		d, err := time.ParseDuration(n.Value)
		if err != nil {
			return fmt.Errorf("config: line %d: %s: %q is not a duration (use Go syntax such as 90s, 15m, 1h)", n.Line, name(path), n.Value)
		}
		if d < 0 {
			return fmt.Errorf("config: line %d: %s: must not be negative", n.Line, name(path))
		}
	case t.Kind() == reflect.Struct:
		if n.Kind != yaml.MappingNode {
			return fmt.Errorf("config: line %d: %s: must be a mapping of keys", n.Line, name(path))
		}
		seen := map[string]bool{}
		for i := 0; i+1 < len(n.Content); i += 2 {
			k, v := n.Content[i], n.Content[i+1]
			key := joinPath(path, k.Value)
			if seen[k.Value] {
				return fmt.Errorf("config: line %d: %s: key given twice", k.Line, key)
			}
			seen[k.Value] = true
			f, ok := fieldByTag(t, k.Value)
			if !ok {
				return fmt.Errorf("config: line %d: unknown key %s%s", k.Line, key, suggest(t, k.Value))
			}
			if err := checkNode(v, f.Type, key); err != nil {
				return err
			}
		}
	case t.Kind() == reflect.Slice:
		if n.Kind != yaml.SequenceNode {
			return fmt.Errorf("config: line %d: %s: must be a list", n.Line, name(path))
		}
		for i, c := range n.Content {
			if err := checkNode(c, t.Elem(), fmt.Sprintf("%s[%d]", path, i)); err != nil {
				return err
			}
		}
	case t.Kind() == reflect.Map:
		if n.Kind != yaml.MappingNode {
			return fmt.Errorf("config: line %d: %s: must be a mapping", n.Line, name(path))
		}
		seen := map[string]bool{}
		for i := 0; i+1 < len(n.Content); i += 2 {
			k, v := n.Content[i], n.Content[i+1]
			key := joinPath(path, k.Value)
			if k.Kind != yaml.ScalarNode || seen[k.Value] {
				return fmt.Errorf("config: line %d: %s: keys must be distinct strings", k.Line, key)
			}
			seen[k.Value] = true
			if err := checkNode(v, t.Elem(), key); err != nil {
				return err
			}
		}
	case t.Kind() == reflect.String:
		if n.Kind != yaml.ScalarNode {
			return fmt.Errorf("config: line %d: %s: must be a string", n.Line, name(path))
		}
	case t.Kind() == reflect.Int:
		if n.Kind != yaml.ScalarNode {
			return fmt.Errorf("config: line %d: %s: must be a whole number", n.Line, name(path))
		}
		if _, err := strconv.Atoi(n.Value); err != nil {
			return fmt.Errorf("config: line %d: %s: %q is not a whole number", n.Line, name(path), n.Value)
		}
	}
	return nil
}

func name(path string) string {
	if path == "" {
		return "top level"
	}
	return path
}

func joinPath(path, key string) string {
	if path == "" {
		return key
	}
	return path + "." + key
}

func fieldByTag(t reflect.Type, key string) (reflect.StructField, bool) {
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		if strings.Split(f.Tag.Get("yaml"), ",")[0] == key {
			return f, true
		}
	}
	return reflect.StructField{}, false
}

// suggest names the known keys of a section, to help with typos.
func suggest(t reflect.Type, key string) string {
	var keys []string
	for i := 0; i < t.NumField(); i++ {
		keys = append(keys, strings.Split(t.Field(i).Tag.Get("yaml"), ",")[0])
	}
	return fmt.Sprintf(" (known keys here: %s)", strings.Join(keys, ", "))
}

var (
	roleARNRe     = regexp.MustCompile(`^arn:aws[a-z-]*:iam::[0-9]{12}:role/(?:[\x21-\x7e]+/)*([\w+=,.@-]{1,64})$`)
	roleNameRe    = regexp.MustCompile(`^[\w+=,.@-]{1,64}$`)
	sessionNameRe = regexp.MustCompile(`^[\w+=,.@-]{2,64}$`)
	regionRe      = regexp.MustCompile(`^[a-z]{2}(-[a-z]+)+-[0-9]+$`)
)

// validate checks every value and fills derived defaults (role.name). Every
// error names the offending key.
func (c *Config) validate() error {
	if err := c.validateDeployment(); err != nil { // intercept.go
		return err
	}
	if err := c.validateAllowedHosts(); err != nil { // hostcheck.go
		return err
	}
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
	if c.IMDS.Tokens != "required" && c.IMDS.Tokens != "optional" {
		return fmt.Errorf("config: imds.tokens: must be \"required\" or \"optional\", got %q", c.IMDS.Tokens)
	}
	if c.IMDS.HopLimit < 1 || c.IMDS.HopLimit > 64 {
		return fmt.Errorf("config: imds.hop_limit: %d is outside 1..64", c.IMDS.HopLimit)
	}
	if !slices.Contains(knownSources, c.Source) {
		return fmt.Errorf("config: source: %q is not one of %s", c.Source, strings.Join(knownSources, ", "))
	}
	m := roleARNRe.FindStringSubmatch(c.Role.ARN)
	switch {
	case m != nil:
		if c.Role.Name == "" {
			c.Role.Name = m[1]
		}
	case c.Source == "instance-profile" && c.Role.ARN == "":
		// The role is the instance profile's; its name is discovered from
		// upstream at start unless role.name is set.
	default:
		return fmt.Errorf("config: role.arn: %q is not an IAM role ARN such as arn:aws:iam::222222222222:role/app", c.Role.ARN)
	}
	if err := validateRoleFields("role", &c.Role); err != nil {
		return err
	}
	if err := c.validateIdentity(); err != nil {
		return err
	}
	if err := c.validateRollout(); err != nil { // rollout.go
		return err
	}
	if err := c.validateAccess(); err != nil { // access.go
		return err
	}
	cc := c.Cache
	if cc.BackoffInitial.D() <= 0 || cc.BackoffMax.D() < cc.BackoffInitial.D() {
		return fmt.Errorf("config: cache.backoff_max: must be at least cache.backoff_initial, and both positive")
	}
	if cc.FetchTimeout.D() < time.Second || cc.FetchTimeout.D() > 5*time.Minute {
		return fmt.Errorf("config: cache.fetch_timeout: %s is outside 1s..5m", cc.FetchTimeout.D())
	}
	if cc.ExpiryMargin.D() >= c.Role.Duration.D()/2 {
		return fmt.Errorf("config: cache.expiry_margin: %s must be less than half of role.duration", cc.ExpiryMargin.D())
	}
	return c.validateWorkloads() // workloads.go
}

// validateRoleFields checks the name (when set), session name and duration
// of the role section at key.
func validateRoleFields(key string, r *RoleConfig) error {
	if r.Name != "" && !roleNameRe.MatchString(r.Name) {
		return fmt.Errorf("config: %s.name: %q may hold only letters, digits and _+=,.@- (1 to 64)", key, r.Name)
	}
	if r.SessionName != "" && !sessionNameRe.MatchString(r.SessionName) {
		return fmt.Errorf("config: %s.session_name: %q may hold only letters, digits and _+=,.@- (2 to 64)", key, r.SessionName)
	}
	if d := r.Duration.D(); d < 15*time.Minute || d > 12*time.Hour {
		return fmt.Errorf("config: %s.duration: %s is outside 15m..12h (the STS limits)", key, d)
	}
	return nil
}
