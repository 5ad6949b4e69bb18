package exchange

import (
	"bytes"
	"context"
	"crypto"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/url"
	"os"
	"strings"
	"time"

	awshttp "github.com/aws/aws-sdk-go-v2/aws/transport/http"
	"go.uber.org/zap"

	"github.com/imdsproxy/imdsproxy/creds"
)

// SourceRolesAnywhere is the creds.Credentials.Source of credentials from
// RolesAnywhere.
const SourceRolesAnywhere = "roles-anywhere"

// opCreateSession names the Roles Anywhere operation in errors.
const opCreateSession = "CreateSession"

// Limits of RolesAnywhereConfig.Duration (the durationSeconds range of
// CreateSession) and its default.
const (
	RolesAnywhereMinDuration     = 15 * time.Minute
	RolesAnywhereMaxDuration     = 12 * time.Hour
	RolesAnywhereDefaultDuration = time.Hour
)

// Backoff between attempts of one Fetch: full jitter over base·2^n, capped.
const (
	raBackoffBase = 100 * time.Millisecond
	raBackoffCap  = 2 * time.Second
)

// raCodeClass adds the Roles Anywhere codes that codeClass (STS) lacks.
var raCodeClass = map[string]string{
	"ResourceNotFoundException": ClassValidation,
	"InternalServerException":   ClassServer,
}

// X509Source returns the host's current X.509 identity: the leaf
// certificate, the intermediates to send with it (possibly none) and the
// private key of the leaf. It is called for every exchange, so it must pick
// up rotation; token.X509 implements it. Errors should carry the
// ErrorClass/Permanent methods of docs/architecture.md (token.Error does).
type X509Source interface {
	X509(ctx context.Context) (*x509.Certificate, []*x509.Certificate, crypto.Signer, error)
}

// RolesAnywhereConfig configures NewRolesAnywhere. The role is handed to
// each Fetch: its ARN; its session name, sent as roleSessionName only when
// non-empty (the profile must then allow it; SanitizeSessionName applies;
// empty lets Roles Anywhere name the session after the certificate serial);
// its duration as durationSeconds (15 min to 12 h; 0 means 1 h).
type RolesAnywhereConfig struct {
	// TrustAnchorARN is arn:<partition>:rolesanywhere:<region>:<account>:trust-anchor/<id>.
	// Its region is the region of every call. Required.
	TrustAnchorARN string
	// ProfileARN is arn:<partition>:rolesanywhere:<region>:<account>:profile/<id>,
	// in the trust anchor's region. Required.
	ProfileARN string
	// HTTPClient, when set, sends the requests; nil means aws-sdk-go-v2's
	// default client (awshttp.NewBuildableClient, which honours HTTP(S)_PROXY).
	HTTPClient *http.Client
	// Timeout bounds a whole Fetch, retries included; 0 means the
	// caller's deadline, or DefaultTimeout when it has none.
	Timeout time.Duration
	// MaxAttempts is the number of attempts per Fetch; 0 means 2. Throttling,
	// 5xx, timeouts of one attempt and network failures are retried after a
	// short jittered pause; long-term backoff is the caller's job (the cache).
	MaxAttempts int
}

// RolesAnywhere fetches credentials with IAM Roles Anywhere CreateSession,
// signing each request with the host's X.509 identity (SigV4-X509). It is
// safe for concurrent use; it has no cache of its own.
type RolesAnywhere struct {
	client interface {
		Do(*http.Request) (*http.Response, error)
	}
	endpoint    *url.URL
	region      string
	trustAnchor string
	profile     string
	timeout     time.Duration
	maxAttempts int
	src         X509Source
	log         *zap.Logger
	now         func() time.Time
	backoff     func(attempt int) time.Duration
}

