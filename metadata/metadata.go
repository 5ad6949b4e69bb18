// Package metadata is the small IMDSv2 client the daemon uses for its own
// reads of the real instance metadata service: the instance id (session
// name, rollout bucket), instance tags (rollout group) and the signed
// instance identity document (issuer attestation).
//
// It always uses IMDSv2 (a session token from PUT /latest/api/token, kept
// for its TTL and shared by concurrent callers), never an HTTP proxy (IMDS is
// link-local), bounds every answer's size, and follows no redirect. It is a
// leaf: it imports nothing of the project.
package metadata

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"
)

// DefaultBase is the real IMDS.
const DefaultBase = "http://169.254.169.254"

// MaxBody bounds an answer Get accepts, in bytes.
const MaxBody = 64 << 10

// tokenTTL is the session token lifetime asked for; the token is reused
// until tokenTTL-tokenSlack after it was obtained.
const (
	tokenTTL   = 300 * time.Second
	tokenSlack = 30 * time.Second
)

// StatusError is a non-200 answer of IMDS.
type StatusError struct {
	Path   string
	Status int
}

func (e *StatusError) Error() string {
	return fmt.Sprintf("IMDS GET %s: HTTP %d", e.Path, e.Status)
}

// IsNotFound reports whether err is a 404 answer (a path the instance does
// not have, such as instance tags not exposed in metadata).
func IsNotFound(err error) bool {
	var se *StatusError
	return errors.As(err, &se) && se.Status == http.StatusNotFound
}

// Client reads the real IMDS. Create it with New; it is safe for concurrent
// use.
type Client struct {
	base string
	hc   *http.Client
	now  func() time.Time

	mu      sync.Mutex
	token   string
	expires time.Time
}

// New returns a client of the IMDS at base (http[s]://host[:port], no path),
// every call bounded by timeout (0: 2s).
func New(base string, timeout time.Duration) (*Client, error) {
	u, err := url.Parse(base)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" ||
		(u.Path != "" && u.Path != "/") || u.RawQuery != "" || u.User != nil {
		return nil, fmt.Errorf("metadata: %q is not a base URL such as http://169.254.169.254", base)
	}
	if timeout <= 0 {
		timeout = 2 * time.Second
	}
	tr := &http.Transport{
		Proxy:                 nil,
		DialContext:           (&net.Dialer{Timeout: time.Second}).DialContext,
		ResponseHeaderTimeout: timeout,
		MaxIdleConnsPerHost:   1,
		IdleConnTimeout:       30 * time.Second,
	}
	return &Client{
		base: strings.TrimRight(u.String(), "/"),
		hc: &http.Client{Transport: tr, Timeout: timeout,
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }},
		now: time.Now,
	}, nil
}

// Base returns the IMDS base URL.
func (c *Client) Base() string { return c.base }

// Get returns the body of GET <base><path> (path starting with /latest/),
// at most MaxBody bytes. A non-200 answer is a *StatusError; a 401 drops the
// session token and is retried once with a new one.
func (c *Client) Get(ctx context.Context, path string) ([]byte, error) {
	for attempt := 0; ; attempt++ {
		tok, err := c.sessionToken(ctx)
		if err != nil {
			return nil, err
		}
		body, status, err := c.do(ctx, http.MethodGet, path, http.Header{"X-Aws-Ec2-Metadata-Token": {tok}})
		if err != nil {
			return nil, fmt.Errorf("IMDS GET %s: %w", path, err)
		}
		if status == http.StatusUnauthorized && attempt == 0 {
			c.dropToken(tok)
			continue
		}
		if status != http.StatusOK {
			return nil, &StatusError{Path: path, Status: status}
		}
		return body, nil
	}
}

// InstanceID returns the instance id (i-…), validated.
func (c *Client) InstanceID(ctx context.Context) (string, error) {
	b, err := c.Get(ctx, "/latest/meta-data/instance-id")
	if err != nil {
		return "", err
	}
	id := strings.TrimSpace(string(b))
	if !ValidInstanceID(id) {
		return "", fmt.Errorf("IMDS instance-id: %q is not an instance id", truncate(id, 32))
	}
	return id, nil
}

// ValidInstanceID reports whether id looks like an EC2 instance id: "i-"
// and 1..61 letters or digits.
func ValidInstanceID(id string) bool {
	if len(id) < 3 || len(id) > 63 || !strings.HasPrefix(id, "i-") {
		return false
	}
	for _, r := range id[2:] {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9') {
			return false
		}
	}
	return true
}

func (c *Client) sessionToken(ctx context.Context) (string, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.token != "" && c.now().Before(c.expires) {
		return c.token, nil
	}
	body, status, err := c.do(ctx, http.MethodPut, "/latest/api/token",
		http.Header{"X-Aws-Ec2-Metadata-Token-Ttl-Seconds": {fmt.Sprint(int(tokenTTL / time.Second))}})
	if err != nil {
		return "", fmt.Errorf("IMDSv2 token: %w", err)
	}
	if status != http.StatusOK {
		return "", fmt.Errorf("IMDSv2 token: HTTP %d", status)
	}
	tok := strings.TrimSpace(string(body))
	if tok == "" || strings.ContainsAny(tok, "\r\n") {
		return "", errors.New("IMDSv2 token: empty or malformed answer")
	}
	c.token, c.expires = tok, c.now().Add(tokenTTL-tokenSlack)
	return tok, nil
}

func (c *Client) dropToken(tok string) {
	c.mu.Lock()
	if c.token == tok {
		c.token = ""
	}
	c.mu.Unlock()
}

func (c *Client) do(ctx context.Context, method, path string, h http.Header) ([]byte, int, error) {
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, nil)
	if err != nil {
		return nil, 0, err
	}
	req.Header = h
	resp, err := c.hc.Do(req)
	if err != nil {
		var ue *url.Error
		if errors.As(err, &ue) && ue.Err != nil {
			err = ue.Err // the URL is known to the caller; keep the cause
		}
		return nil, 0, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, MaxBody+1))
	if err != nil {
		return nil, 0, err
	}
	if len(body) > MaxBody {
		return nil, 0, fmt.Errorf("answer larger than %d bytes", MaxBody)
	}
	return body, resp.StatusCode, nil
}

func truncate(s string, n int) string {
	if len(s) > n {
		return s[:n] + "…"
	}
	return s
}
