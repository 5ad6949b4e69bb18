package token

// X.509 identity (identity.x509: cert, key, chain) for IAM Roles Anywhere.

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/binary"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"sync"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promauto"
	"go.uber.org/zap"
)

// Reasons an X.509 identity could not be used, in addition to ReasonMissing
// and ReasonUnreadable (a file that does not exist or cannot be read) and
// ReasonChanging (the files are being rewritten; see X509). They are values
// of Error.Reason and of the result label of
// imdsproxy_identity_certificate_loads_total. All of them are permanent:
// only new files (or a fixed mode or clock) help. X509 reports them only
// for files left alone for SettleTime.
const (
	// ReasonCertInvalid: the certificate or chain file is not PEM
	// certificates (garbage, truncated, no CERTIFICATE block, bad DER, too large).
	ReasonCertInvalid = "cert_invalid"
	// ReasonCertExpired: the leaf certificate's NotAfter is before now.
	ReasonCertExpired = "cert_expired"
	// ReasonCertNotYetValid: the leaf certificate's NotBefore is after now.
	ReasonCertNotYetValid = "cert_not_yet_valid"
	// ReasonKeyInvalid: the key file is not one unencrypted PEM private key
	// in PKCS#8, PKCS#1 or SEC1 form.
	ReasonKeyInvalid = "key_invalid"
	// ReasonKeyUnsupported: the key is not RSA 2048..4096 bits or ECDSA
	// P-256/P-384.
	ReasonKeyUnsupported = "key_unsupported"
	// ReasonKeyPermissions: the key file is readable or writable by group or
	// others.
	ReasonKeyPermissions = "key_permissions"
	// ReasonKeyMismatch: the key is not the certificate's.
	ReasonKeyMismatch = "key_mismatch"
)

// x509Reasons lists every reason an X.509 load can fail with, to pre-create
// metric series.
var x509Reasons = []string{ReasonMissing, ReasonUnreadable, ReasonChanging, ReasonCertInvalid, ReasonCertExpired,
	ReasonCertNotYetValid, ReasonKeyInvalid, ReasonKeyUnsupported, ReasonKeyPermissions, ReasonKeyMismatch}

// x509Permanent reports whether reason is one of the X.509 reasons, all
// permanent (see Error.Permanent).
func x509Permanent(reason string) bool {
	switch reason {
	case ReasonCertInvalid, ReasonCertExpired, ReasonCertNotYetValid, ReasonKeyInvalid,
		ReasonKeyUnsupported, ReasonKeyPermissions, ReasonKeyMismatch:
		return true
	}
	return false
}

// maxPEMFile is the largest certificate, key or chain file accepted.
const maxPEMFile = 1 << 20

// RSA key sizes accepted, in bits.
const (
	minRSABits = 2048
	maxRSABits = 4096
)

// X509Options tunes an X509. The zero value is usable.
type X509Options struct {
	// Now returns the current time for the validity checks; nil means time.Now.
	Now func() time.Time
}

