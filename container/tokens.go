package container

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"io/fs"
	mrand "math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
)

// The token files: <token_dir>/<workload>/token, where <workload> is the
// unit of a unit entry and uid-<n> for a uid entry. Each token is 32 random
// bytes, base64url without padding (43 characters, no newline: SDKs send
// the file's content verbatim and refuse a CR or LF).
const (
	tokenFileName = "token"
	tokenBytes    = 32
	// MaxTokenLen bounds the Authorization header value compared.
	MaxTokenLen = 256
	// maxRetired bounds the replaced tokens of a workload still accepted
	// (rotations in a row within the overlap).
	maxRetired = 4
	dirMode    = 0o711 // traversable, not listable
	fileMode   = 0o400
	tempPrefix = ".token-"
)

// dirName is the directory of a workload ID (access.Workload.ID).
func dirName(id string) string {
	if u, ok := strings.CutPrefix(id, "uid:"); ok {
		return "uid-" + u
	}
	return id
}

// Tokens are the workloads' authorization tokens: one current token per
// workload, written to its token file readable only by the workload's uid,
// and the tokens it replaced, still accepted until RotateOverlap after they
// were replaced. Create it with NewTokens. Lookup is lock-free and safe for
// concurrent use with Sync and Rotate, which are serialised.
type Tokens struct {
	dir      string
	overlap  atomic.Int64 // time.Duration
	interval atomic.Int64 // time.Duration
	log      *zap.Logger
	now      func() time.Time
	random   io.Reader
	euid     int
	m        *metrics

	mu      sync.Mutex // serialises Sync and Rotate; guards state
	state   map[string]*workloadTokens
	table   atomic.Pointer[[]tokenEntry] // every accepted token
	rotated atomic.Int64                 // unix nanos of the last rotation
}

type workloadTokens struct {
	owner   int
	current [sha256.Size]byte
	retired []tokenEntry // newest first
}

// tokenEntry is one accepted token: the SHA-256 of its value, the workload
// and, for a replaced token, until when it is accepted.
type tokenEntry struct {
	sum   [sha256.Size]byte
	id    string
	until time.Time // zero: current
}

// NewTokens returns the tokens kept in dir (created, mode 0711, when
// missing; refused when others may write it or it is not the daemon's or
// root's), rotated every interval by Run, a replaced token accepted for
// overlap. It has no token until Sync. Its metrics are registered by New.
func NewTokens(dir string, interval, overlap time.Duration, log *zap.Logger) (*Tokens, error) {
	if log == nil {
		log = zap.NewNop()
	}
	if err := os.MkdirAll(dir, dirMode); err != nil {
		return nil, fmt.Errorf("container.token_dir: %w", err)
	}
	if err := checkDir(dir); err != nil {
		return nil, fmt.Errorf("container.token_dir: %w", err)
	}
	// Every workload must reach its own directory (a umask such as the
	// unit's 0077 leaves a new directory 0700).
	if st, err := os.Stat(dir); err == nil && st.Mode().Perm()&0o011 != 0o011 {
		if err := os.Chmod(dir, st.Mode().Perm()|0o011); err != nil {
			return nil, fmt.Errorf("container.token_dir: the workloads cannot reach their token files: %w", err)
		}
	}
	t := &Tokens{dir: dir, log: log, now: time.Now, random: rand.Reader, euid: os.Geteuid(), m: newMetrics(nil), state: map[string]*workloadTokens{}}
	t.SetSchedule(interval, overlap)
	t.table.Store(&[]tokenEntry{})
	return t, nil
}

// checkDir refuses a token directory someone else could write: a token
// file replaced by another user would be a token of theirs.
func checkDir(dir string) error {
	st, err := os.Lstat(dir)
	if err != nil {
		return err
	}
	if !st.IsDir() {
		return fmt.Errorf("%s is not a directory", dir)
	}
	if st.Mode().Perm()&0o022 != 0 {
		return fmt.Errorf("%s is writable by group or others (mode %v)", dir, st.Mode().Perm())
	}
	if uid, ok := fileUID(st); ok && uid != os.Geteuid() && uid != 0 {
		return fmt.Errorf("%s belongs to uid %d, not to the daemon or root", dir, uid)
	}
	return nil
}

// SetSchedule sets how often Run rotates the tokens and how long a replaced
// token is accepted (a reload); the overlap applies to tokens replaced from
// now on, the interval from the next rotation on.
func (t *Tokens) SetSchedule(interval, overlap time.Duration) {
	t.interval.Store(int64(interval))
	t.overlap.Store(int64(overlap))
}

// Schedule returns the rotation interval and overlap in use (SetSchedule's).
func (t *Tokens) Schedule() (interval, overlap time.Duration) {
	return time.Duration(t.interval.Load()), time.Duration(t.overlap.Load())
}

