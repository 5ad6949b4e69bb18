// Command imdsproxy-issuer is imdsproxy's central token issuer: it attests
// hosts (signed EC2 instance identity documents, or presigned
// sts:GetCallerIdentity requests), decides from policy which workloads a
// host may speak for, and mints a short-lived OIDC token per workload,
// signed with a file or AWS KMS key; it serves and publishes the discovery
// document and JWKS STS needs to trust it. See docs/issuer.md.
//
// This package only wires: flags, config loading, logging, metrics
// registry, listener, signals. The issuer itself is package issuer.
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
	"time"

	"github.com/imdsproxy/imdsproxy/buildinfo"
	"github.com/imdsproxy/imdsproxy/issuer"
)

// Exit codes, in one place.
const (
	exitOK     = 0
	exitError  = 1 // the issuer failed at run time (listen, publish, ...)
	exitUsage  = 2 // bad command line
	exitConfig = 3 // the configuration is invalid
)

// version is set at build time with -ldflags "-X main.version=…".
var version = ""

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

const usageText = `imdsproxy-issuer attests hosts and mints a short-lived OIDC token per
workload, which STS AssumeRoleWithWebIdentity trusts through the published
discovery document and JWKS.

Usage:
  imdsproxy-issuer serve --config FILE [--log-format json|console] [--log-level LEVEL]
  imdsproxy-issuer check-config FILE
  imdsproxy-issuer publish --config FILE
  imdsproxy-issuer version

Commands:
  serve         serve POST /v1/token, the discovery document, the JWKS,
                /healthz, /readyz and /metrics on listen. SIGHUP reloads the
                config (a bad file is refused and the running one kept);
                SIGTERM drains and exits 0.
  check-config  validate a config file and the files it names (keys,
                certificates); on error name the offending key and exit 3;
                print rotation and policy warnings.
  publish       write the discovery document and the JWKS to the S3 bucket
                of publish: (bucket, prefix, region).
  version       print the version.

AWS calls (KMS, EC2, STS, S3) use the SDK's usual configuration: AWS_REGION,
AWS_ENDPOINT_URL_<SERVICE>, AWS_ENDPOINT_URL and the default credential chain.
See docs/issuer.md for every config key.

Exit codes: 0 ok, 1 runtime error, 2 usage error, 3 invalid configuration.
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
		return runServe(ctx, args[1:], stderr)
	case "check-config":
		return runCheckConfig(ctx, args[1:], stdout, stderr)
	case "publish":
		return runPublish(ctx, args[1:], stdout, stderr)
	case "version", "--version", "-version":
		fmt.Fprintln(stdout, versionString())
		return exitOK
	case "help", "-h", "--help", "-help":
		fmt.Fprint(stdout, usageText)
		return exitOK
	default:
		fmt.Fprintf(stderr, "imdsproxy-issuer: unknown command %q\n\n%s", args[0], usageText)
		return exitUsage
	}
}

// configArg reads the config path from --config FILE or the only argument.
func configArg(name string, args []string, stderr io.Writer, usage string) (string, int) {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	path := fs.String("config", "", "config file")
	fs.Usage = func() { fmt.Fprintln(stderr, usage) }
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return "", exitOK
		}
		return "", exitUsage
	}
	if *path == "" && fs.NArg() == 1 {
		*path = fs.Arg(0)
	}
	if *path == "" || fs.NArg() > 1 || (fs.NArg() == 1 && fs.Arg(0) != *path) {
		fs.Usage()
		return "", exitUsage
	}
	return *path, -1
}

func runCheckConfig(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	path, code := configArg("check-config", args, stderr, "Usage: imdsproxy-issuer check-config FILE\n\nValidates FILE; on error names the offending key and exits 3.")
	if code >= 0 {
		return code
	}
	cfg, err := issuer.LoadConfig(path)
	if err == nil {
		err = issuer.CheckFiles(cfg)
	}
	if err != nil {
		fmt.Fprintf(stderr, "imdsproxy-issuer: %s: %v\n", path, err)
		return exitConfig
	}
	for _, w := range cfg.Warnings(time.Now()) {
		fmt.Fprintf(stderr, "imdsproxy-issuer: warning: %s\n", w)
	}
	fmt.Fprintf(stdout, "%s: ok (issuer %s, listen %s, %d signing key(s), %d policy rule(s))\n",
		path, cfg.Issuer, cfg.Listen, len(cfg.Signing.Keys), len(cfg.Policy))
	return exitOK
}

func runPublish(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	path, code := configArg("publish", args, stderr, "Usage: imdsproxy-issuer publish --config FILE\n\nWrites the discovery document and the JWKS to the S3 bucket of publish:.")
	if code >= 0 {
		return code
	}
	cfg, err := issuer.LoadConfig(path)
	if err == nil && cfg.Publish == nil {
		err = &issuer.ConfigError{Key: "publish", Msg: "required for publish (bucket, prefix, region)"}
	}
	if err != nil {
		fmt.Fprintf(stderr, "imdsproxy-issuer: %s: %v\n", path, err)
		return exitConfig
	}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	out, err := issuer.PublishDocuments(ctx, cfg, nil)
	for _, o := range out {
		fmt.Fprintf(stdout, "published s3://%s/%s (%d bytes)\n", o.Bucket, o.Key, o.Bytes)
	}
	if err != nil {
		fmt.Fprintf(stderr, "imdsproxy-issuer: %v\n", err)
		var ce *issuer.ConfigError
		if errors.As(err, &ce) {
			return exitConfig
		}
		return exitError
	}
	fmt.Fprintf(stdout, "published at %s: a key added now may sign (be moved first) once it has been published for tokens.ttl (%s); record published_at: %s on it\n",
		time.Now().UTC().Format(time.RFC3339), cfg.Tokens.TTL.D(), time.Now().UTC().Format(time.RFC3339))
	return exitOK
}

func versionString() string { return buildinfo.String("imdsproxy-issuer", version) }

// buildVersion is the -X version, else the module version, else "devel".
func buildVersion() string { return buildinfo.Version(version) }
