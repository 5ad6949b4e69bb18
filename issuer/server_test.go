package issuer

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

func TestDiscoveryAndJWKS(t *testing.T) {
	e := newEnv(t, baseYAML)
	for _, path := range []string{PathDiscovery, "/imds" + PathDiscovery} {
		status, body := e.get(path)
		if status != 200 {
			t.Fatalf("GET %s: %d", path, status)
		}
		var d map[string]any
		if err := json.Unmarshal(body, &d); err != nil {
			t.Fatal(err)
		}
		if d["issuer"] != "https://oidc.example.com/imds" || d["jwks_uri"] != "https://oidc.example.com/imds/.well-known/jwks.json" {
			t.Fatalf("discovery %s", body)
		}
		for _, k := range []string{"id_token_signing_alg_values_supported", "response_types_supported", "subject_types_supported"} {
			if _, ok := d[k].([]any); !ok {
				t.Fatalf("discovery lacks %s: %s", k, body)
			}
		}
	}
	status, body := e.get("/imds" + PathJWKS)
	if status != 200 {
		t.Fatalf("GET jwks: %d", status)
	}
	var set struct {
		Keys []map[string]any `json:"keys"`
	}
	if err := json.Unmarshal(body, &set); err != nil || len(set.Keys) != 1 {
		t.Fatalf("jwks %s", body)
	}
	k := set.Keys[0]
	if k["kty"] != "EC" || k["alg"] != "ES256" || k["use"] != "sig" || k["kid"] == "" || k["d"] != nil {
		t.Fatalf("jwk %v", k)
	}
	// kid is the RFC 7638 thumbprint.
	var jwk jose.JSONWebKey
	_ = jwk.UnmarshalJSON(mustJSON(k))
	if tp, _ := jwk.Thumbprint(cryptoSHA256); b64(tp) != k["kid"] {
		t.Fatalf("kid %v is not the thumbprint %s", k["kid"], b64(tp))
	}
}

func TestMintClaims(t *testing.T) {
	e := newEnv(t, baseYAML)
	before := time.Now().Unix()
	status, out := e.post(iidRequest(t, "billing"))
	if status != 200 {
		t.Fatalf("status %d %v", status, out)
	}
	tok := out["token"]
	kid, c := e.verifyToken(tok)
	if kid != e.srv.state.Load().keys[0].kid {
		t.Fatal("not signed by the first key")
	}
	iat := int64(c["iat"].(float64))
	if c["iss"] != "https://oidc.example.com/imds" || c["aud"] != "sts.amazonaws.com" || c["sub"] != "billing" ||
		iat < before || int64(c["exp"].(float64)) != iat+3600 || int64(c["nbf"].(float64)) > time.Now().Unix() || c["jti"] == "" {
		t.Fatalf("claims %v", c)
	}
	tags := c[TagsClaim].(map[string]any)
	pt := tags["principal_tags"].(map[string]any)
	want := map[string]string{"team": "billing", "host": testInstance, "workload": "billing", "where": testAccount + "/" + testRegion}
	for k, v := range want {
		if vs, _ := pt[k].([]any); len(vs) != 1 || vs[0] != v {
			t.Fatalf("principal_tags[%s] = %v, want [%s]", k, pt[k], v)
		}
	}
	if tk := tags["transitive_tag_keys"].([]any); len(tk) != 1 || tk[0] != "team" {
		t.Fatalf("transitive_tag_keys %v", tk)
	}
	// Two tokens never share a jti.
	_, out2 := e.post(iidRequest(t, "billing"))
	if _, c2 := e.verifyToken(out2["token"]); c2["jti"] == c["jti"] {
		t.Fatal("jti repeated")
	}
	if v := testutil.ToFloat64(e.srv.metrics.minted.WithLabelValues("billing", "billing")); v != 2 {
		t.Fatalf("minted{billing,billing} = %v", v)
	}
}

func TestWorkloads(t *testing.T) {
	e := newEnv(t, baseYAML)
	ca, _ := cas()
	for _, tc := range []struct {
		name, account, workload string
		status                  int
		sub, code               string
	}{
		{"default subject is the first", testAccount, "", 200, "app", ""},
		{"listed workload", testAccount, "billing", 200, "billing", ""},
		{"workload not in the rule", testAccount, "other", 403, "", reasonWorkload},
		{"second rule", "222222222222", "", 200, "other", ""},
		{"no rule for the account", "333333333333", "", 403, "", reasonNoRule},
	} {
		t.Run(tc.name, func(t *testing.T) {
			doc := iidDocument(tc.account, testInstance, testRegion, testPending)
			status, out := e.post(map[string]string{"document": doc, "pkcs7": signIID(t, doc, ca), "workload": tc.workload})
			if status != tc.status || out["code"] != tc.code {
				t.Fatalf("status %d %v", status, out)
			}
			if status == 200 {
				if _, c := e.verifyToken(out["token"]); c["sub"] != tc.sub {
					t.Fatalf("sub %v", c["sub"])
				}
			}
		})
	}
}

