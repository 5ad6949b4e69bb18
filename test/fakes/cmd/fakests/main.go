// Command fakests runs the fake STS of test/fakes on loopback, for `make
// demo` and manual testing of imdsproxy, with either of two token issuers:
//
//   - its own fake OIDC issuer (the default): it writes a fresh JWT to
//     -token-file (if given) and rewrites it every -token-refresh with one
//     hour of validity;
//   - a real one, -issuer-url (imdsproxy-issuer): STS verifies every token
//     the way AWS STS does, fetching <issuer-url>/.well-known/openid-configuration
//     and its jwks_uri (or -jwks-url) and checking kid, alg, the signature,
//     iss, aud, exp and, per role, the sub of -trust.
//
// With -instance-dir it also makes a stand-in EC2 instance whose identity
// can be verified (test/fakes/instance): it writes DIR/aemm-config.json
// (mode 0600) for an amazon-ec2-metadata-mock whose HOME is DIR, serving
// the signed instance identity document, its pkcs7 and rsa2048 signatures
// and the instance profile's credentials, which this fake STS issued (so a
// GetCallerIdentity signed with them, the issuer's aws_iam method, is
// answered); DIR/iid-ca.pem, the certificate that signed the document
// (what imdsproxy-issuer's attestation.aws_iid.certificates must trust);
// and DIR/instance.json, the instance's public facts.
//
// It logs one line per STS call (never a secret) and stops cleanly on
// SIGINT or SIGTERM. Point the daemon at it with
// AWS_ENDPOINT_URL_STS=http://<sts-listen>.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"encoding/xml"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/imdsproxy/imdsproxy/test/fakes/instance"
	"github.com/imdsproxy/imdsproxy/test/fakes/oidc"
	"github.com/imdsproxy/imdsproxy/test/fakes/sts"
)

func main() {
	if err := run(context.Background(), os.Args[1:], os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "fakests:", err)
		os.Exit(1)
	}
}

type options struct {
	stsListen, issuerListen, tokenFile, audience, subject, mode string
	tokenRefresh, sessionLength, delay                          time.Duration

	issuerURL, jwksURL string
	trust              trustFlags

	instanceDir, instanceAccount, instanceRegion, instanceRole string
	instanceCredentials                                        time.Duration
}

// trustFlags are the -trust ROLE_ARN=SUBJECT[,SUBJECT] flags, in order.
type trustFlags []trustFlag

type trustFlag struct {
	role     string
	subjects []string
}

func (t *trustFlags) String() string {
	var parts []string
	for _, f := range *t {
		parts = append(parts, f.role+"="+strings.Join(f.subjects, ","))
	}
	return strings.Join(parts, " ")
}

func (t *trustFlags) Set(v string) error {
	role, subs, ok := strings.Cut(v, "=")
	if !ok || !strings.HasPrefix(role, "arn:") || subs == "" {
		return errors.New("want ROLE_ARN=SUBJECT[,SUBJECT...]")
	}
	f := trustFlag{role: role}
	for _, s := range strings.Split(subs, ",") {
		if s == "" {
			return errors.New("empty subject")
		}
		f.subjects = append(f.subjects, s)
	}
	*t = append(*t, f)
	return nil
}

