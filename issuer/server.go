// Package issuer is imdsproxy's central token issuer: it attests a host
// (a signed EC2 instance identity document, or a presigned
// sts:GetCallerIdentity made with the instance profile), decides from
// policy which workloads the host may speak for, and mints a short-lived
// OIDC token per workload (sub = the workload, ABAC session tags in the
// https://aws.amazon.com/tags claim), signed with a file or AWS KMS key. It
// serves the discovery document and the JWKS, and can publish both to S3.
//
// The issuer is stateless: any number of replicas serve the same config.
// Everything a request needs (keys, policy, attestation, certificates) is
// one immutable snapshot, built whole from the config and swapped with one
// atomic store on reload; a request loads it once.
//
// See docs/issuer.md for the operator's view.
package issuer

import (
	"cmp"
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	awsconfig "github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/service/kms"
	"github.com/go-jose/go-jose/v4"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.uber.org/zap"
)

// Paths served under the listener. The listener stands for the issuer URL:
// a CDN or load balancer maps https://oidc.example.com/imds/ to its root.
// The same documents are also served under the issuer URL's path, for a
// proxy that does not strip it.
const (
	PathDiscovery = "/.well-known/openid-configuration"
	PathJWKS      = "/.well-known/jwks.json"
	PathToken     = "/v1/token"
)

// Options are the issuer's dependencies. The zero value is usable except
// for Registerer.
type Options struct {
	// Log receives structured logs; nil means none. Tokens, keys,
	// signatures and credentials are never logged.
	Log *zap.Logger
	// Registerer receives the metrics; required.
	Registerer prometheus.Registerer
	// Gatherer is served on /metrics; nil means no /metrics route.
	Gatherer prometheus.Gatherer
	// Now is the clock; nil means time.Now.
	Now func() time.Time
	// AWSConfig loads the AWS SDK configuration (credentials, endpoints
	// from AWS_ENDPOINT_URL_*) used for KMS, EC2 and S3; nil means
	// config.LoadDefaultConfig.
	AWSConfig func(ctx context.Context) (aws.Config, error)
	// EC2 replaces the EC2 DescribeInstances client (tests); nil means
	// aws-sdk-go-v2 with attestation.ec2.
	EC2 InstanceDescriber
	// STSClient sends the aws_iam method's requests to STS; nil means a
	// client with TLS 1.2+ and no redirects.
	STSClient *http.Client
}

// Server is the issuer. Create it with New; it is safe for concurrent use.
type Server struct {
	opts    Options
	log     *zap.Logger
	now     func() time.Time
	metrics *metrics
	limiter *limiter
	lookups func(string)
	sts     func(string)
	// stsInFlight counts the requests forwarded to STS and not answered
	// yet, across configuration generations (a reload does not reset the
	// bound: attestation.aws_iam.max_in_flight).
	stsInFlight atomic.Int64

	state    atomic.Pointer[state]
	draining atomic.Bool

	signMu      sync.Mutex
	signFailing string // last signing error while no signature has succeeded since
}

// state is one immutable generation of everything a request needs.
type state struct {
	cfg       *Config
	keys      []*signingKey // keys[0] signs
	jwks      []byte
	discovery []byte
	paths     map[string]string // extra path (issuer path prefix) → served path
	policy    *Policy
	iid       *iidVerifier
	iam       *iamVerifier
	cert      *tls.Certificate
	loadedAt  time.Time
}

