package bench

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/imdsproxy/imdsproxy/container"
	"github.com/imdsproxy/imdsproxy/credproc"
	"github.com/imdsproxy/imdsproxy/creds"
	"github.com/imdsproxy/imdsproxy/test/fakes/oidc"
	"github.com/imdsproxy/imdsproxy/test/fakes/sts"
)

// frontDaemon is a daemon of its own with the container endpoint and the
// credential_process socket, whose one workload is this process's uid.
type frontDaemon struct {
	bin, dir, imds, container, socket, token string
	cmd                                      *exec.Cmd
	stop                                     func()
}

func startFrontDaemon(b *testing.B) *frontDaemon {
	b.Helper()
	bin := os.Getenv("IMDSPROXY_BIN")
	if st, err := os.Stat(bin); bin == "" || err != nil || st.IsDir() {
		b.Skipf("IMDSPROXY_BIN=%q names no daemon binary: build it (make build)", bin)
	}
	f := &frontDaemon{bin: bin, dir: b.TempDir()}
	iss, err := oidc.New(oidc.Options{})
	if err != nil {
		b.Fatal(err)
	}
	issSrv := httptest.NewServer(iss.Handler())
	iss.SetURL(issSrv.URL)
	const hostARN, wlARN = "arn:aws:iam::222222222222:role/app", "arn:aws:iam::333333333333:role/bench"
	fake := sts.New(sts.Config{Issuer: iss, RoleARN: hostARN})
	fake.AllowRoles(wlARN)
	stsSrv := httptest.NewServer(fake.Handler())
	up := httptest.NewServer(http.NotFoundHandler())
	jwt := filepath.Join(f.dir, "token.jwt")
	if err := oidc.WriteTokenFile(jwt, iss.Mint(oidc.Claims{ExpiresAt: time.Now().Add(24 * time.Hour)})); err != nil {
		b.Fatal(err)
	}
	ports := make([]int, 3)
	for i := range ports {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			b.Fatal(err)
		}
		ports[i] = ln.Addr().(*net.TCPAddr).Port
		ln.Close()
	}
	f.imds = fmt.Sprintf("http://127.0.0.1:%d", ports[0])
	f.container = fmt.Sprintf("http://127.0.0.1:%d/v1/credentials", ports[2])
	f.socket = filepath.Join(f.dir, "credentials.sock")
	cfg := fmt.Sprintf(`listen: 127.0.0.1:%d
admin_listen: 127.0.0.1:%d
upstream: %s
role: {arn: %q, name: app, session_name: bench}
identity: {jwt_file: %q}
access: {audit: false}
workloads: [{uid: %d, role: {arn: %q, name: bench}}]
container: {enabled: true, listen: ["127.0.0.1:%d"], link: "", token_dir: %q}
credential_process: {enabled: true, socket: %q}
`, ports[0], ports[1], up.URL, hostARN, jwt, os.Getuid(), wlARN, ports[2], filepath.Join(f.dir, "tokens"), f.socket)
	cfgPath := filepath.Join(f.dir, "config.yaml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		b.Fatal(err)
	}
	f.cmd = exec.Command(bin, "serve", "--config", cfgPath, "--log-level", "warn")
	f.cmd.Env = append(slices.DeleteFunc(os.Environ(), func(kv string) bool { return strings.HasPrefix(kv, "AWS_") }),
		"AWS_REGION=us-east-1", "AWS_ENDPOINT_URL_STS="+stsSrv.URL)
	var logs strings.Builder
	f.cmd.Stdout, f.cmd.Stderr = &logs, &logs
	f.stop = func() {
		if f.cmd.Process != nil {
			_ = f.cmd.Process.Signal(os.Interrupt)
			_ = f.cmd.Wait()
		}
		issSrv.Close()
		stsSrv.Close()
		up.Close()
	}
	return f.start(b, ports[1], &logs)
}

