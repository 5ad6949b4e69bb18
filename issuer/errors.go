package issuer

import (
	"errors"
	"fmt"
	"net/http"
)

// Reasons a token request is refused: the reason label of
// imdsproxy_issuer_attestation_failures_total and the "code" of the error
// answer. The set is closed (bounded metric labels).
const (
	reasonBadRequest       = "bad_request"        // not a token request (JSON, fields)
	reasonTooLarge         = "too_large"          // body over 1 MiB
	reasonMediaType        = "unsupported_media"  // Content-Type is not application/json
	reasonMethodDisabled   = "method_disabled"    // the attestation method is not enabled
	reasonMalformed        = "malformed"          // document, signature or STS request unusable
	reasonUntrusted        = "untrusted_signer"   // PKCS7 signed by a certificate not trusted
	reasonBadSignature     = "bad_signature"      // PKCS7 signature does not verify
	reasonDocumentMismatch = "document_mismatch"  // signed content differs from document
	reasonTooOld           = "instance_too_old"   // pendingTime older than max_instance_age
	reasonNotRunning       = "instance_not_found" // EC2: no such instance, or not running
	reasonLaunchMismatch   = "launch_mismatch"    // EC2: launch time differs from pendingTime
	reasonEC2Unavailable   = "ec2_unavailable"    // EC2 could not be asked
	reasonIssuerHeader     = "issuer_header"      // X-Imdsproxy-Issuer missing, unsigned or wrong
	reasonSTSEndpoint      = "sts_endpoint"       // the request is signed for an endpoint not allowed
	reasonSTSDenied        = "sts_denied"         // STS refused the signed request
	reasonSTSUnavailable   = "sts_unavailable"    // STS could not be asked
	reasonSTSBusy          = "sts_busy"           // attestation.aws_iam.max_in_flight forwards to STS already
	reasonNotInstance      = "not_instance"       // the caller is not an EC2 instance profile session
	reasonNoRule           = "no_rule"            // no policy rule matches the host
	reasonWorkload         = "workload_denied"    // the rule does not list the workload
	reasonTags             = "tags_invalid"       // session tags would break STS limits
	reasonRateLimited      = "rate_limited"       // per-host token bucket empty
	reasonSign             = "sign_failed"        // the signing key failed (KMS)
	reasonDraining         = "draining"           // shutting down
)

// allReasons pre-creates the metric series.
var allReasons = []string{reasonBadRequest, reasonTooLarge, reasonMediaType, reasonMethodDisabled,
	reasonMalformed, reasonUntrusted, reasonBadSignature, reasonDocumentMismatch, reasonTooOld,
	reasonNotRunning, reasonLaunchMismatch, reasonEC2Unavailable, reasonIssuerHeader, reasonSTSEndpoint,
	reasonSTSDenied, reasonSTSUnavailable, reasonSTSBusy, reasonNotInstance, reasonNoRule, reasonWorkload, reasonTags,
	reasonRateLimited, reasonSign}

// statusOf is the one place a refusal's HTTP status is chosen.
func statusOf(reason string) int {
	switch reason {
	case reasonBadRequest, reasonMalformed:
		return http.StatusBadRequest
	case reasonTooLarge:
		return http.StatusRequestEntityTooLarge
	case reasonMediaType:
		return http.StatusUnsupportedMediaType
	case reasonRateLimited:
		return http.StatusTooManyRequests
	case reasonEC2Unavailable, reasonSTSUnavailable, reasonSTSBusy, reasonSign, reasonDraining:
		return http.StatusServiceUnavailable
	case reasonTags:
		return http.StatusInternalServerError
	default: // every refusal of an identity or a workload
		return http.StatusForbidden
	}
}

// attestError is a refused token request: a bounded reason and a message
// safe to return to the client and to log (it never holds a token, a
// signature or credentials).
type attestError struct {
	reason string
	msg    string
}

func (e *attestError) Error() string { return e.reason + ": " + e.msg }

func attestErr(reason, format string, args ...any) *attestError {
	return &attestError{reason: reason, msg: fmt.Sprintf(format, args...)}
}

// reasonOf is the reason of err (reasonSign for anything unclassified: the
// only untyped errors come from the signing key).
func reasonOf(err error) string {
	var ae *attestError
	if errors.As(err, &ae) {
		return ae.reason
	}
	return reasonSign
}
