package token

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/imdsproxy/imdsproxy/creds"
)

// Reasons of URL.Token failures, in addition to the shared ones
// (ReasonEmpty, ReasonTooLarge, ReasonMalformed, ReasonExpired). None is
// permanent: the issuer or IMDS may recover.
const (
	// ReasonDocumentUnavailable: the instance identity document or its
	// PKCS7 signature could not be read from IMDS.
	ReasonDocumentUnavailable = "document_unavailable"
	// ReasonIssuerFailed: the issuer could not be reached or did not answer
	// 200 with a token (HTTP error, HTML page, JSON without "token", ...).
	ReasonIssuerFailed = "issuer_failed"
	// ReasonIssuerTimeout: the issuer did not answer within
	// URLOptions.Timeout.
	ReasonIssuerTimeout = "issuer_timeout"
)

// DefaultIMDSBase is the real IMDS, the default URLOptions.IMDSBase.
const DefaultIMDSBase = "http://169.254.169.254"

// Limits of URL.
const (
	// DefaultURLTimeout bounds one fetch (IMDS and issuer together).
	DefaultURLTimeout = 10 * time.Second
	// maxIdentityDocument bounds the identity document and the signature.
	maxIdentityDocument = 64 << 10
	// maxIssuerExcerpt is the longest part of an issuer's error body quoted
	// in an error, after sanitizing.
	maxIssuerExcerpt = 200
	// maxQuotedBody bounds how much of an issuer's error body is redacted
	// before it is cut to maxIssuerExcerpt.
	maxQuotedBody = 16 << 10
	// imdsTokenTTL is the TTL of the IMDSv2 session token asked for.
	imdsTokenTTL = "60"
)

// URLOptions tunes a URL. The zero value is usable.
type URLOptions struct {
	// IMDSBase is the IMDS the identity document is read from; "" means
	// DefaultIMDSBase. In the daemon it is the configured upstream.
	// Requests to it never go through an HTTP proxy.
	IMDSBase string
	// CAFile is a PEM file of extra CA certificates trusted for the issuer,
	// in addition to the system roots. Not allowed with HTTPClient.
	CAFile string
	// Timeout bounds one fetch (IMDS and issuer requests together); 0
	// means DefaultURLTimeout (10 s).
	Timeout time.Duration
	// HTTPClient is used for the issuer request; nil means a client with
	// TLS 1.2+, the system roots plus CAFile, HTTP(S)_PROXY honoured and
	// redirects refused. Tests use it.
	HTTPClient *http.Client
	// Now returns the current time (expiry checks, caching); nil means
	// time.Now.
	Now func() time.Time
}

// URL is a token source that obtains the JWT from an issuer over HTTPS
// (identity.jwt_url), proving the host's identity with the EC2 instance
// identity document and its PKCS7 signature. It is safe for concurrent use.
//
// One fetch reads /latest/dynamic/instance-identity/document and
// /latest/dynamic/instance-identity/pkcs7 from IMDS (IMDSv2: a PUT for a
// session token, then two GETs), then sends
//
//	POST <issuer URL>
//	Content-Type: application/json
//	Accept: application/json, text/plain
//
//	{"document": "<the document JSON, verbatim, as a string>", "pkcs7": "<the base64 signature, line breaks removed>"}
//
// and expects 200 with either Content-Type application/json and a body
// {"token": "<jwt>"}, or Content-Type text/plain (or application/jwt, or
// none) and the JWT as the whole body. Any other answer is an error naming
// the status or the content type. See docs/federation.md.
//
// Tokens are cached and validated like Command's; concurrent callers share
// one fetch.
type URL struct {
	issuer   string // as configured
	redacted string // without user info, query and fragment: for errors and logs
	imdsBase string
	client   *http.Client
	imds     *http.Client
	jwt      *jwtSource
}

