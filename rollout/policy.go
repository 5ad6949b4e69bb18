// Package rollout decides which credentials this host serves: the instance
// profile's or the workload role's, per instance group, following a rollout
// policy the operators control centrally.
//
// # Stages
//
// A policy maps every instance group to one of four stages:
//
//   - off: serve the instance profile's credentials;
//   - shadow: serve the instance profile's credentials, and fetch the workload
//     role's credentials in the background and verify them (RunShadow, with a
//     Verifier calling sts:GetCallerIdentity), recording the outcome;
//   - canary N%: hosts whose Bucket is below N*100 serve the workload role's
//     credentials, the others the instance profile's;
//   - on: serve the workload role's credentials.
//
// A kill switch puts every host off, whatever else the policy says.
//
// # Policy document
//
// The policy is YAML, at most 1 MiB, one document, no aliases; unknown or
// duplicate keys are refused and every error names the offending key:
//
//	version: "2026-11-25.1"   # free text (at most 128 printable characters), shown in metrics and status; optional
//	kill_switch: false        # optional; true: every host off, whatever else says
//	default: off              # optional (default off): the stage of groups not listed
//	groups:                   # optional: instance group name -> stage
//	  web-asg: shadow
//	  api-asg: {canary: 10%}  # canary percentage 0..100, written N% or N
//	  batch-asg: on
//
// A stage is off, shadow or on (a string), or a mapping with the single key
// canary whose value is a whole percentage 0..100 written N% or N. Group
// names are 1..256 characters without control characters (an EC2 tag value is
// at most 256).
//
// # Pieces
//
// ParsePolicy validates a document; a Loader reads it from a file, an https://
// URL or an s3://bucket/key object and re-reads it on an interval, keeping the
// last good policy when a new one is bad. With LoaderOptions.PolicyKeys a
// policy is applied only when its detached Ed25519 signature (the policy's
// name plus ".sig"; see ParseSignatureFile) verifies with one of them;
// SignPolicy signs one. DetectHost finds the instance id
// (for Bucket) and the instance group (from the instance's tags in metadata,
// or configuration). Decide turns a policy, a group and a bucket into a
// Decision, and a Selector serves credentials according to the current
// Decision, falling back to the instance profile's when configured.
//
// rollout imports no package of the project but creds.
package rollout

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"unicode"
	"unicode/utf8"

	"go.yaml.in/yaml/v3"

	"github.com/imdsproxy/imdsproxy/creds"
)

// MaxPolicySize is the largest policy document accepted, in bytes.
const MaxPolicySize = 1 << 20

// Limits of policy values.
const (
	maxVersionLen = 128
	maxGroupLen   = 256
)

// Stage is a rollout stage: StageOff, StageShadow, StageCanary or StageOn.
type Stage string

// The rollout stages.
const (
	// StageOff serves the instance profile's credentials.
	StageOff Stage = "off"
	// StageShadow serves the instance profile's credentials and verifies the
	// workload role's in the background.
	StageShadow Stage = "shadow"
	// StageCanary serves the workload role's credentials on the hosts whose
	// bucket is below the canary line, the instance profile's elsewhere.
	StageCanary Stage = "canary"
	// StageOn serves the workload role's credentials.
	StageOn Stage = "on"
)

// Stages lists every stage, in rollout order.
var Stages = []Stage{StageOff, StageShadow, StageCanary, StageOn}

// Kind is a kind of credentials a host can serve (creds.Kind).
type Kind = creds.Kind

// The kinds of credentials.
const (
	// KindWorkload is the workload role's credentials.
	KindWorkload = creds.KindWorkload
	// KindInstanceProfile is the instance profile's credentials.
	KindInstanceProfile = creds.KindInstanceProfile
)

// Fallback says what a Selector does when the workload credentials cannot
// be obtained: FallbackNone or FallbackInstanceProfile.
type Fallback string

// The fallback modes (config key rollout.fallback).
const (
	// FallbackNone returns the workload error (the client gets the EC2 error
	// document): fail closed.
	FallbackNone Fallback = "none"
	// FallbackInstanceProfile serves the instance profile's credentials
	// instead: fail open.
	FallbackInstanceProfile Fallback = "instance-profile"
)

