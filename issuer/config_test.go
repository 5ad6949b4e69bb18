package issuer

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/imdsproxy/imdsproxy/config"
)

const minimalYAML = `listen: 127.0.0.1:8443
issuer: https://oidc.example.com/imds
signing: {keys: [{file: /etc/imdsproxy-issuer/signing.pem}]}
attestation: {aws_iid: {}}
policy:
  - match: {accounts: ["111111111111"]}
    subjects: [app]
`

func TestConfigDefaults(t *testing.T) {
	cfg, err := ParseConfig([]byte(minimalYAML))
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Tokens.Audience != DefaultAudience || cfg.Tokens.TTL.D() != time.Hour || cfg.RateLimit.PerHostPerMinute != DefaultPerHostPerMinute ||
		cfg.Attestation.EC2.CacheTTL.D() != DefaultEC2CacheTTL || cfg.Shutdown.Timeout.D() != DefaultShutdownTimeout ||
		cfg.MaxConnections != DefaultMaxConnections {
		t.Fatalf("defaults %+v", cfg)
	}
}

func TestConfigErrors(t *testing.T) {
	for _, tc := range []struct {
		name, from, to, key string
	}{
		{"unknown key", "listen:", "listne:", "unknown key listne"},
		{"unknown nested key", "subjects: [app]", "subjects: [app]\n    subject: app", "unknown key policy[0].subject"},
		{"missing listen", "listen: 127.0.0.1:8443\n", "", "listen"},
		{"no tls off loopback", "127.0.0.1:8443", "0.0.0.0:8443", "tls"},
		{"issuer not https", "https://oidc", "http://oidc", "issuer"},
		{"issuer trailing slash", "example.com/imds", "example.com/imds/", "issuer"},
		{"no keys", "keys: [{file: /etc/imdsproxy-issuer/signing.pem}]", "keys: []", "signing.keys"},
		{"file and kms", "{file: /etc/imdsproxy-issuer/signing.pem}", "{file: /a, kms: 'arn:aws:kms:us-east-1:111111111111:key/x'}", "signing.keys[0]"},
		{"bad kms arn", "{file: /etc/imdsproxy-issuer/signing.pem}", "{kms: 'key/x'}", "signing.keys[0].kms"},
		{"bad published_at", "{file: /etc/imdsproxy-issuer/signing.pem}", "{file: /a, published_at: yesterday}", "signing.keys[0].published_at"},
		{"no attestation", "attestation: {aws_iid: {}}", "attestation: {}", "attestation"},
		{"ttl too long", "policy:", "tokens: {ttl: 48h}\npolicy:", "tokens.ttl"},
		{"ttl not a duration", "policy:", "tokens: {ttl: 1 hour}\npolicy:", "tokens.ttl"},
		{"no policy", "policy:\n  - match: {accounts: [\"111111111111\"]}\n    subjects: [app]\n", "", "policy"},
		{"account not 12 digits", `"111111111111"`, `"11111"`, "policy[0].match.accounts[0]"},
		{"bad region", `accounts: ["111111111111"]`, `regions: [useast1]`, "policy[0].match.regions[0]"},
		{"no subjects", "subjects: [app]", "subjects: []", "policy[0].subjects"},
		{"bad subject", "subjects: [app]", "subjects: [\"a b\"]", "policy[0].subjects[0]"},
		{"subject starting with a dash", "subjects: [app]", "subjects: [\"-app\"]", "policy[0].subjects[0]"},
		{"duplicate subject", "subjects: [app]", "subjects: [app, app]", "policy[0].subjects[1]"},
		{"method not enabled", `accounts: ["111111111111"]`, `methods: [aws_iam]`, "policy[0].match.methods[0]"},
		{"unknown placeholder", "subjects: [app]", "subjects: [app]\n    principal_tags: {a: \"{hostname}\"}", "policy[0].principal_tags.a"},
		{"placeholder in key", "subjects: [app]", "subjects: [app]\n    principal_tags: {\"{workload}\": x}", "policy[0].principal_tags.{workload}"},
		{"reserved key", "subjects: [app]", "subjects: [app]\n    principal_tags: {\"aws:x\": x}", "policy[0].principal_tags.aws:x"},
		{"value too long once expanded", "subjects: [app]", "subjects: [app]\n    principal_tags: {a: \"" + strings.Repeat("x", 240) + "{instanceId}\"}", "policy[0].principal_tags.a"},
		{"bad tag character", "subjects: [app]", "subjects: [app]\n    principal_tags: {a: \"x;y\"}", "policy[0].principal_tags.a"},
		{"transitive key not a tag", "subjects: [app]", "subjects: [app]\n    transitive_tag_keys: [team]", "policy[0].transitive_tag_keys[0]"},
		{"duplicate rule names", "policy:\n", "policy:\n  - {name: a, match: {}, subjects: [x]}\n  - {name: a, match: {}, subjects: [y]}\n", "policy[1].name"},
		{"publish without bucket", "policy:", "publish: {region: us-east-1}\npolicy:", "publish.bucket"},
		{"sts endpoint with path", "attestation: {aws_iid: {}}", "attestation: {aws_iam: {sts_endpoints: [\"https://sts.amazonaws.com/x\"]}}", "attestation.aws_iam.sts_endpoints[0]"},
		{"negative max_in_flight", "attestation: {aws_iid: {}}", "attestation: {aws_iam: {max_in_flight: -1}}", "attestation.aws_iam.max_in_flight"},
		{"max_in_flight too large", "attestation: {aws_iid: {}}", "attestation: {aws_iam: {max_in_flight: 5000}}", "attestation.aws_iam.max_in_flight"},
		{"negative rate", "policy:", "rate_limit: {per_host_per_minute: -1}\npolicy:", "rate_limit"},
		{"no connections", "policy:", "max_connections: 0\npolicy:", "max_connections"},
		{"too many connections", "policy:", "max_connections: 2000000\npolicy:", "max_connections"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if !strings.Contains(minimalYAML, tc.from) {
				t.Fatalf("test bug: %q not in the config", tc.from)
			}
			_, err := ParseConfig([]byte(strings.Replace(minimalYAML, tc.from, tc.to, 1)))
			if err == nil || !strings.Contains(err.Error(), tc.key) {
				t.Fatalf("err %v; want one naming %s", err, tc.key)
			}
		})
	}
	t.Run("too many tags", func(t *testing.T) {
		var b strings.Builder
		for i := 0; i < 51; i++ {
			b.WriteString("k" + strings.Repeat("x", i) + ": v, ")
		}
		_, err := ParseConfig([]byte(strings.Replace(minimalYAML, "subjects: [app]", "subjects: [app]\n    principal_tags: {"+b.String()+"}", 1)))
		var ce *ConfigError
		if !errors.As(err, &ce) || ce.Key != "policy[0].principal_tags" {
			t.Fatalf("err %v", err)
		}
	})
}

