package cache

import (
	"fmt"
	"time"

	"github.com/imdsproxy/imdsproxy/config"
)

// Section is the `cache:` section of the daemon's config: refresh and retry
// tuning. It applies on reload (Cache.Tune).
type Section struct {
	BackoffInitial config.Duration `yaml:"backoff_initial"`
	BackoffMax     config.Duration `yaml:"backoff_max"`
	ExpiryMargin   config.Duration `yaml:"expiry_margin"`
	FetchTimeout   config.Duration `yaml:"fetch_timeout"`
}

// DefaultSection is the section's defaults.
func DefaultSection() Section {
	return Section{
		BackoffInitial: config.Duration(DefaultBackoffInitial),
		BackoffMax:     config.Duration(DefaultBackoffMax),
		ExpiryMargin:   config.Duration(DefaultExpiryMargin),
		FetchTimeout:   config.Duration(DefaultFetchTimeout),
	}
}

// Validate checks the section against the shortest role duration served
// (the expiry margin must be less than half of it); every error names the
// key.
func (s Section) Validate(shortest time.Duration) error {
	if s.BackoffInitial.D() <= 0 || s.BackoffMax.D() < s.BackoffInitial.D() {
		return fmt.Errorf("config: cache.backoff_max: must be at least cache.backoff_initial, and both positive")
	}
	if d := s.FetchTimeout.D(); d < time.Second || d > 5*time.Minute {
		return fmt.Errorf("config: cache.fetch_timeout: %s is outside 1s..5m", d)
	}
	if s.ExpiryMargin.D() >= shortest/2 {
		return fmt.Errorf("config: cache.expiry_margin: %s must be less than half of role.duration", s.ExpiryMargin.D())
	}
	return nil
}

// Tuning is the section as a Config for New and Tune.
func (s Section) Tuning() Config {
	return Config{
		FetchTimeout:   s.FetchTimeout.D(),
		BackoffInitial: s.BackoffInitial.D(),
		BackoffMax:     s.BackoffMax.D(),
		ExpiryMargin:   s.ExpiryMargin.D(),
	}
}
