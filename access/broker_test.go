package access

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/imdsproxy/imdsproxy/creds"
	"github.com/imdsproxy/imdsproxy/peer"
)

type fakeSource struct {
	mu   sync.Mutex
	bad  map[creds.Key]bool
	asks []creds.Key
}

func (f *fakeSource) Get(ctx context.Context, k creds.Key) (creds.Credentials, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.asks = append(f.asks, k)
	if err := ctx.Err(); err != nil {
		return creds.Credentials{}, err
	}
	if f.bad[k] {
		return creds.Credentials{}, errors.New("upstream down")
	}
	return creds.Credentials{AccessKeyID: "ASIA" + strings.ToUpper(k.Role.Name), SecretAccessKey: "SECRET-" + k.Role.Name,
		SessionToken: "TOKEN-" + k.Role.Name, Expires: time.Now().Add(time.Hour), LastUpdated: time.Now().Add(-time.Minute),
		RoleARN: "arn:aws:sts::222222222222:assumed-role/" + k.Role.Name + "/s"}, nil
}

type syncBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuf) Write(p []byte) (int, error) { s.mu.Lock(); defer s.mu.Unlock(); return s.b.Write(p) }
func (s *syncBuf) String() string              { s.mu.Lock(); defer s.mu.Unlock(); return s.b.String() }

func newBroker(t *testing.T, src Source) (*Broker, *syncBuf, *prometheus.Registry) {
	t.Helper()
	buf := &syncBuf{}
	audit := zap.New(zapcore.NewCore(zapcore.NewJSONEncoder(zap.NewProductionEncoderConfig()), zapcore.AddSync(buf), zap.InfoLevel))
	reg := prometheus.NewRegistry()
	b, err := NewBroker(src, zap.NewNop(), audit, reg)
	if err != nil {
		t.Fatal(err)
	}
	return b, buf, reg
}

func TestBrokerServesAndAudits(t *testing.T) {
	src := &fakeSource{}
	b, buf, reg := newBroker(t, src)
	d := Decision{Outcome: Serve, Name: "billing", Key: wkey("billing"), Audit: true}
	c := Client{Local: true, Info: peer.Info{UID: 1001, PID: 42, Exe: "/usr/bin/aws", Unit: "billing.service"}}
	cr, err := b.Credentials(t.Context(), d, c, "imds", "credentials", "billing")
	if err != nil || cr.AccessKeyID != "ASIABILLING" {
		t.Fatalf("Credentials = %v, %v", cr, err)
	}
	line := buf.String()
	for _, want := range []string{`"uid":1001`, `"unit":"billing.service"`, `"role_name":"billing"`, `"access_key_id":"ASIABILLING"`,
		`"door":"imds"`, `"route":"credentials"`, `"kind":"cache"`} {
		if !strings.Contains(line, want) {
			t.Errorf("audit line lacks %s: %s", want, line)
		}
	}
	if strings.Contains(line, "SECRET-") || strings.Contains(line, "TOKEN-") {
		t.Fatalf("a secret reached the audit line: %s", line)
	}
	if v := testutil.ToFloat64(b.served.WithLabelValues("workload")); v != 1 {
		t.Errorf("served{workload} = %v", v)
	}
	if problems, err := testutil.GatherAndLint(reg); err != nil || len(problems) > 0 {
		t.Errorf("lint: %v %v", problems, err)
	}
	// Audit off: no line.
	d.Audit = false
	before := buf.String()
	if _, err := b.Credentials(t.Context(), d, c, "imds", "credentials", "billing"); err != nil {
		t.Fatal(err)
	}
	if buf.String() != before {
		t.Error("an audit line was written with Audit false")
	}
	if _, err := b.Credentials(t.Context(), Decision{Outcome: Deny}, c, "imds", "credentials", ""); err == nil {
		t.Error("credentials handed out for a Deny decision")
	}
}

func TestBrokerFallback(t *testing.T) {
	src := &fakeSource{bad: map[creds.Key]bool{wkey("billing"): true}}
	b, buf, _ := newBroker(t, src)
	d := Decision{Outcome: Serve, Name: "billing", Key: wkey("billing"), Fallback: profile, Audit: true}
	cr, err := b.Credentials(t.Context(), d, Client{}, "imds", "credentials", "billing")
	if err != nil || cr.AccessKeyID != "ASIAINSTANCE-ROLE" {
		t.Fatalf("fallback = %v, %v", cr, err)
	}
	if v := testutil.ToFloat64(b.fallbacks); v != 1 {
		t.Errorf("fallbacks = %v", v)
	}
	if v := testutil.ToFloat64(b.served.WithLabelValues("instance-profile")); v != 1 {
		t.Errorf("served{instance-profile} = %v", v)
	}
	if !strings.Contains(buf.String(), `"fallback":true`) {
		t.Errorf("audit line does not say fallback: %s", buf.String())
	}
	// No fallback key: the error.
	if _, err := b.Credentials(t.Context(), Decision{Outcome: Serve, Key: wkey("billing")}, Client{}, "imds", "x", ""); err == nil {
		t.Error("no error without a fallback")
	}
	// A cancelled request never falls back.
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	src.mu.Lock()
	src.asks = nil
	src.mu.Unlock()
	if _, err := b.Credentials(ctx, d, Client{}, "imds", "x", ""); err == nil {
		t.Error("a cancelled request got credentials")
	}
	src.mu.Lock()
	defer src.mu.Unlock()
	if len(src.asks) != 1 {
		t.Errorf("a cancelled request asked %d keys, want 1 (no fallback)", len(src.asks))
	}
}
