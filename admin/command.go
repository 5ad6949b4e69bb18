package admin

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"regexp"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/imdsproxy/imdsproxy/config"
)

// Exit codes of `imdsproxy status`.
const (
	ExitReady       = 0 // the daemon answered: ready
	ExitNotReady    = 1 // the daemon answered: not ready
	ExitUsage       = 2 // bad command line
	ExitBadConfig   = 3 // the --config file cannot be read
	ExitUnreachable = 4 // the admin endpoint did not answer /debug/status
)

// statusTimeout bounds the whole GET of /debug/status.
const statusTimeout = 5 * time.Second

// StatusUsage is the help text of `imdsproxy status`.
const StatusUsage = `Usage: imdsproxy status [--admin HOST:PORT] [--config FILE] [--json]

Asks the running daemon's admin listener (GET /debug/status) and prints a
summary: readiness and why, the role served, the configuration in force (and
whether a reload was refused or a restart is needed), the front doors (IMDS,
the container credentials endpoint, the credential_process socket), the
rollout stage and why, the instance group and bucket, the policy, each cached
credential's expiry and next refresh, and the last shadow verification. With
--config the admin address is the file's admin_listen (unless --admin is
given too). --json prints the document as the daemon sent it.

A --config file the daemon would refuse is still read for admin_listen (the
daemon keeps its last good config; status shows the refused reload).

Exit codes: 0 ready, 1 not ready, 2 usage error, 3 unreadable --config file,
4 admin endpoint unreachable (no daemon running?).
`

// StatusCommand is `imdsproxy status`: args are its flags, adminListenOf
// reads admin_listen from a --config file. It returns the exit code.
func StatusCommand(ctx context.Context, args []string, stdout, stderr io.Writer, adminListenOf func(path string) (string, error)) int {
	fs := flag.NewFlagSet("status", flag.ContinueOnError)
	fs.SetOutput(stderr)
	addrFlag := fs.String("admin", "127.0.0.1:8170", "address of the daemon's admin listener")
	cfgPath := fs.String("config", "", "the daemon's config file: use its admin_listen")
	asJSON := fs.Bool("json", false, "print the /debug/status document as received")
	fs.Usage = func() { fmt.Fprint(stderr, StatusUsage) }
	if err := fs.Parse(args); err != nil {
		if err == flag.ErrHelp {
			return ExitReady
		}
		return ExitUsage
	}
	if fs.NArg() != 0 {
		fs.Usage()
		return ExitUsage
	}
	adminSet := false
	fs.Visit(func(f *flag.Flag) { adminSet = adminSet || f.Name == "admin" })
	addr := *addrFlag
	if *cfgPath != "" && !adminSet {
		a, err := adminListenOf(*cfgPath)
		if err != nil {
			fmt.Fprintf(stderr, "imdsproxy status: %v\n", err)
			return ExitBadConfig
		}
		addr = a
	}
	addr, err := Dialable(addr)
	if err != nil {
		fmt.Fprintf(stderr, "imdsproxy status: --admin %q: %v\n", *addrFlag, err)
		return ExitUsage
	}
	raw, err := GetStatus(ctx, addr, statusTimeout)
	if err != nil {
		fmt.Fprintf(stderr, "imdsproxy status: the admin endpoint at %s is unreachable (is the daemon running? systemctl status imdsproxy): %v\n", addr, err)
		return ExitUnreachable
	}
	var doc Status
	if err := json.Unmarshal(raw, &doc); err != nil {
		fmt.Fprintf(stderr, "imdsproxy status: %s answered /debug/status with something that is not the status document: %v\n", addr, err)
		return ExitUnreachable
	}
	if *asJSON {
		_, _ = stdout.Write(raw)
		if len(raw) > 0 && raw[len(raw)-1] != '\n' {
			fmt.Fprintln(stdout)
		}
	} else {
		PrintStatus(stdout, addr, doc, time.Now())
	}
	if !doc.Ready {
		return ExitNotReady
	}
	return ExitReady
}

// LenientAdminListen reads admin_listen from a config file the daemon
// would refuse (the daemon keeps running its last good config, and status
// is how one finds out): only a file that cannot be read is an error; a
// file whose YAML cannot be parsed at all is searched for a top-level
// admin_listen line; def when the file never names it.
func LenientAdminListen(path, def string) (string, error) {
	data, err := config.ReadFile(path)
	if err != nil {
		return "", err
	}
	var lenient struct {
		AdminListen string `yaml:"admin_listen"`
	}
	if yaml.Unmarshal(data, &lenient) != nil {
		// Not YAML at all (a half-edited file): the top-level line.
		if m := adminLineRe.FindSubmatch(data); m != nil {
			lenient.AdminListen = string(m[1])
		}
	}
	if lenient.AdminListen == "" {
		lenient.AdminListen = def
	}
	return lenient.AdminListen, nil
}

var adminLineRe = regexp.MustCompile(`(?m)^admin_listen:[ \t]*["']?([^"'\s#]+)`)
