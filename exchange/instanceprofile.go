package exchange

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/aws/ratelimit"
	"github.com/aws/aws-sdk-go-v2/aws/retry"
	"github.com/aws/aws-sdk-go-v2/feature/ec2/imds"
	"go.uber.org/zap"

	"github.com/imdsproxy/imdsproxy/creds"
)

// SourceInstanceProfile is the creds.Credentials.Source of credentials from
// InstanceProfile.
const SourceInstanceProfile = "instance-profile"

// DefaultInstanceProfileTimeout bounds one InstanceProfile.Fetch when
// InstanceProfileConfig.Timeout is 0.
const DefaultInstanceProfileTimeout = 5 * time.Second

// Limits of the upstream IMDS calls of InstanceProfile.
const (
	// profileMaxBody is the largest IMDS response body read, in bytes: the
	// bound of every upstream answer. A real credential document is about
	// 1.5 KiB, but its Token has no size of its own to check against (the
	// session-token size is not fixed), so only the whole answer is bounded.
	profileMaxBody = MaxResponseBody
	// profileDialTimeout and profileResponseHeaderTimeout bound one HTTP attempt, so
	// that a retry fits in the Fetch timeout. IMDS is link-local and fast.
	profileDialTimeout           = time.Second
	profileResponseHeaderTimeout = 2 * time.Second
	// profileMaxAttempts is the SDK attempts per IMDS request (the SDK's own
	// default); a 401 (expired session token) is retried with a new token.
	profileMaxAttempts = 3
)

// InstanceProfileConfig configures NewInstanceProfile.
type InstanceProfileConfig struct {
	// IMDSBase is the real instance metadata service, for example
	// "http://169.254.169.254" (http or https, no path). Required.
	IMDSBase string
	// RoleName is the instance profile's role. "" means: discover it from
	// the upstream listing iam/security-credentials/ (first line) on first
	// use and keep it.
	RoleName string
	// Timeout bounds one Fetch (or RoleName) call, every upstream request and
	// retry included; 0 means DefaultInstanceProfileTimeout.
	Timeout time.Duration
}

// InstanceProfile reads the host's own instance-profile credentials from the
// real IMDS (the daemon's upstream) with the aws-sdk-go-v2 IMDS client:
// IMDSv2 always, except that once upstream refuses session tokens with 403,
// 404 or 405 (the statuses on which the SDKs fall back) it switches, for the
// rest of its life, to the SDK's default client, which then uses IMDSv1 and
// goes back to tokens by itself whenever upstream answers 401. Timeouts,
// 5xx and network errors on the token request never cause IMDSv1 requests.
// No HTTP proxy is used and AWS_EC2_METADATA_DISABLED is ignored (the
// upstream is configured explicitly).
//
// It is safe for concurrent use and has no credential cache of its own; it
// caches only the discovered role name and the account id.
type InstanceProfile struct {
	base       string
	configured string
	timeout    time.Duration
	v2         *imds.Client // IMDSv2 only
	v1         *imds.Client // the SDK's default fallback behaviour
	useV1      atomic.Bool
	log        *zap.Logger
	now        func() time.Time

	mu        sync.Mutex
	role      string // discovered role name, "" until the listing was read
	account   string // from iam/info, "" until known
	partition string // from iam/info, "" until known
}

// NewInstanceProfile checks cfg and builds the IMDS clients; it makes no
// request. log may be nil.
func NewInstanceProfile(cfg InstanceProfileConfig, log *zap.Logger) (*InstanceProfile, error) {
	u, err := url.Parse(cfg.IMDSBase)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" ||
		(u.Path != "" && u.Path != "/") || u.RawQuery != "" || u.User != nil {
		return nil, fmt.Errorf("exchange: invalid IMDS base URL %q (want http://host[:port])", cfg.IMDSBase)
	}
	if cfg.RoleName != "" && !creds.ValidRoleName(cfg.RoleName) {
		return nil, fmt.Errorf("exchange: invalid instance profile role name %q", cfg.RoleName)
	}
	if cfg.Timeout < 0 {
		return nil, errors.New("exchange: negative instance profile Timeout")
	}
	if cfg.Timeout == 0 {
		cfg.Timeout = DefaultInstanceProfileTimeout
	}
	if log == nil {
		log = zap.NewNop()
	}
	base := strings.TrimSuffix(cfg.IMDSBase, "/")
	tr := &http.Transport{
		Proxy:                 nil, // IMDS is link-local: never through an HTTP proxy
		DialContext:           (&net.Dialer{Timeout: profileDialTimeout, KeepAlive: 30 * time.Second}).DialContext,
		ResponseHeaderTimeout: profileResponseHeaderTimeout,
		MaxIdleConnsPerHost:   2,
		IdleConnTimeout:       90 * time.Second,
	}
	hc := &http.Client{Transport: &profileTracingTransport{base: tr}}
	opts := imds.Options{
		Endpoint:          base,
		ClientEnableState: imds.ClientEnabled,
		HTTPClient:        hc,
		Retryer: retry.NewStandard(func(o *retry.StandardOptions) {
			o.MaxAttempts = profileMaxAttempts
			o.RateLimiter = ratelimit.None // the cache owns long-term backoff
		}),
	}
	v2 := opts
	v2.EnableFallback = aws.FalseTernary
	v1 := opts
	v1.EnableFallback = aws.TrueTernary
	return &InstanceProfile{
		base:       base,
		configured: cfg.RoleName,
		timeout:    cfg.Timeout,
		v2:         imds.New(v2),
		v1:         imds.New(v1),
		log:        log,
		now:        time.Now,
	}, nil
}

