package main

import (
	"io"

	"github.com/imdsproxy/imdsproxy/intercept"
)

// runIntercept is `imdsproxy intercept install|remove|status`
// (intercept.Command) on the config file's intercept: section.
func runIntercept(args []string, stdout, stderr io.Writer) int {
	return intercept.Command(args, defaultConfigPath, func(path string) (intercept.Section, string, error) {
		cfg, err := loadConfig(path)
		return cfg.Intercept, cfg.Listen, err
	}, stdout, stderr)
}
