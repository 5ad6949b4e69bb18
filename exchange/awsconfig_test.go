package exchange

import (
	"bytes"
	"context"
	"encoding/pem"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/imdsproxy/imdsproxy/creds"
)

// noRegionEnv leaves the SDK no way to find a region: no AWS_REGION or
// AWS_DEFAULT_REGION, empty shared config and credentials files, and an
// IMDS (which must never be asked) that would answer. It returns the IMDS
// request counter and the path of the (empty) shared config file.
func noRegionEnv(t *testing.T) (imdsCalls func() int, configFile string) {
	t.Helper()
	isolateAWSEnv(t)
	unsetenv(t, "AWS_REGION")
	unsetenv(t, "AWS_DEFAULT_REGION")
	dir := t.TempDir()
	configFile = filepath.Join(dir, "config")
	for _, f := range []string{configFile, filepath.Join(dir, "credentials")} {
		if err := os.WriteFile(f, nil, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	t.Setenv("AWS_CONFIG_FILE", configFile)
	t.Setenv("AWS_SHARED_CREDENTIALS_FILE", filepath.Join(dir, "credentials"))
	var calls atomic.Int32
	srv := newIMDS(t, "i-0abc", &calls)
	t.Setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", srv.URL)
	return func() int { return int(calls.Load()) }, configFile
}

// regionClients builds every aws-sdk-go-v2 based client of the package with
// region ("" for the SDK's default configuration).
var regionClients = []struct {
	name string
	new  func(ctx context.Context, region string) error
}{
	{"NewWebIdentity", func(ctx context.Context, region string) error {
		_, err := NewWebIdentity(ctx, WebIdentityConfig{Region: region}, &tokenSource{tokens: []string{testJWT}}, nil)
		return err
	}},
	{"NewAssumeRole base", func(ctx context.Context, region string) error {
		_, err := NewAssumeRole(ctx, AssumeRoleConfig{Region: region, Base: staticBase("AKIALONGTERMBASEKEY0", "secret")}, nil)
		return err
	}},
	{"NewAssumeRole SDK chain", func(ctx context.Context, region string) error {
		_, err := NewAssumeRole(ctx, AssumeRoleConfig{Region: region}, nil)
		return err
	}},
	{"NewCallerIdentity", func(ctx context.Context, region string) error {
		_, err := NewCallerIdentity(ctx, region, 0)
		return err
	}},
}

// TestErrNoRegion: without Region, AWS_REGION or a region in the shared
// config, every client builder fails with ErrNoRegion, whose message tells
// both ways to set one, and IMDS is not asked. Each of the three ways to name
// a region works.
func TestErrNoRegion(t *testing.T) {
	for _, tc := range regionClients {
		t.Run(tc.name, func(t *testing.T) {
			imdsCalls, configFile := noRegionEnv(t)
			err := tc.new(context.Background(), "")
			if !errors.Is(err, ErrNoRegion) {
				t.Fatalf("err = %v, want ErrNoRegion", err)
			}
			for _, want := range []string{"region:", "AWS_REGION"} {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("error %q does not mention %q", err, want)
				}
			}
			if n := imdsCalls(); n != 0 {
				t.Errorf("IMDS asked %d times for a region", n)
			}

			if err := tc.new(context.Background(), "eu-central-1"); err != nil {
				t.Errorf("explicit region: %v", err)
			}
			if err := os.WriteFile(configFile, []byte("[default]\nregion = eu-north-1\n"), 0o600); err != nil {
				t.Fatal(err)
			}
			if err := tc.new(context.Background(), ""); err != nil {
				t.Errorf("region from the shared config: %v", err)
			}
			if err := os.WriteFile(configFile, nil, 0o600); err != nil {
				t.Fatal(err)
			}
			t.Setenv("AWS_REGION", "ap-southeast-2")
			if err := tc.new(context.Background(), ""); err != nil {
				t.Errorf("AWS_REGION: %v", err)
			}
			if n := imdsCalls(); n != 0 {
				t.Errorf("IMDS asked %d times", n)
			}
		})
	}
}

// countingListener counts the bytes the server managed to write to its
// connections (into the kernel), whatever the handler believed it wrote.
type countingListener struct {
	net.Listener
	written *atomic.Int64
}

func (l countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	// A small send buffer keeps the kernel from absorbing megabytes the
	// client never reads, so that written is close to what was read.
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.SetWriteBuffer(64 << 10)
	}
	return countingConn{Conn: c, written: l.written}, nil
}

