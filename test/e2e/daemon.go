package e2e

import (
	"fmt"
	"io"
	"os/exec"
	"time"
)

// Config is the part of a daemon config file the harnesses share; YAML
// renders it.
type Config struct {
	// Port and AdminPort are the loopback ports of listen and admin_listen.
	Port, AdminPort int
	// Upstream is the real IMDS (upstream:).
	Upstream string
	// UpstreamTimeout is upstream_timeout; 0 leaves the daemon's default.
	UpstreamTimeout time.Duration
	// Tokens is imds.tokens; "" is required.
	Tokens string
	// IMDS is more of the inside of the flow mapping of imds: (such as
	// "passthrough: {deny: [user-data]}"); "" adds nothing.
	IMDS string
	// Cache is the inside of the flow mapping of cache: (such as
	// "backoff_initial: 1s"); "" leaves out the section.
	Cache string
	// Identity is the role:, source:, identity: and any source-specific
	// sections, as YAML ending in a newline (WebIdentityYAML, say).
	Identity string
	// Extra is appended as is.
	Extra string
}

// YAML renders c.
func (c Config) YAML() string {
	tokens := c.Tokens
	if tokens == "" {
		tokens = "required"
	}
	s := fmt.Sprintf("listen: 127.0.0.1:%d\nadmin_listen: 127.0.0.1:%d\nupstream: %s\n", c.Port, c.AdminPort, c.Upstream)
	if c.UpstreamTimeout > 0 {
		s += fmt.Sprintf("upstream_timeout: %s\n", c.UpstreamTimeout)
	}
	imds := fmt.Sprintf("tokens: %s, hop_limit: 1", tokens)
	if c.IMDS != "" {
		imds += ", " + c.IMDS
	}
	s += "imds: {" + imds + "}\n"
	if c.Cache != "" {
		s += "cache: {" + c.Cache + "}\n"
	}
	return s + c.Identity + c.Extra
}

// WebIdentityYAML is the role: (one-hour sessions), source: web-identity and
// identity: {jwt_file} sections of a config.
func WebIdentityYAML(roleARN, roleName, jwtFile string) string {
	return fmt.Sprintf("role: {arn: %q, name: %s, duration: 1h}\nsource: web-identity\nidentity: {jwt_file: %q}\n", roleARN, roleName, jwtFile)
}

// DaemonOptions configure StartDaemon.
type DaemonOptions struct {
	// Bin is the imdsproxy binary (DaemonBinary).
	Bin string
	// Config is the path of its config file.
	Config string
	// Args follow `serve --config PATH`: --log-format, --log-level.
	Args []string
	// Dir, Env are its working directory and environment (Environ is
	// where to start).
	Dir string
	Env []string
	// Command builds the command (to run it in a network namespace or
	// pinned to CPUs, say); nil is exec.Command.
	Command func(name string, args ...string) *exec.Cmd
	// Out receives its stdout and stderr (its log).
	Out io.Writer
}

// StartDaemon starts `imdsproxy serve`. It does not wait: WaitOK on the
// admin listener's /healthz or /readyz does.
func StartDaemon(o DaemonOptions) (*Process, error) {
	command := o.Command
	if command == nil {
		command = exec.Command
	}
	cmd := command(o.Bin, append([]string{"serve", "--config", o.Config}, o.Args...)...)
	cmd.Dir, cmd.Env = o.Dir, o.Env
	cmd.Stdout, cmd.Stderr = o.Out, o.Out
	p, err := Start(cmd)
	if err != nil {
		return nil, fmt.Errorf("start %s: %w", o.Bin, err)
	}
	return p, nil
}
