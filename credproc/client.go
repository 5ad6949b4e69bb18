package credproc

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"time"

	"github.com/imdsproxy/imdsproxy/creds"
)

// Options are the flags of `imdsproxy credential-process`.
type Options struct {
	Socket  string
	Role    string
	Timeout time.Duration
}

// Usage is the help text of `imdsproxy credential-process`.
const Usage = `Usage: imdsproxy credential-process [--socket PATH] [--role NAME] [--timeout D]

Prints the credentials the running daemon serves this process, as the
credential_process of an AWS config expects (one line of JSON, Version 1),
and nothing else; on failure exits 1 with a one-line reason on stderr.

  [profile default]
  credential_process = /usr/local/bin/imdsproxy credential-process

The daemon identifies the caller by its uid and systemd unit (SO_PEERCRED)
and applies the same access: and workloads: policy as on the IMDS listener;
credential_process.enabled must be true. --role asks for a role by name and
fails unless the daemon serves it to this process.
`

// ParseFlags parses the command line into Options; a usage error has been
// written to stderr (flag.ErrHelp for -h).
func ParseFlags(args []string, stderr io.Writer) (Options, error) {
	fs := flag.NewFlagSet("credential-process", flag.ContinueOnError)
	fs.SetOutput(stderr)
	o := Options{}
	fs.StringVar(&o.Socket, "socket", DefaultSocket, "the daemon's credential_process socket")
	fs.StringVar(&o.Role, "role", "", "the role to ask for (default: the one the daemon decides)")
	fs.DurationVar(&o.Timeout, "timeout", 40*time.Second, "give up after this long")
	fs.Usage = func() { fmt.Fprint(stderr, Usage) }
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	switch {
	case fs.NArg() != 0:
		fmt.Fprintf(stderr, "imdsproxy credential-process: unexpected argument %q\n\n%s", fs.Arg(0), Usage)
		return o, errors.New("usage")
	case o.Role != "" && !creds.ValidRoleName(o.Role):
		fmt.Fprintf(stderr, "imdsproxy credential-process: --role %q is not a role name\n", o.Role)
		return o, errors.New("usage")
	case o.Timeout <= 0:
		fmt.Fprintln(stderr, "imdsproxy credential-process: --timeout must be positive")
		return o, errors.New("usage")
	}
	return o, nil
}

// retries bounds the attempts when the daemon answers "retry": three in all.
const retries = 3

// Fetch asks the daemon for the credentials of o and returns them
// validated. An answer "retry" is asked again: at most retries attempts in all.
func Fetch(ctx context.Context, o Options) (Document, error) {
	ctx, cancel := context.WithTimeout(ctx, o.Timeout)
	defer cancel()
	for attempt := 1; ; attempt++ {
		d, code, err := fetchOnce(ctx, o)
		if code != CodeRetry || attempt == retries {
			return d, err
		}
		select {
		case <-ctx.Done():
			return Document{}, fmt.Errorf("%w (%v)", err, ctx.Err())
		case <-time.After(time.Duration(attempt) * 200 * time.Millisecond):
		}
	}
}

func fetchOnce(ctx context.Context, o Options) (Document, string, error) {
	var dialer net.Dialer
	c, err := dialer.DialContext(ctx, "unix", o.Socket)
	if err != nil {
		return Document{}, "", fmt.Errorf("cannot reach the daemon at %s (is credential_process.enabled set and imdsproxy running?): %w", o.Socket, err)
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(dl)
	}
	req, _ := jsonLine(Request{Version: Version, Role: o.Role})
	if _, err := c.Write(req); err != nil {
		return Document{}, "", fmt.Errorf("daemon at %s: %w", o.Socket, err)
	}
	raw, err := io.ReadAll(io.LimitReader(c, MaxResponse+1))
	if err != nil {
		return Document{}, "", fmt.Errorf("daemon at %s: %w", o.Socket, err)
	}
	return ParseResponse(raw, time.Now())
}

// ParseResponse reads a daemon's answer: the validated credentials, or the
// daemon's error (with its code).
func ParseResponse(raw []byte, now time.Time) (Document, string, error) {
	if len(raw) > MaxResponse {
		return Document{}, "", fmt.Errorf("the daemon's answer is longer than %d bytes", MaxResponse)
	}
	var resp Response
	if err := decodeLine(raw, &resp); err != nil {
		return Document{}, "", fmt.Errorf("the daemon's answer is not the protocol: %s", oneLine(err.Error(), 120))
	}
	switch {
	case resp.Version != Version:
		return Document{}, "", fmt.Errorf("the daemon speaks protocol version %d, this client %d", resp.Version, Version)
	case resp.Error != nil && resp.Credentials == nil:
		return Document{}, resp.Error.Code, fmt.Errorf("%s: %s", oneLine(resp.Error.Code, 40), oneLine(resp.Error.Message, 300))
	case resp.Credentials == nil || resp.Error != nil:
		return Document{}, "", errors.New("the daemon's answer has neither credentials nor an error")
	}
	if err := resp.Credentials.Validate(now); err != nil {
		return Document{}, "", fmt.Errorf("the daemon sent %v", err)
	}
	return *resp.Credentials, "", nil
}

func jsonLine(v any) ([]byte, error) {
	b, err := json.Marshal(v)
	return append(b, '\n'), err
}