type countingConn struct {
	net.Conn
	written *atomic.Int64
}

func (c countingConn) Write(p []byte) (int, error) {
	n, err := c.Conn.Write(p)
	c.written.Add(int64(n))
	return n, err
}

// hugeAnswer is an answer of fill bytes of 'A' between prefix and suffix.
type hugeAnswer struct {
	status         int
	prefix, suffix string
	fill           int64
	contentLength  bool // announce the length; else chunked
}

// requestSettle is how long hugeServer waits before answering.
const requestSettle = 20 * time.Millisecond

// hugeServer streams a hugeAnswer to every request on loopback and counts
// what it wrote.
type hugeServer struct {
	srv      *httptest.Server
	written  atomic.Int64
	requests atomic.Int32
}

func newHugeServer(t *testing.T, a hugeAnswer) *hugeServer {
	h := &hugeServer{}
	h.srv = httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		h.requests.Add(1)
		// Let the client's transport finish writing the request before
		// the answer arrives (see sdkEarlyCloseFlake).
		select {
		case <-time.After(requestSettle):
		case <-r.Context().Done():
			return
		}
		w.Header().Set("Content-Type", "text/xml")
		if a.contentLength {
			w.Header().Set("Content-Length", strconv.FormatInt(int64(len(a.prefix)+len(a.suffix))+a.fill, 10))
		}
		w.WriteHeader(a.status)
		if _, err := io.WriteString(w, a.prefix); err != nil {
			return
		}
		chunk := bytes.Repeat([]byte("A"), 64<<10)
		for left := a.fill; left > 0; {
			n := min(left, int64(len(chunk)))
			if _, err := w.Write(chunk[:n]); err != nil || r.Context().Err() != nil {
				return // the client went away
			}
			left -= n
		}
		_, _ = io.WriteString(w, a.suffix)
	}))
	h.srv.Listener = countingListener{Listener: h.srv.Listener, written: &h.written}
	h.srv.Start()
	t.Cleanup(h.srv.Close)
	return h
}

