// Package exchange turns the host's identity into AWS credentials for the
// workload role.
//
// WebIdentity exchanges an OIDC JWT (from a TokenSource, usually token.File)
// for role credentials with STS AssumeRoleWithWebIdentity, using
// aws-sdk-go-v2. The call is unsigned, so the daemon needs no AWS credentials
// of its own. The SDK's conventions apply: AWS_REGION, AWS_ENDPOINT_URL_STS,
// AWS_ENDPOINT_URL, the shared config file, HTTP(S)_PROXY.
//
// Every failure is an *Error carrying a class and a permanent flag (the
// ErrorClass and Permanent methods of docs/architecture.md); Classify maps
// SDK errors to those classes. A failure to obtain the identity token is
// returned wrapped with its own class (for token.File: "identity").
//
// Neither errors nor log lines ever contain the identity token, the secret
// access key or the session token.
package exchange

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/sts"
	"go.uber.org/zap"

	"github.com/imdsproxy/imdsproxy/creds"
)

// SourceWebIdentity is the creds.Credentials.Source of credentials from
// WebIdentity.
const SourceWebIdentity = "web-identity"

// opAssumeRoleWithWebIdentity names the STS operation in errors.
const opAssumeRoleWithWebIdentity = "AssumeRoleWithWebIdentity"

// Defaults and limits of WebIdentityConfig.
const (
	DefaultMaxAttempts = 2                // SDK attempts per Fetch when MaxAttempts is 0
	DefaultTimeout     = 20 * time.Second // bound of one Fetch when Timeout is 0 and the caller set no deadline
	MinDuration        = 15 * time.Minute // STS minimum DurationSeconds
	MaxDuration        = 12 * time.Hour   // STS maximum DurationSeconds (role MaxSessionDuration may be lower)
)

// invalidTokenRetryDelay is the pause before the single retry after
// InvalidIdentityToken: a just-rotated JWKS or an eventually consistent OIDC
// provider needs a moment.
const invalidTokenRetryDelay = 300 * time.Millisecond

// TokenSource returns the current identity token (a JWT). It is called for
// every exchange, so it must pick up rotation; token.File implements it.
// Errors should carry the ErrorClass/Permanent methods of
// docs/architecture.md (token.Error does). It is an alias of an interface
// literal, identical to token.JWTSource.
type TokenSource = interface {
	Token(ctx context.Context) (string, error)
}

// SubjectTokens is a TokenSource that also mints the tokens of workload
// subjects (token.Command and token.URL): a role with a Subject is assumed
// with its subject's token, never the host's.
type SubjectTokens interface {
	ForSubject(subject string) (TokenSource, error)
}

// tokenForgetter is implemented by token sources that remember a token
// between calls (token.Command, token.URL): Forget(tok) makes the next Token
// obtain a new one. WebIdentity calls it when STS refuses tok, so a token
// STS considers expired or invalid is not served again from memory because
// the local clock disagrees.
type tokenForgetter interface {
	Forget(tok string)
}

// WebIdentityConfig configures NewWebIdentity. The role, session name and
// duration are not configuration of the exchange: every Fetch is handed the
// role it must fetch.
type WebIdentityConfig struct {
	// Region is the STS region. "" means the SDK's default configuration
	// (AWS_REGION, the shared config file); it is an error if none is found.
	// IMDS is never asked for the region.
	Region string
	// HTTPClient is used for STS calls; nil means the SDK's default client
	// (which honours HTTP(S)_PROXY).
	HTTPClient *http.Client
	// MaxAttempts is the number of SDK attempts per Fetch; 0 means 2. Long-term
	// backoff is the caller's job (the cache). Throttling, 5xx, transport errors
	// and IDPCommunicationError are retried; InvalidIdentityToken is retried
	// once more by Fetch itself with a re-read token.
	MaxAttempts int
	// Timeout bounds a whole Fetch, retries included; 0 means the
	// caller's deadline (the cache's fetch_timeout), or 20 s when it has none.
	Timeout time.Duration
}

// WebIdentity fetches credentials with STS AssumeRoleWithWebIdentity, for
// whichever role it is handed, with the identity token of its TokenSource.
// It is safe for concurrent use; it has no cache of its own.
type WebIdentity struct {
	client     *sts.Client
	durations  durationTable
	timeout    time.Duration
	tokens     TokenSource
	log        *zap.Logger
	now        func() time.Time
	retryDelay time.Duration
}