// NewURL returns a URL asking issuerURL. issuerURL must be https, or http to
// a loopback host (127.0.0.0/8, ::1, localhost; for tests). log may be nil.
// reg may be nil (no metrics); otherwise the metrics of NewCommand are
// registered, with source="url". NewURL fails on a bad URL, an unreadable
// or empty CAFile, CAFile together with HTTPClient, a negative Timeout or
// when the metrics cannot be registered.
func NewURL(issuerURL string, opts URLOptions, log *zap.Logger, reg prometheus.Registerer) (*URL, error) {
	redacted, err := checkIssuerURL(issuerURL)
	if err != nil {
		return nil, err
	}
	if opts.IMDSBase == "" {
		opts.IMDSBase = DefaultIMDSBase
	}
	ib, err := url.Parse(opts.IMDSBase)
	if err != nil || (ib.Scheme != "http" && ib.Scheme != "https") || ib.Host == "" {
		return nil, fmt.Errorf("token: jwt_url: IMDS base %q is not an http(s) URL", opts.IMDSBase)
	}
	if opts.Timeout < 0 {
		return nil, fmt.Errorf("token: jwt_url: negative timeout %s", opts.Timeout)
	}
	if opts.Timeout == 0 {
		opts.Timeout = DefaultURLTimeout
	}
	if log == nil {
		log = zap.NewNop()
	}
	client := opts.HTTPClient
	if client != nil && opts.CAFile != "" {
		return nil, errors.New("token: jwt_url: set either CAFile or HTTPClient, not both")
	}
	if client == nil {
		tc, err := urlTLSConfig(opts.CAFile)
		if err != nil {
			return nil, err
		}
		tr := http.DefaultTransport.(*http.Transport).Clone()
		tr.TLSClientConfig = tc
		client = &http.Client{Transport: tr, CheckRedirect: refuseRedirect}
	}
	u := &URL{
		issuer:   issuerURL,
		redacted: redacted,
		imdsBase: strings.TrimRight(opts.IMDSBase, "/"),
		client:   client,
		imds: &http.Client{
			// Never through a proxy: IMDS is link-local.
			Transport:     &http.Transport{Proxy: nil, DisableKeepAlives: true},
			CheckRedirect: refuseRedirect,
		},
	}
	src, err := newJWTSource(jwtSourceConfig{
		source:  "url",
		path:    redacted,
		timeout: opts.Timeout,
		now:     opts.Now,
		log:     log,
		reg:     reg,
		reasons: []string{ReasonDocumentUnavailable, ReasonIssuerFailed, ReasonIssuerTimeout},
		fetch:   u.fetch,
	})
	if err != nil {
		return nil, err
	}
	u.jwt = src
	return u, nil
}

// Path returns the issuer URL without user info, query or fragment.
func (u *URL) Path() string { return u.redacted }

// Token returns the cached token while it is far enough from expiry (now <
// exp − max(60 s, 10 % of its lifetime)), else fetches a new one from the
// issuer, checks it with ParseClaims and refuses an expired token.
// Concurrent callers share one fetch, bounded by URLOptions.Timeout and not
// cancelled when a caller gives up; a caller whose ctx ends first gets ctx's
// error. Other errors are *Error (class "identity"); they never contain the
// token, and quote at most 200 sanitized characters of an issuer's error
// body.
func (u *URL) Token(ctx context.Context) (string, error) { return u.jwt.Token(ctx) }

// Forget drops the remembered token if it is tok, so that the next Token
// asks the issuer again (see Command.Forget). Safe for concurrent use.
func (u *URL) Forget(tok string) { u.jwt.forget(tok) }

