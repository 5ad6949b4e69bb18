package issuer

import (
	"context"
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/textproto"
	"net/url"
	"os"
	"regexp"
	"slices"
	"strings"
	"sync/atomic"
	"time"
)

// HeaderIssuer is the header that binds a presigned sts:GetCallerIdentity
// to one issuer: it must be signed, and equal the issuer's `issuer`.
const HeaderIssuer = "X-Imdsproxy-Issuer"

// Limits of the aws_iam method.
const (
	maxSTSBody      = 1 << 10
	maxSTSHeaders   = 32
	maxSTSAnswer    = 64 << 10
	maxSTSClockSkew = 15 * time.Minute
)

// STSRequest is a signed sts:GetCallerIdentity request, as the client
// would send it to STS itself.
type STSRequest struct {
	Method  string              `json:"method"`
	URL     string              `json:"url"`
	Headers map[string][]string `json:"headers"`
	Body    string              `json:"body"`
}

// iamVerifier verifies the aws_iam method: it forwards the client's signed
// GetCallerIdentity to STS and learns the caller from the answer.
type iamVerifier struct {
	issuer    string
	endpoints []*url.URL
	client    *http.Client
	timeout   time.Duration
	verify    bool
	lookup    *instanceLookup
	now       func() time.Time
	count     func(result string)
	// inFlight counts the forwards under way (the Server's, shared by
	// every generation); at maxInFlight a request is refused before it is
	// sent.
	inFlight    *atomic.Int64
	maxInFlight int64
}

// stsEndpoints returns the configured endpoints, else AWS_ENDPOINT_URL_STS,
// else DefaultSTSEndpoint.
func stsEndpoints(cfg *IAMConfig) ([]*url.URL, error) {
	list := cfg.STSEndpoints
	if len(list) == 0 {
		if e := os.Getenv("AWS_ENDPOINT_URL_STS"); e != "" {
			list = []string{e}
		} else {
			list = []string{DefaultSTSEndpoint}
		}
	}
	var out []*url.URL
	for _, e := range list {
		u, err := url.Parse(e)
		if err != nil || u.Host == "" {
			return nil, fmt.Errorf("STS endpoint %q is not a URL", e)
		}
		out = append(out, u)
	}
	return out, nil
}

// sameEndpoint reports whether u addresses the endpoint e (scheme and host,
// root path, no query).
func sameEndpoint(u, e *url.URL) bool {
	return strings.EqualFold(u.Scheme, e.Scheme) && strings.EqualFold(hostPort(u), hostPort(e)) &&
		(u.Path == "" || u.Path == "/") && u.RawQuery == "" && u.Fragment == "" && u.User == nil
}

func hostPort(u *url.URL) string {
	if u.Port() != "" {
		return u.Host
	}
	if u.Scheme == "https" {
		return u.Host + ":443"
	}
	return u.Host + ":80"
}

// sigV4Auth is what the issuer needs from a SigV4 Authorization header.
type sigV4Auth struct {
	service       string
	signedHeaders []string
}

// parseSigV4 parses "AWS4-HMAC-SHA256 Credential=AKID/DATE/REGION/SERVICE/
// aws4_request, SignedHeaders=a;b, Signature=hex". The issuer does not
// verify the signature (it has no secret; STS does), only what it covers.
func parseSigV4(h string) (*sigV4Auth, error) {
	alg, rest, ok := strings.Cut(strings.TrimSpace(h), " ")
	if !ok || alg != "AWS4-HMAC-SHA256" {
		return nil, errors.New("the Authorization header is not AWS4-HMAC-SHA256")
	}
	f := map[string]string{}
	for _, part := range strings.Split(rest, ",") {
		k, v, ok := strings.Cut(strings.TrimSpace(part), "=")
		if !ok {
			return nil, errors.New("malformed Authorization header")
		}
		f[k] = v
	}
	scope := strings.Split(f["Credential"], "/")
	if len(scope) != 5 || scope[4] != "aws4_request" || f["SignedHeaders"] == "" || f["Signature"] == "" {
		return nil, errors.New("malformed Authorization header")
	}
	return &sigV4Auth{service: scope[3], signedHeaders: strings.Split(f["SignedHeaders"], ";")}, nil
}

var getCallerIdentityForm = url.Values{"Action": {"GetCallerIdentity"}, "Version": {"2011-06-15"}}

