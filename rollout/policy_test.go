package rollout

import (
	"fmt"
	"reflect"
	"strings"
	"testing"
)

func TestParsePolicyGood(t *testing.T) {
	cases := []struct {
		name, doc string
		want      Policy
	}{
		{"package doc example", `
version: "2026-11-25.1"
kill_switch: false
default: off
groups:
  web-asg: shadow
  api-asg: {canary: 10%}
  batch-asg: on
`, Policy{Version: "2026-11-25.1", Default: Rule{Stage: StageOff}, Groups: map[string]Rule{
			"web-asg":   {Stage: StageShadow},
			"api-asg":   {Stage: StageCanary, Percent: 10},
			"batch-asg": {Stage: StageOn},
		}}},
		{"only default", "default: on\n", Policy{Default: Rule{Stage: StageOn}, Groups: map[string]Rule{}}},
		{"empty mapping means all off", "{}\n", Policy{Default: Rule{Stage: StageOff}, Groups: map[string]Rule{}}},
		{"kill switch", "kill_switch: true\ndefault: on\n", Policy{KillSwitch: true, Default: Rule{Stage: StageOn}, Groups: map[string]Rule{}}},
		{"canary without percent sign", "default: {canary: 25}\n", Policy{Default: Rule{Stage: StageCanary, Percent: 25}, Groups: map[string]Rule{}}},
		{"canary 0 and 100", "groups: {a: {canary: 0%}, b: {canary: 100%}}\n", Policy{Default: Rule{Stage: StageOff}, Groups: map[string]Rule{
			"a": {Stage: StageCanary, Percent: 0}, "b": {Stage: StageCanary, Percent: 100}}}},
		{"numeric version", "version: 3\n", Policy{Version: "3", Default: Rule{Stage: StageOff}, Groups: map[string]Rule{}}},
		{"null groups and version", "version:\ngroups:\n", Policy{Default: Rule{Stage: StageOff}, Groups: map[string]Rule{}}},
		{"quoted stages", "default: \"on\"\ngroups: {'g.1': 'off'}\n", Policy{Default: Rule{Stage: StageOn}, Groups: map[string]Rule{"g.1": {Stage: StageOff}}}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p, err := ParsePolicy([]byte(tc.doc))
			if err != nil {
				t.Fatalf("ParsePolicy: %v", err)
			}
			if !reflect.DeepEqual(*p, tc.want) {
				t.Errorf("got %+v, want %+v", *p, tc.want)
			}
		})
	}
}

// TestParsePolicyBadNamesTheKey checks every refusal names the offending key.
func TestParsePolicyBadNamesTheKey(t *testing.T) {
	cases := []struct {
		name, doc, wantKey string
	}{
		{"unknown top-level key", "defualt: on\n", "defualt"},
		{"duplicate key", "default: on\ndefault: off\n", "default"},
		{"bad default", "default: maybe\n", "default"},
		{"bool default", "default: true\n", "default"},
		{"canary without percent", "default: canary\n", "default"},
		{"canary string form", "default: \"canary 10%\"\n", "default"},
		{"percent too high", "groups: {api: {canary: 120%}}\n", "groups.api.canary"},
		{"percent negative", "groups: {api: {canary: -1}}\n", "groups.api.canary"},
		{"percent not a number", "groups: {api: {canary: ten}}\n", "groups.api.canary"},
		{"percent fraction", "groups: {api: {canary: 10.5%}}\n", "groups.api.canary"},
		{"percent null", "groups: {api: {canary: }}\n", "groups.api.canary"},
		{"unknown stage key", "groups: {api: {canray: 10}}\n", "groups.api.canray"},
		{"two stage keys", "groups: {api: {canary: 10, on: 1}}\n", "groups.api"},
		{"group stage null", "groups: {api: }\n", "groups.api"},
		{"group stage list", "groups: {api: [on]}\n", "groups.api"},
		{"duplicate group", "groups:\n  api: on\n  api: off\n", "groups.api"},
		{"groups a list", "groups: [api]\n", "groups"},
		{"empty group name", "groups: {\"\": on}\n", "groups."},
		{"long group name", "groups: {" + strings.Repeat("g", 300) + ": on}\n", "groups." + strings.Repeat("g", 300)},
		{"kill switch not bool", "kill_switch: yes\n", "kill_switch"},
		{"kill switch null", "kill_switch:\n", "kill_switch"},
		{"version a mapping", "version: {a: 1}\n", "version"},
		{"version too long", "version: " + strings.Repeat("v", 200) + "\n", "version"},
		{"version control char", "version: \"a\\nb\"\n", "version"},
		{"alias", "base: &b on\n", "base"},
		{"alias value", "groups: {a: &x on, b: *x}\n", "groups.b"},
		{"top level list", "- on\n", "top level"},
		{"empty", "", "empty"},
		{"two documents", "default: on\n---\ndefault: off\n", "more than one"},
		{"syntax", "default: [\n", "rollout policy"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ParsePolicy([]byte(tc.doc))
			if err == nil {
				t.Fatal("ParsePolicy accepted a bad document")
			}
			if !strings.HasPrefix(err.Error(), "rollout policy:") || !strings.Contains(err.Error(), tc.wantKey) {
				t.Errorf("error %q does not name %q", err, tc.wantKey)
			}
		})
	}
}

