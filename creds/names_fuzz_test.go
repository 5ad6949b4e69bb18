package creds

import (
	"regexp"
	"strings"
	"testing"
)

// FuzzIAMNames: ValidRoleName and ValidSessionName accept exactly what the
// regular expressions of IAM's rules accept (they replace them).
func FuzzIAMNames(f *testing.F) {
	roleRe := regexp.MustCompile(`^[\w+=,.@-]{1,64}$`)
	sessionRe := regexp.MustCompile(`^[\w+=,.@-]{2,64}$`)
	for _, s := range []string{"", "a", "ab", "app", "my-role_1+=,.@", strings.Repeat("a", 64), strings.Repeat("a", 65),
		"a b", "a/b", "a:b", "é", "a\x00", "a\n", "Role.Name@x", "\xff", "ab$", "^ab"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		if got, want := ValidRoleName(s), roleRe.MatchString(s); got != want {
			t.Errorf("ValidRoleName(%q) = %v, the rule says %v", s, got, want)
		}
		if got, want := ValidSessionName(s), sessionRe.MatchString(s); got != want {
			t.Errorf("ValidSessionName(%q) = %v, the rule says %v", s, got, want)
		}
	})
}
