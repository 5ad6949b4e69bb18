package main

import (
	"errors"
	"fmt"
	"net/url"
	"strings"
	"time"
)

// Defaults of the rollout: section.
const (
	defaultPollInterval   = time.Minute
	defaultShadowInterval = 5 * time.Minute
	defaultGroupTag       = "aws:autoscaling:groupName"
)

// rolloutEnabled reports whether a rollout policy decides what is served.
func (c *Config) rolloutEnabled() bool { return c.Rollout.Policy != "" }

// validateRollout checks the rollout: section and fills its defaults.
func (c *Config) validateRollout() error {
	r := &c.Rollout
	if r.PollInterval == 0 {
		r.PollInterval = Duration(defaultPollInterval)
	}
	if r.ShadowInterval == 0 {
		r.ShadowInterval = Duration(defaultShadowInterval)
	}
	if r.GroupTag == "" {
		r.GroupTag = defaultGroupTag
	}
	if r.Fallback == "" {
		r.Fallback = "none"
	}
	if r.Fallback != "none" && r.Fallback != "instance-profile" {
		return fmt.Errorf("config: rollout.fallback: must be \"none\" or \"instance-profile\", got %q", r.Fallback)
	}
	if d := r.PollInterval.D(); d < time.Second || d > time.Hour {
		return fmt.Errorf("config: rollout.poll_interval: %s is outside 1s..1h", d)
	}
	if d := r.ShadowInterval.D(); d < time.Second || d > 24*time.Hour {
		return fmt.Errorf("config: rollout.shadow_interval: %s is outside 1s..24h", d)
	}
	if strings.ContainsAny(r.GroupTag, "/\x00\n") || len(r.GroupTag) > 128 {
		return fmt.Errorf("config: rollout.group_tag: %q is not an instance tag key", r.GroupTag)
	}
	if len(r.Group) > 256 || strings.ContainsAny(r.Group, "\x00\n\r") {
		return errors.New("config: rollout.group: at most 256 characters, no control characters")
	}
	if r.Policy == "" {
		if r.Fallback != "none" {
			return errors.New("config: rollout.fallback: needs rollout.policy")
		}
		return nil
	}
	if c.Source == "instance-profile" {
		return errors.New("config: rollout.policy: not used with source instance-profile (it already serves the instance profile)")
	}
	switch {
	case strings.HasPrefix(r.Policy, "/"):
	case strings.HasPrefix(r.Policy, "s3://"):
		u, err := url.Parse(r.Policy)
		if err != nil || u.Host == "" || len(u.Path) < 2 {
			return fmt.Errorf("config: rollout.policy: %q is not s3://bucket/key", r.Policy)
		}
	default:
		if err := checkHTTPSURL(r.Policy); err != nil {
			return fmt.Errorf("config: rollout.policy: must be an absolute path, an https URL or s3://bucket/key: %w", err)
		}
	}
	return nil
}
