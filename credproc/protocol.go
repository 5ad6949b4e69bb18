// Package credproc is the credential_process front door of imdsproxy: a
// unix socket on which the daemon hands a local process the credentials
// the access plan decides for it, and the client, `imdsproxy
// credential-process`, that an AWS config's credential_process runs.
//
// The daemon learns the caller from the kernel: SO_PEERCRED gives the uid
// and pid the client had when it connected, and the pid's cgroup its
// systemd unit (peer.LookupUnix). That works for a process in a container
// with the socket bind-mounted too. The same access: and workloads:
// policy as the IMDS listener decides (access.Plan), and the same
// access.Broker serves, counts and audits (door "process").
//
// # Protocol
//
// One request and one answer per connection, then the daemon closes it.
// The client sends one line of JSON, at most MaxRequest bytes with the
// newline:
//
//	{"version":1}                  the role the plan decides for the caller
//	{"version":1,"role":"billing"} that role, when the plan lists it to the caller
//
// The daemon answers one line of JSON, at most MaxResponse bytes:
//
//	{"version":1,"credentials":{"Version":1,"AccessKeyId":"ASIA…","SecretAccessKey":"…","SessionToken":"…","Expiration":"2026-12-07T13:00:00Z","AccountId":"222222222222"}}
//	{"version":1,"error":{"code":"access_denied","message":"…"}}
//
// Error codes: bad_request (not the protocol), access_denied (the plan
// refuses the caller), not_found (the role asked for is not the caller's),
// retry (the caller could not be identified; ask again), unavailable (no
// valid credentials yet). "credentials" is the credential_process
// document the client prints.
package credproc

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"strings"
	"time"
)

// Protocol limits.
const (
	// Version is the protocol version of requests and answers.
	Version = 1
	// MaxRequest bounds a request line, newline included.
	MaxRequest = 512
	// MaxResponse bounds an answer line, newline included, in bytes. It
	// bounds the whole answer only: no field of the document has a length
	// cap of its own, since a session token's size is not fixed (session
	// tags, packed policies and MinimumSessionTokenSize padding grow it).
	// Real answers are a few KiB; 1 MiB, the bound of every answer the
	// daemon reads from AWS (exchange.MaxResponseBody), is far above them.
	MaxResponse = 1 << 20
)

// Error codes of answers.
const (
	CodeBadRequest   = "bad_request"
	CodeAccessDenied = "access_denied"
	CodeNotFound     = "not_found"
	CodeRetry        = "retry"
	CodeUnavailable  = "unavailable"
)

// Request is what the client sends.
type Request struct {
	Version int    `json:"version"`
	Role    string `json:"role,omitempty"`
}

// Response is what the daemon answers: exactly one of Credentials and
// Error.
type Response struct {
	Version     int       `json:"version"`
	Credentials *Document `json:"credentials,omitempty"`
	Error       *Error    `json:"error,omitempty"`
}

// Error is a refusal or failure.
type Error struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

// Document is the credential_process output, Version 1, as the SDKs read
// it (AccountId is used by the newer ones and ignored by the others).
type Document struct {
	Version         int    `json:"Version"`
	AccessKeyID     string `json:"AccessKeyId"`
	SecretAccessKey string `json:"SecretAccessKey"`
	SessionToken    string `json:"SessionToken"`
	Expiration      string `json:"Expiration"`
	AccountID       string `json:"AccountId,omitempty"`
}

// TimeLayout is the Expiration format: RFC 3339, UTC, whole seconds.
const TimeLayout = "2006-01-02T15:04:05Z"

var (
	accountRe   = regexp.MustCompile(`^[0-9]{12}$`)
	printableRe = regexp.MustCompile(`^[\x21-\x7e]+$`)
)

// validKeyID reports whether s is an access key id: 16..128 of [A-Z0-9].
// (Not a regular expression: the counted repetition compiles to 36 KB that
// every GC cycle marks.)
func validKeyID(s string) bool {
	if len(s) < 16 || len(s) > 128 {
		return false
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; !('A' <= c && c <= 'Z' || '0' <= c && c <= '9') {
			return false
		}
	}
	return true
}

// Validate checks d as the client must before printing it: Version 1, an
// access key id, a secret and a session token of printable ASCII, an
// Expiration in TimeLayout after now, an AccountId of 12 digits when set.
// The session token has no length cap (its size is not fixed); the answer
// that carries it is bounded by MaxResponse.
func (d Document) Validate(now time.Time) error {
	switch {
	case d.Version != 1:
		return fmt.Errorf("credentials of version %d, want 1", d.Version)
	case !validKeyID(d.AccessKeyID):
		return errors.New("credentials without a valid AccessKeyId")
	case len(d.SecretAccessKey) > 1024 || !printableRe.MatchString(d.SecretAccessKey):
		return errors.New("credentials without a valid SecretAccessKey")
	case !printableRe.MatchString(d.SessionToken):
		return errors.New("credentials without a valid SessionToken")
	case d.AccountID != "" && !accountRe.MatchString(d.AccountID):
		return errors.New("credentials with an AccountId that is not 12 digits")
	}
	exp, err := time.Parse(TimeLayout, d.Expiration)
	if err != nil || exp.Format(TimeLayout) != d.Expiration { // time.Parse takes a fraction the layout lacks
		return fmt.Errorf("credentials with an Expiration that is not %s", TimeLayout)
	}
	if !exp.After(now) {
		return fmt.Errorf("credentials expired at %s", d.Expiration)
	}
	return nil
}

// Marshal renders d as the client prints it: one line of JSON.
func (d Document) Marshal() []byte {
	b, _ := json.Marshal(d)
	return append(b, '\n')
}

// decodeLine decodes one line of JSON into v strictly: unknown fields,
// trailing data and a missing newline are errors.
func decodeLine(line []byte, v any) error {
	body, ok := bytes.CutSuffix(line, []byte("\n"))
	if !ok {
		return errors.New("not one line")
	}
	if bytes.ContainsAny(body, "\r\n") {
		return errors.New("more than one line")
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return err
	}
	if dec.More() {
		return errors.New("trailing data")
	}
	return nil
}

// oneLine makes s printable on one line of stderr, at most n bytes.
func oneLine(s string, n int) string {
	s = strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f {
			return ' '
		}
		return r
	}, s)
	if len(s) > n {
		s = strings.ToValidUTF8(s[:n], "") + "…"
	}
	return s
}
