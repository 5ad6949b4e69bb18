package test

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/credentials/endpointcreds"
)

// The front doors beside IMDS, end to end: the container credentials
// endpoint (AWS_CONTAINER_CREDENTIALS_FULL_URI with a per-workload token
// file) and credential_process (`imdsproxy credential-process` over the
// daemon's unix socket), with the real clients (the AWS CLI and boto3 from
// Debian, the JavaScript SDK v3, aws-sdk-go-v2) run as the uids of the
// workloads; each must get exactly the credentials the fake STS issued for
// its own workload's role.

// The workloads of these tests. Root (the test process itself) is a
// workload too, so that in-process clients have a token of their own.
const (
	frontRootARN    = "arn:aws:iam::555566667777:role/front-root"
	frontBillingARN = "arn:aws:iam::111122223333:role/front-billing"
	frontReportsARN = "arn:aws:iam::444455556666:role/front-reports"
	frontHostARN    = "arn:aws:iam::222222222222:role/app" // role: of the harness's config
	frontBillingUID = 64111
	frontReportsUID = 64112
	frontOtherUID   = 64113 // a uid no workload maps
	frontDeniedUID  = 64114 // in access.deny_uids
	frontOverlap    = 5 * time.Second
	frontHelperEnv  = "FRONT_GO_HELPER" // makes TestFrontGoClientHelper the Go client
)

// frontEnv is a daemon with both front doors enabled, and a directory
// every test uid may traverse holding the token files, the socket, the
// client binaries and one home per uid.
type frontEnv struct {
	*daemonEnv
	shared   string
	tokenDir string
	socket   string
	url      string // AWS_CONTAINER_CREDENTIALS_FULL_URI
	bin      string // a copy of imdsproxy every uid may run
	goClient string // a copy of this test binary: the Go SDK client
	access   atomic.Value
	knobs    atomic.Pointer[frontKnobs]
	port     int
	httpc    *http.Client

	mu     sync.Mutex
	tokens []string // every token value read, never to be logged
}

func requireFront(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("running clients as the workloads' uids and giving them token files needs root")
	}
}

func startFront(t *testing.T, access string) *frontEnv {
	t.Helper()
	shared, err := os.MkdirTemp("", "imdsproxy-front-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(shared) })
	if err := os.Chmod(shared, 0o755); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	f := &frontEnv{
		shared: shared, tokenDir: filepath.Join(shared, "tokens"), socket: filepath.Join(shared, "credentials.sock"),
		url: fmt.Sprintf("http://127.0.0.1:%d/v1/credentials", port), port: port,
		httpc: &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{Proxy: nil, DisableKeepAlives: true}},
	}
	f.access.Store(access)
	f.knobs.Store(&frontKnobs{path: "/v1/credentials", overlap: frontOverlap, unitOwner: -1})
	f.bin = f.copyExecutable(t, daemonBinary(t), "imdsproxy")
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	f.goClient = f.copyExecutable(t, exe, "goclient")
	f.daemonEnv = startDaemon(t, envOptions{identityYAML: func(e *daemonEnv) string {
		e.sts.AllowRoles(frontRootARN, frontBillingARN, frontReportsARN)
		k := f.knobs.Load()
		unit, owners := "", ""
		if k.unitOwner >= 0 {
			unit = fmt.Sprintf("- {unit: %s, role: {arn: %q, name: front-unit}}\n", frontUnit, frontReportsARN)
			owners = fmt.Sprintf("  token_owners: {%s: %d}\n", frontUnit, k.unitOwner)
		}
		return fmt.Sprintf(`role: {arn: %q, name: app, session_name: "", duration: 1h}
source: web-identity
identity: {jwt_file: %q}
workloads:
- {uid: 0, role: {arn: %q, name: front-root}}
- {uid: %d, role: {arn: %q, name: front-billing}}
- {uid: %d, role: {arn: %q, name: front-reports}}
%scontainer:
  enabled: true
  listen: ["127.0.0.1:%d"]
  link: ""
  path: %s
  token_dir: %q
  rotate_interval: %s
  rotate_overlap: %s
%scredential_process: {enabled: true, socket: %q}
access: %s
`, frontHostARN, e.tokenFile, frontRootARN, frontBillingUID, frontBillingARN, frontReportsUID, frontReportsARN,
			unit, cmp.Or(k.listenPort, port), k.path, f.tokenDir, cmp.Or(k.interval, time.Hour), k.overlap, owners,
			cmp.Or(k.socket, f.socket), f.access.Load())
	}})
	return f
}

// frontKnobs are the settings of startFront's config that TestFrontReload
// changes.
type frontKnobs struct {
	path       string        // container.path
	interval   time.Duration // container.rotate_interval (0: 1h)
	overlap    time.Duration // container.rotate_overlap
	unitOwner  int           // ≥ 0: a unit workload frontUnit, its token file given to this uid
	listenPort int           // container.listen's port (0: the one startFront chose)
	socket     string        // credential_process.socket ("": the shared directory's)
}

