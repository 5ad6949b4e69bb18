package exchange

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

	"go.uber.org/zap"

	"github.com/imdsproxy/imdsproxy/creds"
)

// SourceFederation is the creds.Credentials.Source of credentials from
// Federation.
const SourceFederation = "federation"

// opFederation names the operation in errors.
const opFederation = "federation GET"

// FederationConfig configures NewFederation.
type FederationConfig struct {
	// URL is the credential endpoint (federation.url). It must be https, or
	// http to a loopback host (127.0.0.0/8, ::1, localhost; for tests).
	// Required.
	URL string
	// CAFile is a PEM file of extra CA certificates trusted for URL, in
	// addition to the system roots. Not allowed with HTTPClient.
	CAFile string
	// ClientCertificate, when set, is called during each TLS handshake for
	// a client certificate (mutual TLS with the host's X.509 identity), so
	// a rotated certificate is used at once. A nil certificate with a nil
	// error sends none. Not allowed with HTTPClient.
	ClientCertificate func(ctx context.Context) (*tls.Certificate, error)
	// Timeout bounds one Fetch (token and HTTP request); 0 means the
	// caller's deadline, or DefaultTimeout (20 s) when it has none.
	Timeout time.Duration
	// HTTPClient replaces the client built from CAFile and
	// ClientCertificate (tests). Redirects are its own business; the built
	// client refuses them.
	HTTPClient *http.Client
}

// Federation fetches credentials from an organisation's credential-vending
// endpoint, authenticating with the host's identity JWT (see
// docs/federation.md for the protocol):
//
//	GET <URL>
//	Authorization: Bearer <jwt>
//	Accept: application/json
//
// answered with 200 and the container-credentials JSON document
// {"AccessKeyId", "SecretAccessKey", "Token", "Expiration" (RFC 3339),
// optional "AccountId", "RoleArn"}. The endpoint decides the role from the
// JWT. Federation is safe for concurrent use and has no cache of its own.
type Federation struct {
	url      string // as configured
	redacted string // without user info, query and fragment
	client   *http.Client
	timeout  time.Duration
	tokens   TokenSource
	log      *zap.Logger
	now      func() time.Time
}

// NewFederation checks cfg and builds the HTTP client: TLS 1.2 or later,
// the system roots plus CAFile, the optional client certificate, HTTP(S)_PROXY
// honoured, redirects refused (the request carries a bearer token). log may
// be nil.
func NewFederation(cfg FederationConfig, tokens TokenSource, log *zap.Logger) (*Federation, error) {
	if tokens == nil {
		return nil, errors.New("exchange: federation: nil token source")
	}
	redacted, err := checkFederationURL(cfg.URL)
	if err != nil {
		return nil, err
	}
	if cfg.Timeout < 0 {
		return nil, errors.New("exchange: federation: negative Timeout")
	}
	if log == nil {
		log = zap.NewNop()
	}
	client := cfg.HTTPClient
	if client != nil && (cfg.CAFile != "" || cfg.ClientCertificate != nil) {
		return nil, errors.New("exchange: federation: HTTPClient cannot be combined with CAFile or ClientCertificate")
	}
	if client == nil {
		pool, err := x509.SystemCertPool()
		if err != nil || pool == nil {
			pool = x509.NewCertPool()
		}
		if cfg.CAFile != "" {
			pem, err := os.ReadFile(cfg.CAFile)
			if err != nil {
				return nil, fmt.Errorf("exchange: federation: ca_file: %w", err)
			}
			if !pool.AppendCertsFromPEM(pem) {
				return nil, fmt.Errorf("exchange: federation: ca_file %s holds no PEM certificate", cfg.CAFile)
			}
		}
		tc := &tls.Config{MinVersion: tls.VersionTLS12, RootCAs: pool}
		if get := cfg.ClientCertificate; get != nil {
			tc.GetClientCertificate = func(cri *tls.CertificateRequestInfo) (*tls.Certificate, error) {
				c, err := get(cri.Context())
				if err != nil {
					return nil, fmt.Errorf("client certificate: %w", err)
				}
				if c == nil {
					return &tls.Certificate{}, nil
				}
				return c, nil
			}
		}
		tr := http.DefaultTransport.(*http.Transport).Clone()
		tr.TLSClientConfig = tc
		client = &http.Client{
			Transport:     tr,
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		}
	}
	return &Federation{
		url:      cfg.URL,
		redacted: redacted,
		client:   client,
		timeout:  cfg.Timeout,
		tokens:   tokens,
		log:      log,
		now:      time.Now,
	}, nil
}

