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
// change. Both File and X509 defend against files rewritten in place (see
// File and X509). It imports nothing of the project but creds (for
// RedactText, which redacts the text it quotes from commands and issuers).
//
// Errors are *Error values with a bounded Reason. They carry the error
// classification methods of the project (ErrorClass, Permanent; see
// docs/architecture.md) and never include any part of the token.
package token

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promauto"
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
	// ReasonChanging: the file is being rewritten in place: it changed
	// while it was read, or it was modified within the last SettleTime and
	// holds what a write cut short leaves (nothing, the start of a JWT, a
	// signature shorter than its algorithm produces), and stayed so for
	// the whole of the re-reads (at most ChangeWait). See File. For X509:
	// X.509 identity files modified within SettleTime do not validate (see
	// X509).
	ReasonChanging = "changing"
)

// reasons lists every Reason, to pre-create metric series.
var reasons = []string{ReasonMissing, ReasonUnreadable, ReasonEmpty, ReasonTooLarge, ReasonMalformed, ReasonExpired, ReasonChanging}

// ErrorClassIdentity is the error class of every *Error (see
// docs/architecture.md, "Error classification").
const ErrorClassIdentity = "identity"

// Error is returned by File.Token when the identity token cannot be used.
// Its message has the form "token: <path>: <reason>: <detail>" and never
// contains the token or any part of it.
type Error struct {
	// Reason is one of the Reason constants.
	Reason string
	// Path is the token file's path (the program of a Command, the issuer
	// of a URL).
	Path string
	// Workload is the workload subject of a Command made by Command.For,
	// "" otherwise.
	Workload string
	// Err is the underlying cause (an *fs.PathError, an error from
	// ParseClaims, ...), never one that quotes the token.
	Err error
}

// Error returns "token: <path>: <reason>: <detail>", or "token: <path>
// (workload <subject>): <reason>: <detail>" for a workload's Command.
func (e *Error) Error() string {
	path := e.Path
	if e.Workload != "" {
		path += " (workload " + e.Workload + ")"
	}
	if e.Err == nil {
		return fmt.Sprintf("token: %s: %s", path, e.Reason)
	}
	return fmt.Sprintf("token: %s: %s: %v", path, e.Reason, e.Err)
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
// errors, and for changing (the agent is half-way through a rewrite). Either
// way the caller keeps retrying with backoff; Permanent only decides how
// loudly the failure is reported.
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

// Timing of the defence of File and X509 against files rewritten in place.
const (
	// SettleTime: a file modified less than this long ago may still be
	// being written. Its content is confirmed by a second identical read,
	// and content that looks cut short is not used until the file has been
	// left alone this long.
	SettleTime = 10 * time.Second
	// ChangeWait bounds the time one Token call spends re-reading a file
	// that is being rewritten before it gives up with ReasonChanging.
	ChangeWait = 200 * time.Millisecond
	// firstPause and maxPause are the pauses between such re-reads.
	firstPause = 10 * time.Millisecond
	maxPause   = 50 * time.Millisecond
)

// File is a token source backed by a file that an external agent rewrites
// on rotation. It is safe for concurrent use.
//
// Agents should replace the file atomically (write a temporary file in the
// same directory, then rename it over the old one). Some truncate and
// rewrite it in place instead, and a read can then see nothing, the start of
// the new token, or (when the read spans a write) a splice of old and new.
// File never returns such a torn token, which would otherwise reach STS.
// Every read:
//
//   - reads the whole file in one call between two fstat calls on the open
//     descriptor, and counts the read as torn when device, inode, size,
//     mtime or mode differ between the two or the bytes read are not the
//     size;
//   - when the file was modified less than SettleTime ago, reads it again
//     after a pause and uses the content only when two reads in a row are
//     identical (a write within one timestamp tick of the fstat calls does
//     not change what they report);
//   - when the file was modified less than SettleTime ago and holds what an
//     interrupted write leaves (an empty file, the start of a JWT that does
//     not parse yet, a JWT whose signature is not as long as its algorithm
//     makes them: a signature cut mid-way still decodes), keeps re-reading.
//
// The re-reads pause 10 ms, doubling up to 50 ms, for at most ChangeWait in
// all; then Token fails with ReasonChanging, a transient error: the caller
// retries later, by which time the writer has finished. Once a file has been
// left alone for SettleTime its content is final: a malformed or empty file
// is refused as such (permanent), and a token with an unusual signature
// length (an RSA key of an odd size) is used (logged at Info). A torn token
// gets through only when its writer stopped for longer than SettleTime, or
// for longer than the pauses exactly where the signature has a length its
// algorithm also produces (a 4096-bit RSA signature cut at 256 or 384 bytes),
// or when a writer overwrites the file in place without truncating it and
// stops for longer than the pauses inside the signature of a token of the
// same length (the old and new halves splice into a well-formed token). STS
// refuses such a token and the exchange retries once with a fresh read; a
// size change under an unchanged mtime also counts as a write (see
// staleMtimes).
type File struct {
	path    string
	maxSize int64
	now     func() time.Time
	log     *zap.Logger
	stale   staleMtimes // the file's size changed but not its mtime

	reads  *prometheus.CounterVec // nil without a registerer
	expiry prometheus.Gauge
}

// NewFile returns a File reading path. The file need not exist yet: it is
// read only by Token. When it exists, NewFile logs CheckFileMode's warning
// (a token file readable or writable by group or others, owned by another
// user, in a directory others may write) once at Warn. log may be nil (no logging). reg may be nil (no
// metrics); otherwise these metrics are registered on it:
//
//	imdsproxy_identity_token_reads_total{result}         counter; result is "ok" or a Reason
//	imdsproxy_identity_token_expiry_timestamp_seconds   gauge; exp of the last good token, Unix seconds
//
// NewFile fails when path is empty or MaxSize is negative; it panics when
// reg already holds these metrics (two token sources on one registerer).
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
		factory := promauto.With(reg)
		f.reads = factory.NewCounterVec(prometheus.CounterOpts{
			Name: "imdsproxy_identity_token_reads_total",
			Help: "Reads of the identity token file, by result (ok or the reason it was refused).",
		}, []string{"result"})
		f.expiry = factory.NewGauge(prometheus.GaugeOpts{
			Name: "imdsproxy_identity_token_expiry_timestamp_seconds",
			Help: "Expiry (exp claim) of the last identity token read successfully, in Unix seconds.",
		})
		f.reads.WithLabelValues("ok")
		for _, r := range reasons {
			f.reads.WithLabelValues(r)
		}
	}
	if w, err := CheckFileMode(path); err == nil && w != "" {
		log.Warn("identity token file permissions", zap.String("path", path), zap.String("warning", w))
	}
	return f, nil
}

