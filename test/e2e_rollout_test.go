package test

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/imdsproxy/imdsproxy/test/e2e"
	"github.com/imdsproxy/imdsproxy/test/fakes/s3"
	"github.com/imdsproxy/imdsproxy/test/fakes/sts"
)

// The host of the rollout tests, as the stand-in IMDS describes it.
const (
	roInstanceID = "i-0rollout1234567ab"
	// roBucket is roInstanceID's canary bucket, fixed here rather than
	// computed with rollout.Bucket, so that a change of the bucket function
	// (which would move hosts between canary and not) fails the test:
	// big-endian uint64 of the first 8 bytes of SHA-256("i-0rollout1234567ab"),
	// mod 10000.
	roBucket     = 6380
	roGroup      = "api-asg"
	roGroupTag   = "aws:autoscaling:groupName"
	roBucketName = "fleet-config"
	roObjectKey  = "imdsproxy/rollout.yaml"
)

// roUpstream is a stand-in for the real IMDS of a host in an Auto Scaling
// group: IMDSv2 only, valid instance-profile credentials (the role listing,
// the document and iam/info), the instance id and the instance's tags in
// metadata (the group tag, whose key contains ':', answered whether the
// client path-escapes it or not).
type roUpstream struct {
	url     string
	key     string
	secret  string
	token   string
	expires time.Time

	mu     sync.Mutex
	tokens map[string]time.Time
}

func startRolloutUpstream(t *testing.T) *roUpstream {
	t.Helper()
	u := &roUpstream{
		key:     "ASIAROLLOUT" + strings.ToUpper(strings.NewReplacer("+", "A", "/", "B", "=", "C").Replace(arRandB64(t, 9))),
		secret:  arRandB64(t, 30),
		token:   "IQoJb3JpZ2luX2VjEInstanceProfile" + arRandB64(t, 300),
		expires: time.Now().Add(6 * time.Hour).UTC().Truncate(time.Second),
		tokens:  map[string]time.Time{},
	}
	mux := http.NewServeMux()
	mux.HandleFunc("PUT /latest/api/token", func(w http.ResponseWriter, r *http.Request) {
		ttl, err := strconv.Atoi(r.Header.Get("X-aws-ec2-metadata-token-ttl-seconds"))
		if err != nil || ttl < 1 || ttl > 21600 {
			http.Error(w, "bad ttl", http.StatusBadRequest)
			return
		}
		tok := arRandB64(t, 24)
		u.mu.Lock()
		u.tokens[tok] = time.Now().Add(time.Duration(ttl) * time.Second)
		u.mu.Unlock()
		w.Header().Set("X-aws-ec2-metadata-token-ttl-seconds", strconv.Itoa(ttl))
		_, _ = io.WriteString(w, tok)
	})
	authorized := func(w http.ResponseWriter, r *http.Request) bool {
		u.mu.Lock()
		exp, ok := u.tokens[r.Header.Get("X-aws-ec2-metadata-token")]
		u.mu.Unlock()
		if !ok || time.Now().After(exp) {
			http.Error(w, "401 - Unauthorized", http.StatusUnauthorized)
			return false
		}
		return true
	}
	serve := func(body func() string) http.HandlerFunc {
		return func(w http.ResponseWriter, r *http.Request) {
			if authorized(w, r) {
				_, _ = io.WriteString(w, body())
			}
		}
	}
	const p = "GET /latest/meta-data/"
	mux.HandleFunc(p+"iam/security-credentials/", serve(func() string { return ipUpstreamRole }))
	mux.HandleFunc(p+"iam/security-credentials/"+ipUpstreamRole, serve(func() string {
		return ipCredentialDocument(u.key, u.secret, u.token, u.expires)
	}))
	mux.HandleFunc(p+"iam/info", serve(func() string {
		return ipInfoDocument()
	}))
	mux.HandleFunc(p+"instance-id", serve(func() string { return roInstanceID }))
	mux.HandleFunc(p+"placement/region", serve(func() string { return "us-east-1" }))
	// Tags in metadata: the listing and one value per key. r.URL.Path is
	// unescaped, so "aws%3Aautoscaling%3AgroupName" and the raw key match.
	mux.HandleFunc(p+"tags/instance/", func(w http.ResponseWriter, r *http.Request) {
		if !authorized(w, r) {
			return
		}
		switch strings.TrimPrefix(r.URL.Path, "/latest/meta-data/tags/instance/") {
		case "":
			_, _ = io.WriteString(w, roGroupTag+"\nName")
		case roGroupTag:
			_, _ = io.WriteString(w, roGroup)
		case "Name":
			_, _ = io.WriteString(w, "api-1")
		default:
			http.NotFound(w, r)
		}
	})
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	u.url = srv.URL
	return u
}