func (u *URL) fetch(ctx context.Context) (string, []zap.Field, error) {
	doc, sig, err := u.identityDocument(ctx)
	if err != nil {
		if ctx.Err() != nil {
			err = fmt.Errorf("no answer within %s: %w", u.jwt.timeout, err)
		}
		return "", nil, u.jwt.fail(ReasonDocumentUnavailable, err)
	}
	body, err := json.Marshal(struct {
		Document string `json:"document"`
		PKCS7    string `json:"pkcs7"`
	}{doc, sig})
	if err != nil {
		return "", nil, u.jwt.fail(ReasonIssuerFailed, err)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, u.issuer, bytes.NewReader(body))
	if err != nil {
		return "", nil, u.jwt.fail(ReasonIssuerFailed, errors.New("cannot build the request"))
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "application/json, text/plain")
	req.Header.Set("User-Agent", "imdsproxy")
	resp, err := u.client.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return "", nil, u.jwt.fail(ReasonIssuerTimeout, fmt.Errorf("no answer from the issuer within %s", u.jwt.timeout))
		}
		return "", nil, u.jwt.fail(ReasonIssuerFailed, transportError(err))
	}
	defer resp.Body.Close()
	if resp.StatusCode == http.StatusOK && resp.ContentLength > MaxTokenSize {
		// Refused before reading any of it; closing the body drops the
		// connection rather than reading on.
		return "", nil, u.jwt.fail(ReasonTooLarge, fmt.Errorf("issuer answer of %d bytes is larger than %d", resp.ContentLength, MaxTokenSize))
	}
	// Never more than MaxTokenSize+1 bytes are read, whatever the answer
	// holds: a bigger one is refused below.
	b, err := io.ReadAll(io.LimitReader(resp.Body, MaxTokenSize+1))
	if err != nil {
		if ctx.Err() != nil {
			return "", nil, u.jwt.fail(ReasonIssuerTimeout, fmt.Errorf("issuer answer not complete within %s", u.jwt.timeout))
		}
		return "", nil, u.jwt.fail(ReasonIssuerFailed, fmt.Errorf("read the issuer's answer: %w", transportError(err)))
	}
	mt, _, _ := mime.ParseMediaType(resp.Header.Get("Content-Type"))
	if resp.StatusCode != http.StatusOK {
		msg := fmt.Sprintf("issuer answered HTTP %d", resp.StatusCode)
		if ex := excerpt(b); ex != "" && mt != "text/html" {
			msg += ": " + ex
		} else if mt == "text/html" {
			msg += " (an HTML page)"
		}
		return "", nil, u.jwt.fail(ReasonIssuerFailed, errors.New(msg))
	}
	if len(b) > MaxTokenSize {
		return "", nil, u.jwt.fail(ReasonTooLarge, fmt.Errorf("issuer answer larger than %d bytes", MaxTokenSize))
	}
	switch mt {
	case "application/json":
		var out struct {
			Token *string `json:"token"`
		}
		if err := json.Unmarshal(b, &out); err != nil {
			return "", nil, u.jwt.fail(ReasonIssuerFailed, errors.New(`issuer answered application/json that is not an object with a "token" string`))
		}
		if out.Token == nil {
			return "", nil, u.jwt.fail(ReasonIssuerFailed, errors.New(`issuer's JSON answer has no "token"`))
		}
		return *out.Token, nil, nil
	case "text/plain", "application/jwt", "":
		return string(b), nil, nil
	default:
		return "", nil, u.jwt.fail(ReasonIssuerFailed, fmt.Errorf("issuer answered %s, not a token", sanitizeText(mt, 64)))
	}
}

