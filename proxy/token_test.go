package proxy

import (
	"bytes"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/imdsproxy/imdsproxy/access"
)

func TestParseTTL(t *testing.T) {
	tests := []struct {
		name   string
		values []string
		want   int
		ok     bool
	}{
		{"go sdk", []string{"300"}, 300, true},
		{"others", []string{"21600"}, 21600, true},
		{"min", []string{"1"}, 1, true},
		{"leading zero", []string{"0300"}, 300, true},
		{"missing", nil, 0, false},
		{"empty", []string{""}, 0, false},
		{"zero", []string{"0"}, 0, false},
		{"too big", []string{"21601"}, 0, false},
		{"huge", []string{"99999999999999999999"}, 0, false},
		{"negative", []string{"-1"}, 0, false},
		{"plus", []string{"+300"}, 0, false},
		{"space", []string{" 300"}, 0, false},
		{"float", []string{"300.0"}, 0, false},
		{"hex", []string{"0x12c"}, 0, false},
		{"two values", []string{"300", "300"}, 0, false},
		{"unicode digit", []string{"３００"}, 0, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, ok := parseTTL(tt.values)
			if got != tt.want || ok != tt.ok {
				t.Errorf("parseTTL(%q) = %d, %v; want %d, %v", tt.values, got, ok, tt.want, tt.ok)
			}
		})
	}
}

func TestTokenFormat(t *testing.T) {
	m, err := newTokenMinter(nil)
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	for i := 0; i < 100; i++ {
		tok, _, err := m.mint(t0, 21600, uint32(i))
		if err != nil {
			t.Fatal(err)
		}
		if len(tok) != tokenLen || tokenLen != 76 {
			t.Fatalf("token length %d, want %d (76)", len(tok), tokenLen)
		}
		for _, r := range tok {
			if !strings.ContainsRune("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_", r) {
				t.Fatalf("token %q has character %q", tok, r)
			}
		}
		if seen[tok] {
			t.Fatalf("token repeated: %q", tok)
		}
		seen[tok] = true
	}
}

func TestTokenVerify(t *testing.T) {
	m, _ := newTokenMinter(nil)
	other, _ := newTokenMinter(nil)
	issued := t0 // 12:00:00.5
	tok, exp, err := m.mint(issued, 300, 7)
	if err != nil {
		t.Fatal(err)
	}
	if want := issued.Unix() + 301; exp != want {
		t.Fatalf("expiry %d, want %d (issued+TTL rounded up)", exp, want)
	}
	raw, _ := tokenEncoding.DecodeString(tok)
	flip := func(i int) string {
		b := append([]byte(nil), raw...)
		b[i] ^= 1
		return tokenEncoding.EncodeToString(b)
	}
	otherTok, _, _ := other.mint(issued, 300, 7)
	tests := []struct {
		name string
		tok  string
		at   time.Time
		want tokenStatus
	}{
		{"fresh", tok, issued, tokenValid},
		{"just before issued+ttl", tok, issued.Add(300*time.Second - time.Nanosecond), tokenValid},
		{"at issued+ttl rounded up, minus 1ns", tok, time.Unix(exp, 0).Add(-time.Nanosecond), tokenValid},
		{"at expiry", tok, time.Unix(exp, 0), tokenExpired},
		{"long after", tok, issued.Add(24 * time.Hour), tokenExpired},
		{"other key", otherTok, issued, tokenInvalid},
		{"version flipped", flip(0), issued, tokenInvalid},
		{"expiry flipped", flip(8), issued, tokenInvalid},
		{"epoch flipped", flip(12), issued, tokenInvalid},
		{"generation flipped", flip(16), issued, tokenInvalid},
		{"nonce flipped", flip(20), issued, tokenInvalid},
		{"mac flipped", flip(tokenRawLen - 1), issued, tokenInvalid},
		{"truncated", tok[:len(tok)-1], issued, tokenInvalid},
		{"extended", tok + "A", issued, tokenInvalid},
		{"std base64 alphabet", tok[:10] + "+" + tok[11:], issued, tokenInvalid},
		{"padded", base64.URLEncoding.EncodeToString(raw[:tokenRawLen-1]) + "=", issued, tokenInvalid},
		{"empty", "", issued, tokenInvalid},
		{"garbage", strings.Repeat("!", tokenLen), issued, tokenInvalid},
		{"with newline", tok[:len(tok)-1] + "\n", issued, tokenInvalid},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, gen := m.verify(tt.tok, tt.at)
			if got != tt.want {
				t.Errorf("verify = %d, want %d", got, tt.want)
			}
			if wantGen := map[bool]uint32{true: 7}[got == tokenValid]; gen != wantGen {
				t.Errorf("verify pins %d, want %d", gen, wantGen)
			}
		})
	}
}