// RoleName returns the instance profile's role: the configured one, else the
// first line (trimmed) of upstream's iam/security-credentials/ listing, which
// is kept after the first success (and forgotten when upstream answers 404
// for it). Errors are *Error.
func (p *InstanceProfile) RoleName(ctx context.Context) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, p.timeout)
	defer cancel()
	return p.roleName(ctx)
}

func (p *InstanceProfile) roleName(ctx context.Context) (string, error) {
	if p.configured != "" {
		return p.configured, nil
	}
	p.mu.Lock()
	role := p.role
	p.mu.Unlock()
	if role != "" {
		return role, nil
	}
	const path = "iam/security-credentials/"
	body, err := p.get(ctx, path)
	if err != nil {
		return "", err
	}
	line, _, _ := strings.Cut(string(body), "\n")
	line = strings.TrimSpace(line)
	switch {
	case line == "":
		return "", p.invalid(path, "empty role listing (does the instance have an instance profile?)")
	case !creds.ValidRoleName(line):
		return "", p.invalid(path, fmt.Sprintf("listing %q is not a role name", sanitize(line, 80, false)))
	}
	p.mu.Lock()
	p.role = line
	p.mu.Unlock()
	return line, nil
}

// Fetch returns the credentials of the instance profile's role role.Name
// (the discovered role when role.Name is ""), exactly as upstream serves
// them. When upstream no longer has that role (404: the instance profile was
// replaced) the error says so and names the role upstream now lists. The
// account id comes from upstream's iam/info (InstanceProfileArn), read until
// it succeeds once; while it is unknown AccountID and RoleARN are "".
// RoleARN is arn:<partition>:iam::<account>:role/<name> (the role's path,
// if any, is not known to IMDS).
//
// Errors are *Error: the upstream Code of a credential document other than
// Success is in Code and the message, with class server when the code looks
// transient (throttling, internal, unavailable, timeout) and other otherwise
// (for example AssumeRoleUnauthorizedAccess: EC2 cannot assume the role);
// neither is permanent, because upstream can recover at any time. HTTP
// failures are classified like STS's (timeout, server for 5xx, throttling
// for 429, network); a document that is not usable credentials is
// invalid_response. On success the credentials are Complete and valid now.
// Neither errors nor log lines contain the secret key or the session token.
func (p *InstanceProfile) Fetch(ctx context.Context, want creds.Role) (creds.Credentials, error) {
	if want.Subject != "" {
		return creds.Credentials{}, subjectRefused(profileOp("iam/security-credentials/"), want)
	}
	ctx, cancel := context.WithTimeout(ctx, p.timeout)
	defer cancel()
	role := want.Name
	if role == "" {
		var err error
		if role, err = p.roleName(ctx); err != nil {
			return creds.Credentials{}, err
		}
	}
	if !creds.ValidRoleName(role) {
		return creds.Credentials{}, &Error{Op: profileOp("iam/security-credentials/"), Class: ClassValidation, permanent: true,
			Message: fmt.Sprintf("invalid instance profile role name %q", sanitize(role, 80, false))}
	}
	path := "iam/security-credentials/" + role
	body, err := p.get(ctx, path)
	if err != nil {
		var e *Error
		if errors.As(err, &e) && e.HTTPStatus == http.StatusNotFound && p.configured == "" {
			// The instance profile changed: list the role again, and say
			// which role upstream has now.
			p.mu.Lock()
			if p.role == role {
				p.role = ""
			}
			p.mu.Unlock()
			if now, lerr := p.roleName(ctx); lerr == nil && now != role {
				e.Message = sanitize(fmt.Sprintf("%s; the instance profile's role is now %s: reload the daemon (SIGHUP) to serve it", e.Message, now), maxMessage, false)
			}
		}
		return creds.Credentials{}, err
	}
	now := p.now()
	c, perr := parseInstanceProfileDocument(body, now)
	if perr != nil {
		perr.Op = profileOp(path)
		return creds.Credentials{}, perr
	}
	acct, partition := p.accountID(ctx)
	if acct != "" {
		c.AccountID = acct
		c.RoleARN = "arn:" + partition + ":iam::" + acct + ":role/" + role
	}
	p.log.Debug("fetched instance-profile credentials", zap.String("role", role), zap.Object("credentials", c))
	return c, nil
}

