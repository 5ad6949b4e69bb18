package token

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
)

var testNow = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)

// makeJWT builds an unsigned-but-well-shaped JWT with the given payload: an
// RS256 header and a signature as long as a 2048-bit key makes them.
func makeJWT(t testing.TB, payload map[string]any) string {
	t.Helper()
	return makeJWTAlg(t, "RS256", 256, payload)
}

// makeJWTAlg builds a JWT with header alg and a signature of sigLen bytes.
func makeJWTAlg(t testing.TB, alg string, sigLen int, payload map[string]any) string {
	t.Helper()
	h, _ := json.Marshal(map[string]any{"alg": alg, "kid": "k1", "typ": "JWT"})
	p, err := json.Marshal(payload)
	if err != nil {
		t.Fatal(err)
	}
	sig := []byte("signature-bytes-" + strings.Repeat("x", sigLen))[:sigLen]
	enc := base64.RawURLEncoding.EncodeToString
	return enc(h) + "." + enc(p) + "." + enc(sig)
}

// age sets path's modification time d into the past, so that File treats
// its content as final (see SettleTime).
func age(t *testing.T, path string, d time.Duration) {
	t.Helper()
	old := time.Now().Add(-d)
	if err := os.Chtimes(path, old, old); err != nil {
		t.Fatal(err)
	}
}

func validJWT(t testing.TB, sub string) string {
	return makeJWT(t, map[string]any{
		"iss": "https://issuer.internal", "sub": sub, "aud": "sts.amazonaws.com",
		"exp": testNow.Add(time.Hour).Unix(), "iat": testNow.Unix(),
	})
}

func newTestFile(t *testing.T, path string, reg prometheus.Registerer) (*File, *observer.ObservedLogs) {
	t.Helper()
	core, logs := observer.New(zap.DebugLevel)
	f, err := NewFile(path, FileOptions{Now: func() time.Time { return testNow }}, zap.New(core), reg)
	if err != nil {
		t.Fatal(err)
	}
	return f, logs
}

func write(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
}

func TestTokenRotation(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "token.jwt")
	reg := prometheus.NewPedanticRegistry()
	f, _ := newTestFile(t, path, reg)

	first := validJWT(t, "host-a")
	write(t, path, "\n  "+first+"\r\n")
	got, err := f.Token(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if got != first {
		t.Fatalf("Token = %q, want the trimmed file content", got)
	}

	// Rotation by rename, as agents usually do, then by rewriting in place.
	second := validJWT(t, "host-b")
	tmp := filepath.Join(dir, ".tmp")
	write(t, tmp, second)
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
	if got, err = f.Token(context.Background()); err != nil || got != second {
		t.Fatalf("after rename: Token = %q, %v; want the new token", got, err)
	}
	third := makeJWT(t, map[string]any{"exp": testNow.Add(2 * time.Hour).Unix()})
	write(t, path, third)
	if got, err = f.Token(context.Background()); err != nil || got != third {
		t.Fatalf("after rewrite: Token = %q, %v; want the new token", got, err)
	}

	if n := testutil.ToFloat64(f.reads.WithLabelValues("ok")); n != 3 {
		t.Errorf("reads_total{result=ok} = %v, want 3", n)
	}
	if v := testutil.ToFloat64(f.expiry); v != float64(testNow.Add(2*time.Hour).Unix()) {
		t.Errorf("expiry gauge = %v, want exp of the last token", v)
	}
	if probs, err := testutil.GatherAndLint(reg); err != nil || len(probs) > 0 {
		t.Errorf("metric lint: %v %v", probs, err)
	}
}

