package main

import (
	"fmt"
	"net"
	"regexp"
)

// hostNameRe is a DNS name: dot-separated labels of letters, digits and
// hyphens.
var hostNameRe = regexp.MustCompile(`^(?i)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$`)

// validateAllowedHosts checks imds.allowed_hosts: the Host header values the
// IMDS listener accepts besides 169.254.169.254, [fd00:ec2::254], localhost,
// 127.0.0.1, [::1] and its own address (any port). Each entry is a host name
// or an IP address, without port or brackets.
func (c *Config) validateAllowedHosts() error {
	for _, h := range c.IMDS.AllowedHosts {
		if net.ParseIP(h) == nil && (len(h) > 253 || !hostNameRe.MatchString(h)) {
			return fmt.Errorf("config: imds.allowed_hosts: %q is not a host name or IP address (no port, no brackets)", h)
		}
	}
	return nil
}
