// Package token reads the host's workload identity: an OIDC JWT or an X.509
// certificate and key.
//
// The JWT comes from a file kept fresh by an external agent (File,
// identity.jwt_file, re-read on every Token call so a rotated token is picked
// up at once), from a command (Command, identity.jwt_command) or from an
// issuer that checks the instance's signed identity document (URL,
// identity.jwt_url); the last two reuse a token until shortly before its exp.
// Every source checks the token's shape and expiry before anything is sent
// upstream (the signature is verified by STS, not here). X509 loads a
// certificate, its chain and private key, re-reading them when the files
// change. It is a leaf package: it imports nothing of the project.
//
// Errors are *Error values with a bounded Reason. They carry the error
// classification methods of the project (ErrorClass, Permanent; see
// docs/architecture.md) and never include any part of the token.
package token

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
)

// Reasons an identity token could not be used. They are the values of
// Error.Reason and of the result label of
// imdsproxy_identity_token_reads_total.
const (
	// ReasonMissing: the file does not exist (yet).
	ReasonMissing = "missing"
	// ReasonUnreadable: the file exists but could not be opened or read, or
	// is not a regular file (a directory, FIFO, device...).
	ReasonUnreadable = "unreadable"
	// ReasonEmpty: the file holds nothing but whitespace.
	ReasonEmpty = "empty"
	// ReasonTooLarge: the file is larger than FileOptions.MaxSize.
	ReasonTooLarge = "too_large"
	// ReasonMalformed: the content is not a well-formed JWT (see ParseClaims).
	ReasonMalformed = "malformed"
	// ReasonExpired: the token's exp claim is not after now.
	ReasonExpired = "expired"
)

// reasons lists every Reason, to pre-create metric series.
var reasons = []string{ReasonMissing, ReasonUnreadable, ReasonEmpty, ReasonTooLarge, ReasonMalformed, ReasonExpired}

// ErrorClassIdentity is the error class of every *Error (see
// docs/architecture.md, "Error classification").
const ErrorClassIdentity = "identity"

// Error is returned by File.Token when the identity token cannot be used.
// Its message has the form "token: <path>: <reason>: <detail>" and never
// contains the token or any part of it.
type Error struct {
	// Reason is one of the Reason constants.
	Reason string
	// Path is the token file's path.
	Path string
	// Err is the underlying cause (an *fs.PathError, an error from
	// ParseClaims, ...), never one that quotes the token.
	Err error
}

// Error returns "token: <path>: <reason>: <detail>".
func (e *Error) Error() string {
	if e.Err == nil {
		return fmt.Sprintf("token: %s: %s", e.Path, e.Reason)
	}
	return fmt.Sprintf("token: %s: %s: %v", e.Path, e.Reason, e.Err)
}

// Unwrap returns the underlying cause.
func (e *Error) Unwrap() error { return e.Err }

// ErrorClass returns "identity": the host identity could not be read or
// validated locally.
func (e *Error) ErrorClass() string { return ErrorClassIdentity }

// Permanent reports whether retrying without an outside change cannot help.
// It is true for empty, too_large, malformed and expired: the file holds
// content that will never be accepted, and only the token agent writing a new
// file fixes it. It is false for missing and unreadable, which are typical of
// start-up races (the agent has not written the file yet) and of transient I/O
// errors. Either way the caller keeps retrying with backoff; Permanent only
// decides how loudly the failure is reported.
func (e *Error) Permanent() bool {
	switch e.Reason {
	case ReasonEmpty, ReasonTooLarge, ReasonMalformed, ReasonExpired:
		return true
	}
	return x509Permanent(e.Reason) // the X.509 reasons (x509.go)
}

// FileOptions tunes a File. The zero value is usable.
type FileOptions struct {
	// MaxSize is the largest accepted file size in bytes; 0 means
	// MaxTokenSize (64 KiB). Values above MaxTokenSize are lowered to it,
	// since ParseClaims refuses larger tokens anyway.
	MaxSize int64
	// Now returns the current time for the expiry check; nil means time.Now.
	Now func() time.Time
}

// File is a token source backed by a file that an external agent rewrites
// on rotation. It is safe for concurrent use.
type File struct {
	path    string
	maxSize int64
	now     func() time.Time
	log     *zap.Logger

	reads  *prometheus.CounterVec // nil without a registerer
	expiry prometheus.Gauge
}