func (f *frontDaemon) start(b *testing.B, admin int, logs *strings.Builder) *frontDaemon {
	b.Helper()
	if err := f.cmd.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(f.stop)
	deadline := time.Now().Add(15 * time.Second)
	for {
		resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/readyz", admin))
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				break
			}
		}
		if time.Now().After(deadline) {
			b.Fatalf("the daemon is not ready: %v\n%s", err, logs.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	tok, err := os.ReadFile(filepath.Join(f.dir, "tokens", fmt.Sprintf("uid-%d", os.Getuid()), "token"))
	if err != nil {
		b.Fatal(err)
	}
	f.token = string(tok)
	return f
}

// latencies records one duration per operation and reports its p50 and
// p99 beside ns/op.
type latencies []time.Duration

func (l latencies) report(b *testing.B) {
	if len(l) == 0 {
		return
	}
	slices.Sort(l)
	b.ReportMetric(float64(l[len(l)/2].Microseconds()), "p50-µs")
	b.ReportMetric(float64(l[len(l)*99/100].Microseconds()), "p99-µs")
}

// getOK GETs url with hdr on client and fails b unless it is a 200.
func getOK(b *testing.B, client *http.Client, url string, hdr http.Header) {
	req, _ := http.NewRequest(http.MethodGet, url, nil)
	req.Header = hdr
	resp, err := client.Do(req)
	if err != nil {
		b.Fatal(err)
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b.Fatalf("GET %s: %d", url, resp.StatusCode)
	}
}

// BenchmarkFrontDoors measures, in one run against one daemon, a cached
// credential fetch through each front door by a client in this process
// (one at a time: the latency of one fetch): the IMDS GET of the
// credential document (keep-alive, session token reused), the container
// endpoint's GET (keep-alive, the workload's token), a bare net/http server
// answering the same container document (the ceiling), the
// credential_process round trip over the unix socket (connect, one
// request, the answer), and `imdsproxy credential-process` as an SDK runs
// it (a process per fetch).
func BenchmarkFrontDoors(b *testing.B) {
	f := startFrontDaemon(b)
	client := &http.Client{Transport: &http.Transport{Proxy: nil, MaxIdleConnsPerHost: 1}}
	defer client.CloseIdleConnections()

	b.Run("imds-get", func(b *testing.B) {
		req, _ := http.NewRequest(http.MethodPut, f.imds+"/latest/api/token", nil)
		req.Header.Set("X-Aws-Ec2-Metadata-Token-Ttl-Seconds", "21600")
		resp, err := client.Do(req)
		if err != nil {
			b.Fatal(err)
		}
		tok, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		hdr := http.Header{"X-Aws-Ec2-Metadata-Token": {string(tok)}}
		url := f.imds + "/latest/meta-data/iam/security-credentials/bench"
		lat := make(latencies, 0, 1<<16)
		for b.Loop() {
			t := time.Now()
			getOK(b, client, url, hdr)
			lat = append(lat, time.Since(t))
		}
		lat.report(b)
	})
	b.Run("container-get", func(b *testing.B) {
		hdr := http.Header{"Authorization": {f.token}}
		lat := make(latencies, 0, 1<<16)
		for b.Loop() {
			t := time.Now()
			getOK(b, client, f.container, hdr)
			lat = append(lat, time.Since(t))
		}
		lat.report(b)
	})
	b.Run("container-get-ceiling", func(b *testing.B) {
		doc := container.Document(creds.Credentials{AccessKeyID: "ASIABENCH0000000000", SecretAccessKey: strings.Repeat("s", 40),
			SessionToken: strings.Repeat("t", 900), Expires: time.Now().Add(time.Hour), AccountID: "333333333333"})
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "application/json")
			_, _ = w.Write(doc)
		}))
		defer srv.Close()
		hdr := http.Header{"Authorization": {f.token}}
		lat := make(latencies, 0, 1<<16)
		for b.Loop() {
			t := time.Now()
			getOK(b, client, srv.URL+"/v1/credentials", hdr)
			lat = append(lat, time.Since(t))
		}
		lat.report(b)
	})
	b.Run("process-roundtrip", func(b *testing.B) {
		o := credproc.Options{Socket: f.socket, Timeout: 10 * time.Second}
		lat := make(latencies, 0, 1<<16)
		for b.Loop() {
			t := time.Now()
			if _, err := credproc.Fetch(context.Background(), o); err != nil {
				b.Fatal(err)
			}
			lat = append(lat, time.Since(t))
		}
		lat.report(b)
	})
	b.Run("process-exec", func(b *testing.B) {
		lat := make(latencies, 0, 1024)
		for b.Loop() {
			t := time.Now()
			out, err := exec.Command(f.bin, "credential-process", "--socket", f.socket).Output()
			if err != nil || !strings.HasPrefix(string(out), `{"Version":1,`) {
				b.Fatalf("credential-process: %v", err)
			}
			lat = append(lat, time.Since(t))
		}
		lat.report(b)
	})
}
