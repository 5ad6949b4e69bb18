package exchange

import (
	"context"
	"errors"
	"io"
	"net"
	"strconv"
	"strings"
	"syscall"
	"unicode/utf8"

	awshttp "github.com/aws/aws-sdk-go-v2/aws/transport/http"
	"github.com/aws/smithy-go"
	smithyhttp "github.com/aws/smithy-go/transport/http"

	"github.com/imdsproxy/imdsproxy/creds"
)

// Error classes (see docs/architecture.md, "Error classification"). They are
// bounded, snake_case and usable as metric labels.
const (
	ClassThrottling      = "throttling"       // STS throttled the call (Throttling, HTTP 429, ...); retryable
	ClassServer          = "server"           // STS failed (5xx, InternalFailure, ServiceUnavailable); retryable
	ClassTimeout         = "timeout"          // the call timed out (deadline, net timeout, RequestTimeout); retryable
	ClassNetwork         = "network"          // connection refused/reset, DNS failure, ...; retryable
	ClassIDP             = "idp"              // IDPCommunicationError: STS could not reach the OIDC issuer; retryable
	ClassInvalidToken    = "invalid_token"    // InvalidIdentityToken: signature/aud/iss/JWKS mismatch; retryable (JWKS propagation)
	ClassExpiredToken    = "expired_token"    // ExpiredTokenException; permanent (a new token is needed)
	ClassAccessDenied    = "access_denied"    // AccessDenied (trust policy); permanent
	ClassValidation      = "validation"       // ValidationError, MalformedPolicyDocument, PackedPolicyTooLarge, IDPRejectedClaim; permanent
	ClassRegionDisabled  = "region_disabled"  // RegionDisabledException; permanent
	ClassInvalidResponse = "invalid_response" // STS answered 2xx with an unusable document; retryable
	ClassIdentity        = "identity"         // the host identity token could not be obtained locally
	ClassOther           = "other"            // anything else; retryable
)

// maxMessage is the longest message, in bytes, kept in an Error.
const maxMessage = 256

// codeClass maps STS / AWS Query error codes to classes.
var codeClass = map[string]string{
	// Throttling: the standard retryer's throttle codes (aws/retry) plus 429.
	"Throttling":                             ClassThrottling,
	"ThrottlingException":                    ClassThrottling,
	"ThrottledException":                     ClassThrottling,
	"RequestThrottledException":              ClassThrottling,
	"TooManyRequestsException":               ClassThrottling,
	"ProvisionedThroughputExceededException": ClassThrottling,
	"TransactionInProgressException":         ClassThrottling,
	"RequestLimitExceeded":                   ClassThrottling,
	"BandwidthLimitExceeded":                 ClassThrottling,
	"LimitExceededException":                 ClassThrottling,
	"RequestThrottled":                       ClassThrottling,
	"SlowDown":                               ClassThrottling,
	"PriorRequestNotComplete":                ClassThrottling,
	"EC2ThrottledException":                  ClassThrottling,

	"InternalFailure":             ClassServer,
	"InternalError":               ClassServer,
	"InternalServerError":         ClassServer,
	"InternalServiceError":        ClassServer,
	"ServiceUnavailable":          ClassServer,
	"ServiceUnavailableException": ClassServer,

	"RequestTimeout":          ClassTimeout,
	"RequestTimeoutException": ClassTimeout,

	"IDPCommunicationError": ClassIDP,
	"InvalidIdentityToken":  ClassInvalidToken,
	"ExpiredTokenException": ClassExpiredToken,
	"ExpiredToken":          ClassExpiredToken,

	"AccessDenied":          ClassAccessDenied,
	"AccessDeniedException": ClassAccessDenied,

	"ValidationError":             ClassValidation,
	"ValidationException":         ClassValidation,
	"MalformedPolicyDocument":     ClassValidation,
	"PackedPolicyTooLarge":        ClassValidation,
	"IDPRejectedClaim":            ClassValidation,
	"InvalidParameterValue":       ClassValidation,
	"InvalidParameterCombination": ClassValidation,
	"MissingParameter":            ClassValidation,
	"InvalidAction":               ClassValidation,

	"RegionDisabledException": ClassRegionDisabled,
}

