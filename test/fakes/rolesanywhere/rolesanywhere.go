// Package rolesanywhere is a fake IAM Roles Anywhere that implements
// CreateSession the way the real service does on the wire (restJson1,
// SigV4-X509), for tests of imdsproxy. It imports nothing of the project.
//
// The fake verifies every request cryptographically from the request alone,
// with its own implementation of the signing process (shared/WIRE.md §5.3,
// §10): it parses the Authorization header, rebuilds the canonical request
// from SignedHeaders, checks X-Amz-Date against its clock (±5 minutes) and
// the credential scope, decodes X-Amz-X509 and X-Amz-X509-Chain, checks that
// the credential names the leaf's serial, verifies the chain to a configured
// CA at its clock and the signature with the leaf's public key. It then
// checks the ARNs in the query string and durationSeconds, and issues unique
// random credentials which it records, so a test can check that a client got
// exactly what was issued. Failure modes, latency and session length can be
// changed while it runs.
//
// The CA helper (NewCA, CA.Issue, Leaf.WriteFiles) issues RSA and ECDSA leaf
// certificates with an intermediate and writes PEM files for tests.
//
// All methods are safe for concurrent use.
package rolesanywhere

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/imdsproxy/imdsproxy/test/fakes/ledger"
	"io"
	"math/big"
	"net/http"
	"net/http/httptest"
	"net/url"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// Mode selects how the fake answers CreateSession.
type Mode int

// Modes. Every mode except ModeOK answers before the request is verified.
const (
	// ModeOK verifies the request and issues credentials.
	ModeOK Mode = iota
	// ModeAccessDenied answers 403 AccessDeniedException.
	ModeAccessDenied
	// ModeValidation answers 400 ValidationException.
	ModeValidation
	// ModeNotFound answers 404 ResourceNotFoundException.
	ModeNotFound
	// ModeThrottle answers 429 ThrottlingException.
	ModeThrottle
	// ModeFail5xx answers 500 InternalServerException.
	ModeFail5xx
	// ModeHang blocks until the request's context ends or the fake is closed.
	ModeHang
	// ModeEmptySet answers 201 with an empty credentialSet.
	ModeEmptySet
)

var modeNames = map[Mode]string{
	ModeOK: "ok", ModeAccessDenied: "access-denied", ModeValidation: "validation",
	ModeNotFound: "not-found", ModeThrottle: "throttle", ModeFail5xx: "fail5xx",
	ModeHang: "hang", ModeEmptySet: "empty-set",
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
	return 0, fmt.Errorf("rolesanywhere: unknown mode %q", s)
}

// Config configures the fake.
type Config struct {
	// Roots are the trust anchor's CA certificates. Required.
	Roots *x509.CertPool
	// TrustAnchorARN and ProfileARN must match the request's. Required. The
	// region of the trust anchor is the region the signature must be scoped to.
	TrustAnchorARN string
	ProfileARN     string
	// RoleARN, when set, is the only role the profile allows (others get
	// AccessDeniedException).
	RoleARN string
	// MaxSkew is the largest accepted difference between X-Amz-Date and the
	// fake's clock; 0 means 5 minutes.
	MaxSkew time.Duration
	// Now is the clock; nil means time.Now.
	Now func() time.Time
}

// Issued is one set of credentials the fake handed out.
type Issued struct {
	AccessKeyID     string
	SecretAccessKey string
	SessionToken    string
	Expiration      time.Time // whole seconds, UTC, as on the wire
	IssuedAt        time.Time
	RoleARN         string
	AssumedRoleARN  string
	RoleSessionName string
	DurationSeconds int
	// Serial is the leaf certificate's serial number (decimal).
	Serial string
	// Algorithm is the signing algorithm of the request.
	Algorithm string
}

// KeyID is the access key id (ledger.Credential).
func (i Issued) KeyID() string { return i.AccessKeyID }

// Call is one CreateSession request, successful or not.
type Call struct {
	At     time.Time
	Status int
	Code   string // error code, "" on success
	// Reason says why a request was refused (for test diagnostics).
	Reason string
	Serial string // leaf serial when the certificate could be decoded
}

