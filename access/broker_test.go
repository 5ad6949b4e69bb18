package access

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"slices"
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
	mu    sync.Mutex
	bad   map[creds.Key]bool
	asks  []creds.Key
	waits []time.Duration // the bound of each ask
}

func (f *fakeSource) GetWithin(ctx context.Context, k creds.Key, maxWait time.Duration) (creds.Credentials, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.asks = append(f.asks, k)
	f.waits = append(f.waits, maxWait)
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
	if v := testutil.ToFloat64(b.served.WithLabelValues("imds", "workload")); v != 1 {
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
	if v := testutil.ToFloat64(b.served.WithLabelValues("imds", "instance-profile")); v != 1 {
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

// auditLines parses the JSON audit lines written so far.
func auditLines(t *testing.T, buf *syncBuf) []map[string]any {
	t.Helper()
	var out []map[string]any
	for _, l := range strings.Split(strings.TrimSpace(buf.String()), "\n") {
		if l == "" {
			continue
		}
		var m map[string]any
		if err := json.Unmarshal([]byte(l), &m); err != nil {
			t.Fatalf("audit line %q: %v", l, err)
		}
		out = append(out, m)
	}
	return out
}

// TestAuditAggregates: a flood of hand-outs to one client is one line at
// once and one count per interval, and the counts add up to every
// hand-out; a second client, a new key (rotation) and shutdown each report
// what they must; nothing is lost and nothing floods. The same with a
// connection's audit slot (a ConnClient's Client), whose repeats skip the
// table.
func TestAuditAggregates(t *testing.T) {
	t.Run("table", func(t *testing.T) { testAuditAggregates(t, nil) })
	t.Run("slot", func(t *testing.T) { testAuditAggregates(t, new(auditSlot)) })
}

func testAuditAggregates(t *testing.T, slot *auditSlot) {
	src := &fakeSource{}
	b, buf, reg := newBroker(t, src)
	b.auditEvery = time.Hour // flushed by hand below
	d := Decision{Outcome: Serve, Name: "billing", Key: wkey("billing"), Audit: true}
	cli := Client{Local: true, Info: peer.Info{UID: 1001, PID: 7, Exe: "/usr/bin/aws", Unit: "billing.service"}, slot: slot}
	const n = 1000
	for i := range n {
		cli.PID = 7 + i // a CLI in a shell loop: a new process each time
		if _, err := b.Credentials(t.Context(), d, cli, "imds", "credentials", "billing"); err != nil {
			t.Fatal(err)
		}
	}
	if lines := auditLines(t, buf); len(lines) != 1 || lines[0]["msg"] != "credentials served" {
		t.Fatalf("%d audit lines during the flood, want 1: %v", len(lines), lines)
	}
	other := Client{Local: true, Info: peer.Info{UID: 1002}}
	if _, err := b.Credentials(t.Context(), d, other, "imds", "credentials", "billing"); err != nil {
		t.Fatal(err)
	}
	b.audits.flush()
	lines := auditLines(t, buf)
	if len(lines) != 3 || lines[2]["msg"] != "credentials served again" || lines[2]["count"] != float64(n-1) ||
		lines[2]["uid"] != float64(1001) || lines[2]["access_key_id"] != "ASIABILLING" {
		t.Fatalf("after the flush: %v", lines)
	}
	// A flush with nothing new writes nothing.
	b.audits.flush()
	if got := len(auditLines(t, buf)); got != 3 {
		t.Fatalf("an idle flush wrote %d lines", got-3)
	}
	// Rotation: a new key id for the client reports the old one's count.
	b.Credentials(t.Context(), d, cli, "imds", "credentials", "billing")
	rotated := Decision{Outcome: Serve, Name: "billing", Key: wkey("billing2"), Audit: true}
	b.Credentials(t.Context(), rotated, cli, "imds", "credentials", "billing")
	lines = auditLines(t, buf)
	if len(lines) != 5 || lines[3]["msg"] != "credentials served again" || lines[3]["count"] != float64(1) ||
		lines[4]["msg"] != "credentials served" || lines[4]["access_key_id"] != "ASIABILLING2" {
		t.Fatalf("after a new key: %v", lines[3:])
	}
	// Shutdown reports what is pending.
	b.Credentials(t.Context(), rotated, cli, "imds", "credentials", "billing")
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	if err := b.Run(ctx); err != nil {
		t.Fatal(err)
	}
	lines = auditLines(t, buf)
	if last := lines[len(lines)-1]; last["msg"] != "credentials served again" || last["count"] != float64(1) {
		t.Fatalf("at shutdown: %v", last)
	}
	// Every hand-out is in a line: firsts count one each, summaries their count.
	total := 0.0
	for _, l := range auditLines(t, buf) {
		if c, ok := l["count"].(float64); ok {
			total += c
		} else {
			total++
		}
	}
	if total != n+1+3 {
		t.Errorf("the audit accounts for %v hand-outs, want %d", total, n+1+3)
	}
	if v := testutil.ToFloat64(b.audits.handed.WithLabelValues("billing.service")); v != n+3 {
		t.Errorf("imdsproxy_audit_handouts_total{client=billing.service} = %v", v)
	}
	if v := testutil.ToFloat64(b.audits.handed.WithLabelValues("uid:1002")); v != 1 {
		t.Errorf("imdsproxy_audit_handouts_total{client=uid:1002} = %v", v)
	}
	if problems, err := testutil.GatherAndLint(reg); err != nil || len(problems) > 0 {
		t.Errorf("lint: %v %v", problems, err)
	}
	for _, l := range auditLines(t, buf) {
		for k, v := range l {
			if s, ok := v.(string); ok && (strings.Contains(s, "SECRET-") || strings.Contains(s, "TOKEN-")) {
				t.Fatalf("a secret reached the audit (%s)", k)
			}
		}
	}
}

// TestAuditClientLabelsBounded: the client label stops growing at 64.
func TestAuditClientLabelsBounded(t *testing.T) {
	b, _, _ := newBroker(t, &fakeSource{})
	d := Decision{Outcome: Serve, Name: "app", Key: host, Audit: true}
	for u := range 200 {
		b.Credentials(t.Context(), d, Client{Local: true, Info: peer.Info{UID: 2000 + u}}, "imds", "credentials", "app")
	}
	if n := testutil.CollectAndCount(b.audits.handed); n != maxClientLabels+1 {
		t.Errorf("%d client label values, want %d and other", n, maxClientLabels)
	}
}

// TestAuditLateOldKey: a hand-out of the previous key id that records after
// the identity's first hand-out of the new one (it got the credentials just
// before the cache swapped them) is a repeat, reported by the next flush,
// never a second first line; that flush then forgets the old key id, and
// a connection's slot that still holds it counts through the table again.
func TestAuditLateOldKey(t *testing.T) {
	t.Run("table", func(t *testing.T) { testAuditLateOldKey(t, nil) })
	t.Run("slot", func(t *testing.T) { testAuditLateOldKey(t, new(auditSlot)) })
}

func testAuditLateOldKey(t *testing.T, slot *auditSlot) {
	b, buf, _ := newBroker(t, &fakeSource{})
	b.auditEvery = time.Hour
	cli := Client{Local: true, Info: peer.Info{UID: 1001, Unit: "billing.service"}, slot: slot}
	old := Decision{Outcome: Serve, Name: "billing", Key: wkey("billing"), Audit: true}
	cur := Decision{Outcome: Serve, Name: "billing", Key: wkey("billing2"), Audit: true}
	for _, d := range []Decision{old, old, cur, old, cur} {
		if _, err := b.Credentials(t.Context(), d, cli, "imds", "credentials", "billing"); err != nil {
			t.Fatal(err)
		}
	}
	firsts := map[string]int{}
	for _, l := range auditLines(t, buf) {
		if l["msg"] == "credentials served" {
			firsts[l["access_key_id"].(string)]++
		}
	}
	if firsts["ASIABILLING"] != 1 || firsts["ASIABILLING2"] != 1 || len(firsts) != 2 {
		t.Fatalf("first lines by key id: %v, want one each", firsts)
	}
	n := len(auditLines(t, buf))
	b.audits.flush()
	counts := map[string]float64{}
	for _, l := range auditLines(t, buf)[n:] {
		counts[l["access_key_id"].(string)] = l["count"].(float64)
	}
	// The rotation reported the old key's first repeat; the late one and
	// the new key's repeat are in this flush.
	if counts["ASIABILLING"] != 1 || counts["ASIABILLING2"] != 1 {
		t.Fatalf("flush counts %v, want 1 and 1", counts)
	}
	b.audits.mu.Lock()
	_, kept := b.audits.entries[auditKey{identityOf(cli), "ASIABILLING"}]
	b.audits.mu.Unlock()
	if kept {
		t.Error("the old key id's entry outlived the flush after its rotation")
	}
}

// auditTotal is the number of hand-outs the audit lines account for: a
// first line one, a summary its count.
func auditTotal(t *testing.T, buf *syncBuf) (total int, firsts int) {
	t.Helper()
	for _, l := range auditLines(t, buf) {
		if c, ok := l["count"].(float64); ok {
			total += int(c)
		} else {
			total++
			firsts++
		}
	}
	return total, firsts
}

// TestAuditSlotDropped: a slot whose entry a full table's flush dropped
// counts nothing there: the next hand-out goes through the table again (a
// new first line, as for any key id seen again after the table was
// cleared), and nothing is lost or counted twice.
func TestAuditSlotDropped(t *testing.T) {
	b, buf, _ := newBroker(t, &fakeSource{})
	b.auditEvery = time.Hour
	cli := Client{Local: true, Info: peer.Info{UID: 1001, Unit: "billing.service"}, slot: new(auditSlot)}
	d := Decision{Outcome: Serve, Name: "billing", Key: wkey("billing"), Audit: true}
	hand := func() {
		t.Helper()
		if _, err := b.Credentials(t.Context(), d, cli, "imds", "credentials", "billing"); err != nil {
			t.Fatal(err)
		}
	}
	hand()
	hand()
	b.audits.mu.Lock()
	full := b.audits.flushLocked() // what a full table does
	b.audits.mu.Unlock()
	for _, f := range full {
		b.audits.log.Info("credentials served again", f...)
	}
	dropped := cli.slot.entry()
	if dropped == nil || !dropped.dropped.Load() {
		t.Fatal("the slot's entry was not marked dropped by the flush")
	}
	hand()
	hand()
	if cli.slot.entry() == dropped {
		t.Error("the slot still holds the dropped entry")
	}
	if n := dropped.repeats.Load(); n != 0 {
		t.Errorf("the dropped entry kept %d uncounted repeats", n)
	}
	b.audits.flush()
	total, firsts := auditTotal(t, buf)
	if total != 4 || firsts != 2 {
		t.Errorf("the audit accounts for %d hand-outs in %d first lines, want 4 in 2", total, firsts)
	}
	if v := testutil.ToFloat64(b.audits.handed.WithLabelValues("billing.service")); v != 4 {
		t.Errorf("imdsproxy_audit_handouts_total{client=billing.service} = %v, want 4", v)
	}
}

// TestAuditSlotsRaceFlushes: connections of a few identities hand out
// credentials through their slots while the key id rotates and the table
// is flushed (and cleared when full) concurrently: every hand-out is in
// exactly one line and in the counter. Run with -race.
func TestAuditSlotsRaceFlushes(t *testing.T) {
	b, buf, _ := newBroker(t, &fakeSource{})
	b.auditEvery = time.Hour
	const conns, each = 8, 3000
	keys := []Decision{
		{Outcome: Serve, Name: "billing", Key: wkey("billing"), Audit: true},
		{Outcome: Serve, Name: "billing", Key: wkey("billing2"), Audit: true},
	}
	stop := make(chan struct{})
	var flushes sync.WaitGroup
	flushes.Go(func() {
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			if i%4 == 3 {
				b.audits.mu.Lock()
				full := b.audits.flushLocked()
				b.audits.mu.Unlock()
				for _, f := range full {
					b.audits.log.Info("credentials served again", f...)
				}
			} else {
				b.audits.flush()
			}
			time.Sleep(50 * time.Microsecond)
		}
	})
	var wg sync.WaitGroup
	for c := range conns {
		cli := Client{Local: true, Info: peer.Info{UID: 1001 + c%3, Unit: "billing.service"}, slot: new(auditSlot)}
		wg.Go(func() {
			for i := range each {
				d := keys[(i/500)%2]
				if _, err := b.Credentials(context.Background(), d, cli, "imds", "credentials", "billing"); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	close(stop)
	flushes.Wait()
	b.audits.flush()
	if total, firsts := auditTotal(t, buf); total != conns*each {
		t.Errorf("the audit accounts for %d hand-outs (%d first lines), want %d", total, firsts, conns*each)
	}
	if v := testutil.ToFloat64(b.audits.handed.WithLabelValues("billing.service")); v != conns*each {
		t.Errorf("imdsproxy_audit_handouts_total{client=billing.service} = %v, want %d", v, conns*each)
	}
}

// TestBrokerDoors: served and refused are counted by front door, and a
// door's series exist once it is added.
func TestBrokerDoors(t *testing.T) {
	b, _, reg := newBroker(t, &fakeSource{})
	b.AddDoor(DoorContainer)
	b.Refused(Decision{Outcome: Deny, Why: whyPeerMismatch}, DoorContainer)
	b.Refused(Decision{Outcome: Retry, Why: whyUnresolved}, DoorIMDS)
	if v := testutil.ToFloat64(b.refused.WithLabelValues(DoorContainer, "deny", whyPeerMismatch)); v != 1 {
		t.Errorf("refused{container,deny,peer_mismatch} = %v", v)
	}
	if v := testutil.ToFloat64(b.refused.WithLabelValues(DoorIMDS, "retry", whyUnresolved)); v != 1 {
		t.Errorf("refused{imds,retry,unresolved} = %v", v)
	}
	n, err := testutil.GatherAndCount(reg, "imdsproxy_rollout_served_total")
	if err != nil || n != 4 {
		t.Errorf("served series after AddDoor(container): %d, %v; want 4 (2 doors × 2 kinds)", n, err)
	}
}

// TestBrokerWaitPerDoor: the IMDS and container doors bound a wait for an
// upstream fetch by DefaultWait (for the key and again for the fallback;
// iam/info too), and the credential_process door has none (the SDK waits
// for the process, which has its own timeout).
func TestBrokerWaitPerDoor(t *testing.T) {
	src := &fakeSource{bad: map[creds.Key]bool{wkey("billing"): true}}
	b, _, _ := newBroker(t, src)
	d := Decision{Outcome: Serve, Name: "billing", Key: wkey("billing"), Fallback: wkey("profile")}
	c := Client{Local: true, Info: peer.Info{UID: 1001}}
	ask := func(door string) []time.Duration {
		t.Helper()
		src.mu.Lock()
		src.waits = nil
		src.mu.Unlock()
		if _, err := b.Credentials(t.Context(), d, c, door, "credentials", ""); err != nil {
			t.Fatalf("%s: %v", door, err)
		}
		src.mu.Lock()
		defer src.mu.Unlock()
		return slices.Clone(src.waits)
	}
	for door, want := range map[string]time.Duration{DoorIMDS: DefaultWait, DoorContainer: DefaultWait, DoorProcess: 0} {
		if got := ask(door); !slices.Equal(got, []time.Duration{want, want}) {
			t.Errorf("%s door: bounds %v (key, fallback), want %v twice", door, got, want)
		}
	}
	// iam/info is asked through the IMDS door: its bound.
	src.mu.Lock()
	src.waits = nil
	src.mu.Unlock()
	if _, err := b.Info(t.Context(), d); err != nil {
		t.Fatalf("Info: %v", err)
	}
	src.mu.Lock()
	defer src.mu.Unlock()
	if !slices.Equal(src.waits, []time.Duration{DefaultWait, DefaultWait}) {
		t.Errorf("Info: bounds %v (key, fallback), want %v twice", src.waits, DefaultWait)
	}
}