// permanentClass lists the classes for which retrying without an outside
// change (trust policy, token agent, configuration) cannot help.
var permanentClass = map[string]bool{
	ClassAccessDenied:   true,
	ClassExpiredToken:   true,
	ClassValidation:     true,
	ClassRegionDisabled: true,
}

// Error is a classified failure of an exchange. Its message is built from the
// fields only (operation, class, STS error code, HTTP status and a sanitized
// message of at most 256 bytes) and never contains the identity token or
// credentials: messages quoted from upstream are redacted with
// creds.RedactText before they are cut to length (Classify), and Error
// redacts Code, Message and RequestID once more when it writes them, so
// that an Error built by hand cannot carry a JWT, a long-term key id or a
// secret key either. Use errors.As to reach it, or the ErrorClass/Permanent
// interfaces of docs/architecture.md.
type Error struct {
	// Op is the failed operation, for example "AssumeRoleWithWebIdentity".
	Op string
	// Role is the role ARN of the call, "" when unknown.
	Role string
	// Code is the STS error code (AccessDenied, InvalidIdentityToken, ...),
	// "" when the failure did not come from an STS error document.
	Code string
	// Message is STS's error message or a description of the failure,
	// redacted (creds.RedactText), sanitized (no control characters) and
	// at most 256 bytes.
	Message string
	// RequestID is STS's request id, "" when unknown.
	RequestID string
	// Class is one of the Class constants.
	Class string
	// HTTPStatus is the HTTP status STS answered, 0 when no response arrived.
	HTTPStatus int
	// Err is the underlying error (usually from aws-sdk-go-v2).
	Err error

	permanent bool
	tooLarge  bool // the answer was larger than MaxResponseBody
}

// Error returns "exchange: <op> <role>: <class>[ <code>][ (HTTP <status>)]: <message>".
func (e *Error) Error() string {
	var b strings.Builder
	b.WriteString("exchange: ")
	b.WriteString(creds.RedactText(e.Op))
	if e.Role != "" {
		b.WriteString(" ")
		b.WriteString(e.Role)
	}
	b.WriteString(": ")
	b.WriteString(e.Class)
	if e.Code != "" {
		b.WriteString(" ")
		b.WriteString(creds.RedactText(e.Code))
	}
	if e.HTTPStatus != 0 {
		b.WriteString(" (HTTP ")
		b.WriteString(strconv.Itoa(e.HTTPStatus))
		b.WriteString(")")
	}
	if e.Message != "" {
		b.WriteString(": ")
		b.WriteString(creds.RedactText(e.Message))
	}
	if e.RequestID != "" {
		b.WriteString(" (request id ")
		b.WriteString(creds.RedactText(e.RequestID))
		b.WriteString(")")
	}
	return b.String()
}

// ErrorClass returns e.Class.
func (e *Error) ErrorClass() string { return e.Class }

// Permanent reports whether retrying without an outside change cannot help:
// true for access_denied, expired_token, validation and region_disabled (and
// for a wrapped error that says so itself).
func (e *Error) Permanent() bool { return e.permanent }

// TooLarge reports whether the failure is an answer larger than
// MaxResponseBody (the error the readers of objects recognise).
func (e *Error) TooLarge() bool { return e.tooLarge }

// Unwrap returns the underlying error.
func (e *Error) Unwrap() error { return e.Err }

// Classify turns any error of an STS call into an *Error. It returns nil for
// nil and err itself when err already is (or wraps) an *Error. The class is
// decided in this order: a known STS error code; HTTP 429 (throttling) or 5xx
// (server); a timeout (context deadline, net timeout); a cancelled context
// (other); a network failure (connection refused or reset, DNS, send
// failure); a response that could not be deserialized (invalid_response); an
// error with its own ErrorClass/Permanent methods keeps them; else other.
func Classify(err error) *Error {
	if err == nil {
		return nil
	}
	var e *Error
	if errors.As(err, &e) {
		return e
	}
	e = &Error{Err: err, Class: ClassOther}
	var op *smithy.OperationError
	if errors.As(err, &op) {
		e.Op = op.OperationName
	}
	var resp *smithyhttp.ResponseError
	if errors.As(err, &resp) {
		e.HTTPStatus = resp.HTTPStatusCode()
	}
	var awsResp *awshttp.ResponseError
	if errors.As(err, &awsResp) {
		e.RequestID = sanitizeMessage(awsResp.ServiceRequestID(), 128, false)
	}
	var api smithy.APIError
	if errors.As(err, &api) {
		e.Code = sanitizeMessage(api.ErrorCode(), 128, false)
		e.Message = sanitizeMessage(api.ErrorMessage(), maxMessage, false)
	} else {
		// No STS document: describe the transport failure, keeping the tail
		// (the SDK prefixes it with long, generic context).
		inner := err
		if op != nil && op.Err != nil {
			inner = op.Err
		}
		e.Message = sanitizeMessage(inner.Error(), maxMessage, true)
	}
	e.Class, e.permanent = classOf(err, e.Code, e.HTTPStatus)
	return e
}

