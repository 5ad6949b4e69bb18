package exchange

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"regexp"
	"sort"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/sts"
	"github.com/aws/aws-sdk-go-v2/service/sts/types"
	"go.uber.org/zap"

	"github.com/imdsproxy/imdsproxy/creds"
)

// SourceAssumeRole is the creds.Credentials.Source of credentials from
// AssumeRole.
const SourceAssumeRole = "assume-role"

// ClassBaseCredentials is the error class of an AssumeRole whose base
// credentials could not be obtained (the base provider failed) or were
// refused by STS (InvalidClientTokenId, SignatureDoesNotMatch, ExpiredToken,
// ...). Retryable; permanent only when the base provider's own error says so.
const ClassBaseCredentials = "base_credentials"

// Limits of session tags and of the other AssumeRole parameters (STS API
// reference).
const (
	MaxSessionTags   = 50   // tags per AssumeRole call
	MaxTagKeyLen     = 128  // characters of a tag key
	MaxTagValueLen   = 256  // characters of a tag value
	maxExternalIDLen = 1224 // characters of ExternalId
	minExternalIDLen = 2
)

// opAssumeRole names the STS operation in errors.
const opAssumeRole = "AssumeRole"

// arBaseCacheWindow refreshes base credentials this long before they
// expire.
const arBaseCacheWindow = 5 * time.Minute

var arExternalIDRe = regexp.MustCompile(`^[\w+=,.@:/-]+$`)

// validTagText reports whether s holds only what STS allows in a session
// tag's key or value: Unicode letters, separators and numbers, and
// _.:/=+-@. (Not a regular expression: the Unicode classes compile to
// 36 KB that every GC cycle marks.)
func validTagText(s string) bool {
	for _, r := range s {
		if !unicode.IsLetter(r) && !unicode.Is(unicode.Z, r) && !unicode.IsNumber(r) && !strings.ContainsRune("_.:/=+-@", r) {
			return false
		}
	}
	return true
}

// arBaseRefused lists the STS codes that mean "these base credentials are
// not (or no longer) accepted": the cached base credentials are dropped and
// the call is retried once with freshly retrieved ones.
var arBaseRefused = map[string]bool{
	"InvalidClientTokenId":        true,
	"SignatureDoesNotMatch":       true,
	"IncompleteSignature":         true,
	"InvalidSignatureException":   true,
	"MissingAuthenticationToken":  true,
	"UnrecognizedClientException": true,
	"ExpiredToken":                true,
	"ExpiredTokenException":       true,
	"RequestExpired":              true,
}

// AssumeRoleConfig configures NewAssumeRole: what every AssumeRole call of
// the source sends. The role, session name and duration are handed to each
// Fetch.
type AssumeRoleConfig struct {
	// ExternalID is sent as ExternalId when not empty (2..1224 characters
	// of [\w+=,.@:/-]).
	ExternalID string
	// SourceIdentity is sent when not empty (2..64 characters of the
	// RoleSessionName set [\w+=,.@-]); it needs sts:SetSourceIdentity.
	SourceIdentity string
	// Tags are session tags (at most 50; keys 1..128 and values 0..256
	// characters of [\p{L}\p{Z}\p{N}_.:/=+\-@]; keys unique regardless of
	// case and not starting with "aws:"), sent sorted by key. They need
	// sts:TagSession.
	Tags map[string]string
	// Region is the STS region. "" means the SDK's default configuration
	// (AWS_REGION, the shared config file); it is an error if none is found.
	// IMDS is never asked for the region.
	Region string
	// Base provides the credentials that sign the call, for example
	// (*InstanceProfile).Provider(). It is wrapped in an
	// aws.CredentialsCache (refreshed 5 min before expiry). nil means the
	// SDK's default credential chain (environment, shared files, SSO, web
	// identity, container credentials) WITHOUT its IMDS step: on the hosts
	// we run on, IMDS may be this daemon; use an InstanceProfile for that.
	Base aws.CredentialsProvider
	// HTTPClient is used for STS calls; nil means the SDK's default client
	// (which honours HTTP(S)_PROXY).
	HTTPClient *http.Client
	// MaxAttempts is the number of SDK attempts per STS call; 0 means 2.
	MaxAttempts int
	// Timeout bounds a whole Fetch (base credentials and retries included);
	// 0 means the caller's deadline, or DefaultTimeout when it has none.
	Timeout time.Duration
}