func TestTokenErrors(t *testing.T) {
	dir := t.TempDir()
	expired := makeJWT(t, map[string]any{"exp": testNow.Unix()}) // exp == now is expired
	huge := strings.Repeat("a", MaxTokenSize+10)

	tests := []struct {
		name      string
		setup     func(t *testing.T) string // returns the path
		reason    string
		permanent bool
	}{
		{"missing", func(t *testing.T) string { return filepath.Join(dir, "nope") }, ReasonMissing, false},
		{"directory", func(t *testing.T) string {
			p := filepath.Join(dir, "adir")
			if err := os.Mkdir(p, 0o700); err != nil {
				t.Fatal(err)
			}
			return p
		}, ReasonUnreadable, false},
		{"fifo", func(t *testing.T) string {
			p := filepath.Join(dir, "fifo")
			if err := syscall.Mkfifo(p, 0o600); err != nil {
				t.Skip("mkfifo:", err)
			}
			return p
		}, ReasonUnreadable, false},
		{"unreadable", func(t *testing.T) string {
			if os.Geteuid() == 0 {
				t.Skip("root reads mode 000 files")
			}
			p := filepath.Join(dir, "mode000")
			write(t, p, validJWT(t, "x"))
			if err := os.Chmod(p, 0); err != nil {
				t.Fatal(err)
			}
			return p
		}, ReasonUnreadable, false},
		{"empty", func(t *testing.T) string {
			p := filepath.Join(dir, "empty")
			write(t, p, " \n\t\n")
			return p
		}, ReasonEmpty, true},
		{"too_large", func(t *testing.T) string {
			p := filepath.Join(dir, "huge")
			write(t, p, huge)
			return p
		}, ReasonTooLarge, true},
		{"malformed", func(t *testing.T) string {
			p := filepath.Join(dir, "malformed")
			write(t, p, "not-a-jwt")
			age(t, p, SettleTime+time.Second) // else it could be a JWT being written
			return p
		}, ReasonMalformed, true},
		{"garbage", func(t *testing.T) string {
			p := filepath.Join(dir, "garbage")
			write(t, p, "<html>502 Bad Gateway</html>\n") // no JWT starts so: final at once
			return p
		}, ReasonMalformed, true},
		{"truncated", func(t *testing.T) string {
			p := filepath.Join(dir, "truncated")
			write(t, p, "") // O_TRUNC, nothing written yet
			age(t, p, SettleTime+time.Second)
			return p
		}, ReasonEmpty, true},
		{"changing", func(t *testing.T) string {
			p := filepath.Join(dir, "changing")
			write(t, p, "") // O_TRUNC just now, nothing written yet
			return p
		}, ReasonChanging, false},
		{"expired", func(t *testing.T) string {
			p := filepath.Join(dir, "expired")
			write(t, p, expired)
			return p
		}, ReasonExpired, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			path := tc.setup(t)
			reg := prometheus.NewRegistry()
			f, logs := newTestFile(t, path, reg)
			done := make(chan struct{})
			var tok string
			var err error
			go func() { defer close(done); tok, err = f.Token(context.Background()) }()
			select {
			case <-done:
			case <-time.After(5 * time.Second):
				t.Fatal("Token blocked")
			}
			if tok != "" || err == nil {
				t.Fatalf("Token = %q, %v; want an error", tok, err)
			}
			var te *Error
			if !errors.As(err, &te) {
				t.Fatalf("error %T is not *token.Error", err)
			}
			if te.Reason != tc.reason || te.Path != path {
				t.Errorf("Reason, Path = %q, %q; want %q, %q", te.Reason, te.Path, tc.reason, path)
			}
			if te.Permanent() != tc.permanent {
				t.Errorf("Permanent = %v, want %v", te.Permanent(), tc.permanent)
			}
			var classed interface{ ErrorClass() string }
			if !errors.As(err, &classed) || classed.ErrorClass() != "identity" {
				t.Errorf("ErrorClass not identity")
			}
			wantPrefix := "token: " + path + ": " + tc.reason
			if !strings.HasPrefix(err.Error(), wantPrefix) {
				t.Errorf("Error() = %q, want prefix %q", err.Error(), wantPrefix)
			}
			if tc.reason == ReasonMissing && !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("missing: errors.Is(err, fs.ErrNotExist) = false")
			}
			if n := testutil.ToFloat64(f.reads.WithLabelValues(tc.reason)); n != 1 {
				t.Errorf("reads_total{result=%s} = %v, want 1", tc.reason, n)
			}
			entries := logs.FilterMessage("identity token refused").All()
			if len(entries) != 1 || entries[0].Level != zap.WarnLevel {
				t.Fatalf("want one Warn log line, got %v", logs.All())
			}
			ctx := entries[0].ContextMap()
			if ctx["reason"] != tc.reason || ctx["path"] != path {
				t.Errorf("log fields = %v", ctx)
			}
		})
	}
}

