package proxy

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"fmt"
	"hash"
	"sync"
	"time"
)

// IMDSv2 session tokens are stateless. A token is the unpadded base64url
// encoding of
//
//	version (1 byte, 2) | expiry (8 bytes, big-endian unix seconds) |
//	epoch (4 bytes) | generation (4 bytes) | nonce (8 random bytes) |
//	HMAC-SHA256(key, the preceding 25 bytes)
//
// where key is 32 random bytes drawn once per process, or Config.TokenKey.
// That is 57 bytes, 76 header-safe characters ([A-Za-z0-9_-], never CR or
// LF). The full 32-byte MAC is kept (no truncation); the nonce only makes
// tokens issued in the same second distinct. The generation is the access
// plan in force when the token was minted, and the epoch a random number
// drawn once per process: a request carrying a token of this process is
// answered by that plan while it is retained (access.Plan, "Consistency
// across a switch"), so the steps of one SDK fetch agree. A token of
// another process (a shared TokenKey across a restart) or of version 1 is
// valid but pins nothing. Nothing is stored per token, so memory does not grow with
// the token request rate. With a random key a restart of the daemon
// invalidates every token (SDKs answer the resulting 401 with a new PUT); with
// Config.TokenKey shared by successive processes tokens survive a restart.

const (
	// minTokenTTL and maxTokenTTL bound X-aws-ec2-metadata-token-ttl-seconds, in seconds.
	minTokenTTL = 1
	maxTokenTTL = 21600

	tokenVersion   byte = 2
	tokenVersion1  byte = 1 // before generations: 16 nonce bytes
	tokenNonceLen       = 8
	tokenSignedLen      = 1 + 8 + 4 + 4 + tokenNonceLen
	tokenRawLen         = tokenSignedLen + sha256.Size
)

var tokenEncoding = base64.RawURLEncoding.Strict()

// tokenLen is the length of every token string.
var tokenLen = tokenEncoding.EncodedLen(tokenRawLen)

// tokenStatus is the outcome of verifying a token.
type tokenStatus int

const (
	tokenValid tokenStatus = iota
	tokenInvalid
	tokenExpired
)

// tokenMinter mints and verifies tokens with one per-process key. Its key is
// immutable after creation; it is safe for concurrent use.
type tokenMinter struct {
	key   [32]byte
	epoch uint32
	// macs pools keyed HMAC-SHA256 states: building one per request costs
	// more than the rest of a credential GET's handler.
	macs sync.Pool
}

// TokenKeySize is the length in bytes of Config.TokenKey.
const TokenKeySize = 32

// newTokenMinter returns a minter with the given key (TokenKeySize bytes), or
// with a random one when key is nil.
func newTokenMinter(key []byte) (*tokenMinter, error) {
	m := &tokenMinter{}
	switch {
	case key == nil:
		if _, err := rand.Read(m.key[:]); err != nil {
			return nil, fmt.Errorf("proxy: token key: %w", err)
		}
	case len(key) == TokenKeySize:
		copy(m.key[:], key)
	default:
		return nil, fmt.Errorf("proxy: token key is %d bytes, want %d", len(key), TokenKeySize)
	}
	var e [4]byte
	if _, err := rand.Read(e[:]); err != nil {
		return nil, fmt.Errorf("proxy: token epoch: %w", err)
	}
	m.epoch = binary.BigEndian.Uint32(e[:])
	m.macs.New = func() any { return hmac.New(sha256.New, m.key[:]) }
	return m, nil
}

// mac appends HMAC-SHA256(key, data) to dst.
func (m *tokenMinter) mac(dst, data []byte) []byte {
	h := m.macs.Get().(hash.Hash)
	h.Reset()
	h.Write(data)
	dst = h.Sum(dst)
	m.macs.Put(h)
	return dst
}

// tokenExpiry is the unix second at which a token issued at now for ttl
// seconds stops being valid: now+ttl rounded up to a whole second, so a token
// is never rejected before its full TTL has passed.
func tokenExpiry(now time.Time, ttl int) int64 {
	exp := now.Unix() + int64(ttl)
	if now.Nanosecond() != 0 {
		exp++
	}
	return exp
}

