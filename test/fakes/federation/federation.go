// Package federation is a fake credential-vending service implementing the
// federation protocol of docs/federation.md, for tests of imdsproxy's
// `source: federation`.
//
// It serves HTTPS (httptest's certificate, valid for 127.0.0.1), verifies the
// Bearer JWT for real (RS256 signature against an *oidc.Issuer's keys, kid,
// iss, exp, nbf and optionally aud), can require a client certificate signed
// by a given CA (mutual TLS), issues unique random credentials and records
// them, so a test can check that a client got exactly what was issued.
// Failure modes and session length can be switched while it runs.
//
// All methods are safe for concurrent use.
package federation

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/imdsproxy/imdsproxy/test/fakes/ledger"
	"github.com/imdsproxy/imdsproxy/test/fakes/oidc"
)

// Mode selects how the fake answers.
type Mode int

// Modes. Every mode except ModeOK fails before the token is looked at.
const (
	// ModeOK verifies the request and issues credentials.
	ModeOK Mode = iota
	// ModeFail5xx answers 500 {"code":"InternalError",...}.
	ModeFail5xx
	// ModeDenied answers 403 {"code":"AccessDenied",...}.
	ModeDenied
	// ModeThrottle answers 429 {"code":"Throttling",...}.
	ModeThrottle
	// ModeHTML answers 200 text/html (a proxy's login page).
	ModeHTML
	// ModeHang blocks until the client gives up or the fake is closed.
	ModeHang
)

// Config configures the fake.
type Config struct {
	// Issuer is the trusted JWT issuer. Required.
	Issuer *oidc.Issuer
	// Audience, when set, is the aud the token must hold.
	Audience string
	// Subject, when set, is the only sub allowed.
	Subject string
	// RoleARN is the role whose credentials are issued; empty means
	// arn:aws:iam::222222222222:role/app.
	RoleARN string
	// SessionLength is the lifetime of issued credentials; 0 means 1 h.
	SessionLength time.Duration
	// ClientCAs, when set, makes the server require a client certificate
	// signed by one of these CAs (mutual TLS).
	ClientCAs *x509.CertPool
}

// Issued is one set of credentials the fake handed out.
type Issued struct {
	AccessKeyID     string
	SecretAccessKey string
	SessionToken    string
	Expiration      time.Time // whole seconds, UTC, as on the wire
	IssuedAt        time.Time
	RoleARN         string
	AccountID       string
	Subject         string
	// BearerToken is the JWT that was presented (a secret too).
	BearerToken string
	// ClientCertSubject is the verified client certificate's subject, "" without mTLS.
	ClientCertSubject string
}

// KeyID is the access key id (ledger.Credential).
func (i Issued) KeyID() string { return i.AccessKeyID }

// Call is one request, successful or not.
type Call struct {
	At         time.Time
	Status     int
	Code       string
	ClientCert string // subject of the client certificate, if any
}

// Server is the fake federation endpoint.
type Server struct {
	cfg Config

	mu            sync.Mutex
	mode          Mode
	sessionLength time.Duration
	calls         []Call
	issued        ledger.Ledger[Issued]

	closeOnce sync.Once
	closed    chan struct{}

	// URL is the credential endpoint (server URL + "/v1/credentials"), set by Start.
	URL string
	// TLS is the httptest server, set by Start (its Certificate() is the CA
	// to trust).
	TLS *httptest.Server
}

// New returns a fake in ModeOK.
func New(cfg Config) *Server {
	if cfg.RoleARN == "" {
		cfg.RoleARN = "arn:aws:iam::222222222222:role/app"
	}
	if cfg.SessionLength == 0 {
		cfg.SessionLength = time.Hour
	}
	return &Server{cfg: cfg, sessionLength: cfg.SessionLength, closed: make(chan struct{})}
}