// wakeEvery bounds Run's sleeps: a changed interval, a wall-clock step and
// the end of an overlap are seen within it.
const wakeEvery = 10 * time.Second

// Run rotates every token at the interval of SetSchedule (±10% jitter,
// so hosts do not rotate in lockstep) and drops replaced tokens past their
// overlap, until ctx ends; it returns nil. Failures are logged (and
// counted) by Rotate.
func (t *Tokens) Run(ctx context.Context) error {
	last := t.now()
	next := jitter(time.Duration(t.interval.Load()))
	timer := time.NewTimer(wakeEvery)
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-timer.C:
		}
		if lr := t.LastRotation(); lr.After(last) {
			last = lr // rotated on demand meanwhile
		}
		if t.now().Sub(last) >= next {
			_ = t.Rotate()
			last, next = t.now(), jitter(time.Duration(t.interval.Load()))
		} else {
			t.Prune()
		}
		timer.Reset(wakeEvery)
	}
}

// jitter is d ±10%.
func jitter(d time.Duration) time.Duration {
	if d <= 0 {
		return d
	}
	return d - d/10 + time.Duration(mrand.Int64N(int64(d/5)+1))
}

// Sync makes the tokens those of the workloads of owners (workload ID →
// the uid its token file belongs to): a new workload gets a token and its
// file; a removed one loses its tokens at once and its directory; a
// workload whose owner changed gets a new token, and the old one is no
// longer accepted. It returns the first error writing a file (the other
// workloads are still synced; the workload whose file could not be written
// gets no token).
func (t *Tokens) Sync(owners map[string]int) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	var first error
	for id := range t.state {
		if _, ok := owners[id]; !ok {
			delete(t.state, id)
			if err := t.removeDir(dirName(id)); err != nil && first == nil {
				first = err
			}
			t.log.Info("workload token revoked; the workload is no longer configured", zap.String("workload", id))
		}
	}
	for _, id := range sortedKeys(owners) {
		owner := owners[id]
		if w, ok := t.state[id]; ok && w.owner == owner {
			continue
		}
		delete(t.state, id) // a new owner: the old token dies with the old file
		if err := t.issueLocked(id, owner, false); err != nil && first == nil {
			first = err
		}
	}
	first = errors.Join(first, t.removeStale())
	t.publishLocked()
	return first
}

// Rotate replaces every workload's token: the new one is accepted before
// its file is written, the old one stays accepted for the overlap, so a
// client that read the file just before never fails. It returns the first
// error writing a file (that workload keeps its current token).
func (t *Tokens) Rotate() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	var first error
	for _, id := range sortedKeys(t.state) {
		if err := t.issueLocked(id, t.state[id].owner, true); err != nil && first == nil {
			first = err
		}
	}
	t.rotated.Store(t.now().UnixNano())
	t.m.rotations.Inc()
	t.publishLocked()
	return first
}

// issueLocked mints a token for id and writes its file; with keepOld the
// current token is retired (accepted for the overlap) rather than dropped.
func (t *Tokens) issueLocked(id string, owner int, keepOld bool) error {
	var raw [tokenBytes]byte
	if _, err := io.ReadFull(t.random, raw[:]); err != nil {
		return fmt.Errorf("container: token for %s: %w", id, err)
	}
	tok := base64.RawURLEncoding.EncodeToString(raw[:])
	sum := sha256.Sum256([]byte(tok))
	w := t.state[id]
	if w == nil {
		w = &workloadTokens{owner: owner}
	}
	prev := *w
	if keepOld && w.current != ([sha256.Size]byte{}) {
		w.retired = append([]tokenEntry{{sum: w.current, id: id, until: t.now().Add(time.Duration(t.overlap.Load()))}}, w.retired...)
		if len(w.retired) > maxRetired {
			w.retired = w.retired[:maxRetired]
		}
	}
	w.current, w.owner = sum, owner
	t.state[id] = w
	// Accepted before the file shows it.
	t.publishLocked()
	if err := t.writeFile(dirName(id), tok, owner); err != nil {
		t.m.writeErrors.Inc()
		if prev.current == ([sha256.Size]byte{}) {
			delete(t.state, id)
		} else {
			*w = prev
		}
		t.publishLocked()
		t.log.Error("cannot write a workload's token file; it keeps its previous token", zap.String("workload", id), zap.Error(err))
		return err
	}
	return nil
}

// publishLocked rebuilds the table of accepted tokens.
func (t *Tokens) publishLocked() {
	now := t.now()
	var table []tokenEntry
	for id, w := range t.state {
		table = append(table, tokenEntry{sum: w.current, id: id})
		kept := w.retired[:0]
		for _, r := range w.retired {
			if now.Before(r.until) {
				kept = append(kept, r)
			}
		}
		w.retired = kept
		table = append(table, kept...)
	}
	t.table.Store(&table)
	t.m.tokens.Set(float64(len(table)))
}