func TestConfigWarnings(t *testing.T) {
	now := time.Date(2026, 6, 1, 12, 0, 0, 0, time.UTC)
	two := strings.Replace(minimalYAML, "keys: [{file: /etc/imdsproxy-issuer/signing.pem}]",
		"keys: [{file: /a, published_at: PUB}, {file: /b}]", 1)
	for _, tc := range []struct {
		name, yaml, want string
	}{
		{"one key: no rotation warning", minimalYAML, ""},
		{"signing key without published_at", strings.Replace(two, ", published_at: PUB", "", 1), "signing.keys[0].published_at: not set"},
		{"published 10 minutes ago", strings.Replace(two, "PUB", "2026-06-01T11:50:00Z", 1), "published 10m0s ago, less than tokens.ttl"},
		{"published a day ago", strings.Replace(two, "PUB", "2026-05-31T12:00:00Z", 1), ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg, err := ParseConfig([]byte(tc.yaml))
			if err != nil {
				t.Fatal(err)
			}
			var rot []string
			for _, w := range cfg.Warnings(now) {
				if strings.HasPrefix(w, "signing.") {
					rot = append(rot, w)
				}
			}
			if tc.want == "" && len(rot) > 0 || tc.want != "" && (len(rot) != 1 || !strings.Contains(rot[0], tc.want)) {
				t.Fatalf("warnings %q; want %q", rot, tc.want)
			}
		})
	}
	cfg, _ := ParseConfig([]byte(strings.Replace(minimalYAML, `{accounts: ["111111111111"]}`, "{}", 1)))
	if w := strings.Join(cfg.Warnings(now), "\n"); !strings.Contains(w, "matches every attested host") || !strings.Contains(w, "copied instance identity document") {
		t.Fatalf("warnings %s", w)
	}
}

// TestConfigKeysDocumented: every config key appears in docs/issuer.md.
func TestConfigKeysDocumented(t *testing.T) {
	doc := readDoc(t, "issuer.md")
	for _, k := range config.Keys(Config{}) {
		if !strings.Contains(doc, "`"+k+"`") {
			t.Errorf("docs/issuer.md does not document `%s`", k)
		}
	}
}

func TestCheckFiles(t *testing.T) {
	e := newEnv(t, baseYAML)
	if err := CheckFiles(e.cfg); err != nil {
		t.Fatal(err)
	}
	bad := *e.cfg
	bad.Attestation.AWSIID = &IIDConfig{Certificates: []string{"/nonexistent"}}
	var ce *ConfigError
	if err := CheckFiles(&bad); !errors.As(err, &ce) || ce.Key != "attestation.aws_iid.certificates[0]" {
		t.Fatalf("err %v", err)
	}
}