func TestParsePolicyTooLarge(t *testing.T) {
	doc := "version: x\n" + "#" + strings.Repeat("x", MaxPolicySize) + "\n"
	if _, err := ParsePolicy([]byte(doc)); err == nil || !strings.Contains(err.Error(), "larger") {
		t.Fatalf("ParsePolicy of %d bytes: %v", len(doc), err)
	}
}

func FuzzParsePolicy(f *testing.F) {
	for _, s := range []string{
		"version: \"2026-11-25.1\"\nkill_switch: false\ndefault: off\ngroups:\n  web-asg: shadow\n  api-asg: {canary: 10%}\n  batch-asg: on\n",
		"default: {canary: 100}\n",
		"kill_switch: true\n",
		"groups: {a: &x on, b: *x}\n",
		"{}",
		"default: [\n",
		"groups: {api: {canary: 99999999999999999999%}}\n",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		p, err := ParsePolicy(data)
		if err != nil {
			if p != nil {
				t.Fatal("non-nil policy with an error")
			}
			if !strings.HasPrefix(err.Error(), "rollout policy:") {
				t.Fatalf("error without prefix: %v", err)
			}
			return
		}
		for name, r := range p.Groups {
			if name == "" {
				t.Fatal("empty group name accepted")
			}
			checkRule(t, r)
		}
		checkRule(t, p.Default)
		for _, b := range []int{0, 999, 5000, 9999} {
			d := Decide(p, "g", b)
			if d.Serve != KindWorkload && d.Serve != KindInstanceProfile {
				t.Fatalf("Decide served %q", d.Serve)
			}
		}
	})
}

func checkRule(t *testing.T, r Rule) {
	t.Helper()
	switch r.Stage {
	case StageOff, StageShadow, StageOn:
		if r.Percent != 0 {
			t.Fatalf("percent %d on stage %s", r.Percent, r.Stage)
		}
	case StageCanary:
		if r.Percent < 0 || r.Percent > 100 {
			t.Fatalf("canary percent %d accepted", r.Percent)
		}
	default:
		t.Fatalf("stage %q accepted", r.Stage)
	}
}

func TestDecide(t *testing.T) {
	policy := func(kill bool, def Rule, groupRule Rule) *Policy {
		return &Policy{Version: "v1", KillSwitch: kill, Default: def, Groups: map[string]Rule{"listed": groupRule}}
	}
	rules := []Rule{{Stage: StageOff}, {Stage: StageShadow}, {Stage: StageCanary, Percent: 10}, {Stage: StageOn}}
	buckets := []struct {
		name   string
		bucket int
		inside bool // below the 10% line (1000)
	}{{"below", 999, true}, {"at", 1000, false}, {"above", 1001, false}}

	type want struct {
		stage  Stage
		serve  Kind
		shadow bool
	}
	expect := func(r Rule, inside bool) want {
		switch r.Stage {
		case StageShadow:
			return want{StageShadow, KindInstanceProfile, true}
		case StageCanary:
			if inside {
				return want{StageCanary, KindWorkload, false}
			}
			return want{StageCanary, KindInstanceProfile, false}
		case StageOn:
			return want{StageOn, KindWorkload, false}
		}
		return want{StageOff, KindInstanceProfile, false}
	}
	other := Rule{Stage: StageOff} // the rule on the other side (default vs group)
	for _, r := range rules {
		for _, listed := range []bool{true, false} {
			for _, b := range buckets {
				for _, kill := range []bool{false, true} {
					name := fmt.Sprintf("%s/listed=%t/%s/kill=%t", r, listed, b.name, kill)
					t.Run(name, func(t *testing.T) {
						var p *Policy
						group := "listed"
						if listed {
							p = policy(kill, other, r)
						} else {
							p = policy(kill, r, other)
							group = "unlisted"
						}
						d := Decide(p, group, b.bucket)
						w := expect(r, b.inside)
						if kill {
							w = want{StageOff, KindInstanceProfile, false}
						}
						if d.Stage != w.stage || d.Serve != w.serve || d.Shadow != w.shadow || d.KillSwitch != kill {
							t.Errorf("Decide = %+v, want %+v kill=%t", d, w, kill)
						}
						if d.Group != group || d.Bucket != b.bucket || d.PolicyVersion != "v1" || d.Reason == "" {
							t.Errorf("Decide = %+v: group/bucket/version/reason not carried", d)
						}
						if want := 0; d.Stage == StageCanary {
							if d.Percent != 10 {
								t.Errorf("Percent = %d, want 10", d.Percent)
							}
						} else if d.Percent != want {
							t.Errorf("Percent = %d outside canary", d.Percent)
						}
						if !kill && !strings.Contains(d.Reason, string(d.Serve)) {
							t.Errorf("Reason %q does not say what is served", d.Reason)
						}
					})
				}
			}
		}
	}
}

