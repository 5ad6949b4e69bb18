package sts

import (
	"encoding/xml"
	"fmt"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/imdsproxy/imdsproxy/test/fakes/sigv4"
)

// baseCredential is a set of credentials allowed to sign AssumeRole.
type baseCredential struct {
	accessKeyID  string
	secret       string
	sessionToken string    // "" for long-term keys
	expires      time.Time // zero: never
	// issued is true for credentials the fake issued itself (role chaining).
	issued bool
}

// AllowBase lets the long-term key accessKeyID (with its secret) sign
// AssumeRole requests; a request signed with it must not carry
// X-Amz-Security-Token.
func (s *Server) AllowBase(accessKeyID, secret string) {
	s.AllowBaseSession(accessKeyID, secret, "")
}

// AllowBaseSession lets temporary credentials sign AssumeRole requests: the
// request must carry X-Amz-Security-Token equal to sessionToken (when it is
// not empty). Temporary base credentials make the call role chaining, which
// STS limits to one hour: a DurationSeconds above 3600 is a ValidationError.
// Credentials the fake issued itself are accepted too, until they expire.
func (s *Server) AllowBaseSession(accessKeyID, secret, sessionToken string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.bases[accessKeyID] = baseCredential{accessKeyID: accessKeyID, secret: secret, sessionToken: sessionToken}
}

// RequireExternalID makes every later AssumeRole require ExternalId id ("":
// none required), as a trust policy with an sts:ExternalId condition does.
func (s *Server) RequireExternalID(id string) {
	s.mu.Lock()
	s.externalID = id
	s.mu.Unlock()
}

// lookupBase finds the credentials for an access key id: allowed ones
// first, then the ones the fake issued.
func (s *Server) lookupBase(id string) (baseCredential, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if b, ok := s.bases[id]; ok {
		return b, true
	}
	if is, ok := s.issued.Find(id); ok {
		return baseCredential{accessKeyID: id, secret: is.SecretAccessKey, sessionToken: is.SessionToken,
			expires: is.Expiration, issued: true}, true
	}
	return baseCredential{}, false
}

// amzDateFormat is the layout of X-Amz-Date.
const amzDateFormat = "20060102T150405Z"

// authenticate verifies the SigV4 signature of an AssumeRole request.
func (s *Server) authenticate(r *http.Request, body []byte) (*baseCredential, *stsError) {
	h := r.Header.Get("Authorization")
	if h == "" {
		return nil, sender(http.StatusForbidden, "MissingAuthenticationToken", "Request is missing Authentication Token")
	}
	a, err := sigv4.Parse(h)
	if err != nil {
		return nil, sender(http.StatusBadRequest, "IncompleteSignature", err.Error())
	}
	amzDate := r.Header.Get("X-Amz-Date")
	t, err := time.Parse(amzDateFormat, amzDate)
	if err != nil {
		return nil, sender(http.StatusBadRequest, "IncompleteSignature",
			"Authorization header requires existence of either a 'X-Amz-Date' or a 'Date' header.")
	}
	if a.Date != amzDate[:8] {
		return nil, sender(http.StatusForbidden, "SignatureDoesNotMatch",
			"Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date from HTTP: '"+a.Date+"' != '"+amzDate[:8]+"'")
	}
	if a.Service != "sts" {
		return nil, sender(http.StatusForbidden, "SignatureDoesNotMatch",
			"Credential should be scoped to correct service: 'sts'.")
	}
	if skew := s.cfg.Now().Sub(t); skew > 15*time.Minute || skew < -15*time.Minute {
		return nil, sender(http.StatusForbidden, "SignatureDoesNotMatch",
			"Signature expired: "+amzDate+" is now earlier or later than the allowed 15 minute window.")
	}
	if !a.Signs("host") {
		return nil, sender(http.StatusForbidden, "SignatureDoesNotMatch",
			"'Host' or ':authority' must be a 'SignedHeader' in the AWS Authorization.")
	}
	base, ok := s.lookupBase(a.AccessKeyID)
	if !ok {
		return nil, sender(http.StatusForbidden, "InvalidClientTokenId", "The security token included in the request is invalid.")
	}
	if got := r.Header.Get("X-Amz-Security-Token"); got != base.sessionToken && base.sessionToken != "" || base.sessionToken == "" && got != "" {
		return nil, sender(http.StatusForbidden, "InvalidClientTokenId", "The security token included in the request is invalid.")
	}
	if base.issued && !base.expires.IsZero() && !s.cfg.Now().Before(base.expires) {
		return nil, sender(http.StatusForbidden, "ExpiredToken", "The security token included in the request is expired")
	}
	payloadHash := sigv4.PayloadHash(body)
	if h := r.Header.Get("X-Amz-Content-Sha256"); h != "" && h != "UNSIGNED-PAYLOAD" && h != payloadHash {
		return nil, sender(http.StatusForbidden, "SignatureDoesNotMatch",
			"The provided 'x-amz-content-sha256' header does not match what was computed.")
	}
	if !a.Matches(r, base.secret, payloadHash) {
		return nil, sender(http.StatusForbidden, "SignatureDoesNotMatch",
			"The request signature we calculated does not match the signature you provided. Check your AWS Secret Access Key and signing method. Consult the service documentation for details.")
	}
	return &base, nil
}