// Verify checks the signed request, forwards it to STS and returns the
// caller's identity, or an *attestError.
func (v *iamVerifier) Verify(ctx context.Context, req *TokenRequest) (*Identity, error) {
	sr := req.STSRequest
	if sr == nil {
		return nil, attestErr(reasonMalformed, `"sts_request" is required with method aws_iam`)
	}
	if sr.Method != http.MethodPost {
		return nil, attestErr(reasonMalformed, "sts_request.method must be POST")
	}
	u, err := url.Parse(sr.URL)
	if err != nil || u.Host == "" {
		return nil, attestErr(reasonMalformed, "sts_request.url is not an absolute URL")
	}
	var endpoint *url.URL
	for _, e := range v.endpoints {
		if sameEndpoint(u, e) {
			endpoint = e
			break
		}
	}
	if endpoint == nil {
		return nil, attestErr(reasonSTSEndpoint, "sts_request.url is not an STS endpoint this issuer forwards to")
	}
	if len(sr.Body) > maxSTSBody {
		return nil, attestErr(reasonMalformed, "sts_request.body is too large")
	}
	form, err := url.ParseQuery(sr.Body)
	if err != nil || len(form) != len(getCallerIdentityForm) || form.Get("Action") != "GetCallerIdentity" ||
		form.Get("Version") != "2011-06-15" || len(form["Action"]) != 1 || len(form["Version"]) != 1 {
		return nil, attestErr(reasonMalformed, "sts_request.body must be exactly Action=GetCallerIdentity&Version=2011-06-15")
	}
	if len(sr.Headers) > maxSTSHeaders {
		return nil, attestErr(reasonMalformed, "sts_request.headers has too many headers")
	}
	h := http.Header{}
	for k, vs := range sr.Headers {
		ck := textproto.CanonicalMIMEHeaderKey(k)
		if len(h[ck]) > 0 || len(vs) == 0 {
			return nil, attestErr(reasonMalformed, "sts_request.headers: %s is given twice or empty", ck)
		}
		for _, hv := range vs {
			if strings.ContainsAny(hv, "\r\n\x00") {
				return nil, attestErr(reasonMalformed, "sts_request.headers: %s holds a control character", ck)
			}
		}
		h[ck] = vs
	}
	auth, err := parseSigV4(h.Get("Authorization"))
	if err != nil {
		return nil, attestErr(reasonMalformed, "sts_request: %v", err)
	}
	if auth.service != "sts" {
		return nil, attestErr(reasonMalformed, "sts_request is signed for service %q, not sts", auth.service)
	}
	if !slices.Contains(auth.signedHeaders, "host") {
		return nil, attestErr(reasonMalformed, "sts_request does not sign the Host header")
	}
	if !slices.Contains(auth.signedHeaders, strings.ToLower(HeaderIssuer)) {
		return nil, attestErr(reasonIssuerHeader, "sts_request does not sign the %s header", HeaderIssuer)
	}
	if got := h.Values(HeaderIssuer); len(got) != 1 || got[0] != v.issuer {
		return nil, attestErr(reasonIssuerHeader, "sts_request's %s is not this issuer (%s)", HeaderIssuer, v.issuer)
	}
	if t, err := time.Parse("20060102T150405Z", h.Get("X-Amz-Date")); err != nil {
		return nil, attestErr(reasonMalformed, "sts_request has no valid X-Amz-Date")
	} else if skew := v.now().Sub(t); skew > maxSTSClockSkew || skew < -maxSTSClockSkew {
		return nil, attestErr(reasonSTSDenied, "sts_request was signed at %s, more than %s from now", t.Format(time.RFC3339), maxSTSClockSkew)
	}

	// Forward only what the signature covers (plus the signature and the
	// session token), to the configured endpoint, never to a client's
	// address.
	out, err := http.NewRequestWithContext(ctx, http.MethodPost, endpoint.Scheme+"://"+endpoint.Host+"/", strings.NewReader(sr.Body))
	if err != nil {
		return nil, attestErr(reasonMalformed, "sts_request cannot be rebuilt")
	}
	for _, name := range auth.signedHeaders {
		switch name {
		case "host", "content-length":
			continue
		}
		if vs := h.Values(name); len(vs) > 0 {
			out.Header[textproto.CanonicalMIMEHeaderKey(name)] = vs
		}
	}
	for _, name := range []string{"Authorization", "X-Amz-Security-Token"} {
		if vs := h.Values(name); len(vs) > 0 {
			out.Header[name] = vs
		}
	}
	out.Host = u.Host
	if out.Header.Get("Content-Type") == "" {
		out.Header.Set("Content-Type", "application/x-www-form-urlencoded; charset=utf-8")
	}
	// Anyone who reaches the issuer can have it forward a well-formed
	// request: bound how many wait on STS at once, before sending.
	if n := v.inFlight.Add(1); n > v.maxInFlight {
		v.inFlight.Add(-1)
		return nil, attestErr(reasonSTSBusy, "%d requests to STS are under way already; retry shortly", v.maxInFlight)
	}
	defer v.inFlight.Add(-1)
	ctx, cancel := context.WithTimeout(ctx, v.timeout)
	defer cancel()
	resp, err := v.client.Do(out.WithContext(ctx))
	if err != nil {
		v.count("error")
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err
		}
		return nil, attestErr(reasonSTSUnavailable, "STS GetCallerIdentity: %v", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxSTSAnswer))
	if err != nil {
		v.count("error")
		return nil, attestErr(reasonSTSUnavailable, "STS GetCallerIdentity: reading the answer: %v", err)
	}
	if resp.StatusCode != http.StatusOK {
		code := stsErrorCode(body)
		if resp.StatusCode >= 500 || resp.StatusCode == http.StatusTooManyRequests || code == "Throttling" {
			v.count("error")
			return nil, attestErr(reasonSTSUnavailable, "STS GetCallerIdentity answered HTTP %d %s", resp.StatusCode, code)
		}
		v.count("denied")
		return nil, attestErr(reasonSTSDenied, "STS refused the signed GetCallerIdentity: HTTP %d %s", resp.StatusCode, code)
	}
	var gci struct {
		Result struct {
			Arn     string `xml:"Arn"`
			Account string `xml:"Account"`
		} `xml:"GetCallerIdentityResult"`
	}
	if err := xml.Unmarshal(body, &gci); err != nil || gci.Result.Arn == "" {
		v.count("error")
		return nil, attestErr(reasonSTSUnavailable, "STS GetCallerIdentity answered something that is not a GetCallerIdentityResponse")
	}
	v.count("ok")
	m := assumedRoleRe.FindStringSubmatch(gci.Result.Arn)
	if m == nil || m[2] != gci.Result.Account {
		return nil, attestErr(reasonNotInstance, "the caller %s is not an assumed-role session", gci.Result.Arn)
	}
	partition, account, role, session := m[1], m[2], m[3], m[4]
	if !instanceIDRe.MatchString(session) {
		return nil, attestErr(reasonNotInstance, "the caller %s is not an EC2 instance profile session (the session name is not an instance id)", gci.Result.Arn)
	}
	id := &Identity{Method: MethodIAM, AccountID: account, InstanceID: session,
		RoleARN: "arn:" + partition + ":iam::" + account + ":role/" + role, lookup: v.lookup}
	if regionRe.MatchString(req.Region) {
		id.Region = req.Region // claimed; proven only by an EC2 lookup
	}
	if v.verify {
		if id.Region == "" {
			return nil, attestErr(reasonMalformed, `"region" (the instance's region) is required: this issuer verifies instances with EC2`)
		}
		inst, err := id.Instance(ctx)
		if err != nil {
			return nil, err
		}
		if err := inst.check(id.InstanceID); err != nil {
			return nil, err
		}
		id.RegionVerified = true
	}
	return id, nil
}

var assumedRoleRe = regexp.MustCompile(`^arn:(aws[a-z-]*):sts::(\d{12}):assumed-role/([\w+=,.@-]{1,64})/([\w+=,.@-]{2,64})$`)

// stsErrorCode is the Code of an STS XML error answer, sanitized ("" when
// there is none).
func stsErrorCode(body []byte) string {
	var e struct {
		Error struct {
			Code string `xml:"Code"`
		} `xml:"Error"`
	}
	if xml.Unmarshal(body, &e) != nil {
		return ""
	}
	c := e.Error.Code
	if len(c) > 64 || strings.IndexFunc(c, func(r rune) bool {
		return !(r == '.' || r == '_' || r >= 'A' && r <= 'Z' || r >= 'a' && r <= 'z' || r >= '0' && r <= '9')
	}) >= 0 {
		return ""
	}
	return c
}