// Path returns the file's path.
func (f *File) Path() string { return f.path }

// Token reads the file (on every call, so rotation is picked up), trims
// surrounding whitespace, checks the JWT shape with ParseClaims and refuses a
// token whose exp is not after now. A file being rewritten in place is
// re-read for up to ChangeWait (see File). Errors are *Error, or ctx's error
// when ctx ends during a pause between re-reads (an already cancelled ctx
// returns its error without reading).
func (f *File) Token(ctx context.Context) (string, error) {
	if err := ctx.Err(); err != nil {
		return "", err
	}
	tok, claims, err := f.read(ctx)
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

// read returns the file's token once it is known not to be torn (see File).
// A recently modified file is read a second time through the same
// descriptor after a pause: an inode no one is writing reads the same, so a
// file the agent replaces atomically (write a temporary file, rename it)
// passes at once however often it is replaced, while one rewritten in place
// is read again from its path until two reads of one inode agree.
func (f *File) read(ctx context.Context) (string, Claims, error) {
	rr := newRereads()
	for {
		fh, snap, err := openSnapshot(f.path, f.maxSize, ReasonTooLarge)
		if err != nil {
			return "", Claims{}, err
		}
		tok, claims, partial, verr := f.judge(snap.content)
		age, young := settling(snap.mtime)
		young = f.stale.young(snap.stamp) || young
		var why string
		switch {
		case snap.changed:
			why = "it changed while it was read"
		case young && partial != "":
			why = fmt.Sprintf("%s, and it was modified %v ago", partial, age.Round(time.Millisecond))
		case young:
			more, err := rr.wait(ctx)
			if err != nil || !more {
				fh.Close()
				return "", Claims{}, f.changing(err, fmt.Sprintf("it was modified %v ago and was being written", age.Round(time.Millisecond)), rr)
			}
			again, err := rereadSnapshot(fh, f.path, f.maxSize, ReasonTooLarge)
			fh.Close()
			if err == nil && !again.changed && again.stamp == snap.stamp && bytes.Equal(again.content, snap.content) {
				return tok, claims, verr
			}
			why = fmt.Sprintf("it was modified %v ago and two reads of it differed", age.Round(time.Millisecond))
			more, err = rr.wait(ctx)
			if err != nil || !more {
				return "", Claims{}, f.changing(err, why, rr)
			}
			continue
		default:
			fh.Close()
			if partial != "" && verr == nil {
				f.log.Info("identity token with an unusual signature length used: the file has not changed for a while",
					zap.String("path", f.path), zap.String("detail", partial), zap.Duration("unchanged_for", age.Round(time.Second)))
			}
			return tok, claims, verr
		}
		fh.Close()
		more, err := rr.wait(ctx)
		if err != nil || !more {
			return "", Claims{}, f.changing(err, why, rr)
		}
	}
}

// changing is the error of a file still being rewritten after ChangeWait
// (or ctx's error, when err is one).
func (f *File) changing(err error, why string, rr *rereads) error {
	if err != nil {
		return err
	}
	return f.fail(ReasonChanging, fmt.Errorf(
		"the file is being rewritten: %s (%s); the token agent should replace it atomically (write a temporary file, rename it)",
		why, rr))
}

// settling returns how long ago a file was modified (mtime) and whether
// that is within SettleTime, so that the file may still be being written.
// An mtime more than SettleTime in the future (a clock step) does not count
// as recent.
func settling(mtime time.Time) (age time.Duration, young bool) {
	age = time.Since(mtime)
	return age, age < SettleTime && age > -SettleTime
}

// staleMtimes catches files whose mtime lags their content: a reader can see
// a truncate's new size before its new mtime (stat does not take the
// inode's lock, and ext4 sets the times after it has freed the blocks), so
// a file being rewritten in place can look empty yet unmodified for years.
// When a file's size or inode changed since the previous read while its
// mtime did not, the mtime is stale, and the file counts as modified now
// (on the monotonic clock) for SettleTime. Safe for concurrent use.
type staleMtimes struct {
	mu    sync.Mutex
	last  []fileStamp
	stale time.Time // monotonic; zero until a stale mtime was seen
}

// young records stamps (one per file, in a fixed order) and reports whether
// a stale mtime was seen within the last SettleTime, this read included.
func (w *staleMtimes) young(stamps ...fileStamp) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	if len(w.last) == len(stamps) {
		for i, st := range stamps {
			old := w.last[i]
			if st.mtime.Equal(old.mtime) && (st.size != old.size || st.ino != old.ino || st.dev != old.dev) {
				w.stale = time.Now()
			}
		}
	}
	w.last = append(w.last[:0], stamps...)
	return !w.stale.IsZero() && time.Since(w.stale) < SettleTime
}

