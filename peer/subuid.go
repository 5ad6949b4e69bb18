package peer

import (
	"bufio"
	"bytes"
	"cmp"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"math"
	"os"
	"slices"
	"strconv"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
)

// Files of the host's users and their subordinate uids (passwd(5),
// subuid(5)).
const (
	PasswdFile = "/etc/passwd"
	SubUIDFile = "/etc/subuid"
)

// Bounds of reading them: a larger file is read up to the bound, and the
// ranges beyond it are not known (their uids are their own users).
const (
	maxUserFileBytes = 4 << 20
	maxDelegations   = 1 << 16
)

// DelegationCheckEvery is how often Users looks whether the files changed.
const DelegationCheckEvery = 10 * time.Second

// Users maps a uid to the user it belongs to, for the connection shares of
// the front doors (connlimit.Listener.ShareByOwner): a subordinate uid
// (subuid(5): a range delegated to a user, who may run processes as any of
// them through newuidmap) belongs to the user it is delegated to, any
// other uid to itself. Keyed by user, one user holds one share however
// many uids it runs processes as.
//
// Of is safe for concurrent use and never waits on the file system: it
// reads the table in memory; at most every DelegationCheckEvery it starts,
// in the background, a look at the files, which reloads them when they
// changed. A nil *Users maps every uid to itself.
type Users struct {
	subuid, passwd string
	every          time.Duration
	log            *zap.Logger

	table   atomic.Pointer[delegations]
	checked atomic.Int64 // unix nanos of the last look at the files
	looking atomic.Bool  // a look is under way
}

// delegations is one reading of the files: ranges sorted by first uid,
// and what the files were then.
type delegations struct {
	ranges []delegation
	stamp  [2]fileStamp // subuid, passwd
}

type delegation struct {
	first, last uint32 // the range, inclusive
	user        uint32 // whose it is
}

type fileStamp struct {
	mod  time.Time
	size int64
	ok   bool
}

// NewUsers reads subuid and passwd (empty names mean the host's files) and
// returns their table; a file that cannot be read delegates nothing, and
// is read again when it appears or changes. log (nil: none) is told what
// was skipped.
func NewUsers(subuid, passwd string, log *zap.Logger) *Users {
	if subuid == "" {
		subuid = SubUIDFile
	}
	if passwd == "" {
		passwd = PasswdFile
	}
	if log == nil {
		log = zap.NewNop()
	}
	u := &Users{subuid: subuid, passwd: passwd, every: DelegationCheckEvery, log: log}
	u.load(time.Now())
	return u
}

// Of returns the uid of the user uid belongs to: the user a subordinate
// uid is delegated to, else uid itself.
func (u *Users) Of(uid uint32) uint32 {
	if u == nil {
		return uid
	}
	if now := time.Now(); now.UnixNano()-u.checked.Load() >= int64(u.every) && u.looking.CompareAndSwap(false, true) {
		go func() {
			defer u.looking.Store(false)
			u.load(now)
		}()
	}
	t := u.table.Load()
	if t == nil {
		return uid
	}
	rs := t.ranges
	// The last range starting at or below uid. Ranges do not overlap in a
	// sound file (useradd allocates them apart); where they do, a uid
	// beyond that last range counts as its own.
	i, _ := slices.BinarySearchFunc(rs, uid, func(d delegation, uid uint32) int {
		if d.first <= uid {
			return -1
		}
		return 1
	})
	if i > 0 && uid <= rs[i-1].last {
		return rs[i-1].user
	}
	return uid
}

// Ranges is the number of delegated ranges in the table in force.
func (u *Users) Ranges() int {
	if u == nil {
		return 0
	}
	if t := u.table.Load(); t != nil {
		return len(t.ranges)
	}
	return 0
}

// load reads the files when they changed since the table in force (or
// there is none) and replaces it.
func (u *Users) load(now time.Time) {
	u.checked.Store(now.UnixNano())
	stamp := [2]fileStamp{statFile(u.subuid), statFile(u.passwd)}
	if old := u.table.Load(); old != nil && old.stamp == stamp {
		return
	}
	names, err := readPasswd(u.passwd)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		u.log.Warn("cannot read the users; delegated uids of users named in it count as their own", zap.Error(err))
	}
	ranges, skipped, err := readSubUID(u.subuid, names)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		u.log.Warn("cannot read the subordinate uids; they count as their own users", zap.Error(err))
	}
	if skipped > 0 {
		u.log.Warn("lines of the subordinate uids skipped", zap.String("file", u.subuid), zap.Int("lines", skipped))
	}
	u.table.Store(&delegations{ranges: ranges, stamp: stamp})
}

func statFile(name string) fileStamp {
	st, err := os.Stat(name)
	if err != nil {
		return fileStamp{}
	}
	return fileStamp{mod: st.ModTime(), size: st.Size(), ok: true}
}

// readPasswd returns the uid of every user name in a passwd(5) file.
func readPasswd(name string) (map[string]uint32, error) {
	users := map[string]uint32{}
	err := eachLine(name, func(line []byte) bool {
		f := bytes.SplitN(line, []byte(":"), 4)
		if len(f) < 4 || len(f[0]) == 0 {
			return true // not a user: skipped
		}
		uid, err := strconv.ParseUint(string(f[2]), 10, 32)
		if err != nil || uid == math.MaxUint32 {
			return true
		}
		if _, dup := users[string(f[0])]; !dup { // the first entry is the one login uses
			users[string(f[0])] = uint32(uid)
		}
		return true
	})
	return users, err
}

// readSubUID returns the ranges of a subuid(5) file (name:first:count
// lines, the name a user name or a uid), sorted by first uid, and how many
// lines it skipped as invalid. A user name passwd does not know still
// groups its ranges: they belong to a made-up uid of that name (the high
// bit set, which no uid passwd lists here has).
func readSubUID(name string, users map[string]uint32) ([]delegation, int, error) {
	var out []delegation
	skipped := 0
	err := eachLine(name, func(line []byte) bool {
		f := bytes.Split(line, []byte(":"))
		if len(f) != 3 || len(f[0]) == 0 {
			skipped++
			return true
		}
		first, err1 := strconv.ParseUint(string(f[1]), 10, 32)
		count, err2 := strconv.ParseUint(string(f[2]), 10, 32)
		if err1 != nil || err2 != nil || count == 0 || first+count-1 >= math.MaxUint32 {
			skipped++
			return true
		}
		user, ok := users[string(f[0])]
		if !ok {
			if n, err := strconv.ParseUint(string(f[0]), 10, 32); err == nil && n != math.MaxUint32 {
				user = uint32(n)
			} else {
				h := fnv.New32a()
				h.Write(f[0])
				user = h.Sum32() | 1<<31
			}
		}
		out = append(out, delegation{first: uint32(first), last: uint32(first + count - 1), user: user})
		return len(out) < maxDelegations
	})
	slices.SortStableFunc(out, func(a, b delegation) int { return cmp.Compare(a.first, b.first) })
	return out, skipped, err
}

// eachLine calls fn with every line of the file name that is neither empty
// nor a comment, within maxUserFileBytes, while fn returns true.
func eachLine(name string, fn func([]byte) bool) error {
	f, err := os.Open(name)
	if err != nil {
		return err
	}
	defer f.Close()
	sc := bufio.NewScanner(io.LimitReader(f, maxUserFileBytes))
	sc.Buffer(make([]byte, 0, 4096), 64<<10)
	for sc.Scan() {
		line := bytes.TrimSpace(sc.Bytes())
		if len(line) == 0 || line[0] == '#' {
			continue
		}
		if !fn(line) {
			break
		}
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	return nil
}
