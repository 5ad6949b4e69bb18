// Package sts is a fake AWS STS that implements AssumeRoleWithWebIdentity and
// AssumeRole the way the real service does on the wire (AWS Query protocol
// in, XML out), for end-to-end tests of imdsproxy.
//
// The fake verifies the web identity token for real: RS256 or ES256
// signature against the JWKS of a configured issuer (fetched through its
// discovery document, as STS does with an OIDC provider), kid, alg, iss,
// aud, exp and nbf; per-role trust policies (SetTrust) condition sub and
// aud; session tags in the https://aws.amazon.com/tags claim are checked
// against STS's limits and recorded on what was issued. AssumeRole requests
// must carry a valid AWS Signature Version 4 made with base credentials the
// test allowed (AllowBase, AllowBaseSession) or with credentials the fake
// issued itself (role chaining); the signature is recomputed with the secret
// key. It validates RoleArn, RoleSessionName, DurationSeconds, ExternalId,
// SourceIdentity and session tags, issues unique random credentials and
// records them, so a test can check that what a client got is exactly what
// STS issued. IssueSession issues credentials without a request, as EC2
// does for an instance profile; GetCallerIdentity answers for every
// credential the fake issued. Failure modes, latency and session length can be changed while
// it runs; they apply to both actions.
//
// All methods are safe for concurrent use.
package sts

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net/http"
	"net/http/httptest"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/imdsproxy/imdsproxy/test/fakes/ledger"
	"github.com/imdsproxy/imdsproxy/test/fakes/oidc"

	"github.com/imdsproxy/imdsproxy/test/fakes/sigv4"
)

// Mode selects how the fake answers AssumeRoleWithWebIdentity and
// AssumeRole.
type Mode int

// Modes. Every mode except ModeOK fails the call before the token is looked
// at (for AssumeRole: after the signature was verified). For AssumeRole,
// ModeAccessDenied names sts:AssumeRole and ModeExpiredToken answers
// ExpiredToken (expired base credentials); ModeIDPError and ModeInvalidToken
// are answered as for AssumeRoleWithWebIdentity.
const (
	// ModeOK verifies the request and issues credentials.
	ModeOK Mode = iota
	// ModeFail5xx answers 500 InternalFailure.
	ModeFail5xx
	// ModeUnavailable answers 503 ServiceUnavailable.
	ModeUnavailable
	// ModeThrottle answers 400 Throttling "Rate exceeded".
	ModeThrottle
	// ModeHang blocks until the request's context ends or the fake is closed.
	ModeHang
	// ModeIDPError answers 400 IDPCommunicationError.
	ModeIDPError
	// ModeInvalidToken answers 400 InvalidIdentityToken.
	ModeInvalidToken
	// ModeExpiredToken answers 400 ExpiredTokenException.
	ModeExpiredToken
	// ModeAccessDenied answers 403 AccessDenied.
	ModeAccessDenied
)

var modeNames = map[Mode]string{
	ModeOK: "ok", ModeFail5xx: "fail5xx", ModeUnavailable: "unavailable", ModeThrottle: "throttle",
	ModeHang: "hang", ModeIDPError: "idp-error", ModeInvalidToken: "invalid-token",
	ModeExpiredToken: "expired-token", ModeAccessDenied: "access-denied",
}

// String returns the mode's name as ParseMode accepts it.
func (m Mode) String() string {
	if s, ok := modeNames[m]; ok {
		return s
	}
	return "mode(" + strconv.Itoa(int(m)) + ")"
}

// ParseMode parses a mode name (see Mode.String).
func ParseMode(s string) (Mode, error) {
	for m, n := range modeNames {
		if n == s {
			return m, nil
		}
	}
	return 0, fmt.Errorf("sts: unknown mode %q", s)
}