func (u *roUpstream) secrets() map[string]string {
	return map[string]string{
		"instance-profile SecretAccessKey": u.secret,
		"instance-profile Token":           u.token,
		"instance-profile Token (middle)":  u.token[len(u.token)/2-16 : len(u.token)/2+16],
	}
}

// roOptions configures one daemon of the rollout tests.
type roOptions struct {
	policy        string        // rollout.policy
	pollInterval  time.Duration // default 1h: only start and SIGHUP read the policy
	fallback      string        // default none
	sessionLength time.Duration // fake STS sessions
	extraEnv      []string
	s3            *s3.Server // allowed the instance profile's key when set
}

// startRolloutDaemon starts the daemon with the web-identity workload role,
// the rollout section and up as its upstream IMDS.
func startRolloutDaemon(t *testing.T, up *roUpstream, o roOptions) *daemonEnv {
	t.Helper()
	if o.pollInterval == 0 {
		o.pollInterval = time.Hour
	}
	if o.fallback == "" {
		o.fallback = "none"
	}
	if o.s3 != nil {
		o.s3.AllowSigned(up.key, up.secret, up.token)
		o.extraEnv = append(o.extraEnv, "AWS_ENDPOINT_URL_S3="+o.s3.URL)
	}
	return startDaemon(t, envOptions{
		upstreamURL:   up.url,
		sessionLength: o.sessionLength,
		extraEnv:      o.extraEnv,
		extraSecrets:  up.secrets,
		identityYAML: func(e *daemonEnv) string {
			return e.defaultIdentity() + fmt.Sprintf(`rollout:
  policy: %q
  poll_interval: %s
  group_tag: %q
  group: ""
  fallback: %s
  shadow_interval: 1s
`, o.policy, o.pollInterval, roGroupTag, o.fallback)
		},
	})
}

// roPolicy renders a policy giving roGroup the stage (off, shadow, on,
// {canary: N%}).
func roPolicy(version, stage string) string {
	return fmt.Sprintf("version: %q\nkill_switch: false\ndefault: off\ngroups:\n  %s: %s\n  other-asg: on\n", version, roGroup, stage)
}