// frontUnit is the unit workload of frontKnobs.unitOwner.
const frontUnit = "front-unit.service"

// copyExecutable copies src into the shared directory, executable by all.
func (f *frontEnv) copyExecutable(t *testing.T, src, name string) string {
	t.Helper()
	b, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(f.shared, name)
	if err := os.WriteFile(dst, b, 0o755); err != nil {
		t.Fatal(err)
	}
	return dst
}

// tokenFile is the token file of the workload of uid.
func (f *frontEnv) tokenFile(uid int) string {
	return filepath.Join(f.tokenDir, "uid-"+strconv.Itoa(uid), "token")
}

// token reads the token file of uid's workload (as root).
func (f *frontEnv) token(t *testing.T, uid int) string {
	t.Helper()
	b, err := os.ReadFile(f.tokenFile(uid))
	if err != nil {
		t.Fatal(err)
	}
	f.mu.Lock()
	f.tokens = append(f.tokens, string(b))
	f.mu.Unlock()
	return string(b)
}

// home is uid's home directory: an empty AWS credentials file and a
// config whose default profile runs `imdsproxy credential-process`.
func (f *frontEnv) home(t *testing.T, uid int) string {
	t.Helper()
	h := filepath.Join(f.shared, "home-"+strconv.Itoa(uid))
	if _, err := os.Stat(h); err == nil {
		return h
	}
	cfg := fmt.Sprintf("[default]\nregion = us-east-1\ncredential_process = %s credential-process --socket %s\n", f.bin, f.socket)
	for _, step := range []error{
		os.Mkdir(h, 0o700),
		os.WriteFile(filepath.Join(h, "empty"), nil, 0o600),
		os.WriteFile(filepath.Join(h, "process.ini"), []byte(cfg), 0o600),
	} {
		if step != nil {
			t.Fatal(step)
		}
	}
	for _, p := range []string{h, filepath.Join(h, "empty"), filepath.Join(h, "process.ini")} {
		if err := os.Chown(p, uid, uid); err != nil {
			t.Fatal(err)
		}
	}
	return h
}

// door selects how a client is pointed at the daemon.
type door int

const (
	viaContainer door = iota // AWS_CONTAINER_CREDENTIALS_FULL_URI + the token file
	viaProcess               // credential_process in AWS_CONFIG_FILE
)

// clientEnv is a hermetic environment for a client run as uid: IMDS
// disabled (nothing but the chosen door, and nothing off this host).
func (f *frontEnv) clientEnv(t *testing.T, uid int, d door) []string {
	h := f.home(t, uid)
	env := []string{
		"PATH=/usr/bin:/bin", "HOME=" + h, "LANG=C.UTF-8", "NO_PROXY=*", "no_proxy=*",
		"AWS_REGION=us-east-1", "AWS_EC2_METADATA_DISABLED=true",
		"AWS_SHARED_CREDENTIALS_FILE=" + filepath.Join(h, "empty"),
	}
	if d == viaContainer {
		return append(env, "AWS_CONFIG_FILE="+filepath.Join(h, "empty"),
			"AWS_CONTAINER_CREDENTIALS_FULL_URI="+f.url, "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE="+f.tokenFile(uid))
	}
	return append(env, "AWS_CONFIG_FILE="+filepath.Join(h, "process.ini"))
}

// runAs runs name as uid in dir (its home when ""), returning stdout.
func (f *frontEnv) runAs(t *testing.T, uid int, env []string, dir, name string, args ...string) (string, string, error) {
	t.Helper()
	if dir == "" {
		dir = f.home(t, uid)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 90*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir, cmd.Env = dir, env
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(uid)}}
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	return stdout.String(), stderr.String(), err
}

// gotCreds is what a client printed.
type gotCreds struct {
	AccessKeyId     string //nolint:revive // wire name
	SecretAccessKey string
	SessionToken    string
	Expiration      string
	Method          string // boto3's provider
}