// TestTokenNeverExpiresEarly checks every TTL at whole and fractional issue
// times: a token is valid for at least its full TTL.
func TestTokenNeverExpiresEarly(t *testing.T) {
	m, _ := newTokenMinter(nil)
	for _, frac := range []time.Duration{0, 1, 500 * time.Millisecond, time.Second - 1} {
		issued := time.Unix(1_800_000_000, 0).Add(frac)
		for _, ttl := range []int{1, 2, 300, 21599, 21600} {
			tok, _, _ := m.mint(issued, ttl, 1)
			end := issued.Add(time.Duration(ttl) * time.Second)
			if got, _ := m.verify(tok, end.Add(-time.Nanosecond)); got != tokenValid {
				t.Errorf("frac %v ttl %d: rejected before issued+TTL", frac, ttl)
			}
			if got, _ := m.verify(tok, end.Add(time.Second)); got != tokenExpired {
				t.Errorf("frac %v ttl %d: still valid a second after issued+TTL", frac, ttl)
			}
		}
	}
}

func TestOutstandingTokens(t *testing.T) {
	base := time.Unix(1_800_000_000, 0)
	o := newOutstandingTokens(base)
	at := func(s int64) time.Time { return base.Add(time.Duration(s) * time.Second) }
	add := func(now, ttl int64) { o.add(at(now), base.Unix()+now+ttl) }

	add(0, 10)
	add(0, 10)
	add(0, 21600)
	add(5, 1)
	steps := []struct {
		now  int64
		want int64
	}{
		{0, 4},
		{5, 4},
		{6, 3},  // the 1 s token issued at 5 expired
		{9, 3},  // not yet
		{10, 1}, // both 10 s tokens expired at 10
		{21599, 1},
		{21600, 0},
		{21600, 0},
	}
	for _, st := range steps {
		if got := o.count(at(st.now)); got != st.want {
			t.Errorf("count at +%ds = %d, want %d", st.now, got, st.want)
		}
	}

	// Wrap around the ring many times, with tokens of the maximum TTL.
	for s := int64(21600); s < 21600*3; s += 1000 {
		add(s, 21600)
	}
	if got := o.count(at(21600*3 - 1)); got < 1 {
		t.Errorf("lost tokens across wrap: %d", got)
	}
	// After a long idle period everything is gone.
	if got := o.count(at(21600 * 10)); got != 0 {
		t.Errorf("after idle: %d, want 0", got)
	}
	// Clock going back: nothing breaks, nothing goes negative.
	add(100, 300)
	if got := o.count(at(21600 * 10)); got < 0 {
		t.Errorf("negative count %d", got)
	}
}

// TestOutstandingTokensMatchesNaive compares the ring with a plain list.
func TestOutstandingTokensMatchesNaive(t *testing.T) {
	base := time.Unix(1_800_000_000, 0)
	o := newOutstandingTokens(base)
	var expiries []int64
	now := base
	for i := 0; i < 5000; i++ {
		now = now.Add(time.Duration(i%7) * 731 * time.Millisecond)
		ttl := []int{1, 5, 300, 21600}[i%4]
		exp := tokenExpiry(now, ttl)
		o.add(now, exp)
		expiries = append(expiries, exp)
		if i%50 == 0 {
			var want int64
			for _, e := range expiries {
				if now.Unix() < e {
					want++
				}
			}
			if got := o.count(now); got != want {
				t.Fatalf("step %d: count %d, want %d", i, got, want)
			}
		}
	}
}