// NewRolesAnywhere checks cfg and builds the client. The region comes from
// the trust anchor ARN; the endpoint is AWS_ENDPOINT_URL_ROLESANYWHERE, else
// AWS_ENDPOINT_URL, else https://rolesanywhere.<region>.amazonaws.com
// (.amazonaws.com.cn for cn-* regions). ctx is unused (nothing is loaded);
// it is accepted for symmetry with NewWebIdentity. log may be nil.
func NewRolesAnywhere(ctx context.Context, cfg RolesAnywhereConfig, src X509Source, log *zap.Logger) (*RolesAnywhere, error) {
	_ = ctx
	if src == nil {
		return nil, errors.New("exchange: nil X.509 source")
	}
	region, err := rolesAnywhereRegion(cfg.TrustAnchorARN, "trust-anchor/")
	if err != nil {
		return nil, fmt.Errorf("exchange: roles_anywhere.trust_anchor_arn: %w", err)
	}
	profileRegion, err := rolesAnywhereRegion(cfg.ProfileARN, "profile/")
	if err != nil {
		return nil, fmt.Errorf("exchange: roles_anywhere.profile_arn: %w", err)
	}
	if profileRegion != region {
		return nil, fmt.Errorf("exchange: profile ARN region %s differs from trust anchor region %s", profileRegion, region)
	}
	if cfg.MaxAttempts < 0 || cfg.Timeout < 0 {
		return nil, errors.New("exchange: negative MaxAttempts or Timeout")
	}
	if cfg.MaxAttempts == 0 {
		cfg.MaxAttempts = DefaultMaxAttempts
	}
	if log == nil {
		log = zap.NewNop()
	}
	endpoint, err := rolesAnywhereEndpoint(region)
	if err != nil {
		return nil, err
	}
	r := &RolesAnywhere{
		endpoint:    endpoint,
		region:      region,
		trustAnchor: cfg.TrustAnchorARN,
		profile:     cfg.ProfileARN,
		timeout:     cfg.Timeout,
		maxAttempts: cfg.MaxAttempts,
		src:         src,
		log:         log,
		now:         time.Now,
		backoff:     jitteredBackoff,
	}
	if cfg.HTTPClient != nil {
		r.client = cfg.HTTPClient
	} else {
		r.client = awshttp.NewBuildableClient().Freeze()
	}
	return r, nil
}

// rolesAnywhereRegion returns the region of a Roles Anywhere ARN whose
// resource starts with prefix.
func rolesAnywhereRegion(arn, prefix string) (string, error) {
	p := strings.SplitN(arn, ":", 6)
	if len(p) != 6 || p[0] != "arn" || p[1] == "" || p[2] != "rolesanywhere" || p[3] == "" ||
		!strings.HasPrefix(p[5], prefix) || len(p[5]) == len(prefix) {
		return "", fmt.Errorf("%q is not arn:aws:rolesanywhere:<region>:<account>:%s<id>", arn, prefix)
	}
	for _, c := range p[3] {
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-') {
			return "", fmt.Errorf("%q: invalid region %q", arn, p[3])
		}
	}
	return p[3], nil
}

// rolesAnywhereEndpoint resolves the endpoint per the SDK conventions.
func rolesAnywhereEndpoint(region string) (*url.URL, error) {
	raw, from := os.Getenv("AWS_ENDPOINT_URL_ROLESANYWHERE"), "AWS_ENDPOINT_URL_ROLESANYWHERE"
	if raw == "" {
		raw, from = os.Getenv("AWS_ENDPOINT_URL"), "AWS_ENDPOINT_URL"
	}
	if raw == "" {
		suffix := ".amazonaws.com"
		if strings.HasPrefix(region, "cn-") {
			suffix = ".amazonaws.com.cn"
		}
		raw, from = "https://rolesanywhere."+region+suffix, "default"
	}
	u, err := url.Parse(raw)
	if err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" || u.RawQuery != "" || u.Fragment != "" {
		return nil, fmt.Errorf("exchange: Roles Anywhere endpoint %q (%s) is not an http(s) URL without query", raw, from)
	}
	return u, nil
}

// Endpoint returns the URL requests are sent to (without the query).
func (r *RolesAnywhere) Endpoint() string { return r.sessionsURL() }