func TestRequestLimits(t *testing.T) {
	e := newEnv(t, baseYAML)
	big := `{"document": "` + strings.Repeat("a", MaxRequestBody) + `"}`
	for _, tc := range []struct {
		name, ctype, body string
		status            int
		code              string
	}{
		{"over 1 MiB", "application/json", big, 413, reasonTooLarge},
		{"not JSON", "application/json", "document=x", 400, reasonBadRequest},
		{"unknown field", "application/json", `{"document":"x","pkcs7":"y","role":"admin"}`, 400, reasonBadRequest},
		{"two values", "application/json", `{} {}`, 400, reasonBadRequest},
		{"form content type", "application/x-www-form-urlencoded", `{}`, 415, reasonMediaType},
		{"unknown method", "application/json", `{"method":"gcp_iit"}`, 400, reasonBadRequest},
		{"aws_iam not enabled", "application/json", `{"method":"aws_iam","sts_request":{"method":"POST"}}`, 403, reasonMethodDisabled},
	} {
		t.Run(tc.name, func(t *testing.T) {
			req := httptest.NewRequest(http.MethodPost, PathToken, strings.NewReader(tc.body))
			req.Header.Set("Content-Type", tc.ctype)
			rec := httptest.NewRecorder()
			e.h.ServeHTTP(rec, req)
			var out map[string]string
			_ = json.Unmarshal(rec.Body.Bytes(), &out)
			if rec.Code != tc.status || out["code"] != tc.code {
				t.Fatalf("status %d body %s", rec.Code, rec.Body.Bytes())
			}
		})
	}
	rec := httptest.NewRecorder()
	e.h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, PathToken, nil))
	if rec.Code != http.StatusMethodNotAllowed {
		t.Fatalf("GET /v1/token: %d", rec.Code)
	}
}

func TestRateLimit(t *testing.T) {
	e := newEnv(t, baseYAML+"rate_limit: {per_host_per_minute: 1, burst: 3, max_hosts: 2}\n")
	req := iidRequest(t, "")
	for i := 0; i < 3; i++ {
		if status, out := e.post(req); status != 200 {
			t.Fatalf("request %d: %d %v", i, status, out)
		}
	}
	status, out := e.post(req)
	if status != http.StatusTooManyRequests || out["code"] != reasonRateLimited {
		t.Fatalf("4th request: %d %v", status, out)
	}
	// Another host has its own bucket.
	ca, _ := cas()
	doc := iidDocument(testAccount, "i-0aaaaaaaaaaaaaaa0", testRegion, testPending)
	if status, _ := e.post(map[string]string{"document": doc, "pkcs7": signIID(t, doc, ca)}); status != 200 {
		t.Fatalf("other host: %d", status)
	}
	// The map is bounded.
	for _, id := range []string{"i-0bbbbbbbbbbbbbbb0", "i-0ccccccccccccccc0"} {
		doc := iidDocument(testAccount, id, testRegion, testPending)
		e.post(map[string]string{"document": doc, "pkcs7": signIID(t, doc, ca)})
	}
	if n := e.srv.limiter.Len(); n != 2 {
		t.Fatalf("limiter tracks %d hosts, max 2", n)
	}
}

func TestLimiterRefill(t *testing.T) {
	l := newLimiter(RateLimit{PerHostPerMinute: 60, Burst: 2, MaxHosts: 10})
	now := time.Now()
	if !l.Allow("h", now) || !l.Allow("h", now) || l.Allow("h", now) {
		t.Fatal("burst of 2 not enforced")
	}
	if !l.Allow("h", now.Add(1100*time.Millisecond)) {
		t.Fatal("no token after a second at 60/min")
	}
	l.Configure(RateLimit{PerHostPerMinute: 0, Burst: 1, MaxHosts: 10})
	for i := 0; i < 100; i++ {
		if !l.Allow("h", now) {
			t.Fatal("0/min should disable limiting")
		}
	}
}