// rereads paces the re-reads of files being rewritten in place: pauses of
// firstPause doubling up to maxPause, for at most ChangeWait in all. It
// counts the reads; its String describes them for an error message. Not
// safe for concurrent use.
type rereads struct {
	start time.Time
	pause time.Duration
	reads int
}

func newRereads() *rereads {
	return &rereads{start: time.Now(), pause: firstPause, reads: 1}
}

// wait pauses before the next read. It returns false, without pausing,
// when that pause would take the reads past ChangeWait, and ctx's error
// when ctx ends during the pause.
func (r *rereads) wait(ctx context.Context) (bool, error) {
	if time.Since(r.start)+r.pause > ChangeWait {
		return false, nil
	}
	t := time.NewTimer(r.pause)
	select {
	case <-ctx.Done():
		t.Stop()
		return false, ctx.Err()
	case <-t.C:
	}
	r.pause = min(2*r.pause, maxPause)
	r.reads++
	return true, nil
}

// String returns "<n> reads in <elapsed>".
func (r *rereads) String() string {
	return fmt.Sprintf("%d reads in %v", r.reads, time.Since(r.start).Round(time.Millisecond))
}

// fileSnapshot is one read of a file.
type fileSnapshot struct {
	content []byte
	mtime   time.Time
	stamp   fileStamp // of the file after the read
	changed bool      // the file changed while it was read
}