// Region returns the region of the calls (the trust anchor's).
func (r *RolesAnywhere) Region() string { return r.region }

// raCall is one CreateSession for one role: the query and body that are
// sent (what is sent is what is signed).
type raCall struct {
	*RolesAnywhere
	roleARN string
	query   string // canonical query string
	body    []byte
}

// call prepares the CreateSession of role.
func (r *RolesAnywhere) call(role creds.Role) (*raCall, *Error) {
	if e := checkRole(opCreateSession, role, false); e != nil {
		return nil, e
	}
	d := role.Duration
	if d == 0 {
		d = RolesAnywhereDefaultDuration
	}
	if d < RolesAnywhereMinDuration || d > RolesAnywhereMaxDuration {
		return nil, &Error{Op: opCreateSession, Role: role.ARN, Class: ClassValidation, permanent: true,
			Message: fmt.Sprintf("duration %s outside %s..%s", d, RolesAnywhereMinDuration, RolesAnywhereMaxDuration)}
	}
	reqBody := struct {
		DurationSeconds int    `json:"durationSeconds"`
		RoleSessionName string `json:"roleSessionName,omitempty"`
	}{DurationSeconds: int(d / time.Second)}
	if strings.TrimSpace(role.SessionName) != "" {
		reqBody.RoleSessionName = SanitizeSessionName(role.SessionName)
	}
	body, err := json.Marshal(reqBody)
	if err != nil {
		return nil, &Error{Op: opCreateSession, Role: role.ARN, Class: ClassOther, Message: "encode request: " + err.Error()}
	}
	return &raCall{
		RolesAnywhere: r,
		roleARN:       role.ARN,
		query: encodeQuery(url.Values{
			"profileArn":     {r.profile},
			"roleArn":        {role.ARN},
			"trustAnchorArn": {r.trustAnchor},
		}),
		body: body,
	}, nil
}

func (r *RolesAnywhere) sessionsURL() string {
	return strings.TrimSuffix(r.endpoint.String(), "/") + "/sessions"
}

// Fetch reads the X.509 identity, signs a CreateSession request for role
// with it and returns the role's credentials. Errors are *Error, or the X.509 source's error wrapped with %w (its
// ErrorClass/Permanent stay reachable with errors.As). On success the
// credentials are Complete and valid now.
func (r *RolesAnywhere) Fetch(ctx context.Context, role creds.Role) (creds.Credentials, error) {
	call, cerr := r.call(role)
	if cerr != nil {
		return creds.Credentials{}, cerr
	}
	ctx, cancel := bound(ctx, r.timeout)
	defer cancel()
	var last *Error
	for attempt := 0; attempt < r.maxAttempts; attempt++ {
		if attempt > 0 {
			t := time.NewTimer(r.backoff(attempt))
			select {
			case <-ctx.Done():
				t.Stop()
				return creds.Credentials{}, last
			case <-t.C:
			}
		}
		c, err := call.attempt(ctx)
		if err == nil {
			r.log.Debug("created Roles Anywhere session", zap.Object("credentials", c), zap.Int("attempt", attempt+1))
			return c, nil
		}
		var e *Error
		if !errors.As(err, &e) {
			return creds.Credentials{}, err // the identity's own error
		}
		last = e
		if !retryable(e) || ctx.Err() != nil {
			break
		}
		r.log.Debug("CreateSession failed, retrying", zap.String("class", e.Class), zap.String("code", e.Code),
			zap.Int("http_status", e.HTTPStatus), zap.Int("attempt", attempt+1))
	}
	return creds.Credentials{}, last
}

func retryable(e *Error) bool {
	switch e.Class {
	case ClassThrottling, ClassServer, ClassNetwork, ClassTimeout:
		return true
	}
	return false
}

func jitteredBackoff(attempt int) time.Duration {
	d := raBackoffBase << min(attempt, 5)
	if d > raBackoffCap {
		d = raBackoffCap
	}
	return d/2 + rand.N(d/2+1)
}

