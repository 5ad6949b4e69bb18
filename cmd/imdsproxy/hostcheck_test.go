package main

import (
	"strings"
	"testing"
)

func TestValidateAllowedHosts(t *testing.T) {
	for _, tc := range []struct {
		hosts []string
		ok    bool
	}{
		{nil, true},
		{[]string{"imds.internal", "10.0.0.5", "fd00::1", "IMDS-1.example"}, true},
		{[]string{"imds.internal:80"}, false},
		{[]string{"[::1]"}, false},
		{[]string{""}, false},
		{[]string{"user@host"}, false},
		{[]string{"-bad.example"}, false},
	} {
		c := Config{IMDS: IMDSConfig{AllowedHosts: tc.hosts}}
		err := c.validateAllowedHosts()
		if (err == nil) != tc.ok {
			t.Errorf("%q: err = %v, want ok %v", tc.hosts, err, tc.ok)
		}
		if err != nil && !strings.Contains(err.Error(), "imds.allowed_hosts") {
			t.Errorf("error %q does not name the key", err)
		}
	}
}