func classOf(err error, code string, status int) (class string, permanent bool) {
	if c, ok := codeClass[code]; ok {
		return c, permanentClass[c]
	}
	switch {
	case status == 429:
		return ClassThrottling, false
	case status >= 500 && status <= 599:
		return ClassServer, false
	}
	if isTimeout(err) {
		return ClassTimeout, false
	}
	if errors.Is(err, context.Canceled) {
		return ClassOther, false
	}
	if isNetwork(err) {
		return ClassNetwork, false
	}
	var de *smithy.DeserializationError
	if errors.As(err, &de) && code == "" {
		return ClassInvalidResponse, false
	}
	var classed interface{ ErrorClass() string }
	if errors.As(err, &classed) {
		var p interface{ Permanent() bool }
		return classed.ErrorClass(), errors.As(err, &p) && p.Permanent()
	}
	return ClassOther, false
}

func isTimeout(err error) bool {
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, syscall.ETIMEDOUT) {
		return true
	}
	var rt *awshttp.ResponseTimeoutError
	if errors.As(err, &rt) {
		return true
	}
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

func isNetwork(err error) bool {
	var dns *net.DNSError
	var opErr *net.OpError
	var send *smithyhttp.RequestSendError
	switch {
	case errors.As(err, &dns), errors.As(err, &opErr), errors.As(err, &send):
		return true
	case errors.Is(err, syscall.ECONNREFUSED), errors.Is(err, syscall.ECONNRESET),
		errors.Is(err, syscall.ECONNABORTED), errors.Is(err, syscall.EHOSTUNREACH),
		errors.Is(err, syscall.ENETUNREACH), errors.Is(err, syscall.EPIPE),
		errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, net.ErrClosed):
		return true
	}
	return false
}

// sanitizeMessage is sanitize for text quoted from upstream (an error
// message, an error code, a response body): control characters and invalid
// UTF-8 become spaces, then everything that looks like a secret is
// redacted (creds.RedactText), and only then is the text cut to max bytes,
// so that a cut can never leave the part of a secret no rule recognises any
// more (a token cut after its header and claims).
func sanitizeMessage(s string, max int, keepTail bool) string {
	return cut(creds.RedactText(controlToSpace(s)), max, keepTail)
}

// sanitize replaces control characters and invalid UTF-8 with spaces and
// limits s to max bytes, keeping the head (or the tail when keepTail). It
// does not redact: use it for values that must stay verbatim (an access key
// id, an ARN), and sanitizeMessage for text quoted from upstream.
func sanitize(s string, max int, keepTail bool) string {
	return cut(controlToSpace(s), max, keepTail)
}

func controlToSpace(s string) string {
	return strings.Map(func(r rune) rune {
		if r == utf8.RuneError || r < 0x20 || r == 0x7f || (r >= 0x80 && r < 0xa0) {
			return ' '
		}
		return r
	}, s)
}

// cut trims s and limits it to max bytes, keeping the head (or the tail
// when keepTail) and marking the cut with "…".
func cut(s string, max int, keepTail bool) string {
	s = strings.TrimSpace(s)
	if len(s) <= max {
		return s
	}
	const ellipsis = "…"
	if keepTail {
		i := len(s) - (max - len(ellipsis))
		for i < len(s) && !utf8.RuneStart(s[i]) {
			i++
		}
		return ellipsis + s[i:]
	}
	i := max - len(ellipsis)
	for i > 0 && !utf8.RuneStart(s[i]) {
		i--
	}
	return s[:i] + ellipsis
}