// NewFile returns a File reading path. The file need not exist yet: it is
// read only by Token. log may be nil (no logging). reg may be nil (no
// metrics); otherwise these metrics are registered on it:
//
//	imdsproxy_identity_token_reads_total{result}         counter; result is "ok" or a Reason
//	imdsproxy_identity_token_expiry_timestamp_seconds   gauge; exp of the last good token, Unix seconds
//
// NewFile fails when path is empty, MaxSize is negative or the metrics cannot
// be registered (for example twice on the same registerer).
func NewFile(path string, opts FileOptions, log *zap.Logger, reg prometheus.Registerer) (*File, error) {
	if path == "" {
		return nil, errors.New("token: empty file path")
	}
	if opts.MaxSize < 0 {
		return nil, fmt.Errorf("token: negative MaxSize %d", opts.MaxSize)
	}
	if opts.MaxSize == 0 || opts.MaxSize > MaxTokenSize {
		opts.MaxSize = MaxTokenSize
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if log == nil {
		log = zap.NewNop()
	}
	f := &File{path: path, maxSize: opts.MaxSize, now: opts.Now, log: log}
	if reg != nil {
		f.reads = prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "imdsproxy_identity_token_reads_total",
			Help: "Reads of the identity token file, by result (ok or the reason it was refused).",
		}, []string{"result"})
		f.expiry = prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "imdsproxy_identity_token_expiry_timestamp_seconds",
			Help: "Expiry (exp claim) of the last identity token read successfully, in Unix seconds.",
		})
		for _, c := range []prometheus.Collector{f.reads, f.expiry} {
			if err := reg.Register(c); err != nil {
				return nil, fmt.Errorf("token: register metrics: %w", err)
			}
		}
		f.reads.WithLabelValues("ok")
		for _, r := range reasons {
			f.reads.WithLabelValues(r)
		}
	}
	return f, nil
}

// Path returns the file's path.
func (f *File) Path() string { return f.path }

// Token reads the file (on every call, so rotation is picked up), trims
// surrounding whitespace, checks the JWT shape with ParseClaims and refuses a
// token whose exp is not after now. Errors are *Error. ctx is accepted for the
// TokenSource interface; a local file read is not interruptible, but an
// already cancelled ctx returns its error without reading.
func (f *File) Token(ctx context.Context) (string, error) {
	if err := ctx.Err(); err != nil {
		return "", err
	}
	tok, claims, err := f.read()
	if err != nil {
		var te *Error
		if errors.As(err, &te) {
			f.count(te.Reason)
			f.log.Warn("identity token refused",
				zap.String("reason", te.Reason), zap.String("path", f.path), zap.Error(te.Err))
		}
		return "", err
	}
	f.count("ok")
	if f.expiry != nil {
		f.expiry.Set(float64(claims.Expiry.UnixNano()) / 1e9)
	}
	f.log.Debug("identity token read", zap.String("path", f.path), zap.Time("expires", claims.Expiry))
	return tok, nil
}

func (f *File) count(result string) {
	if f.reads != nil {
		f.reads.WithLabelValues(result).Inc()
	}
}

func (f *File) fail(reason string, err error) error {
	return &Error{Reason: reason, Path: f.path, Err: err}
}

func (f *File) read() (string, Claims, error) {
	// O_NONBLOCK keeps open(2) from blocking on a FIFO without a writer; it
	// has no effect on regular files, and anything else is refused below.
	fh, err := os.OpenFile(f.path, os.O_RDONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return "", Claims{}, f.fail(ReasonMissing, pathless(err))
		}
		return "", Claims{}, f.fail(ReasonUnreadable, pathless(err))
	}
	defer fh.Close()
	st, err := fh.Stat()
	if err != nil {
		return "", Claims{}, f.fail(ReasonUnreadable, pathless(err))
	}
	if !st.Mode().IsRegular() {
		return "", Claims{}, f.fail(ReasonUnreadable, fmt.Errorf("not a regular file (%s)", fileType(st.Mode())))
	}
	if st.Size() > f.maxSize {
		return "", Claims{}, f.fail(ReasonTooLarge, fmt.Errorf("%d bytes, limit %d", st.Size(), f.maxSize))
	}
	// The size may change between fstat and read (the agent rewrites the
	// file in place): read at most one byte more than allowed.
	b, err := io.ReadAll(io.LimitReader(fh, f.maxSize+1))
	if err != nil {
		return "", Claims{}, f.fail(ReasonUnreadable, pathless(err))
	}
	if int64(len(b)) > f.maxSize {
		return "", Claims{}, f.fail(ReasonTooLarge, fmt.Errorf("more than %d bytes", f.maxSize))
	}
	tok := strings.TrimSpace(string(b))
	if tok == "" {
		return "", Claims{}, f.fail(ReasonEmpty, errors.New("no token in file"))
	}
	claims, err := ParseClaims(tok)
	if err != nil {
		return "", Claims{}, f.fail(ReasonMalformed, err)
	}
	if now := f.now(); !claims.Expiry.After(now) {
		return "", Claims{}, f.fail(ReasonExpired, fmt.Errorf("exp %s is not after now %s",
			claims.Expiry.Format(time.RFC3339), now.UTC().Format(time.RFC3339)))
	}
	return tok, claims, nil
}

// pathless drops the path from an *fs.PathError (Error already names it).
func pathless(err error) error {
	var pe *fs.PathError
	if errors.As(err, &pe) {
		return fmt.Errorf("%s: %w", pe.Op, pe.Err)
	}
	return err
}

func fileType(m fs.FileMode) string {
	switch {
	case m.IsDir():
		return "directory"
	case m&fs.ModeNamedPipe != 0:
		return "named pipe"
	case m&fs.ModeSocket != 0:
		return "socket"
	case m&fs.ModeDevice != 0:
		return "device"
	}
	return m.Type().String()
}