// mint returns a new token valid for ttl seconds from now that pins plan
// generation gen, and its expiry in unix seconds.
func (m *tokenMinter) mint(now time.Time, ttl int, gen uint32) (string, int64, error) {
	exp := tokenExpiry(now, ttl)
	var raw [tokenRawLen]byte
	raw[0] = tokenVersion
	binary.BigEndian.PutUint64(raw[1:9], uint64(exp))
	binary.BigEndian.PutUint32(raw[9:13], m.epoch)
	binary.BigEndian.PutUint32(raw[13:17], gen)
	if _, err := rand.Read(raw[17:tokenSignedLen]); err != nil {
		return "", 0, fmt.Errorf("proxy: token nonce: %w", err)
	}
	m.mac(raw[:tokenSignedLen], raw[:tokenSignedLen])
	return tokenEncoding.EncodeToString(raw[:]), exp, nil
}

// verify checks a token presented at now: well formed, minted with this
// process's key (constant-time compare) and not expired (valid while
// now < expiry). gen is the plan generation the token pins: 0 for a token
// minted by another process (or before generations), or when not valid.
func (m *tokenMinter) verify(tok string, now time.Time) (status tokenStatus, gen uint32) {
	status, gen, _ = m.check(tok, now)
	return status, gen
}

// check is verify that also returns the expiry (unix seconds) of a token
// that is valid or expired.
func (m *tokenMinter) check(tok string, now time.Time) (status tokenStatus, gen uint32, exp int64) {
	if len(tok) != tokenLen {
		return tokenInvalid, 0, 0
	}
	var raw [tokenRawLen]byte
	n, err := tokenEncoding.Decode(raw[:], []byte(tok))
	if err != nil || n != tokenRawLen || (raw[0] != tokenVersion && raw[0] != tokenVersion1) {
		return tokenInvalid, 0, 0
	}
	var sum [sha256.Size]byte
	if !hmac.Equal(m.mac(sum[:0], raw[:tokenSignedLen]), raw[tokenSignedLen:]) {
		return tokenInvalid, 0, 0
	}
	exp = int64(binary.BigEndian.Uint64(raw[1:9]))
	if now.Unix() >= exp {
		return tokenExpired, 0, exp
	}
	if raw[0] == tokenVersion && binary.BigEndian.Uint32(raw[9:13]) == m.epoch {
		gen = binary.BigEndian.Uint32(raw[13:17])
	}
	return tokenValid, gen, exp
}

// parseTTL parses the values of the X-aws-ec2-metadata-token-ttl-seconds
// request header: exactly one value of 1 to 5 ASCII digits (no sign, no
// spaces) between minTokenTTL and maxTokenTTL.
func parseTTL(values []string) (int, bool) {
	if len(values) != 1 {
		return 0, false
	}
	v := values[0]
	if len(v) == 0 || len(v) > 5 {
		return 0, false
	}
	n := 0
	for i := 0; i < len(v); i++ {
		c := v[i]
		if c < '0' || c > '9' {
			return 0, false
		}
		n = n*10 + int(c-'0')
	}
	if n < minTokenTTL || n > maxTokenTTL {
		return 0, false
	}
	return n, true
}

// ringSlots covers every possible expiry second: a token expires at most
// maxTokenTTL+1 seconds after it was issued (rounding up).
const ringSlots = maxTokenTTL + 2

// outstandingTokens counts tokens issued and not yet expired in O(1) memory: a
// ring of per-second counts indexed by expiry second. Seconds that have passed
// are swept lazily (amortised O(1) per call, at most ringSlots steps). Safe for
// concurrent use.
type outstandingTokens struct {
	mu    sync.Mutex
	slots [ringSlots]uint32
	total int64
	swept int64 // every slot for a second <= swept is cleared
}

func newOutstandingTokens(now time.Time) *outstandingTokens {
	return &outstandingTokens{swept: now.Unix()}
}

// advance clears the slots of the seconds in (swept, now]. Caller holds mu.
func (o *outstandingTokens) advance(now int64) {
	if now <= o.swept {
		return // clock stood still or went back: nothing new expired
	}
	if now-o.swept >= ringSlots {
		clear(o.slots[:])
		o.total = 0
		o.swept = now
		return
	}
	for s := o.swept + 1; s <= now; s++ {
		i := s % ringSlots
		o.total -= int64(o.slots[i])
		o.slots[i] = 0
	}
	o.swept = now
}

// add counts one token issued at now that expires at exp (unix seconds).
func (o *outstandingTokens) add(now time.Time, exp int64) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.advance(now.Unix())
	// A token whose expiry second was already swept (clock went back) or lies
	// beyond the ring cannot be tracked; it is simply not counted.
	if exp <= o.swept || exp-o.swept >= ringSlots {
		return
	}
	o.slots[exp%ringSlots]++
	o.total++
}

// count returns the number of tokens outstanding at now.
func (o *outstandingTokens) count(now time.Time) int64 {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.advance(now.Unix())
	return o.total
}
