package exchange

import (
	"regexp"
	"testing"
)

// FuzzValidTagText: validTagText accepts exactly what the regular
// expression of STS's session tag characters accepts (it replaces it).
func FuzzValidTagText(f *testing.F) {
	re := regexp.MustCompile(`^[\p{L}\p{Z}\p{N}_.:/=+\-@]*$`)
	for _, s := range []string{"", "team", "Team Name", "a_b.c:d/e=f+g-h@i", "café", "日本", "٣", "Ⅻ", "\u00a0", "\u2028",
		"a\tb", "a\nb", "a#b", "a,b", "a*b", "\xff", "\ufffd", "a\x00"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		if got, want := validTagText(s), re.MatchString(s); got != want {
			t.Errorf("validTagText(%q) = %v, the rule says %v", s, got, want)
		}
	})
}