// X509 is the host's X.509 identity backed by a certificate file, a private
// key file and an optional chain file that an external agent rewrites on
// rotation. Every X509 call stats the files (cheap) and reloads and
// re-validates them when any changed (device, inode, size, mtime or mode),
// so rotation is picked up without a restart. It is safe for concurrent use.
//
// The files need not exist when the daemon starts: a certificate agent
// (SPIFFE, ACME, …) often writes them only after it has started itself.
// Like File, X509 then reports a transient error and loads the files on the
// first call after they appear.
//
// Agents should replace each file atomically (write a temporary file, rename
// it). Some rewrite them in place, or write the certificate and the key one
// after the other, so that a load can see a torn PEM file, or a new
// certificate with the old key. X509 applies File's discipline to every
// load: each file is read whole between two fstat calls (a file that changed
// meanwhile is read again); while any file was modified less than SettleTime
// ago, the files are used only when two loads in a row, at least 10 ms
// apart, read identical bytes that validate, and files that do not validate
// are re-read for at most ChangeWait. The key is always checked against the
// certificate's public key, so a mismatched pair is never returned. What is
// transient and what permanent:
//
//   - missing (a file does not exist yet) and unreadable (it cannot be
//     opened or read, or is not a regular file) are transient
//     (Error.Permanent is false): an agent or an operator fixes them without
//     touching imdsproxy. NewX509 accepts missing files, and only those:
//     a path that exists but is a directory, a FIFO or unreadable is a
//     configuration mistake at start-up and fails NewX509.
//   - changing (transient): a file changed during every read for
//     ChangeWait, or files modified less than SettleTime ago do not
//     validate. Meanwhile the identity loaded last, if any and still
//     within its validity, stays in use: X509 returns it (and the load is
//     counted as changing); without one, X509 returns the error. NewX509
//     accepts it, like missing.
//   - every reason about the content (cert_invalid, cert_expired,
//     cert_not_yet_valid, key_invalid, key_unsupported, key_permissions,
//     key_mismatch) of files left alone for SettleTime is permanent: only
//     new files, a fixed mode or a fixed clock help, and the identity loaded
//     before is no longer used. NewX509 fails on them for the files that
//     exist (they are read in the order certificate, chain, key, up to the
//     first missing).
//
// Either way X509 keeps retrying on every call; Permanent only decides how
// loudly a caller reports the failure (in imdsproxy: /readyz at once). A
// call holds X509's lock while it re-reads files being rewritten, so
// concurrent calls wait for it (at most ChangeWait each).
type X509 struct {
	certPath, keyPath, chainPath string
	now                          func() time.Time
	log                          *zap.Logger

	mu     sync.Mutex
	cached *x509Identity // last good identity, nil before the first
	stale  staleMtimes   // a file's size changed but not its mtime

	loads  *prometheus.CounterVec // nil without a registerer
	expiry prometheus.Gauge
}

// x509Identity is one validated load.
type x509Identity struct {
	fp     [3]fileStamp // by certFile, keyFile, chainFile
	digest [sha256.Size]byte
	// settled: every file had been left alone for SettleTime when read, so
	// unchanged stamps mean unchanged files. Stamps of a file modified
	// within a timestamp tick of the load may not change when its content
	// does, so until then the files are re-read and compared by digest.
	settled bool
	leaf    *x509.Certificate
	chain   []*x509.Certificate
	signer  crypto.Signer
}

// fileStamp identifies one version of a file.
type fileStamp struct {
	dev, ino uint64
	size     int64
	mtime    time.Time
	mode     fs.FileMode
}