// New builds an issuer from a validated config: it reads the keys (asking
// KMS for the public halves), the trusted certificates and the TLS
// certificate. ctx bounds that start-up work.
func New(ctx context.Context, cfg *Config, opts Options) (*Server, error) {
	if opts.Registerer == nil {
		return nil, errors.New("issuer: Options.Registerer is required")
	}
	if opts.Log == nil {
		opts.Log = zap.NewNop()
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.AWSConfig == nil {
		opts.AWSConfig = func(ctx context.Context) (aws.Config, error) { return awsconfig.LoadDefaultConfig(ctx) }
	}
	if opts.STSClient == nil {
		tr := http.DefaultTransport.(*http.Transport).Clone()
		tr.TLSClientConfig = &tls.Config{MinVersion: tls.VersionTLS12}
		tr.MaxIdleConnsPerHost = 64
		opts.STSClient = &http.Client{Transport: tr,
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	}
	s := &Server{opts: opts, log: opts.Log, now: opts.Now, limiter: newLimiter(cfg.RateLimit)}
	m, err := newMetrics(opts.Registerer, s.limiter, &s.stsInFlight, func() bool {
		if s.state.Load() == nil {
			return false // New failed: nothing is served
		}
		ok, _ := s.Ready()
		return ok
	})
	if err != nil {
		return nil, err
	}
	s.metrics = m
	s.lookups = func(r string) { m.ec2Lookups.WithLabelValues(r).Inc() }
	s.sts = func(r string) { m.stsCalls.WithLabelValues(r).Inc() }
	st, err := s.build(ctx, cfg)
	if err != nil {
		m.reloadOK.Set(0)
		return nil, err
	}
	s.install(st)
	return s, nil
}

// Reload builds a new generation from cfg and swaps it in; on error the
// running generation stays and the reload gauge says 0.
func (s *Server) Reload(ctx context.Context, cfg *Config) error {
	st, err := s.build(ctx, cfg)
	if err != nil {
		s.metrics.reloadOK.Set(0)
		s.log.Error("configuration refused; keeping the running one", zap.Error(err))
		return err
	}
	if old := s.state.Load(); old != nil {
		// Restart-only: the listener is made once.
		for key, changed := range map[string]bool{
			"listen":          old.cfg.Listen != cfg.Listen,
			"max_connections": old.cfg.MaxConnections != cfg.MaxConnections,
		} {
			if changed {
				s.log.Warn(key + " changed; it takes effect only after a restart")
			}
		}
	}
	s.install(st)
	s.log.Info("configuration reloaded", zap.String("signing_kid", st.keys[0].kid), zap.Int("keys", len(st.keys)),
		zap.Int("rules", len(st.policy.rules)))
	return nil
}

func (s *Server) install(st *state) {
	s.limiter.Configure(st.cfg.RateLimit)
	s.state.Store(st)
	s.metrics.reloadOK.Set(1)
	s.metrics.reloadTime.Set(float64(st.loadedAt.UnixNano()) / 1e9)
	s.metrics.keys.Set(float64(len(st.keys)))
	for _, p := range st.policy.series() {
		s.metrics.minted.WithLabelValues(p[0], p[1])
	}
	s.signMu.Lock()
	s.signFailing = ""
	s.signMu.Unlock()
}

// Config returns the running configuration (do not modify it).
func (s *Server) Config() *Config { return s.state.Load().cfg }

func (s *Server) build(ctx context.Context, cfg *Config) (*state, error) {
	st := &state{cfg: cfg, policy: compilePolicy(cfg.Policy), loadedAt: s.now()}
	var awsCfg *aws.Config
	getAWS := func() (aws.Config, error) {
		if awsCfg == nil {
			c, err := s.opts.AWSConfig(ctx)
			if err != nil {
				return aws.Config{}, fmt.Errorf("issuer: AWS configuration: %w", err)
			}
			awsCfg = &c
		}
		return *awsCfg, nil
	}
	keys, err := loadKeys(ctx, cfg, getAWS)
	if err != nil {
		return nil, err
	}
	st.keys = keys
	if st.jwks, st.discovery, err = documents(cfg, keys); err != nil {
		return nil, err
	}
	st.paths = map[string]string{}
	if u, _ := url.Parse(cfg.Issuer); u != nil && strings.TrimRight(u.Path, "/") != "" {
		p := strings.TrimRight(u.Path, "/")
		st.paths[p+PathDiscovery] = PathDiscovery
		st.paths[p+PathJWKS] = PathJWKS
	}
	if cfg.TLS != nil {
		c, err := tls.LoadX509KeyPair(cfg.TLS.Cert, cfg.TLS.Key)
		if err != nil {
			return nil, keyErr("tls", "%v", err)
		}
		st.cert = &c
	}
	describer := s.opts.EC2
	if describer == nil {
		c, err := getAWS()
		if err != nil {
			return nil, err
		}
		describer = newEC2Describer(c, cfg.Attestation.EC2)
	}
	lookup := newInstanceLookup(describer, cfg.Attestation.EC2, s.now, s.lookups)
	if c := cfg.Attestation.AWSIID; c != nil {
		ts, err := loadTrustStore(c.Certificates)
		if err != nil {
			return nil, keyErr("attestation.aws_iid.certificates", "%v", err)
		}
		st.iid = &iidVerifier{trust: ts, maxAge: c.MaxInstanceAge.D(), verify: c.VerifyInstance, lookup: lookup, now: s.now}
	}
	if c := cfg.Attestation.AWSIAM; c != nil {
		eps, err := stsEndpoints(c)
		if err != nil {
			return nil, fmt.Errorf("issuer: attestation.aws_iam.sts_endpoints: %w", err)
		}
		timeout := c.Timeout.D()
		if timeout == 0 {
			timeout = DefaultUpstreamTimeout
		}
		st.iam = &iamVerifier{issuer: cfg.Issuer, endpoints: eps, client: s.opts.STSClient, timeout: timeout,
			verify: c.VerifyInstance, lookup: lookup, now: s.now, count: s.sts,
			inFlight: &s.stsInFlight, maxInFlight: int64(cmp.Or(c.MaxInFlight, DefaultSTSInFlight))}
	}
	return st, nil
}

// loadKeys loads every configured key, in order.
func loadKeys(ctx context.Context, cfg *Config, getAWS func() (aws.Config, error)) ([]*signingKey, error) {
	var keys []*signingKey
	kids := map[string]int{}
	for i, kc := range cfg.Signing.Keys {
		var k *signingKey
		var err error
		if kc.File != "" {
			if k, err = loadFileKey(kc.File); err != nil {
				return nil, keyErr(fmt.Sprintf("signing.keys[%d].file", i), "%v", err)
			}
		} else {
			var c aws.Config
			if c, err = getAWS(); err == nil {
				region := kmsARNRe.FindStringSubmatch(kc.KMS)[1]
				k, err = loadKMSKey(ctx, kms.NewFromConfig(c, func(o *kms.Options) { o.Region = region }), kc.KMS)
			}
		}
		if err != nil {
			return nil, fmt.Errorf("issuer: signing.keys[%d]: %w", i, err)
		}
		if j, dup := kids[k.kid]; dup {
			return nil, keyErr(fmt.Sprintf("signing.keys[%d]", i), "the same key as signing.keys[%d]", j)
		}
		kids[k.kid] = i
		if kc.PublishedAt != "" {
			k.publishedAt, _ = time.Parse(time.RFC3339, kc.PublishedAt)
		}
		keys = append(keys, k)
	}
	return keys, nil
}

// Discovery is the OpenID Connect discovery document the issuer serves.
type Discovery struct {
	Issuer                           string   `json:"issuer"`
	JWKSURI                          string   `json:"jwks_uri"`
	ResponseTypesSupported           []string `json:"response_types_supported"`
	SubjectTypesSupported            []string `json:"subject_types_supported"`
	IDTokenSigningAlgValuesSupported []string `json:"id_token_signing_alg_values_supported"`
	ClaimsSupported                  []string `json:"claims_supported"`
}

// documents renders the JWKS (every key, in config order) and the
// discovery document.
func documents(cfg *Config, keys []*signingKey) (jwks, discovery []byte, err error) {
	set := jose.JSONWebKeySet{}
	var algs []string
	for _, k := range keys {
		set.Keys = append(set.Keys, k.jwk)
		if !slices.Contains(algs, k.alg) {
			algs = append(algs, k.alg)
		}
	}
	if jwks, err = json.MarshalIndent(set, "", "  "); err != nil {
		return nil, nil, fmt.Errorf("issuer: jwks: %w", err)
	}
	d := Discovery{
		Issuer:                           cfg.Issuer,
		JWKSURI:                          cfg.Issuer + PathJWKS,
		ResponseTypesSupported:           []string{"id_token"},
		SubjectTypesSupported:            []string{"public"},
		IDTokenSigningAlgValuesSupported: algs,
		ClaimsSupported:                  []string{"iss", "sub", "aud", "iat", "nbf", "exp", "jti", TagsClaim},
	}
	if discovery, err = json.MarshalIndent(d, "", "  "); err != nil {
		return nil, nil, fmt.Errorf("issuer: discovery: %w", err)
	}
	return append(jwks, '\n'), append(discovery, '\n'), nil
}

// GetCertificate serves the current generation's TLS certificate (for
// tls.Config.GetCertificate), so a reload rotates it.
func (s *Server) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	if c := s.state.Load().cert; c != nil {
		return c, nil
	}
	return nil, errors.New("issuer: no TLS certificate configured")
}

// Drain makes /readyz fail (load balancers stop sending) while requests
// are still served.
func (s *Server) Drain() { s.draining.Store(true) }

// Ready reports whether the issuer should get traffic, and why (not).
func (s *Server) Ready() (bool, string) {
	if s.draining.Load() {
		return false, "not ready: shutting down"
	}
	st := s.state.Load()
	s.signMu.Lock()
	failing := s.signFailing
	s.signMu.Unlock()
	if failing != "" {
		return false, fmt.Sprintf("not ready: the signing key %s (%s) fails: %s", st.keys[0].kid, st.keys[0].source, failing)
	}
	return true, fmt.Sprintf("ready: signing with %s key %s (%s), %d key(s) published, %d policy rule(s)",
		st.keys[0].alg, st.keys[0].kid, st.keys[0].source, len(st.keys), len(st.policy.rules))
}

// Handler serves the issuer's HTTP API.
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET "+PathDiscovery, func(w http.ResponseWriter, r *http.Request) {
		writeDoc(w, s.state.Load().discovery)
	})
	mux.HandleFunc("GET "+PathJWKS, func(w http.ResponseWriter, r *http.Request) {
		writeDoc(w, s.state.Load().jwks)
	})
	mux.HandleFunc("POST "+PathToken, s.handleToken)
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) { writeText(w, http.StatusOK, "ok\n") })
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		ok, why := s.Ready()
		status := http.StatusOK
		if !ok {
			status = http.StatusServiceUnavailable
		}
		writeText(w, status, why+"\n")
	})
	if s.opts.Gatherer != nil {
		mux.Handle("GET /metrics", promhttp.HandlerFor(s.opts.Gatherer, promhttp.HandlerOpts{
			ErrorHandling: promhttp.ContinueOnError, MaxRequestsInFlight: 4, Timeout: 10 * time.Second}))
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if served, ok := s.state.Load().paths[r.URL.Path]; ok && (r.Method == http.MethodGet || r.Method == http.MethodHead) {
			r2 := *r
			u := *r.URL
			u.Path, u.RawPath = served, ""
			r2.URL = &u
			r = &r2
		}
		mux.ServeHTTP(w, r)
	})
}