// URL returns the endpoint without user info, query or fragment.
func (f *Federation) URL() string { return f.redacted }

// Fetch reads the identity token and asks the endpoint for credentials of
// role. The endpoint decides the role from the token; Fetch checks that the
// answer is role's: when both the answer's RoleArn and role.ARN are known,
// their account and role name must agree, else the answer is refused (class
// validation, permanent: the endpoint and the configuration disagree).
//
// Errors are *Error, or the token source's error wrapped with %w (its
// ErrorClass/Permanent stay reachable with errors.As). HTTP statuses are
// classified: 401/403 access_denied and 400/404 validation (permanent), 408
// timeout, 429 throttling, 5xx server, any other 4xx validation (permanent),
// anything else and unusable 2xx answers invalid_response. A JSON error body
// {"code": "...", "message": "..."} fills Code and Message. Neither errors nor
// log lines contain the token or the credentials. On success the
// credentials are Complete and valid now.
func (f *Federation) Fetch(ctx context.Context, role creds.Role) (creds.Credentials, error) {
	if role.Subject != "" {
		return creds.Credentials{}, subjectRefused(opFederation, role)
	}
	ctx, cancel := bound(ctx, f.timeout)
	defer cancel()

	tok, err := f.tokens.Token(ctx)
	if err != nil {
		var classed interface{ ErrorClass() string }
		if errors.As(err, &classed) {
			return creds.Credentials{}, fmt.Errorf("exchange: federation identity token: %w", err)
		}
		e := Classify(err)
		if e.Class == ClassOther && ctx.Err() == nil {
			e.Class = ClassIdentity
		}
		e.Op = "read identity token"
		return creds.Credentials{}, e
	}
	if tok == "" {
		return creds.Credentials{}, &Error{Op: "read identity token", Class: ClassIdentity, Message: "token source returned an empty token"}
	}

	req, err := http.NewRequestWithContext(ctx, http.MethodGet, f.url, nil)
	if err != nil {
		return creds.Credentials{}, f.fail(ClassValidation, 0, "", "cannot build the request", nil)
	}
	req.Header.Set("Authorization", "Bearer "+tok)
	req.Header.Set("Accept", "application/json")
	req.Header.Set("User-Agent", "imdsproxy")
	resp, err := f.client.Do(req)
	if err != nil {
		return creds.Credentials{}, f.transport(err, tok)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, MaxResponseBody+1))
	if err != nil {
		return creds.Credentials{}, f.transport(err, tok)
	}
	if len(body) > MaxResponseBody {
		return creds.Credentials{}, f.fail(ClassInvalidResponse, resp.StatusCode, "", fmt.Sprintf("answer larger than %d bytes", MaxResponseBody), nil)
	}
	mt, _, _ := mime.ParseMediaType(resp.Header.Get("Content-Type"))
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		return creds.Credentials{}, f.statusError(resp.StatusCode, mt, body, tok)
	}
	c, err := f.convert(mt, body)
	if err != nil {
		return creds.Credentials{}, err
	}
	if !sameRole(role.ARN, c.RoleARN, c.AccountID) {
		got := c.RoleARN
		if got == "" {
			got = "account " + c.AccountID
		}
		return creds.Credentials{}, f.fail(ClassValidation, resp.StatusCode, "",
			sanitize(fmt.Sprintf("the endpoint answered credentials of %s, not of the configured role %s", got, role.ARN), maxMessage, false), nil)
	}
	f.log.Debug("fetched federation credentials", zap.Object("credentials", c))
	return c, nil
}

// federationDoc is the container-credentials JSON document.
type federationDoc struct {
	AccessKeyID     string `json:"AccessKeyId"`
	SecretAccessKey string `json:"SecretAccessKey"`
	Token           string `json:"Token"`
	Expiration      string `json:"Expiration"`
	AccountID       string `json:"AccountId"`
	RoleARN         string `json:"RoleArn"`
}

