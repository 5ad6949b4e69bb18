package proxy

import (
	"encoding/base64"
	"strconv"
	"strings"
	"testing"
	"time"
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
		tok, _, err := m.mint(t0, 21600)
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
	tok, exp, err := m.mint(issued, 300)
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
	otherTok, _, _ := other.mint(issued, 300)
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
		{"nonce flipped", flip(12), issued, tokenInvalid},
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
			if got := m.verify(tt.tok, tt.at); got != tt.want {
				t.Errorf("verify = %d, want %d", got, tt.want)
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
			tok, _, _ := m.mint(issued, ttl)
			end := issued.Add(time.Duration(ttl) * time.Second)
			if got := m.verify(tok, end.Add(-time.Nanosecond)); got != tokenValid {
				t.Errorf("frac %v ttl %d: rejected before issued+TTL", frac, ttl)
			}
			if got := m.verify(tok, end.Add(time.Second)); got != tokenExpired {
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
	minted, _, _ := m.mint(t0, 300)
	for _, s := range []string{minted, "", "AQAEA", strings.Repeat("A", tokenLen), minted[:40], minted + "=", "\x00\r\n"} {
		f.Add(s)
	}
	// Any token the fuzzer finds that verifies must be the one minted above.
	f.Fuzz(func(t *testing.T, tok string) {
		got := m.verify(tok, t0)
		if got == tokenValid && tok != minted {
			t.Fatalf("forged token verified: %q", tok)
		}
		if strings.ContainsAny(tok, "\r\n") && got != tokenInvalid {
			t.Fatalf("token with CR/LF accepted")
		}
	})
}
