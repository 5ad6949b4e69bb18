package e2e

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"strconv"
	"sync"
	"time"
)

// AEMMInstanceID is the instance id amazon-ec2-metadata-mock and
// StandInIMDS serve.
const AEMMInstanceID = "i-1234567890abcdef0"

// StandInIMDS serves the few paths the tests pass through, with the same
// values as amazon-ec2-metadata-mock, IMDSv2 only.
func StandInIMDS() http.Handler {
	doc := `{
	"accountId": "0123456789",
	"availabilityZone": "us-east-1f",
	"instanceId": "` + AEMMInstanceID + `",
	"instanceType": "m4.xlarge",
	"region": "us-east-1"
}`
	var mu sync.Mutex
	tokens := map[string]time.Time{}
	mux := http.NewServeMux()
	mux.HandleFunc("PUT "+TokenPath, func(w http.ResponseWriter, r *http.Request) {
		ttl, err := strconv.Atoi(r.Header.Get(TTLHeader))
		if err != nil || ttl < 1 || ttl > 21600 {
			http.Error(w, "bad ttl", http.StatusBadRequest)
			return
		}
		tok := strconv.FormatInt(time.Now().UnixNano(), 36)
		mu.Lock()
		tokens[tok] = time.Now().Add(time.Duration(ttl) * time.Second)
		mu.Unlock()
		w.Header().Set(TTLHeader, strconv.Itoa(ttl))
		_, _ = io.WriteString(w, tok)
	})
	serve := func(body string) http.HandlerFunc {
		return func(w http.ResponseWriter, r *http.Request) {
			mu.Lock()
			exp, ok := tokens[r.Header.Get(TokenHeader)]
			mu.Unlock()
			if !ok || time.Now().After(exp) {
				http.Error(w, "401 - Unauthorized", http.StatusUnauthorized)
				return
			}
			_, _ = io.WriteString(w, body)
		}
	}
	mux.HandleFunc("GET /latest/meta-data/instance-id", serve(AEMMInstanceID))
	mux.HandleFunc("GET /latest/meta-data/placement/region", serve("us-east-1"))
	mux.HandleFunc("GET /latest/meta-data/placement/availability-zone", serve("us-east-1f"))
	mux.HandleFunc("GET /latest/meta-data/local-hostname", serve("ip-172-16-34-43.ec2.internal"))
	mux.HandleFunc("GET /latest/dynamic/instance-identity/document", serve(doc))
	return mux
}

// AEMMOptions configure StartAEMM. The zero value runs AEMMBinary on a free
// loopback port, IMDSv1 allowed, in a temporary home, with a minimal
// environment, its output kept in a LockedBuffer.
type AEMMOptions struct {
	// Bin is the binary; "" is AEMMBinary().
	Bin string
	// IMDSv2Only passes -I: requests without a session token are refused.
	IMDSv2Only bool
	// Home is its HOME and working directory (it reads
	// $HOME/aemm-config.json); "" is a new temporary directory, removed by
	// Stop.
	Home string
	// Env is its environment; HOME is added. nil is PATH=/usr/bin:/bin and
	// NO_PROXY=*.
	Env []string
	// Command builds the command (to run it through taskset, say); nil is
	// exec.Command.
	Command func(name string, args ...string) *exec.Cmd
	// Out receives its stdout and stderr; nil is a new LockedBuffer.
	Out interface {
		io.Writer
		String() string
	}
}

// AEMM is a running amazon-ec2-metadata-mock.
type AEMM struct {
	// URL is where it serves (http://127.0.0.1:PORT).
	URL string
	// Bin is the binary it runs.
	Bin string
	// Token is an IMDSv2 session token it issued, valid for 6 hours.
	Token string
	// Proc is the process.
	Proc *Process
	// Out holds its output.
	Out interface {
		io.Writer
		String() string
	}
	tmpHome string // removed by Stop
}

