package token

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net"
	"net/http"
	"net/url"
	"os"
	"regexp"
	"strings"
	"sync"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	v4 "github.com/aws/aws-sdk-go-v2/aws/signer/v4"
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
	// Method is how the host proves its identity to the issuer: "" or
	// URLMethodIID (the instance identity document and its PKCS7
	// signature), or URLMethodIAM (an sts:GetCallerIdentity request signed
	// with the instance profile's credentials, which the issuer forwards to
	// STS). See docs/federation.md §2.
	Method string
	// IAM configures URLMethodIAM.
	IAM URLIAMOptions
}

// Attestation methods of URLOptions.Method.
const (
	URLMethodIID = "aws_iid"
	URLMethodIAM = "aws_iam"
)

// URLIAMOptions configures the aws_iam attestation of a URL.
type URLIAMOptions struct {
	// Issuer is the issuer's identifier (the iss of its tokens, its
	// `issuer` setting), sent in the signed X-Imdsproxy-Issuer header so
	// that the request is good for that issuer only. Required.
	Issuer string
	// STSEndpoint is the STS endpoint the request is signed for (the issuer
	// must forward to it); "" means AWS_ENDPOINT_URL_STS, else
	// DefaultSTSEndpoint.
	STSEndpoint string
	// Region is the SigV4 signing region; "" means the region of an
	// sts.REGION.amazonaws.com endpoint, else us-east-1.
	Region string
}

// DefaultSTSEndpoint is the STS endpoint URLMethodIAM signs for by default.
const DefaultSTSEndpoint = "https://sts.amazonaws.com"

