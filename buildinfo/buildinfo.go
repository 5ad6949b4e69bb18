// Package buildinfo says which build a command is, the same way for the
// daemon and the issuer.
package buildinfo

import (
	"fmt"
	"runtime"
	"runtime/debug"
)

// Version is override (the command's -X main.version), else the module
// version the binary was built at, else "devel".
func Version(override string) string {
	if override != "" {
		return override
	}
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
		return bi.Main.Version
	}
	return "devel"
}

// String is what `NAME version` prints: "NAME VERSION (go1.x, os/arch)".
func String(name, override string) string {
	return fmt.Sprintf("%s %s (%s, %s/%s)", name, Version(override), runtime.Version(), runtime.GOOS, runtime.GOARCH)
}