// Config configures the fake. Either Issuer or IssuerURL must be set.
type Config struct {
	// Issuer is an in-process issuer whose keys and URL are trusted.
	Issuer *oidc.Issuer
	// IssuerURL is the trusted issuer (the iss claim). When Issuer is nil the
	// fake fetches IssuerURL/.well-known/openid-configuration and then the
	// jwks_uri on every call, as STS does with an OIDC provider; a fetch
	// failure is IDPCommunicationError. The discovery document's issuer
	// must be IssuerURL. RSA and EC P-256 keys are read from the JWKS.
	IssuerURL string
	// JWKSURL, when set with IssuerURL, skips discovery.
	JWKSURL string
	// Audience is the required aud value; empty means "sts.amazonaws.com".
	Audience string
	// RoleARN, when set, is the only role that may be assumed (others get
	// AccessDenied, as a role whose trust policy does not match), besides
	// those added with AllowRoles.
	RoleARN string
	// Subject, when set, is the only sub allowed (trust policy condition).
	Subject string
	// MaxSessionDuration is the role's maximum session; zero means 12h.
	MaxSessionDuration time.Duration
	// Now is the clock; nil means time.Now.
	Now func() time.Time
	// HTTPClient fetches discovery and JWKS documents; nil means a client
	// with a 5s timeout.
	HTTPClient *http.Client
	// ExternalID, when set, is the ExternalId every AssumeRole must carry
	// (trust policy condition sts:ExternalId); a missing or different one
	// gets AccessDenied. See also RequireExternalID.
	ExternalID string
}

// Actions the fake implements.
const (
	ActionAssumeRoleWithWebIdentity = "AssumeRoleWithWebIdentity"
	ActionAssumeRole                = "AssumeRole"
)

// Issued is one set of credentials the fake handed out.
type Issued struct {
	AccessKeyID     string
	SecretAccessKey string
	SessionToken    string
	Expiration      time.Time // whole seconds, UTC, as on the wire
	IssuedAt        time.Time
	RoleARN         string
	RoleSessionName string
	AssumedRoleARN  string
	AssumedRoleID   string
	Subject         string
	// WebIdentityToken is the JWT that was presented (a secret too).
	WebIdentityToken string
	DurationSeconds  int

	// Action is ActionAssumeRoleWithWebIdentity or ActionAssumeRole.
	Action string
	// BaseAccessKeyID is the access key id that signed an AssumeRole.
	BaseAccessKeyID string
	// ExternalID, SourceIdentity and Tags are what an AssumeRole carried;
	// for AssumeRoleWithWebIdentity Tags are the session tags of the
	// token's https://aws.amazon.com/tags claim (principal_tags), and
	// TransitiveTagKeys its transitive_tag_keys, sorted.
	ExternalID        string
	SourceIdentity    string
	Tags              map[string]string
	TransitiveTagKeys []string
	// Audience is the token's aud that the call was accepted for.
	Audience string
	// TokenKID and TokenAlg are the kid and alg of the accepted token's
	// header: which key of the issuer's JWKS verified it.
	TokenKID, TokenAlg string
}

// KeyID is the access key id (ledger.Credential).
func (i Issued) KeyID() string { return i.AccessKeyID }

// Call is one request, successful or not.
type Call struct {
	At              time.Time
	RoleARN         string
	RoleSessionName string
	DurationSeconds int
	Status          int
	Code            string // STS error code, "" on success

	// Action is the Action parameter (ActionAssumeRoleWithWebIdentity or
	// ActionAssumeRole).
	Action string
	// AccessKeyID is the access key id named in the SigV4 Authorization
	// header ("" when none could be parsed); SignatureValid reports whether
	// the fake verified the signature with that key's secret (and the
	// session token) and accepted it.
	AccessKeyID    string
	SignatureValid bool
	// ExternalID, SourceIdentity and Tags (Tags.member.N.Key/Value) are the
	// AssumeRole parameters as received, recorded before validation.
	ExternalID     string
	SourceIdentity string
	Tags           map[string]string
}

// Server is the fake STS.
type Server struct {
	cfg Config

	mu            sync.Mutex
	mode          Mode
	delay         time.Duration
	sessionLength time.Duration
	maxSession    time.Duration // the role's MaxSessionDuration (cfg's, SetMaxSessionDuration)
	calls         []Call
	issued        ledger.Ledger[Issued]
	webTokens     []string // WebIdentityToken of every AssumeRoleWithWebIdentity call
	inflight      int
	bases         map[string]baseCredential
	moreRoles     map[string]bool  // AllowRoles
	trust         map[string]Trust // SetTrust
	externalID    string

	closeOnce sync.Once
	closed    chan struct{}

	// URL is set by Start.
	URL string
}

