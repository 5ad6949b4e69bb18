package issuer

import (
	"context"
	"errors"
	"slices"
	"sort"
	"strings"
)

// TagsClaim is the claim STS reads session tags from
// (AssumeRoleWithWebIdentity, "Passing session tags using
// AssumeRoleWithWebIdentity").
const TagsClaim = "https://aws.amazon.com/tags"

// SessionTags is the value of TagsClaim.
type SessionTags struct {
	PrincipalTags     map[string][]string `json:"principal_tags"`
	TransitiveTagKeys []string            `json:"transitive_tag_keys,omitempty"`
}

// Policy is the compiled, immutable policy: rules in order, the first
// matching one wins.
type Policy struct {
	rules []*rule
}

type rule struct {
	name     string
	match    Match
	subjects []string
	tags     []tagTemplate // sorted by key
	trans    []string
}

type tagTemplate struct {
	key   string
	parts []tagPart
}

// tagPart is a literal or, when ph is set, a placeholder.
type tagPart struct {
	lit string
	ph  string
}

// compilePolicy compiles validated rules.
func compilePolicy(rules []Rule) *Policy {
	p := &Policy{}
	for i := range rules {
		r := &rules[i]
		cr := &rule{name: r.label(i), match: r.Match, subjects: slices.Clone(r.Subjects), trans: slices.Clone(r.TransitiveTagKeys)}
		keys := make([]string, 0, len(r.PrincipalTags))
		for k := range r.PrincipalTags {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			cr.tags = append(cr.tags, compileTag(k, r.PrincipalTags[k]))
		}
		p.rules = append(p.rules, cr)
	}
	return p
}

func compileTag(key, v string) tagTemplate {
	t := tagTemplate{key: key}
	for v != "" {
		loc := placeholder.FindStringIndex(v)
		if loc == nil {
			t.parts = append(t.parts, tagPart{lit: v})
			break
		}
		if loc[0] > 0 {
			t.parts = append(t.parts, tagPart{lit: v[:loc[0]]})
		}
		t.parts = append(t.parts, tagPart{ph: v[loc[0]:loc[1]]})
		v = v[loc[1]:]
	}
	return t
}

// Decision is what the policy granted: the subject and the rule (for
// metrics and logs), and the session tags to put in the token (nil when
// the rule has none).
type Decision struct {
	Rule    string
	Subject string
	Tags    *SessionTags
}

// Decide returns the first rule matching id and the subject for workload
// ("" = the rule's first subject), or an *attestError: reasonNoRule,
// reasonWorkload, reasonTags, or reasonEC2Unavailable when a rule needs
// what EC2 says and EC2 could not be asked.
func (p *Policy) Decide(ctx context.Context, id *Identity, workload string) (*Decision, error) {
	for _, r := range p.rules {
		ok, err := r.matches(ctx, id)
		if err != nil {
			return nil, err
		}
		if !ok {
			continue
		}
		sub := r.subjects[0]
		if workload != "" {
			if !slices.Contains(r.subjects, workload) {
				return nil, attestErr(reasonWorkload, "rule %s does not allow workload %q for this host", r.name, workload)
			}
			sub = workload
		}
		d := &Decision{Rule: r.name, Subject: sub}
		if len(r.tags) > 0 {
			tags, err := r.sessionTags(id, sub)
			if err != nil {
				return nil, err
			}
			d.Tags = tags
		}
		return d, nil
	}
	return nil, attestErr(reasonNoRule, "no policy rule matches %s instance %s of account %s", id.Method, id.InstanceID, id.AccountID)
}

// matches reports whether every condition of the rule holds for id. A
// condition on what only EC2 knows (tags, the instance profile of an
// aws_iid host, the region of an aws_iam host) asks EC2; when the issuer
// cannot ask (no region known), the condition does not hold.
func (r *rule) matches(ctx context.Context, id *Identity) (bool, error) {
	m := &r.match
	if len(m.Methods) > 0 && !slices.Contains(m.Methods, id.Method) {
		return false, nil
	}
	if len(m.Accounts) > 0 && !slices.Contains(m.Accounts, id.AccountID) {
		return false, nil
	}
	instance := func() (*Instance, bool, error) {
		inst, err := id.Instance(ctx)
		if err != nil {
			var ae *attestError
			if errors.As(err, &ae) {
				return nil, false, err
			}
			return nil, false, nil // cannot ask: the condition does not hold
		}
		if inst.check(id.InstanceID) != nil {
			return nil, false, nil
		}
		return inst, true, nil
	}
	if len(m.Regions) > 0 {
		if !id.RegionVerified && id.Region != "" {
			if _, ok, err := instance(); err != nil || !ok {
				return false, err
			}
		}
		if !id.RegionVerified || !slices.Contains(m.Regions, id.Region) {
			return false, nil
		}
	}
	if len(m.InstanceProfiles) > 0 {
		ok := id.RoleARN != "" && matchProfile(m.InstanceProfiles, id.RoleARN)
		if !ok {
			inst, found, err := instance()
			if err != nil {
				return false, err
			}
			ok = found && inst.InstanceProfileARN != "" && matchProfile(m.InstanceProfiles, inst.InstanceProfileARN)
		}
		if !ok {
			return false, nil
		}
	}
	if len(m.Tags) > 0 {
		inst, found, err := instance()
		if err != nil || !found {
			return false, err
		}
		for k, v := range m.Tags {
			if got, ok := inst.Tags[k]; !ok || got != v {
				return false, nil
			}
		}
	}
	return true, nil
}

// matchProfile reports whether arn (a role or instance-profile ARN) is
// listed by ARN or by its name (the last path element).
func matchProfile(list []string, arn string) bool {
	name := arn[strings.LastIndexByte(arn, '/')+1:]
	for _, p := range list {
		if p == arn || p == name {
			return true
		}
	}
	return false
}

// sessionTags expands the rule's tag templates for id and subject.
func (r *rule) sessionTags(id *Identity, subject string) (*SessionTags, error) {
	region := ""
	if id.RegionVerified {
		region = id.Region
	}
	st := &SessionTags{PrincipalTags: make(map[string][]string, len(r.tags)), TransitiveTagKeys: r.trans}
	var b strings.Builder
	for _, t := range r.tags {
		b.Reset()
		for _, p := range t.parts {
			switch p.ph {
			case "":
				b.WriteString(p.lit)
			case "{accountId}":
				b.WriteString(id.AccountID)
			case "{instanceId}":
				b.WriteString(id.InstanceID)
			case "{region}":
				b.WriteString(region)
			case "{workload}":
				b.WriteString(subject)
			}
		}
		v := b.String()
		if len([]rune(v)) > MaxTagValueLen || !tagCharsRe.MatchString(v) {
			return nil, attestErr(reasonTags, "session tag %s of rule %s would not be accepted by STS", t.key, r.name)
		}
		st.PrincipalTags[t.key] = []string{v}
	}
	return st, nil
}

// ruleNames and subjects pre-create metric series.
func (p *Policy) series() (pairs [][2]string) {
	for _, r := range p.rules {
		for _, s := range r.subjects {
			pairs = append(pairs, [2]string{s, r.name})
		}
	}
	return pairs
}