// Provider returns the same credentials as Fetch as an SDK credentials
// provider (CanExpire, Source "instance-profile"), for example as the base
// credentials of AssumeRole. It does not cache: wrap it in
// aws.NewCredentialsCache.
func (p *InstanceProfile) Provider() aws.CredentialsProvider { return profileProvider{p} }

type profileProvider struct{ p *InstanceProfile }

func (ip profileProvider) Retrieve(ctx context.Context) (aws.Credentials, error) {
	c, err := ip.p.Fetch(ctx, creds.Role{})
	if err != nil {
		return aws.Credentials{}, err
	}
	return aws.Credentials{
		AccessKeyID:     c.AccessKeyID,
		SecretAccessKey: c.SecretAccessKey,
		SessionToken:    c.SessionToken,
		Source:          SourceInstanceProfile,
		CanExpire:       true,
		Expires:         c.Expires,
		AccountID:       c.AccountID,
	}, nil
}

// accountID returns the account and partition of the instance profile from
// iam/info, cached after the first success; "" when unknown (a failure is
// only logged: credentials without an account id are still credentials).
func (p *InstanceProfile) accountID(ctx context.Context) (account, partition string) {
	p.mu.Lock()
	account, partition = p.account, p.partition
	p.mu.Unlock()
	if account != "" {
		return account, partition
	}
	var arn string
	err := p.do(ctx, "iam/info", func(ctx context.Context, c *imds.Client) error {
		out, err := c.GetIAMInfo(ctx, &imds.GetIAMInfoInput{})
		if err == nil {
			arn = out.InstanceProfileArn
		}
		return err
	})
	if err != nil {
		p.log.Debug("instance profile account unknown: iam/info failed", zap.Error(err))
		return "", ""
	}
	account = creds.AccountFromARN(arn)
	if account == "" {
		p.log.Debug("instance profile account unknown: iam/info has no usable InstanceProfileArn")
		return "", ""
	}
	partition = strings.SplitN(arn, ":", 3)[1]
	if partition == "" {
		partition = "aws"
	}
	p.mu.Lock()
	p.account, p.partition = account, partition
	p.mu.Unlock()
	return account, partition
}

// get reads one metadata path (relative to /latest/meta-data/).
func (p *InstanceProfile) get(ctx context.Context, path string) ([]byte, error) {
	var body []byte
	err := p.do(ctx, path, func(ctx context.Context, c *imds.Client) error {
		out, err := c.GetMetadata(ctx, &imds.GetMetadataInput{Path: path})
		if err != nil {
			return err
		}
		defer out.Content.Close()
		b, err := io.ReadAll(io.LimitReader(out.Content, profileMaxBody+1))
		if err != nil {
			return err
		}
		if len(b) > profileMaxBody {
			return errIPTooLarge
		}
		body = b
		return nil
	})
	return body, err
}

var errIPTooLarge = fmt.Errorf("response larger than %d bytes", profileMaxBody)

// do runs one IMDS operation with the current client; if the IMDSv2-only
// client failed because upstream refused the token request with 403, 404 or
// 405, it switches to the SDK's fallback client for good and tries once more.
func (p *InstanceProfile) do(ctx context.Context, path string, fn func(context.Context, *imds.Client) error) error {
	tr := &profileTrace{}
	tctx := context.WithValue(ctx, profileTraceKey{}, tr)
	if p.useV1.Load() {
		if err := fn(tctx, p.v1); err != nil {
			return p.classify(ctx, path, err, tr)
		}
		return nil
	}
	err := fn(tctx, p.v2)
	if err == nil {
		return nil
	}
	if st := tr.tokenRefusal(); st != 0 && ctx.Err() == nil {
		if p.useV1.CompareAndSwap(false, true) {
			p.log.Warn("upstream IMDS refuses session tokens; using IMDSv1 for the instance profile from now on",
				zap.String("upstream", p.base), zap.Int("http_status", st))
		}
		tr = &profileTrace{}
		tctx = context.WithValue(ctx, profileTraceKey{}, tr)
		if err = fn(tctx, p.v1); err == nil {
			return nil
		}
	}
	return p.classify(ctx, path, err, tr)
}

