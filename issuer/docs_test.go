package issuer

import (
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"go.yaml.in/yaml/v3"
)

func readDoc(t *testing.T, name string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", "docs", name))
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

var fence = regexp.MustCompile("(?ms)^```(json|yaml)[ \t]*\n(.*?)^```")

// TestDocBlocks parses every ```json and ```yaml block of the issuer's
// docs; YAML blocks that are issuer configs (they have listen and signing)
// must pass ParseConfig too.
func TestDocBlocks(t *testing.T) {
	for _, name := range []string{"issuer.md", "quickstart.md"} {
		doc := readDoc(t, name)
		blocks := fence.FindAllStringSubmatch(doc, -1)
		if len(blocks) < 5 {
			t.Fatalf("%s: only %d json/yaml blocks", name, len(blocks))
		}
		configs := 0
		for i, b := range blocks {
			lang, body := b[1], b[2]
			line := 1 + strings.Count(doc[:strings.Index(doc, b[0])], "\n")
			switch lang {
			case "json":
				var v any
				if err := json.Unmarshal([]byte(body), &v); err != nil {
					t.Errorf("%s:%d: block %d is not JSON: %v", name, line, i, err)
				}
			case "yaml":
				var v map[string]any
				if err := yaml.Unmarshal([]byte(body), &v); err != nil {
					t.Errorf("%s:%d: block %d is not YAML: %v", name, line, i, err)
					continue
				}
				if _, ok := v["signing"]; ok {
					if _, ok := v["listen"]; ok {
						configs++
						if _, err := ParseConfig([]byte(body)); err != nil {
							t.Errorf("%s:%d: issuer config block %d: %v", name, line, i, err)
						}
					}
				}
			}
		}
		if configs == 0 {
			t.Errorf("%s: no issuer config block", name)
		}
	}
}