// Server is the fake Roles Anywhere.
type Server struct {
	cfg    Config
	region string

	mu            sync.Mutex
	mode          Mode
	delay         time.Duration
	sessionLength time.Duration
	calls         []Call
	issued        ledger.Ledger[Issued]

	closeOnce sync.Once
	closed    chan struct{}

	// URL is set by Start.
	URL string
}

// New returns a fake in ModeOK. It panics when Config lacks Roots or ARNs
// (a test bug).
func New(cfg Config) *Server {
	if cfg.Roots == nil {
		panic("rolesanywhere: Config.Roots is required")
	}
	region := arnRegion(cfg.TrustAnchorARN)
	if region == "" || cfg.ProfileARN == "" {
		panic("rolesanywhere: Config needs a valid TrustAnchorARN and a ProfileARN")
	}
	if cfg.MaxSkew == 0 {
		cfg.MaxSkew = 5 * time.Minute
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	return &Server{cfg: cfg, region: region, closed: make(chan struct{})}
}

// Start returns a fake served by an httptest server, URL set. It is closed
// when the test ends.
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

// SetMode changes how later requests are answered.
func (s *Server) SetMode(m Mode) { s.mu.Lock(); s.mode = m; s.mu.Unlock() }

// SetDelay makes every later request wait d before it is answered.
func (s *Server) SetDelay(d time.Duration) { s.mu.Lock(); s.delay = d; s.mu.Unlock() }

// SetSessionLength makes the fake issue sessions of length d whatever
// durationSeconds asks (which must still be valid); zero restores the normal
// behaviour.
func (s *Server) SetSessionLength(d time.Duration) { s.mu.Lock(); s.sessionLength = d; s.mu.Unlock() }

// Calls returns how many CreateSession requests arrived, failed ones included.
func (s *Server) Calls() int { s.mu.Lock(); defer s.mu.Unlock(); return len(s.calls) }

// CallLog returns every request so far.
func (s *Server) CallLog() []Call {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]Call(nil), s.calls...)
}

// Issued returns every credential issued so far, oldest first.
func (s *Server) Issued() []Issued { return s.issued.All() }

// Last returns the most recently issued credential, and false if none was.
func (s *Server) Last() (Issued, bool) { return s.issued.Last() }

// Find returns the issued credential with the access key id, if any.
func (s *Server) Find(accessKeyID string) (Issued, bool) { return s.issued.Find(accessKeyID) }

// Reset returns to ModeOK with no delay and normal sessions and forgets all
// calls and issued credentials.
func (s *Server) Reset() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.mode, s.delay, s.sessionLength = ModeOK, 0, 0
	s.calls = nil
	s.issued.Reset()
}

// Handler returns the HTTP handler (POST /sessions).
func (s *Server) Handler() http.Handler { return http.HandlerFunc(s.serve) }

// apiError is a restJson1 error answer.
type apiError struct {
	status  int
	code    string
	message string
	reason  string // for the call log only
}

func accessDenied(reason string) *apiError {
	return &apiError{status: http.StatusForbidden, code: "AccessDeniedException", message: "Unable to authenticate the request", reason: reason}
}

func validation(msg string) *apiError {
	return &apiError{status: http.StatusBadRequest, code: "ValidationException", message: msg, reason: msg}
}