// NewWebIdentity builds the STS client from the SDK's default configuration
// (region, endpoint overrides, shared config) with anonymous credentials: no
// credential chain is consulted and LoadDefaultConfig neither blocks nor fails
// when the host has no AWS credentials. ctx bounds configuration loading
// only. log may be nil.
func NewWebIdentity(ctx context.Context, cfg WebIdentityConfig, tokens TokenSource, log *zap.Logger) (*WebIdentity, error) {
	if tokens == nil {
		return nil, errors.New("exchange: nil token source")
	}
	if cfg.MaxAttempts < 0 || cfg.Timeout < 0 {
		return nil, errors.New("exchange: negative MaxAttempts or Timeout")
	}
	if log == nil {
		log = zap.NewNop()
	}
	awsCfg, err := loadAWSConfig(ctx, awsOptions{
		Region: cfg.Region, HTTPClient: cfg.HTTPClient, MaxAttempts: cfg.MaxAttempts,
		RetryCodes: []string{"IDPCommunicationError"},
	})
	if err != nil {
		return nil, err
	}
	client := sts.NewFromConfig(awsCfg, func(o *sts.Options) {
		o.Credentials = aws.AnonymousCredentials{}
	})
	return &WebIdentity{
		client:     client,
		timeout:    cfg.Timeout,
		tokens:     tokens,
		log:        log,
		now:        time.Now,
		retryDelay: invalidTokenRetryDelay,
	}, nil
}

// forgetDurationCaps asks for each role's configured duration again
// (Sources.ForgetDurationCaps).
func (w *WebIdentity) forgetDurationCaps() { w.durations.forget() }

// bound bounds one Fetch: by timeout when one was configured; else by the
// caller's deadline, which the daemon's cache sets from cache.fetch_timeout
// (an exchange must not cut that short); else by DefaultTimeout.
func bound(ctx context.Context, timeout time.Duration) (context.Context, context.CancelFunc) {
	if timeout == 0 {
		if _, ok := ctx.Deadline(); ok {
			return ctx, func() {}
		}
		timeout = DefaultTimeout
	}
	return context.WithTimeout(ctx, timeout)
}

// Fetch reads the identity token and exchanges it for credentials of role:
// its ARN, its session name (SanitizeSessionName; required) and its duration
// (0: STS's default).
//
// On InvalidIdentityToken the token is re-read and the call retried once
// after a short pause; on ExpiredTokenException it is retried once only if
// the re-read token differs. A source that remembers tokens is told to
// forget the refused one first (tokenForgetter), so the re-read obtains a
// new token. Errors are *Error, or the token source's error
// wrapped with %w (its ErrorClass/Permanent stay reachable with errors.As).
// On success the credentials are Complete and valid now.
func (w *WebIdentity) Fetch(ctx context.Context, role creds.Role) (creds.Credentials, error) {
	if err := checkRole(opAssumeRoleWithWebIdentity, role, true); err != nil {
		return creds.Credentials{}, err
	}
	ctx, cancel := bound(ctx, w.timeout)
	defer cancel()
	dur := w.durations.of(role)

	tokens, err := w.tokensOf(role)
	if err != nil {
		return creds.Credentials{}, err
	}
	tok, err := token(ctx, tokens)
	if err != nil {
		return creds.Credentials{}, err
	}
	out, err := w.assume(ctx, role, dur, tok)
	if err != nil && dur.refused(err, w.log) {
		out, err = w.assume(ctx, role, dur, tok)
	}
	if err != nil {
		e := w.classify(err, role, tok)
		if e.Class != ClassInvalidToken && e.Class != ClassExpiredToken {
			return creds.Credentials{}, e
		}
		if e.Class == ClassInvalidToken && w.retryDelay > 0 {
			t := time.NewTimer(w.retryDelay)
			select {
			case <-ctx.Done():
				t.Stop()
				return creds.Credentials{}, e
			case <-t.C:
			}
		}
		if f, ok := tokens.(tokenForgetter); ok {
			f.Forget(tok)
		}
		fresh, terr := token(ctx, tokens)
		if terr != nil {
			return creds.Credentials{}, terr
		}
		if e.Class == ClassExpiredToken && fresh == tok {
			return creds.Credentials{}, e
		}
		w.log.Info("identity token refused by STS, retrying once with a re-read token",
			zap.String("class", e.Class), zap.String("code", e.Code), zap.String("request_id", e.RequestID))
		tok = fresh
		if out, err = w.assume(ctx, role, dur, tok); err != nil {
			return creds.Credentials{}, w.classify(err, role, tok)
		}
	}
	if out == nil {
		return creds.Credentials{}, &Error{Op: opAssumeRoleWithWebIdentity, Role: role.ARN, Class: ClassInvalidResponse, Message: "empty response"}
	}
	c, err := stsCredentials(opAssumeRoleWithWebIdentity, SourceWebIdentity, role.ARN, out.Credentials, out.AssumedRoleUser, w.now(), w.log)
	if err != nil {
		return creds.Credentials{}, err
	}
	w.log.Debug("assumed role with web identity", zap.Object("credentials", c))
	return c, nil
}

