// Command imdsproxy is a per-host daemon that stands in for the EC2 instance
// metadata service (169.254.169.254): it answers the credential paths with the
// credentials of the host's workload role, exchanged from the host's identity
// (an OIDC token) and cached ahead of expiry, and forwards every other metadata
// path to the real IMDS.
//
// This package is the only composition root of the project: it parses flags
// and the YAML config, wires the packages together and runs them.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/imdsproxy/imdsproxy/access"
	"github.com/imdsproxy/imdsproxy/buildinfo"
	"github.com/imdsproxy/imdsproxy/container"
	"github.com/imdsproxy/imdsproxy/credproc"
)

// Exit codes, in one place.
const (
	exitOK     = 0
	exitError  = 1 // the daemon failed at run time; status: not ready
	exitUsage  = 2 // bad command line
	exitConfig = 3 // the configuration is invalid
	// 4: status could not reach the daemon (exitStatusUnreachable, status.go)
)

// version is set at build time with -ldflags "-X main.version=…".
var version = ""

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

const usageText = `imdsproxy stands in for the EC2 instance metadata service and hands unmodified
AWS SDKs the credentials of this host's workload role.

Usage:
  imdsproxy serve --config FILE [--log-format json|console] [--log-level LEVEL]
  imdsproxy check-config FILE
  imdsproxy intercept install|remove|status [--config FILE]
  imdsproxy status [--admin HOST:PORT] [--config FILE] [--json]
  imdsproxy credential-process [--socket PATH] [--role NAME] [--timeout D]
  imdsproxy workload env [--docker] [--config FILE] NAME
  imdsproxy version
  imdsproxy help

Commands:
  serve         run the daemon: the IMDS listener (default 127.0.0.1:8169) and
                the admin listener (default 127.0.0.1:8170: /metrics /healthz
                /readyz /debug/cache /debug/status). SIGHUP reloads the config
                and re-reads the rollout policy: every setting applies, except
                listen, admin_listen, upstream, intercept.*,
                imds.token_key_file, container.enabled/listen/link/token_dir
                and credential_process.*, which need a restart (such a reload is
                refused and says so; a bad file is refused too and the running
                config kept); SIGUSR1 rotates the container endpoint's tokens;
                SIGTERM drains and exits 0. With container.enabled also the
                container credentials endpoint (127.0.0.1:8171/v1/credentials),
                with credential_process.enabled the credential_process socket.
  check-config  validate a config file; on error name the offending key and exit 3.
  intercept     install, remove or check the nftables rules that redirect
                169.254.169.254:80 and [fd00:ec2::254]:80 to the daemon (needs
                CAP_NET_ADMIN; see docs/deploy.md).
  status        ask the running daemon (GET /debug/status on the admin listener)
                and print readiness, the role served, the configuration in force
                (a refused reload, a restart needed), rollout stage and why,
                group, expiry and next refresh, last error, policy version;
                exit 0 ready, 1 not ready, 4 admin endpoint unreachable.
  credential-process
                print the credentials the daemon serves this process, as an AWS
                config's credential_process expects (Version 1 JSON on stdout,
                nothing else; exit 1 with a one-line reason on stderr).
  workload env  print the systemd drop-in (or with --docker the docker run
                arguments) that points workload NAME (its unit, uid:N or role
                name) at the container credentials endpoint.
  version       print the version.

The daemon's own AWS calls honour AWS_REGION, AWS_ENDPOINT_URL_STS,
AWS_ENDPOINT_URL_ROLESANYWHERE, AWS_ENDPOINT_URL_S3 and AWS_ENDPOINT_URL.
serve runs the garbage collector with GOGC=200 unless GOGC is set
(GOMEMLIMIT applies too; docs/deploy.md). See docs/configuration.md for
every config key.

Exit codes: 0 ok, 1 runtime error (status: not ready), 2 usage error,
3 invalid configuration, 4 daemon unreachable (status).
`