// New returns a fake STS in ModeOK.
func New(cfg Config) *Server {
	if cfg.Audience == "" {
		cfg.Audience = oidc.DefaultAudience
	}
	if cfg.MaxSessionDuration == 0 {
		cfg.MaxSessionDuration = 12 * time.Hour
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.HTTPClient == nil {
		cfg.HTTPClient = &http.Client{Timeout: 5 * time.Second}
	}
	return &Server{cfg: cfg, closed: make(chan struct{}), externalID: cfg.ExternalID,
		bases: map[string]baseCredential{}, maxSession: cfg.MaxSessionDuration}
}

// Start returns a fake STS served by an httptest server, URL set. The fake is
// closed (hanging requests released) when the test ends.
func Start(tb testing.TB, cfg Config) *Server {
	tb.Helper()
	s := New(cfg)
	srv := httptest.NewServer(s.Handler())
	s.URL = srv.URL
	tb.Cleanup(func() {
		s.Close()
		srv.Close()
	})
	return s
}

// Close releases requests blocked in ModeHang or in a delay. It is idempotent.
func (s *Server) Close() { s.closeOnce.Do(func() { close(s.closed) }) }

// AllowRoles lets the roles arns be assumed too when Config.RoleARN
// restricts the assumable roles (several roles trusting the same identity).
func (s *Server) AllowRoles(arns ...string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.moreRoles == nil {
		s.moreRoles = map[string]bool{}
	}
	for _, a := range arns {
		s.moreRoles[a] = true
	}
}

// roleAllowed reports whether roleARN may be assumed: any role without
// Config.RoleARN, else that one and those of AllowRoles.
func (s *Server) roleAllowed(roleARN string) bool {
	if s.cfg.RoleARN == "" || roleARN == s.cfg.RoleARN {
		return true
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.moreRoles[roleARN]
}

// SetMode changes how later requests are answered.
func (s *Server) SetMode(m Mode) { s.mu.Lock(); s.mode = m; s.mu.Unlock() }

// Mode returns the current mode.
func (s *Server) Mode() Mode { s.mu.Lock(); defer s.mu.Unlock(); return s.mode }

// SetDelay makes every later request wait d before it is answered.
func (s *Server) SetDelay(d time.Duration) { s.mu.Lock(); s.delay = d; s.mu.Unlock() }

// SetSessionLength makes the fake issue sessions of length d whatever
// DurationSeconds asks (and accept any positive DurationSeconds); zero
// restores the normal behaviour.
func (s *Server) SetSessionLength(d time.Duration) { s.mu.Lock(); s.sessionLength = d; s.mu.Unlock() }

// SetMaxSessionDuration changes the role's MaxSessionDuration: a
// DurationSeconds above it is a ValidationError from now on.
func (s *Server) SetMaxSessionDuration(d time.Duration) { s.mu.Lock(); s.maxSession = d; s.mu.Unlock() }

// Calls returns how many requests (of any action) arrived, failed ones
// included; CallCount counts one action.
func (s *Server) Calls() int { s.mu.Lock(); defer s.mu.Unlock(); return len(s.calls) }

// CallLog returns every request (of any action) so far.
func (s *Server) CallLog() []Call {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]Call(nil), s.calls...)
}

// InFlight returns how many requests are being processed right now.
func (s *Server) InFlight() int { s.mu.Lock(); defer s.mu.Unlock(); return s.inflight }

// Issued returns every credential issued so far, oldest first.
func (s *Server) Issued() []Issued { return s.issued.All() }

// WebIdentityTokens returns the WebIdentityToken parameter of every
// AssumeRoleWithWebIdentity request so far, in arrival order, whatever the
// outcome (rejected, failed by the mode, hung): what the client sent, torn
// or not. They are secrets: never print them.
func (s *Server) WebIdentityTokens() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.webTokens...)
}

// Last returns the most recently issued credential, and false if none was.
func (s *Server) Last() (Issued, bool) { return s.issued.Last() }

// Find returns the issued credential with the access key id, if any.
func (s *Server) Find(accessKeyID string) (Issued, bool) { return s.issued.Find(accessKeyID) }