func TestDecideReasons(t *testing.T) {
	p := &Policy{Default: Rule{Stage: StageShadow}, Groups: map[string]Rule{"api-asg": {Stage: StageCanary, Percent: 10}}}
	cases := []struct {
		group  string
		bucket int
		want   string
	}{
		{"api-asg", 734, "group api-asg: canary 10%, bucket 734 < 1000: workload"},
		{"api-asg", 1000, "group api-asg: canary 10%, bucket 1000 >= 1000: instance-profile"},
		{"web-asg", 1, "default (group web-asg not listed): shadow"},
		{"", 1, "default (no group): shadow"},
	}
	for _, tc := range cases {
		if got := Decide(p, tc.group, tc.bucket).Reason; !strings.HasPrefix(got, tc.want) {
			t.Errorf("Decide(%q, %d).Reason = %q, want prefix %q", tc.group, tc.bucket, got, tc.want)
		}
	}
	if d := Decide(nil, "g", 5); d.Stage != StageOn || d.Serve != KindWorkload {
		t.Errorf("Decide(nil) = %+v, want on/workload", d)
	}
	if d := Decide(&Policy{}, "g", 5); d.Stage != StageOff || d.Serve != KindInstanceProfile {
		t.Errorf("Decide(zero policy) = %+v, want off/instance-profile", d)
	}
	canary := &Policy{Default: Rule{Stage: StageCanary, Percent: 100}}
	for _, b := range []int{-1, NumBuckets} {
		if d := Decide(canary, "", b); d.Serve != KindInstanceProfile {
			t.Errorf("bucket %d out of range served %s", b, d.Serve)
		}
	}
}

func TestNeeds(t *testing.T) {
	p := &Policy{Groups: map[string]Rule{
		"off": {Stage: StageOff}, "shadow": {Stage: StageShadow},
		"canary": {Stage: StageCanary, Percent: 50}, "on": {Stage: StageOn},
	}}
	cases := []struct {
		group    string
		bucket   int
		fallback Fallback
		kill     bool
		wl, ip   bool
	}{
		{"off", 0, FallbackNone, false, false, true},
		{"off", 0, FallbackInstanceProfile, false, false, true},
		{"shadow", 0, FallbackNone, false, true, true},
		{"shadow", 0, FallbackInstanceProfile, false, true, true},
		{"canary", 0, FallbackNone, false, true, true},     // in canary: ip warm for flip back
		{"canary", 9999, FallbackNone, false, false, true}, // out of canary
		{"canary", 0, FallbackInstanceProfile, false, true, true},
		{"on", 0, FallbackNone, false, true, false},
		{"on", 0, FallbackInstanceProfile, false, true, true},
		{"on", 0, FallbackNone, true, false, true}, // kill switch
	}
	for _, tc := range cases {
		t.Run(fmt.Sprintf("%s/%d/%s/kill=%t", tc.group, tc.bucket, tc.fallback, tc.kill), func(t *testing.T) {
			pp := *p
			pp.KillSwitch = tc.kill
			wl, ip := Decide(&pp, tc.group, tc.bucket).Needs(tc.fallback)
			if wl != tc.wl || ip != tc.ip {
				t.Errorf("Needs = (%t, %t), want (%t, %t)", wl, ip, tc.wl, tc.ip)
			}
		})
	}
	if wl, ip := Decide(nil, "", 0).Needs(FallbackNone); !wl || ip {
		t.Errorf("no policy, fallback none: Needs = (%t, %t), want (true, false)", wl, ip)
	}
}

func TestBucketDistribution(t *testing.T) {
	const n = 10000
	in10 := map[string]bool{}
	count10, count20 := 0, 0
	p10 := &Policy{Default: Rule{Stage: StageCanary, Percent: 10}}
	p20 := &Policy{Default: Rule{Stage: StageCanary, Percent: 20}}
	for i := range n {
		id := fmt.Sprintf("i-%017x", i)
		b := Bucket(id)
		if b < 0 || b >= NumBuckets {
			t.Fatalf("Bucket(%s) = %d out of range", id, b)
		}
		if b != Bucket(id) {
			t.Fatalf("Bucket(%s) not stable", id)
		}
		if Decide(p10, "", b).Serve == KindWorkload {
			in10[id] = true
			count10++
		}
		if Decide(p20, "", b).Serve == KindWorkload {
			count20++
		} else if in10[id] {
			t.Errorf("%s left the canary when it grew from 10%% to 20%%", id)
		}
	}
	if count10 < 900 || count10 > 1100 {
		t.Errorf("canary 10%% selected %d of %d hosts, want 10%% ± 1%%", count10, n)
	}
	if count20 < 1900 || count20 > 2100 {
		t.Errorf("canary 20%% selected %d of %d hosts, want 20%% ± 1%%", count20, n)
	}
}

func TestParseFallback(t *testing.T) {
	for in, want := range map[string]Fallback{"": FallbackNone, "none": FallbackNone, "instance-profile": FallbackInstanceProfile} {
		if got, err := ParseFallback(in); err != nil || got != want {
			t.Errorf("ParseFallback(%q) = %q, %v", in, got, err)
		}
	}
	if _, err := ParseFallback("open"); err == nil {
		t.Error("ParseFallback(open) accepted")
	}
}