// run is main without the process: it parses args, runs the sub-command and
// returns the exit code. It writes only to the given streams.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usageText)
		return exitUsage
	}
	switch args[0] {
	case "serve":
		return runServe(ctx, args[1:], stdout, stderr)
	case "check-config":
		return runCheckConfig(args[1:], stdout, stderr)
	case "status":
		return runStatus(ctx, args[1:], stdout, stderr)
	case "intercept":
		return runIntercept(args[1:], stdout, stderr)
	case "credential-process":
		return runCredentialProcess(ctx, args[1:], stdout, stderr)
	case "workload":
		return runWorkload(args[1:], stdout, stderr)
	case "version", "--version", "-version":
		fmt.Fprintln(stdout, versionString())
		return exitOK
	case "help", "-h", "--help", "-help":
		fmt.Fprint(stdout, usageText)
		return exitOK
	default:
		fmt.Fprintf(stderr, "imdsproxy: unknown command %q\n\n%s", args[0], usageText)
		return exitUsage
	}
}

func runCheckConfig(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("check-config", flag.ContinueOnError)
	fs.SetOutput(stderr)
	path := fs.String("config", "", "config file to check (or give it as the argument)")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "Usage: imdsproxy check-config FILE\n\nValidates FILE; on error names the offending key and exits 3.")
	}
	if err := fs.Parse(args); err != nil {
		return flagExit(err)
	}
	if *path == "" && fs.NArg() == 1 {
		*path = fs.Arg(0)
	}
	if *path == "" || fs.NArg() > 1 || (fs.NArg() == 1 && fs.Arg(0) != *path) {
		fs.Usage()
		return exitUsage
	}
	cfg, err := loadConfig(*path)
	if err != nil {
		fmt.Fprintf(stderr, "imdsproxy: %v\n", err)
		return exitConfig
	}
	warnings, err := cfg.preflight(context.Background())
	if err != nil {
		fmt.Fprintf(stderr, "imdsproxy: %s: %v\n", *path, err)
		return exitConfig
	}
	role := fmt.Sprintf("role %s listed as %q", cfg.Role.ARN, cfg.Role.Name)
	if cfg.Role.Name == "" {
		role = "the instance profile's role, its name read from upstream at start"
	}
	fmt.Fprintf(stdout, "%s: ok (source %s, %s, listen %s, admin %s)\n",
		*path, cfg.Source, role, cfg.Listen, cfg.AdminListen)
	for _, w := range warnings {
		fmt.Fprintf(stderr, "imdsproxy: warning: %s\n", w)
	}
	return exitOK
}

// runCredentialProcess is `imdsproxy credential-process`: stdout gets the
// credentials and nothing else.
func runCredentialProcess(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	o, err := credproc.ParseFlags(args, stderr)
	if err != nil {
		return flagExit(err)
	}
	doc, err := credproc.Fetch(ctx, o)
	if err == nil {
		_, err = stdout.Write(doc.Marshal())
	}
	if err != nil {
		fmt.Fprintf(stderr, "imdsproxy credential-process: %v\n", err)
		return exitError
	}
	return exitOK
}

// runWorkload is `imdsproxy workload env` (container.EnvCommand) on the
// config file's workloads: and container: sections.
func runWorkload(args []string, stdout, stderr io.Writer) int {
	return container.EnvCommand(args, defaultConfigPath, func(path string) (container.Section, []access.Workload, error) {
		cfg, err := loadConfig(path)
		return cfg.Container, cfg.Workloads, err
	}, stdout, stderr)
}

func flagExit(err error) int {
	if errors.Is(err, flag.ErrHelp) {
		return exitOK
	}
	return exitUsage
}

func versionString() string { return buildinfo.String("imdsproxy", version) }

// buildVersion is the -X version, else the module version, else "devel".
func buildVersion() string { return buildinfo.Version(version) }