func writeDoc(w http.ResponseWriter, body []byte) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", DefaultCacheControl)
	_, _ = w.Write(body)
}

func writeText(w http.ResponseWriter, status int, body string) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	_, _ = io.WriteString(w, body)
}

// errorBody is the JSON of a refused token request (docs/federation.md).
type errorBody struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

func (s *Server) handleToken(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	st := s.state.Load()
	method := "unknown"
	tok, d, id, err := s.token(r, st, &method)
	result := "ok"
	if err != nil {
		reason := reasonOf(err)
		result = "refused"
		s.metrics.failures.WithLabelValues(method, reason).Inc()
		msg := "the token could not be signed"
		var ae *attestError
		if errors.As(err, &ae) {
			msg = ae.msg
		}
		fields := []zap.Field{zap.String("method", method), zap.String("reason", reason), zap.String("error", msg)}
		if id != nil {
			fields = append(fields, zap.String("account", id.AccountID), zap.String("instance_id", id.InstanceID))
		}
		if reason == reasonSign || reason == reasonEC2Unavailable || reason == reasonSTSUnavailable {
			s.log.Warn("token request failed", append(fields, zap.NamedError("cause", err))...)
		} else {
			s.log.Debug("token request refused", fields...)
		}
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Cache-Control", "no-store")
		w.Header().Set("X-Content-Type-Options", "nosniff")
		switch reason {
		case reasonRateLimited:
			w.Header().Set("Retry-After", "60")
		case reasonSTSBusy:
			w.Header().Set("Retry-After", "1")
		}
		w.WriteHeader(statusOf(reason))
		_ = json.NewEncoder(w).Encode(errorBody{Code: reason, Message: msg})
	} else {
		s.metrics.minted.WithLabelValues(d.Subject, d.Rule).Inc()
		s.log.Debug("token minted", zap.String("method", method), zap.String("subject", d.Subject),
			zap.String("rule", d.Rule), zap.String("account", id.AccountID), zap.String("instance_id", id.InstanceID),
			zap.String("kid", st.keys[0].kid))
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Cache-Control", "no-store")
		_ = json.NewEncoder(w).Encode(struct {
			Token string `json:"token"`
		}{tok})
	}
	s.metrics.duration.WithLabelValues(method, result).Observe(time.Since(start).Seconds())
}