// Reset returns to ModeOK with no delay and normal sessions and forgets all
// calls and issued credentials. Allowed base credentials and the required
// external id stay.
func (s *Server) Reset() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.mode, s.delay, s.sessionLength = ModeOK, 0, 0
	s.calls, s.webTokens = nil, nil
	s.issued.Reset()
}

// Handler returns the STS HTTP handler (POST / or GET / with the Query
// protocol parameters).
func (s *Server) Handler() http.Handler { return http.HandlerFunc(s.serve) }

// stsError is an error answer.
type stsError struct {
	status  int
	typ     string // Sender | Receiver
	code    string
	message string
}

func sender(status int, code, msg string) *stsError {
	return &stsError{status: status, typ: "Sender", code: code, message: msg}
}

const xmlns = "https://sts.amazonaws.com/doc/2011-06-15/"

func (s *Server) serve(w http.ResponseWriter, r *http.Request) {
	reqID := newRequestID()
	w.Header().Set("x-amzn-RequestId", reqID)
	if r.URL.Path != "/" || (r.Method != http.MethodPost && r.Method != http.MethodGet) {
		writeError(w, reqID, sender(http.StatusNotFound, "UnknownOperationException", "Unknown operation"))
		return
	}
	// The body is kept: AssumeRole's signature covers its hash.
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, 1<<20))
	if err != nil {
		writeError(w, reqID, sender(http.StatusBadRequest, "MalformedQueryString", "could not parse the request"))
		return
	}
	r.Body = io.NopCloser(bytes.NewReader(body))
	if err := r.ParseForm(); err != nil {
		writeError(w, reqID, sender(http.StatusBadRequest, "MalformedQueryString", "could not parse the request"))
		return
	}
	action := r.Form.Get("Action")
	if action == ActionGetCallerIdentity { // callerid.go
		s.serveGetCallerIdentity(w, r, body, reqID)
		return
	}
	if action != ActionAssumeRoleWithWebIdentity && action != ActionAssumeRole {
		writeError(w, reqID, sender(http.StatusBadRequest, "InvalidAction",
			fmt.Sprintf("Could not find operation %s for version %s", action, r.Form.Get("Version"))))
		return
	}

	s.mu.Lock()
	mode, delay, sessionLength, maxSession := s.mode, s.delay, s.sessionLength, s.maxSession
	s.inflight++
	callIdx := len(s.calls)
	dur, _ := strconv.Atoi(r.Form.Get("DurationSeconds"))
	call := Call{At: s.cfg.Now(), RoleARN: r.Form.Get("RoleArn"),
		RoleSessionName: r.Form.Get("RoleSessionName"), DurationSeconds: dur, Action: action}
	if action == ActionAssumeRole {
		call.ExternalID, call.SourceIdentity = r.Form.Get("ExternalId"), r.Form.Get("SourceIdentity")
		call.Tags, _ = parseTags(r.Form)
		if a, err := sigv4.Parse(r.Header.Get("Authorization")); err == nil {
			call.AccessKeyID = a.AccessKeyID
		}
	}
	s.calls = append(s.calls, call)
	if action == ActionAssumeRoleWithWebIdentity {
		s.webTokens = append(s.webTokens, r.Form.Get("WebIdentityToken"))
	}
	s.mu.Unlock()
	defer func() { s.mu.Lock(); s.inflight--; s.mu.Unlock() }()

	record := func(status int, code string) {
		s.mu.Lock()
		if callIdx < len(s.calls) { // Reset may have run meanwhile
			s.calls[callIdx].Status, s.calls[callIdx].Code = status, code
		}
		s.mu.Unlock()
	}

	if delay > 0 {
		t := time.NewTimer(delay)
		select {
		case <-t.C:
		case <-r.Context().Done():
			t.Stop()
			record(0, "ClientGone")
			panic(http.ErrAbortHandler) // no answer: an empty 200 could still reach a client giving up at its deadline
		case <-s.closed:
			t.Stop()
		}
	}

	var res *result
	var serr *stsError
	var base *baseCredential
	if action == ActionAssumeRole {
		if base, serr = s.authenticate(r, body); serr != nil {
			record(serr.status, serr.code)
			writeError(w, reqID, serr)
			return
		}
		s.mu.Lock()
		if callIdx < len(s.calls) {
			s.calls[callIdx].SignatureValid = true
		}
		s.mu.Unlock()
	}
	switch mode {
	case ModeOK:
		if action == ActionAssumeRole {
			res, serr = s.assumeRole(r.Form, sessionLength, maxSession, base)
		} else {
			res, serr = s.assume(r.Context(), r.Form, sessionLength, maxSession)
		}
	case ModeFail5xx:
		serr = &stsError{status: 500, typ: "Receiver", code: "InternalFailure", message: "An internal error occurred."}
	case ModeUnavailable:
		serr = &stsError{status: 503, typ: "Receiver", code: "ServiceUnavailable", message: "Service is unavailable."}
	case ModeThrottle:
		serr = sender(400, "Throttling", "Rate exceeded")
	case ModeHang:
		select {
		case <-r.Context().Done():
		case <-s.closed:
		}
		record(0, "Hang")
		panic(http.ErrAbortHandler) // no answer: an empty 200 could still reach a client giving up at its deadline
	case ModeIDPError:
		serr = sender(400, "IDPCommunicationError", "Couldn't retrieve verification key from your identity provider,  please reference AssumeRoleWithWebIdentity documentation for requirements")
	case ModeInvalidToken:
		serr = sender(400, "InvalidIdentityToken", "Incorrect token audience")
	case ModeExpiredToken:
		if action == ActionAssumeRole {
			serr = sender(403, "ExpiredToken", "The security token included in the request is expired")
		} else {
			serr = sender(400, "ExpiredTokenException", "Token expired: current date/time must be before the expiration date/time")
		}
	case ModeAccessDenied:
		serr = sender(403, "AccessDenied", "Not authorized to perform sts:"+action)
	default:
		serr = &stsError{status: 500, typ: "Receiver", code: "InternalFailure", message: "unknown fake mode"}
	}
	if serr != nil {
		record(serr.status, serr.code)
		writeError(w, reqID, serr)
		return
	}
	record(http.StatusOK, "")
	if action == ActionAssumeRole {
		writeAssumeRoleSuccess(w, reqID, res)
		return
	}
	writeSuccess(w, reqID, res)
}