func run(ctx context.Context, args []string, stderr io.Writer) error {
	var o options
	fs := flag.NewFlagSet("fakests", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&o.stsListen, "sts-listen", "127.0.0.1:8190", "address of the fake STS")
	fs.StringVar(&o.issuerListen, "issuer-listen", "127.0.0.1:8191", "address of the fake OIDC issuer (not with -issuer-url)")
	fs.StringVar(&o.tokenFile, "token-file", "", "write a JWT of the fake OIDC issuer here and keep it fresh (empty: do not)")
	fs.DurationVar(&o.tokenRefresh, "token-refresh", 5*time.Minute, "how often the token file is rewritten")
	fs.StringVar(&o.audience, "audience", oidc.DefaultAudience, "audience of minted tokens and required by STS")
	fs.StringVar(&o.subject, "subject", "host-1", "sub claim of the fake OIDC issuer's tokens")
	fs.DurationVar(&o.sessionLength, "session-length", time.Hour, "length of issued sessions, whatever DurationSeconds asks (0: honour DurationSeconds)")
	fs.DurationVar(&o.delay, "delay", 0, "latency added to every STS answer")
	fs.StringVar(&o.mode, "mode", "ok", "STS mode: ok, fail5xx, unavailable, throttle, hang, idp-error, invalid-token, expired-token, access-denied")
	fs.StringVar(&o.issuerURL, "issuer-url", "", "trust this OIDC issuer instead of the built-in one: its discovery document and JWKS are fetched on every call, as STS does")
	fs.StringVar(&o.jwksURL, "jwks-url", "", "with -issuer-url: fetch the JWKS here and skip discovery")
	fs.Var(&o.trust, "trust", "ROLE_ARN=SUBJECT[,SUBJECT...]: the role's trust policy accepts tokens with these sub values (StringLike: * and ?) and session tags (repeatable); once one is given, roles without one cannot be assumed")
	fs.StringVar(&o.instanceDir, "instance-dir", "", "make a stand-in EC2 instance: write aemm-config.json, iid-ca.pem and instance.json to this directory")
	fs.StringVar(&o.instanceAccount, "instance-account", instance.DefaultAccountID, "the stand-in instance's account")
	fs.StringVar(&o.instanceRegion, "instance-region", instance.DefaultRegion, "the stand-in instance's region")
	fs.StringVar(&o.instanceRole, "instance-profile-role", instance.DefaultProfileRole, "the stand-in instance profile's role name")
	fs.DurationVar(&o.instanceCredentials, "instance-credentials-length", 12*time.Hour, "validity of the instance profile's credentials (issued once, at start)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	mode, err := sts.ParseMode(o.mode)
	if err != nil {
		return err
	}
	if o.issuerURL != "" && o.tokenFile != "" {
		return errors.New("-token-file mints with the built-in issuer; it cannot be used with -issuer-url")
	}
	if o.jwksURL != "" && o.issuerURL == "" {
		return errors.New("-jwks-url needs -issuer-url")
	}
	logger := log.New(stderr, "fakests: ", log.LstdFlags|log.LUTC)

	ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
	defer stop()

	stsLn, err := net.Listen("tcp", o.stsListen)
	if err != nil {
		return err
	}
	listeners := []net.Listener{stsLn}
	defer func() {
		for _, ln := range listeners {
			ln.Close()
		}
	}()
	cfg := sts.Config{Audience: o.audience, IssuerURL: o.issuerURL, JWKSURL: o.jwksURL}
	var iss *oidc.Issuer
	var issHandler http.Handler
	if o.issuerURL == "" {
		issLn, err := net.Listen("tcp", o.issuerListen)
		if err != nil {
			return err
		}
		listeners = append(listeners, issLn)
		if iss, err = oidc.New(oidc.Options{URL: "http://" + issLn.Addr().String()}); err != nil {
			return err
		}
		cfg.Issuer, issHandler = iss, iss.Handler()
	}
	if len(o.trust) > 0 {
		cfg.RoleARN = o.trust[0].role
	}
	fake := sts.New(cfg)
	fake.SetMode(mode)
	fake.SetDelay(o.delay)
	fake.SetSessionLength(o.sessionLength)
	for _, t := range o.trust {
		fake.SetTrust(t.role, sts.Trust{Subjects: t.subjects, TagSession: true})
	}

	if o.instanceDir != "" {
		if err := makeInstance(fake, o, logger); err != nil {
			return err
		}
	}

	handlers := []http.Handler{logCalls(fake, logger)}
	if issHandler != nil {
		handlers = append(handlers, issHandler)
	}
	var servers []*http.Server
	errc := make(chan error, len(handlers))
	for i, h := range handlers {
		srv := &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second}
		servers = append(servers, srv)
		ln := listeners[i]
		go func() { errc <- srv.Serve(ln) }()
	}
	if iss != nil {
		logger.Printf("issuer %s (jwks %s/jwks); sts http://%s (audience %s, session length %s, mode %s)",
			iss.URL(), iss.URL(), stsLn.Addr(), o.audience, o.sessionLength, mode)
	} else {
		logger.Printf("sts http://%s trusting the issuer %s (discovery and JWKS fetched on every call; audience %s, session length %s, mode %s); trust: %s",
			stsLn.Addr(), o.issuerURL, o.audience, o.sessionLength, mode, &o.trust)
	}

	writeToken := func() error {
		if o.tokenFile == "" {
			return nil
		}
		tok := iss.Mint(oidc.Claims{Subject: o.subject, Audience: []string{o.audience}})
		if err := oidc.WriteTokenFile(o.tokenFile, tok); err != nil {
			return err
		}
		logger.Printf("token: wrote %s (sub=%s, valid 1h)", o.tokenFile, o.subject)
		return nil
	}
	if err := writeToken(); err != nil {
		return err
	}
	var tick <-chan time.Time
	if o.tokenFile != "" && o.tokenRefresh > 0 {
		t := time.NewTicker(o.tokenRefresh)
		defer t.Stop()
		tick = t.C
	}

	var runErr error
loop:
	for {
		select {
		case <-ctx.Done():
			break loop
		case err := <-errc:
			runErr = err
			break loop
		case <-tick:
			if err := writeToken(); err != nil {
				logger.Printf("token: %v", err)
			}
		}
	}
	logger.Printf("shutting down")
	fake.Close()
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	for _, s := range servers {
		_ = s.Shutdown(sctx)
	}
	if runErr != nil && !errors.Is(runErr, http.ErrServerClosed) {
		return runErr
	}
	return nil
}

// instanceFacts is DIR/instance.json: what the instance is, no secret.
type instanceFacts struct {
	AccountID          string    `json:"accountId"`
	InstanceID         string    `json:"instanceId"`
	Region             string    `json:"region"`
	PendingTime        time.Time `json:"pendingTime"`
	InstanceProfileARN string    `json:"instanceProfileArn"`
	ProfileRoleARN     string    `json:"profileRoleArn"`
	CredentialsExpire  time.Time `json:"credentialsExpire"`
}

