package exchange

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/imdsproxy/imdsproxy/creds"
)

// deadlineTokens records how long the deadline of its ctx leaves, then fails.
type deadlineTokens struct {
	left        time.Duration
	hasDeadline bool
}

func (d *deadlineTokens) Token(ctx context.Context) (string, error) {
	dl, ok := ctx.Deadline()
	d.hasDeadline = ok
	if ok {
		d.left = time.Until(dl)
	}
	return "", errors.New("stop here")
}

// TestFetchTimeoutBoundsTheExchange: the daemon's exchanges (NewSource)
// configure no Timeout, so the caller's deadline — the cache's
// cache.fetch_timeout, up to 5 minutes — bounds a Fetch, not DefaultTimeout
// (20 s) underneath it; without a caller's deadline DefaultTimeout applies;
// a configured Timeout bounds the call whatever the caller allows.
func TestFetchTimeoutBoundsTheExchange(t *testing.T) {
	role := creds.Role{ARN: "arn:aws:iam::222222222222:role/app", Name: "app", SessionName: "host"}
	fetch := func(t *testing.T, cfg WebIdentityConfig, callerTimeout time.Duration) *deadlineTokens {
		t.Helper()
		tokens := &deadlineTokens{}
		cfg.Region = "us-east-1"
		w, err := NewWebIdentity(t.Context(), cfg, tokens, nil)
		if err != nil {
			t.Fatal(err)
		}
		ctx := t.Context()
		if callerTimeout > 0 {
			var cancel context.CancelFunc
			ctx, cancel = context.WithTimeout(ctx, callerTimeout)
			defer cancel()
		}
		if _, err := w.Fetch(ctx, role); err == nil {
			t.Fatal("Fetch succeeded with a failing token source")
		}
		if !tokens.hasDeadline {
			t.Fatal("the token read had no deadline")
		}
		return tokens
	}
	t.Run("caller's deadline above DefaultTimeout", func(t *testing.T) {
		if left := fetch(t, WebIdentityConfig{}, time.Minute).left; left < time.Minute-5*time.Second {
			t.Fatalf("the token read had %s left; the caller's 1m (cache.fetch_timeout) should bound it", left.Round(time.Second))
		}
	})
	t.Run("no caller's deadline", func(t *testing.T) {
		if left := fetch(t, WebIdentityConfig{}, 0).left; left > DefaultTimeout || left < DefaultTimeout-5*time.Second {
			t.Fatalf("the token read had %s left, want DefaultTimeout (%s)", left.Round(time.Second), DefaultTimeout)
		}
	})
	t.Run("configured Timeout", func(t *testing.T) {
		if left := fetch(t, WebIdentityConfig{Timeout: 3 * time.Second}, time.Minute).left; left > 3*time.Second {
			t.Fatalf("the token read had %s left, want at most the configured 3s", left.Round(time.Second))
		}
	})
	t.Run("through NewSource", func(t *testing.T) {
		tokens := &deadlineTokens{}
		f, err := NewSource(t.Context(), SourceSpec{Source: SourceNameWebIdentity, Region: "us-east-1"}, tokens, nil, nil, nil)
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
		defer cancel()
		_, _ = f.Fetch(ctx, role)
		if tokens.left < time.Minute-5*time.Second {
			t.Fatalf("the daemon's exchange cut the caller's 1m to %s", tokens.left.Round(time.Second))
		}
	})
}