func (f *Federation) convert(mt string, body []byte) (creds.Credentials, error) {
	invalid := func(msg string) (creds.Credentials, error) {
		return creds.Credentials{}, f.fail(ClassInvalidResponse, http.StatusOK, "", msg, nil)
	}
	if mt == "text/html" {
		return invalid("answered text/html, not credentials (a proxy or login page?)")
	}
	var d federationDoc
	if err := json.Unmarshal(body, &d); err != nil {
		return invalid("answer is not a JSON credentials document")
	}
	now := f.now()
	switch {
	case d.AccessKeyID == "":
		return invalid("answer lacks AccessKeyId")
	case d.SecretAccessKey == "":
		return invalid("answer lacks SecretAccessKey")
	case d.Token == "":
		return invalid("answer lacks Token")
	case d.Expiration == "":
		return invalid("answer lacks Expiration")
	}
	exp, err := time.Parse(time.RFC3339, d.Expiration)
	if err != nil {
		return invalid("Expiration is not an RFC 3339 time")
	}
	if !exp.After(now) {
		return invalid(fmt.Sprintf("credentials expired at %s (check the host clock)", exp.UTC().Format(time.RFC3339)))
	}
	c := creds.Credentials{
		AccessKeyID:     sanitize(d.AccessKeyID, 128, false),
		SecretAccessKey: d.SecretAccessKey,
		SessionToken:    d.Token,
		Expires:         exp.UTC(),
		LastUpdated:     now.UTC(),
		RoleARN:         sanitize(d.RoleARN, 2048, false),
		Source:          SourceFederation,
	}
	if c.AccessKeyID != d.AccessKeyID {
		return invalid("AccessKeyId holds control characters or is too long")
	}
	if isAccountID(d.AccountID) {
		c.AccountID = d.AccountID
	} else {
		c.AccountID = creds.AccountFromARN(d.RoleARN)
	}
	if !c.Complete() {
		return invalid("incomplete credentials")
	}
	return c, nil
}

// sameRole reports whether an answer with role or assumed-role ARN got and
// account id acct may be of the role want (a role ARN): when want is
// unknown, yes; else the account (from got, else acct) must be want's, and
// when got is known its partition and role name must be want's.
func sameRole(want, got, acct string) bool {
	if want == "" {
		return true
	}
	if got == "" {
		return acct == "" || acct == creds.AccountFromARN(want)
	}
	return creds.AccountFromARN(want) == creds.AccountFromARN(got) && partitionOf(want) == partitionOf(got) &&
		roleNameOf(want) == roleNameOf(got)
}

// partitionOf is field 2 of an ARN.
func partitionOf(arn string) string {
	if parts := strings.SplitN(arn, ":", 3); len(parts) == 3 {
		return parts[1]
	}
	return ""
}

// roleNameOf is the role name of arn:…:role/[path/]NAME or
// arn:…:assumed-role/NAME/SESSION; "" for anything else.
func roleNameOf(arn string) string {
	parts := strings.SplitN(arn, ":", 6)
	if len(parts) != 6 {
		return ""
	}
	res := parts[5]
	switch {
	case strings.HasPrefix(res, "role/"):
		return res[strings.LastIndex(res, "/")+1:]
	case strings.HasPrefix(res, "assumed-role/"):
		name, _, _ := strings.Cut(strings.TrimPrefix(res, "assumed-role/"), "/")
		return name
	}
	return ""
}

func isAccountID(s string) bool {
	if len(s) != 12 {
		return false
	}
	for _, r := range s {
		if r < '0' || r > '9' {
			return false
		}
	}
	return true
}