// writePolicyFile replaces path atomically.
func writePolicyFile(t *testing.T, path, doc string) {
	t.Helper()
	if err := os.WriteFile(path+".tmp", []byte(doc), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(path+".tmp", path); err != nil {
		t.Fatal(err)
	}
}

// served is one credential fetch the way SDKs do it: the listing, then the
// document of the listed role.
type served struct {
	listed string
	doc    e2e.CredDoc
}

func (e *daemonEnv) roFetch(ctx context.Context) (served, error) {
	tok, err := e2e.IMDSToken(ctx, e2e.Client, e.imdsURL, 300)
	if err != nil {
		return served{}, err
	}
	st, name, err := e2e.IMDSGet(ctx, e2e.Client, e.imdsURL, "/latest/meta-data/iam/security-credentials/", tok)
	if err != nil || st != http.StatusOK {
		return served{}, fmt.Errorf("listing: %d %v", st, err)
	}
	st, body, err := e2e.IMDSGet(ctx, e2e.Client, e.imdsURL, "/latest/meta-data/iam/security-credentials/"+name, tok)
	if err != nil {
		return served{listed: name}, err
	}
	var d e2e.CredDoc
	if jerr := json.Unmarshal([]byte(body), &d); jerr != nil {
		return served{listed: name}, fmt.Errorf("document of %s: %d, not JSON: %v", name, st, jerr)
	}
	if st != http.StatusOK || d.Code != "Success" {
		return served{listed: name, doc: d}, fmt.Errorf("document of %s: %d Code %q", name, st, d.Code)
	}
	return served{listed: name, doc: d}, nil
}

// kindOf tells which credentials an access key id is: the instance
// profile's, the workload role's (issued by the fake STS), or neither.
func kindOf(e *daemonEnv, up *roUpstream, key string) string {
	if key == up.key {
		return "instance-profile"
	}
	if _, ok := e.sts.Find(key); ok {
		return "workload"
	}
	return "unknown"
}

// checkServedKind checks a successful fetch: the credentials are exactly
// the instance profile's or exactly what STS issued, listed under one of the
// two role names. The listing and the document are two requests, so across
// a switch a client may fetch the document of the name listed just before;
// it must still get valid credentials.
func checkServedKind(e *daemonEnv, up *roUpstream, s served) (string, error) {
	return checkServedKindListed(e, up, s, "")
}

// checkServedKindListed is checkServedKind with the one role name the
// credentials must be listed under ("" for either).
func checkServedKindListed(e *daemonEnv, up *roUpstream, s served, listed string) (string, error) {
	if s.listed != ipUpstreamRole && s.listed != e2e.RoleName || listed != "" && s.listed != listed {
		return kindOf(e, up, s.doc.AccessKeyId), fmt.Errorf("credentials listed as %q", s.listed)
	}
	switch kind := kindOf(e, up, s.doc.AccessKeyId); kind {
	case "instance-profile":
		if s.doc.SecretAccessKey != up.secret || s.doc.Token != up.token {
			return kind, fmt.Errorf("instance-profile key %s served with a different secret/token", s.doc.AccessKeyId)
		}
		return kind, nil
	case "workload":
		return kind, e.checkServed(s.doc)
	default:
		return kind, fmt.Errorf("served access key id %q is neither the instance profile's nor issued by STS", s.doc.AccessKeyId)
	}
}

// waitKind polls until the daemon serves credentials of kind; every fetch
// on the way must succeed.
func waitKind(t *testing.T, e *daemonEnv, up *roUpstream, kind string, timeout time.Duration) {
	t.Helper()
	wantListed := map[string]string{"instance-profile": ipUpstreamRole, "workload": e2e.RoleName}[kind]
	waitKindListed(t, e, up, kind, wantListed, timeout)
}

// waitKindListed is waitKind with the role name the credentials of kind must
// end up listed under: a fallback serves the instance profile's in place of
// the workload role's, under the workload role's name, which the decision
// keeps listing.
func waitKindListed(t *testing.T, e *daemonEnv, up *roUpstream, kind, wantListed string, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	last := ""
	for time.Now().Before(deadline) {
		s, err := e.roFetch(context.Background())
		if err != nil {
			t.Fatalf("while waiting for %s credentials: %v", kind, err)
		}
		got, err := checkServedKind(e, up, s)
		if err != nil {
			t.Fatal(err)
		}
		if got == kind && s.listed == wantListed {
			return
		}
		last = got
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("still serving %s credentials after %v, want %s\n%s", last, timeout, kind, e.logTail(40))
}

// clientLoop fetches credentials every 20ms until stopped, as a fleet of
// clients would during a switch, and records every failure.
type clientLoop struct {
	stop  chan struct{}
	done  chan struct{}
	n     atomic.Int64
	mu    sync.Mutex
	fails []string
	kinds map[string]int
}

func startClientLoop(e *daemonEnv, up *roUpstream) *clientLoop {
	l := &clientLoop{stop: make(chan struct{}), done: make(chan struct{}), kinds: map[string]int{}}
	go func() {
		defer close(l.done)
		for {
			select {
			case <-l.stop:
				return
			case <-time.After(20 * time.Millisecond):
			}
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			s, err := e.roFetch(ctx)
			cancel()
			kind := ""
			if err == nil {
				kind, err = checkServedKind(e, up, s)
			}
			l.n.Add(1)
			l.mu.Lock()
			if err != nil {
				l.fails = append(l.fails, err.Error())
			} else {
				l.kinds[kind]++
			}
			l.mu.Unlock()
		}
	}()
	return l
}

// finish stops the loop and fails the test if any request failed or the
// loop did not see every kind in want.
func (l *clientLoop) finish(t *testing.T, want ...string) {
	t.Helper()
	close(l.stop)
	<-l.done
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.fails) > 0 {
		t.Errorf("%d of %d client requests failed during the switch; first: %s", len(l.fails), l.n.Load(), l.fails[0])
	}
	for _, k := range want {
		if l.kinds[k] == 0 {
			t.Errorf("the client loop never got %s credentials (%v)", k, l.kinds)
		}
	}
	t.Logf("client loop: %d requests, %v", l.n.Load(), l.kinds)
}

// roBucketPercents returns a canary percentage that includes this host's
// bucket and the largest one that does not.
func roBucketPercents() (in, out int) {
	return roBucket/100 + 1, roBucket / 100
}

// TestRolloutStages: each stage serves the right credentials to real SDK
// clients, listed under the right role name.
func TestRolloutStages(t *testing.T) {
	t.Parallel()
	in, out := roBucketPercents()
	for _, tc := range []struct {
		name  string
		stage string
		want  string
		boto3 bool
	}{
		{"off", "off", "instance-profile", true},
		{"shadow", "shadow", "instance-profile", false},
		{"canary including this host", fmt.Sprintf("{canary: %d%%}", in), "workload", false},
		{"canary excluding this host", fmt.Sprintf("{canary: %d%%}", out), "instance-profile", false},
		{"canary 0%", "{canary: 0%}", "instance-profile", false},
		{"canary 100%", "{canary: 100%}", "workload", false},
		{"on", "on", "workload", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			up := startRolloutUpstream(t)
			policy := filepath.Join(t.TempDir(), "rollout.yaml")
			writePolicyFile(t, policy, roPolicy("stages-1", tc.stage))
			e := startRolloutDaemon(t, up, roOptions{policy: policy})

			check := func(client string, got clientCreds) {
				t.Helper()
				switch tc.want {
				case "instance-profile":
					if got.AccessKeyId != up.key || got.SecretAccessKey != up.secret || got.SessionToken != up.token {
						t.Fatalf("%s got key %q, want the instance profile's %q", client, got.AccessKeyId, up.key)
					}
				case "workload":
					is, ok := e.sts.Find(got.AccessKeyId)
					if !ok || got.SecretAccessKey != is.SecretAccessKey || got.SessionToken != is.SessionToken {
						t.Fatalf("%s got key %q, which is not exactly what STS issued", client, got.AccessKeyId)
					}
				}
			}
			check("aws-sdk-go-v2", arGoSDKCreds(t, e))
			if tc.boto3 {
				requireClient(t, python3Path, "python3 with boto3 (Debian package python3-boto3)")
				check("boto3", arBoto3Creds(t, e))
			}
			wantListing := map[string]string{"instance-profile": ipUpstreamRole, "workload": e2e.RoleName}[tc.want]
			if got := e.arListing(t); got != wantListing {
				t.Errorf("listing %q, want %q", got, wantListing)
			}
			m := e.scrape(t)
			if v, ok := m.Value("imdsproxy_rollout_served_total", map[string]string{"door": "imds", "kind": tc.want}); !ok || v < 1 {
				t.Errorf("imdsproxy_rollout_served_total{kind=%q} = %v, %v", tc.want, v, ok)
			}
			stageLabel := strings.Fields(strings.Trim(tc.stage, "{}:"))[0]
			stageLabel = strings.TrimSuffix(stageLabel, ":")
			if v, ok := m.Value("imdsproxy_rollout_stage", map[string]string{"stage": stageLabel}); !ok || v != 1 {
				t.Errorf("imdsproxy_rollout_stage{stage=%q} = %v, %v", stageLabel, v, ok)
			}
			if v, ok := m.Value("imdsproxy_rollout_host_info", map[string]string{"group": roGroup, "group_source": "tag"}); !ok || v != 1 {
				t.Errorf("imdsproxy_rollout_host_info{group=%q,group_source=\"tag\"} = %v, %v", roGroup, v, ok)
			}
			if v, _ := m.Value("imdsproxy_rollout_bucket_number", nil); int(v) != roBucket {
				t.Errorf("imdsproxy_rollout_bucket_number = %v, want %d", v, roBucket)
			}

			if tc.stage == "shadow" {
				// The workload credentials are fetched and verified in the
				// background with sts:GetCallerIdentity, signed with them.
				waitMetric(t, e, "imdsproxy_rollout_shadow_verifications_total", map[string]string{"result": "success"}, func(v float64) bool { return v >= 1 }, 15*time.Second)
				if e.sts.CallCount(sts.ActionAssumeRoleWithWebIdentity) == 0 {
					t.Error("shadow: no AssumeRoleWithWebIdentity")
				}
				verified := 0
				for _, c := range e.sts.CallLog() {
					if c.Action != sts.ActionGetCallerIdentity {
						continue
					}
					if _, ok := e.sts.Find(c.AccessKeyID); !ok || !c.SignatureValid || c.Status != http.StatusOK {
						t.Errorf("shadow GetCallerIdentity %+v: want a valid call signed with issued workload credentials", c)
					}
					verified++
				}
				if verified == 0 {
					t.Error("shadow: the fake STS saw no GetCallerIdentity")
				}
				// Still the instance profile's to clients.
				check("aws-sdk-go-v2 (after verification)", arGoSDKCreds(t, e))
			}
			if tc.stage == "off" && e.sts.CallCount(sts.ActionGetCallerIdentity) != 0 {
				t.Error("off: shadow verification ran")
			}
		})
	}
}