// NewX509 returns an X509 reading certPath, keyPath and chainPath (chainPath
// may be ""). It loads and validates the files once, so that a bad
// configuration is reported at start-up; that error is an *Error. Files that
// do not exist yet, or are being written (ReasonChanging), are not an error:
// they are logged (Warn) and loaded by the first X509 call after they
// appear or settle (see X509 for what fails at once).
// log may be nil (no logging). reg may be nil (no metrics); otherwise these
// metrics are registered on it:
//
//	imdsproxy_identity_certificate_loads_total{result}             counter; result is "ok" or a Reason
//	imdsproxy_identity_certificate_expiry_timestamp_seconds       gauge; NotAfter of the loaded leaf, Unix seconds
func NewX509(certPath, keyPath, chainPath string, opts X509Options, log *zap.Logger, reg prometheus.Registerer) (*X509, error) {
	if certPath == "" || keyPath == "" {
		return nil, errors.New("token: x509: empty certificate or key path")
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if log == nil {
		log = zap.NewNop()
	}
	x := &X509{certPath: certPath, keyPath: keyPath, chainPath: chainPath, now: opts.Now, log: log}
	if reg != nil {
		factory := promauto.With(reg)
		x.loads = factory.NewCounterVec(prometheus.CounterOpts{
			Name: "imdsproxy_identity_certificate_loads_total",
			Help: "Loads of the X.509 identity files (on start and after every change), by result (ok or the reason they were refused).",
		}, []string{"result"})
		x.expiry = factory.NewGauge(prometheus.GaugeOpts{
			Name: "imdsproxy_identity_certificate_expiry_timestamp_seconds",
			Help: "NotAfter of the X.509 identity certificate loaded last, in Unix seconds.",
		})
		x.loads.WithLabelValues("ok")
		for _, r := range x509Reasons {
			x.loads.WithLabelValues(r)
		}
	}
	if _, _, _, err := x.X509(context.Background()); err != nil {
		var te *Error
		switch {
		case errors.As(err, &te) && te.Reason == ReasonMissing:
			x.log.Warn("X.509 identity files not there yet; they are loaded when they appear",
				zap.String("path", te.Path), zap.Error(te.Err))
		case errors.As(err, &te) && te.Reason == ReasonChanging:
			x.log.Warn("X.509 identity files are being written; they are loaded when they settle",
				zap.String("path", te.Path), zap.Error(te.Err))
		default:
			return nil, err
		}
	}
	return x, nil
}

// Paths returns the certificate, key and chain paths.
func (x *X509) Paths() (cert, key, chain string) { return x.certPath, x.keyPath, x.chainPath }

// X509 returns the leaf certificate, the intermediates of the chain (the
// extra certificates of the certificate file, then those of the chain file;
// possibly none) and the private key. It reloads the files when they changed
// since the last good load; when the new files do not validate it returns
// the error (and retries the load on the next call), except while they are
// being rewritten (ReasonChanging, see X509): then it returns the identity
// loaded last, if it is still valid. The identity returned is re-checked
// against the clock on every call. Errors are *Error, or ctx's error when
// ctx ends while files being rewritten are re-read; they never contain key
// material. An already cancelled ctx returns its error.
func (x *X509) X509(ctx context.Context) (*x509.Certificate, []*x509.Certificate, crypto.Signer, error) {
	if err := ctx.Err(); err != nil {
		return nil, nil, nil, err
	}
	x.mu.Lock()
	defer x.mu.Unlock()
	id := x.cached
	if id == nil || !id.settled || !x.unchanged(id) {
		loaded, fresh, err := x.load(ctx, id)
		var te *Error
		switch {
		case err == nil:
			x.cached, id = loaded, loaded
			if !fresh {
				break // the same files as the cached identity
			}
			x.count("ok")
			if x.expiry != nil {
				x.expiry.Set(float64(loaded.leaf.NotAfter.Unix()))
			}
			x.log.Info("X.509 identity loaded", zap.String("cert", x.certPath),
				zap.String("serial", loaded.leaf.SerialNumber.String()),
				zap.String("subject", loaded.leaf.Subject.String()),
				zap.Time("not_after", loaded.leaf.NotAfter), zap.Int("intermediates", len(loaded.chain)),
				zap.Bool("settled", loaded.settled))
		case !errors.As(err, &te):
			return nil, nil, nil, err // ctx ended
		case te.Reason == ReasonChanging && id != nil && x.checkValidity(id.leaf) == nil:
			x.count(te.Reason)
			x.log.Info("X.509 identity files are being rewritten; the identity loaded before stays in use",
				zap.String("path", te.Path), zap.String("serial", id.leaf.SerialNumber.String()), zap.Error(te.Err))
		default:
			x.count(te.Reason)
			x.log.Warn("X.509 identity refused", zap.String("reason", te.Reason), zap.String("path", te.Path), zap.Error(te.Err))
			return nil, nil, nil, err
		}
	}
	if err := x.checkValidity(id.leaf); err != nil {
		return nil, nil, nil, err
	}
	return id.leaf, id.chain, id.signer, nil
}

func (x *X509) count(result string) {
	if x.loads != nil {
		x.loads.WithLabelValues(result).Inc()
	}
}

// unchanged reports whether every file still has the stamp of id.
func (x *X509) unchanged(id *x509Identity) bool {
	for i, p := range []string{x.certPath, x.keyPath, x.chainPath} {
		if p == "" {
			continue
		}
		st, err := os.Stat(p)
		if err != nil || stampOf(st) != id.fp[i] {
			return false
		}
	}
	return true
}

func stampOf(st fs.FileInfo) fileStamp {
	s := fileStamp{size: st.Size(), mtime: st.ModTime(), mode: st.Mode()}
	if sys, ok := st.Sys().(*syscall.Stat_t); ok {
		s.dev, s.ino = uint64(sys.Dev), sys.Ino //nolint:unconvert // Dev is not uint64 everywhere
	}
	return s
}

func (x *X509) checkValidity(leaf *x509.Certificate) error {
	now := x.now()
	if now.Before(leaf.NotBefore) {
		return &Error{Reason: ReasonCertNotYetValid, Path: x.certPath, Err: fmt.Errorf(
			"certificate NotBefore %s is after now %s (check the host clock)",
			leaf.NotBefore.UTC().Format(time.RFC3339), now.UTC().Format(time.RFC3339))}
	}
	if now.After(leaf.NotAfter) {
		return &Error{Reason: ReasonCertExpired, Path: x.certPath, Err: fmt.Errorf(
			"certificate expired: NotAfter %s is before now %s",
			leaf.NotAfter.UTC().Format(time.RFC3339), now.UTC().Format(time.RFC3339))}
	}
	return nil
}

// load reads and validates the files, with the defence against files
// rewritten in place described at X509. cached is the identity loaded last
// (nil if none): when the files hold exactly what it was loaded from, load
// returns a copy of it with the current stamps and fresh false, without
// parsing them again. Errors are *Error, or ctx's error.
func (x *X509) load(ctx context.Context, cached *x509Identity) (id *x509Identity, fresh bool, err error) {
	rr := newRereads()
	var prev *[sha256.Size]byte // the digest of the previous pass, if any
	for {
		p := x.readFiles()
		recent := x.stale.young(p.fp[:]...)
		if cached != nil && p.readErr == nil && p.changed == "" && p.digest == cached.digest {
			clear(p.content[keyFile]) // the private key, not needed again
			_, young := settling(p.mtime)
			young = recent || young
			same := *cached
			same.fp, same.settled = p.fp, !young
			return &same, false, nil
		}
		id, err := x.validate(&p)
		clear(p.content[keyFile]) // the private key
		if err != nil && err == p.readErr {
			return nil, false, err // definitive: missing, unreadable, too large
		}
		age, young := settling(p.mtime)
		young = recent || young
		var why, path string
		var te *Error
		switch {
		case p.changed != "":
			why, path = "it changed while it was read", p.changed
		case young && errors.As(err, &te):
			why, path = fmt.Sprintf("%s: %v, and the files were modified %v ago", te.Reason, te.Err, age.Round(time.Millisecond)), te.Path
		case young && (prev == nil || *prev != p.digest):
			why, path = fmt.Sprintf("the files were modified %v ago and two reads in a row differed", age.Round(time.Millisecond)), p.youngest
		case err != nil:
			return nil, false, err
		default:
			id.fp, id.digest, id.settled = p.fp, p.digest, !young
			return id, true, nil
		}
		prev = &p.digest
		more, err := rr.wait(ctx)
		if err != nil {
			return nil, false, err
		}
		if !more {
			return nil, false, &Error{Reason: ReasonChanging, Path: path, Err: fmt.Errorf(
				"the X.509 identity files are being rewritten: %s (%s); the certificate agent should replace each file atomically (write a temporary file, rename it)",
				why, rr)}
		}
	}
}

// Indexes of the files in x509Pass and x509Identity.fp.
const (
	certFile = iota
	keyFile
	chainFile
)

// x509Pass is one read of the files.
type x509Pass struct {
	content [3][]byte    // by certFile, keyFile, chainFile; nil when not read
	fp      [3]fileStamp // of the files read
	read    [3]bool      // which files were read
	readErr error        // why the next file could not be read (missing, unreadable, too large)
	digest  [sha256.Size]byte
	mtime   time.Time // the latest mtime of the files read
	// youngest is the path of the file with that mtime; changed that of a
	// file that changed while it was read, if any.
	youngest, changed string
}

// readFiles reads the certificate, chain and key files, in that order, up to
// the first that cannot be read.
func (x *X509) readFiles() x509Pass {
	var p x509Pass
	h := sha256.New()
	for _, f := range []struct {
		i              int
		path, tooLarge string
	}{{certFile, x.certPath, ReasonCertInvalid}, {chainFile, x.chainPath, ReasonCertInvalid}, {keyFile, x.keyPath, ReasonKeyInvalid}} {
		if f.path == "" {
			continue
		}
		snap, err := readSnapshot(f.path, maxPEMFile, f.tooLarge)
		if err != nil {
			p.readErr = err
			break
		}
		p.content[f.i], p.fp[f.i], p.read[f.i] = snap.content, snap.stamp, true
		if snap.changed && p.changed == "" {
			p.changed = f.path
		}
		if p.youngest == "" || snap.mtime.After(p.mtime) {
			p.mtime, p.youngest = snap.mtime, f.path
		}
		// Each file as its index, mode, length and content, so that no two
		// different sets of files are hashed alike.
		var hdr [13]byte
		hdr[0] = byte(f.i)
		binary.BigEndian.PutUint32(hdr[1:], uint32(snap.stamp.mode))
		binary.BigEndian.PutUint64(hdr[5:], uint64(len(snap.content)))
		h.Write(hdr[:])
		h.Write(snap.content)
	}
	h.Sum(p.digest[:0])
	return p
}

// validate checks the files of p in the order certificate, chain, key, and
// returns p.readErr when it gets to the file that could not be read. The
// returned identity lacks fp, digest and settled.
func (x *X509) validate(p *x509Pass) (*x509Identity, error) {
	if !p.read[certFile] {
		return nil, p.readErr
	}
	id := &x509Identity{}
	certs, err := parseCertificates(p.content[certFile])
	if err != nil {
		return nil, &Error{Reason: ReasonCertInvalid, Path: x.certPath, Err: err}
	}
	id.leaf, id.chain = certs[0], certs[1:]
	if x.chainPath != "" {
		if !p.read[chainFile] {
			return nil, p.readErr
		}
		more, err := parseCertificates(p.content[chainFile])
		if err != nil {
			return nil, &Error{Reason: ReasonCertInvalid, Path: x.chainPath, Err: fmt.Errorf("chain: %w", err)}
		}
		id.chain = append(id.chain, more...)
	}
	if err := x.checkValidity(id.leaf); err != nil {
		return nil, err
	}

	if !p.read[keyFile] {
		return nil, p.readErr
	}
	if perm := p.fp[keyFile].mode.Perm(); perm&0o077 != 0 {
		return nil, &Error{Reason: ReasonKeyPermissions, Path: x.keyPath, Err: fmt.Errorf(
			"private key file mode %04o is readable or writable by group or others; run chmod 600 %s", uint32(perm), x.keyPath)}
	}
	signer, err := parsePrivateKey(p.content[keyFile])
	if err != nil {
		var te *Error
		if errors.As(err, &te) {
			te.Path = x.keyPath
			return nil, te
		}
		return nil, &Error{Reason: ReasonKeyInvalid, Path: x.keyPath, Err: err}
	}
	// The pair is checked on every load: a certificate and key written one
	// after the other are never returned mismatched.
	if !publicKeysEqual(signer.Public(), id.leaf.PublicKey) {
		return nil, &Error{Reason: ReasonKeyMismatch, Path: x.keyPath, Err: fmt.Errorf(
			"private key (%s) does not match the public key of certificate %s (serial %s, %s)",
			describeKey(signer.Public()), x.certPath, id.leaf.SerialNumber, describeKey(id.leaf.PublicKey))}
	}
	id.signer = signer
	return id, nil
}

// parseCertificates returns every CERTIFICATE block of b, in order. Other
// block types are skipped; a truncated or malformed block, or no
// certificate at all, is an error. Errors never quote the input.
func parseCertificates(b []byte) ([]*x509.Certificate, error) {
	var certs []*x509.Certificate
	rest := b
	for {
		var block *pem.Block
		block, rest = pem.Decode(rest)
		if block == nil {
			break
		}
		if block.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("PEM block %d is not a valid X.509 certificate: %v", len(certs)+1, err)
		}
		certs = append(certs, c)
	}
	if bytes.Contains(rest, []byte("-----BEGIN")) {
		return nil, fmt.Errorf("truncated or malformed PEM block after %d certificate(s)", len(certs))
	}
	if len(certs) == 0 {
		return nil, errors.New("no PEM CERTIFICATE block found")
	}
	return certs, nil
}