type result struct {
	issued   Issued
	provider string
	audience string
}

var (
	roleARNRe     = regexp.MustCompile(`^arn:aws[a-z-]*:iam::(\d{12}):role/((?:[\x21-\x7e]+/)*)([\w+=,.@-]{1,64})$`)
	sessionNameRe = regexp.MustCompile(`^[\w+=,.@-]{2,64}$`)
)

func (s *Server) assume(ctx context.Context, form map[string][]string, sessionLength, maxSession time.Duration) (*result, *stsError) {
	get := func(k string) string {
		if v := form[k]; len(v) > 0 {
			return v[0]
		}
		return ""
	}
	if v := get("Version"); v != "2011-06-15" {
		return nil, sender(400, "InvalidAction", fmt.Sprintf("Could not find operation AssumeRoleWithWebIdentity for version %s", v))
	}
	roleARN, sessionName, tok := get("RoleArn"), get("RoleSessionName"), get("WebIdentityToken")
	switch {
	case roleARN == "":
		return nil, sender(400, "ValidationError", "1 validation error detected: Value null at 'roleArn' failed to satisfy constraint: Member must not be null")
	case sessionName == "":
		return nil, sender(400, "ValidationError", "1 validation error detected: Value null at 'roleSessionName' failed to satisfy constraint: Member must not be null")
	case tok == "":
		return nil, sender(400, "ValidationError", "1 validation error detected: Value null at 'webIdentityToken' failed to satisfy constraint: Member must not be null")
	}
	m := roleARNRe.FindStringSubmatch(roleARN)
	if m == nil || len(roleARN) > 2048 {
		return nil, sender(400, "ValidationError", fmt.Sprintf("%s is invalid", roleARN))
	}
	account, roleName := m[1], m[3]
	if !sessionNameRe.MatchString(sessionName) {
		return nil, sender(400, "ValidationError", "1 validation error detected: Value at 'roleSessionName' failed to satisfy constraint: Member must satisfy regular expression pattern: [\\w+=,.@-]*")
	}
	if len(tok) < 4 || len(tok) > 20000 {
		return nil, sender(400, "ValidationError", "1 validation error detected: Value at 'webIdentityToken' failed to satisfy constraint: Member must have length between 4 and 20000")
	}

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

	claims, serr := s.verify(ctx, tok)
	if serr != nil {
		return nil, serr
	}
	if _, trusted := s.trustOf(roleARN); !trusted && !s.roleAllowed(roleARN) {
		return nil, sender(403, "AccessDenied", "Not authorized to perform sts:AssumeRoleWithWebIdentity")
	}
	if serr := s.checkTrust(roleARN, claims); serr != nil {
		return nil, serr
	}
	if s.cfg.Subject != "" && claims.sub != s.cfg.Subject {
		return nil, sender(403, "AccessDenied", "Not authorized to perform sts:AssumeRoleWithWebIdentity")
	}
	claims.aud = s.cfg.Audience
	if t, trusted := s.trustOf(roleARN); trusted && t.Audience != "" {
		claims.aud = t.Audience
	}
	if !slices.Contains(claims.audiences, claims.aud) {
		return nil, sender(400, "InvalidIdentityToken", "Incorrect token audience")
	}

	now := s.cfg.Now().UTC()
	is := Issued{
		AccessKeyID:       "ASIA" + randString(16, upperAlnum),
		SecretAccessKey:   randString(40, secretChars),
		SessionToken:      newSessionToken(),
		Expiration:        now.Add(length).Truncate(time.Second),
		IssuedAt:          now,
		RoleARN:           roleARN,
		RoleSessionName:   sessionName,
		AssumedRoleARN:    fmt.Sprintf("arn:aws:sts::%s:assumed-role/%s/%s", account, roleName, sessionName),
		AssumedRoleID:     "AROA" + randString(17, upperAlnum) + ":" + sessionName,
		Subject:           claims.sub,
		WebIdentityToken:  tok,
		DurationSeconds:   int(length / time.Second),
		Action:            ActionAssumeRoleWithWebIdentity,
		Tags:              claims.tags,
		TransitiveTagKeys: claims.transitive,
		Audience:          claims.aud,
		TokenKID:          claims.kid,
		TokenAlg:          claims.alg,
	}
	s.mu.Lock()
	s.issued.Add(is)
	s.mu.Unlock()
	return &result{issued: is, provider: claims.provider, audience: claims.aud}, nil
}

