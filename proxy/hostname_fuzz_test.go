package proxy

import (
	"regexp"
	"strings"
	"testing"
)

// FuzzValidHostName: validHostName accepts exactly what the regular
// expression of a lower-case DNS name accepts (it replaces it).
func FuzzValidHostName(f *testing.F) {
	re := regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$`)
	label63 := strings.Repeat("a", 63)
	for _, s := range []string{"", "a", "imds.internal", "a-b.c", "-a", "a-", "a..b", ".a", "a.", "a.-b", label63,
		label63 + "a", label63 + "." + label63, "A", "a_b", "a b", "xn--bcher-kva.example", "1.2.3.4", "\xff"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		if got, want := validHostName(s), re.MatchString(s); got != want {
			t.Errorf("validHostName(%q) = %v, the rule says %v", s, got, want)
		}
	})
}