// readSnapshot reads the whole of the regular file at path, of at most
// maxSize bytes, between two fstat calls on the open descriptor (see File).
// Its errors are *Error naming path, with the reason missing, unreadable or
// (more than maxSize bytes) tooLarge; they are definitive: no re-read
// changes them.
func readSnapshot(path string, maxSize int64, tooLarge string) (fileSnapshot, error) {
	fh, snap, err := openSnapshot(path, maxSize, tooLarge)
	if err != nil {
		return fileSnapshot{}, err
	}
	fh.Close()
	return snap, nil
}

// openSnapshot is readSnapshot keeping the descriptor open, so that the
// same file can be read again (rereadSnapshot) whatever replaces it at path
// meanwhile. The caller closes it.
func openSnapshot(path string, maxSize int64, tooLarge string) (*os.File, fileSnapshot, error) {
	fail := func(reason string, err error) (*os.File, fileSnapshot, error) {
		return nil, fileSnapshot{}, &Error{Reason: reason, Path: path, Err: err}
	}
	// O_NONBLOCK keeps open(2) from blocking on a FIFO without a writer; it
	// has no effect on regular files, and anything else is refused below.
	fh, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return fail(ReasonMissing, pathless(err))
		}
		return fail(ReasonUnreadable, pathless(err))
	}
	snap, err := rereadSnapshot(fh, path, maxSize, tooLarge)
	if err != nil {
		fh.Close()
		return nil, fileSnapshot{}, err
	}
	return fh, snap, nil
}

// rereadSnapshot reads the whole of the open file fh from its start,
// between two fstat calls, with readSnapshot's checks and errors.
func rereadSnapshot(fh *os.File, path string, maxSize int64, tooLarge string) (fileSnapshot, error) {
	fail := func(reason string, err error) (fileSnapshot, error) {
		return fileSnapshot{}, &Error{Reason: reason, Path: path, Err: err}
	}
	before, err := fh.Stat()
	if err != nil {
		return fail(ReasonUnreadable, pathless(err))
	}
	if !before.Mode().IsRegular() {
		return fail(ReasonUnreadable, fmt.Errorf("not a regular file (%s)", fileType(before.Mode())))
	}
	if before.Size() > maxSize {
		return fail(tooLarge, fmt.Errorf("%d bytes, limit %d", before.Size(), maxSize))
	}
	// One byte more than the size, so that a file that grew meanwhile is
	// noticed; the files hold a few KiB, so this is one read(2).
	buf := make([]byte, before.Size()+1)
	n, err := fh.ReadAt(buf, 0)
	if err != nil && !errors.Is(err, io.EOF) {
		return fail(ReasonUnreadable, pathless(err))
	}
	after, err := fh.Stat()
	if err != nil {
		return fail(ReasonUnreadable, pathless(err))
	}
	if after.Size() > maxSize {
		return fail(tooLarge, fmt.Errorf("%d bytes, limit %d", after.Size(), maxSize))
	}
	st := stampOf(after)
	return fileSnapshot{
		content: buf[:n],
		mtime:   after.ModTime(),
		stamp:   st,
		changed: stampOf(before) != st || int64(n) != after.Size(),
	}, nil
}

// judge checks content as a token. partial, when not "", says why content
// looks like a write cut short; the content is then either refused by err
// (empty, malformed) or acceptable in itself (an unusual signature length).
func (f *File) judge(content []byte) (tok string, c Claims, partial string, err error) {
	if len(content) == 0 {
		return "", Claims{}, "the file is empty", f.fail(ReasonEmpty, errors.New("no token in file"))
	}
	tok = strings.TrimSpace(string(content))
	if tok == "" {
		return "", Claims{}, "", f.fail(ReasonEmpty, errors.New("no token in file"))
	}
	c, shape, perr := parseJWT(tok)
	if perr != nil {
		if jwtPrefix(tok) {
			partial = fmt.Sprintf("it holds no complete JWT (%v)", perr)
		}
		return "", Claims{}, partial, f.fail(ReasonMalformed, perr)
	}
	if now := f.now(); !c.Expiry.After(now) {
		return "", Claims{}, "", f.fail(ReasonExpired, fmt.Errorf("exp %s is not after now %s",
			c.Expiry.Format(time.RFC3339), now.UTC().Format(time.RFC3339)))
	}
	if ok, want := plausibleSignature(shape); !ok {
		partial = fmt.Sprintf("its %s signature is %d bytes, want %s", shape.alg, shape.sigLen, want)
	}
	return tok, c, partial, nil
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