type verified struct {
	kid, alg   string // the token header's
	sub        string
	provider   string
	aud        string   // the accepted audience
	audiences  []string // every aud value
	tags       map[string]string
	transitive []string
}

func (s *Server) verify(ctx context.Context, tok string) (*verified, *stsError) {
	invalid := func(msg string) (*verified, *stsError) {
		return nil, sender(400, "InvalidIdentityToken", msg)
	}
	parts := strings.Split(tok, ".")
	if len(parts) != 3 {
		return invalid("The ID Token provided is not a valid JWT. (You may see this error if you sent an Access Token)")
	}
	hb, err1 := base64.RawURLEncoding.DecodeString(parts[0])
	pb, err2 := base64.RawURLEncoding.DecodeString(parts[1])
	sig, err3 := base64.RawURLEncoding.DecodeString(parts[2])
	if err1 != nil || err2 != nil || err3 != nil {
		return invalid("The ID Token provided is not a valid JWT. (You may see this error if you sent an Access Token)")
	}
	var header struct {
		Alg string `json:"alg"`
		Kid string `json:"kid"`
	}
	if err := json.Unmarshal(hb, &header); err != nil {
		return invalid("The ID Token provided is not a valid JWT. (You may see this error if you sent an Access Token)")
	}
	if header.Alg != "RS256" && header.Alg != "ES256" {
		return invalid("Unsupported token signing algorithm " + strconv.Quote(header.Alg))
	}
	dec := json.NewDecoder(strings.NewReader(string(pb)))
	dec.UseNumber()
	var claims map[string]any
	if err := dec.Decode(&claims); err != nil {
		return invalid("The ID Token provided is not a valid JWT. (You may see this error if you sent an Access Token)")
	}

	iss, _ := claims["iss"].(string)
	trusted := s.cfg.IssuerURL
	if s.cfg.Issuer != nil {
		trusted = s.cfg.Issuer.URL()
	}
	if iss == "" || iss != trusted {
		return invalid(fmt.Sprintf("No OpenIDConnect provider found in your account for %s", iss))
	}

	keys, err := s.keys(ctx)
	if err != nil {
		return nil, sender(400, "IDPCommunicationError", "Couldn't retrieve verification key from your identity provider,  please reference AssumeRoleWithWebIdentity documentation for requirements")
	}
	key, ok := keys[header.Kid]
	if !ok || header.Kid == "" {
		return invalid("Couldn't retrieve verification key from your identity provider,  please reference AssumeRoleWithWebIdentity documentation for requirements")
	}
	if !checkSignature(header.Alg, key, parts[0]+"."+parts[1], sig) {
		return invalid("The signature of the token could not be verified")
	}

	audiences := audList(claims["aud"])
	if len(audiences) == 0 {
		return invalid("Incorrect token audience")
	}
	now := s.cfg.Now()
	exp, ok := numClaim(claims["exp"])
	if !ok {
		return invalid("The ID Token provided has no valid exp claim")
	}
	if now.Unix() >= exp {
		return nil, sender(400, "ExpiredTokenException", fmt.Sprintf("Token expired: current date/time %d must be before the expiration date/time %d", now.Unix(), exp))
	}
	if nbf, ok := numClaim(claims["nbf"]); ok && nbf > now.Add(5*time.Minute).Unix() {
		return invalid("The ID Token is not yet valid")
	}
	if iat, ok := numClaim(claims["iat"]); ok && iat > now.Add(5*time.Minute).Unix() {
		return invalid("The ID Token was issued in the future")
	}
	sub, _ := claims["sub"].(string)
	if sub == "" {
		return invalid("The ID Token provided has no sub claim")
	}
	tags, transitive, serr := sessionTags(claims[TagsClaim])
	if serr != nil {
		return nil, serr
	}
	provider := strings.TrimPrefix(strings.TrimPrefix(iss, "https://"), "http://")
	v := &verified{kid: header.Kid, alg: header.Alg, sub: sub, provider: provider, audiences: audiences, tags: tags, transitive: transitive}
	return v, nil
}

