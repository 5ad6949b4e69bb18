//go:build linux

package main

import (
	"bytes"
	"strings"
	"testing"
)

// Bad flags are refused before the clock is touched.
func TestUsage(t *testing.T) {
	for _, args := range [][]string{
		{"-step", "0"},
		{"-step", "49h"},
		{"-step", "-49h"},
		{"-hold", "0s"},
		{"-hold", "11m"},
		{"-hold", "-1s"},
		{"extra"},
		{"-step", "soon"},
	} {
		var out, errb bytes.Buffer
		if code := run(args, strings.NewReader(""), &out, &errb); code != 2 {
			t.Errorf("run(%q) = %d, want 2 (stdout %q, stderr %q)", args, code, out.String(), errb.String())
		}
		if out.Len() != 0 {
			t.Errorf("run(%q) printed %q on stdout", args, out.String())
		}
	}
}
