package credproc

import (
	"regexp"
	"strings"
	"testing"
)

// FuzzValidators: validKeyID and validGroup accept exactly what the regular
// expressions they replace accept.
func FuzzValidators(f *testing.F) {
	keyIDRe := regexp.MustCompile(`^[A-Z0-9]{16,128}$`)
	groupRe := regexp.MustCompile(`^([a-z_][a-z0-9_-]{0,31}|[0-9]{1,10})$`)
	for _, s := range []string{"", "ASIAEXAMPLE00000", "ASIAEXAMPLE0000", "AKIAIOSFODNN7EXAMPLE", strings.Repeat("A", 128),
		strings.Repeat("A", 129), "asiaexample00000", "imdsproxy", "_grp", "-grp", "grp-", "0", "1234567890", "12345678901",
		"g" + strings.Repeat("a", 31), "g" + strings.Repeat("a", 32), "Wheel", "a b", "1a", "a1", "\xff"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		if got, want := validKeyID(s), keyIDRe.MatchString(s); got != want {
			t.Errorf("validKeyID(%q) = %v, the rule says %v", s, got, want)
		}
		if got, want := validGroup(s), groupRe.MatchString(s); got != want {
			t.Errorf("validGroup(%q) = %v, the rule says %v", s, got, want)
		}
	})
}