// TestRolloutPolicyFileSIGHUP: rewriting the policy file and sending SIGHUP
// moves the host off → on → off without a restart and without a failed
// client request; a bad policy is refused and the old one stays.
func TestRolloutPolicyFileSIGHUP(t *testing.T) {
	t.Parallel()
	up := startRolloutUpstream(t)
	policy := filepath.Join(t.TempDir(), "rollout.yaml")
	writePolicyFile(t, policy, roPolicy("file-1", "off"))
	e := startRolloutDaemon(t, up, roOptions{policy: policy})
	pid := e.proc.Pid()
	waitKind(t, e, up, "instance-profile", 5*time.Second)

	loop := startClientLoop(e, up)
	time.Sleep(200 * time.Millisecond)
	writePolicyFile(t, policy, roPolicy("file-2", "on"))
	e.signal(t, syscall.SIGHUP)
	waitKind(t, e, up, "workload", 10*time.Second)
	time.Sleep(200 * time.Millisecond)
	writePolicyFile(t, policy, roPolicy("file-3", "off"))
	e.signal(t, syscall.SIGHUP)
	waitKind(t, e, up, "instance-profile", 10*time.Second)
	time.Sleep(200 * time.Millisecond)
	loop.finish(t, "instance-profile", "workload")

	// Off again: the workload credentials are neither served nor verified,
	// so the cache forgets them and STS is not called to refresh them.
	roWaitCacheKeys(t, e, []string{"instance-profile/" + ipUpstreamRole}, switchGrace)

	if e.exited() || e.proc.Pid() != pid {
		t.Fatal("the daemon restarted")
	}
	if v := waitMetric(t, e, "imdsproxy_rollout_stage_changes_total", nil, func(v float64) bool { return v >= 2 }, 5*time.Second); v < 2 {
		t.Errorf("stage changes %v", v)
	}

	// A bad policy: refused, the old one (off) stays.
	writePolicyFile(t, policy, "version: \"file-4\"\ndefault: maybe\ngroups: {"+roGroup+": on}\n")
	e.signal(t, syscall.SIGHUP)
	waitMetric(t, e, "imdsproxy_rollout_policy_last_load_successful", nil, func(v float64) bool { return v == 0 }, 10*time.Second)
	if v, _ := e.scrape(t).Value("imdsproxy_rollout_policy_loads_total", map[string]string{"result": "failure"}); v < 1 {
		t.Errorf("policy load failures %v", v)
	}
	for range 5 {
		s, err := e.roFetch(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		if kind, err := checkServedKindListed(e, up, s, ipUpstreamRole); err != nil || kind != "instance-profile" {
			t.Fatalf("after a bad policy: %s %v; want the old policy's instance-profile", kind, err)
		}
		time.Sleep(50 * time.Millisecond)
	}

	// imdsproxy status shows the decision, the kept version and the error.
	out, code := runStatusCommand(t, e)
	for _, want := range []string{"stage:", "off", "group:         " + roGroup + " (from tag)", "file-3", "last error:", "serving:       role " + ipUpstreamRole} {
		if !strings.Contains(out, want) {
			t.Errorf("imdsproxy status lacks %q:\n%s", want, out)
		}
	}
	if code != 0 {
		t.Errorf("imdsproxy status exited %d while the daemon is ready:\n%s", code, out)
	}

	// Fixing the policy recovers.
	writePolicyFile(t, policy, roPolicy("file-5", "on"))
	e.signal(t, syscall.SIGHUP)
	waitMetric(t, e, "imdsproxy_rollout_policy_last_load_successful", nil, func(v float64) bool { return v == 1 }, 10*time.Second)
	waitKind(t, e, up, "workload", 10*time.Second)
}

// roWaitCacheKeys waits until /debug/cache lists exactly the keys want.
// switchGrace bounds how long keys no longer needed after a switch stay
// cached: the switch's grace period (access.Grace, 10s) during which the
// previous plan still answers, plus the trim after it, plus slack for a
// loaded machine.
const switchGrace = 25 * time.Second

func roWaitCacheKeys(t *testing.T, e *daemonEnv, want []string, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		var got []string
		st, body, err := e2e.GetURL(e.adminURL + "/debug/cache")
		if err == nil && st == http.StatusOK {
			var dc struct {
				Entries []struct {
					Key string `json:"key"`
				} `json:"entries"`
			}
			if err = json.Unmarshal([]byte(body), &dc); err == nil {
				for _, en := range dc.Entries {
					got = append(got, en.Key)
				}
			}
		}
		slices.Sort(got)
		if slices.Equal(got, want) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("/debug/cache keys %v (status %d, %v), want %v", got, st, err, want)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// runStatusCommand runs `imdsproxy status` against the daemon.
func runStatusCommand(t *testing.T, e *daemonEnv) (string, int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, daemonBinary(t), "status", "--config", e.configPath)
	cmd.Env = []string{"PATH=/usr/bin:/bin", "NO_PROXY=*"}
	b, err := cmd.CombinedOutput()
	code := 0
	if err != nil {
		code = e2e.ExitCode(err)
	}
	return string(b), code
}

// TestRolloutPolicyHTTPSPolling: a policy served over HTTPS (a test CA,
// trusted through SSL_CERT_FILE) and polled every second moves the host
// without a signal and without a failed client request.
func TestRolloutPolicyHTTPSPolling(t *testing.T) {
	t.Parallel()
	up := startRolloutUpstream(t)
	var doc atomic.Value
	doc.Store(roPolicy("https-1", "off"))
	var gets atomic.Int64
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/imdsproxy/rollout.yaml" {
			http.NotFound(w, r)
			return
		}
		gets.Add(1)
		w.Header().Set("Content-Type", "application/yaml")
		_, _ = io.WriteString(w, doc.Load().(string))
	}))
	t.Cleanup(srv.Close)
	caFile := filepath.Join(t.TempDir(), "ca.pem")
	writeCertPEM(t, caFile, srv.TLS)

	e := startRolloutDaemon(t, up, roOptions{
		policy:       srv.URL + "/imdsproxy/rollout.yaml",
		pollInterval: time.Second,
		extraEnv:     []string{"SSL_CERT_FILE=" + caFile},
	})
	waitKind(t, e, up, "instance-profile", 5*time.Second)
	loop := startClientLoop(e, up)
	time.Sleep(200 * time.Millisecond)
	doc.Store(roPolicy("https-2", "on"))
	waitKind(t, e, up, "workload", 10*time.Second)
	time.Sleep(200 * time.Millisecond)
	loop.finish(t, "instance-profile", "workload")
	if gets.Load() < 2 {
		t.Errorf("the policy was fetched %d times", gets.Load())
	}
	if v, _ := e.scrape(t).Value("imdsproxy_rollout_policy_last_load_successful", nil); v != 1 {
		t.Errorf("last load successful = %v", v)
	}
}