func FuzzTokenTTLHeader(f *testing.F) {
	for _, s := range []string{"300", "21600", "0", "21601", "-1", "+1", "", " 1", "1e3", "00001", "999999"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, v string) {
		n, ok := parseTTL([]string{v})
		if !ok {
			return
		}
		if n < minTokenTTL || n > maxTokenTTL {
			t.Fatalf("accepted %q as %d, out of range", v, n)
		}
		if p, err := strconv.Atoi(v); err != nil || p != n {
			t.Fatalf("accepted %q as %d, strconv says %d, %v", v, n, p, err)
		}
	})
}

func FuzzTokenVerify(f *testing.F) {
	m, err := newTokenMinter(nil)
	if err != nil {
		f.Fatal(err)
	}
	minted, _, _ := m.mint(t0, 300, 3)
	v1 := mintV1(m, t0, 300)
	for _, s := range []string{minted, v1, "", "AQAEA", strings.Repeat("A", tokenLen), minted[:40], minted + "=", "\x00\r\n"} {
		f.Add(s)
	}
	// Any token the fuzzer finds that verifies must be one minted above,
	// and pins what it was minted with.
	f.Fuzz(func(t *testing.T, tok string) {
		got, gen := m.verify(tok, t0)
		if got == tokenValid && tok != minted && tok != v1 {
			t.Fatalf("forged token verified: %q", tok)
		}
		if got == tokenValid && gen != map[bool]uint32{true: 3}[tok == minted] {
			t.Fatalf("token %q pins %d", tok, gen)
		}
		if got != tokenValid && gen != 0 {
			t.Fatalf("a token that does not verify pins %d", gen)
		}
		if strings.ContainsAny(tok, "\r\n") && got != tokenInvalid {
			t.Fatalf("token with CR/LF accepted")
		}
	})
}

// mintV1 builds by hand a token of version 1 (before generations) with m's
// key: version 1 | expiry | 16 nonce bytes | HMAC-SHA256 of those 25 bytes.
func mintV1(m *tokenMinter, now time.Time, ttl int) string {
	var raw [1 + 8 + 16 + sha256.Size]byte
	raw[0] = 1
	binary.BigEndian.PutUint64(raw[1:9], uint64(tokenExpiry(now, ttl)))
	copy(raw[9:25], "0123456789abcdef")
	mac := hmac.New(sha256.New, m.key[:])
	mac.Write(raw[:25])
	copy(raw[25:], mac.Sum(nil))
	return base64.RawURLEncoding.EncodeToString(raw[:])
}

