package issuer

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
)

// MaxRequestBody bounds a token request body, in bytes.
const MaxRequestBody = 1 << 20

// TokenRequest is the body of POST /v1/token (docs/federation.md §2).
type TokenRequest struct {
	// Method is "aws_iid" (the default when absent) or "aws_iam".
	Method string `json:"method,omitempty"`
	// Workload is the subject asked for; "" means the matching rule's
	// first subject.
	Workload string `json:"workload,omitempty"`

	// aws_iid: the instance identity document (verbatim) and its PKCS7
	// signatures (base64; at least one).
	Document string `json:"document,omitempty"`
	PKCS7    string `json:"pkcs7,omitempty"`
	RSA2048  string `json:"rsa2048,omitempty"`

	// aws_iam: the signed sts:GetCallerIdentity, and the instance's region
	// (proven only by an EC2 lookup).
	STSRequest *STSRequest `json:"sts_request,omitempty"`
	Region     string      `json:"region,omitempty"`
}

// ParseTokenRequest decodes a token request body strictly: one JSON object
// of the known fields, nothing after it. Errors are *attestError with
// reasonBadRequest and never quote the body.
func ParseTokenRequest(body []byte) (*TokenRequest, error) {
	if len(body) > MaxRequestBody {
		return nil, attestErr(reasonTooLarge, "the body is larger than %d bytes", MaxRequestBody)
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	var req TokenRequest
	if err := dec.Decode(&req); err != nil {
		return nil, attestErr(reasonBadRequest, "the body is not a token request: %s", jsonProblem(err))
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return nil, attestErr(reasonBadRequest, "the body holds more than one JSON value")
	}
	if req.Method == "" {
		req.Method = MethodIID
		if req.STSRequest != nil {
			req.Method = MethodIAM
		}
	}
	switch req.Method {
	case MethodIID:
		if req.STSRequest != nil || req.Region != "" {
			return nil, attestErr(reasonBadRequest, `"sts_request" and "region" belong to method aws_iam`)
		}
	case MethodIAM:
		if req.Document != "" || req.PKCS7 != "" || req.RSA2048 != "" {
			return nil, attestErr(reasonBadRequest, `"document", "pkcs7" and "rsa2048" belong to method aws_iid`)
		}
	default:
		return nil, attestErr(reasonBadRequest, `unknown "method"; use aws_iid or aws_iam`)
	}
	if len(req.Workload) > MaxSubjectLen {
		return nil, attestErr(reasonBadRequest, `"workload" is longer than %d characters`, MaxSubjectLen)
	}
	return &req, nil
}

// jsonProblem describes a decoding error without quoting the input.
func jsonProblem(err error) string {
	var se *json.SyntaxError
	var te *json.UnmarshalTypeError
	switch {
	case errors.As(err, &se):
		return "invalid JSON"
	case errors.As(err, &te):
		return "field " + te.Field + " has the wrong type"
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		return "empty or truncated JSON"
	}
	const unknown = "json: unknown field "
	if s := err.Error(); len(s) > len(unknown) && s[:len(unknown)] == unknown && len(s) < len(unknown)+70 {
		return "unknown field " + s[len(unknown):]
	}
	return "not a JSON object of the expected fields"
}