// client runs one real client as uid through the door and returns the
// credentials it resolved.
func (f *frontEnv) client(t *testing.T, name string, uid int, d door) (gotCreds, error) {
	t.Helper()
	env := f.clientEnv(t, uid, d)
	var out, errOut string
	var err error
	switch name {
	case "aws-cli":
		if d == viaContainer {
			// Debian's CLI 2.9 reads only the literal token: read the
			// file as the workload's uid, as its wrapper would.
			out, errOut, err = f.runAs(t, uid, env, "", "/bin/sh", "-c",
				`AWS_CONTAINER_AUTHORIZATION_TOKEN=$(cat "$AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE") && export AWS_CONTAINER_AUTHORIZATION_TOKEN && unset AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE && exec "$@"`,
				"sh", awsCLIPath, "configure", "export-credentials", "--format", "process")
		} else {
			out, errOut, err = f.runAs(t, uid, env, "", awsCLIPath, "configure", "export-credentials", "--format", "process")
		}
	case "boto3":
		const script = `import boto3, json, os
s = boto3.Session()
c = s.get_credentials()
if c is None:
    raise SystemExit("boto3 found no credentials")
f = c.get_frozen_credentials()
print(json.dumps({"AccessKeyId": f.access_key, "SecretAccessKey": f.secret_key, "SessionToken": f.token, "Method": c.method}))`
		if d == viaContainer {
			out, errOut, err = f.runAs(t, uid, env, "", "/bin/sh", "-c",
				`AWS_CONTAINER_AUTHORIZATION_TOKEN=$(cat "$AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE") && export AWS_CONTAINER_AUTHORIZATION_TOKEN && exec "$@"`,
				"sh", python3Path, "-c", script)
		} else {
			out, errOut, err = f.runAs(t, uid, env, "", python3Path, "-c", script)
		}
	case "js":
		out, errOut, err = f.runAs(t, uid, env, filepath.Join(repoRoot, "test", "js"), nodePath, "creds.mjs", "default")
	case "go":
		var henv []string
		for _, kv := range env {
			if strings.HasPrefix(kv, "AWS_") {
				kv = "FRONTHELPER_" + kv // the harness's TestMain drops AWS_*
			}
			henv = append(henv, kv)
		}
		out, errOut, err = f.runAs(t, uid, append(henv, frontHelperEnv+"=1"), filepath.Join(repoRoot, "test"),
			f.goClient, "-test.run=^TestFrontGoClientHelper$")
	default:
		t.Fatalf("unknown client %s", name)
	}
	if err != nil {
		return gotCreds{}, fmt.Errorf("%s as uid %d: %v\nstderr: %s", name, uid, err, redactOutput([]byte(errOut)))
	}
	var g gotCreds
	if err := json.Unmarshal([]byte(out), &g); err != nil {
		return gotCreds{}, fmt.Errorf("%s as uid %d printed %q: %v", name, uid, redactOutput([]byte(out)), err)
	}
	return g, nil
}

// exactly checks that g are credentials the fake STS issued for roleARN,
// secret and session token included, with an expiry no later.
func (f *frontEnv) exactly(t *testing.T, who string, g gotCreds, roleARN string) {
	t.Helper()
	is, ok := f.sts.Find(g.AccessKeyId)
	switch {
	case !ok:
		t.Errorf("%s: access key id %q was never issued by STS", who, g.AccessKeyId)
	case is.RoleARN != roleARN:
		t.Errorf("%s: got credentials of %s, want %s", who, is.RoleARN, roleARN)
	case g.SecretAccessKey != is.SecretAccessKey || g.SessionToken != is.SessionToken:
		t.Errorf("%s: the secret or session token differs from what STS issued with %s", who, g.AccessKeyId)
	}
	if g.Expiration != "" {
		if exp, err := time.Parse(time.RFC3339, g.Expiration); err != nil || exp.After(is.Expiration.Add(time.Second)) {
			t.Errorf("%s: Expiration %q (STS: %s)", who, g.Expiration, is.Expiration)
		}
	}
}

