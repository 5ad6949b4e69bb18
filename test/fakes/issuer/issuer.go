// Package issuer is a fake host-identity JWT issuer for tests of
// identity.jwt_url: it accepts the EC2 instance identity document and its
// PKCS7 signature (POST, JSON) and answers with a JWT minted by an
// *oidc.Issuer whose sub is the request's "workload" when it names one,
// else the document's instanceId. Any non-empty pkcs7
// is accepted (the signature is not verified); the document must be a JSON
// object with a non-empty string instanceId.
//
// The protocol is the one docs/federation.md documents. Failure modes can be
// switched while the server runs. All methods are safe for concurrent use.
package issuer

import (
	"encoding/json"
	"io"
	"mime"
	"net/http"
	"net/http/httptest"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/imdsproxy/imdsproxy/test/fakes/oidc"
)

// Mode selects how the fake answers.
type Mode int

// Modes.
const (
	// ModeOK checks the request and answers 200 with a token.
	ModeOK Mode = iota
	// ModeFail5xx answers 500 with a short text body.
	ModeFail5xx
	// ModeHTML answers 200 text/html (a captive portal or login page).
	ModeHTML
	// ModeGarbage answers 200 text/plain that is not a JWT.
	ModeGarbage
	// ModeExpired answers 200 with a correctly signed but expired token.
	ModeExpired
	// ModeHang blocks until the client gives up or the fake is closed.
	ModeHang
)

// Format is how a token is returned.
type Format int

// Formats.
const (
	// FormatJSON answers application/json {"token": "<jwt>"}.
	FormatJSON Format = iota
	// FormatText answers text/plain with the JWT as the body.
	FormatText
)

// Config configures the fake.
type Config struct {
	// Issuer mints the tokens. Required.
	Issuer *oidc.Issuer
	// Audience is the aud of minted tokens; nil means [oidc.DefaultAudience].
	Audience []string
	// Lifetime is the lifetime of minted tokens; 0 means one hour.
	Lifetime time.Duration
	// Format is how tokens are returned.
	Format Format
}

// Request is one request the fake received.
type Request struct {
	At         time.Time
	Status     int
	InstanceID string
	PKCS7      string
	// Workload is the request's "workload" ("" when absent).
	Workload string
}

// Server is the fake issuer.
type Server struct {
	cfg Config

	mu       sync.Mutex
	mode     Mode
	lifetime time.Duration
	reqs     []Request
	minted   []string

	closeOnce sync.Once
	closed    chan struct{}

	// URL is the token endpoint (server URL + "/v1/token"), set by Start.
	URL string
}

// New returns a fake in ModeOK.
func New(cfg Config) *Server {
	if cfg.Audience == nil {
		cfg.Audience = []string{oidc.DefaultAudience}
	}
	if cfg.Lifetime == 0 {
		cfg.Lifetime = time.Hour
	}
	return &Server{cfg: cfg, lifetime: cfg.Lifetime, closed: make(chan struct{})}
}

// Start serves a new fake on loopback (plain HTTP) and sets URL. Everything
// is closed when the test ends.
func Start(tb testing.TB, cfg Config) *Server {
	tb.Helper()
	s := New(cfg)
	srv := httptest.NewServer(s.Handler())
	s.URL = srv.URL + "/v1/token"
	tb.Cleanup(func() { s.Close(); srv.Close() })
	return s
}

// StartTLS serves a new fake on loopback over HTTPS (httptest's certificate,
// valid for 127.0.0.1) and sets URL; it returns the server so the test can
// reach its certificate. Everything is closed when the test ends.
func StartTLS(tb testing.TB, cfg Config) (*Server, *httptest.Server) {
	tb.Helper()
	s := New(cfg)
	srv := httptest.NewTLSServer(s.Handler())
	s.URL = srv.URL + "/v1/token"
	tb.Cleanup(func() { s.Close(); srv.Close() })
	return s, srv
}

// Close releases requests blocked in ModeHang. It is idempotent.
func (s *Server) Close() { s.closeOnce.Do(func() { close(s.closed) }) }

// SetMode changes how later requests are answered.
func (s *Server) SetMode(m Mode) { s.mu.Lock(); s.mode = m; s.mu.Unlock() }

// SetLifetime changes the lifetime of tokens minted later.
func (s *Server) SetLifetime(d time.Duration) { s.mu.Lock(); s.lifetime = d; s.mu.Unlock() }

