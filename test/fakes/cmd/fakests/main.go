// Command fakests runs the fake OIDC issuer and the fake STS of
// test/fakes on loopback, for `make demo` and manual testing of imdsproxy.
//
// It writes a fresh JWT to -token-file (if given) and rewrites it every
// -token-refresh with one hour of validity, logs one line per STS call (never
// a secret), and stops cleanly on SIGINT or SIGTERM. Point the daemon at it
// with AWS_ENDPOINT_URL_STS=http://<sts-listen>.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

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
}

func run(ctx context.Context, args []string, stderr io.Writer) error {
	var o options
	fs := flag.NewFlagSet("fakests", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&o.stsListen, "sts-listen", "127.0.0.1:8190", "address of the fake STS")
	fs.StringVar(&o.issuerListen, "issuer-listen", "127.0.0.1:8191", "address of the fake OIDC issuer")
	fs.StringVar(&o.tokenFile, "token-file", "", "write a JWT here and keep it fresh (empty: do not)")
	fs.DurationVar(&o.tokenRefresh, "token-refresh", 5*time.Minute, "how often the token file is rewritten")
	fs.StringVar(&o.audience, "audience", oidc.DefaultAudience, "audience of minted tokens and required by STS")
	fs.StringVar(&o.subject, "subject", "host-1", "sub claim of minted tokens")
	fs.DurationVar(&o.sessionLength, "session-length", time.Hour, "length of issued sessions, whatever DurationSeconds asks (0: honour DurationSeconds)")
	fs.DurationVar(&o.delay, "delay", 0, "latency added to every STS answer")
	fs.StringVar(&o.mode, "mode", "ok", "STS mode: ok, fail5xx, unavailable, throttle, hang, idp-error, invalid-token, expired-token, access-denied")
	if err := fs.Parse(args); err != nil {
		return err
	}
	mode, err := sts.ParseMode(o.mode)
	if err != nil {
		return err
	}
	logger := log.New(stderr, "fakests: ", log.LstdFlags|log.LUTC)

	ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
	defer stop()

	issLn, err := net.Listen("tcp", o.issuerListen)
	if err != nil {
		return err
	}
	stsLn, err := net.Listen("tcp", o.stsListen)
	if err != nil {
		issLn.Close()
		return err
	}
	iss, err := oidc.New(oidc.Options{URL: "http://" + issLn.Addr().String()})
	if err != nil {
		return err
	}
	fake := sts.New(sts.Config{Issuer: iss, Audience: o.audience})
	fake.SetMode(mode)
	fake.SetDelay(o.delay)
	fake.SetSessionLength(o.sessionLength)

	stsHandler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		before := fake.Calls()
		rec := &statusRecorder{ResponseWriter: w, status: 200}
		fake.Handler().ServeHTTP(rec, r)
		if fake.Calls() == before {
			logger.Printf("sts: %s %s -> %d (not AssumeRoleWithWebIdentity)", r.Method, r.URL.Path, rec.status)
			return
		}
		log := fake.CallLog()
		c := log[len(log)-1]
		if c.Code == "" {
			last, _ := fake.Last()
			logger.Printf("sts: AssumeRoleWithWebIdentity role=%s session=%s duration=%d -> %d access_key_id=%s expires=%s",
				c.RoleARN, c.RoleSessionName, c.DurationSeconds, rec.status, last.AccessKeyID, last.Expiration.Format(time.RFC3339))
		} else {
			logger.Printf("sts: AssumeRoleWithWebIdentity role=%s session=%s duration=%d -> %d %s",
				c.RoleARN, c.RoleSessionName, c.DurationSeconds, rec.status, c.Code)
		}
	})

	servers := []*http.Server{
		{Handler: iss.Handler(), ReadHeaderTimeout: 5 * time.Second},
		{Handler: stsHandler, ReadHeaderTimeout: 5 * time.Second},
	}
	errc := make(chan error, 2)
	for i, ln := range []net.Listener{issLn, stsLn} {
		go func() { errc <- servers[i].Serve(ln) }()
	}
	logger.Printf("issuer %s (jwks %s/jwks); sts http://%s (audience %s, session length %s, mode %s)",
		iss.URL(), iss.URL(), stsLn.Addr(), o.audience, o.sessionLength, mode)

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

type statusRecorder struct {
	http.ResponseWriter
	status int
}

func (r *statusRecorder) WriteHeader(code int) {
	r.status = code
	r.ResponseWriter.WriteHeader(code)
}
