package intercept

import (
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

func TestConfigValidate(t *testing.T) {
	for _, tc := range []struct {
		name string
		cfg  Config
		ok   bool
	}{
		{"minimal", Config{Port: 8169}, true},
		{"ipv6 and bridges", Config{Port: 8169, Port6: 8169, ExemptUID: 998, Bridges: []string{"docker0", "br-1a2b"}}, true},
		{"no port", Config{}, false},
		{"bridge too long", Config{Port: 1, Bridges: []string{"a234567890123456"}}, false},
		{"bridge with space", Config{Port: 1, Bridges: []string{"dock er"}}, false},
		{"empty bridge", Config{Port: 1, Bridges: []string{""}}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := New(tc.cfg)
			if (err == nil) != tc.ok {
				t.Fatalf("New(%+v) error %v, want ok=%v", tc.cfg, err, tc.ok)
			}
		})
	}
}

func TestDescribe(t *testing.T) {
	r, err := New(Config{Port: 8169, Port6: 8169, ExemptUID: 998, Bridges: []string{"docker0"}})
	if err != nil {
		t.Fatal(err)
	}
	d := r.Describe()
	for _, want := range []string{
		"ip daddr 169.254.169.254 tcp dport 80 meta skuid != 998 redirect to :8169",
		"ip6 daddr fd00:ec2::254 tcp dport 80 meta skuid != 998 redirect to :8169",
		`iifname "docker0" ip daddr 169.254.169.254`,
		"priority -110",
	} {
		if !strings.Contains(d, want) {
			t.Errorf("Describe() lacks %q:\n%s", want, d)
		}
	}
}

var nsSeq atomic.Int64

// testNetNS creates a fresh network namespace and returns an open fd of it
// and its name. It skips (loudly) without root or `ip netns`.
func testNetNS(t *testing.T) (int, string) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("SKIPPED: intercept kernel tests need root (CAP_NET_ADMIN) to create a network namespace; CI runs them as root")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("SKIPPED: `ip` (iproute2) is not installed; the intercept kernel tests need `ip netns`")
	}
	name := fmt.Sprintf("imdsproxy-unit-%d-%d", os.Getpid(), nsSeq.Add(1))
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Skipf("SKIPPED: `ip netns add` failed (no network namespaces here?): %v: %s", err, out)
	}
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", name).Run() })
	f, err := os.Open("/run/netns/" + name)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return int(f.Fd()), name
}