// makeInstance makes the stand-in instance, has fake issue its instance
// profile's credentials, and writes the files of -instance-dir.
func makeInstance(fake *sts.Server, o options, logger *log.Logger) error {
	in, err := instance.New(instance.Options{AccountID: o.instanceAccount, Region: o.instanceRegion, ProfileRole: o.instanceRole})
	if err != nil {
		return err
	}
	is, err := fake.IssueSession(in.ProfileRoleARN(), in.InstanceID, o.instanceCredentials)
	if err != nil {
		return err
	}
	in.Credentials = instance.Credentials{AccessKeyID: is.AccessKeyID, SecretAccessKey: is.SecretAccessKey,
		SessionToken: is.SessionToken, Expiration: is.Expiration}
	if err := os.MkdirAll(o.instanceDir, 0o700); err != nil {
		return err
	}
	if err := in.CA.WriteCert(filepath.Join(o.instanceDir, "iid-ca.pem")); err != nil {
		return err
	}
	facts, _ := json.MarshalIndent(instanceFacts{AccountID: in.AccountID, InstanceID: in.InstanceID, Region: in.Region,
		PendingTime: in.PendingTime, InstanceProfileARN: in.InstanceProfileARN(), ProfileRoleARN: in.ProfileRoleARN(),
		CredentialsExpire: is.Expiration}, "", "  ")
	if err := os.WriteFile(filepath.Join(o.instanceDir, "instance.json"), append(facts, '\n'), 0o644); err != nil {
		return err
	}
	// Last: its appearance says the directory is complete.
	if err := in.WriteAEMMConfig(o.instanceDir); err != nil {
		return err
	}
	logger.Printf("instance: %s in account %s, %s, launched %s; instance profile %s (credentials %s until %s); wrote %s",
		in.InstanceID, in.AccountID, in.Region, in.PendingTime.Format(time.RFC3339), in.ProfileRoleARN(),
		is.AccessKeyID, is.Expiration.Format(time.RFC3339), filepath.Join(o.instanceDir, instance.AEMMConfigFile))
	return nil
}

// logCalls serves fake and logs one line per call: the action, the role,
// session and token subject, key id and tags, and the outcome. Never a
// secret. What a call did is read from its own request and answer, so that
// concurrent calls are told apart.
func logCalls(fake *sts.Server, logger *log.Logger) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rec := &statusRecorder{ResponseWriter: w, status: 200}
		fake.Handler().ServeHTTP(rec, r)
		action := r.Form.Get("Action") // the fake parsed the form of r
		var answer struct {
			AccessKeyID string `xml:"AssumeRoleWithWebIdentityResult>Credentials>AccessKeyId"`
			AssumedKey  string `xml:"AssumeRoleResult>Credentials>AccessKeyId"`
			CallerARN   string `xml:"GetCallerIdentityResult>Arn"`
			Code        string `xml:"Error>Code"`
		}
		_ = xml.Unmarshal(rec.body.Bytes(), &answer)
		key := answer.AccessKeyID + answer.AssumedKey
		switch {
		case answer.Code != "" || rec.status != http.StatusOK:
			logger.Printf("sts: %s role=%s session=%s -> %d %s", action, r.Form.Get("RoleArn"), r.Form.Get("RoleSessionName"), rec.status, answer.Code)
		case action == sts.ActionGetCallerIdentity:
			logger.Printf("sts: GetCallerIdentity -> %d %s", rec.status, answer.CallerARN)
		case key != "":
			is, _ := fake.Find(key)
			logger.Printf("sts: %s role=%s session=%s duration=%d sub=%s kid=%s alg=%s tags=%s -> %d access_key_id=%s expires=%s",
				action, is.RoleARN, is.RoleSessionName, is.DurationSeconds, is.Subject, is.TokenKID, is.TokenAlg, tagList(is),
				rec.status, is.AccessKeyID, is.Expiration.Format(time.RFC3339))
		default:
			logger.Printf("sts: %s %s -> %d", r.Method, r.URL.Path, rec.status)
		}
	})
}

// tagList is "k=v,k2=v2" of the session tags, transitive ones marked *.
func tagList(is sts.Issued) string {
	if len(is.Tags) == 0 {
		return "none"
	}
	keys := make([]string, 0, len(is.Tags))
	for k := range is.Tags {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var parts []string
	for _, k := range keys {
		mark := ""
		if slices.Contains(is.TransitiveTagKeys, k) {
			mark = "*"
		}
		parts = append(parts, k+mark+"="+is.Tags[k])
	}
	return strings.Join(parts, ",")
}

// statusRecorder keeps the status and at most 64 KiB of the body of an
// answer it passes on.
type statusRecorder struct {
	http.ResponseWriter
	status int
	body   bytes.Buffer
}

func (r *statusRecorder) WriteHeader(code int) {
	r.status = code
	r.ResponseWriter.WriteHeader(code)
}

func (r *statusRecorder) Write(b []byte) (int, error) {
	if room := 64<<10 - r.body.Len(); room > 0 {
		r.body.Write(b[:min(len(b), room)])
	}
	return r.ResponseWriter.Write(b)
}