var (
	externalIDRe = regexp.MustCompile(`^[\w+=,.@:/-]+$`)
	tagRe        = regexp.MustCompile(`^[\p{L}\p{Z}\p{N}_.:/=+\-@]*$`)
)

// parseTags reads Tags.member.N.Key/Value (N from 1, contiguous).
func parseTags(form map[string][]string) (map[string]string, *stsError) {
	get := func(k string) (string, bool) {
		v, ok := form[k]
		if !ok || len(v) == 0 {
			return "", false
		}
		return v[0], true
	}
	var tags map[string]string
	for n := 1; ; n++ {
		k, okK := get("Tags.member." + strconv.Itoa(n) + ".Key")
		v, okV := get("Tags.member." + strconv.Itoa(n) + ".Value")
		if !okK && !okV {
			break
		}
		if !okK || !okV {
			return tags, sender(400, "ValidationError", fmt.Sprintf("1 validation error detected: Value null at 'tags.%d.member.%s' failed to satisfy constraint: Member must not be null",
				n, map[bool]string{true: "value", false: "key"}[okK]))
		}
		if tags == nil {
			tags = map[string]string{}
		}
		for existing := range tags {
			if strings.EqualFold(existing, k) {
				return tags, sender(400, "InvalidParameterValue", "Duplicate tag keys found. Please note that Tag keys are case insensitive.")
			}
		}
		tags[k] = v
	}
	return tags, nil
}

// assumeRole validates an authenticated AssumeRole and issues credentials.
func (s *Server) assumeRole(form map[string][]string, sessionLength, maxSession time.Duration, base *baseCredential) (*result, *stsError) {
	get := func(k string) string {
		if v := form[k]; len(v) > 0 {
			return v[0]
		}
		return ""
	}
	if v := get("Version"); v != "2011-06-15" {
		return nil, sender(400, "InvalidAction", fmt.Sprintf("Could not find operation AssumeRole for version %s", v))
	}
	roleARN, sessionName := get("RoleArn"), get("RoleSessionName")
	switch {
	case roleARN == "":
		return nil, sender(400, "ValidationError", "1 validation error detected: Value null at 'roleArn' failed to satisfy constraint: Member must not be null")
	case sessionName == "":
		return nil, sender(400, "ValidationError", "1 validation error detected: Value null at 'roleSessionName' failed to satisfy constraint: Member must not be null")
	}
	m := roleARNRe.FindStringSubmatch(roleARN)
	if m == nil || len(roleARN) > 2048 {
		return nil, sender(400, "ValidationError", fmt.Sprintf("%s is invalid", roleARN))
	}
	account, roleName := m[1], m[3]
	if !sessionNameRe.MatchString(sessionName) {
		return nil, sender(400, "ValidationError", "1 validation error detected: Value at 'roleSessionName' failed to satisfy constraint: Member must satisfy regular expression pattern: [\\w+=,.@-]*")
	}
	externalID, sourceIdentity := get("ExternalId"), get("SourceIdentity")
	if _, ok := form["ExternalId"]; ok && (len(externalID) < 2 || len(externalID) > 1224 || !externalIDRe.MatchString(externalID)) {
		return nil, sender(400, "ValidationError", "1 validation error detected: Value at 'externalId' failed to satisfy constraint: Member must satisfy regular expression pattern: [\\w+=,.@:\\/-]* and have length between 2 and 1224")
	}
	if _, ok := form["SourceIdentity"]; ok && !sessionNameRe.MatchString(sourceIdentity) {
		return nil, sender(400, "ValidationError", "1 validation error detected: Value at 'sourceIdentity' failed to satisfy constraint: Member must satisfy regular expression pattern: [\\w+=,.@-]* and have length between 2 and 64")
	}
	tags, serr := parseTags(form)
	if serr != nil {
		return nil, serr
	}
	if len(tags) > 50 {
		return nil, sender(400, "ValidationError", fmt.Sprintf("1 validation error detected: Value at 'tags' failed to satisfy constraint: Member must have length less than or equal to 50 (got %d)", len(tags)))
	}
	for k, v := range tags {
		switch {
		case k == "" || utf8.RuneCountInString(k) > 128 || !tagRe.MatchString(k):
			return nil, sender(400, "ValidationError", "1 validation error detected: Value at 'tags.member.key' failed to satisfy constraint: Member must have length between 1 and 128 and match [\\p{L}\\p{Z}\\p{N}_.:/=+\\-@]+")
		case utf8.RuneCountInString(v) > 256 || !tagRe.MatchString(v):
			return nil, sender(400, "ValidationError", "1 validation error detected: Value at 'tags.member.value' failed to satisfy constraint: Member must have length less than or equal to 256 and match [\\p{L}\\p{Z}\\p{N}_.:/=+\\-@]*")
		case strings.HasPrefix(strings.ToLower(k), "aws:"):
			return nil, sender(400, "InvalidParameterValue", "Tag keys cannot start with the reserved prefix aws:")
		}
	}

	chained := base.sessionToken != ""
	length := time.Hour
	if ds := get("DurationSeconds"); ds != "" {
		n, err := strconv.Atoi(ds)
		if err != nil {
			return nil, sender(400, "ValidationError", fmt.Sprintf("Value '%s' at 'durationSeconds' is not an integer", ds))
		}
		if sessionLength == 0 {
			if n < 900 {
				return nil, sender(400, "ValidationError", fmt.Sprintf("1 validation error detected: Value '%d' at 'durationSeconds' failed to satisfy constraint: Member must have value greater than or equal to 900", n))
			}
			if n > 43200 {
				return nil, sender(400, "ValidationError", fmt.Sprintf("1 validation error detected: Value '%d' at 'durationSeconds' failed to satisfy constraint: Member must have value less than or equal to 43200", n))
			}
			if chained && n > 3600 {
				return nil, sender(400, "ValidationError", "The requested DurationSeconds exceeds the 1 hour session limit for roles assumed by role chaining.")
			}
			if time.Duration(n)*time.Second > maxSession {
				return nil, sender(400, "ValidationError", "The requested DurationSeconds exceeds the MaxSessionDuration set for this role.")
			}
		} else if n <= 0 {
			return nil, sender(400, "ValidationError", "DurationSeconds must be positive")
		}
		length = time.Duration(n) * time.Second
	}
	if sessionLength > 0 {
		length = sessionLength
	}

	denied := sender(403, "AccessDenied", fmt.Sprintf("User: %s is not authorized to perform: sts:AssumeRole on resource: %s", base.accessKeyID, roleARN))
	if !s.roleAllowed(roleARN) {
		return nil, denied
	}
	s.mu.Lock()
	wantExternal := s.externalID
	s.mu.Unlock()
	if wantExternal != "" && externalID != wantExternal {
		return nil, denied
	}

	now := s.cfg.Now().UTC()
	is := Issued{
		AccessKeyID:     "ASIA" + randString(16, upperAlnum),
		SecretAccessKey: randString(40, secretChars),
		SessionToken:    newSessionToken(),
		Expiration:      now.Add(length).Truncate(time.Second),
		IssuedAt:        now,
		RoleARN:         roleARN,
		RoleSessionName: sessionName,
		AssumedRoleARN:  fmt.Sprintf("arn:aws:sts::%s:assumed-role/%s/%s", account, roleName, sessionName),
		AssumedRoleID:   "AROA" + randString(17, upperAlnum) + ":" + sessionName,
		DurationSeconds: int(length / time.Second),
		Action:          ActionAssumeRole,
		BaseAccessKeyID: base.accessKeyID,
		ExternalID:      externalID,
		SourceIdentity:  sourceIdentity,
		Tags:            tags,
	}
	s.issued.Add(is)
	return &result{issued: is}, nil
}