// tokensOf is the token source of role: the host's, or its subject's.
func (w *WebIdentity) tokensOf(role creds.Role) (TokenSource, error) {
	if role.Subject == "" {
		return w.tokens, nil
	}
	s, ok := w.tokens.(SubjectTokens)
	if !ok {
		return nil, &Error{Op: "read identity token", Role: role.ARN, Class: ClassValidation, permanent: true,
			Message: fmt.Sprintf("workload subject %q: the identity source mints one subject only (use identity.jwt_url or identity.jwt_command)", role.Subject)}
	}
	src, err := s.ForSubject(role.Subject)
	if err != nil {
		return nil, &Error{Op: "read identity token", Role: role.ARN, Class: ClassValidation, permanent: true, Message: err.Error()}
	}
	return src, nil
}

// token reads a token from tokens, classified.
func token(ctx context.Context, tokens TokenSource) (string, error) {
	tok, err := tokens.Token(ctx)
	if err != nil {
		var classed interface{ ErrorClass() string }
		if errors.As(err, &classed) {
			return "", fmt.Errorf("exchange: web identity token: %w", err)
		}
		e := Classify(err)
		if e.Class == ClassOther && ctx.Err() == nil {
			e.Class = ClassIdentity
		}
		e.Op = "read identity token"
		return "", e
	}
	if tok == "" {
		return "", &Error{Op: "read identity token", Class: ClassIdentity, Message: "token source returned an empty token"}
	}
	return tok, nil
}

func (w *WebIdentity) assume(ctx context.Context, role creds.Role, dur *sessionDuration, tok string) (*sts.AssumeRoleWithWebIdentityOutput, error) {
	in := &sts.AssumeRoleWithWebIdentityInput{
		RoleArn:          aws.String(role.ARN),
		RoleSessionName:  aws.String(SanitizeSessionName(role.SessionName)),
		WebIdentityToken: aws.String(tok),
	}
	if d := dur.get(); d > 0 {
		in.DurationSeconds = aws.Int32(int32(d / time.Second))
	}
	return w.client.AssumeRoleWithWebIdentity(ctx, in)
}

// classify wraps Classify, names the operation and role and makes sure the
// token cannot appear in the message.
func (w *WebIdentity) classify(err error, role creds.Role, tok string) *Error {
	e := Classify(err)
	if e.Op == "" {
		e.Op = opAssumeRoleWithWebIdentity
	}
	e.Role = role.ARN
	if tok != "" {
		e.Message = strings.ReplaceAll(e.Message, tok, "<redacted>")
	}
	w.log.Debug("AssumeRoleWithWebIdentity failed", zap.String("class", e.Class), zap.String("code", e.Code),
		zap.Int("http_status", e.HTTPStatus), zap.String("request_id", e.RequestID))
	return e
}

// checkRole refuses a role an STS call cannot be made for (a bug in the
// caller, never a transient state): class validation, permanent.
func checkRole(op string, r creds.Role, needSession bool) *Error {
	var msg string
	switch {
	case !strings.HasPrefix(r.ARN, "arn:") || strings.Count(r.ARN, ":") < 5 || !strings.Contains(r.ARN, ":role/"):
		msg = fmt.Sprintf("invalid role ARN %q", r.ARN)
	case needSession && strings.TrimSpace(r.SessionName) == "":
		msg = "empty session name"
	case r.Duration != 0 && (r.Duration < MinDuration || r.Duration > MaxDuration):
		msg = fmt.Sprintf("duration %s outside %s..%s", r.Duration, MinDuration, MaxDuration)
	case r.Subject != "" && op != opAssumeRoleWithWebIdentity:
		return subjectRefused(op, r)
	default:
		return nil
	}
	return &Error{Op: op, Role: r.ARN, Class: ClassValidation, Message: msg, permanent: true}
}

// subjectRefused is the error of a source that has no per-workload identity
// handed a role with a workload subject: never the host's identity for a
// role meant to be assumed with a workload's own token.
func subjectRefused(op string, r creds.Role) *Error {
	return &Error{Op: op, Role: r.ARN, Class: ClassValidation, permanent: true,
		Message: fmt.Sprintf("workload subject %q: only web identity assumes a role with a workload's own token", r.Subject)}
}
