package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sync/singleflight"
)

const (
	// upstreamTokenTTL is the TTL, in seconds, the daemon asks the real IMDS for.
	upstreamTokenTTL = maxTokenTTL
	// upstreamTokenMargin: a cached upstream token is dropped this long before its TTL ends.
	upstreamTokenMargin = time.Minute
	// upstreamV1OnlyTTL: how long an "IMDSv1 only" answer (403/404/405 on the
	// token PUT) is remembered. A 401 on a GET re-probes at once.
	upstreamV1OnlyTTL = 5 * time.Minute
	// maxUpstreamDial bounds connecting to the real IMDS.
	maxUpstreamDial = time.Second
	// maxUpstreamTokenBytes bounds the body of the upstream token response.
	maxUpstreamTokenBytes = 4096
)

// passthrough forwards requests to the real IMDS with the daemon's own IMDSv2
// token. One passthrough exists per upstream URL; Update replaces it when the
// upstream changes. Safe for concurrent use.
type passthrough struct {
	target    *url.URL
	transport *http.Transport
	proxy     *httputil.ReverseProxy
}

func newPassthrough(target *url.URL, timeout time.Duration, m *metrics, log *zap.Logger, now func() time.Time) *passthrough {
	dial := min(maxUpstreamDial, timeout)
	transport := &http.Transport{
		Proxy:                  nil, // never send IMDS traffic through HTTP_PROXY
		DialContext:            (&net.Dialer{Timeout: dial, KeepAlive: 30 * time.Second}).DialContext,
		MaxIdleConns:           16,
		MaxIdleConnsPerHost:    16,
		IdleConnTimeout:        60 * time.Second,
		ResponseHeaderTimeout:  timeout,
		DisableCompression:     true, // stream the body unchanged; the client's Accept-Encoding passes through
		MaxResponseHeaderBytes: 64 << 10,
	}
	tokens := &upstreamTokens{
		base:     transport,
		tokenURL: target.JoinPath("/latest/api/token").String(),
		timeout:  timeout,
		now:      now,
		m:        m,
		log:      log,
	}
	rt := &upstreamRoundTripper{base: transport, tokens: tokens, timeout: timeout}
	errLog, _ := zap.NewStdLogAt(log, zap.DebugLevel)
	p := &passthrough{target: target, transport: transport}
	p.proxy = &httputil.ReverseProxy{
		Rewrite:   func(pr *httputil.ProxyRequest) { rewrite(pr, target) },
		Transport: rt,
		ErrorLog:  errLog,
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			passthroughError(w, r, err, m, log)
		},
	}
	return p
}

// close releases idle upstream connections. In-flight requests finish.
func (p *passthrough) close() { p.transport.CloseIdleConnections() }

// rewrite points the outbound request at target and strips what must not
// reach the real IMDS: forwarding headers (so no X-Forwarded-For is ever
// sent, which would make IMDS refuse the daemon's token PUT and reveal
// client addresses) and the client's own IMDS token headers.
func rewrite(pr *httputil.ProxyRequest, target *url.URL) {
	pr.SetURL(target)
	h := pr.Out.Header
	for k := range h {
		if strings.HasPrefix(k, "X-Forwarded-") {
			delete(h, k)
		}
	}
	h.Del("Forwarded")
	h.Del("X-Real-Ip")
	h.Del(headerToken)
	h.Del(headerTokenTTL)
}

// passthroughError is the ReverseProxy ErrorHandler: 504 when the upstream was
// too slow, 502 when it could not be reached or answered garbage.
func passthroughError(w http.ResponseWriter, r *http.Request, err error, m *metrics, log *zap.Logger) {
	status, reason := http.StatusBadGateway, ptErrUnreachable
	var ne net.Error
	switch {
	case errors.Is(err, context.DeadlineExceeded) || (errors.As(err, &ne) && ne.Timeout()):
		status, reason = http.StatusGatewayTimeout, ptErrTimeout
	case r.Context().Err() != nil:
		reason = "" // the client went away; not an upstream failure
	}
	if reason != "" {
		m.ptErrors.WithLabelValues(reason).Inc()
	}
	log.Debug("pass-through failed", zap.String("reason", reason), zap.Error(err))
	writeText(w, status, http.StatusText(status))
}

// upstreamRoundTripper adds the daemon's upstream token, bounds the whole
// exchange (token fetch, request, one retry and the streamed body) by timeout,
// and on a 401 drops the token, fetches a new one and retries once.
type upstreamRoundTripper struct {
	base    http.RoundTripper
	tokens  *upstreamTokens
	timeout time.Duration
}

func (t *upstreamRoundTripper) RoundTrip(req *http.Request) (*http.Response, error) {
	ctx, cancel := context.WithTimeout(req.Context(), t.timeout)
	resp, err := t.roundTrip(ctx, req)
	if err != nil {
		cancel()
		return nil, err
	}
	resp.Body = &cancelOnClose{ReadCloser: resp.Body, cancel: cancel}
	return resp, nil
}

