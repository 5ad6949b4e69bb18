package issuer

import (
	"context"
	"strings"
	"testing"
	"time"

	fakeec2 "github.com/imdsproxy/imdsproxy/test/fakes/ec2"
)

// TestPolicyMatching: rules in order, each condition, EC2 asked only when
// a rule needs what only EC2 knows.
func TestPolicyMatching(t *testing.T) {
	e := newEnv(t, baseYAML)
	e.ec2.Put("us-east-1", fakeec2.Instance{ID: "i-0000000000000000a", State: "running", LaunchTime: time.Now(),
		InstanceProfileARN: "arn:aws:iam::333333333333:instance-profile/web", Tags: map[string]string{"team": "web", "env": "prod"}})
	e.ec2.Put("us-east-1", fakeec2.Instance{ID: "i-0000000000000000b", State: "stopped", LaunchTime: time.Now(),
		Tags: map[string]string{"team": "web", "env": "prod"}})
	cfg, err := ParseConfig([]byte(`listen: 127.0.0.1:0
issuer: https://oidc.example.com
signing: {keys: [{file: /k}]}
attestation: {aws_iid: {}, aws_iam: {}}
policy:
  - name: iam-only
    match: {methods: [aws_iam], accounts: ["333333333333"]}
    subjects: [iam-app]
  - name: tagged
    match: {accounts: ["333333333333"], regions: [us-east-1], tags: {team: web, env: prod}}
    subjects: [web]
  - name: profile
    match: {instance_profiles: ["arn:aws:iam::333333333333:instance-profile/web", batch]}
    subjects: [batch]
  - name: eu
    match: {regions: [eu-west-1, eu-central-1]}
    subjects: [eu-app]
`))
	if err != nil {
		t.Fatal(err)
	}
	p := compilePolicy(cfg.Policy)
	lookup := e.srv.state.Load().iid.lookup
	for _, tc := range []struct {
		name string
		id   Identity
		rule string
	}{
		{"method and account", Identity{Method: MethodIAM, AccountID: "333333333333", InstanceID: "i-0000000000000000a", Region: "us-east-1"}, "iam-only"},
		{"tags via EC2", Identity{Method: MethodIID, AccountID: "333333333333", InstanceID: "i-0000000000000000a", Region: "us-east-1", RegionVerified: true}, "tagged"},
		{"stopped instance: tags do not count", Identity{Method: MethodIID, AccountID: "333333333333", InstanceID: "i-0000000000000000b", Region: "us-east-1", RegionVerified: true}, ""},
		{"instance profile by role name (aws_iam)", Identity{Method: MethodIAM, AccountID: "444444444444", InstanceID: "i-0000000000000000c", RoleARN: "arn:aws:iam::444444444444:role/batch"}, "profile"},
		{"region must be proven", Identity{Method: MethodIAM, AccountID: "444444444444", InstanceID: "i-0000000000000000c", Region: "eu-west-1"}, ""},
		{"proven region", Identity{Method: MethodIID, AccountID: "444444444444", InstanceID: "i-0000000000000000c", Region: "eu-west-1", RegionVerified: true}, "eu"},
		{"no rule", Identity{Method: MethodIID, AccountID: "555555555555", InstanceID: "i-0000000000000000d", Region: "us-west-2", RegionVerified: true}, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			id := tc.id
			id.lookup = lookup
			d, err := p.Decide(context.Background(), &id, "")
			if tc.rule == "" {
				if reasonOf(err) != reasonNoRule {
					t.Fatalf("decision %+v err %v; want no rule", d, err)
				}
				return
			}
			if err != nil || d.Rule != tc.rule {
				t.Fatalf("decision %+v err %v; want rule %s", d, err, tc.rule)
			}
		})
	}
	// EC2 down while a rule needs it: unavailable, not "no rule".
	e.ec2.SetFail(true)
	id := Identity{Method: MethodIID, AccountID: "333333333333", InstanceID: "i-0000000000000000e", Region: "us-east-1", RegionVerified: true, lookup: lookup}
	if _, err := p.Decide(context.Background(), &id, ""); reasonOf(err) != reasonEC2Unavailable {
		t.Fatalf("EC2 down: %v", err)
	}
}

func TestSessionTagTemplates(t *testing.T) {
	r := compilePolicy([]Rule{{Subjects: []string{"app"}, PrincipalTags: map[string]string{
		"a": "{accountId}", "b": "x-{instanceId}-{region}-{workload}-y", "c": "literal", "d": "{region}",
	}, TransitiveTagKeys: []string{"c"}}}).rules[0]
	id := &Identity{AccountID: "111111111111", InstanceID: "i-0abc", Region: "us-east-1", RegionVerified: true}
	st, err := r.sessionTags(id, "app")
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{"a": "111111111111", "b": "x-i-0abc-us-east-1-app-y", "c": "literal", "d": "us-east-1"}
	for k, v := range want {
		if got := st.PrincipalTags[k]; len(got) != 1 || got[0] != v {
			t.Errorf("%s = %v, want %s", k, got, v)
		}
	}
	if len(st.TransitiveTagKeys) != 1 || st.TransitiveTagKeys[0] != "c" {
		t.Errorf("transitive %v", st.TransitiveTagKeys)
	}
	id.RegionVerified = false
	if st, _ := r.sessionTags(id, "app"); st.PrincipalTags["d"][0] != "" {
		t.Errorf("an unproven region was put in a tag: %v", st.PrincipalTags["d"])
	}
	long := compilePolicy([]Rule{{Subjects: []string{"app"}, PrincipalTags: map[string]string{"a": strings.Repeat("x", 250) + "{region}"}}}).rules[0]
	id.RegionVerified, id.Region = true, "us-gov-west-1"
	if _, err := long.sessionTags(id, "app"); reasonOf(err) != reasonTags {
		t.Fatalf("over-long tag: %v", err)
	}
}