// TestRotation: two keys, the first signs, both are published; after the
// swap, tokens of the old key still verify with the published JWKS.
func TestRotation(t *testing.T) {
	yaml := strings.Replace(baseYAML, `    - {file: "KEY1"}`, "    - {file: \"KEY1\"}\n    - {file: \"RSAKEY\"}", 1)
	e := newEnv(t, yaml)
	_, jwks := e.get(PathJWKS)
	var set jose.JSONWebKeySet
	if err := json.Unmarshal(jwks, &set); err != nil || len(set.Keys) != 2 {
		t.Fatalf("jwks: %s", jwks)
	}
	if set.Keys[0].Algorithm != "ES256" || set.Keys[1].Algorithm != "RS256" || set.Keys[1].KeyID == "" {
		t.Fatalf("jwks keys %+v", set.Keys)
	}
	_, disc := e.get(PathDiscovery)
	if !bytes.Contains(disc, []byte(`"ES256"`)) || !bytes.Contains(disc, []byte(`"RS256"`)) {
		t.Fatalf("discovery algs: %s", disc)
	}
	_, out := e.post(iidRequest(t, ""))
	oldTok := out["token"]
	kidOld, _ := e.verifyToken(oldTok)

	// Move the RSA key first (reload), keep the EC key published.
	swapped := strings.Replace(yaml, "    - {file: \"KEY1\"}\n    - {file: \"RSAKEY\"}", "    - {file: \"RSAKEY\"}\n    - {file: \"KEY1\"}", 1)
	if err := e.reload(swapped); err != nil {
		t.Fatal(err)
	}
	_, out = e.post(iidRequest(t, ""))
	kidNew, c := e.verifyToken(out["token"])
	if kidNew == kidOld || c["sub"] != "app" {
		t.Fatalf("after the swap the token is signed by %s (old %s)", kidNew, kidOld)
	}
	if h := strings.Split(out["token"], ".")[0]; !strings.Contains(string(mustB64(t, h)), `"RS256"`) {
		t.Fatalf("header %s", mustB64(t, h))
	}
	if k, _ := e.verifyToken(oldTok); k != kidOld {
		t.Fatal("the old key's token no longer verifies")
	}
}

// reload re-reads yaml (after the env's replacements) into the server.
func (e *env) reload(yaml string) error {
	cfg, err := ParseConfig([]byte(e.replace(yaml)))
	if err != nil {
		return err
	}
	return e.srv.Reload(context.Background(), cfg)
}

func TestReloadKeepsLastGoodConfig(t *testing.T) {
	e := newEnv(t, baseYAML)
	_, jwks := e.get(PathJWKS)
	bad := strings.Replace(baseYAML, `{file: "KEY1"}`, `{file: "/nonexistent/key.pem"}`, 1)
	if err := e.reload(bad); err == nil {
		t.Fatal("a config with a missing key was accepted")
	}
	if v := testutil.ToFloat64(e.srv.metrics.reloadOK); v != 0 {
		t.Fatalf("reload gauge %v after a bad reload", v)
	}
	if _, j := e.get(PathJWKS); !bytes.Equal(j, jwks) {
		t.Fatal("the JWKS changed after a refused reload")
	}
	if status, _ := e.post(iidRequest(t, "")); status != 200 {
		t.Fatalf("mint after a refused reload: %d", status)
	}
	if err := e.reload(strings.Replace(baseYAML, "ttl: 1h", "ttl: 30m", 1)); err != nil {
		t.Fatal(err)
	}
	if v := testutil.ToFloat64(e.srv.metrics.reloadOK); v != 1 {
		t.Fatalf("reload gauge %v after a good reload", v)
	}
	_, out := e.post(iidRequest(t, ""))
	if _, c := e.verifyToken(out["token"]); c["exp"].(float64)-c["iat"].(float64) != 1800 {
		t.Fatalf("ttl not reloaded: %v", c)
	}
	// Restart-only settings are taken, and said to need a restart.
	if err := e.reload("max_connections: 16\n" + strings.Replace(baseYAML, "ttl: 1h", "ttl: 30m", 1)); err != nil {
		t.Fatal(err)
	}
	if logs := logText(e.logs); !strings.Contains(logs, "max_connections changed; it takes effect only after a restart") ||
		strings.Contains(logs, "listen changed") {
		t.Errorf("restart-only warnings after a max_connections change:\n%s", logs)
	}
}