// identityDocument reads the instance identity document and its PKCS7
// signature with IMDSv2.
func (u *URL) identityDocument(ctx context.Context) (doc, sig string, err error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPut, u.imdsBase+"/latest/api/token", nil)
	if err != nil {
		return "", "", err
	}
	req.Header.Set("X-aws-ec2-metadata-token-ttl-seconds", imdsTokenTTL)
	tok, err := u.imdsDo(req)
	if err != nil {
		return "", "", fmt.Errorf("IMDSv2 token: %w", err)
	}
	tok = strings.TrimSpace(tok)
	get := func(path string) (string, error) {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.imdsBase+path, nil)
		if err != nil {
			return "", err
		}
		req.Header.Set("X-aws-ec2-metadata-token", tok)
		s, err := u.imdsDo(req)
		if err != nil {
			return "", fmt.Errorf("GET %s: %w", path, err)
		}
		return s, nil
	}
	if doc, err = get("/latest/dynamic/instance-identity/document"); err != nil {
		return "", "", err
	}
	var probe map[string]any
	if json.Unmarshal([]byte(doc), &probe) != nil || probe == nil {
		return "", "", errors.New("the instance identity document is not a JSON object")
	}
	if sig, err = get("/latest/dynamic/instance-identity/pkcs7"); err != nil {
		return "", "", err
	}
	sig = strings.Join(strings.Fields(sig), "")
	if sig == "" {
		return "", "", errors.New("the instance identity signature (pkcs7) is empty")
	}
	return doc, sig, nil
}

func (u *URL) imdsDo(req *http.Request) (string, error) {
	resp, err := u.imds.Do(req)
	if err != nil {
		return "", transportError(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, maxIdentityDocument+1))
	if err != nil {
		return "", transportError(err)
	}
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("IMDS answered HTTP %d", resp.StatusCode)
	}
	if len(b) > maxIdentityDocument {
		return "", fmt.Errorf("IMDS answer larger than %d bytes", maxIdentityDocument)
	}
	return string(b), nil
}

// transportError drops the *url.Error wrapper (which repeats the method and
// the full URL) and keeps the cause.
func transportError(err error) error {
	var ue *url.Error
	if errors.As(err, &ue) && ue.Err != nil {
		return ue.Err
	}
	return err
}

// excerpt returns at most maxIssuerExcerpt sanitized characters of an error
// body, redacted with creds.RedactText before it is cut (and without the
// word a first cut to 16 KiB went through).
func excerpt(b []byte) string {
	if len(b) > maxQuotedBody {
		b = dropCutWord(b[:maxQuotedBody])
	}
	return sanitizeText(creds.RedactText(string(b)), maxIssuerExcerpt)
}

func refuseRedirect(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }

// checkIssuerURL accepts https URLs and http URLs to a loopback host, and
// returns the URL without user info, query and fragment.
func checkIssuerURL(s string) (string, error) {
	u, err := url.Parse(s)
	if err != nil || u.Host == "" || u.Opaque != "" {
		return "", errors.New("token: jwt_url: not an absolute URL")
	}
	r := *u
	r.User, r.RawQuery, r.ForceQuery, r.Fragment, r.RawFragment = nil, "", false, "", ""
	redacted := r.String()
	switch u.Scheme {
	case "https":
	case "http":
		if !urlLoopbackHost(u.Hostname()) {
			return "", fmt.Errorf("token: jwt_url %s: https is required (http only to a loopback host)", redacted)
		}
	default:
		return "", fmt.Errorf("token: jwt_url %s: scheme must be https", redacted)
	}
	return redacted, nil
}

func urlLoopbackHost(h string) bool {
	if strings.EqualFold(h, "localhost") {
		return true
	}
	ip := net.ParseIP(h)
	return ip != nil && ip.IsLoopback()
}

// urlTLSConfig returns TLS 1.2+ trusting the system roots plus caFile.
func urlTLSConfig(caFile string) (*tls.Config, error) {
	pool, err := x509.SystemCertPool()
	if err != nil || pool == nil {
		pool = x509.NewCertPool()
	}
	if caFile != "" {
		pem, err := os.ReadFile(caFile)
		if err != nil {
			return nil, fmt.Errorf("token: jwt_url: ca_file: %w", err)
		}
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("token: jwt_url: ca_file %s holds no PEM certificate", caFile)
		}
	}
	return &tls.Config{MinVersion: tls.VersionTLS12, RootCAs: pool}, nil
}