// token runs one token request: parse, attest, rate-limit, decide, sign.
func (s *Server) token(r *http.Request, st *state, method *string) (string, *Decision, *Identity, error) {
	if mt, _, _ := mime.ParseMediaType(r.Header.Get("Content-Type")); mt != "application/json" {
		return "", nil, nil, attestErr(reasonMediaType, "Content-Type must be application/json")
	}
	body, err := io.ReadAll(http.MaxBytesReader(nil, r.Body, MaxRequestBody))
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return "", nil, nil, attestErr(reasonTooLarge, "the body is larger than %d bytes", MaxRequestBody)
		}
		return "", nil, nil, attestErr(reasonBadRequest, "the body could not be read")
	}
	req, err := ParseTokenRequest(body)
	if err != nil {
		return "", nil, nil, err
	}
	*method = req.Method
	ctx := r.Context()
	var id *Identity
	switch {
	case req.Method == MethodIID && st.iid != nil:
		id, err = st.iid.Verify(ctx, req)
	case req.Method == MethodIAM && st.iam != nil:
		id, err = st.iam.Verify(ctx, req)
	default:
		err = attestErr(reasonMethodDisabled, "attestation method %s is not enabled on this issuer", req.Method)
	}
	if err != nil {
		return "", nil, id, err
	}
	if !s.limiter.Allow(id.InstanceID, s.now()) {
		return "", nil, id, attestErr(reasonRateLimited, "too many token requests for instance %s; retry later", id.InstanceID)
	}
	d, err := st.policy.Decide(ctx, id, req.Workload)
	if err != nil {
		return "", nil, id, err
	}
	tok, err := s.sign(ctx, st, d)
	return tok, d, id, err
}

