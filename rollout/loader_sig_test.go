package rollout

import (
	"context"
	"crypto/ed25519"
	"github.com/imdsproxy/imdsproxy/exchange"
	"io/fs"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	fakes3 "github.com/imdsproxy/imdsproxy/test/fakes/s3"
)

// store is where a test publishes a policy and its signature: a file, an
// https server or an S3 bucket, behind the same two methods.
type store interface {
	source() string
	put(name, data string) // name is "policy" or "sig"
	remove(name string)
}

type fileStore struct{ path string }

func (s *fileStore) source() string { return s.path }
func (s *fileStore) file(name string) string {
	if name == "sig" {
		return s.path + ".sig"
	}
	return s.path
}
func (s *fileStore) put(name, data string) {
	if err := os.WriteFile(s.file(name), []byte(data), 0o644); err != nil {
		panic(err)
	}
}
func (s *fileStore) remove(name string) { os.Remove(s.file(name)) }

type httpStore struct {
	srv     *httptest.Server
	mu      sync.Mutex
	objects map[string]string
}

func (s *httpStore) source() string {
	return s.srv.URL + "/fleet/rollout.yaml?X-Amz-Signature=presigned"
}
func (s *httpStore) path(name string) string {
	if name == "sig" {
		return "/fleet/rollout.yaml.sig"
	}
	return "/fleet/rollout.yaml"
}
func (s *httpStore) put(name, data string) {
	s.mu.Lock()
	s.objects[s.path(name)] = data
	s.mu.Unlock()
}
func (s *httpStore) remove(name string) { s.mu.Lock(); delete(s.objects, s.path(name)); s.mu.Unlock() }
func (s *httpStore) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	d, ok := s.objects[r.URL.Path]
	s.mu.Unlock()
	if !ok || r.URL.Query().Get("X-Amz-Signature") != "presigned" {
		http.NotFound(w, r)
		return
	}
	_, _ = w.Write([]byte(d))
}

type s3Store struct{ fake *fakes3.Server }

func (s *s3Store) source() string { return "s3://fleet-config/imdsproxy/rollout.yaml" }
func (s *s3Store) key(name string) string {
	if name == "sig" {
		return "imdsproxy/rollout.yaml.sig"
	}
	return "imdsproxy/rollout.yaml"
}
func (s *s3Store) put(name, data string) { s.fake.Put("fleet-config", s.key(name), []byte(data)) }
func (s *s3Store) remove(name string)    { s.fake.Delete("fleet-config", s.key(name)) }

// isolateAWS keeps the SDK's default configuration away from the host's.
func isolateAWS(t *testing.T, endpoint string) {
	dir := t.TempDir()
	for k, v := range map[string]string{
		"AWS_CONFIG_FILE": dir + "/config", "AWS_SHARED_CREDENTIALS_FILE": dir + "/credentials",
		"AWS_ENDPOINT_URL_S3": endpoint, "AWS_ENDPOINT_URL": "", "AWS_PROFILE": "", "AWS_REGION": "us-east-1",
		"AWS_MAX_ATTEMPTS": "1", "HTTP_PROXY": "", "HTTPS_PROXY": "",
	} {
		t.Setenv(k, v)
	}
}

// stores returns one store of each kind, and the loader options to read it.
func stores(t *testing.T) map[string]func() (store, LoaderOptions) {
	return map[string]func() (store, LoaderOptions){
		"file": func() (store, LoaderOptions) {
			return &fileStore{path: filepath.Join(t.TempDir(), "rollout.yaml")}, LoaderOptions{}
		},
		"https": func() (store, LoaderOptions) {
			s := &httpStore{objects: map[string]string{}}
			s.srv = httptest.NewTLSServer(s)
			t.Cleanup(s.srv.Close)
			return s, LoaderOptions{HTTPClient: s.srv.Client()}
		},
		"s3": func() (store, LoaderOptions) {
			fake := fakes3.Start(t)
			fake.Allow("AKIDROLLOUTTEST")
			isolateAWS(t, fake.URL)
			g, err := exchange.NewS3Objects(context.Background(), credentials.NewStaticCredentialsProvider("AKIDROLLOUTTEST", "secret", ""), "us-east-1")
			if err != nil {
				t.Fatal(err)
			}
			return &s3Store{fake: fake}, LoaderOptions{S3: g}
		},
	}
}