// statusError classifies a non-2xx answer.
func (f *Federation) statusError(status int, mt string, body []byte, tok string) *Error {
	var class string
	switch {
	case status == http.StatusUnauthorized, status == http.StatusForbidden:
		class = ClassAccessDenied
	case status == http.StatusBadRequest, status == http.StatusNotFound:
		class = ClassValidation
	case status == http.StatusRequestTimeout:
		class = ClassTimeout
	case status == http.StatusTooManyRequests:
		class = ClassThrottling
	case status >= 500 && status <= 599:
		class = ClassServer
	case status >= 400 && status <= 499:
		class = ClassValidation
	default:
		class = ClassInvalidResponse
	}
	var code, msg string
	var eb struct {
		Code    any `json:"code"`
		Message any `json:"message"`
	}
	if mt != "text/html" && json.Unmarshal(body, &eb) == nil {
		if s, ok := eb.Code.(string); ok {
			code = s
		}
		if s, ok := eb.Message.(string); ok {
			msg = s
		}
	}
	switch {
	case mt == "text/html":
		msg = "answered an HTML page (a proxy or login page?)"
	case code == "" && msg == "" && len(body) > 0:
		msg = headWords(body, maxQuotedBody)
	}
	return f.fail(class, status, redactSecret(code, tok, 128), redactSecret(msg, tok, maxMessage), nil)
}

// transport classifies a failure to get an HTTP answer.
func (f *Federation) transport(err error, tok string) *Error {
	var ue *url.Error
	if errors.As(err, &ue) && ue.Err != nil {
		err = ue.Err // drop "Get <url>:" (the URL may carry a query)
	}
	e := Classify(err)
	e.Op = opFederation + " " + f.redacted
	e.Message = redactSecret(e.Message, tok, maxMessage)
	var cve *tls.CertificateVerificationError
	var uae x509.UnknownAuthorityError
	var hne x509.HostnameError
	var ce x509.CertificateInvalidError
	var rhe tls.RecordHeaderError
	if e.Class == ClassOther && (errors.As(err, &cve) || errors.As(err, &uae) || errors.As(err, &hne) ||
		errors.As(err, &ce) || errors.As(err, &rhe)) {
		e.Class = ClassNetwork
	}
	f.log.Debug("federation request failed", zap.String("class", e.Class), zap.String("url", f.redacted))
	return e
}

func (f *Federation) fail(class string, status int, code, msg string, err error) *Error {
	e := &Error{
		Op:         opFederation + " " + f.redacted,
		Class:      class,
		Code:       code,
		Message:    msg,
		HTTPStatus: status,
		Err:        err,
		permanent:  permanentClass[class],
	}
	f.log.Debug("federation request failed", zap.String("class", class), zap.Int("http_status", status),
		zap.String("code", code), zap.String("url", f.redacted))
	return e
}

// maxQuotedBody bounds how much of an error body is redacted and then cut
// to maxMessage bytes: enough for redaction to have shrunk what comes first.
const maxQuotedBody = 16 << 10

// headWords returns the first max bytes of b, without the word the limit
// cuts through (a secret cut in two is recognised by no rule).
func headWords(b []byte, max int) string {
	if len(b) <= max {
		return string(b)
	}
	b = b[:max]
	if i := bytes.LastIndexAny(b, " \t\r\n"); i >= 0 {
		b = b[:i]
	} else {
		b = nil
	}
	return string(b)
}

// redactSecret removes tok, then everything creds.RedactText recognises
// (JWTs whole or cut, long-term key ids, secret keys, session tokens) from
// s, and only then cuts it to at most max bytes (sanitizeMessage).
func redactSecret(s, tok string, max int) string {
	if tok != "" {
		s = strings.ReplaceAll(s, tok, "<redacted>")
	}
	return sanitizeMessage(s, max, false)
}

// checkFederationURL accepts https URLs and http URLs to a loopback host and
// returns the URL without user info, query and fragment.
func checkFederationURL(s string) (string, error) {
	u, err := url.Parse(s)
	if err != nil || u.Host == "" || u.Opaque != "" {
		return "", errors.New("exchange: federation: url is not an absolute URL")
	}
	r := *u
	r.User, r.RawQuery, r.ForceQuery, r.Fragment, r.RawFragment = nil, "", false, "", ""
	redacted := r.String()
	switch u.Scheme {
	case "https":
	case "http":
		h := u.Hostname()
		ip := net.ParseIP(h)
		if !strings.EqualFold(h, "localhost") && (ip == nil || !ip.IsLoopback()) {
			return "", fmt.Errorf("exchange: federation: %s: https is required (http only to a loopback host)", redacted)
		}
	default:
		return "", fmt.Errorf("exchange: federation: %s: scheme must be https", redacted)
	}
	return redacted, nil
}
