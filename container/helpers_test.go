package container

import (
	"bytes"
	"context"
	"errors"
	"net"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/imdsproxy/imdsproxy/access"
	"github.com/imdsproxy/imdsproxy/config"
	"github.com/imdsproxy/imdsproxy/creds"
	"github.com/imdsproxy/imdsproxy/peer"
)

// via is a stand-in exchange: keys of different vias are different keys.
type via struct{ name string }

func (v *via) Fetch(context.Context, creds.Role) (creds.Credentials, error) {
	return creds.Credentials{}, errors.New("not used")
}

var (
	src     = &via{"workload"}
	hostKey = creds.Key{Kind: creds.KindWorkload, Role: creds.Role{Name: "app", ARN: "arn:aws:iam::222222222222:role/app"}, Via: src}
)

func wkey(name string) creds.Key {
	return creds.Key{Kind: creds.KindWorkload, Role: creds.Role{Name: name, ARN: "arn:aws:iam::333333333333:role/" + name}, Via: src}
}

func uidp(u int) *int { return &u }

// owner is u as the owner of a token file: u when the test runs as root
// (it may give files away), else the test's own uid.
func owner(u int) int {
	if os.Geteuid() == 0 {
		return u
	}
	return os.Geteuid()
}

// The workloads of the tests: billing by uid 64101, backup by its unit.
var testWorkloads = []access.Workload{
	{UID: uidp(64101), Role: config.Role{Name: "billing"}},
	{Unit: "backup.service", Role: config.Role{Name: "backup"}},
}

func testPlan(t testing.TB, lists access.Section) *access.Plan {
	t.Helper()
	p, err := access.NewPlan(access.PlanConfig{
		Host: hostKey, Serve: creds.KindWorkload, Access: lists,
		Workloads: testWorkloads, WorkloadKeys: []creds.Key{wkey("billing"), wkey("backup")},
	}, nil, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// fakeSource answers every key with credentials of its own, or err.
type fakeSource struct {
	mu  sync.Mutex
	err error
	n   int
}

func (f *fakeSource) GetWithin(_ context.Context, k creds.Key, _ time.Duration) (creds.Credentials, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.n++
	if f.err != nil {
		return creds.Credentials{}, f.err
	}
	return credsOf(k.Role.Name), nil
}

func credsOf(role string) creds.Credentials {
	return creds.Credentials{
		AccessKeyID: "ASIA" + role, SecretAccessKey: "secret-of-" + role + "/+", SessionToken: "session-of-" + role + "==",
		Expires: time.Now().Add(time.Hour), LastUpdated: time.Now(), AccountID: "333333333333",
		RoleARN: "arn:aws:sts::333333333333:assumed-role/" + role + "/host",
	}
}

// fakeID is an Identifier answering info (or err) for every connection.
type fakeID struct {
	mu   sync.Mutex
	info peer.Info
	err  error
	n    int
}

func (f *fakeID) LookupConn(context.Context, net.Conn) (peer.Info, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.n++
	return f.info, f.err
}

func (f *fakeID) Process(_ context.Context, info peer.Info) peer.Info {
	info.PID, info.Exe = 4242, "/usr/bin/app"
	return info
}

func (f *fakeID) set(info peer.Info, err error) {
	f.mu.Lock()
	f.info, f.err = info, err
	f.mu.Unlock()
}

// syncBuf is a log sink safe for concurrent use.
type syncBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuf) Write(p []byte) (int, error) { s.mu.Lock(); defer s.mu.Unlock(); return s.b.Write(p) }
func (s *syncBuf) String() string              { s.mu.Lock(); defer s.mu.Unlock(); return s.b.String() }

func debugLogger(buf *syncBuf) *zap.Logger {
	return zap.New(zapcore.NewCore(zapcore.NewJSONEncoder(zap.NewProductionEncoderConfig()), zapcore.AddSync(buf), zap.DebugLevel))
}

// env is a Server with its tokens in a temporary directory, served on
// loopback.
type env struct {
	srv    *Server
	tokens *Tokens
	src    *fakeSource
	id     *fakeID
	reg    *prometheus.Registry
	log    *syncBuf
	dir    string
	url    string
	addr   string
}

// newEnv builds the env and serves it; each of opts is applied to the
// Server before Serve.
func newEnv(t *testing.T, lists access.Section, opts ...func(*Server)) *env {
	t.Helper()
	e := &env{src: &fakeSource{}, id: &fakeID{err: peer.ErrNotFound}, reg: prometheus.NewRegistry(), log: &syncBuf{}, dir: t.TempDir()}
	log := debugLogger(e.log)
	broker, err := access.NewBroker(e.src, log, log.Named("audit"), e.reg)
	if err != nil {
		t.Fatal(err)
	}
	e.tokens, err = NewTokens(e.dir+"/tokens", time.Hour, time.Minute, log)
	if err != nil {
		t.Fatal(err)
	}
	e.srv, err = New(Config{Plan: testPlan(t, lists), Path: DefaultPath}, e.tokens, broker, e.id, log, e.reg)
	if err != nil {
		t.Fatal(err)
	}
	if err := e.tokens.Sync(map[string]int{"uid:64101": owner(64101), "backup.service": owner(0)}); err != nil {
		t.Fatal(err)
	}
	for _, o := range opts {
		o(e.srv)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	e.addr = ln.Addr().String()
	e.url = "http://" + e.addr + DefaultPath
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- e.srv.Serve(ctx, ln) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	})
	return e
}

var netTCPAddr127 = net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 8171}

func testutilGauge(tk *Tokens) float64 { return testutil.ToFloat64(tk.m.tokens) }