// refused returns imdsproxy_rollout_policy_refused_total{reason}.
func refused(t *testing.T, reg *prometheus.Registry, reason string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != "imdsproxy_rollout_policy_refused_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "reason" && l.GetValue() == reason {
					return m.GetCounter().GetValue()
				}
			}
		}
	}
	t.Fatalf("no imdsproxy_rollout_policy_refused_total{reason=%q}", reason)
	return 0
}

// TestLoaderSignatures: with keys configured, a policy is applied only
// when its detached signature verifies with one of them, checked before it
// is parsed; anything else is refused with the reason in the metric and
// the status, and the last good policy stays, for every kind of source.
func TestLoaderSignatures(t *testing.T) {
	for kind, mk := range stores(t) {
		t.Run(kind, func(t *testing.T) {
			st, opts := mk()
			pubOld, privOld := newKey(t)
			pubNew, privNew := newKey(t)
			_, privRogue := newKey(t)
			opts.PolicyKeys = []ed25519.PublicKey{pubOld, pubNew}
			reg := prometheus.NewPedanticRegistry()
			l, err := NewLoader(st.source(), opts, nil, reg)
			if err != nil {
				t.Fatal(err)
			}
			l.sigRetryDelay = time.Millisecond
			ctx := context.Background()
			publish := func(policy string, priv ed25519.PrivateKey) {
				st.put("policy", policy)
				st.put("sig", string(SignPolicy(priv, []byte(policy))))
			}

			publish(policyV1, privOld)
			if err := l.Load(ctx); err != nil {
				t.Fatalf("signed policy refused: %v", err)
			}
			// Rotation: signed by the new key, both configured.
			publish(policyV2, privNew)
			if err := l.Load(ctx); err != nil {
				t.Fatalf("policy signed by the second key refused: %v", err)
			}
			want := func(reason, inError string) {
				t.Helper()
				before := refused(t, reg, reason)
				err := l.Load(ctx)
				if reasonOf(err) != reason || !strings.Contains(err.Error(), inError) {
					t.Fatalf("Load = %v, want reason %s saying %q", err, reason, inError)
				}
				p, status := l.Current()
				if p.Version != "v2" || status.Reason != reason || !strings.Contains(status.LastError, inError) {
					t.Fatalf("after a refused load: policy %s, status %+v", p.Version, status)
				}
				if strings.Contains(status.LastError, "presigned") {
					t.Fatalf("LastError shows the URL's query: %s", status.LastError)
				}
				if got := refused(t, reg, reason); got != before+1 {
					t.Fatalf("refused{%s} = %v, want %v", reason, got, before+1)
				}
			}
			// The kill switch by someone without the key.
			const killAll = "version: evil\nkill_switch: true\n"
			st.put("policy", killAll)
			want(ReasonBadSignature, "does not verify") // the old signature
			st.put("sig", string(SignPolicy(privRogue, []byte(killAll))))
			want(ReasonUnknownKey, "unknown key")
			st.remove("sig")
			want(ReasonUnsigned, "no signature")
			st.put("sig", "ed25519 garbage\n")
			want(ReasonBadSignature, "signature file")
			// Checked before parsing: an invalid policy with a bad
			// signature is a signature failure, and with a good one a
			// parse failure.
			st.put("policy", badDoc)
			want(ReasonBadSignature, "signature")
			publish(badDoc, privNew)
			want(ReasonInvalid, "default")

			publish(policyV1, privNew)
			if err := l.Load(ctx); err != nil {
				t.Fatalf("recovery: %v", err)
			}
			if p, status := l.Current(); p.Version != "v1" || status.Reason != "" || status.LastError != "" {
				t.Fatalf("after recovery: %s %+v", p.Version, status)
			}
			if problems, err := testutil.GatherAndLint(reg); err != nil || len(problems) > 0 {
				t.Fatalf("lint: %v %v", problems, err)
			}
			// The existing metrics keep their names and meaning.
			if got := testutil.ToFloat64(l.loads.WithLabelValues("failure")); got != 6 {
				t.Fatalf("loads{failure} = %v, want 6", got)
			}
		})
	}
}