// audList is the aud claim as a list (a string or an array of strings).
func audList(aud any) []string {
	switch v := aud.(type) {
	case string:
		return []string{v}
	case []any:
		var out []string
		for _, a := range v {
			if s, ok := a.(string); ok {
				out = append(out, s)
			}
		}
		return out
	}
	return nil
}

// numClaim accepts only integer NumericDate values, as STS does.
func numClaim(v any) (int64, bool) {
	n, ok := v.(json.Number)
	if !ok {
		return 0, false
	}
	i, err := n.Int64()
	return i, err == nil
}

func (s *Server) keys(ctx context.Context) (map[string]verificationKey, error) {
	if s.cfg.Issuer != nil {
		return inProcessKeys(s.cfg.Issuer), nil
	}
	if s.cfg.IssuerURL == "" {
		return nil, errors.New("no issuer configured")
	}
	jwksURL := s.cfg.JWKSURL
	if jwksURL == "" {
		body, err := s.fetch(ctx, strings.TrimSuffix(s.cfg.IssuerURL, "/")+"/.well-known/openid-configuration")
		if err != nil {
			return nil, err
		}
		var disc struct {
			Issuer  string `json:"issuer"`
			JWKSURI string `json:"jwks_uri"`
		}
		if err := json.Unmarshal(body, &disc); err != nil || disc.JWKSURI == "" {
			return nil, fmt.Errorf("bad discovery document")
		}
		if disc.Issuer != s.cfg.IssuerURL {
			return nil, fmt.Errorf("discovery document of issuer %q, not %q", disc.Issuer, s.cfg.IssuerURL)
		}
		jwksURL = disc.JWKSURI
	}
	body, err := s.fetch(ctx, jwksURL)
	if err != nil {
		return nil, err
	}
	return parseJWKS(body)
}