// TestFrontGoClientHelper is not a test: run as another uid by the tests
// below (frontHelperEnv set), it is aws-sdk-go-v2's default credential
// chain in a process of its own, and prints what it resolved.
func TestFrontGoClientHelper(t *testing.T) {
	if os.Getenv(frontHelperEnv) == "" {
		t.Skip("the Go SDK client of the front door tests")
	}
	for _, kv := range os.Environ() {
		if k, v, ok := strings.Cut(kv, "="); ok && strings.HasPrefix(k, "FRONTHELPER_") {
			os.Setenv(strings.TrimPrefix(k, "FRONTHELPER_"), v)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cfg, err := config.LoadDefaultConfig(ctx)
	if err == nil {
		var c aws.Credentials
		if c, err = cfg.Credentials.Retrieve(ctx); err == nil {
			b, _ := json.Marshal(map[string]string{"AccessKeyId": c.AccessKeyID, "SecretAccessKey": c.SecretAccessKey,
				"SessionToken": c.SessionToken, "Expiration": c.Expires.UTC().Format(time.RFC3339), "Method": c.Source})
			os.Stdout.Write(append(b, '\n'))
			os.Exit(0)
		}
	}
	fmt.Fprintln(os.Stderr, "go client:", err)
	os.Exit(1)
}

// status GETs the endpoint with the Authorization values given and returns
// the status and the error code of the body.
func (f *frontEnv) status(t *testing.T, auth ...string) (int, string) {
	t.Helper()
	req, _ := http.NewRequestWithContext(t.Context(), http.MethodGet, f.url, nil)
	for _, a := range auth {
		req.Header.Add("Authorization", a)
	}
	resp, err := f.httpc.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var doc struct{ Code string }
	_ = json.NewDecoder(io.LimitReader(resp.Body, 1<<16)).Decode(&doc)
	return resp.StatusCode, doc.Code
}

// probeAs GETs the endpoint as uid with token (a stolen one, say) and
// returns the status and error code it got (never the body's secrets).
func (f *frontEnv) probeAs(t *testing.T, uid int, token string) (int, string) {
	t.Helper()
	const script = `import json, sys, urllib.request, urllib.error
req = urllib.request.Request(sys.argv[1], headers={"Authorization": sys.argv[2]})
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
try:
    with opener.open(req, timeout=10) as r:
        print(json.dumps({"status": r.status, "code": ""}))
except urllib.error.HTTPError as e:
    print(json.dumps({"status": e.code, "code": json.loads(e.read().decode()).get("code", "")}))`
	out, errOut, err := f.runAs(t, uid, f.clientEnv(t, uid, viaContainer), "", python3Path, "-c", script, f.url, token)
	if err != nil {
		t.Fatalf("probe as uid %d: %v %s", uid, err, errOut)
	}
	var r struct {
		Status int
		Code   string
	}
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		t.Fatalf("probe as uid %d printed %q", uid, out)
	}
	return r.Status, r.Code
}

// scrape returns the value of the series of name whose labels include all
// of want ("k=v" pairs), summed.
func (f *frontEnv) scrape(t *testing.T, name string, want ...string) float64 {
	t.Helper()
	resp, err := f.httpc.Get(f.adminURL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	var sum float64
	re := regexp.MustCompile(`^` + regexp.QuoteMeta(name) + `(\{[^}]*\})? (\S+)$`)
next:
	for _, line := range strings.Split(string(body), "\n") {
		m := re.FindStringSubmatch(line)
		if m == nil {
			continue
		}
		for _, w := range want {
			k, v, _ := strings.Cut(w, "=")
			if !strings.Contains(m[1], k+`="`+v+`"`) {
				continue next
			}
		}
		n, _ := strconv.ParseFloat(m[2], 64)
		sum += n
	}
	return sum
}

// noSecrets checks the daemon's log for every token value read and every
// secret STS issued.
func (f *frontEnv) noSecrets(t *testing.T) {
	t.Helper()
	log := f.log.String()
	f.mu.Lock()
	defer f.mu.Unlock()
	for i, tok := range f.tokens {
		if strings.Contains(log, tok) || strings.Contains(log, tok[:24]) {
			t.Errorf("the daemon's log holds container token #%d (or its first 24 characters)", i)
		}
	}
	f.assertNoSecrets(t, "daemon log", log)
}

// TestFrontContainerEndpoint: the container credentials endpoint with
// every real client, each as its workload's uid with its own token file;
// token files only their uid may read; missing, wrong and stolen tokens
// refused; a rotation in the middle of a stream of requests fails none.
func TestFrontContainerEndpoint(t *testing.T) {
	requireFront(t)
	requireClient(t, awsCLIPath, "AWS CLI v2 (Debian package awscli)")
	requireClient(t, python3Path, "python3 with boto3 (Debian package python3-boto3)")
	requireClient(t, nodePath, "Node.js")
	requireClient(t, filepath.Join(repoRoot, "test", "js", "node_modules", "@aws-sdk", "credential-provider-node"), "the JavaScript SDK v3 (npm ci in test/js)")
	f := startFront(t, "{}")

	t.Run("token files belong to their workload's uid only", func(t *testing.T) {
		for _, uid := range []int{0, frontBillingUID, frontReportsUID} {
			st, err := os.Stat(f.tokenFile(uid))
			if err != nil {
				t.Fatal(err)
			}
			if got := int(st.Sys().(*syscall.Stat_t).Uid); got != uid || st.Mode().Perm() != 0o400 {
				t.Errorf("%s: owner %d mode %v, want %d 0400", f.tokenFile(uid), got, st.Mode().Perm(), uid)
			}
			if tok := f.token(t, uid); len(tok) != 43 || strings.ContainsAny(tok, "\r\n") {
				t.Errorf("uid %d: token of %d bytes, want 43 without a newline", uid, len(tok))
			}
		}
		if _, _, err := f.runAs(t, frontReportsUID, f.clientEnv(t, frontReportsUID, viaContainer), "", "/bin/cat", f.tokenFile(frontBillingUID)); err == nil {
			t.Error("uid front-reports read front-billing's token file")
		}
	})

	t.Run("every SDK gets its own workload's credentials", func(t *testing.T) {
		for _, tc := range []struct {
			client string
			uid    int
			arn    string
		}{
			{"aws-cli", frontBillingUID, frontBillingARN},
			{"boto3", frontReportsUID, frontReportsARN},
			{"js", frontBillingUID, frontBillingARN},
			{"js", frontReportsUID, frontReportsARN},
			{"go", frontReportsUID, frontReportsARN},
			{"go", frontBillingUID, frontBillingARN},
		} {
			g, err := f.client(t, tc.client, tc.uid, viaContainer)
			if err != nil {
				t.Error(err)
				continue
			}
			f.exactly(t, fmt.Sprintf("%s as uid %d", tc.client, tc.uid), g, tc.arn)
			if tc.client == "boto3" && g.Method != "container-role" {
				t.Errorf("boto3 used provider %q, want container-role", g.Method)
			}
			if tc.client == "go" && g.Method != endpointcreds.ProviderName {
				t.Errorf("the Go SDK used provider %q, want %s", g.Method, endpointcreds.ProviderName)
			}
		}
	})

	t.Run("missing, wrong and stolen tokens are refused", func(t *testing.T) {
		billing := f.token(t, frontBillingUID)
		wrong := []byte(billing)
		wrong[10] ^= 1
		for _, tc := range []struct {
			name   string
			auth   []string
			status int
			code   string
		}{
			{"missing", nil, 401, "MissingToken"},
			{"wrong", []string{string(wrong)}, 401, "InvalidToken"},
			{"two", []string{billing, billing}, 401, "InvalidToken"},
			// The test process is root, whose workload is front-root.
			{"another workload's, by root", []string{billing}, 403, "AccessDenied"},
		} {
			if st, code := f.status(t, tc.auth...); st != tc.status || code != tc.code {
				t.Errorf("%s token: %d %s, want %d %s", tc.name, st, code, tc.status, tc.code)
			}
		}
		if st, code := f.probeAs(t, frontReportsUID, billing); st != 403 || code != "AccessDenied" {
			t.Errorf("front-reports presenting front-billing's token: %d %s, want 403 AccessDenied", st, code)
		}
		if st, code := f.probeAs(t, frontOtherUID, billing); st != 403 || code != "AccessDenied" {
			t.Errorf("an unmapped uid presenting front-billing's token: %d %s, want 403 AccessDenied", st, code)
		}
		if st, _ := f.probeAs(t, frontBillingUID, billing); st != 200 {
			t.Errorf("front-billing with its own token: %d", st)
		}
		env := f.clientEnv(t, frontReportsUID, viaContainer)
		env = append(env, "AWS_CONTAINER_AUTHORIZATION_TOKEN="+billing)
		env = slicesDelete(env, "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE=")
		if out, _, err := f.runAs(t, frontReportsUID, env, filepath.Join(repoRoot, "test", "js"), nodePath, "creds.mjs", "default"); err == nil {
			t.Errorf("the JS SDK as front-reports with front-billing's token got credentials: %s", redactOutput([]byte(out)))
		}
		if v := f.scrape(t, "imdsproxy_access_refused_total", "door=container", "reason=peer_mismatch"); v < 4 {
			t.Errorf("imdsproxy_access_refused_total{door=container,reason=peer_mismatch} = %v, want at least 4", v)
		}
	})

	t.Run("rotation in the middle of a stream fails no request", func(t *testing.T) {
		old := f.token(t, 0)
		var ok, failed atomic.Int64
		var firstErr atomic.Value
		ctx, cancel := context.WithCancel(t.Context())
		var wg sync.WaitGroup
		// One connection pool, as one SDK client has.
		sdkHTTP := &http.Client{Transport: &http.Transport{Proxy: nil, MaxIdleConnsPerHost: 4}}
		defer sdkHTTP.CloseIdleConnections()
		for range 4 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for ctx.Err() == nil {
					// What the Go SDK's container provider does on every
					// fetch: read the token file, send it verbatim.
					p := endpointcreds.New(f.url, func(o *endpointcreds.Options) {
						o.HTTPClient = sdkHTTP
						o.AuthorizationTokenProvider = endpointcreds.TokenProviderFunc(func() (string, error) {
							b, err := os.ReadFile(f.tokenFile(0))
							return string(b), err
						})
					})
					c, err := p.Retrieve(context.WithoutCancel(ctx))
					if err == nil {
						if is, found := f.sts.Find(c.AccessKeyID); !found || is.RoleARN != frontRootARN {
							err = fmt.Errorf("credentials of %q", is.RoleARN)
						}
					}
					if err != nil {
						failed.Add(1)
						firstErr.CompareAndSwap(nil, err.Error())
						continue
					}
					ok.Add(1)
				}
			}()
		}
		rotations := 6
		for range rotations {
			time.Sleep(700 * time.Millisecond)
			f.signal(t, syscall.SIGUSR1)
		}
		time.Sleep(700 * time.Millisecond)
		cancel()
		wg.Wait()
		if failed.Load() != 0 {
			t.Errorf("%d of %d requests failed across %d rotations; first: %v", failed.Load(), ok.Load()+failed.Load(), rotations, firstErr.Load())
		}
		if ok.Load() < 20 {
			t.Errorf("only %d requests made", ok.Load())
		}
		if v := f.scrape(t, "imdsproxy_container_token_rotations_total"); v < float64(rotations) {
			t.Errorf("imdsproxy_container_token_rotations_total = %v, want %d", v, rotations)
		}
		cur := f.token(t, 0)
		if cur == old {
			t.Fatal("the token file did not change")
		}
		t.Logf("%d requests, none failed, across %d rotations", ok.Load(), rotations)
		// After the overlap the replaced token is refused; the file's works.
		deadline := time.Now().Add(frontOverlap + 5*time.Second)
		for {
			st, code := f.status(t, old)
			if st == 401 && code == "InvalidToken" {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("a token replaced %d rotations ago still answers %d after the overlap", rotations, st)
			}
			time.Sleep(250 * time.Millisecond)
		}
		if st, _ := f.status(t, f.token(t, 0)); st != 200 {
			t.Errorf("the current token answers %d", st)
		}
		// A client started after the rotations reads the new file.
		g, err := f.client(t, "js", frontBillingUID, viaContainer)
		if err != nil {
			t.Fatal(err)
		}
		f.exactly(t, "js after the rotations", g, frontBillingARN)
	})

	t.Run("status, metrics and audit carry the door", func(t *testing.T) {
		out, _, err := f.runAs(t, 0, []string{"PATH=/usr/bin:/bin"}, f.shared, f.bin, "status", "--admin", strings.TrimPrefix(f.adminURL, "http://"))
		if err != nil {
			t.Fatalf("imdsproxy status: %v", err)
		}
		for _, want := range []string{"door imds:", "door container: " + f.url + "; 3 workload tokens", "door process:  " + f.socket} {
			if !strings.Contains(out, want) {
				t.Errorf("imdsproxy status lacks %q:\n%s", want, out)
			}
		}
		if v := f.scrape(t, "imdsproxy_rollout_served_total", "door=container", "kind=workload"); v < 8 {
			t.Errorf("imdsproxy_rollout_served_total{door=container} = %v", v)
		}
		audited := map[float64]bool{}
		for _, l := range f.logLines() {
			if l["logger"] == "audit" && l["door"] == "container" {
				uid, _ := l["uid"].(float64)
				audited[uid] = true
			}
		}
		for _, uid := range []float64{0, frontBillingUID, frontReportsUID} {
			if !audited[uid] {
				t.Errorf("no audit line with door container for uid %v", uid)
			}
		}
	})
	f.noSecrets(t)
}