// TestLoaderWithoutKeysIgnoresSignatures: no keys, today's behaviour: an
// unsigned policy loads and a .sig beside it is not even read.
func TestLoaderWithoutKeysIgnoresSignatures(t *testing.T) {
	for kind, mk := range stores(t) {
		t.Run(kind, func(t *testing.T) {
			st, opts := mk()
			st.put("policy", policyV1)
			st.put("sig", "garbage")
			l, err := NewLoader(st.source(), opts, nil, nil)
			if err != nil {
				t.Fatal(err)
			}
			if err := l.Load(context.Background()); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// TestLoaderSignatureRace: a host reads the new policy before the
// publisher wrote its signature; the loader fetches both again once before
// refusing, so a publication does not show as a refused load.
func TestLoaderSignatureRace(t *testing.T) {
	pub, priv := newKey(t)
	var mu sync.Mutex
	policy, sig := policyV2, string(SignPolicy(priv, []byte(policyV1)))
	reads := 0
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		defer mu.Unlock()
		if strings.HasSuffix(r.URL.Path, ".sig") {
			_, _ = w.Write([]byte(sig))
			reads++
			if reads == 1 { // the publisher catches up
				sig = string(SignPolicy(priv, []byte(policyV2)))
			}
			return
		}
		_, _ = w.Write([]byte(policy))
	}))
	t.Cleanup(srv.Close)
	l, err := NewLoader(srv.URL+"/rollout.yaml", LoaderOptions{PolicyKeys: []ed25519.PublicKey{pub}}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	l.sigRetryDelay = time.Millisecond
	if err := l.Load(context.Background()); err != nil {
		t.Fatalf("Load: %v", err)
	}
	if p, _ := l.Current(); p.Version != "v2" {
		t.Fatalf("policy %s", p.Version)
	}
}

// TestLoaderFileSafety: a local policy file that someone other than root
// or the daemon could rewrite is refused (unsafe_file), signed or not.
func TestLoaderFileSafety(t *testing.T) {
	pub, priv := newKey(t)
	for _, signed := range []bool{false, true} {
		for _, tc := range []struct {
			name    string
			mode    fs.FileMode
			dirMode fs.FileMode
			owner   int
			ok      bool
		}{
			{"0644", 0o644, 0o755, -1, true},
			{"0600", 0o600, 0o700, -1, true},
			{"group-writable", 0o664, 0o755, -1, false},
			{"world-writable", 0o646, 0o755, -1, false},
			{"another owner", 0o644, 0o755, 4242, false},
			{"open directory", 0o644, 0o777, -1, false},
			{"sticky directory", 0o644, 0o777 | fs.ModeSticky, -1, true},
		} {
			t.Run(tc.name, func(t *testing.T) {
				dir := filepath.Join(t.TempDir(), "etc")
				if err := os.Mkdir(dir, 0o700); err != nil {
					t.Fatal(err)
				}
				path := filepath.Join(dir, "rollout.yaml")
				writeFile(t, path, policyV1)
				writeFile(t, path+".sig", string(SignPolicy(priv, []byte(policyV1))))
				if err := os.Chmod(path, tc.mode); err != nil {
					t.Fatal(err)
				}
				if err := os.Chmod(dir, tc.dirMode); err != nil {
					t.Fatal(err)
				}
				if tc.owner >= 0 {
					if os.Geteuid() != 0 {
						t.Skip("chown needs root")
					}
					if err := os.Chown(path, tc.owner, tc.owner); err != nil {
						t.Fatal(err)
					}
				}
				var opts LoaderOptions
				if signed {
					opts.PolicyKeys = []ed25519.PublicKey{pub}
				}
				l, err := NewLoader(path, opts, nil, nil)
				if err != nil {
					t.Fatal(err)
				}
				err = l.Load(context.Background())
				switch {
				case tc.ok && err != nil:
					t.Fatalf("refused: %v", err)
				case !tc.ok && reasonOf(err) != ReasonUnsafeFile:
					t.Fatalf("Load = %v, want reason %s", err, ReasonUnsafeFile)
				case !tc.ok && !strings.Contains(err.Error(), "chmod") && !strings.Contains(err.Error(), "chown"):
					t.Fatalf("the error says no fix: %v", err)
				}
			})
		}
	}
}

// TestLoaderS3MissingSignatureIsUnsigned: the real S3 getter tells a
// missing signature object (NoSuchKey) from a failure to read it.
func TestLoaderS3MissingSignatureIsUnsigned(t *testing.T) {
	fake := fakes3.Start(t)
	fake.Allow("AKIDROLLOUTTEST")
	isolateAWS(t, fake.URL)
	g, err := exchange.NewS3Objects(context.Background(), credentials.NewStaticCredentialsProvider("AKIDROLLOUTTEST", "s", ""), "us-east-1")
	if err != nil {
		t.Fatal(err)
	}
	pub, _ := newKey(t)
	fake.Put("b", "p.yaml", []byte(policyV1))
	l, err := NewLoader("s3://b/p.yaml", LoaderOptions{S3: g, PolicyKeys: []ed25519.PublicKey{pub}}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Load(context.Background()); reasonOf(err) != ReasonUnsigned {
		t.Fatalf("Load = %v, want %s", err, ReasonUnsigned)
	}
	// Another identity, refused by the bucket: unavailable, not unsigned.
	g2, _ := exchange.NewS3Objects(context.Background(), credentials.NewStaticCredentialsProvider("AKIDSTRANGER", "s", ""), "us-east-1")
	l2, _ := NewLoader("s3://b/p.yaml", LoaderOptions{S3: g2, PolicyKeys: []ed25519.PublicKey{pub}}, nil, nil)
	if err := l2.Load(context.Background()); reasonOf(err) != ReasonUnavailable {
		t.Fatalf("Load = %v, want %s", err, ReasonUnavailable)
	}
}

// TestLoaderFileSafetySymlink: a policy reached through a symbolic link is
// refused when the link's directory is open to others (they could point
// it elsewhere), and accepted when both directories are safe.
func TestLoaderFileSafetySymlink(t *testing.T) {
	base := t.TempDir()
	safe := filepath.Join(base, "safe")
	open := filepath.Join(base, "open")
	for _, d := range []string{safe, open} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Chmod(open, 0o777); err != nil {
		t.Fatal(err)
	}
	target := filepath.Join(safe, "rollout.yaml")
	writeFile(t, target, policyV1)
	for link, ok := range map[string]bool{filepath.Join(safe, "link.yaml"): true, filepath.Join(open, "link.yaml"): false} {
		if err := os.Symlink(target, link); err != nil {
			t.Fatal(err)
		}
		l, err := NewLoader(link, LoaderOptions{}, nil, nil)
		if err != nil {
			t.Fatal(err)
		}
		err = l.Load(context.Background())
		if ok != (err == nil) || (!ok && reasonOf(err) != ReasonUnsafeFile) {
			t.Errorf("%s: Load = %v, want ok=%v", link, err, ok)
		}
	}
}