// AssumeRole fetches credentials with STS AssumeRole, signed (SigV4) with
// base credentials, for whichever role it is handed. It is safe for
// concurrent use; apart from the base credentials it has no cache of its
// own.
type AssumeRole struct {
	client         *sts.Client
	base           *aws.CredentialsCache
	inner          *aws.CredentialsCache // the SDK chain's own cache, nil otherwise
	externalID     string
	sourceIdentity string
	tags           []types.Tag
	durations      durationTable
	timeout        time.Duration
	log            *zap.Logger
	now            func() time.Time
}

// NewAssumeRole validates cfg and builds the STS client from the SDK's
// default configuration (region, AWS_ENDPOINT_URL_STS, AWS_ENDPOINT_URL,
// shared config, HTTP(S)_PROXY), never letting the SDK ask IMDS for
// anything. ctx bounds configuration loading only. log may be nil.
func NewAssumeRole(ctx context.Context, cfg AssumeRoleConfig, log *zap.Logger) (*AssumeRole, error) {
	if cfg.MaxAttempts < 0 || cfg.Timeout < 0 {
		return nil, errors.New("exchange: negative MaxAttempts or Timeout")
	}
	if err := validateExternalID(cfg.ExternalID); err != nil {
		return nil, err
	}
	if err := validateSourceIdentity(cfg.SourceIdentity); err != nil {
		return nil, err
	}
	tags, err := sessionTags(cfg.Tags)
	if err != nil {
		return nil, err
	}
	if log == nil {
		log = zap.NewNop()
	}
	o := awsOptions{Region: cfg.Region, HTTPClient: cfg.HTTPClient, MaxAttempts: cfg.MaxAttempts}
	if cfg.Base != nil {
		// Keep LoadDefaultConfig from building (and logging about) a chain.
		o.Credentials = aws.AnonymousCredentials{}
	} else {
		o.Chain = true
	}
	awsCfg, err := loadAWSConfig(ctx, o)
	if err != nil {
		return nil, err
	}
	base := cfg.Base
	var inner *aws.CredentialsCache
	if base == nil {
		if awsCfg.Credentials == nil {
			return nil, errors.New("exchange: the SDK's default configuration has no credential chain")
		}
		base = awsCfg.Credentials
		inner, _ = base.(*aws.CredentialsCache)
	}
	cache := aws.NewCredentialsCache(arMarkedProvider{base}, func(o *aws.CredentialsCacheOptions) {
		o.ExpiryWindow = arBaseCacheWindow
		o.ExpiryWindowJitterFrac = 0.2
	})
	client := sts.NewFromConfig(awsCfg, func(o *sts.Options) {
		o.Credentials = cache
	})
	return &AssumeRole{
		client:         client,
		base:           cache,
		inner:          inner,
		externalID:     cfg.ExternalID,
		sourceIdentity: cfg.SourceIdentity,
		tags:           tags,
		timeout:        cfg.Timeout,
		log:            log,
		now:            time.Now,
	}, nil
}

func validateExternalID(id string) error {
	if id == "" {
		return nil
	}
	if n := utf8.RuneCountInString(id); n < minExternalIDLen || n > maxExternalIDLen || !arExternalIDRe.MatchString(id) {
		return fmt.Errorf("exchange: invalid external id: want %d..%d characters of [A-Za-z0-9_+=,.@:/-]",
			minExternalIDLen, maxExternalIDLen)
	}
	return nil
}