// Start serves a new fake over HTTPS on loopback and sets URL and TLS. With
// cfg.ClientCAs the server requires and verifies a client certificate.
// Everything is closed when the test ends.
func Start(tb testing.TB, cfg Config) *Server {
	tb.Helper()
	s := New(cfg)
	srv := httptest.NewUnstartedServer(s.Handler())
	if cfg.ClientCAs != nil {
		srv.TLS = &tls.Config{ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: cfg.ClientCAs}
	}
	srv.StartTLS()
	s.URL, s.TLS = srv.URL+"/v1/credentials", srv
	tb.Cleanup(func() { s.Close(); srv.Close() })
	return s
}

// WriteCAFile writes the server's certificate (PEM) to dir/name and returns
// the path, for FederationConfig.CAFile or federation.ca_file.
func (s *Server) WriteCAFile(tb testing.TB, dir, name string) string {
	tb.Helper()
	p := filepath.Join(dir, name)
	b := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: s.TLS.Certificate().Raw})
	if err := os.WriteFile(p, b, 0o644); err != nil {
		tb.Fatal(err)
	}
	return p
}

// Close releases requests blocked in ModeHang. It is idempotent.
func (s *Server) Close() { s.closeOnce.Do(func() { close(s.closed) }) }

// SetMode changes how later requests are answered.
func (s *Server) SetMode(m Mode) { s.mu.Lock(); s.mode = m; s.mu.Unlock() }

// SetSessionLength changes the lifetime of credentials issued later; 0
// restores the configured one.
func (s *Server) SetSessionLength(d time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if d == 0 {
		d = s.cfg.SessionLength
	}
	s.sessionLength = d
}

// Calls returns how many requests arrived, failed ones included.
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

// Handler serves GET /v1/credentials.
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/credentials", s.serve)
	return mux
}

func (s *Server) serve(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	mode, length := s.mode, s.sessionLength
	idx := len(s.calls)
	clientCert := ""
	if r.TLS != nil && len(r.TLS.PeerCertificates) > 0 {
		clientCert = r.TLS.PeerCertificates[0].Subject.String()
	}
	s.calls = append(s.calls, Call{At: time.Now(), ClientCert: clientCert})
	s.mu.Unlock()
	record := func(status int, code string) {
		s.mu.Lock()
		s.calls[idx].Status, s.calls[idx].Code = status, code
		s.mu.Unlock()
	}
	fail := func(status int, code, msg string) {
		record(status, code)
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(status)
		_ = json.NewEncoder(w).Encode(map[string]string{"code": code, "message": msg})
	}
	switch mode {
	case ModeFail5xx:
		fail(500, "InternalError", "the credential backend failed")
		return
	case ModeDenied:
		fail(403, "AccessDenied", "host is not allowed any role")
		return
	case ModeThrottle:
		fail(429, "Throttling", "rate exceeded")
		return
	case ModeHTML:
		record(200, "HTML")
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		_, _ = io.WriteString(w, "<!DOCTYPE html><html><body>Proxy login required</body></html>\n")
		return
	case ModeHang:
		select {
		case <-r.Context().Done():
		case <-s.closed:
		}
		record(0, "Hang")
		panic(http.ErrAbortHandler) // no answer: an empty 200 could still reach a client giving up at its deadline
	}

	auth := r.Header.Get("Authorization")
	tok, ok := strings.CutPrefix(auth, "Bearer ")
	if !ok || tok == "" {
		w.Header().Set("WWW-Authenticate", `Bearer`)
		fail(401, "MissingToken", "Authorization: Bearer <jwt> is required")
		return
	}
	sub, err := s.verify(tok)
	if err != nil {
		w.Header().Set("WWW-Authenticate", `Bearer error="invalid_token"`)
		fail(401, "InvalidToken", err.Error())
		return
	}
	if s.cfg.Subject != "" && sub != s.cfg.Subject {
		fail(403, "AccessDenied", "subject is not allowed this role")
		return
	}
	now := time.Now().UTC()
	is := Issued{
		AccessKeyID:       "ASIA" + randString(16, upperAlnum),
		SecretAccessKey:   randString(40, secretChars),
		SessionToken:      "FQoGZXIvYXdzE" + randString(300, secretChars),
		Expiration:        now.Add(length).Truncate(time.Second),
		IssuedAt:          now,
		RoleARN:           s.cfg.RoleARN,
		AccountID:         accountOf(s.cfg.RoleARN),
		Subject:           sub,
		BearerToken:       tok,
		ClientCertSubject: clientCert,
	}
	s.mu.Lock()
	s.issued.Add(is)
	s.mu.Unlock()
	record(200, "")
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(map[string]string{
		"AccessKeyId":     is.AccessKeyID,
		"SecretAccessKey": is.SecretAccessKey,
		"Token":           is.SessionToken,
		"Expiration":      is.Expiration.Format(time.RFC3339),
		"AccountId":       is.AccountID,
		"RoleArn":         is.RoleARN,
	})
}