// ParseFallback checks a rollout.fallback value. "" means FallbackNone.
func ParseFallback(s string) (Fallback, error) {
	switch Fallback(s) {
	case "", FallbackNone:
		return FallbackNone, nil
	case FallbackInstanceProfile:
		return FallbackInstanceProfile, nil
	}
	return "", fmt.Errorf("rollout: fallback %q is not one of none, instance-profile", s)
}

// Rule is the stage of one instance group (or the default).
type Rule struct {
	// Stage is the group's stage. The zero value ("") means off.
	Stage Stage
	// Percent is the canary percentage, 0..100; used only when Stage is
	// StageCanary, zero otherwise.
	Percent int
}

// String returns the rule as written in a policy: off, shadow, on, or
// canary N%.
func (r Rule) String() string {
	switch r.Stage {
	case StageCanary:
		return fmt.Sprintf("canary %d%%", r.Percent)
	case "":
		return string(StageOff)
	}
	return string(r.Stage)
}

// Policy is a validated rollout policy document. Values returned by
// ParsePolicy and Loader.Current are shared: never modify them. The zero
// Policy puts every host off.
type Policy struct {
	// Version is the operator's free-text version, "" when not given.
	Version string
	// KillSwitch true puts every host off.
	KillSwitch bool
	// Default is the rule of groups not listed in Groups.
	Default Rule
	// Groups maps an instance group name to its rule.
	Groups map[string]Rule
}

// ParsePolicy parses and validates a policy document (see the package
// documentation for the format). Every error starts with "rollout policy:"
// and names the offending key.
func ParsePolicy(data []byte) (*Policy, error) {
	if len(data) > MaxPolicySize {
		return nil, fmt.Errorf("rollout policy: the document is larger than %d bytes", MaxPolicySize)
	}
	var doc yaml.Node
	dec := yaml.NewDecoder(bytes.NewReader(data))
	if err := dec.Decode(&doc); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, errors.New("rollout policy: the document is empty")
		}
		return nil, fmt.Errorf("rollout policy: %w", err)
	}
	var extra yaml.Node
	if err := dec.Decode(&extra); !errors.Is(err, io.EOF) {
		return nil, errors.New("rollout policy: more than one YAML document")
	}
	if len(doc.Content) != 1 || doc.Content[0].Kind != yaml.MappingNode {
		return nil, errors.New("rollout policy: the top level must be a mapping of keys (version, kill_switch, default, groups)")
	}
	top := doc.Content[0]
	p := &Policy{Default: Rule{Stage: StageOff}, Groups: map[string]Rule{}}
	seen := map[string]bool{}
	for i := 0; i+1 < len(top.Content); i += 2 {
		k, v := top.Content[i], top.Content[i+1]
		if err := checkKey(k, "", seen); err != nil {
			return nil, err
		}
		if v.Kind == yaml.AliasNode {
			return nil, errAt(v, k.Value, "YAML aliases are not supported")
		}
		switch k.Value {
		case "version":
			if isNull(v) {
				continue
			}
			if v.Kind != yaml.ScalarNode {
				return nil, errAt(v, "version", "must be a string")
			}
			if err := checkText(v.Value, maxVersionLen); err != nil {
				return nil, errAt(v, "version", err.Error())
			}
			p.Version = v.Value
		case "kill_switch":
			if v.Kind != yaml.ScalarNode || v.ShortTag() != "!!bool" {
				return nil, errAt(v, "kill_switch", "must be true or false")
			}
			var b bool
			if err := v.Decode(&b); err != nil {
				return nil, errAt(v, "kill_switch", "must be true or false")
			}
			p.KillSwitch = b
		case "default":
			r, err := parseRule(v, "default")
			if err != nil {
				return nil, err
			}
			p.Default = r
		case "groups":
			if isNull(v) {
				continue
			}
			if v.Kind != yaml.MappingNode {
				return nil, errAt(v, "groups", "must be a mapping of instance group names to stages")
			}
			gseen := map[string]bool{}
			for j := 0; j+1 < len(v.Content); j += 2 {
				gk, gv := v.Content[j], v.Content[j+1]
				if gk.Kind != yaml.ScalarNode {
					return nil, errAt(gk, "groups", "group names must be strings")
				}
				key := "groups." + gk.Value
				if gseen[gk.Value] {
					return nil, errAt(gk, key, "group given twice")
				}
				gseen[gk.Value] = true
				if err := checkText(gk.Value, maxGroupLen); err != nil || gk.Value == "" {
					if err == nil {
						err = errors.New("must not be empty")
					}
					return nil, errAt(gk, key, "group name "+err.Error())
				}
				r, err := parseRule(gv, key)
				if err != nil {
					return nil, err
				}
				p.Groups[gk.Value] = r
			}
		default:
			return nil, fmt.Errorf("rollout policy: line %d: unknown key %s (known keys here: version, kill_switch, default, groups)", k.Line, k.Value)
		}
	}
	return p, nil
}