// attempt performs one signed CreateSession call.
func (r *raCall) attempt(ctx context.Context) (creds.Credentials, error) {
	leaf, chain, signer, err := r.src.X509(ctx)
	if err != nil {
		var classed interface{ ErrorClass() string }
		if errors.As(err, &classed) {
			return creds.Credentials{}, fmt.Errorf("exchange: X.509 identity: %w", err)
		}
		e := Classify(err)
		if e.Class == ClassOther && ctx.Err() == nil {
			e.Class = ClassIdentity
		}
		e.Op = "read X.509 identity"
		return creds.Credentials{}, e
	}
	if leaf == nil || signer == nil {
		return creds.Credentials{}, &Error{Op: "read X.509 identity", Class: ClassIdentity, Message: "X.509 source returned no certificate or key"}
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, r.sessionsURL()+"?"+r.query, bytes.NewReader(r.body))
	if err != nil {
		return creds.Credentials{}, r.fail(ClassOther, 0, "", "build request: "+err.Error(), err)
	}
	req.Header.Set("Content-Type", "application/json")
	if err := signX509(req, r.body, r.region, r.now(), leaf, chain, signer); err != nil {
		return creds.Credentials{}, &Error{Op: opCreateSession, Role: r.roleARN, Class: ClassIdentity,
			Message: sanitize(err.Error(), maxMessage, false), Err: err}
	}
	// Headers added after signing would not be signed; the SDK's user agent
	// is excluded from signing anyway.
	req.Header.Set("User-Agent", "imdsproxy")
	resp, err := r.client.Do(req)
	if err != nil {
		e := Classify(err)
		e.Op, e.Role = opCreateSession, r.roleARN
		return creds.Credentials{}, e
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, MaxResponseBody+1))
	if err != nil {
		e := Classify(err)
		e.Op, e.Role, e.HTTPStatus = opCreateSession, r.roleARN, resp.StatusCode
		if e.Class == ClassOther {
			e.Class = ClassNetwork
		}
		return creds.Credentials{}, e
	}
	if len(b) > MaxResponseBody {
		return creds.Credentials{}, r.fail(ClassInvalidResponse, resp.StatusCode, "", "response larger than 1 MiB", nil)
	}
	if resp.StatusCode >= 200 && resp.StatusCode <= 299 {
		return r.parseSuccess(resp.StatusCode, b)
	}
	return creds.Credentials{}, r.parseError(resp, b)
}

func (r *raCall) fail(class string, status int, code, msg string, err error) *Error {
	e := &Error{Op: opCreateSession, Role: r.roleARN, Class: class, HTTPStatus: status, Code: code,
		Message: sanitize(msg, maxMessage, false), Err: err}
	e.permanent = permanentClass[class]
	return e
}

// createSessionOutput is the CreateSession answer (only what is used).
type createSessionOutput struct {
	CredentialSet []struct {
		AssumedRoleUser *struct {
			Arn string `json:"arn"`
		} `json:"assumedRoleUser"`
		Credentials *struct {
			AccessKeyID     string `json:"accessKeyId"`
			SecretAccessKey string `json:"secretAccessKey"`
			SessionToken    string `json:"sessionToken"`
			Expiration      string `json:"expiration"`
		} `json:"credentials"`
		RoleArn string `json:"roleArn"`
	} `json:"credentialSet"`
}