// TestTokenLayout checks the version-2 layout byte by byte: 57 bytes of
// version 2, expiry, epoch, generation, an 8-byte nonce and the full
// HMAC-SHA256 of the 25 bytes before it.
func TestTokenLayout(t *testing.T) {
	m, err := newTokenMinter(bytes.Repeat([]byte{5}, TokenKeySize))
	if err != nil {
		t.Fatal(err)
	}
	nonces := map[string]bool{}
	for i := range 20 {
		gen := uint32(0xfedc_ba98) + uint32(i)
		tok, exp, err := m.mint(t0, 300, gen)
		if err != nil {
			t.Fatal(err)
		}
		raw, err := base64.RawURLEncoding.Strict().DecodeString(tok)
		if err != nil {
			t.Fatal(err)
		}
		if len(raw) != 57 || tokenRawLen != 57 || tokenSignedLen != 25 {
			t.Fatalf("token of %d bytes (raw %d, signed %d), want 57 and 25", len(raw), tokenRawLen, tokenSignedLen)
		}
		if raw[0] != 2 {
			t.Errorf("version %d, want 2", raw[0])
		}
		if got := int64(binary.BigEndian.Uint64(raw[1:9])); got != exp || exp != t0.Unix()+301 {
			t.Errorf("expiry %d, mint says %d, want %d", got, exp, t0.Unix()+301)
		}
		if got := binary.BigEndian.Uint32(raw[9:13]); got != m.epoch {
			t.Errorf("epoch %#x, want the minter's %#x", got, m.epoch)
		}
		if got := binary.BigEndian.Uint32(raw[13:17]); got != gen {
			t.Errorf("generation %#x, want %#x", got, gen)
		}
		nonces[string(raw[17:25])] = true
		mac := hmac.New(sha256.New, bytes.Repeat([]byte{5}, TokenKeySize))
		mac.Write(raw[:25])
		if !hmac.Equal(mac.Sum(nil), raw[25:]) {
			t.Errorf("the MAC is not HMAC-SHA256(key, first 25 bytes)")
		}
		if st, pin := m.verify(tok, t0); st != tokenValid || pin != gen {
			t.Errorf("verify = %d pin %#x, want valid pin %#x", st, pin, gen)
		}
	}
	if len(nonces) != 20 {
		t.Errorf("%d distinct nonces in 20 tokens", len(nonces))
	}
	// A version byte other than 1 and 2, correctly signed, is refused.
	tok, _, _ := m.mint(t0, 300, 1)
	raw, _ := base64.RawURLEncoding.DecodeString(tok)
	raw[0] = 3
	mac := hmac.New(sha256.New, m.key[:])
	mac.Write(raw[:25])
	copy(raw[25:], mac.Sum(nil))
	if st, _ := m.verify(base64.RawURLEncoding.EncodeToString(raw), t0); st != tokenInvalid {
		t.Errorf("a signed version-3 token: %d, want invalid", st)
	}
}

// TestTokenVersion1: a version-1 token minted with the same key (before an
// upgrade) still verifies, expires as before, and pins no generation.
func TestTokenVersion1(t *testing.T) {
	m, _ := newTokenMinter(bytes.Repeat([]byte{5}, TokenKeySize))
	tok := mintV1(m, t0, 300)
	if len(tok) != tokenLen {
		t.Fatalf("v1 token of %d characters, want %d", len(tok), tokenLen)
	}
	if st, gen := m.verify(tok, t0); st != tokenValid || gen != 0 {
		t.Errorf("v1 token: %d pin %d, want valid and no pin", st, gen)
	}
	if st, gen := m.verify(tok, t0.Add(301*time.Second)); st != tokenExpired || gen != 0 {
		t.Errorf("v1 token past expiry: %d pin %d", st, gen)
	}
	other, _ := newTokenMinter(bytes.Repeat([]byte{6}, TokenKeySize))
	if st, _ := m.verify(mintV1(other, t0, 300), t0); st != tokenInvalid {
		t.Errorf("v1 token of another key: %d, want invalid", st)
	}

	// Through the API: served by the current plan.
	e := newEnv(t, Config{TokensRequired: true, TokenKey: bytes.Repeat([]byte{5}, TokenKeySize)})
	e.publish(t, Config{TokensRequired: true}, access.PlanConfig{Host: roleKey("new-role"), Access: noAudit()})
	w := e.do(http.MethodGet, "/latest/meta-data/iam/security-credentials/", map[string]string{headerToken: mintV1(e.s.minter, t0, 300)})
	if w.Code != 200 || w.Body.String() != "new-role" {
		t.Errorf("v1 token: listing %d %q, want new-role", w.Code, w.Body.String())
	}
}

// TestTokenOtherEpoch: a token of another process with the same key (a
// restart sharing imds.token_key_file) verifies and pins nothing.
func TestTokenOtherEpoch(t *testing.T) {
	key := bytes.Repeat([]byte{5}, TokenKeySize)
	m, _ := newTokenMinter(key)
	prev, _ := newTokenMinter(key)
	prev.epoch = m.epoch + 1 // never the same epoch, whatever was drawn
	tok, _, _ := prev.mint(t0, 300, 4)
	if st, gen := m.verify(tok, t0); st != tokenValid || gen != 0 {
		t.Errorf("other epoch: %d pin %d, want valid and no pin", st, gen)
	}
	if st, gen := prev.verify(tok, t0); st != tokenValid || gen != 4 {
		t.Errorf("own epoch: %d pin %d, want valid pin 4", st, gen)
	}
}
