package rollout

import (
	"crypto/ed25519"
	"errors"
	"fmt"
	"net/url"
	"strings"
	"time"

	"github.com/imdsproxy/imdsproxy/config"
)

// Section is the `rollout:` section of the daemon's config. Every key takes
// effect on reload (SIGHUP): a new policy source is read at once, a new
// group tag is read again from metadata.
type Section struct {
	// Policy is where the rollout policy is read: an absolute path, an
	// https:// URL or s3://bucket/key. "" means no rollout.
	Policy string `yaml:"policy"`
	// InsecureHTTP allows a plain http:// policy URL to a loopback
	// address (tests, a local agent). Off: anyone who binds that port
	// while the real service is down could serve any policy.
	InsecureHTTP bool `yaml:"insecure_http"`
	// PollInterval is the mean time between policy reads (±10%).
	PollInterval config.Duration `yaml:"poll_interval"`
	// GroupTag is the instance tag naming the host's instance group.
	GroupTag string `yaml:"group_tag"`
	// Group is the group when the tag is absent.
	Group string `yaml:"group"`
	// Fallback is none or instance-profile (see Fallback).
	Fallback string `yaml:"fallback"`
	// ShadowInterval is the time between shadow verifications.
	ShadowInterval config.Duration `yaml:"shadow_interval"`
	// PolicyKeys are the Ed25519 public keys a policy's detached signature
	// (<policy>.sig) must verify with (ParsePublicKey: base64 raw or SPKI,
	// PEM, or an absolute file path); several for rotation. None: policies
	// are not signed.
	PolicyKeys []string `yaml:"policy_keys"`
}

// Defaults of the rollout: section.
const (
	DefaultPollInterval   = time.Minute
	DefaultShadowInterval = 5 * time.Minute
)

// Enabled reports whether a rollout policy decides what is served.
func (c Section) Enabled() bool { return c.Policy != "" }

// Validate checks the section and fills its defaults; every error names
// the key.
func (c *Section) Validate() error {
	if c.PollInterval == 0 {
		c.PollInterval = config.Duration(DefaultPollInterval)
	}
	if c.ShadowInterval == 0 {
		c.ShadowInterval = config.Duration(DefaultShadowInterval)
	}
	if c.GroupTag == "" {
		c.GroupTag = DefaultTagKey
	}
	if c.Fallback == "" {
		c.Fallback = string(FallbackNone)
	}
	if _, err := ParseFallback(c.Fallback); err != nil {
		return fmt.Errorf("config: rollout.fallback: must be \"none\" or \"instance-profile\", got %q", c.Fallback)
	}
	if d := c.PollInterval.D(); d < time.Second || d > time.Hour {
		return fmt.Errorf("config: rollout.poll_interval: %s is outside 1s..1h", d)
	}
	if d := c.ShadowInterval.D(); d < time.Second || d > 24*time.Hour {
		return fmt.Errorf("config: rollout.shadow_interval: %s is outside 1s..24h", d)
	}
	if strings.ContainsAny(c.GroupTag, "/\x00\n") || len(c.GroupTag) > 128 {
		return fmt.Errorf("config: rollout.group_tag: %q is not an instance tag key", c.GroupTag)
	}
	if err := checkText(c.Group, maxGroupLen); c.Group != "" && err != nil {
		return fmt.Errorf("config: rollout.group: %v", err)
	}
	for i, k := range c.PolicyKeys {
		if strings.HasPrefix(k, "/") {
			continue // a key file: read when the rollout is configured
		}
		if _, err := ParsePublicKey(k); err != nil {
			return fmt.Errorf("config: rollout.policy_keys[%d]: %w", i, err)
		}
	}
	if c.Policy == "" {
		if len(c.PolicyKeys) > 0 {
			return errors.New("config: rollout.policy_keys: needs rollout.policy")
		}
		if c.Fallback != string(FallbackNone) {
			return errors.New("config: rollout.fallback: needs rollout.policy")
		}
		if c.InsecureHTTP {
			return errors.New("config: rollout.insecure_http: needs an http:// rollout.policy")
		}
		return nil
	}
	switch {
	case strings.HasPrefix(c.Policy, "/"):
	case strings.HasPrefix(c.Policy, "s3://"):
		u, err := url.Parse(c.Policy)
		if err != nil || u.Host == "" || len(u.Path) < 2 || u.RawQuery != "" || u.Fragment != "" {
			return fmt.Errorf("config: rollout.policy: %q is not s3://bucket/key", c.Policy)
		}
	default:
		if err := config.CheckURL(c.Policy, c.InsecureHTTP); err != nil {
			return fmt.Errorf("config: rollout.policy: must be an absolute path, an https URL or s3://bucket/key: %w", err)
		}
	}
	if c.InsecureHTTP && !strings.HasPrefix(c.Policy, "http://") {
		return errors.New("config: rollout.insecure_http: only for an http:// rollout.policy")
	}
	return nil
}

// Keys returns the parsed policy_keys, reading the key files.
func (c Section) Keys() ([]ed25519.PublicKey, error) {
	keys, err := ParsePublicKeys(c.PolicyKeys)
	if err != nil {
		return nil, fmt.Errorf("rollout.policy_keys: %w", err)
	}
	return keys, nil
}

// S3 reports whether the policy is read from S3 (the daemon then builds an
// ObjectGetter with the instance profile's credentials).
func (c Section) S3() bool { return strings.HasPrefix(c.Policy, "s3://") }