func (t *upstreamRoundTripper) roundTrip(ctx context.Context, req *http.Request) (*http.Response, error) {
	// Only GET and HEAD reach here, without a body, so a retry is safe.
	canRetry := req.Body == nil || req.Body == http.NoBody
	for attempt := 0; ; attempt++ {
		tok, err := t.tokens.get(ctx)
		if err != nil {
			return nil, err
		}
		out := req.Clone(ctx)
		out.Header.Del(headerToken)
		if tok != "" {
			out.Header.Set(headerToken, tok)
		}
		resp, err := t.base.RoundTrip(out)
		if err != nil {
			return nil, err
		}
		if resp.StatusCode != http.StatusUnauthorized || attempt > 0 || !canRetry {
			return resp, nil
		}
		_, _ = io.CopyN(io.Discard, resp.Body, 4096) // let the connection be reused
		_ = resp.Body.Close()
		t.tokens.invalidate(tok)
	}
}

// cancelOnClose releases the per-request timeout when the body is closed.
type cancelOnClose struct {
	io.ReadCloser
	cancel context.CancelFunc
}

func (c *cancelOnClose) Close() error {
	err := c.ReadCloser.Close()
	c.cancel()
	return err
}

// upstreamTokens holds the daemon's IMDSv2 token for the real IMDS. The token
// is cached until upstreamTokenMargin before its TTL ends; concurrent fetches
// are shared. An upstream that answers the PUT with 403/404/405 is IMDSv1
// only: then the empty token is cached and requests go without one. Safe for
// concurrent use.
type upstreamTokens struct {
	base     http.RoundTripper
	tokenURL string
	timeout  time.Duration
	now      func() time.Time
	m        *metrics
	log      *zap.Logger

	sf    singleflight.Group
	mu    sync.Mutex
	tok   string
	valid bool
	until time.Time
}

// get returns the token to send ("" for an IMDSv1-only upstream). It waits for
// a fetch at most until ctx is done.
func (u *upstreamTokens) get(ctx context.Context) (string, error) {
	u.mu.Lock()
	if u.valid && u.now().Before(u.until) {
		tok := u.tok
		u.mu.Unlock()
		return tok, nil
	}
	u.mu.Unlock()
	// The fetch outlives an impatient caller: other callers share it.
	fctx := context.WithoutCancel(ctx)
	ch := u.sf.DoChan("token", func() (any, error) { return u.fetch(fctx) })
	select {
	case res := <-ch:
		if res.Err != nil {
			return "", res.Err
		}
		return res.Val.(string), nil
	case <-ctx.Done():
		return "", ctx.Err()
	}
}

// invalidate drops tok if it is still the cached token.
func (u *upstreamTokens) invalidate(tok string) {
	u.mu.Lock()
	if u.valid && u.tok == tok {
		u.valid = false
	}
	u.mu.Unlock()
}

func (u *upstreamTokens) store(tok string, lifetime time.Duration) {
	u.mu.Lock()
	u.tok, u.valid, u.until = tok, true, u.now().Add(lifetime)
	u.mu.Unlock()
}

func (u *upstreamTokens) fetch(ctx context.Context) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, u.timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPut, u.tokenURL, nil)
	if err != nil {
		u.m.upstreamTokens.WithLabelValues(fetchError).Inc()
		return "", fmt.Errorf("proxy: upstream token: %w", err)
	}
	req.Header.Set(headerTokenTTL, strconv.Itoa(upstreamTokenTTL))
	resp, err := u.base.RoundTrip(req)
	if err != nil {
		u.m.upstreamTokens.WithLabelValues(fetchError).Inc()
		return "", fmt.Errorf("proxy: upstream token: %w", err)
	}
	defer resp.Body.Close()
	switch resp.StatusCode {
	case http.StatusOK:
	case http.StatusForbidden, http.StatusNotFound, http.StatusMethodNotAllowed:
		u.m.upstreamTokens.WithLabelValues(fetchV1Only).Inc()
		u.log.Debug("upstream IMDS does not issue tokens; using IMDSv1", zap.Int("status", resp.StatusCode))
		u.store("", upstreamV1OnlyTTL)
		return "", nil
	default:
		u.m.upstreamTokens.WithLabelValues(fetchError).Inc()
		return "", fmt.Errorf("proxy: upstream token: HTTP %d", resp.StatusCode)
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxUpstreamTokenBytes+1))
	if err != nil {
		u.m.upstreamTokens.WithLabelValues(fetchError).Inc()
		return "", fmt.Errorf("proxy: upstream token: read: %w", err)
	}
	tok := string(body)
	if len(body) > maxUpstreamTokenBytes || !headerSafe(tok) {
		u.m.upstreamTokens.WithLabelValues(fetchError).Inc()
		return "", errors.New("proxy: upstream token: malformed token")
	}
	ttl := time.Duration(upstreamTokenTTL) * time.Second
	if v, err := strconv.Atoi(resp.Header.Get(headerTokenTTL)); err == nil && v > 0 && v <= upstreamTokenTTL {
		ttl = time.Duration(v) * time.Second
	}
	lifetime := ttl - upstreamTokenMargin
	if lifetime <= 0 {
		lifetime = ttl / 2
	}
	u.store(tok, lifetime)
	u.m.upstreamTokens.WithLabelValues(fetchSuccess).Inc()
	return tok, nil
}

// headerSafe reports whether s is a non-empty run of visible ASCII.
func headerSafe(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		if s[i] <= ' ' || s[i] >= 0x7f {
			return false
		}
	}
	return true
}
