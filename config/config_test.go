package config

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

type inner struct {
	Name  string   `yaml:"name"`
	Every Duration `yaml:"every"`
}

type sample struct {
	Listen string            `yaml:"listen"`
	Count  int               `yaml:"count"`
	On     *bool             `yaml:"on"`
	Inner  inner             `yaml:"inner"`
	List   []inner           `yaml:"list"`
	Tags   map[string]string `yaml:"tags"`
	Skip   string            `yaml:"-"`
}

func TestDecodeKeepsDefaultsAndFills(t *testing.T) {
	s := sample{Listen: "127.0.0.1:1", Inner: inner{Every: Duration(time.Minute)}}
	err := Decode([]byte("count: 3\non: yes\ninner: {name: x}\nlist: [{name: a, every: 90s}]\ntags: {k: v}\n"), &s)
	if err != nil {
		t.Fatal(err)
	}
	if s.Listen != "127.0.0.1:1" || s.Count != 3 || s.On == nil || !*s.On || s.Inner.Name != "x" ||
		s.Inner.Every.D() != time.Minute || len(s.List) != 1 || s.List[0].Every.D() != 90*time.Second || s.Tags["k"] != "v" {
		t.Fatalf("decoded %+v", s)
	}
}

// TestDecodeErrorsNameTheKey: every refusal names the key path (and the
// known keys for a typo).
func TestDecodeErrorsNameTheKey(t *testing.T) {
	cases := []struct{ yaml, want string }{
		{"lisen: x\n", "unknown key lisen (known keys here: listen, count, on, inner, list, tags)"},
		{"inner: {nmae: x}\n", "unknown key inner.nmae"},
		{"count: 1\ncount: 2\n", "count: key given twice"},
		{"count: two\n", `count: "two" is not a whole number`},
		{"count: [1]\n", "count: must be a whole number"},
		{"on: maybe\n", `on: "maybe" is not true or false`},
		{"inner: {every: 3600}\n", `inner.every: "3600" is not a duration`},
		{"inner: {every: -1s}\n", "inner.every: must not be negative"},
		{"inner: x\n", "inner: must be a mapping of keys"},
		{"list: {name: a}\n", "list: must be a list"},
		{"list: [{name: a}, {nmae: b}]\n", "unknown key list[1].nmae"},
		{"listen: [a]\n", "listen: must be a string"},
		{"tags: [a]\n", "tags: must be a mapping"},
		{"count: &x 1\nlisten: *x\n", "aliases are not supported"},
		{"", "the file is empty"},
		{"count: 1\n---\ncount: 2\n", "more than one YAML document"},
		{"- 1\n", "the top level must be a mapping"},
	}
	for _, c := range cases {
		var s sample
		err := Decode([]byte(c.yaml), &s)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("Decode(%q) = %v, want an error containing %q", c.yaml, err, c.want)
		}
	}
	if err := Decode([]byte("a: 1\n"), sample{}); err == nil {
		t.Error("Decode into a non-pointer succeeded")
	}
}

func TestReadFile(t *testing.T) {
	dir := t.TempDir()
	big := filepath.Join(dir, "big.yaml")
	if err := os.WriteFile(big, make([]byte, MaxSize+1), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := ReadFile(big); err == nil || !strings.Contains(err.Error(), "larger than") {
		t.Errorf("ReadFile of an oversized file = %v", err)
	}
	if _, err := ReadFile(filepath.Join(dir, "missing.yaml")); err == nil {
		t.Error("ReadFile of a missing file succeeded")
	}
}

func TestKeys(t *testing.T) {
	got := Keys(sample{})
	want := []string{"listen", "count", "on", "inner", "inner.name", "inner.every", "list", "list[].name", "list[].every", "tags"}
	if !slices.Equal(got, want) {
		t.Errorf("Keys = %v, want %v", got, want)
	}
}

func FuzzDecode(f *testing.F) {
	for _, s := range []string{"count: 1\n", "inner: {every: 1h}\n", "list: [{name: a}]\n", "a: &x 1\nb: *x\n", "{"} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		var s sample
		_ = Decode(data, &s)
	})
}