func TestTokenSymlink(t *testing.T) {
	dir := t.TempDir()
	target := filepath.Join(dir, "..data", "token")
	if err := os.MkdirAll(filepath.Dir(target), 0o700); err != nil {
		t.Fatal(err)
	}
	jwt := validJWT(t, "linked")
	write(t, target, jwt)
	link := filepath.Join(dir, "token.jwt")
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
	f, _ := newTestFile(t, link, nil)
	if got, err := f.Token(context.Background()); err != nil || got != jwt {
		t.Fatalf("Token via symlink = %q, %v", got, err)
	}

	// A symlink to a directory is refused like the directory itself.
	dlink := filepath.Join(dir, "dirlink")
	if err := os.Symlink(filepath.Dir(target), dlink); err != nil {
		t.Fatal(err)
	}
	f2, _ := newTestFile(t, dlink, nil)
	var te *Error
	if _, err := f2.Token(context.Background()); !errors.As(err, &te) || te.Reason != ReasonUnreadable {
		t.Fatalf("symlink to dir: err = %v, want unreadable", err)
	}
}

func TestTokenMaxSizeOption(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "t")
	jwt := validJWT(t, "x")
	write(t, path, jwt)
	f, err := NewFile(path, FileOptions{MaxSize: int64(len(jwt) - 1), Now: func() time.Time { return testNow }}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	var te *Error
	if _, err := f.Token(context.Background()); !errors.As(err, &te) || te.Reason != ReasonTooLarge {
		t.Fatalf("err = %v, want too_large", err)
	}
	f, _ = NewFile(path, FileOptions{MaxSize: int64(len(jwt)), Now: func() time.Time { return testNow }}, nil, nil)
	if _, err := f.Token(context.Background()); err != nil {
		t.Fatalf("at the limit: %v", err)
	}
}

// TestErrorNeverContainsToken: whatever is wrong with the token, neither the
// error string nor the log output quote it.
func TestErrorNeverContainsToken(t *testing.T) {
	dir := t.TempDir()
	secretSub := "SUPERSECRETSUBJECTVALUE"
	expired := makeJWT(t, map[string]any{"sub": secretSub, "exp": testNow.Add(-time.Minute).Unix()})
	parts := strings.Split(expired, ".")
	contents := map[string]string{
		"expired":      expired,
		"bad-alg":      base64.RawURLEncoding.EncodeToString([]byte(`{"alg":"none"}`)) + "." + parts[1] + "." + parts[2],
		"no-exp":       makeJWT(t, map[string]any{"sub": secretSub}),
		"two-parts":    parts[0] + "." + parts[1],
		"control-char": parts[0] + "." + parts[1] + "\x01." + parts[2],
		"bad-base64":   parts[0] + "." + parts[1] + "!!." + parts[2],
		"string-exp":   makeJWT(t, map[string]any{"sub": secretSub, "exp": "1999999999"}),
		"too-large":    expired + strings.Repeat("A", MaxTokenSize),
	}
	for name, content := range contents {
		t.Run(name, func(t *testing.T) {
			path := filepath.Join(dir, name)
			write(t, path, content)
			f, logs := newTestFile(t, path, nil)
			_, err := f.Token(context.Background())
			if err == nil {
				t.Fatal("want an error")
			}
			var logText strings.Builder
			for _, e := range logs.All() {
				logText.WriteString(e.Message)
				for k, v := range e.ContextMap() {
					logText.WriteString(k)
					if s, ok := v.(string); ok {
						logText.WriteString(s)
					}
				}
			}
			for _, where := range []string{err.Error(), logText.String()} {
				for _, p := range append(strings.Split(content, "."), secretSub, content) {
					if len(p) >= 8 && strings.Contains(where, p) {
						t.Errorf("%q leaks token material %q", where, p)
					}
				}
			}
		})
	}
}

func TestTokenCancelledContext(t *testing.T) {
	f, _ := newTestFile(t, filepath.Join(t.TempDir(), "x"), nil)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := f.Token(ctx); !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v, want context.Canceled", err)
	}
}

func TestNewFileErrors(t *testing.T) {
	if _, err := NewFile("", FileOptions{}, nil, nil); err == nil {
		t.Error("empty path accepted")
	}
	if _, err := NewFile("x", FileOptions{MaxSize: -1}, nil, nil); err == nil {
		t.Error("negative MaxSize accepted")
	}
	reg := prometheus.NewRegistry()
	if _, err := NewFile("x", FileOptions{}, nil, reg); err != nil {
		t.Fatal(err)
	}
	if !panics(func() { _, _ = NewFile("x", FileOptions{}, nil, reg) }) {
		t.Error("second registration on the same registry accepted")
	}
}

// panics reports whether f panicked: registering a component's metrics
// twice on one registry is a programming error (promauto's MustRegister).
func panics(f func()) (did bool) {
	defer func() { did = recover() != nil }()
	f()
	return false
}