func (r *raCall) parseSuccess(status int, b []byte) (creds.Credentials, error) {
	invalid := func(msg string) (creds.Credentials, error) {
		return creds.Credentials{}, r.fail(ClassInvalidResponse, status, "", msg, nil)
	}
	var out createSessionOutput
	if err := json.Unmarshal(b, &out); err != nil {
		// The decoder's message may quote the body; keep only its kind.
		return invalid("response is not the CreateSession JSON document")
	}
	if len(out.CredentialSet) == 0 {
		return invalid("response has an empty credentialSet")
	}
	set := out.CredentialSet[0]
	if set.Credentials == nil {
		return invalid("response lacks credentialSet[0].credentials")
	}
	sc := set.Credentials
	now := r.now()
	exp, err := time.Parse(time.RFC3339, sc.Expiration)
	switch {
	case sc.AccessKeyID == "":
		return invalid("response lacks credentials.accessKeyId")
	case sc.SecretAccessKey == "":
		return invalid("response lacks credentials.secretAccessKey")
	case sc.SessionToken == "":
		return invalid("response lacks credentials.sessionToken")
	case sc.Expiration == "":
		return invalid("response lacks credentials.expiration")
	case err != nil:
		return invalid("credentials.expiration is not an RFC 3339 time")
	case !exp.After(now):
		return invalid(fmt.Sprintf("credentials expired at %s (check the host clock)", exp.UTC().Format(time.RFC3339)))
	}
	c := creds.Credentials{
		AccessKeyID:     sc.AccessKeyID,
		SecretAccessKey: sc.SecretAccessKey,
		SessionToken:    sc.SessionToken,
		Expires:         exp.UTC(),
		LastUpdated:     now.UTC(),
		Source:          SourceRolesAnywhere,
	}
	switch {
	case set.AssumedRoleUser != nil && set.AssumedRoleUser.Arn != "":
		c.RoleARN = set.AssumedRoleUser.Arn
	default:
		r.log.Warn("CreateSession response lacks assumedRoleUser.arn; using the configured role ARN")
		c.RoleARN = r.roleARN
	}
	c.AccountID = creds.AccountFromARN(c.RoleARN)
	if c.AccountID == "" {
		c.AccountID = creds.AccountFromARN(r.roleARN)
	}
	if !c.Complete() {
		return invalid("incomplete credentials")
	}
	return c, nil
}

// parseError classifies a restJson1 error answer.
func (r *raCall) parseError(resp *http.Response, b []byte) *Error {
	status := resp.StatusCode
	reqID := sanitize(resp.Header.Get("X-Amzn-Requestid"), 128, false)
	code := sanitizeErrorCode(resp.Header.Get("X-Amzn-Errortype"))
	var doc map[string]any
	jsonErr := json.Unmarshal(b, &doc)
	var msg string
	if jsonErr == nil {
		if code == "" {
			for _, k := range []string{"code", "__type", "Code"} {
				if s, ok := doc[k].(string); ok && s != "" {
					code = sanitizeErrorCode(s)
					break
				}
			}
		}
		for _, k := range []string{"message", "Message", "errorMessage"} {
			if s, ok := doc[k].(string); ok && s != "" {
				msg = s
				break
			}
		}
	}
	code = sanitize(code, 128, false)

	var class string
	if c, ok := raCodeClass[code]; ok {
		class = c
	} else if c, ok := codeClass[code]; ok {
		class = c
	}
	if class == "" {
		switch {
		case status == http.StatusTooManyRequests:
			class = ClassThrottling
		case status >= 500:
			class = ClassServer
		case jsonErr != nil:
			class = ClassInvalidResponse
			msg = "error response is not JSON (Content-Type " + resp.Header.Get("Content-Type") + ")"
		case status == http.StatusForbidden:
			class = ClassAccessDenied
		case status == http.StatusRequestTimeout:
			class = ClassTimeout
		case status >= 400:
			class = ClassValidation
		default: // 1xx/3xx reaching us
			class = ClassInvalidResponse
			msg = "unexpected HTTP status"
		}
	}
	e := r.fail(class, status, code, msg, nil)
	e.RequestID = reqID
	r.log.Debug("CreateSession failed", zap.String("class", e.Class), zap.String("code", e.Code),
		zap.Int("http_status", status), zap.String("request_id", reqID))
	return e
}

// sanitizeErrorCode keeps the error name of a restJson1 error code: the part
// before ':' and after '#' (aws.protocoltests#FooError:http://... → FooError).
func sanitizeErrorCode(code string) string {
	code = strings.TrimSpace(code)
	if i := strings.IndexByte(code, ':'); i >= 0 {
		code = code[:i]
	}
	if i := strings.LastIndexByte(code, '#'); i >= 0 {
		code = code[i+1:]
	}
	return code
}