// TestFrontCredentialProcess: credential_process with every real client,
// as two uids mapped to two workloads; an unmapped uid gets the host's role
// (and nothing once the policy admits only workloads); a denied uid gets
// nothing, with one line on stderr.
func TestFrontCredentialProcess(t *testing.T) {
	requireFront(t)
	requireClient(t, awsCLIPath, "AWS CLI v2 (Debian package awscli)")
	requireClient(t, python3Path, "python3 with boto3 (Debian package python3-boto3)")
	requireClient(t, nodePath, "Node.js")
	requireClient(t, filepath.Join(repoRoot, "test", "js", "node_modules", "@aws-sdk", "credential-provider-node"), "the JavaScript SDK v3 (npm ci in test/js)")
	f := startFront(t, fmt.Sprintf("{deny_uids: [%d]}", frontDeniedUID))

	for _, tc := range []struct {
		client string
		uid    int
		arn    string
	}{
		{"aws-cli", frontBillingUID, frontBillingARN},
		{"boto3", frontReportsUID, frontReportsARN},
		{"js", frontBillingUID, frontBillingARN},
		{"go", frontReportsUID, frontReportsARN},
		{"aws-cli", frontOtherUID, frontHostARN}, // unmapped: the host's role
	} {
		g, err := f.client(t, tc.client, tc.uid, viaProcess)
		if err != nil {
			t.Error(err)
			continue
		}
		f.exactly(t, fmt.Sprintf("%s as uid %d", tc.client, tc.uid), g, tc.arn)
		if tc.client == "boto3" && g.Method != "custom-process" {
			t.Errorf("boto3 used provider %q, want custom-process", g.Method)
		}
	}

	// The command itself: one line of Version 1 JSON, or nothing on stdout
	// and one line on stderr.
	raw, _, err := f.runAs(t, frontBillingUID, f.clientEnv(t, frontBillingUID, viaProcess), "", f.bin, "credential-process", "--socket", f.socket)
	if err != nil {
		t.Fatal(err)
	}
	var doc map[string]any
	if strings.Count(raw, "\n") != 1 || json.Unmarshal([]byte(raw), &doc) != nil || doc["Version"] != float64(1) || doc["AccountId"] != "111122223333" {
		t.Errorf("credential-process printed %q", redactOutput([]byte(raw)))
	}
	for _, tc := range []struct {
		uid  int
		args []string
		want string
	}{
		{frontDeniedUID, nil, "access_denied"},
		{frontBillingUID, []string{"--role", "front-reports"}, "not_found: role front-reports is not served to this process"},
	} {
		out, errOut, err := f.runAs(t, tc.uid, f.clientEnv(t, tc.uid, viaProcess), "", f.bin, append([]string{"credential-process", "--socket", f.socket}, tc.args...)...)
		if frontExit(err) != 1 || out != "" || strings.Count(errOut, "\n") != 1 || !strings.Contains(errOut, tc.want) {
			t.Errorf("uid %d credential-process %v: exit %d, stdout %q, stderr %q; want exit 1, nothing, one line with %q",
				tc.uid, tc.args, frontExit(err), redactOutput([]byte(out)), errOut, tc.want)
		}
	}
	if _, err := f.client(t, "aws-cli", frontDeniedUID, viaProcess); err == nil {
		t.Error("the AWS CLI as the denied uid got credentials")
	}

	// A policy that admits only the workloads (and root): the unmapped uid
	// is refused, the workloads still served.
	f.access.Store("{allow_uids: [0]}")
	f.writeConfig(t, f.config())
	f.signal(t, syscall.SIGHUP)
	deadline := time.Now().Add(15 * time.Second)
	for {
		_, errOut, err := f.runAs(t, frontOtherUID, f.clientEnv(t, frontOtherUID, viaProcess), "", f.bin, "credential-process", "--socket", f.socket)
		if err != nil && strings.Contains(errOut, "access_denied") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the unmapped uid is still served after the reload: %v %s", err, errOut)
		}
		time.Sleep(200 * time.Millisecond)
	}
	g, err := f.client(t, "boto3", frontBillingUID, viaProcess)
	if err != nil {
		t.Fatal(err)
	}
	f.exactly(t, "boto3 as front-billing after the reload", g, frontBillingARN)

	if v := f.scrape(t, "imdsproxy_rollout_served_total", "door=process"); v < 5 {
		t.Errorf("imdsproxy_rollout_served_total{door=process} = %v", v)
	}
	if v := f.scrape(t, "imdsproxy_access_refused_total", "door=process", "outcome=deny"); v < 3 {
		t.Errorf("imdsproxy_access_refused_total{door=process,outcome=deny} = %v", v)
	}
	f.noSecrets(t)
}