func nft(t *testing.T, ns string, args ...string) string {
	t.Helper()
	out, err := exec.Command("ip", append([]string{"netns", "exec", ns, "nft"}, args...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("nft %s: %v: %s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

func wantState(t *testing.T, r *Rules, want State) Status {
	t.Helper()
	st, err := r.Check()
	if err != nil {
		t.Fatalf("Check: %v", err)
	}
	if st.State != want {
		t.Fatalf("Check = %v (%s), want %v", st.State, st.Detail, want)
	}
	return st
}

func TestInstallCheckRemove(t *testing.T) {
	fd, ns := testNetNS(t)
	if _, err := exec.LookPath("nft"); err != nil {
		t.Skip("SKIPPED: the nft command is not installed (needed to inspect and tamper with the rules)")
	}
	cfg := Config{Port: 8169, Port6: 8170, ExemptUID: 998, Bridges: []string{"docker0"}}
	r, err := New(cfg, WithNetNS(fd))
	if err != nil {
		t.Fatal(err)
	}
	wantState(t, r, Absent)
	// A table of someone else's must survive everything we do.
	nft(t, ns, "add", "table", "ip", "other")
	nft(t, ns, "add", "chain", "ip", "other", "c", "{ type nat hook output priority -100; }")

	for i := 0; i < 2; i++ { // install twice: one set of rules
		if err := r.Install(); err != nil {
			t.Fatalf("Install #%d: %v", i+1, err)
		}
		wantState(t, r, Present)
	}
	list := nft(t, ns, "list", "table", "inet", TableName)
	for _, want := range []string{
		"type nat hook output priority -110; policy accept;",
		"ip daddr 169.254.169.254 tcp dport 80 meta skuid != 998 redirect to :8169",
		"ip6 daddr fd00:ec2::254 tcp dport 80 meta skuid != 998 redirect to :8170",
		`iifname "docker0" ip daddr 169.254.169.254 tcp dport 80 redirect to :8169`,
		"type nat hook prerouting priority dstnat - 10; policy accept;",
	} {
		if n := strings.Count(list, want); n != 1 {
			t.Errorf("nft list shows %q %d times, want once:\n%s", want, n, list)
		}
	}

	// Tampering is detected.
	nft(t, ns, "delete", "rule", "inet", TableName, "output", "handle", ruleHandle(t, ns, "output", "ip6 daddr"))
	if st := wantState(t, r, Drifted); !strings.Contains(st.Detail, "output") {
		t.Errorf("detail %q does not name the chain", st.Detail)
	}
	if _, err := r.Ensure(); err != nil {
		t.Fatal(err)
	}
	wantState(t, r, Present)
	nft(t, ns, "add", "rule", "inet", TableName, "output", "accept")
	wantState(t, r, Drifted)
	if err := r.Install(); err != nil {
		t.Fatal(err)
	}
	nft(t, ns, "delete", "chain", "inet", TableName, "prerouting")
	wantState(t, r, Drifted)
	if err := r.Install(); err != nil {
		t.Fatal(err)
	}
	// A different exempt uid is drift too.
	r2, _ := New(Config{Port: 8169, Port6: 8170, ExemptUID: 999, Bridges: []string{"docker0"}}, WithNetNS(fd))
	wantState(t, r2, Drifted)

	removed, err := r.Remove()
	if err != nil || !removed {
		t.Fatalf("Remove = %v, %v; want true, nil", removed, err)
	}
	wantState(t, r, Absent)
	if removed, err := r.Remove(); err != nil || removed {
		t.Fatalf("second Remove = %v, %v; want false, nil", removed, err)
	}
	all := nft(t, ns, "list", "ruleset")
	if strings.Contains(all, TableName) {
		t.Errorf("after Remove the ruleset still names %s:\n%s", TableName, all)
	}
	if !strings.Contains(all, "table ip other") {
		t.Errorf("Remove touched another table:\n%s", all)
	}
}

// ruleHandle returns the handle of the first rule of chain containing substr.
func ruleHandle(t *testing.T, ns, chain, substr string) string {
	t.Helper()
	out := nft(t, ns, "-a", "list", "chain", "inet", TableName, chain)
	for _, l := range strings.Split(out, "\n") {
		if strings.Contains(l, substr) {
			if i := strings.LastIndex(l, "# handle "); i >= 0 {
				return strings.TrimSpace(l[i+len("# handle "):])
			}
		}
	}
	t.Fatalf("no rule with %q in chain %s:\n%s", substr, chain, out)
	return ""
}

func TestKeeperRepairs(t *testing.T) {
	fd, ns := testNetNS(t)
	r, err := New(Config{Port: 8169, ExemptUID: 65534}, WithNetNS(fd))
	if err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewRegistry()
	m, err := NewMetrics(reg)
	if err != nil {
		t.Fatal(err)
	}
	k, err := NewKeeper(r, 1, nil, m)
	if err != nil {
		t.Fatal(err)
	}
	if !k.CheckOnce() { // absent at first: installed, counted as a repair
		t.Fatal("CheckOnce failed")
	}
	if !k.CheckOnce() {
		t.Fatal("CheckOnce failed")
	}
	if got := testutil.ToFloat64(k.repairs); got != 1 {
		t.Fatalf("repairs = %v after one install and one clean check, want 1", got)
	}
	if _, err := exec.LookPath("nft"); err == nil {
		nft(t, ns, "flush", "chain", "inet", TableName, "output")
		k.CheckOnce()
		if got := testutil.ToFloat64(k.repairs); got != 2 {
			t.Fatalf("repairs = %v after a flush, want 2", got)
		}
	}
	wantState(t, r, Present)
	if got := testutil.ToFloat64(k.present); got != 1 {
		t.Fatalf("rules_present = %v, want 1", got)
	}
	if problems, err := testutil.GatherAndLint(reg); err != nil || len(problems) > 0 {
		t.Fatalf("promlint: %v %v", problems, err)
	}
	if !panics(func() { _, _ = NewMetrics(reg) }) {
		t.Fatal("the metrics registered twice on the same registry")
	}
}

// panics reports whether f panicked: registering a component's metrics
// twice on one registry is a programming error (promauto's MustRegister).
func panics(f func()) (did bool) {
	defer func() { did = recover() != nil }()
	f()
	return false
}