func (s *Server) fetch(ctx context.Context, u string) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, err
	}
	resp, err := s.cfg.HTTPClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s: %s", u, resp.Status)
	}
	return io.ReadAll(io.LimitReader(resp.Body, 1<<20))
}

// XML documents, shaped exactly like STS's.

type credentialsXML struct {
	AccessKeyID     string `xml:"AccessKeyId"`
	SecretAccessKey string `xml:"SecretAccessKey"`
	SessionToken    string `xml:"SessionToken"`
	Expiration      string `xml:"Expiration"`
}

type successXML struct {
	XMLName xml.Name `xml:"AssumeRoleWithWebIdentityResponse"`
	Xmlns   string   `xml:"xmlns,attr"`
	Result  struct {
		Credentials                 credentialsXML `xml:"Credentials"`
		SubjectFromWebIdentityToken string         `xml:"SubjectFromWebIdentityToken"`
		AssumedRoleUser             struct {
			Arn           string `xml:"Arn"`
			AssumedRoleID string `xml:"AssumedRoleId"`
		} `xml:"AssumedRoleUser"`
		Provider string `xml:"Provider"`
		Audience string `xml:"Audience"`
	} `xml:"AssumeRoleWithWebIdentityResult"`
	ResponseMetadata struct {
		RequestID string `xml:"RequestId"`
	} `xml:"ResponseMetadata"`
}

type errorXML struct {
	XMLName xml.Name `xml:"ErrorResponse"`
	Xmlns   string   `xml:"xmlns,attr"`
	Error   struct {
		Type    string `xml:"Type"`
		Code    string `xml:"Code"`
		Message string `xml:"Message"`
	} `xml:"Error"`
	RequestID string `xml:"RequestId"`
}

func writeSuccess(w http.ResponseWriter, reqID string, res *result) {
	var doc successXML
	doc.Xmlns = xmlns
	c := &doc.Result.Credentials
	c.AccessKeyID = res.issued.AccessKeyID
	c.SecretAccessKey = res.issued.SecretAccessKey
	c.SessionToken = res.issued.SessionToken
	c.Expiration = res.issued.Expiration.UTC().Format("2006-01-02T15:04:05Z")
	doc.Result.SubjectFromWebIdentityToken = res.issued.Subject
	doc.Result.AssumedRoleUser.Arn = res.issued.AssumedRoleARN
	doc.Result.AssumedRoleUser.AssumedRoleID = res.issued.AssumedRoleID
	doc.Result.Provider = res.provider
	doc.Result.Audience = res.audience
	doc.ResponseMetadata.RequestID = reqID
	writeXML(w, http.StatusOK, doc)
}

func writeError(w http.ResponseWriter, reqID string, e *stsError) {
	var doc errorXML
	doc.Xmlns = xmlns
	doc.Error.Type, doc.Error.Code, doc.Error.Message = e.typ, e.code, e.message
	doc.RequestID = reqID
	writeXML(w, e.status, doc)
}

func writeXML(w http.ResponseWriter, status int, doc any) {
	b, err := xml.MarshalIndent(doc, "", "  ")
	if err != nil {
		http.Error(w, "marshal", http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "text/xml")
	w.Header().Set("Content-Length", strconv.Itoa(len(b)+1))
	w.WriteHeader(status)
	_, _ = w.Write(append(b, '\n'))
}

const (
	upperAlnum  = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
	secretChars = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
)

func randString(n int, alphabet string) string {
	b := make([]byte, n)
	max := big.NewInt(int64(len(alphabet)))
	for i := range b {
		k, err := rand.Int(rand.Reader, max)
		if err != nil {
			panic(err)
		}
		b[i] = alphabet[k.Int64()]
	}
	return string(b)
}

// newSessionToken looks like a real STS session token: a fixed base64 prefix
// and several hundred random base64 characters.
func newSessionToken() string {
	b := make([]byte, 600)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	return "IQoJb3JpZ2luX2VjE" + base64.StdEncoding.EncodeToString(b)
}

func newRequestID() string {
	b := make([]byte, 16)
	_, _ = rand.Read(b)
	h := fmt.Sprintf("%x", b)
	return h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:32]
}