// Prune drops replaced tokens past their overlap (Run calls it).
func (t *Tokens) Prune() {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.publishLocked()
}

// Lookup returns the workload whose token is tok, comparing with every
// accepted token in constant time (the SHA-256 of each), so that the time
// taken tells nothing of how close tok is to any token.
func (t *Tokens) Lookup(tok string) (id string, ok bool) {
	if tok == "" || len(tok) > MaxTokenLen {
		return "", false
	}
	sum := sha256.Sum256([]byte(tok))
	now := t.now()
	found := -1
	table := *t.table.Load()
	for i := range table {
		eq := subtle.ConstantTimeCompare(sum[:], table[i].sum[:])
		if eq == 1 && (table[i].until.IsZero() || now.Before(table[i].until)) {
			found = i
		}
	}
	if found < 0 {
		return "", false
	}
	return table[found].id, true
}

// LastRotation returns when every token was last replaced (zero: never
// since start).
func (t *Tokens) LastRotation() time.Time {
	if n := t.rotated.Load(); n != 0 {
		return time.Unix(0, n)
	}
	return time.Time{}
}

// Count returns the number of workloads with a token.
func (t *Tokens) Count() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.state)
}

// writeFile writes tok to <dir>/<name>/token atomically: a temporary file
// in the same directory, made read-only, flushed to disk, given to owner,
// then renamed over the old one, and the directory flushed. A reader sees
// the old token or the new one, never a part.
func (t *Tokens) writeFile(name, tok string, owner int) error {
	wdir := filepath.Join(t.dir, name)
	if err := os.Mkdir(wdir, dirMode); err != nil && !errors.Is(err, fs.ErrExist) {
		return err
	}
	if st, err := os.Lstat(wdir); err != nil || !st.IsDir() {
		return fmt.Errorf("%s is not a directory", wdir)
	}
	if err := os.Chmod(wdir, dirMode); err != nil {
		return err
	}
	f, err := os.CreateTemp(wdir, tempPrefix+"*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	err = func() error {
		if _, err := io.WriteString(f, tok); err != nil {
			return err
		}
		// Mode first: once the file is another uid's, only they (or
		// CAP_FOWNER) may change it.
		if err := f.Chmod(fileMode); err != nil {
			return err
		}
		if err := f.Sync(); err != nil {
			return err
		}
		if owner != t.euid {
			if err := f.Chown(owner, -1); err != nil {
				return fmt.Errorf("give the token file to uid %d: %w (the daemon needs CAP_CHOWN, see docs/deploy.md)", owner, err)
			}
		}
		return f.Close()
	}()
	if err != nil {
		f.Close()
		os.Remove(tmp)
		return err
	}
	if err := os.Rename(tmp, filepath.Join(wdir, tokenFileName)); err != nil {
		os.Remove(tmp)
		return err
	}
	d, err := os.Open(wdir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// removeDir removes a workload's directory: its token file and leftover
// temporary files, nothing else.
func (t *Tokens) removeDir(name string) error {
	wdir := filepath.Join(t.dir, name)
	if !ownDir(wdir) {
		return nil
	}
	entries, _ := os.ReadDir(wdir)
	for _, e := range entries {
		if e.Name() == tokenFileName || strings.HasPrefix(e.Name(), tempPrefix) {
			os.Remove(filepath.Join(wdir, e.Name()))
		}
	}
	if err := os.Remove(wdir); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return nil
}

// ownDir reports whether path is a directory that holds only what this
// package writes (a token file, temporary files).
func ownDir(path string) bool {
	st, err := os.Lstat(path)
	if err != nil || !st.IsDir() {
		return false
	}
	entries, err := os.ReadDir(path)
	if err != nil {
		return false
	}
	for _, e := range entries {
		if e.Name() != tokenFileName && !strings.HasPrefix(e.Name(), tempPrefix) {
			return false
		}
	}
	return true
}

// removeStale removes the directories of workloads no longer configured
// (left by an earlier run) and temporary files left by a crash.
func (t *Tokens) removeStale() error {
	entries, err := os.ReadDir(t.dir)
	if err != nil {
		return err
	}
	want := map[string]bool{}
	for id := range t.state {
		want[dirName(id)] = true
	}
	for _, e := range entries {
		if !e.IsDir() || want[e.Name()] {
			if want[e.Name()] {
				sub, _ := os.ReadDir(filepath.Join(t.dir, e.Name()))
				for _, s := range sub {
					if strings.HasPrefix(s.Name(), tempPrefix) {
						os.Remove(filepath.Join(t.dir, e.Name(), s.Name()))
					}
				}
			}
			continue
		}
		if err := t.removeDir(e.Name()); err != nil {
			return err
		}
	}
	return nil
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}