func profileOp(path string) string { return "IMDS GET " + path }

func (p *InstanceProfile) invalid(path, msg string) *Error {
	return &Error{Op: profileOp(path), Class: ClassInvalidResponse, Message: msg}
}

// classify turns an IMDS client error into an *Error. The SDK hides the
// status and transport error of some failures (a 401 after all retries, a
// failed token request) behind errors without Unwrap, so the last outcome
// seen by the transport decides when the error chain does not.
func (p *InstanceProfile) classify(ctx context.Context, path string, err error, tr *profileTrace) *Error {
	e := Classify(err)
	e.Op = profileOp(path)
	status, lastErr := tr.last()
	if e.HTTPStatus == 0 {
		e.HTTPStatus = status
	}
	// An answer (5xx, 429) beats a deadline that expired in the backoff
	// after it: it says more about what is wrong.
	switch {
	case errors.Is(err, errIPTooLarge):
		e.Class = ClassInvalidResponse
	case e.HTTPStatus == http.StatusTooManyRequests:
		e.Class = ClassThrottling
	case e.HTTPStatus >= 500 && e.HTTPStatus <= 599:
		e.Class = ClassServer
	case errors.Is(ctx.Err(), context.DeadlineExceeded) || isTimeout(err) || (lastErr != nil && isTimeout(lastErr)):
		e.Class = ClassTimeout
	case errors.Is(ctx.Err(), context.Canceled):
		e.Class = ClassOther
	case e.HTTPStatus == http.StatusUnauthorized:
		e.Class = ClassOther
		e.Message = "upstream IMDS refused the session token (401) " + e.Message
	case e.HTTPStatus != 0:
		e.Class = ClassOther
	case lastErr != nil && isNetwork(lastErr), isNetwork(err):
		e.Class = ClassNetwork
	}
	// Nothing of upstream is permanent: the cache keeps retrying.
	e.permanent = false
	e.Message = sanitize(e.Message, maxMessage, true)
	p.log.Debug("instance profile request failed", zap.String("path", path), zap.String("class", e.Class),
		zap.Int("http_status", e.HTTPStatus))
	return e
}

// profileDocument is the IMDS credential document (WIRE.md §2.2).
type profileDocument struct {
	Code            string
	Message         string
	LastUpdated     string
	Type            string
	AccessKeyID     string `json:"AccessKeyId"`
	SecretAccessKey string
	Token           string
	Expiration      string
}

// profileTransientCode reports whether an upstream Code looks transient.
func profileTransientCode(code string) bool {
	c := strings.ToLower(code)
	for _, s := range []string{"throttl", "internal", "unavailable", "timeout", "toomany", "limitexceeded", "retry"} {
		if strings.Contains(c, s) {
			return true
		}
	}
	return false
}

