package test

// The drill of a token file rewritten in place, torn just before each
// refresh.

import (
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/imdsproxy/imdsproxy/test/e2e"
	"github.com/imdsproxy/imdsproxy/test/fakes/oidc"
)

// Timing of drillTokenInPlace.
const (
	inPlaceSession = drillSession // a refresh every 9 to 11 s, 18 s of servable life
	inPlaceCycles  = 3
	// inPlaceLead: the file is torn this long before the refresh is due
	// (next_refresh is whole seconds, so 0.5 to 1.5 s before it happens).
	inPlaceLead = 1500 * time.Millisecond
	// inPlaceTornReads: the file stays torn until the daemon refused it this
	// many times (the refresh and its retry: normally within 3.5 s), or
	// inPlaceMaxHold passed (well below token.SettleTime, 10 s, after which
	// a file's content counts as final), or the cached credentials have
	// less than inPlaceRepairSlack of servable life left (so that a test
	// machine too loaded to retry in time does not run them out).
	inPlaceTornReads   = 2
	inPlaceMaxHold     = 6 * time.Second
	inPlaceRepairSlack = 4 * time.Second
)

// drillTokenInPlace: a careless token agent truncates the token file and
// writes the new token in two steps, stopping half-way just before each
// refresh is due and staying stopped until the daemon has read the torn file
// twice (the refresh and its retry). It stops in turn inside the signature
// (what is there still parses as a JWT), inside the payload, and before
// writing anything. The daemon must:
//
//   - never send STS anything but a whole token (it refuses the torn file
//     as token reason "changing", class identity, transient);
//   - keep serving valid credentials, fast, with /readyz 200 throughout
//     (the error is retryable and valid credentials remain);
//   - show the cause while the file is torn (/debug/cache, the metrics
//     imdsproxy_identity_token_reads_total{result="changing"} and
//     imdsproxy_cache_refreshes_total{class="identity"}, the log);
//   - refresh by itself once the agent has finished, every cycle.
func drillTokenInPlace(t *testing.T) {
	opts := drillOptions()
	opts.sessionLength = inPlaceSession
	e := startDaemon(t, opts)
	callsBefore, tokensBefore := e.sts.Calls(), len(e.sts.WebIdentityTokens())
	issuedBefore := len(e.sts.Issued())

	pool := make([]string, inPlaceCycles)
	for i := range pool {
		pool[i] = e.issuer.Mint(oidc.Claims{Subject: "host-1"})
	}
	e.mu.Lock()
	e.jwts = append(e.jwts, pool...)
	e.mu.Unlock()

	var mu sync.Mutex
	var cycles []tornCycle
	// One cycle per refresh: 3 refreshes of a 20 s session take about 38 s
	// (each refresh is due 9 to 11 s after the previous success, which
	// follows the repair by 2 to 3.5 s).
	until := time.Now().Add(time.Duration(inPlaceCycles)*inPlaceSession*3/4 + 10*time.Second)
	writerDone := make(chan error, 1)
	go func() {
		writerDone <- func() error {
			for i := range inPlaceCycles {
				// The refresh due next, once the daemon has scheduled it
				// after the previous success.
				var next time.Time
				for {
					var err error
					if next, err = e.drillNextRefresh(); err != nil {
						return err
					}
					if time.Until(next) > inPlaceLead+500*time.Millisecond {
						break
					}
					if time.Now().After(until) {
						return fmt.Errorf("cycle %d: no refresh scheduled ahead (next %s)", i+1, next.Format(time.RFC3339))
					}
					time.Sleep(100 * time.Millisecond)
				}
				time.Sleep(time.Until(next.Add(-inPlaceLead)))
				issued := len(e.sts.Issued())
				last, _ := e.sts.Last()
				c, err := e.drillTearToken(pool[i], i, last.Expiration.Add(-drillMargin-inPlaceRepairSlack))
				if err != nil {
					return err
				}
				mu.Lock()
				cycles = append(cycles, c)
				mu.Unlock()
				// Wait for the refresh that follows the repair.
				for len(e.sts.Issued()) == issued {
					if time.Now().After(until) {
						return fmt.Errorf("cycle %d: no credentials issued after the token was written whole", i+1)
					}
					time.Sleep(50 * time.Millisecond)
				}
			}
			return nil
		}()
	}()

	// Clients fetch credentials in windows of 2 s until one window after the
	// writer is done (so that they see the credentials of its last cycle).
	stop := make(chan struct{})
	rz := e.watchReadyz(stop)
	s := &drillStats{}
	for finished := false; ; {
		s.merge(e.drillServe(t, time.Now().Add(2*time.Second), drillClients{}))
		if finished || time.Now().After(until.Add(5*time.Second)) { // the writer gives up at until
			break
		}
		select {
		case err := <-writerDone:
			finished = true
			if err != nil {
				t.Errorf("token writer: %v", err)
			}
		default:
		}
	}
	close(stop)
	s.check(t, "in-place rewrites")
	if bad := rz.notOK(); len(bad) > 0 {
		t.Errorf("/readyz not 200 while valid credentials were cached and the error is retryable: %v", bad[:min(len(bad), 3)])
	}

	// Every cycle: the daemon read the torn file (at least twice) and said
	// why while it was torn.
	mu.Lock()
	defer mu.Unlock()
	if len(cycles) != inPlaceCycles {
		t.Errorf("%d torn-write cycles done, want %d", len(cycles), inPlaceCycles)
	}
	for i, c := range cycles {
		t.Logf("cycle %d: torn %s for %v, refused as changing %v times; /debug/cache meanwhile: %s", i+1, c.cut, c.held.Round(time.Millisecond), c.tornReads, c.debugCache)
		if c.tornReads < inPlaceTornReads {
			t.Errorf("cycle %d (%s): the daemon refused the torn file %v times, want >= %d", i+1, c.cut, c.tornReads, inPlaceTornReads)
		}
		if c.debugCache != "identity, names changing" {
			t.Errorf("cycle %d (%s): /debug/cache while torn: %s, want class identity naming the reason changing", i+1, c.cut, c.debugCache)
		}
	}

	// STS saw only whole tokens, and no call failed.
	e.drillCheckSentTokens(t, tokensBefore)
	rejected := e.drillRejected(callsBefore)
	if len(rejected) > 0 {
		t.Errorf("STS rejected %v during in-place rewrites: a torn token reached it", rejected)
	}
	// Upstream calls stayed bounded: one per successful refresh.
	issued := len(e.sts.Issued()) - issuedBefore
	if calls := e.sts.Calls() - callsBefore; calls != issued {
		t.Errorf("%d STS calls for %d credentials issued", calls, issued)
	}
	if issued < inPlaceCycles {
		t.Errorf("%d refreshes succeeded, want >= %d (one after each repair)", issued, inPlaceCycles)
	}
	if len(s.keys) < inPlaceCycles+1 {
		t.Errorf("clients saw %d credentials, want >= %d (the first and one per cycle)", len(s.keys), inPlaceCycles+1)
	}

	// The cause in metrics and log.
	m := e.scrape(t)
	changing := m.Sum("imdsproxy_identity_token_reads_total", map[string]string{"result": "changing"})
	failures := m.Sum("imdsproxy_cache_refreshes_total", map[string]string{"result": "failure"})
	identity := e.refreshFailures(t, "identity")
	t.Logf("STS calls %d, credentials issued %d; token reads refused as changing %v; refresh failures %v (identity %v)", e.sts.Calls()-callsBefore, issued, changing, failures, identity)
	if changing < inPlaceCycles*inPlaceTornReads {
		t.Errorf(`imdsproxy_identity_token_reads_total{result="changing"} = %v, want >= %d`, changing, inPlaceCycles*inPlaceTornReads)
	}
	if identity < inPlaceCycles*inPlaceTornReads || failures != identity {
		t.Errorf("refresh failures %v, of class identity %v; want only identity failures, >= %d", failures, identity, inPlaceCycles*inPlaceTornReads)
	}
	if !e.drillLogged("identity token refused", map[string]any{"reason": "changing"}) {
		t.Errorf(`no "identity token refused" log line with reason changing`)
	}
	if !e.drillLogged("credential refresh failed", map[string]any{"class": "identity", "permanent": false, "serving_last_good": true}) {
		t.Errorf(`no "credential refresh failed" log line naming class identity (transient, serving_last_good)`)
	}
}