func (s *Server) serve(w http.ResponseWriter, r *http.Request) {
	reqID := newRequestID()
	w.Header().Set("x-amzn-RequestId", reqID)
	s.mu.Lock()
	mode, delay, sessionLength := s.mode, s.delay, s.sessionLength
	idx := len(s.calls)
	s.calls = append(s.calls, Call{At: s.cfg.Now()})
	s.mu.Unlock()
	record := func(status int, code, reason, serial string) {
		s.mu.Lock()
		if idx < len(s.calls) { // Reset may have run meanwhile
			c := &s.calls[idx]
			c.Status, c.Code, c.Reason, c.Serial = status, code, reason, serial
		}
		s.mu.Unlock()
	}
	if delay > 0 {
		t := time.NewTimer(delay)
		select {
		case <-t.C:
		case <-r.Context().Done():
			t.Stop()
			record(0, "ClientGone", "client went away during the delay", "")
			panic(http.ErrAbortHandler) // no answer: an empty 200 could still reach a client giving up at its deadline
		case <-s.closed:
			t.Stop()
		}
	}
	var aerr *apiError
	switch mode {
	case ModeOK, ModeEmptySet:
	case ModeAccessDenied:
		aerr = accessDenied("mode access-denied")
	case ModeValidation:
		aerr = validation("Invalid request (mode validation)")
	case ModeNotFound:
		aerr = &apiError{status: http.StatusNotFound, code: "ResourceNotFoundException", message: "The requested resource was not found", reason: "mode not-found"}
	case ModeThrottle:
		aerr = &apiError{status: http.StatusTooManyRequests, code: "ThrottlingException", message: "Rate exceeded", reason: "mode throttle"}
	case ModeFail5xx:
		aerr = &apiError{status: http.StatusInternalServerError, code: "InternalServerException", message: "An internal error occurred", reason: "mode fail5xx"}
	case ModeHang:
		select {
		case <-r.Context().Done():
		case <-s.closed:
		}
		record(0, "Hang", "mode hang", "")
		panic(http.ErrAbortHandler) // no answer: an empty 200 could still reach a client giving up at its deadline
	default:
		aerr = &apiError{status: 500, code: "InternalServerException", message: "unknown fake mode"}
	}
	if aerr != nil {
		record(aerr.status, aerr.code, aerr.reason, "")
		writeError(w, aerr)
		return
	}

	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, 1<<20))
	if err != nil {
		aerr = validation("could not read the request body")
		record(aerr.status, aerr.code, aerr.reason, "")
		writeError(w, aerr)
		return
	}
	v, aerr := s.verify(r, body)
	serial := ""
	if v != nil && v.leaf != nil {
		serial = v.leaf.SerialNumber.String()
	}
	if aerr == nil {
		aerr = s.checkRequest(r, v)
	}
	if aerr != nil {
		record(aerr.status, aerr.code, aerr.reason, serial)
		writeError(w, aerr)
		return
	}
	if mode == ModeEmptySet {
		record(http.StatusCreated, "", "mode empty-set", serial)
		writeJSON(w, http.StatusCreated, map[string]any{"credentialSet": []any{}, "subjectArn": s.subjectARN()})
		return
	}
	is := s.issue(v, sessionLength)
	record(http.StatusCreated, "", "", serial)
	writeSuccess(w, is, s.subjectARN())
}

// verified is what verification of a signed request established.
type verified struct {
	leaf      *x509.Certificate
	algorithm string
	duration  int
	session   string
	query     url.Values
}

// Verify checks the SigV4-X509 signature, certificate chain and date of r
// (whose body is body) and returns the leaf certificate, or an error saying
// why the request would be refused with AccessDeniedException (or
// ValidationException for a malformed body).
func (s *Server) Verify(r *http.Request, body []byte) (*x509.Certificate, error) {
	v, aerr := s.verify(r, body)
	if aerr == nil {
		aerr = s.checkRequest(r, v)
	}
	if aerr != nil {
		return nil, fmt.Errorf("%s (HTTP %d): %s", aerr.code, aerr.status, aerr.reason)
	}
	return v.leaf, nil
}

const (
	algRSA   = "AWS4-X509-RSA-SHA256"
	algECDSA = "AWS4-X509-ECDSA-SHA256"
)