// claims are a minted token's claims.
type claims struct {
	Iss  string       `json:"iss"`
	Sub  string       `json:"sub"`
	Aud  string       `json:"aud"`
	Iat  int64        `json:"iat"`
	Nbf  int64        `json:"nbf"`
	Exp  int64        `json:"exp"`
	Jti  string       `json:"jti"`
	Tags *SessionTags `json:"https://aws.amazon.com/tags,omitempty"`
}

// sign mints the token of decision d with the generation's first key.
func (s *Server) sign(ctx context.Context, st *state, d *Decision) (string, error) {
	now := s.now().Unix()
	var jti [16]byte
	_, _ = rand.Read(jti[:])
	c := claims{Iss: st.cfg.Issuer, Sub: d.Subject, Aud: st.cfg.Tokens.Audience, Iat: now, Nbf: now,
		Exp: now + int64(st.cfg.Tokens.TTL.D()/time.Second), Jti: base64.RawURLEncoding.EncodeToString(jti[:]), Tags: d.Tags}
	payload, err := json.Marshal(c)
	if err != nil {
		return "", err
	}
	k := st.keys[0]
	start := time.Now()
	tok, err := k.signJWT(ctx, payload)
	s.metrics.signing.WithLabelValues(k.source).Observe(time.Since(start).Seconds())
	s.signMu.Lock()
	defer s.signMu.Unlock()
	if err != nil {
		s.metrics.signErrors.WithLabelValues(k.source).Inc()
		s.signFailing = sanitize(err.Error(), 200)
		return "", fmt.Errorf("sign with %s key %s: %w", k.source, k.kid, err)
	}
	s.signFailing = ""
	return tok, nil
}

// sanitize cuts s to n bytes and drops control characters.
func sanitize(s string, n int) string {
	s = strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f {
			return ' '
		}
		return r
	}, s)
	if len(s) > n {
		s = s[:n] + "…"
	}
	return s
}

// RefuseReload records a reload that failed before a config could be built
// (an unreadable or invalid file): the gauge says 0, the running
// generation stays.
func (s *Server) RefuseReload(err error) {
	s.metrics.reloadOK.Set(0)
	s.log.Error("configuration refused; keeping the running one", zap.Error(err))
}