type assumeRoleSuccessXML struct {
	XMLName xml.Name `xml:"AssumeRoleResponse"`
	Xmlns   string   `xml:"xmlns,attr"`
	Result  struct {
		SourceIdentity  string `xml:"SourceIdentity,omitempty"`
		AssumedRoleUser struct {
			Arn           string `xml:"Arn"`
			AssumedRoleID string `xml:"AssumedRoleId"`
		} `xml:"AssumedRoleUser"`
		Credentials      credentialsXML `xml:"Credentials"`
		PackedPolicySize *int           `xml:"PackedPolicySize,omitempty"`
	} `xml:"AssumeRoleResult"`
	ResponseMetadata struct {
		RequestID string `xml:"RequestId"`
	} `xml:"ResponseMetadata"`
}

func writeAssumeRoleSuccess(w http.ResponseWriter, reqID string, res *result) {
	var doc assumeRoleSuccessXML
	doc.Xmlns = xmlns
	c := &doc.Result.Credentials
	c.AccessKeyID = res.issued.AccessKeyID
	c.SecretAccessKey = res.issued.SecretAccessKey
	c.SessionToken = res.issued.SessionToken
	c.Expiration = res.issued.Expiration.UTC().Format("2006-01-02T15:04:05Z")
	doc.Result.SourceIdentity = res.issued.SourceIdentity
	doc.Result.AssumedRoleUser.Arn = res.issued.AssumedRoleARN
	doc.Result.AssumedRoleUser.AssumedRoleID = res.issued.AssumedRoleID
	if len(res.issued.Tags) > 0 {
		// STS reports how much of the packed-policy limit session tags
		// use, as a percentage.
		size := 0
		for k, v := range res.issued.Tags {
			size += len(k) + len(v)
		}
		pct := min(100, 1+size*100/2048)
		doc.Result.PackedPolicySize = &pct
	}
	doc.ResponseMetadata.RequestID = reqID
	writeXML(w, http.StatusOK, doc)
}
