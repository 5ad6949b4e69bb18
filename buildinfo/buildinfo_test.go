package buildinfo

import (
	"runtime"
	"strings"
	"testing"
)

func TestVersion(t *testing.T) {
	if got := Version("1.2.3"); got != "1.2.3" {
		t.Errorf("Version(1.2.3) = %q", got)
	}
	if got := Version(""); got == "" {
		t.Error("Version without override is empty, want the module version or devel")
	}
	s := String("imdsproxy", "1.2.3")
	if !strings.HasPrefix(s, "imdsproxy 1.2.3 (") || !strings.Contains(s, runtime.Version()) || !strings.Contains(s, runtime.GOOS+"/"+runtime.GOARCH) {
		t.Errorf("String = %q", s)
	}
}