// checkKey refuses non-string, aliased and duplicate keys.
func checkKey(k *yaml.Node, path string, seen map[string]bool) error {
	if k.Kind != yaml.ScalarNode {
		return fmt.Errorf("rollout policy: line %d: %s: keys must be strings", k.Line, name(path))
	}
	key := k.Value
	if path != "" {
		key = path + "." + k.Value
	}
	if seen[k.Value] {
		return fmt.Errorf("rollout policy: line %d: %s: key given twice", k.Line, key)
	}
	seen[k.Value] = true
	return nil
}

func name(path string) string {
	if path == "" {
		return "top level"
	}
	return path
}

func errAt(n *yaml.Node, key, msg string) error {
	return fmt.Errorf("rollout policy: line %d: %s: %s", n.Line, key, msg)
}

func isNull(n *yaml.Node) bool { return n.Kind == yaml.ScalarNode && n.ShortTag() == "!!null" }

// checkText accepts UTF-8 text of at most max bytes without control
// characters (it ends up in logs and metric labels).
func checkText(s string, max int) error {
	if len(s) > max {
		return fmt.Errorf("is longer than %d characters", max)
	}
	if !utf8.ValidString(s) {
		return errors.New("is not valid UTF-8")
	}
	for _, r := range s {
		if unicode.IsControl(r) {
			return errors.New("must not contain control characters")
		}
	}
	return nil
}

const stageHelp = "must be off, shadow, on, or {canary: N%} with N in 0..100"

// parseRule reads one stage: a scalar off|shadow|on or {canary: N%|N}.
func parseRule(n *yaml.Node, key string) (Rule, error) {
	switch n.Kind {
	case yaml.AliasNode:
		return Rule{}, errAt(n, key, "YAML aliases are not supported")
	case yaml.ScalarNode:
		if n.ShortTag() != "!!str" {
			return Rule{}, errAt(n, key, fmt.Sprintf("%q: %s", n.Value, stageHelp))
		}
		switch Stage(n.Value) {
		case StageOff, StageShadow, StageOn:
			return Rule{Stage: Stage(n.Value)}, nil
		case StageCanary:
			return Rule{}, errAt(n, key, "canary needs a percentage: write {canary: N%}")
		}
		return Rule{}, errAt(n, key, fmt.Sprintf("%q: %s", n.Value, stageHelp))
	case yaml.MappingNode:
		if len(n.Content) != 2 {
			return Rule{}, errAt(n, key, "a stage mapping must have exactly one key, canary: write {canary: N%}")
		}
		k, v := n.Content[0], n.Content[1]
		if k.Kind != yaml.ScalarNode || k.Value != string(StageCanary) {
			return Rule{}, fmt.Errorf("rollout policy: line %d: unknown key %s.%s (known keys here: canary)", k.Line, key, k.Value)
		}
		key += ".canary"
		if v.Kind != yaml.ScalarNode || isNull(v) {
			return Rule{}, errAt(v, key, "must be a percentage such as 10% or 10")
		}
		s := strings.TrimSuffix(v.Value, "%")
		pct, err := strconv.Atoi(s)
		if err != nil || s != strings.TrimSpace(s) || strings.HasPrefix(s, "+") {
			return Rule{}, errAt(v, key, fmt.Sprintf("%q is not a whole percentage such as 10%%", v.Value))
		}
		if pct < 0 || pct > 100 {
			return Rule{}, errAt(v, key, fmt.Sprintf("%d%% is outside 0..100", pct))
		}
		return Rule{Stage: StageCanary, Percent: pct}, nil
	}
	return Rule{}, errAt(n, key, stageHelp)
}