// tornCycle is what one torn write of drillTokenInPlace saw.
type tornCycle struct {
	cut        string        // where the writer stopped
	tornReads  float64       // refusals as "changing" while the file was torn
	held       time.Duration // how long the file stayed torn
	debugCache string        // the /debug/cache error class while torn, ", names changing" when its error does
}

// drillNextRefresh returns the next refresh of the only cache entry, from
// /debug/cache (whole seconds).
func (e *daemonEnv) drillNextRefresh() (time.Time, error) {
	st, body, err := e2e.GetURL(e.adminURL + "/debug/cache")
	if err != nil || st != http.StatusOK {
		return time.Time{}, fmt.Errorf("GET /debug/cache: %d %v", st, err)
	}
	var dc struct {
		Entries []struct {
			NextRefresh string `json:"next_refresh"`
		} `json:"entries"`
	}
	if err := json.Unmarshal([]byte(body), &dc); err != nil || len(dc.Entries) != 1 {
		return time.Time{}, fmt.Errorf("/debug/cache: %v, %d entries", err, len(dc.Entries))
	}
	return time.Parse(time.RFC3339, dc.Entries[0].NextRefresh)
}

// drillTearToken rewrites the token file in place with jwt the hostile way:
// O_TRUNC, write a part, stay stopped until the daemon has refused the torn
// file inPlaceTornReads times (or inPlaceMaxHold, or releaseBy), write the
// rest. Where it stops depends on n: inside the signature at a multiple of
// 4 base64url characters (so what is there still parses), inside the
// payload, or before writing anything.
func (e *daemonEnv) drillTearToken(jwt string, n int, releaseBy time.Time) (c tornCycle, err error) {
	sigStart := strings.LastIndexByte(jwt, '.') + 1
	payloadStart := strings.IndexByte(jwt, '.') + 1
	var cut int
	switch n % 3 {
	case 0:
		c.cut, cut = "inside the signature", sigStart+(len(jwt)-sigStart)/4*4-16
	case 1:
		c.cut, cut = "inside the payload", (payloadStart+sigStart)/2
	default:
		c.cut, cut = "before anything", 0
	}
	changing := func() (float64, error) {
		m, _, err := e2e.ScrapeMetrics(e2e.Client, e.adminURL)
		if err != nil {
			return 0, err
		}
		return m.Sum("imdsproxy_identity_token_reads_total", map[string]string{"result": "changing"}), nil
	}
	base, err := changing()
	if err != nil {
		return c, err
	}
	f, err := os.OpenFile(e.tokenFile, os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return c, err
	}
	defer f.Close()
	torn := time.Now()
	if _, err := f.WriteString(jwt[:cut]); err != nil {
		return c, err
	}
	for time.Since(torn) < inPlaceMaxHold && time.Now().Before(releaseBy) {
		time.Sleep(50 * time.Millisecond)
		now, err := changing()
		if err != nil {
			return c, err
		}
		c.tornReads = now - base
		if c.tornReads >= 1 && c.debugCache == "" {
			dc, body := struct {
				Entries []struct {
					LastError  string `json:"last_error"`
					ErrorClass string `json:"error_class"`
				} `json:"entries"`
			}{}, ""
			if st, b, err := e2e.GetURL(e.adminURL + "/debug/cache"); err == nil && st == http.StatusOK {
				body = b
			}
			if json.Unmarshal([]byte(body), &dc) == nil && len(dc.Entries) == 1 {
				c.debugCache = dc.Entries[0].ErrorClass
				if strings.Contains(dc.Entries[0].LastError, ": changing: ") {
					c.debugCache += ", names changing"
				}
			}
		}
		if c.tornReads >= inPlaceTornReads {
			break
		}
	}
	c.held = time.Since(torn)
	if _, err := f.WriteString(jwt[cut:]); err != nil {
		return c, err
	}
	return c, f.Close()
}

// drillWrote reports whether jwt is one of the tokens written to the file.
func (e *daemonEnv) drillWrote(jwt string) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, j := range e.jwts {
		if j == jwt {
			return true
		}
	}
	return false
}