// TestResponseBodyLimit: an STS (or endpoint override, or proxy) that
// answers hundreds of megabytes — as an error document or as one huge
// element of a 200 answer, chunked or with a Content-Length — costs the
// daemon at most about MaxResponseBody per attempt: every client of the
// package fails with class invalid_response once the limit is passed and
// stops reading, so the server can write only a few MiB.
func TestResponseBodyLimit(t *testing.T) {
	const fill = 300 << 20 // 300 MB
	// maxWritten is far below fill yet leaves room for 1 MiB per SDK
	// attempt plus what loopback socket buffers absorb before the client
	// closes the connection.
	const maxWritten = 8 << 20
	exp := time.Now().Add(time.Hour).UTC().Format(time.RFC3339)
	success := func(action, element string) (prefix, suffix string) {
		prefix = `<` + action + `Response xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><` + action + `Result>`
		suffix = `</` + action + `Result><ResponseMetadata><RequestId>1</RequestId></ResponseMetadata></` + action + `Response>`
		switch element {
		case "SecretAccessKey":
			prefix += `<AssumedRoleUser><Arn>` + testAssumedARN + `</Arn><AssumedRoleId>AROA:x</AssumedRoleId></AssumedRoleUser>` +
				`<Credentials><AccessKeyId>` + testAccessKey + `</AccessKeyId><SessionToken>` + testSessionToken + `</SessionToken>` +
				`<Expiration>` + exp + `</Expiration><SecretAccessKey>`
			suffix = `</SecretAccessKey></Credentials>` + suffix
		case "Arn":
			prefix += `<Account>222222222222</Account><UserId>AROA:x</UserId><Arn>`
			suffix = `</Arn>` + suffix
		}
		return prefix, suffix
	}
	errPrefix := `<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><Error><Type>Sender</Type><Code>ValidationError</Code><Message>`
	errSuffix := `</Message></Error><RequestId>1</RequestId></ErrorResponse>`

	type client struct {
		name    string
		element string // the huge element of a 200 answer
		action  string
		call    func(t *testing.T, url string) error
	}
	clients := []client{
		{"WebIdentity.Fetch", "SecretAccessKey", "AssumeRoleWithWebIdentity", func(t *testing.T, url string) error {
			w := newTestWebIdentity(t, url, WebIdentityConfig{Timeout: time.Minute}, &tokenSource{tokens: []string{testJWT}}, nil)
			_, err := w.Fetch(context.Background(), testRole)
			return err
		}},
		{"AssumeRole.Fetch", "SecretAccessKey", "AssumeRole", func(t *testing.T, url string) error {
			isolateAWSEnv(t)
			t.Setenv("AWS_ENDPOINT_URL_STS", url)
			a, err := NewAssumeRole(context.Background(), AssumeRoleConfig{Timeout: time.Minute, Base: staticBase("AKIALONGTERMBASEKEY0", "secret")}, nil)
			if err != nil {
				t.Fatal(err)
			}
			_, err = a.Fetch(context.Background(), testRole)
			return err
		}},
		{"CallerIdentity.Verify", "Arn", "GetCallerIdentity", func(t *testing.T, url string) error {
			isolateAWSEnv(t)
			t.Setenv("AWS_ENDPOINT_URL_STS", url)
			v, err := NewCallerIdentity(context.Background(), "", time.Minute)
			if err != nil {
				t.Fatal(err)
			}
			_, err = v.Verify(context.Background(), creds.Credentials{AccessKeyID: testAccessKey, SecretAccessKey: testSecretKey,
				SessionToken: testSessionToken, Expires: time.Now().Add(time.Hour)})
			return err
		}},
	}
	for _, c := range clients {
		okPrefix, okSuffix := success(c.action, c.element)
		for _, a := range []struct {
			name string
			hugeAnswer
		}{
			{"error body chunked", hugeAnswer{status: 400, prefix: errPrefix, suffix: errSuffix, fill: fill}},
			{"error body with length", hugeAnswer{status: 400, prefix: errPrefix, suffix: errSuffix, fill: fill, contentLength: true}},
			{"500 error body", hugeAnswer{status: 500, prefix: errPrefix, suffix: errSuffix, fill: fill}},
			{"200 huge " + c.element + " chunked", hugeAnswer{status: 200, prefix: okPrefix, suffix: okSuffix, fill: fill}},
			{"200 huge " + c.element + " with length", hugeAnswer{status: 200, prefix: okPrefix, suffix: okSuffix, fill: fill, contentLength: true}},
		} {
			t.Run(c.name+"/"+a.name, func(t *testing.T) {
				for try := 1; ; try++ {
					h := newHugeServer(t, a.hugeAnswer)
					start := time.Now()
					err := c.call(t, h.srv.URL)
					took := time.Since(start)
					written, requests := h.written.Load(), h.requests.Load()
					t.Logf("%d request(s), server wrote %.1f MiB, took %v", requests, float64(written)/(1<<20), took)
					if written > maxWritten || requests > DefaultMaxAttempts {
						t.Errorf("server wrote %d bytes in %d request(s) before the client stopped reading, want < %d in at most %d",
							written, requests, maxWritten, DefaultMaxAttempts)
					}
					if sdkEarlyCloseFlake(err) && try < 3 {
						t.Logf("try %d: %v (aws-sdk-go-v2 closed the connection early; trying again)", try, err)
						continue
					}
					var e *Error
					if !errors.As(err, &e) {
						t.Fatalf("err = %v, want an *Error", err)
					}
					if e.Class != ClassInvalidResponse || e.Permanent() {
						t.Errorf("class %s permanent %v: %v; want invalid_response, retryable", e.Class, e.Permanent(), err)
					}
					if !strings.Contains(err.Error(), strconv.Itoa(MaxResponseBody)) {
						t.Errorf("error %q does not name the limit", err)
					}
					// Generous: this only catches a client that waits for
					// its timeout instead of giving up at the limit.
					if took > 30*time.Second {
						t.Errorf("took %v", took)
					}
					return
				}
			})
		}
	}
}