// StartAEMM starts amazon-ec2-metadata-mock on a free loopback port and
// waits up to 10 s until it issues a session token.
func StartAEMM(o AEMMOptions) (*AEMM, error) {
	if o.Bin == "" {
		o.Bin = AEMMBinary()
	}
	if o.Command == nil {
		o.Command = exec.Command
	}
	if o.Out == nil {
		o.Out = &LockedBuffer{}
	}
	if o.Env == nil {
		o.Env = []string{"PATH=/usr/bin:/bin", "NO_PROXY=*"}
	}
	a := &AEMM{Bin: o.Bin, Out: o.Out}
	port, err := FreePort()
	if err != nil {
		return nil, err
	}
	a.URL = "http://127.0.0.1:" + strconv.Itoa(port)
	if o.Home == "" {
		if o.Home, err = os.MkdirTemp("", "imdsproxy-e2e-aemm-"); err != nil {
			return nil, err
		}
		a.tmpHome = o.Home
	}
	args := []string{"-n", "127.0.0.1", "-p", strconv.Itoa(port)}
	if o.IMDSv2Only {
		args = append(args, "-I")
	}
	cmd := o.Command(o.Bin, args...)
	cmd.Env = append(append([]string(nil), o.Env...), "HOME="+o.Home)
	cmd.Dir = o.Home
	cmd.Stdout, cmd.Stderr = o.Out, o.Out
	if a.Proc, err = Start(cmd); err != nil {
		a.Stop(0)
		return nil, fmt.Errorf("start %s: %w", o.Bin, err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		tok, err := IMDSToken(context.Background(), Client, a.URL, 21600)
		if err == nil && tok != "" {
			a.Token = tok
			return a, nil
		}
		if a.Proc.Exited() || time.Now().After(deadline) {
			a.Stop(5 * time.Second)
			return nil, fmt.Errorf("%s did not issue a token at %s within 10s (last: %v; %s):\n%s", o.Bin, a.URL, err, a.Proc.State(), o.Out)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Stop stops it (SIGTERM, killed after timeout) and removes its temporary
// home. A nil *AEMM is stopped already.
func (a *AEMM) Stop(timeout time.Duration) {
	if a == nil {
		return
	}
	if a.Proc != nil {
		a.Proc.Stop(timeout)
	}
	if a.tmpHome != "" {
		os.RemoveAll(a.tmpHome)
	}
}

// Upstream is the stand-in for the real IMDS that the end-to-end tests share:
// amazon-ec2-metadata-mock in IMDSv2-only mode, or StandInIMDS when that is
// not installed.
type Upstream struct {
	// URL is where it serves (http://127.0.0.1:PORT).
	URL string
	// Kind says which it is, for logs: "amazon-ec2-metadata-mock (…)" or
	// "httptest stand-in (…)".
	Kind string

	aemm *AEMM
	srv  *httptest.Server
	err  error
}

// Stop stops it.
func (u *Upstream) Stop() {
	u.aemm.Stop(5 * time.Second)
	if u.srv != nil {
		u.srv.Close()
	}
}

var (
	upMu     sync.Mutex
	upstream *Upstream
)

// SharedUpstream returns the upstream IMDS shared by every test of the
// process, starting it on first use; Cleanup stops it. Without
// amazon-ec2-metadata-mock (AEMMBinary) it warns on stderr and serves
// StandInIMDS. An error to start it is returned on every call.
func SharedUpstream() (*Upstream, error) {
	upMu.Lock()
	defer upMu.Unlock()
	if upstream == nil {
		upstream = startUpstream()
	}
	return upstream, upstream.err
}

func startUpstream() *Upstream {
	bin := AEMMBinary()
	if _, err := os.Stat(bin); err != nil {
		fmt.Fprintf(os.Stderr, "e2e: WARNING: %s not found; using the httptest IMDS stand-in. `make test` installs amazon-ec2-metadata-mock v1.13.0.\n", bin)
		srv := httptest.NewServer(StandInIMDS())
		return &Upstream{URL: srv.URL, Kind: "httptest stand-in (amazon-ec2-metadata-mock NOT installed)", srv: srv}
	}
	u := &Upstream{Kind: "amazon-ec2-metadata-mock (" + bin + ", -I IMDSv2 only)"}
	u.aemm, u.err = StartAEMM(AEMMOptions{Bin: bin, IMDSv2Only: true})
	if u.err == nil {
		u.URL = u.aemm.URL
	}
	return u
}