// slicesDelete drops the entries of env starting with prefix.
func slicesDelete(env []string, prefix string) []string {
	out := env[:0:0]
	for _, kv := range env {
		if !strings.HasPrefix(kv, prefix) {
			out = append(out, kv)
		}
	}
	return out
}

// frontExit is the exit code of a finished command (0 for nil, -1 when it
// did not run).
func frontExit(err error) int {
	if err == nil {
		return 0
	}
	if ee, ok := err.(*exec.ExitError); ok {
		return ee.ExitCode()
	}
	return -1
}

// TestFrontReload changes, one SIGHUP each, every setting of the front
// doors a reload applies, and checks each took effect for a real client or
// on disk: container.path (the AWS CLI through the new path; the old one
// 404), container.rotate_overlap (a replaced token accepted past the old
// overlap), container.rotate_interval (in use, per `imdsproxy status`), a
// workload added with container.token_owners (its token file, and a change
// of owner). The restart-only ones (container.listen,
// credential_process.socket) refuse the reload and say so, and serving goes
// on unchanged.
func TestFrontReload(t *testing.T) {
	requireFront(t)
	requireClient(t, awsCLIPath, "AWS CLI v2 (Debian package awscli)")
	f := startFront(t, "{}")
	set := func(what string, change func(*frontKnobs), cond func() bool) {
		t.Helper()
		k := *f.knobs.Load()
		change(&k)
		f.knobs.Store(&k)
		reloadAndWait(t, f.daemonEnv, f.config(), what, cond)
	}
	get := func(url, token string) int {
		req, _ := http.NewRequestWithContext(t.Context(), http.MethodGet, url, nil)
		req.Header.Set("Authorization", token)
		resp, err := f.httpc.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	statusOut := func() string {
		out, _ := runStatusCommand(t, f.daemonEnv)
		return out
	}

	// container.path.
	oldURL, newURL := f.url, fmt.Sprintf("http://127.0.0.1:%d/v2/creds", f.port)
	set("container.path", func(k *frontKnobs) { k.path = "/v2/creds" }, func() bool {
		return get(newURL, f.token(t, 0)) == http.StatusOK
	})
	if st := get(oldURL, f.token(t, 0)); st != http.StatusNotFound {
		t.Errorf("the old path answers %d after the reload, want 404", st)
	}
	f.url = newURL
	g, err := f.client(t, "aws-cli", frontBillingUID, viaContainer)
	if err != nil {
		t.Fatal(err)
	}
	f.exactly(t, "the AWS CLI through the new path", g, frontBillingARN)

	// container.rotate_overlap: from 5s to 40s; a token replaced afterwards
	// is still accepted well past 5s.
	set("container.rotate_overlap", func(k *frontKnobs) { k.overlap = 40 * time.Second }, func() bool {
		return strings.Contains(statusOut(), "(a replaced one accepted for 40s)")
	})
	old := f.token(t, 0)
	f.signal(t, syscall.SIGUSR1)
	deadline := time.Now().Add(15 * time.Second)
	for f.token(t, 0) == old {
		if time.Now().After(deadline) {
			t.Fatal("SIGUSR1 did not replace the token file")
		}
		time.Sleep(50 * time.Millisecond)
	}
	replaced := time.Now()
	time.Sleep(frontOverlap + 3*time.Second)
	if st := get(f.url, old); st != http.StatusOK && time.Since(replaced) < 40*time.Second {
		t.Errorf("a token replaced %s ago answers %d with rotate_overlap 40s", time.Since(replaced).Round(time.Second), st)
	}
	if st := get(f.url, f.token(t, 0)); st != http.StatusOK {
		t.Errorf("the new token answers %d", st)
	}

	// container.rotate_interval.
	set("container.rotate_interval", func(k *frontKnobs) { k.interval = 2 * time.Hour }, func() bool {
		return strings.Contains(statusOut(), "rotated every 2h0m0s (a replaced one accepted for 40s)")
	})

	// A unit workload and container.token_owners: its file appears,
	// readable by the owner only; a new owner takes it over.
	unitFile := filepath.Join(f.tokenDir, frontUnit, "token")
	ownedBy := func(uid int) bool {
		st, err := os.Stat(unitFile)
		return err == nil && int(st.Sys().(*syscall.Stat_t).Uid) == uid && st.Mode().Perm() == 0o400
	}
	set("workloads and container.token_owners", func(k *frontKnobs) { k.unitOwner = frontBillingUID }, func() bool {
		return ownedBy(frontBillingUID)
	})
	set("container.token_owners", func(k *frontKnobs) { k.unitOwner = frontReportsUID }, func() bool {
		return ownedBy(frontReportsUID)
	})
	if _, _, err := f.runAs(t, frontBillingUID, f.clientEnv(t, frontBillingUID, viaContainer), "", "/bin/cat", unitFile); err == nil {
		t.Error("the unit token's previous owner can still read it")
	}
	set("workload removed", func(k *frontKnobs) { k.unitOwner = -1 }, func() bool {
		_, err := os.Stat(unitFile)
		return os.IsNotExist(err)
	})

	// Restart-only settings: refused whole, said, and nothing changes.
	for _, tc := range []struct {
		key    string
		change func(*frontKnobs)
	}{
		{"container.listen", func(k *frontKnobs) { k.listenPort = f.port - 1 }}, // refused before anything listens on it
		{"credential_process", func(k *frontKnobs) { k.socket = filepath.Join(f.shared, "other.sock") }},
	} {
		good := *f.knobs.Load()
		k := good
		tc.change(&k)
		f.knobs.Store(&k)
		f.writeConfig(t, f.config())
		f.signal(t, syscall.SIGHUP)
		waitMetric(t, f.daemonEnv, "imdsproxy_config_restart_required", nil, func(v float64) bool { return v == 1 }, 15*time.Second)
		if out := statusOut(); !strings.Contains(out, "restart:       NEEDED: "+tc.key) {
			t.Errorf("%s changed: imdsproxy status does not say a restart is needed:\n%s", tc.key, out)
		}
		g, err := f.client(t, "aws-cli", frontReportsUID, viaContainer)
		if err != nil {
			t.Fatal(err)
		}
		f.exactly(t, "the AWS CLI after a refused reload", g, frontReportsARN)
		f.knobs.Store(&good)
		f.writeConfig(t, f.config())
		f.signal(t, syscall.SIGHUP)
		waitMetric(t, f.daemonEnv, "imdsproxy_config_restart_required", nil, func(v float64) bool { return v == 0 }, 15*time.Second)
	}
	f.noSecrets(t)
}