// writeCertPEM writes the server certificate of cfg (httptest's
// self-signed one, its own CA) as PEM.
func writeCertPEM(t *testing.T, path string, cfg *tls.Config) {
	t.Helper()
	if cfg == nil || len(cfg.Certificates) == 0 || len(cfg.Certificates[0].Certificate) == 0 {
		t.Fatal("the TLS server has no certificate")
	}
	var b []byte
	for _, der := range cfg.Certificates[0].Certificate {
		b = append(b, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})...)
	}
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestRolloutPolicyS3Polling: a policy in S3 (the S3 stand-in, through
// AWS_ENDPOINT_URL_S3), read with the instance profile's credentials and
// polled every second, moves the host without a failed client request.
func TestRolloutPolicyS3Polling(t *testing.T) {
	t.Parallel()
	up := startRolloutUpstream(t)
	fake := s3.Start(t)
	fake.Put(roBucketName, roObjectKey, []byte(roPolicy("s3-1", "off")))
	e := startRolloutDaemon(t, up, roOptions{
		policy:       "s3://" + roBucketName + "/" + roObjectKey,
		pollInterval: time.Second,
		s3:           fake,
	})
	waitKind(t, e, up, "instance-profile", 5*time.Second)
	loop := startClientLoop(e, up)
	time.Sleep(200 * time.Millisecond)
	fake.Put(roBucketName, roObjectKey, []byte(roPolicy("s3-2", "on")))
	waitKind(t, e, up, "workload", 10*time.Second)
	time.Sleep(200 * time.Millisecond)
	loop.finish(t, "instance-profile", "workload")

	calls := fake.CallLog()
	if len(calls) < 2 {
		t.Fatalf("S3 saw %d requests", len(calls))
	}
	for _, c := range calls {
		if c.AccessKeyID != up.key || !c.SignatureValid || c.Bucket != roBucketName || c.Key != roObjectKey {
			t.Errorf("S3 request %+v: want the policy object, signed with the instance profile's key %s", c, up.key)
		}
	}

	// A missing object is a failed load; the last good policy stays.
	fake.Delete(roBucketName, roObjectKey)
	waitMetric(t, e, "imdsproxy_rollout_policy_last_load_successful", nil, func(v float64) bool { return v == 0 }, 10*time.Second)
	s, err := e.roFetch(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if kind, err := checkServedKind(e, up, s); err != nil || kind != "workload" {
		t.Errorf("after the object vanished: %s %v; want the last good policy's workload", kind, err)
	}
}

// TestRolloutSTSDownFallback: in stage on with STS failing, once no valid
// workload credentials are cached, fallback instance-profile serves the
// instance profile's credentials and fallback none the error document.
func TestRolloutSTSDownFallback(t *testing.T) {
	t.Parallel()
	for _, fallback := range []string{"instance-profile", "none"} {
		t.Run(fallback, func(t *testing.T) {
			t.Parallel()
			up := startRolloutUpstream(t)
			policy := filepath.Join(t.TempDir(), "rollout.yaml")
			writePolicyFile(t, policy, roPolicy("down-1", "on"))
			e := startRolloutDaemon(t, up, roOptions{policy: policy, fallback: fallback, sessionLength: 20 * time.Second})
			waitKind(t, e, up, "workload", 5*time.Second)
			e.sts.SetMode(sts.ModeFail5xx)

			// The cached workload credentials run out 20s - expiry_margin
			// after they were issued.
			deadline := time.Now().Add(35 * time.Second)
			for {
				if time.Now().After(deadline) {
					t.Fatalf("still serving the workload credentials with STS down\n%s", e.logTail(40))
				}
				s, err := e.roFetch(context.Background())
				if fallback == "none" {
					if err != nil {
						if s.doc.Code == "" || s.doc.Code == "Success" {
							t.Fatalf("fallback none: want the error document, got %v (Code %q)", err, s.doc.Code)
						}
						break // the EC2 error document
					}
					if kind, cerr := checkServedKind(e, up, s); cerr != nil || kind != "workload" {
						t.Fatalf("fallback none served %s credentials: %v", kind, cerr)
					}
				} else {
					if err != nil {
						t.Fatalf("fallback instance-profile: a client request failed: %v", err)
					}
					kind, cerr := checkServedKindListed(e, up, s, e2e.RoleName)
					if cerr != nil {
						t.Fatal(cerr)
					}
					if kind == "instance-profile" {
						break
					}
				}
				time.Sleep(200 * time.Millisecond)
			}
			if fallback == "instance-profile" {
				waitMetric(t, e, "imdsproxy_rollout_fallbacks_total", nil, func(v float64) bool { return v >= 1 }, 5*time.Second)
				// Once STS is back, the workload role is served again.
				e.sts.SetMode(sts.ModeOK)
				waitKindListed(t, e, up, "workload", e2e.RoleName, 15*time.Second)
			}
		})
	}
}