func (s *Server) verify(r *http.Request, body []byte) (*verified, *apiError) {
	if r.Method != http.MethodPost || !strings.HasSuffix(r.URL.Path, "/sessions") {
		return nil, &apiError{status: http.StatusNotFound, code: "UnknownOperationException", message: "Unknown operation", reason: "not POST /sessions: " + r.Method + " " + r.URL.Path}
	}
	auth := r.Header.Get("Authorization")
	if auth == "" {
		return nil, accessDenied("no Authorization header")
	}
	alg, rest, ok := strings.Cut(auth, " ")
	if !ok || (alg != algRSA && alg != algECDSA) {
		return nil, accessDenied("unknown algorithm in Authorization")
	}
	fields := map[string]string{}
	for _, part := range strings.Split(rest, ",") {
		k, val, ok := strings.Cut(strings.TrimSpace(part), "=")
		if !ok {
			return nil, accessDenied("malformed Authorization component")
		}
		fields[k] = val
	}
	credential, signedHeaders, sigHex := fields["Credential"], fields["SignedHeaders"], fields["Signature"]
	if credential == "" || signedHeaders == "" || sigHex == "" || len(fields) != 3 {
		return nil, accessDenied("Authorization needs exactly Credential, SignedHeaders and Signature")
	}
	scope := strings.Split(credential, "/")
	if len(scope) != 5 {
		return nil, accessDenied("Credential is not serial/date/region/service/aws4_request")
	}
	serial, date, region, service, term := scope[0], scope[1], scope[2], scope[3], scope[4]
	if service != "rolesanywhere" || term != "aws4_request" {
		return nil, accessDenied("credential scope names service " + service + " / " + term)
	}
	if region != s.region {
		return nil, accessDenied("credential scope region " + region + " is not " + s.region)
	}
	amzDate := r.Header.Get("X-Amz-Date")
	t, err := time.Parse("20060102T150405Z", amzDate)
	if err != nil {
		return nil, accessDenied("missing or malformed X-Amz-Date")
	}
	if date != amzDate[:8] {
		return nil, accessDenied("credential date " + date + " differs from X-Amz-Date")
	}
	now := s.cfg.Now()
	if d := now.Sub(t); d > s.cfg.MaxSkew || d < -s.cfg.MaxSkew {
		return nil, accessDenied(fmt.Sprintf("X-Amz-Date %s is %s away from the server clock", amzDate, d.Round(time.Second)))
	}
	// Signed headers: sorted, lowercase, unique, and the required ones.
	names := strings.Split(signedHeaders, ";")
	for i, n := range names {
		if n == "" || n != strings.ToLower(n) || (i > 0 && names[i-1] >= n) {
			return nil, accessDenied("SignedHeaders not sorted lowercase unique names")
		}
		if n == "authorization" {
			return nil, accessDenied("authorization must not be signed")
		}
	}
	for _, req := range []string{"content-type", "host", "x-amz-date", "x-amz-x509"} {
		if !contains(names, req) {
			return nil, accessDenied("SignedHeaders lacks " + req)
		}
	}
	if r.Header.Get("X-Amz-X509-Chain") != "" && !contains(names, "x-amz-x509-chain") {
		return nil, accessDenied("X-Amz-X509-Chain present but not signed")
	}
	// Certificates.
	leafDER, err := base64.StdEncoding.Strict().DecodeString(r.Header.Get("X-Amz-X509"))
	if err != nil || len(leafDER) == 0 {
		return nil, accessDenied("X-Amz-X509 is not standard base64")
	}
	leaf, err := x509.ParseCertificate(leafDER)
	if err != nil {
		return nil, accessDenied("X-Amz-X509 is not a certificate: " + err.Error())
	}
	v := &verified{leaf: leaf, algorithm: alg}
	if serial != leaf.SerialNumber.String() {
		return v, accessDenied("credential serial " + serial + " is not the certificate's " + leaf.SerialNumber.String())
	}
	inter := x509.NewCertPool()
	if ch := r.Header.Get("X-Amz-X509-Chain"); ch != "" {
		for _, part := range strings.Split(ch, ",") {
			der, err := base64.StdEncoding.Strict().DecodeString(part)
			if err != nil {
				return v, accessDenied("X-Amz-X509-Chain entry is not standard base64")
			}
			c, err := x509.ParseCertificate(der)
			if err != nil {
				return v, accessDenied("X-Amz-X509-Chain entry is not a certificate")
			}
			inter.AddCert(c)
		}
	}
	if _, err := leaf.Verify(x509.VerifyOptions{
		Roots: s.cfg.Roots, Intermediates: inter, CurrentTime: now,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
	}); err != nil {
		return v, accessDenied("untrusted certificate: " + err.Error())
	}
	canon, cerr := canonicalRequest(r, names, body)
	if cerr != nil {
		return v, accessDenied(cerr.Error())
	}
	canonHash := sha256.Sum256([]byte(canon))
	sts := alg + "\n" + amzDate + "\n" + date + "/" + region + "/rolesanywhere/aws4_request\n" + hex.EncodeToString(canonHash[:])
	digest := sha256.Sum256([]byte(sts))
	sig, err := hex.DecodeString(sigHex)
	if err != nil || sigHex != strings.ToLower(sigHex) {
		return v, accessDenied("Signature is not lowercase hex")
	}
	switch pub := leaf.PublicKey.(type) {
	case *rsa.PublicKey:
		if alg != algRSA {
			return v, accessDenied("RSA certificate with algorithm " + alg)
		}
		if err := rsa.VerifyPKCS1v15(pub, crypto.SHA256, digest[:], sig); err != nil {
			return v, accessDenied("signature does not verify")
		}
	case *ecdsa.PublicKey:
		if alg != algECDSA {
			return v, accessDenied("ECDSA certificate with algorithm " + alg)
		}
		if !ecdsa.VerifyASN1(pub, digest[:], sig) {
			return v, accessDenied("signature does not verify")
		}
	default:
		return v, accessDenied(fmt.Sprintf("unsupported certificate key %T", pub))
	}
	// Body.
	var req struct {
		DurationSeconds *int    `json:"durationSeconds"`
		RoleSessionName *string `json:"roleSessionName"`
		SessionName     *string `json:"sessionName"`
	}
	if ct := r.Header.Get("Content-Type"); ct != "application/json" {
		return v, validation("Content-Type " + ct + " is not application/json")
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	if err := dec.Decode(&req); err != nil {
		return v, validation("request body is not JSON: " + err.Error())
	}
	v.duration = 3600
	if req.DurationSeconds != nil {
		v.duration = *req.DurationSeconds
	}
	if v.duration < 900 || v.duration > 43200 {
		return v, validation(fmt.Sprintf("durationSeconds %d is outside 900..43200", v.duration))
	}
	if req.SessionName != nil {
		return v, validation("sessionName is deprecated; use roleSessionName")
	}
	if req.RoleSessionName != nil {
		v.session = *req.RoleSessionName
		if len(v.session) < 2 || len(v.session) > 64 {
			return v, validation("roleSessionName length must be 2..64")
		}
	}
	v.query, _ = url.ParseQuery(r.URL.RawQuery)
	return v, nil
}

// checkRequest checks the ARNs of a verified request.
func (s *Server) checkRequest(_ *http.Request, v *verified) *apiError {
	q := v.query
	for _, k := range []string{"profileArn", "roleArn", "trustAnchorArn"} {
		if len(q[k]) != 1 || q.Get(k) == "" {
			return validation("query parameter " + k + " is required exactly once")
		}
	}
	if q.Get("trustAnchorArn") != s.cfg.TrustAnchorARN {
		return accessDenied("trust anchor " + q.Get("trustAnchorArn") + " is not the configured one")
	}
	if q.Get("profileArn") != s.cfg.ProfileARN {
		return accessDenied("profile " + q.Get("profileArn") + " is not the configured one")
	}
	if arnRegion(q.Get("profileArn")) != s.region {
		return validation("profile region differs from the trust anchor's")
	}
	if s.cfg.RoleARN != "" && q.Get("roleArn") != s.cfg.RoleARN {
		return accessDenied("role " + q.Get("roleArn") + " is not allowed by the profile")
	}
	return nil
}

// canonicalRequest rebuilds the canonical request of r for the signed
// header names (sorted, lowercase) and body.
func canonicalRequest(r *http.Request, names []string, body []byte) (string, error) {
	var canon bytes.Buffer
	canon.WriteString(r.Method + "\n/sessions\n")
	canon.WriteString(canonicalQuery(r.URL.RawQuery) + "\n")
	for _, n := range names {
		var val string
		if n == "host" {
			val = r.Host
			if val == "" {
				val = r.URL.Host
			}
		} else {
			vals, ok := r.Header[http.CanonicalHeaderKey(n)]
			if !ok {
				return "", errors.New("signed header " + n + " is not in the request")
			}
			trimmed := make([]string, len(vals))
			for i, x := range vals {
				trimmed[i] = strings.Join(strings.Fields(x), " ")
			}
			val = strings.Join(trimmed, ",")
		}
		canon.WriteString(n + ":" + val + "\n")
	}
	bodyHash := sha256.Sum256(body)
	canon.WriteString("\n" + strings.Join(names, ";") + "\n" + hex.EncodeToString(bodyHash[:]))
	return canon.String(), nil
}

// canonicalQuery sorts the query by key, then value, and percent-encodes
// both per RFC 3986 (independently of the daemon's implementation).
func canonicalQuery(raw string) string {
	if raw == "" {
		return ""
	}
	q, err := url.ParseQuery(raw)
	if err != nil {
		return "\x00invalid query"
	}
	keys := make([]string, 0, len(q))
	enc := map[string][]string{}
	for k, vs := range q {
		ek := uriEncode(k)
		keys = append(keys, ek)
		for _, v := range vs {
			enc[ek] = append(enc[ek], uriEncode(v))
		}
	}
	sort.Strings(keys)
	var pairs []string
	for _, k := range keys {
		vs := enc[k]
		sort.Strings(vs)
		for _, v := range vs {
			pairs = append(pairs, k+"="+v)
		}
	}
	return strings.Join(pairs, "&")
}

func uriEncode(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		if 'A' <= c && c <= 'Z' || 'a' <= c && c <= 'z' || '0' <= c && c <= '9' || strings.IndexByte("-_.~", c) >= 0 {
			b.WriteByte(c)
		} else {
			fmt.Fprintf(&b, "%%%02X", c)
		}
	}
	return b.String()
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// arnRegion returns field 4 of a rolesanywhere ARN, "" if it is not one.
func arnRegion(arn string) string {
	p := strings.SplitN(arn, ":", 6)
	if len(p) != 6 || p[0] != "arn" || p[2] != "rolesanywhere" || p[3] == "" {
		return ""
	}
	return p[3]
}

func (s *Server) subjectARN() string {
	p := strings.SplitN(s.cfg.TrustAnchorARN, ":", 6)
	return fmt.Sprintf("arn:%s:rolesanywhere:%s:%s:subject/%s", p[1], p[3], p[4], newRequestID())
}

func (s *Server) issue(v *verified, sessionLength time.Duration) Issued {
	now := s.cfg.Now()
	length := time.Duration(v.duration) * time.Second
	if sessionLength > 0 {
		length = sessionLength
	}
	roleARN := v.query.Get("roleArn")
	serial := v.leaf.SerialNumber.String()
	session := v.session
	if session == "" {
		session = fmt.Sprintf("%x", v.leaf.SerialNumber)
	}
	acct := "000000000000"
	if p := strings.SplitN(roleARN, ":", 6); len(p) == 6 && p[4] != "" {
		acct = p[4]
	}
	name := roleARN[strings.LastIndexByte(roleARN, '/')+1:]
	is := Issued{
		AccessKeyID:     "ASIA" + randString(16, upperAlnum),
		SecretAccessKey: randString(40, secretChars),
		SessionToken:    newSessionToken(),
		Expiration:      now.Add(length).Truncate(time.Second).UTC(),
		IssuedAt:        now,
		RoleARN:         roleARN,
		AssumedRoleARN:  fmt.Sprintf("arn:aws:sts::%s:assumed-role/%s/%s", acct, name, session),
		RoleSessionName: session,
		DurationSeconds: v.duration,
		Serial:          serial,
		Algorithm:       v.algorithm,
	}
	s.mu.Lock()
	s.issued.Add(is)
	s.mu.Unlock()
	return is
}

func writeSuccess(w http.ResponseWriter, is Issued, subjectARN string) {
	doc := map[string]any{
		"credentialSet": []any{map[string]any{
			"assumedRoleUser": map[string]any{
				"arn":           is.AssumedRoleARN,
				"assumedRoleId": "AROA" + randString(17, upperAlnum) + ":" + is.RoleSessionName,
			},
			"credentials": map[string]any{
				"accessKeyId":     is.AccessKeyID,
				"expiration":      is.Expiration.Format(time.RFC3339),
				"secretAccessKey": is.SecretAccessKey,
				"sessionToken":    is.SessionToken,
			},
			"packedPolicySize": 0,
			"roleArn":          is.RoleARN,
			"sourceIdentity":   "CN=host",
		}},
		"subjectArn": subjectARN,
	}
	writeJSON(w, http.StatusCreated, doc)
}

func writeError(w http.ResponseWriter, e *apiError) {
	w.Header().Set("X-Amzn-ErrorType", e.code+":http://internal.amazon.com/coral/com.amazonaws.roles.anywhere/")
	writeJSON(w, e.status, map[string]any{"message": e.message})
}

func writeJSON(w http.ResponseWriter, status int, doc any) {
	b, err := json.Marshal(doc)
	if err != nil {
		http.Error(w, "marshal", http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(b)))
	w.WriteHeader(status)
	_, _ = w.Write(b)
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
	h := hex.EncodeToString(b)
	return h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:32]
}