func TestReadiness(t *testing.T) {
	e := newEnv(t, baseYAML)
	if status, body := e.get("/readyz"); status != 200 || !strings.Contains(string(body), "ready: signing with ES256") {
		t.Fatalf("readyz %d %s", status, body)
	}
	// A failing signing key makes the issuer not ready, saying why.
	st := e.srv.state.Load()
	orig := st.keys[0].signDigest
	st.keys[0].signDigest = func(context.Context, []byte) ([]byte, error) { return nil, errTest("KMS is throttling") }
	if status, out := e.post(iidRequest(t, "")); status != 503 || out["code"] != reasonSign {
		t.Fatalf("mint with a failing key: %d %v", status, out)
	}
	if status, body := e.get("/readyz"); status != 503 || !strings.Contains(string(body), "KMS is throttling") {
		t.Fatalf("readyz %d %s", status, body)
	}
	st.keys[0].signDigest = orig
	if status, _ := e.post(iidRequest(t, "")); status != 200 {
		t.Fatal("mint after recovery")
	}
	if status, _ := e.get("/readyz"); status != 200 {
		t.Fatal("not ready after a successful signature")
	}
	e.srv.Drain()
	if status, body := e.get("/readyz"); status != 503 || !strings.Contains(string(body), "shutting down") {
		t.Fatalf("readyz while draining %d %s", status, body)
	}
	if status, _ := e.get("/healthz"); status != 200 {
		t.Fatal("healthz")
	}
}

type errTest string

func (e errTest) Error() string { return string(e) }

// TestSecretsNeverLogged runs every path at Debug and checks the logs hold
// no token, no signature, no key and no credential.
func TestSecretsNeverLogged(t *testing.T) {
	e := newEnv(t, baseYAML)
	var secrets []string
	for _, w := range []string{"", "billing", "nope"} {
		req := iidRequest(t, w)
		secrets = append(secrets, req["pkcs7"])
		_, out := e.post(req)
		if out["token"] != "" {
			secrets = append(secrets, out["token"], strings.Split(out["token"], ".")[2])
		}
	}
	req := iidRequest(t, "")
	req["pkcs7"] = req["pkcs7"][:len(req["pkcs7"])-8] + "AAAAAAA="
	e.post(req)
	st := e.srv.state.Load()
	st.keys[0].signDigest = func(context.Context, []byte) ([]byte, error) { return nil, errTest("boom") }
	e.post(iidRequest(t, ""))
	if err := e.reload(strings.Replace(baseYAML, `{file: "KEY1"}`, `{file: "/nonexistent"}`, 1)); err == nil {
		t.Fatal("bad reload accepted")
	}
	logs := logText(e.logs)
	if e.logs.Len() == 0 {
		t.Fatal("nothing logged")
	}
	ec, _, _ := keyPEMs()
	keyBody := strings.Split(string(ec), "\n")[1]
	for _, s := range append(secrets, keyBody, "PRIVATE KEY") {
		if len(s) > 20 && strings.Contains(logs, s[:20]) || strings.Contains(logs, s) {
			t.Fatalf("a secret was logged: %.24s…\n%s", s, logs)
		}
	}
	if jwtShape.MatchString(logs) {
		t.Fatalf("something shaped like a JWT was logged:\n%s", logs)
	}
}

func TestMetricsLint(t *testing.T) {
	e := newEnv(t, baseYAML)
	e.post(iidRequest(t, ""))
	e.post(map[string]string{"document": "x"})
	problems, err := testutil.GatherAndLint(e.reg)
	if err != nil || len(problems) > 0 {
		t.Fatalf("lint: %v %v", problems, err)
	}
	status, body := e.get("/metrics")
	for _, name := range []string{"imdsproxy_issuer_tokens_minted_total", "imdsproxy_issuer_attestation_failures_total",
		"imdsproxy_issuer_token_request_duration_seconds", "imdsproxy_issuer_config_last_reload_successful",
		"imdsproxy_issuer_ready 1"} {
		if status != 200 || !bytes.Contains(body, []byte(name)) {
			t.Fatalf("/metrics lacks %s", name)
		}
	}
	// imdsproxy_issuer_ready follows /readyz.
	e.srv.Drain()
	if st, _ := e.get("/readyz"); st != http.StatusServiceUnavailable {
		t.Fatalf("readyz while draining = %d", st)
	}
	if _, body := e.get("/metrics"); !bytes.Contains(body, []byte("imdsproxy_issuer_ready 0")) {
		t.Fatalf("/metrics while draining lacks imdsproxy_issuer_ready 0")
	}
}

func TestMain(m *testing.M) {
	os.Exit(m.Run())
}
