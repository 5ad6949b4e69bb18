package sts

import (
	"encoding/xml"
	"net/http"
	"strings"
	"time"

	"github.com/imdsproxy/imdsproxy/test/fakes/sigv4"
)

// ActionGetCallerIdentity is sts:GetCallerIdentity. The fake answers it only
// for credentials it issued itself: the request must be SigV4-signed with an
// issued access key id and its secret, and carry X-Amz-Security-Token equal
// to the issued session token; the answer names the assumed-role ARN of that
// issue. A key the fake did not issue (an AllowBase key included) is 403
// InvalidClientTokenId, an expired one 403 ExpiredToken. Of the modes only
// ModeFail5xx, ModeUnavailable, ModeThrottle and ModeHang apply (the others
// concern the token or the trust policy, which GetCallerIdentity does not
// look at); the delay applies too.
const ActionGetCallerIdentity = "GetCallerIdentity"

// CallCount returns how many requests of action arrived, failed ones
// included.
func (s *Server) CallCount(action string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, c := range s.calls {
		if c.Action == action {
			n++
		}
	}
	return n
}

func (s *Server) serveGetCallerIdentity(w http.ResponseWriter, r *http.Request, body []byte, reqID string) {
	call := Call{At: s.cfg.Now(), Action: ActionGetCallerIdentity}
	if a, err := sigv4.Parse(r.Header.Get("Authorization")); err == nil {
		call.AccessKeyID = a.AccessKeyID
	}
	s.mu.Lock()
	mode, delay := s.mode, s.delay
	s.inflight++
	callIdx := len(s.calls)
	s.calls = append(s.calls, call)
	s.mu.Unlock()
	defer func() { s.mu.Lock(); s.inflight--; s.mu.Unlock() }()

	record := func(status int, code string, valid bool) {
		s.mu.Lock()
		if callIdx < len(s.calls) { // Reset may have run meanwhile
			c := &s.calls[callIdx]
			c.Status, c.Code, c.SignatureValid = status, code, valid
		}
		s.mu.Unlock()
	}
	fail := func(e *stsError, valid bool) {
		record(e.status, e.code, valid)
		writeError(w, reqID, e)
	}

	if delay > 0 {
		t := time.NewTimer(delay)
		select {
		case <-t.C:
		case <-r.Context().Done():
			t.Stop()
			record(0, "ClientGone", false)
			return
		case <-s.closed:
			t.Stop()
		}
	}
	if v := r.Form.Get("Version"); v != "2011-06-15" {
		fail(sender(400, "InvalidAction", "Could not find operation GetCallerIdentity for version "+v), false)
		return
	}
	base, serr := s.authenticate(r, body)
	if serr == nil && !base.issued {
		serr = sender(http.StatusForbidden, "InvalidClientTokenId", "The security token included in the request is invalid.")
	}
	if serr != nil {
		fail(serr, false)
		return
	}
	switch mode {
	case ModeFail5xx:
		fail(&stsError{status: 500, typ: "Receiver", code: "InternalFailure", message: "An internal error occurred."}, true)
		return
	case ModeUnavailable:
		fail(&stsError{status: 503, typ: "Receiver", code: "ServiceUnavailable", message: "Service is unavailable."}, true)
		return
	case ModeThrottle:
		fail(sender(400, "Throttling", "Rate exceeded"), true)
		return
	case ModeHang:
		select {
		case <-r.Context().Done():
		case <-s.closed:
		}
		record(0, "Hang", true)
		return
	}
	is, ok := s.Find(base.accessKeyID)
	if !ok { // Reset ran meanwhile
		fail(sender(http.StatusForbidden, "InvalidClientTokenId", "The security token included in the request is invalid."), true)
		return
	}
	var doc callerIdentityXML
	doc.Xmlns = xmlns
	doc.Result.Arn = is.AssumedRoleARN
	doc.Result.UserID = is.AssumedRoleID
	doc.Result.Account = accountOf(is.AssumedRoleARN)
	doc.ResponseMetadata.RequestID = reqID
	record(http.StatusOK, "", true)
	writeXML(w, http.StatusOK, doc)
}

type callerIdentityXML struct {
	XMLName xml.Name `xml:"GetCallerIdentityResponse"`
	Xmlns   string   `xml:"xmlns,attr"`
	Result  struct {
		Arn     string `xml:"Arn"`
		UserID  string `xml:"UserId"`
		Account string `xml:"Account"`
	} `xml:"GetCallerIdentityResult"`
	ResponseMetadata struct {
		RequestID string `xml:"RequestId"`
	} `xml:"ResponseMetadata"`
}

// accountOf is the account field of an ARN ("" when there is none).
func accountOf(arn string) string {
	if parts := strings.SplitN(arn, ":", 6); len(parts) == 6 {
		return parts[4]
	}
	return ""
}
