package main

import (
	"bytes"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/imdsproxy/imdsproxy/config"
	"github.com/imdsproxy/imdsproxy/rollout"
)

func TestGoodConfigs(t *testing.T) {
	files, _ := filepath.Glob("testdata/good/*.yaml")
	if len(files) == 0 {
		t.Fatal("no good configs under testdata/good")
	}
	for _, f := range files {
		t.Run(filepath.Base(f), func(t *testing.T) {
			if _, err := loadConfig(f); err != nil {
				t.Fatalf("loadConfig: %v", err)
			}
		})
	}
}

func TestDefaultsAndDerivedValues(t *testing.T) {
	cfg, err := loadConfig("testdata/good/minimal.yaml")
	if err != nil {
		t.Fatal(err)
	}
	want := defaultConfig()
	if cfg.Listen != want.Listen || cfg.AdminListen != want.AdminListen || cfg.Upstream != want.Upstream {
		t.Errorf("listeners/upstream defaults not applied: %+v", cfg)
	}
	if cfg.IMDS.Tokens != "required" || cfg.IMDS.HopLimit != 1 || cfg.Source != "web-identity" {
		t.Errorf("imds/source defaults not applied: %+v", cfg)
	}
	if cfg.Role.Name != "app-prod" {
		t.Errorf("role.name default = %q, want the last part of the ARN, app-prod", cfg.Role.Name)
	}
	if cfg.Role.Duration.D() != time.Hour {
		t.Errorf("role.duration default = %s, want 1h", cfg.Role.Duration.D())
	}
}