// NumBuckets is the number of canary buckets: Bucket returns 0..NumBuckets-1
// and canary N% selects the buckets below N*NumBuckets/100.
const NumBuckets = 10000

// Bucket returns the host's canary bucket, 0..9999: the first 8 bytes of the
// SHA-256 of instanceID, big-endian, modulo 10000. It is stable, so a host
// keeps its bucket across restarts, and canary N% selects the buckets below
// N*100: raising N keeps every host selected before.
func Bucket(instanceID string) int {
	sum := sha256.Sum256([]byte(instanceID))
	return int(binary.BigEndian.Uint64(sum[:8]) % NumBuckets)
}

// Decision is what one host serves, as decided by Decide. It is a plain
// value, safe to copy and share.
type Decision struct {
	// Stage is the effective stage (StageOff under the kill switch).
	Stage Stage
	// Percent is the canary percentage when Stage is StageCanary, else 0.
	Percent int
	// Group is the host's instance group ("" when unknown).
	Group string
	// Bucket is the host's canary bucket, 0..9999 (see Bucket).
	Bucket int
	// Serve is the kind of credentials served.
	Serve Kind
	// Shadow is true when the workload credentials are to be verified in
	// the background (stage shadow).
	Shadow bool
	// KillSwitch is true when the policy's kill switch is set.
	KillSwitch bool
	// PolicyVersion is the policy's Version.
	PolicyVersion string
	// Reason explains the decision to a human, for example
	// "group api-asg: canary 10%, bucket 734 < 1000: workload".
	Reason string
}

// Decide returns the decision for a host of group with bucket under p. A
// nil p means no rollout is configured: stage on, serving the workload
// credentials. A bucket outside 0..9999 is never in the canary. An empty
// group uses the default rule.
func Decide(p *Policy, group string, bucket int) Decision {
	d := Decision{Group: group, Bucket: bucket}
	if p == nil {
		d.Stage, d.Serve = StageOn, KindWorkload
		d.Reason = "no rollout policy: on: workload"
		return d
	}
	d.PolicyVersion = p.Version
	if p.KillSwitch {
		d.Stage, d.Serve, d.KillSwitch = StageOff, KindInstanceProfile, true
		d.Reason = "kill switch: off: instance-profile"
		return d
	}
	rule, listed := p.Groups[group]
	var who string
	switch {
	case listed && group != "":
		who = "group " + group
	case group == "":
		rule, who = p.Default, "default (no group)"
	default:
		rule, who = p.Default, "default (group "+group+" not listed)"
	}
	switch rule.Stage {
	case StageOn:
		d.Stage, d.Serve = StageOn, KindWorkload
		d.Reason = who + ": on: workload"
	case StageShadow:
		d.Stage, d.Serve, d.Shadow = StageShadow, KindInstanceProfile, true
		d.Reason = who + ": shadow: instance-profile, workload verified in background"
	case StageCanary:
		d.Stage, d.Percent = StageCanary, rule.Percent
		line := rule.Percent * NumBuckets / 100
		if bucket >= 0 && bucket < NumBuckets && bucket < line {
			d.Serve = KindWorkload
			d.Reason = fmt.Sprintf("%s: canary %d%%, bucket %d < %d: workload", who, rule.Percent, bucket, line)
		} else {
			d.Serve = KindInstanceProfile
			d.Reason = fmt.Sprintf("%s: canary %d%%, bucket %d >= %d: instance-profile", who, rule.Percent, bucket, line)
		}
	default: // off, or the zero Rule
		d.Stage, d.Serve = StageOff, KindInstanceProfile
		d.Reason = who + ": off: instance-profile"
	}
	return d
}

// Needs reports which kinds of credentials must be kept warm (prefetched and
// refreshed) for d with the given fallback: the workload credentials when
// they are served or verified in shadow; the instance profile's when they are
// served, when they are the fallback, or when the stage is canary or shadow
// (so flipping back is instant).
func (d Decision) Needs(fallback Fallback) (workload, instanceProfile bool) {
	workload = d.Serve == KindWorkload || d.Shadow
	instanceProfile = d.Serve == KindInstanceProfile || fallback == FallbackInstanceProfile ||
		d.Stage == StageCanary || d.Stage == StageShadow
	return workload, instanceProfile
}