// verify checks an RS256 JWT against the issuer and returns its sub.
// Messages never quote the token.
func (s *Server) verify(tok string) (string, error) {
	parts := strings.Split(tok, ".")
	if len(parts) != 3 {
		return "", errors.New("not a JWT")
	}
	hb, err1 := base64.RawURLEncoding.DecodeString(parts[0])
	pb, err2 := base64.RawURLEncoding.DecodeString(parts[1])
	sig, err3 := base64.RawURLEncoding.DecodeString(parts[2])
	if err1 != nil || err2 != nil || err3 != nil {
		return "", errors.New("not a JWT")
	}
	var h struct {
		Alg string `json:"alg"`
		Kid string `json:"kid"`
	}
	if json.Unmarshal(hb, &h) != nil || h.Alg != "RS256" {
		return "", errors.New("unsupported or missing alg")
	}
	pub, ok := s.cfg.Issuer.PublicKeys()[h.Kid]
	if !ok {
		return "", errors.New("unknown kid")
	}
	sum := sha256.Sum256([]byte(parts[0] + "." + parts[1]))
	if rsa.VerifyPKCS1v15(pub, crypto.SHA256, sum[:], sig) != nil {
		return "", errors.New("bad signature")
	}
	var c struct {
		Iss string          `json:"iss"`
		Sub string          `json:"sub"`
		Aud json.RawMessage `json:"aud"`
		Exp *float64        `json:"exp"`
		Nbf *float64        `json:"nbf"`
	}
	if json.Unmarshal(pb, &c) != nil {
		return "", errors.New("payload is not JSON")
	}
	now := float64(time.Now().Unix())
	switch {
	case c.Iss != s.cfg.Issuer.URL():
		return "", fmt.Errorf("untrusted issuer %q", c.Iss)
	case c.Exp == nil || *c.Exp <= now:
		return "", errors.New("token expired")
	case c.Nbf != nil && *c.Nbf > now+60:
		return "", errors.New("token not valid yet")
	}
	if s.cfg.Audience != "" {
		var one string
		var many []string
		if json.Unmarshal(c.Aud, &one) == nil {
			many = []string{one}
		} else if json.Unmarshal(c.Aud, &many) != nil {
			return "", errors.New("bad aud")
		}
		if !slices.Contains(many, s.cfg.Audience) {
			return "", errors.New("wrong audience")
		}
	}
	return c.Sub, nil
}

func accountOf(arn string) string {
	parts := strings.SplitN(arn, ":", 6)
	if len(parts) < 6 {
		return ""
	}
	return parts[4]
}

const (
	upperAlnum  = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
	secretChars = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
)

func randString(n int, alphabet string) string {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	for i := range b {
		b[i] = alphabet[int(b[i])%len(alphabet)]
	}
	return string(b)
}

// ClientCA is a throw-away CA for mutual-TLS tests.
type ClientCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pool *x509.CertPool
}

// NewClientCA returns a fresh self-signed ECDSA P-256 CA valid for a day.
func NewClientCA() (*ClientCA, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "imdsproxy test client CA"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return &ClientCA{cert: cert, key: key, pool: pool}, nil
}

// Pool returns a pool holding the CA, for Config.ClientCAs.
func (ca *ClientCA) Pool() *x509.CertPool { return ca.pool }

// Issue returns a client certificate (with its key) for cn, signed by the CA.
func (ca *ClientCA) Issue(cn string) (*tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: cn},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		return nil, err
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	return &tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}, nil
}
