package intercept

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
)

// Exit codes of `imdsproxy intercept`.
const (
	ExitOK        = 0
	ExitFailure   = 1 // a failure, or status not what the config asks for
	ExitUsage     = 2
	ExitBadConfig = 3
)

// Usage is the help text of `imdsproxy intercept`.
const Usage = `Usage: imdsproxy intercept install|remove|status [--config FILE]

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

// Command is `imdsproxy intercept install|remove|status`: args follow
// "intercept"; load reads the config file at path (defaultPath unless
// --config says) and returns its intercept: section, validated, and its
// listen address. It returns the exit code.
func Command(args []string, defaultPath string, load func(path string) (Section, string, error), stdout, stderr io.Writer) int {
	if len(args) == 0 || args[0] == "help" || args[0] == "-h" || args[0] == "--help" {
		fmt.Fprint(stderr, Usage)
		if len(args) == 0 {
			return ExitUsage
		}
		return ExitOK
	}
	verb := args[0]
	fs := flag.NewFlagSet("intercept "+verb, flag.ContinueOnError)
	fs.SetOutput(stderr)
	path := fs.String("config", defaultPath, "path of the YAML config file")
	fs.Usage = func() { fmt.Fprint(stderr, Usage) }
	if err := fs.Parse(args[1:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return ExitOK
		}
		return ExitUsage
	}
	if fs.NArg() != 0 || (verb != "install" && verb != "remove" && verb != "status") {
		fs.Usage()
		return ExitUsage
	}
	sec, listen, err := load(*path)
	if err != nil {
		fmt.Fprintf(stderr, "imdsproxy: %v\n", err)
		return ExitBadConfig
	}
	rules, err := sec.NewRules(listen, false)
	if err != nil {
		fmt.Fprintf(stderr, "imdsproxy: intercept: %v\n", err)
		return ExitBadConfig
	}
	fail := func(err error) int {
		fmt.Fprintf(stderr, "imdsproxy: %v\n", err)
		if errors.Is(err, os.ErrPermission) {
			fmt.Fprintln(stderr, "imdsproxy: managing nftables needs CAP_NET_ADMIN (run as root)")
		}
		return ExitFailure
	}
	switch verb {
	case "install":
		if !sec.Enabled {
			removed, err := rules.Remove()
			if err != nil {
				return fail(err)
			}
			fmt.Fprintf(stdout, "intercept.enabled is false: no rules installed (removed table inet %s: %v)\n", TableName, removed)
			return ExitOK
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
			fmt.Fprintf(stdout, "removed table inet %s\n", TableName)
		} else {
			fmt.Fprintf(stdout, "table inet %s was not present\n", TableName)
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
		want := Present
		if !sec.Enabled {
			want = Absent // what the config asks for
		}
		if st.State != want {
			return ExitFailure
		}
	}
	return ExitOK
}