// sdkEarlyCloseFlake reports the failure of aws-sdk-go-v2 (smithy-go
// v1.28) that has nothing to do with the body limit: when an answer
// arrives before net/http finished writing the request, the SDK closes the
// request body, its WriteTo then returns io.EOF to the transport's writer,
// which closes the connection under the response being read ("use of closed
// network connection"). It needs an answer larger than the transport's read
// buffer; hugeServer's requestSettle makes it rare.
func sdkEarlyCloseFlake(err error) bool {
	return err != nil && strings.Contains(err.Error(), "use of closed network connection")
}

// TestCABundle: AWS_CA_BUNDLE (the SDK's way to trust a private CA, e.g. of
// a TLS-inspecting proxy or a private STS endpoint) keeps working with the
// package's client builder: the fake STS's certificate is trusted only
// through the bundle. (Wrapping the SDK's HTTP client to bound bodies broke
// this: LoadDefaultConfig refuses a CA bundle for a client it cannot
// configure.)
func TestCABundle(t *testing.T) {
	exp := time.Now().Add(time.Hour)
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_ = r.ParseForm()
		w.Header().Set("Content-Type", "text/xml")
		if r.Form.Get("Action") == "GetCallerIdentity" {
			_, _ = io.WriteString(w, `<GetCallerIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><GetCallerIdentityResult>`+
				`<Arn>`+testAssumedARN+`</Arn><UserId>AROA:x</UserId><Account>222222222222</Account></GetCallerIdentityResult>`+
				`<ResponseMetadata><RequestId>1</RequestId></ResponseMetadata></GetCallerIdentityResponse>`)
			return
		}
		_, _ = io.WriteString(w, stsResultXML(r.Form.Get("Action"), testAssumedARN, exp))
	}))
	t.Cleanup(srv.Close)
	bundle := filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(bundle, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw}), 0o600); err != nil {
		t.Fatal(err)
	}
	isolateAWSEnv(t)
	t.Setenv("AWS_ENDPOINT_URL_STS", srv.URL)

	w, err := NewWebIdentity(context.Background(), WebIdentityConfig{MaxAttempts: 1}, &tokenSource{tokens: []string{testJWT}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Fetch(context.Background(), testRole); err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Fatalf("without the bundle: %v, want a certificate error", err)
	}

	t.Setenv("AWS_CA_BUNDLE", bundle)
	w, err = NewWebIdentity(context.Background(), WebIdentityConfig{}, &tokenSource{tokens: []string{testJWT}}, nil)
	if err != nil {
		t.Fatalf("NewWebIdentity with AWS_CA_BUNDLE: %v", err)
	}
	if _, err := w.Fetch(context.Background(), testRole); err != nil {
		t.Fatalf("WebIdentity with AWS_CA_BUNDLE: %v", err)
	}
	a, err := NewAssumeRole(context.Background(), AssumeRoleConfig{Base: staticBase("AKIALONGTERMBASEKEY0", "secret")}, nil)
	if err != nil {
		t.Fatalf("NewAssumeRole with AWS_CA_BUNDLE: %v", err)
	}
	if _, err := a.Fetch(context.Background(), testRole); err != nil {
		t.Fatalf("AssumeRole with AWS_CA_BUNDLE: %v", err)
	}
	v, err := NewCallerIdentity(context.Background(), "", time.Minute)
	if err != nil {
		t.Fatalf("NewCallerIdentity with AWS_CA_BUNDLE: %v", err)
	}
	if arn, err := v.Verify(context.Background(), creds.Credentials{AccessKeyID: testAccessKey, SecretAccessKey: testSecretKey,
		SessionToken: testSessionToken, Expires: exp}); err != nil || arn != testAssumedARN {
		t.Fatalf("Verify with AWS_CA_BUNDLE = %q, %v", arn, err)
	}
}