// TestBadConfigsNameTheKey checks that every refusal names the offending key.
func TestBadConfigsNameTheKey(t *testing.T) {
	base := "role: {arn: \"arn:aws:iam::222222222222:role/app\"}\nidentity: {jwt_file: /run/t.jwt}\n"
	const (
		raAnchor  = "arn:aws:rolesanywhere:us-east-1:222222222222:trust-anchor/0b8c3f1e-1111-2222-3333-444455556666"
		raProfile = "arn:aws:rolesanywhere:us-east-1:222222222222:profile/7c9a1b2c-1111-2222-3333-444455556666"
	)
	raBase := "role: {arn: \"arn:aws:iam::222222222222:role/app\"}\nsource: roles-anywhere\nidentity: {x509: {cert: /c.pem, key: /k.pem}}\n"
	cases := []struct {
		name, yaml, wantKey string
	}{
		{"unknown top-level key", base + "listn: 1.2.3.4:80\n", "listn"},
		{"unknown nested key", "role: {arn: \"arn:aws:iam::222222222222:role/app\", nmae: x}\nidentity: {jwt_file: /run/t.jwt}\n", "role.nmae"},
		{"duplicate key", base + "source: web-identity\nsource: web-identity\n", "source"},
		{"tokens value", base + "imds: {tokens: sometimes}\n", "imds.tokens"},
		{"hop limit range", base + "imds: {hop_limit: 65}\n", "imds.hop_limit"},
		{"hop limit type", base + "imds: {hop_limit: two}\n", "imds.hop_limit"},
		{"duration number", "role: {arn: \"arn:aws:iam::222222222222:role/app\", duration: 3600}\nidentity: {jwt_file: /run/t.jwt}\n", "role.duration"},
		{"duration too short", "role: {arn: \"arn:aws:iam::222222222222:role/app\", duration: 5m}\nidentity: {jwt_file: /run/t.jwt}\n", "role.duration"},
		{"negative duration", base + "upstream_timeout: -1s\n", "upstream_timeout"},
		{"bad arn", "role: {arn: \"arn:aws:iam::12:role/app\"}\nidentity: {jwt_file: /run/t.jwt}\n", "role.arn"},
		{"missing arn", "identity: {jwt_file: /run/t.jwt}\n", "role.arn"},
		{"bad role name", "role: {arn: \"arn:aws:iam::222222222222:role/app\", name: \"a/b\"}\nidentity: {jwt_file: /run/t.jwt}\n", "role.name"},
		{"bad session name", "role: {arn: \"arn:aws:iam::222222222222:role/app\", session_name: \"has space\"}\nidentity: {jwt_file: /run/t.jwt}\n", "role.session_name"},
		{"unknown source", base + "source: magic\n", "source"},
		{"federation without url", base + "source: federation\n", "federation.url"},
		{"federation plain http", base + "source: federation\nfederation: {url: \"http://creds.internal/v1\"}\n", "federation.url"},
		{"federation relative ca", base + "source: federation\nfederation: {url: \"https://creds.internal/v1\", ca_file: ca.pem}\n", "federation.ca_file"},
		{"roles anywhere without x509", base + "source: roles-anywhere\n", "identity.x509"},
		{"roles anywhere bad anchor", raBase + "roles_anywhere: {trust_anchor_arn: nope, profile_arn: " + raProfile + "}\n", "roles_anywhere.trust_anchor_arn"},
		{"roles anywhere bad profile", raBase + "roles_anywhere: {trust_anchor_arn: " + raAnchor + ", profile_arn: nope}\n", "roles_anywhere.profile_arn"},
		{"roles anywhere regions differ", raBase + "roles_anywhere: {trust_anchor_arn: " + raAnchor + ", profile_arn: " + strings.Replace(raProfile, "us-east-1", "eu-west-1", 1) + "}\n", "roles_anywhere.profile_arn"},
		{"roles anywhere relative key", "role: {arn: \"arn:aws:iam::222222222222:role/app\"}\nsource: roles-anywhere\nidentity: {x509: {cert: /c.pem, key: k.pem}}\n", "identity.x509.key"},
		{"assume role with jwt", base + "source: assume-role\n", "identity.jwt_file"},
		{"assume role bad base", "role: {arn: \"arn:aws:iam::222222222222:role/app\"}\nsource: assume-role\nassume_role: {base: magic}\n", "assume_role.base"},
		{"assume role aws tag", "role: {arn: \"arn:aws:iam::222222222222:role/app\"}\nsource: assume-role\nassume_role: {tags: {\"aws:x\": y}}\n", "assume_role.tags"},
		{"assume role tags not a map", "role: {arn: \"arn:aws:iam::222222222222:role/app\"}\nsource: assume-role\nassume_role: {tags: [a]}\n", "assume_role.tags"},
		{"assume role bad source identity", "role: {arn: \"arn:aws:iam::222222222222:role/app\"}\nsource: assume-role\nassume_role: {source_identity: \"a b\"}\n", "assume_role.source_identity"},
		{"instance profile with x509", "source: instance-profile\nidentity: {x509: {cert: /c, key: /k}}\n", "identity.x509"},
		{"jwt command relative", "role: {arn: \"arn:aws:iam::222222222222:role/app\"}\nidentity: {jwt_command: [mint]}\n", "identity.jwt_command"},
		{"jwt url plain http", "role: {arn: \"arn:aws:iam::222222222222:role/app\"}\nidentity: {jwt_url: \"http://issuer.internal/t\"}\n", "identity.jwt_url"},
		{"attestation without url", "role: {arn: \"arn:aws:iam::222222222222:role/app\"}\nidentity: {jwt_file: /t, attestation: aws_iam}\n", "identity.attestation"},
		{"attestation unknown", "role: {arn: \"arn:aws:iam::222222222222:role/app\"}\nidentity: {jwt_url: https://x/t, attestation: tpm}\n", "identity.attestation"},
		{"aws_iam without issuer", "role: {arn: \"arn:aws:iam::222222222222:role/app\"}\nidentity: {jwt_url: https://x/t, attestation: aws_iam}\n", "identity.issuer"},
		{"issuer with aws_iid", "role: {arn: \"arn:aws:iam::222222222222:role/app\"}\nidentity: {jwt_url: https://x/t, issuer: https://oidc.example.com}\n", "identity.issuer"},
		{"issuer not a url", "role: {arn: \"arn:aws:iam::222222222222:role/app\"}\nidentity: {jwt_url: https://x/t, attestation: aws_iam, issuer: oidc}\n", "identity.issuer"},
		{"subject with jwt_file", base + "workloads: [{uid: 1001, subject: billing, role: {arn: \"arn:aws:iam::222222222222:role/bk\"}}]\n", "workloads[0].subject"},
		{"subject charset", "role: {arn: \"arn:aws:iam::222222222222:role/app\"}\nidentity: {jwt_url: https://x/t}\nworkloads: [{uid: 1001, subject: \"a b\", role: {arn: \"arn:aws:iam::222222222222:role/bk\"}}]\n", "workloads[0].subject"},
		{"subject twice", "role: {arn: \"arn:aws:iam::222222222222:role/app\"}\nidentity: {jwt_url: https://x/t}\nworkloads: [{uid: 1001, subject: bk, role: {arn: \"arn:aws:iam::222222222222:role/bk\"}}, {uid: 1002, subject: bk, role: {arn: \"arn:aws:iam::222222222222:role/bk2\"}}]\n", "workloads[1].subject"},
		{"subject with roles anywhere", raBase + "roles_anywhere: {trust_anchor_arn: " + raAnchor + ", profile_arn: " + raProfile + "}\nworkloads: [{uid: 1001, subject: billing, role: {arn: \"arn:aws:iam::222222222222:role/bk\"}}]\n", "workloads[0].subject"},
		{"ca file without url", "role: {arn: \"arn:aws:iam::222222222222:role/app\"}\nidentity: {jwt_file: /t, ca_file: /ca.pem}\n", "identity.ca_file"},
		{"identity timeout", "role: {arn: \"arn:aws:iam::222222222222:role/app\"}\nidentity: {jwt_command: [/bin/mint], timeout: 10m}\n", "identity.timeout"},
		{"no identity", "role: {arn: \"arn:aws:iam::222222222222:role/app\"}\n", "identity.jwt_file"},
		{"relative jwt path", "role: {arn: \"arn:aws:iam::222222222222:role/app\"}\nidentity: {jwt_file: token.jwt}\n", "identity.jwt_file"},
		{"two identities", "role: {arn: \"arn:aws:iam::222222222222:role/app\"}\nidentity: {jwt_file: /a, jwt_url: https://x}\n", "identity"},
		{"listen", base + "listen: nonsense\n", "listen"},
		{"same listeners", base + "listen: 127.0.0.1:1\nadmin_listen: 127.0.0.1:1\n", "admin_listen"},
		{"upstream", base + "upstream: ftp://x\n", "upstream"},
		{"upstream path", base + "upstream: http://169.254.169.254/latest\n", "upstream"},
		{"region", base + "region: Mars\n", "region"},
		{"section not a map", base + "imds: required\n", "imds"},
		{"list expected", "role: {arn: \"arn:aws:iam::222222222222:role/app\"}\nidentity: {jwt_command: /bin/x}\n", "identity.jwt_command"},
		{"backoff order", base + "cache: {backoff_initial: 10s, backoff_max: 1s}\n", "cache.backoff_max"},
		{"margin too big", base + "cache: {expiry_margin: 45m}\n", "cache.expiry_margin"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := parseConfig([]byte(tc.yaml))
			if err == nil {
				t.Fatalf("config accepted:\n%s", tc.yaml)
			}
			if !strings.Contains(err.Error(), tc.wantKey) {
				t.Fatalf("error %q does not name key %q", err, tc.wantKey)
			}
		})
	}
}