func validateSourceIdentity(si string) error {
	if si == "" {
		return nil
	}
	if len(si) < minSessionName || len(si) > maxSessionName {
		return fmt.Errorf("exchange: source identity %q: want %d..%d characters", si, minSessionName, maxSessionName)
	}
	for _, r := range si {
		if !sessionNameChar(r) {
			return fmt.Errorf("exchange: source identity %q: only [A-Za-z0-9_+=,.@-] are allowed", si)
		}
	}
	return nil
}

// sessionTags validates tags and returns them sorted by key.
func sessionTags(m map[string]string) ([]types.Tag, error) {
	if len(m) > MaxSessionTags {
		return nil, fmt.Errorf("exchange: %d session tags, at most %d are allowed", len(m), MaxSessionTags)
	}
	seen := make(map[string]string, len(m))
	tags := make([]types.Tag, 0, len(m))
	for k, v := range m {
		switch n := utf8.RuneCountInString(k); {
		case n == 0 || n > MaxTagKeyLen:
			return nil, fmt.Errorf("exchange: session tag key %q: want 1..%d characters", k, MaxTagKeyLen)
		case !utf8.ValidString(k) || !validTagText(k):
			return nil, fmt.Errorf("exchange: session tag key %q: only letters, digits, spaces and _.:/=+-@ are allowed", k)
		case strings.HasPrefix(strings.ToLower(k), "aws:"):
			return nil, fmt.Errorf("exchange: session tag key %q: the aws: prefix is reserved", k)
		}
		if utf8.RuneCountInString(v) > MaxTagValueLen {
			return nil, fmt.Errorf("exchange: session tag %q: value longer than %d characters", k, MaxTagValueLen)
		}
		if !utf8.ValidString(v) || !validTagText(v) {
			return nil, fmt.Errorf("exchange: session tag %q: value may hold only letters, digits, spaces and _.:/=+-@", k)
		}
		if other, dup := seen[strings.ToLower(k)]; dup {
			return nil, fmt.Errorf("exchange: session tag keys %q and %q differ only in case (STS keys are case-insensitive)", other, k)
		}
		seen[strings.ToLower(k)] = k
		tags = append(tags, types.Tag{Key: aws.String(k), Value: aws.String(v)})
	}
	sort.Slice(tags, func(i, j int) bool { return *tags[i].Key < *tags[j].Key })
	return tags, nil
}

// Fetch calls STS AssumeRole for role (its ARN, session name — required —
// and duration), signed with the base credentials. Role chaining (base
// credentials that are themselves a role session, such as instance-profile
// credentials) is limited to 1 h by STS: a longer duration is refused once,
// then 1 h is asked for this role until the AssumeRole is rebuilt.
//
// When STS refuses the base credentials (InvalidClientTokenId,
// SignatureDoesNotMatch, ExpiredToken, ...) the cached base credentials are
// dropped and the call is retried once. Errors are *Error: STS errors are
// classified by Classify (AccessDenied is permanent, ...); a failure to get
// base credentials, or their refusal, is class base_credentials. On success
// the credentials are Complete and valid now, Source "assume-role", RoleARN
// the assumed-role ARN and AccountID its account.
func (a *AssumeRole) Fetch(ctx context.Context, role creds.Role) (creds.Credentials, error) {
	if err := checkRole(opAssumeRole, role, true); err != nil {
		return creds.Credentials{}, err
	}
	ctx, cancel := bound(ctx, a.timeout)
	defer cancel()
	dur := a.durations.of(role)

	out, err := a.assume(ctx, role, dur)
	var be *arBaseError
	if err != nil && !errors.As(err, &be) && dur.refused(err, a.log) {
		out, err = a.assume(ctx, role, dur)
	}
	if err != nil && a.baseRefused(err) && ctx.Err() == nil {
		e := Classify(err)
		a.log.Info("STS refused the base credentials; retrying once with freshly retrieved ones",
			zap.String("code", e.Code), zap.String("request_id", e.RequestID))
		a.invalidateBase()
		out, err = a.assume(ctx, role, dur)
	}
	if err != nil {
		e := a.classify(err, role)
		if e.Class == ClassBaseCredentials {
			a.invalidateBase()
		}
		return creds.Credentials{}, e
	}
	if out == nil {
		return creds.Credentials{}, &Error{Op: opAssumeRole, Role: role.ARN, Class: ClassInvalidResponse, Message: "empty response"}
	}
	c, err := stsCredentials(opAssumeRole, SourceAssumeRole, role.ARN, out.Credentials, out.AssumedRoleUser, a.now(), a.log)
	if err != nil {
		return creds.Credentials{}, err
	}
	a.log.Debug("assumed role", zap.Object("credentials", c))
	return c, nil
}