// Calls returns how many requests arrived, failed ones included.
func (s *Server) Calls() int { s.mu.Lock(); defer s.mu.Unlock(); return len(s.reqs) }

// Requests returns every request so far.
func (s *Server) Requests() []Request {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]Request(nil), s.reqs...)
}

// Minted returns every token handed out (they are secrets).
func (s *Server) Minted() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.minted...)
}

// Handler serves POST /v1/token (and POST / for convenience).
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/token", s.serve)
	mux.HandleFunc("POST /{$}", s.serve)
	return mux
}

func (s *Server) serve(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	mode, lifetime := s.mode, s.lifetime
	idx := len(s.reqs)
	s.reqs = append(s.reqs, Request{At: time.Now()})
	s.mu.Unlock()
	var workload string
	record := func(status int, id, sig string) {
		s.mu.Lock()
		s.reqs[idx].Status, s.reqs[idx].InstanceID, s.reqs[idx].PKCS7 = status, id, sig
		s.reqs[idx].Workload = workload
		s.mu.Unlock()
	}
	switch mode {
	case ModeFail5xx:
		record(500, "", "")
		http.Error(w, "internal error: issuer backend unavailable", http.StatusInternalServerError)
		return
	case ModeHTML:
		record(200, "", "")
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		_, _ = io.WriteString(w, "<!DOCTYPE html><html><body><h1>Please log in</h1></body></html>\n")
		return
	case ModeHang:
		select {
		case <-r.Context().Done():
		case <-s.closed:
		}
		record(0, "", "")
		panic(http.ErrAbortHandler) // no answer: an empty 200 could still reach a client giving up at its deadline
	}

	if mt, _, _ := mime.ParseMediaType(r.Header.Get("Content-Type")); mt != "application/json" {
		record(415, "", "")
		writeJSONError(w, http.StatusUnsupportedMediaType, "UnsupportedMediaType", "Content-Type must be application/json")
		return
	}
	var in struct {
		Document string `json:"document"`
		PKCS7    string `json:"pkcs7"`
		Workload string `json:"workload"`
	}
	if err := json.NewDecoder(io.LimitReader(r.Body, 1<<20)).Decode(&in); err != nil {
		record(400, "", "")
		writeJSONError(w, http.StatusBadRequest, "BadRequest", "body is not a JSON object")
		return
	}
	workload = in.Workload
	var doc struct {
		InstanceID string `json:"instanceId"`
	}
	if err := json.Unmarshal([]byte(in.Document), &doc); err != nil || doc.InstanceID == "" {
		record(400, "", in.PKCS7)
		writeJSONError(w, http.StatusBadRequest, "InvalidDocument", "document is not an instance identity document with instanceId")
		return
	}
	if in.PKCS7 == "" {
		record(400, doc.InstanceID, "")
		writeJSONError(w, http.StatusBadRequest, "InvalidSignature", "pkcs7 is empty")
		return
	}

	sub := doc.InstanceID
	if in.Workload != "" {
		sub = in.Workload
	}
	var tok string
	switch mode {
	case ModeGarbage:
		record(200, doc.InstanceID, in.PKCS7)
		w.Header().Set("Content-Type", "text/plain")
		_, _ = io.WriteString(w, "this is not a token\n")
		return
	case ModeExpired:
		now := time.Now()
		tok = s.cfg.Issuer.Mint(oidc.Claims{Subject: sub, Audience: s.cfg.Audience,
			IssuedAt: now.Add(-2 * time.Hour), ExpiresAt: now.Add(-time.Hour)})
	default:
		now := time.Now()
		tok = s.cfg.Issuer.Mint(oidc.Claims{Subject: sub, Audience: s.cfg.Audience,
			IssuedAt: now, ExpiresAt: now.Add(lifetime)})
	}
	s.mu.Lock()
	s.minted = append(s.minted, tok)
	s.mu.Unlock()
	record(200, doc.InstanceID, in.PKCS7)
	if s.cfg.Format == FormatText {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		_, _ = io.WriteString(w, tok+"\n")
		return
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(map[string]string{"token": tok})
}

func writeJSONError(w http.ResponseWriter, status int, code, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(status)
	_, _ = io.WriteString(w, `{"code":`+strconv.Quote(code)+`,"message":`+strconv.Quote(msg)+`}`)
}