func TestEmptyAndMalformedFiles(t *testing.T) {
	for name, data := range map[string]string{
		"empty":        "",
		"scalar":       "hello",
		"list":         "- a\n- b\n",
		"two docs":     "listen: 127.0.0.1:1\n---\nlisten: 127.0.0.1:2\n",
		"bad yaml":     "role: {arn: [\n",
		"alias":        "a: &x 1\nlisten: *x\n",
		"tab indented": "role:\n\tarn: x\n",
	} {
		if _, err := parseConfig([]byte(data)); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

func TestLoadConfigFileErrors(t *testing.T) {
	if _, err := loadConfig(filepath.Join(t.TempDir(), "missing.yaml")); err == nil {
		t.Error("missing file accepted")
	}
	big := filepath.Join(t.TempDir(), "big.yaml")
	if err := os.WriteFile(big, bytes.Repeat([]byte("#"), config.MaxSize+10), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := loadConfig(big); err == nil || !strings.Contains(err.Error(), "larger") {
		t.Errorf("oversized file: %v", err)
	}
}

func FuzzParseConfig(f *testing.F) {
	files, _ := filepath.Glob("testdata/*/*.yaml")
	for _, p := range files {
		b, err := os.ReadFile(p)
		if err == nil {
			f.Add(b)
		}
	}
	f.Add([]byte("imds: {hop_limit: 99999999999999999999}"))
	f.Add([]byte("role: {duration: 9999999999h}"))
	f.Fuzz(func(t *testing.T, data []byte) {
		cfg, err := parseConfig(data)
		if err != nil {
			return
		}
		// Whatever was accepted must be valid as a whole.
		if err := cfg.validate(); err != nil {
			t.Fatalf("accepted config fails validation: %v", err)
		}
		if (cfg.Role.Name == "" && cfg.Source != "instance-profile") || cfg.IMDS.HopLimit < 1 || cfg.IMDS.HopLimit > 64 {
			t.Fatalf("accepted config with bad values: %+v", cfg)
		}
	})
}

// TestDocumentedExamples parses every YAML example of the operator docs, so
// the docs cannot drift from the code.
func TestDocumentedExamples(t *testing.T) {
	for _, doc := range []string{"../../docs/configuration.md", "../../README.md", "../../docs/federation.md", "../../docs/rollout.md"} {
		data, err := os.ReadFile(doc)
		if err != nil {
			t.Fatal(err)
		}
		blocks := yamlBlocks(string(data))
		if len(blocks) == 0 {
			t.Fatalf("%s has no yaml examples", doc)
		}
		for i, b := range blocks {
			if isPolicy(b) {
				if _, err := rollout.ParsePolicy([]byte(b)); err != nil {
					t.Errorf("%s example %d (a rollout policy): %v\n%s", doc, i+1, err, b)
				}
				continue
			}
			if _, err := parseConfig([]byte(b)); err != nil {
				t.Errorf("%s example %d: %v\n%s", doc, i+1, err, b)
			}
		}
	}
	if _, err := loadConfig("../../systemd/config.example.yaml"); err != nil {
		t.Errorf("systemd/config.example.yaml: %v", err)
	}
}

// isPolicy reports whether a documented YAML block is a rollout policy
// rather than a daemon config: policies start with their version.
func isPolicy(block string) bool {
	for _, line := range strings.Split(block, "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		return strings.HasPrefix(line, "version:")
	}
	return false
}

func yamlBlocks(md string) []string {
	var out []string
	var cur []string
	indent := ""
	in := false
	for _, line := range strings.Split(md, "\n") {
		trimmed := strings.TrimSpace(line)
		switch {
		case !in && trimmed == "```yaml":
			in, cur = true, nil
			indent = line[:len(line)-len(strings.TrimLeft(line, " "))]
		case in && trimmed == "```":
			in = false
			out = append(out, strings.Join(cur, "\n"))
		case in:
			cur = append(cur, strings.TrimPrefix(line, indent))
		}
	}
	return out
}

// TestConfigurationReferenceComplete: every key of the config, from the
// config types themselves, has a row in the Keys table of
// docs/configuration.md, and the complete example shows every key that is
// not a list element or a source-specific section: the reference cannot
// drift from the code.
func TestConfigurationReferenceComplete(t *testing.T) {
	data, err := os.ReadFile("../../docs/configuration.md")
	if err != nil {
		t.Fatal(err)
	}
	doc := string(data)
	start := strings.Index(doc, "## Keys")
	end := strings.Index(doc, "## Complete examples by source")
	if start < 0 || end < start {
		t.Fatal("docs/configuration.md has no Keys section")
	}
	table := doc[start:end]
	example := yamlBlocks(doc[strings.Index(doc, "## Complete example"):start])
	if len(example) != 1 {
		t.Fatalf("the complete example is %d YAML blocks, want 1", len(example))
	}
	var ex map[string]any
	if err := yaml.Unmarshal([]byte(example[0]), &ex); err != nil {
		t.Fatal(err)
	}
	bySource := []string{"identity", "federation", "roles_anywhere", "assume_role", "workloads"}
	keys := config.Keys(Config{})
	for _, key := range keys {
		if slices.ContainsFunc(keys, func(k string) bool { return strings.HasPrefix(k, key+".") || strings.HasPrefix(k, key+"[]") }) {
			continue // a section: its keys are checked
		}
		if !documented(table, key) {
			t.Errorf("docs/configuration.md, Keys: no row for `%s`", key)
		}
		if strings.Contains(key, "[]") || slices.ContainsFunc(bySource, func(p string) bool { return strings.HasPrefix(key, p) }) {
			continue
		}
		if !inExample(ex, strings.Split(key, ".")) {
			t.Errorf("docs/configuration.md, complete example: %s is missing", key)
		}
	}
}

// documented reports whether the Keys table has a row for key: its own, or
// its section's naming it (`identity.x509` with `{cert, key, chain}`).
func documented(table, key string) bool {
	if strings.Contains(table, "`"+key+"`") {
		return true
	}
	i := strings.LastIndexAny(key, ".]")
	if i < 0 {
		return false
	}
	parent, leaf := strings.TrimSuffix(key[:i+1], "."), key[i+1:]
	for _, line := range strings.Split(table, "\n") {
		if strings.HasPrefix(line, "| `"+parent+"`") && strings.Contains(line, leaf) {
			return true
		}
	}
	return false
}

// inExample reports whether the path of keys is set in the parsed example.
func inExample(m map[string]any, path []string) bool {
	v, ok := m[path[0]]
	if !ok {
		return false
	}
	if len(path) == 1 {
		return true
	}
	sub, ok := v.(map[string]any)
	return ok && inExample(sub, path[1:])
}
