package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"

	"github.com/imdsproxy/imdsproxy/intercept"
)

const interceptUsage = `Usage: imdsproxy intercept install|remove|status [--config FILE]

  install  make the nftables rules match the config: with intercept.enabled,
           write table inet imdsproxy (replacing it atomically; installing twice
           leaves one set of rules); with intercept.enabled false, remove it.
  remove   delete table inet imdsproxy (nothing else); no-op when absent.
  status   print present, absent or drifted (and what differs); exit 0 only
           when that is what the config asks for (present and correct with
           intercept.enabled, absent without).

Needs CAP_NET_ADMIN. Exit codes: 0 ok, 1 failure (or status not present),
2 usage error, 3 invalid configuration.
`

// runIntercept is `imdsproxy intercept install|remove|status`.
func runIntercept(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 || args[0] == "help" || args[0] == "-h" || args[0] == "--help" {
		fmt.Fprint(stderr, interceptUsage)
		if len(args) == 0 {
			return exitUsage
		}
		return exitOK
	}
	verb := args[0]
	fs := flag.NewFlagSet("intercept "+verb, flag.ContinueOnError)
	fs.SetOutput(stderr)
	path := fs.String("config", defaultConfigPath, "path of the YAML config file")
	fs.Usage = func() { fmt.Fprint(stderr, interceptUsage) }
	if err := fs.Parse(args[1:]); err != nil {
		return flagExit(err)
	}
	if fs.NArg() != 0 || (verb != "install" && verb != "remove" && verb != "status") {
		fs.Usage()
		return exitUsage
	}
	cfg, err := loadConfig(*path)
	if err != nil {
		fmt.Fprintf(stderr, "imdsproxy: %v\n", err)
		return exitConfig
	}
	rules, err := cfg.Intercept.NewRules(cfg.Listen, false)
	if err != nil {
		fmt.Fprintf(stderr, "imdsproxy: intercept: %v\n", err)
		return exitConfig
	}
	fail := func(err error) int {
		fmt.Fprintf(stderr, "imdsproxy: %v\n", err)
		if errors.Is(err, os.ErrPermission) {
			fmt.Fprintln(stderr, "imdsproxy: managing nftables needs CAP_NET_ADMIN (run as root)")
		}
		return exitError
	}
	switch verb {
	case "install":
		if !cfg.Intercept.Enabled {
			removed, err := rules.Remove()
			if err != nil {
				return fail(err)
			}
			fmt.Fprintf(stdout, "intercept.enabled is false: no rules installed (removed table inet %s: %v)\n", intercept.TableName, removed)
			return exitOK
		}
		if err := rules.Install(); err != nil {
			return fail(err)
		}
		fmt.Fprintf(stdout, "installed:\n%s", rules.Describe())
	case "remove":
		removed, err := rules.Remove()
		if err != nil {
			return fail(err)
		}
		if removed {
			fmt.Fprintf(stdout, "removed table inet %s\n", intercept.TableName)
		} else {
			fmt.Fprintf(stdout, "table inet %s was not present\n", intercept.TableName)
		}
	case "status":
		st, err := rules.Check()
		if err != nil {
			return fail(err)
		}
		if st.Detail != "" {
			fmt.Fprintf(stdout, "%s: %s\n", st.State, st.Detail)
		} else {
			fmt.Fprintln(stdout, st.State)
		}
		want := intercept.Present
		if !cfg.Intercept.Enabled {
			want = intercept.Absent // what the config asks for
		}
		if st.State != want {
			return exitError
		}
	}
	return exitOK
}