// parsePrivateKey decodes the one private key of b (PKCS#8, PKCS#1 or SEC1,
// unencrypted; an "EC PARAMETERS" block is skipped) and checks its type and
// size. Errors are *Error (Path unset) and never quote the input or the
// parser's error (which could echo key bytes).
func parsePrivateKey(b []byte) (crypto.Signer, error) {
	invalid := func(format string, args ...any) (crypto.Signer, error) {
		return nil, &Error{Reason: ReasonKeyInvalid, Err: fmt.Errorf(format, args...)}
	}
	var key *pem.Block
	rest := b
	for {
		var block *pem.Block
		block, rest = pem.Decode(rest)
		if block == nil {
			break
		}
		switch block.Type {
		case "EC PARAMETERS":
			continue
		case "ENCRYPTED PRIVATE KEY":
			return invalid("the private key is encrypted (PKCS#8 ENCRYPTED PRIVATE KEY); store it unencrypted with mode 0600")
		}
		if _, ok := block.Headers["Proc-Type"]; ok || block.Headers["DEK-Info"] != "" {
			return invalid("the private key is encrypted (legacy PEM encryption); store it unencrypted with mode 0600")
		}
		if key != nil {
			return invalid("more than one PEM block (%s, %s); the key file must hold one private key", key.Type, block.Type)
		}
		key = block
	}
	if bytes.Contains(rest, []byte("-----BEGIN")) {
		return invalid("truncated or malformed PEM block")
	}
	if key == nil {
		return invalid("no PEM private key block found")
	}
	var parsed any
	var err error
	switch key.Type {
	case "PRIVATE KEY":
		parsed, err = x509.ParsePKCS8PrivateKey(key.Bytes)
	case "RSA PRIVATE KEY":
		parsed, err = x509.ParsePKCS1PrivateKey(key.Bytes)
	case "EC PRIVATE KEY":
		parsed, err = x509.ParseECPrivateKey(key.Bytes)
	default:
		return invalid("PEM block type %q is not PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY", key.Type)
	}
	if err != nil {
		return invalid("PEM block %q does not hold a valid key of that format", key.Type)
	}
	unsupported := func(format string, args ...any) (crypto.Signer, error) {
		return nil, &Error{Reason: ReasonKeyUnsupported, Err: fmt.Errorf(
			format+"; Roles Anywhere keys must be RSA 2048..4096 bits or ECDSA P-256/P-384", args...)}
	}
	switch k := parsed.(type) {
	case *rsa.PrivateKey:
		if bits := k.N.BitLen(); bits < minRSABits || bits > maxRSABits {
			return unsupported("found an RSA key of %d bits", bits)
		}
		return k, nil
	case *ecdsa.PrivateKey:
		if k.Curve != elliptic.P256() && k.Curve != elliptic.P384() {
			return unsupported("found an ECDSA key on curve %s", k.Curve.Params().Name)
		}
		return k, nil
	case ed25519.PrivateKey:
		return unsupported("found an Ed25519 key")
	default:
		return unsupported("found a %T key", parsed)
	}
}

func publicKeysEqual(a, b crypto.PublicKey) bool {
	eq, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && eq.Equal(b)
}

// describeKey names a public key's type and size, e.g. "RSA 2048 bits".
func describeKey(pub crypto.PublicKey) string {
	switch k := pub.(type) {
	case *rsa.PublicKey:
		return fmt.Sprintf("RSA %d bits", k.N.BitLen())
	case *ecdsa.PublicKey:
		return "ECDSA " + k.Curve.Params().Name
	case ed25519.PublicKey:
		return "Ed25519"
	}
	return fmt.Sprintf("%T", pub)
}