// HeaderIssuer is the signed header binding an aws_iam request to one
// issuer.
const HeaderIssuer = "X-Imdsproxy-Issuer"

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
//
// For(subject) returns the URL of a workload subject: it adds "workload":
// subject to the request and caches that subject's token apart. With URLOptions.Method URLMethodIAM the body is
// instead {"method": "aws_iam", "sts_request": {...}, "region": ...}: an
// sts:GetCallerIdentity signed with the instance profile's credentials
// (read from the same IMDS) and bound to the issuer by the signed
// X-Imdsproxy-Issuer header.
type URL struct {
	issuer   string // as configured
	redacted string // without user info, query and fragment: for errors and logs
	imdsBase string
	client   *http.Client
	imds     *http.Client
	jwt      *jwtSource
	method   string
	iam      URLIAMOptions
	subject  string // "" for the issuer's default subject

	// The default subject's URL holds every subject's.
	mu       sync.Mutex
	subjects map[string]*URL
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
	switch opts.Method {
	case "", URLMethodIID:
		opts.Method = URLMethodIID
	case URLMethodIAM:
		if opts.IAM.Issuer == "" {
			return nil, errors.New("token: jwt_url: the aws_iam method needs the issuer's identifier (IAM.Issuer)")
		}
		if opts.IAM.STSEndpoint == "" {
			opts.IAM.STSEndpoint = os.Getenv("AWS_ENDPOINT_URL_STS")
		}
		if opts.IAM.STSEndpoint == "" {
			opts.IAM.STSEndpoint = DefaultSTSEndpoint
		}
		su, err := url.Parse(opts.IAM.STSEndpoint)
		if err != nil || (su.Scheme != "https" && su.Scheme != "http") || su.Host == "" {
			return nil, fmt.Errorf("token: jwt_url: STS endpoint %q is not an http(s) URL", opts.IAM.STSEndpoint)
		}
		if opts.IAM.Region == "" {
			opts.IAM.Region = "us-east-1"
			if m := stsRegionHost.FindStringSubmatch(su.Hostname()); m != nil {
				opts.IAM.Region = m[1]
			}
		}
	default:
		return nil, fmt.Errorf("token: jwt_url: unknown attestation method %q (use aws_iid or aws_iam)", opts.Method)
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
		method: opts.Method,
		iam:    opts.IAM,
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

// Subject returns the workload subject the URL asks tokens for, "" for the
// issuer's default subject.
func (u *URL) Subject() string { return u.subject }

// For returns the URL minting tokens for the workload subject, as
// Command.For does for a command: the same issuer, options and attestation,
// with "workload": subject in every request. Each subject's token is
// cached, reused until exp − max(60 s, 10 % of its lifetime), shared
// between concurrent callers and forgotten exactly like the default
// subject's, independently of the others. For("") is u's default subject.
// Calls with the same subject return the same *URL, so a subject costs one
// cache for the life of u; subjects come from configuration, not from
// clients. Its metrics are the default subject's fetch counter
// (source="url"); the expiry gauge follows the default subject only.
// Errors of its Token name the subject (Error.Workload).
//
// A subject is 1..MaxWorkloadSubject (128) bytes of ASCII letters, digits
// and "._:@/+=-", starting with a letter or digit; For refuses anything
// else. Safe for concurrent use; call it on the URL NewURL returned.
func (u *URL) For(subject string) (*URL, error) {
	if u.subject != "" {
		return nil, fmt.Errorf("token: jwt_url %s: For on the URL of workload %q", u.redacted, u.subject)
	}
	if subject == "" {
		return u, nil
	}
	if !creds.ValidSubject(subject) {
		return nil, fmt.Errorf("token: jwt_url %s: workload subject %q: want 1..%d letters, digits or ._:@/+=-, starting with a letter or digit",
			u.redacted, sanitizeText(subject, 2*MaxWorkloadSubject), MaxWorkloadSubject)
	}
	u.mu.Lock()
	defer u.mu.Unlock()
	if su, ok := u.subjects[subject]; ok {
		return su, nil
	}
	if u.subjects == nil {
		u.subjects = map[string]*URL{}
	}
	su := &URL{issuer: u.issuer, redacted: u.redacted, imdsBase: u.imdsBase, client: u.client, imds: u.imds,
		method: u.method, iam: u.iam, subject: subject}
	cfg := u.jwt.jwtSourceConfig
	cfg.workload, cfg.fetch, cfg.reg = subject, su.fetch, nil
	su.jwt = &jwtSource{jwtSourceConfig: cfg, fetches: u.jwt.fetches}
	u.subjects[subject] = su
	return su, nil
}

// ForSubject is For as a JWTSource, for the exchange: the tokens of a
// workload's own subject (workloads[].subject).
func (u *URL) ForSubject(subject string) (JWTSource, error) {
	su, err := u.For(subject)
	if err != nil {
		return nil, err
	}
	return su, nil
}

// fetch asks the issuer once for u's subject's token.
func (u *URL) fetch(ctx context.Context) (string, []zap.Field, error) {
	subject := u.subject
	var (
		payload any
		err     error
	)
	if u.method == URLMethodIAM {
		payload, err = u.iamRequest(ctx, subject)
	} else {
		var doc, sig string
		doc, sig, err = u.identityDocument(ctx)
		payload = struct {
			Document string `json:"document"`
			PKCS7    string `json:"pkcs7"`
			Workload string `json:"workload,omitempty"`
		}{doc, sig, subject}
	}
	if err != nil {
		if ctx.Err() != nil {
			err = fmt.Errorf("no answer within %s: %w", u.jwt.timeout, err)
		}
		return "", nil, u.jwt.fail(ReasonDocumentUnavailable, err)
	}
	body, err := json.Marshal(payload)
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

// imdsGetter returns a function reading IMDS paths with one IMDSv2 session
// token.
func (u *URL) imdsGetter(ctx context.Context) (func(path string) (string, error), error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPut, u.imdsBase+"/latest/api/token", nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("X-aws-ec2-metadata-token-ttl-seconds", imdsTokenTTL)
	tok, err := u.imdsDo(req)
	if err != nil {
		return nil, fmt.Errorf("IMDSv2 token: %w", err)
	}
	tok = strings.TrimSpace(tok)
	return func(path string) (string, error) {
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
	}, nil
}

// identityDocument reads the instance identity document and its PKCS7
// signature with IMDSv2.
func (u *URL) identityDocument(ctx context.Context) (doc, sig string, err error) {
	get, err := u.imdsGetter(ctx)
	if err != nil {
		return "", "", err
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

// stsRegionHost extracts REGION from sts.REGION.amazonaws.com (and .cn).
var stsRegionHost = regexp.MustCompile(`^sts(?:-fips)?\.([a-z]{2}(?:-[a-z]+)+-\d+)\.amazonaws\.com(?:\.cn)?$`)

// getCallerIdentityBody is the only request the aws_iam method signs.
const getCallerIdentityBody = "Action=GetCallerIdentity&Version=2011-06-15"

// iamSTSRequest is a signed request as the issuer expects it
// (docs/federation.md §2).
type iamSTSRequest struct {
	Method  string              `json:"method"`
	URL     string              `json:"url"`
	Headers map[string][]string `json:"headers"`
	Body    string              `json:"body"`
}

// iamRequest builds the aws_iam token request for subject: an
// sts:GetCallerIdentity signed with the instance profile's credentials
// (read from IMDS), carrying the signed X-Imdsproxy-Issuer header. The
// credentials are used to sign only; they are never sent, logged or
// quoted in an error.
func (u *URL) iamRequest(ctx context.Context, subject string) (any, error) {
	get, err := u.imdsGetter(ctx)
	if err != nil {
		return nil, err
	}
	list, err := get("/latest/meta-data/iam/security-credentials/")
	if err != nil {
		return nil, fmt.Errorf("instance profile: %w", err)
	}
	role := strings.TrimSpace(strings.SplitN(strings.TrimSpace(list), "\n", 2)[0])
	if role == "" || strings.ContainsAny(role, "/?#") {
		return nil, errors.New("instance profile: IMDS lists no role")
	}
	raw, err := get("/latest/meta-data/iam/security-credentials/" + role)
	if err != nil {
		return nil, fmt.Errorf("instance profile credentials: %w", err)
	}
	var doc struct {
		Code            string
		AccessKeyID     string `json:"AccessKeyId"`
		SecretAccessKey string
		Token           string
		Expiration      time.Time
	}
	if err := json.Unmarshal([]byte(raw), &doc); err != nil || doc.AccessKeyID == "" || doc.SecretAccessKey == "" {
		return nil, errors.New("instance profile credentials: IMDS answered something that is not a credentials document")
	}
	if doc.Code != "" && !strings.EqualFold(doc.Code, "Success") {
		return nil, fmt.Errorf("instance profile credentials: IMDS answered Code %q", sanitizeText(doc.Code, 64))
	}
	region := ""
	if r, err := get("/latest/meta-data/placement/region"); err == nil {
		region = strings.TrimSpace(r)
	}

	endpoint := strings.TrimRight(u.iam.STSEndpoint, "/") + "/"
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, endpoint, strings.NewReader(getCallerIdentityBody))
	if err != nil {
		return nil, errors.New("cannot build the sts:GetCallerIdentity request")
	}
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded; charset=utf-8")
	req.Header.Set(HeaderIssuer, u.iam.Issuer)
	sum := sha256.Sum256([]byte(getCallerIdentityBody))
	creds := aws.Credentials{AccessKeyID: doc.AccessKeyID, SecretAccessKey: doc.SecretAccessKey, SessionToken: doc.Token}
	if err := v4.NewSigner().SignHTTP(ctx, creds, req, hex.EncodeToString(sum[:]), "sts", u.iam.Region, u.jwt.now()); err != nil {
		return nil, errors.New("cannot sign the sts:GetCallerIdentity request")
	}
	headers := map[string][]string{}
	for k, v := range req.Header {
		headers[k] = v
	}
	return struct {
		Method     string        `json:"method"`
		Workload   string        `json:"workload,omitempty"`
		Region     string        `json:"region,omitempty"`
		STSRequest iamSTSRequest `json:"sts_request"`
	}{URLMethodIAM, subject, region, iamSTSRequest{Method: http.MethodPost, URL: endpoint, Headers: headers, Body: getCallerIdentityBody}}, nil
}
