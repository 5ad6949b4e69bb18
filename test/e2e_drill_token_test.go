package test

// Drills of the identity token file: missing, empty, garbage, expired (the
// generic drill), and replaced atomically without pause.

import (
	"fmt"
	"net/http"
	"os"
	"sync/atomic"
	"testing"
	"time"

	"github.com/imdsproxy/imdsproxy/test/fakes/oidc"
)

// writeTokenRaw replaces the token file atomically with content.
func (e *daemonEnv) writeTokenRaw(t *testing.T, content string) {
	t.Helper()
	if err := oidc.WriteTokenFile(e.tokenFile, content); err != nil {
		t.Fatal(err)
	}
}

func tokenDrill(name, reason string, permanent bool, inject func(t *testing.T, e *daemonEnv)) drillFault {
	return drillFault{
		name:   name,
		inject: inject,
		clear:  func(t *testing.T, e *daemonEnv) { e.rotateToken(t) },
		class:  "identity", permanent: permanent, code: "InvalidIdentityToken",
		stsPerFetch: 0, // refused locally: STS is never called with it
		logged: func(e *daemonEnv) bool {
			return e.drillLogged("identity token refused", map[string]any{"reason": reason})
		},
	}
}

// tokenDrills: the JWT file missing, empty, garbage, expired.
func tokenDrills() []drillFault {
	return []drillFault{
		tokenDrill("missing", "missing", false, func(t *testing.T, e *daemonEnv) {
			if err := os.Remove(e.tokenFile); err != nil {
				t.Fatal(err)
			}
		}),
		tokenDrill("empty", "empty", true, func(t *testing.T, e *daemonEnv) { e.writeTokenRaw(t, "\n") }),
		tokenDrill("garbage", "malformed", true, func(t *testing.T, e *daemonEnv) {
			e.writeTokenRaw(t, "<html><body>502 Bad Gateway</body></html>\n")
		}),
		tokenDrill("expired", "expired", true, func(t *testing.T, e *daemonEnv) {
			jwt := e.issuer.MintExpired("host-1")
			e.mu.Lock()
			e.jwts = append(e.jwts, jwt)
			e.mu.Unlock()
			e.writeTokenRaw(t, jwt)
		}),
	}
}

// drillTokenReplaced: the token agent replaces the file the documented way
// (write a temporary file, rename it) without pause while the daemon
// refreshes (8 s sessions: a refresh every ~4 s). The daemon must never
// send anything but a whole token: STS rejects no call and receives only
// tokens the agent wrote.
func drillTokenReplaced(t *testing.T) {
	const session = 8 * time.Second
	opts := drillOptions()
	opts.sessionLength = session
	e := startDaemon(t, opts)
	callsBefore, tokensBefore := e.sts.Calls(), len(e.sts.WebIdentityTokens())

	// A pool of valid tokens, minted once (RS256 signing is slow).
	pool := make([]string, 8)
	for i := range pool {
		pool[i] = e.issuer.Mint(oidc.Claims{Subject: "host-1"})
	}
	e.mu.Lock()
	e.jwts = append(e.jwts, pool...)
	e.mu.Unlock()

	stopWriter := make(chan struct{})
	var writes atomic.Int64
	writerDone := make(chan error, 1)
	go func() {
		writerDone <- func() error {
			for i := 0; ; i++ {
				select {
				case <-stopWriter:
					return nil
				default:
				}
				if err := oidc.WriteTokenFile(e.tokenFile, pool[i%len(pool)]); err != nil {
					return err
				}
				writes.Add(1)
				time.Sleep(2 * time.Millisecond)
			}
		}()
	}()

	// Three refreshes or so.
	s := e.drillServe(t, time.Now().Add(14*time.Second), drillClients{})
	close(stopWriter)
	if err := <-writerDone; err != nil {
		t.Fatalf("token writer: %v", err)
	}
	s.check(t, "atomic rewrites")
	if len(s.keys) < 3 {
		t.Errorf("clients saw %d credentials in 14 s of %v sessions, want >= 3 (refreshes kept working)", len(s.keys), session)
	}
	rejected := e.drillRejected(callsBefore)
	failures := e.scrape(t).Sum("imdsproxy_cache_refreshes_total", map[string]string{"result": "failure"})
	t.Logf("%d file rewrites; %d STS calls, rejected: %v; refresh failures: %v", writes.Load(), e.sts.Calls()-callsBefore, rejected, failures)
	if len(rejected) > 0 || failures > 0 {
		t.Errorf("with atomic replacement the daemon read a partial token: STS rejected %v, %v refresh failures", rejected, failures)
	}
	e.drillCheckSentTokens(t, tokensBefore)
}

// drillRejected lists the STS calls since call number from that did not
// succeed, as "status code".
func (e *daemonEnv) drillRejected(from int) []string {
	var rejected []string
	for _, c := range e.sts.CallLog()[from:] {
		if c.Status != http.StatusOK {
			rejected = append(rejected, fmt.Sprintf("%d %s", c.Status, c.Code))
		}
	}
	return rejected
}

// drillCheckSentTokens fails t unless every web identity token STS received
// since token number from (accepted or not) is one the agent wrote whole.
func (e *daemonEnv) drillCheckSentTokens(t *testing.T, from int) {
	t.Helper()
	sent := e.sts.WebIdentityTokens()[from:]
	for i, tok := range sent {
		if !e.drillWrote(tok) {
			t.Errorf("STS received a token the agent never wrote whole (call %d of %d, %d bytes): a torn read reached STS", i+1, len(sent), len(tok))
		}
	}
	if len(sent) == 0 {
		t.Errorf("STS received no token at all")
	}
}