// parseInstanceProfileDocument parses an IMDS credential document. A Code
// other than Success (case-insensitive) is an *Error with that code; an
// absent Code is accepted when the credentials are there (botocore, JS and
// Java do not look at it). The result is Complete and valid at now, or an
// *Error of class invalid_response. Errors never quote the secret fields.
func parseInstanceProfileDocument(body []byte, now time.Time) (creds.Credentials, *Error) {
	invalid := func(msg string) (creds.Credentials, *Error) {
		return creds.Credentials{}, &Error{Class: ClassInvalidResponse, Message: msg}
	}
	var d profileDocument
	if err := json.Unmarshal(body, &d); err != nil {
		var te *json.UnmarshalTypeError
		if errors.As(err, &te) {
			return invalid("credential document field " + sanitize(te.Field, 64, false) + " has the wrong JSON type")
		}
		return invalid("credential document is not a JSON object")
	}
	if d.Code != "" && !strings.EqualFold(d.Code, "Success") {
		code := sanitize(d.Code, 128, false)
		msg := d.Message
		for _, s := range []string{d.SecretAccessKey, d.Token} {
			if s != "" {
				msg = strings.ReplaceAll(msg, s, "<redacted>")
			}
		}
		class := ClassOther
		if profileTransientCode(code) {
			class = ClassServer
		}
		return creds.Credentials{}, &Error{Class: class, Code: code,
			Message: sanitize("upstream credential document has Code "+code+": "+msg, maxMessage, false)}
	}
	switch {
	case d.AccessKeyID == "":
		return invalid("credential document lacks AccessKeyId")
	case d.SecretAccessKey == "":
		return invalid("credential document lacks SecretAccessKey")
	case d.Token == "":
		return invalid("credential document lacks Token")
	case d.Expiration == "":
		return invalid("credential document lacks Expiration")
	case !profileHeaderSafe(d.AccessKeyID, 128):
		return invalid("credential document has a malformed AccessKeyId")
	case !profileHeaderSafe(d.SecretAccessKey, 1024):
		return invalid("credential document has a malformed SecretAccessKey")
	case !profileHeaderSafe(d.Token, profileMaxBody): // no cap of its own: the size is not fixed (WIRE.md §6.3)
		return invalid("credential document has a malformed Token")
	}
	exp, err := time.Parse(time.RFC3339, d.Expiration)
	if err != nil {
		return invalid("credential document has an Expiration that is not RFC 3339")
	}
	if !exp.After(now) {
		return invalid(fmt.Sprintf("credentials expired at %s (check the host clock)", exp.UTC().Format(time.RFC3339)))
	}
	c := creds.Credentials{
		AccessKeyID:     d.AccessKeyID,
		SecretAccessKey: d.SecretAccessKey,
		SessionToken:    d.Token,
		Expires:         exp.UTC(),
		LastUpdated:     now.UTC(),
		Source:          SourceInstanceProfile,
	}
	if !c.ValidAt(now) {
		return invalid("incomplete credentials")
	}
	return c, nil
}

// profileHeaderSafe reports whether s is 1..max bytes of printable ASCII without
// spaces: what can go into a JSON document and an HTTP header unchanged.
func profileHeaderSafe(s string, max int) bool {
	if len(s) == 0 || len(s) > max {
		return false
	}
	for i := 0; i < len(s); i++ {
		if s[i] <= 0x20 || s[i] >= 0x7f {
			return false
		}
	}
	return true
}

// profileTrace records what the transport saw during one operation.
type profileTrace struct {
	mu           sync.Mutex
	lastStatus   int   // status of the last answer, 0 if the last attempt got none
	lastErr      error // transport error of the last attempt, nil if it got an answer
	tokenRefused int   // 403, 404 or 405 when a token PUT got that answer
}

type profileTraceKey struct{}

func (t *profileTrace) record(req *http.Request, resp *http.Response, err error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if err != nil {
		t.lastStatus, t.lastErr = 0, err
		return
	}
	t.lastStatus, t.lastErr = resp.StatusCode, nil
	if req.Method == http.MethodPut && strings.HasSuffix(req.URL.Path, "/latest/api/token") {
		switch resp.StatusCode {
		case http.StatusForbidden, http.StatusNotFound, http.StatusMethodNotAllowed:
			t.tokenRefused = resp.StatusCode
		}
	}
}

// tokenRefusal returns the status (403, 404 or 405) with which upstream
// refused a token request, 0 if it did not.
func (t *profileTrace) tokenRefusal() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.tokenRefused
}

func (t *profileTrace) last() (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.lastStatus, t.lastErr
}

// profileTracingTransport reports every round trip to the profileTrace in the
// request's context and caps response bodies.
type profileTracingTransport struct{ base http.RoundTripper }

func (t *profileTracingTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	resp, err := t.base.RoundTrip(req)
	if tr, ok := req.Context().Value(profileTraceKey{}).(*profileTrace); ok {
		tr.record(req, resp, err)
	}
	if err == nil {
		resp.Body = &profileLimitedBody{rc: resp.Body, left: profileMaxBody + 1}
	}
	return resp, err
}

// profileLimitedBody fails a body longer than profileMaxBody instead of reading it all.
type profileLimitedBody struct {
	rc   io.ReadCloser
	left int64
}

func (b *profileLimitedBody) Read(p []byte) (int, error) {
	if b.left <= 0 {
		return 0, errIPTooLarge
	}
	if int64(len(p)) > b.left {
		p = p[:b.left]
	}
	n, err := b.rc.Read(p)
	b.left -= int64(n)
	return n, err
}

func (b *profileLimitedBody) Close() error { return b.rc.Close() }