func (a *AssumeRole) invalidateBase() {
	a.base.Invalidate()
	if a.inner != nil {
		a.inner.Invalidate()
	}
}

func (a *AssumeRole) assume(ctx context.Context, role creds.Role, dur *sessionDuration) (*sts.AssumeRoleOutput, error) {
	in := &sts.AssumeRoleInput{
		RoleArn:         aws.String(role.ARN),
		RoleSessionName: aws.String(SanitizeSessionName(role.SessionName)),
	}
	if d := dur.get(); d > 0 {
		in.DurationSeconds = aws.Int32(int32(d / time.Second))
	}
	if a.externalID != "" {
		in.ExternalId = aws.String(a.externalID)
	}
	if a.sourceIdentity != "" {
		in.SourceIdentity = aws.String(a.sourceIdentity)
	}
	if len(a.tags) > 0 {
		in.Tags = a.tags
	}
	return a.client.AssumeRole(ctx, in)
}

func (a *AssumeRole) baseRefused(err error) bool {
	var be *arBaseError
	if errors.As(err, &be) {
		return false
	}
	return arBaseRefused[Classify(err).Code]
}

// classify names the operation and role; base credential failures and
// refusals become class base_credentials.
func (a *AssumeRole) classify(err error, role creds.Role) *Error {
	var be *arBaseError
	if errors.As(err, &be) {
		var p interface{ Permanent() bool }
		e := &Error{
			Op:        opAssumeRole + " base credentials",
			Role:      role.ARN,
			Class:     ClassBaseCredentials,
			Message:   sanitize(be.err.Error(), maxMessage, false),
			Err:       err,
			permanent: errors.As(be.err, &p) && p.Permanent(),
		}
		a.log.Debug("AssumeRole base credentials failed", zap.Error(e))
		return e
	}
	e := Classify(err)
	if e.Op == "" {
		e.Op = opAssumeRole
	}
	e.Role = role.ARN
	if arBaseRefused[e.Code] {
		e.Class, e.permanent = ClassBaseCredentials, false
	}
	a.log.Debug("AssumeRole failed", zap.String("class", e.Class), zap.String("code", e.Code),
		zap.Int("http_status", e.HTTPStatus), zap.String("request_id", e.RequestID))
	return e
}

// arMarkedProvider marks the errors of the base provider, so that Fetch can
// tell them from STS's.
type arMarkedProvider struct{ p aws.CredentialsProvider }

func (m arMarkedProvider) Retrieve(ctx context.Context) (aws.Credentials, error) {
	c, err := m.p.Retrieve(ctx)
	if err != nil {
		return aws.Credentials{}, &arBaseError{err: err}
	}
	return c, nil
}

// arBaseError is a failure of the base credential provider.
type arBaseError struct{ err error }

func (e *arBaseError) Error() string { return "base credentials: " + e.err.Error() }
func (e *arBaseError) Unwrap() error { return e.err }

// RetryableError tells the SDK's retryer not to retry: the base provider
// retries on its own, and the cache owns long-term backoff.
func (e *arBaseError) RetryableError() bool { return false }

// forgetDurationCaps asks for each role's configured duration again
// (Sources.ForgetDurationCaps).
func (a *AssumeRole) forgetDurationCaps() { a.durations.forget() }
