package main

import (
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

var (
	testFuncRe = regexp.MustCompile(`(?m)^func ((?:Test|Fuzz|Benchmark)\w+)\(`)
	// A test named in prose: an identifier, not a prefix written as
	// `TestRules…` or `TestFoo*`.
	namedTestRe = regexp.MustCompile(`\b((?:Test|Fuzz|Benchmark)[A-Z0-9]\w*)([…*]?)`)
)

// TestDocsNameExistingTests: every test, fuzz target and benchmark the
// documentation cites as proof (docs/security.md above all) exists, so a
// renamed or deleted test cannot leave a claim without its proof.
func TestDocsNameExistingTests(t *testing.T) {
	root := filepath.Join("..", "..")
	have := map[string]bool{}
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && (d.Name() == "node_modules" || d.Name() == ".git" || d.Name() == "bin") {
			return filepath.SkipDir
		}
		if d.IsDir() || !strings.HasSuffix(p, "_test.go") {
			return nil
		}
		data, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		for _, m := range testFuncRe.FindAllStringSubmatch(string(data), -1) {
			have[m[1]] = true
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	docs, err := filepath.Glob(filepath.Join(root, "docs", "*.md"))
	if err != nil {
		t.Fatal(err)
	}
	for _, doc := range append(docs, filepath.Join(root, "README.md")) {
		data, err := os.ReadFile(doc)
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range namedTestRe.FindAllStringSubmatch(string(data), -1) {
			if m[2] == "" && !have[m[1]] {
				t.Errorf("%s names %s, which no *_test.go defines", filepath.Base(doc), m[1])
			}
		}
	}
}
