package proxy

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/imdsproxy/imdsproxy/creds"
)

func TestCredentialDocuments(t *testing.T) {
	noAcct := testCreds()
	noAcct.AccountID, noAcct.RoleARN = "", ""
	acctFromARN := testCreds()
	acctFromARN.AccountID = ""
	noLastUpdated := testCreds()
	noLastUpdated.LastUpdated = time.Time{}

	tests := []struct {
		name   string
		path   string
		creds  creds.Credentials
		golden string
	}{
		{"legacy", "/latest/meta-data/iam/security-credentials/app", testCreds(), "credentials.golden"},
		{"legacy trailing slash", "/latest/meta-data/iam/security-credentials/app/", testCreds(), "credentials.golden"},
		{"versioned path", "/2016-09-02/meta-data/iam/security-credentials/app", testCreds(), "credentials.golden"},
		{"extended", "/latest/meta-data/iam/security-credentials-extended/app", testCreds(), "credentials_extended.golden"},
		{"extended trailing slash", "/latest/meta-data/iam/security-credentials-extended/app/", testCreds(), "credentials_extended.golden"},
		{"extended account from ARN", "/latest/meta-data/iam/security-credentials-extended/app", acctFromARN, "credentials_extended.golden"},
		{"extended account unknown", "/latest/meta-data/iam/security-credentials-extended/app", noAcct, "credentials_extended_noaccount.golden"},
		{"no LastUpdated: now", "/latest/meta-data/iam/security-credentials/app", noLastUpdated, "credentials_now.golden"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t, Config{})
			e.src.set(tt.creds, nil)
			w := e.doWire(t, http.MethodGet, tt.path, nil)
			if w.Code != http.StatusOK {
				t.Fatalf("status %d", w.Code)
			}
			if ct := w.Header().Get("Content-Type"); ct != "text/plain" {
				t.Errorf("Content-Type %q", ct)
			}
			if cl := w.Header().Get("Content-Length"); cl != fmt.Sprint(w.Body.Len()) {
				t.Errorf("Content-Length %q, body %d", cl, w.Body.Len())
			}
			golden(t, tt.golden, w.Body.Bytes())
			var doc map[string]string
			if err := json.Unmarshal(w.Body.Bytes(), &doc); err != nil {
				t.Fatalf("not JSON: %v", err)
			}
			if doc["SecretAccessKey"] != testSecret || doc["Token"] != testToken || doc["AccessKeyId"] != testKeyID {
				t.Errorf("credentials not served verbatim: %v", doc)
			}
			if roles := e.src.roles; len(roles) != 1 || roles[0] != testRole || !e.src.ctxOK {
				t.Errorf("source called with %v (live ctx %v)", roles, e.src.ctxOK)
			}
		})
	}
}

// TestCredentialDocumentShape checks the wire rules independently of the
// golden files: key order, spacing, timestamps.
func TestCredentialDocumentShape(t *testing.T) {
	e := newEnv(t, Config{})
	body := e.do(http.MethodGet, "/latest/meta-data/iam/security-credentials-extended/app", nil).Body.String()
	keys := regexp.MustCompile(`(?m)^  "(\w+)" : "`).FindAllStringSubmatch(body, -1)
	var order []string
	for _, k := range keys {
		order = append(order, k[1])
	}
	want := "Code LastUpdated Type AccessKeyId SecretAccessKey Token Expiration AccountId"
	if got := strings.Join(order, " "); got != want {
		t.Errorf("key order %q, want %q", got, want)
	}
	if !strings.HasPrefix(body, "{\n") || !strings.HasSuffix(body, "\n}") {
		t.Errorf("framing: %q", body)
	}
	for _, want := range []string{`"Expiration" : "2026-03-01T13:00:01Z"`, `"LastUpdated" : "2026-03-01T11:50:01Z"`,
		`"Code" : "Success"`, `"Type" : "AWS-HMAC"`, `"AccountId" : "222222222222"`} {
		if !strings.Contains(body, want) {
			t.Errorf("missing %s in\n%s", want, body)
		}
	}
}

func TestCredentialErrors(t *testing.T) {
	const leak = "SECRET-DETAIL arn:aws:iam::999:role/x token=eyJhbGciOi"
	expired := testCreds()
	expired.Expires = t0.Add(-time.Second)
	sameSecond := testCreds()
	sameSecond.Expires = t0.Add(300 * time.Millisecond) // valid, but "12:00:00Z" would be in the past
	incomplete := testCreds()
	incomplete.SessionToken = ""

	tests := []struct {
		name  string
		creds creds.Credentials
		err   error
		code  string
	}{
		{"access denied", creds.Credentials{}, &classErr{"access_denied", true, leak}, "AssumeRoleUnauthorizedAccess"},
		{"wrapped access denied", creds.Credentials{}, fmt.Errorf("cache: %w", &classErr{"access_denied", true, leak}), "AssumeRoleUnauthorizedAccess"},
		{"invalid identity token", creds.Credentials{}, &classErr{"invalid_token", true, leak}, "InvalidIdentityToken"},
		{"expired identity token", creds.Credentials{}, &classErr{"expired_token", true, leak}, "InvalidIdentityToken"},
		{"identity", creds.Credentials{}, &classErr{"identity", true, leak}, "InvalidIdentityToken"},
		{"throttling", creds.Credentials{}, &classErr{"throttling", false, leak}, "Throttling"},
		{"server", creds.Credentials{}, &classErr{"server", false, leak}, "ServiceUnavailable"},
		{"timeout", creds.Credentials{}, &classErr{"timeout", false, leak}, "ServiceUnavailable"},
		{"network", creds.Credentials{}, &classErr{"network", false, leak}, "ServiceUnavailable"},
		{"idp", creds.Credentials{}, &classErr{"idp", false, leak}, "ServiceUnavailable"},
		{"validation", creds.Credentials{}, &classErr{"validation", true, leak}, "InvalidConfiguration"},
		{"region disabled", creds.Credentials{}, &classErr{"region_disabled", true, leak}, "InvalidConfiguration"},
		{"unknown class", creds.Credentials{}, &classErr{"weird\nclass", false, leak}, "InternalError"},
		{"plain error", creds.Credentials{}, errors.New(leak), "InternalError"},
		{"error with credentials", testCreds(), errors.New(leak), "InternalError"},
		{"expired credentials", expired, nil, "CredentialsUnavailable"},
		{"expiry truncates into the past", sameSecond, nil, "CredentialsUnavailable"},
		{"incomplete credentials", incomplete, nil, "CredentialsUnavailable"},
		{"zero credentials", creds.Credentials{}, nil, "CredentialsUnavailable"},
	}
	paths := []string{
		"/latest/meta-data/iam/security-credentials/app",
		"/latest/meta-data/iam/security-credentials-extended/app",
		"/latest/meta-data/iam/info",
	}
	for _, tt := range tests {
		for _, p := range paths {
			t.Run(tt.name+p, func(t *testing.T) {
				e := newEnv(t, Config{})
				e.src.set(tt.creds, tt.err)
				w := e.do(http.MethodGet, p, nil)
				if w.Code != http.StatusOK {
					t.Fatalf("status %d, want 200", w.Code)
				}
				body := w.Body.String()
				var doc map[string]string
				if err := json.Unmarshal([]byte(body), &doc); err != nil {
					t.Fatalf("not JSON: %v\n%s", err, body)
				}
				if doc["Code"] != tt.code {
					t.Errorf("Code %q, want %q", doc["Code"], tt.code)
				}
				if doc["LastUpdated"] != "2026-03-01T12:00:00Z" || doc["Message"] == "" || len(doc) != 3 {
					t.Errorf("document %v", doc)
				}
				for _, bad := range []string{"SECRET", "arn:", "eyJ", testSecret, testToken, "AccessKeyId", "Expiration"} {
					if strings.Contains(body, bad) {
						t.Errorf("error document contains %q:\n%s", bad, body)
					}
				}
			})
		}
	}
}

func TestErrorDocumentGolden(t *testing.T) {
	e := newEnv(t, Config{})
	e.src.set(creds.Credentials{}, &classErr{"access_denied", true, "denied"})
	golden(t, "error_access_denied.golden", e.do(http.MethodGet, "/latest/meta-data/iam/security-credentials/app", nil).Body.Bytes())
}

func TestUnknownRole(t *testing.T) {
	for _, p := range []string{
		"/latest/meta-data/iam/security-credentials/other",
		"/latest/meta-data/iam/security-credentials/App",
		"/latest/meta-data/iam/security-credentials-extended/other/",
		"/latest/meta-data/iam/security-credentials/app/extra",
		"/latest/meta-data/iam/nothing",
	} {
		t.Run(p, func(t *testing.T) {
			e := newEnv(t, Config{})
			if w := e.do(http.MethodGet, p, nil); w.Code != http.StatusNotFound {
				t.Errorf("status %d, want 404", w.Code)
			}
			if e.src.calls != 0 {
				t.Errorf("source called for an unknown role")
			}
		})
	}
}

func TestIAMInfo(t *testing.T) {
	govCreds := testCreds()
	govCreds.AccountID = ""
	govCreds.RoleARN = "arn:aws-us-gov:sts::333333333333:assumed-role/app/s"
	noAcct := testCreds()
	noAcct.AccountID, noAcct.RoleARN = "", ""

	tests := []struct {
		name       string
		cfgARN     string
		creds      creds.Credentials
		wantARN    string
		wantCode   string
		wantGolden string
	}{
		{"derived", "", testCreds(), "arn:aws:iam::222222222222:instance-profile/app", "Success", "iam_info.golden"},
		{"configured", "arn:aws:iam::111111111111:instance-profile/web", testCreds(), "arn:aws:iam::111111111111:instance-profile/web", "Success", ""},
		{"partition from role ARN", "", govCreds, "arn:aws-us-gov:iam::333333333333:instance-profile/app", "Success", ""},
		{"account unknown", "", noAcct, "", "InstanceProfileUnknown", ""},
		{"account unknown but configured", "arn:aws:iam::111111111111:instance-profile/web", noAcct, "arn:aws:iam::111111111111:instance-profile/web", "Success", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t, Config{InstanceProfileARN: tt.cfgARN})
			e.src.set(tt.creds, nil)
			for _, p := range []string{"/latest/meta-data/iam/info", "/latest/meta-data/iam/info/"} {
				w := e.do(http.MethodGet, p, nil)
				var doc map[string]string
				if err := json.Unmarshal(w.Body.Bytes(), &doc); err != nil || w.Code != 200 {
					t.Fatalf("%d %v\n%s", w.Code, err, w.Body)
				}
				if doc["Code"] != tt.wantCode {
					t.Fatalf("Code %q, want %q", doc["Code"], tt.wantCode)
				}
				if tt.wantCode != "Success" {
					continue
				}
				if doc["InstanceProfileArn"] != tt.wantARN {
					t.Errorf("ARN %q, want %q", doc["InstanceProfileArn"], tt.wantARN)
				}
				if !regexp.MustCompile(`^AIPA[A-Z2-7]{17}$`).MatchString(doc["InstanceProfileId"]) {
					t.Errorf("InstanceProfileId %q", doc["InstanceProfileId"])
				}
				if doc["InstanceProfileId"] != instanceProfileID(tt.wantARN) {
					t.Errorf("id not derived from the ARN")
				}
				if doc["LastUpdated"] != "2026-03-01T11:50:01Z" {
					t.Errorf("LastUpdated %q", doc["LastUpdated"])
				}
				if tt.wantGolden != "" {
					golden(t, tt.wantGolden, w.Body.Bytes())
				}
			}
		})
	}
}

func TestInstanceProfileID(t *testing.T) {
	a := instanceProfileID("arn:aws:iam::222222222222:instance-profile/app")
	if a != instanceProfileID("arn:aws:iam::222222222222:instance-profile/app") {
		t.Error("not deterministic")
	}
	if a == instanceProfileID("arn:aws:iam::222222222222:instance-profile/app2") {
		t.Error("different ARNs, same id")
	}
	if len(a) != 21 {
		t.Errorf("length %d", len(a))
	}
}

// TestDocumentsParseAsSDKsDo decodes the served document with the field types
// the Go SDK's ec2rolecreds uses.
func TestDocumentsParseAsSDKsDo(t *testing.T) {
	e := newEnv(t, Config{})
	var doc struct {
		Code            string
		LastUpdated     time.Time
		Type            string
		AccessKeyID     string `json:"AccessKeyId"`
		SecretAccessKey string
		Token           string
		Expiration      time.Time
		AccountID       string `json:"AccountId"`
	}
	w := e.do(http.MethodGet, "/latest/meta-data/iam/security-credentials-extended/app", nil)
	if err := json.Unmarshal(w.Body.Bytes(), &doc); err != nil {
		t.Fatal(err)
	}
	if !doc.Expiration.Equal(testCreds().Expires.Truncate(time.Second)) || doc.Expiration.After(testCreds().Expires) {
		t.Errorf("Expiration %v: want the real expiry truncated down", doc.Expiration)
	}
	want := testCreds()
	if doc.Code != "Success" || doc.Type != "AWS-HMAC" || doc.AccessKeyID != want.AccessKeyID ||
		doc.SecretAccessKey != want.SecretAccessKey || doc.Token != want.SessionToken || doc.AccountID != want.AccountID {
		t.Errorf("the document as an SDK reads it: code %q type %q key %q secret ok %v token ok %v account %q",
			doc.Code, doc.Type, doc.AccessKeyID, doc.SecretAccessKey == want.SecretAccessKey, doc.Token == want.SessionToken, doc.AccountID)
	}
	if !doc.LastUpdated.Equal(want.LastUpdated.Truncate(time.Second)) {
		t.Errorf("LastUpdated %v, want %v truncated to the second", doc.LastUpdated, want.LastUpdated)
	}
}

// TestCredentialDocumentFollowsRotation: the rendered document is reused only
// while the source returns the same credentials; a refresh is served at once,
// and the legacy and extended documents never mix.
func TestCredentialDocumentFollowsRotation(t *testing.T) {
	e := newEnv(t, Config{TokensRequired: true})
	tok := e.token(t, "60")
	get := func(path string) string {
		w := e.do(http.MethodGet, path, map[string]string{headerToken: tok})
		if w.Code != http.StatusOK {
			t.Fatalf("%s: %d", path, w.Code)
		}
		return w.Body.String()
	}
	legacy := "/latest/meta-data/iam/security-credentials/" + testRole
	extended := "/latest/meta-data/iam/security-credentials-extended/" + testRole
	first := get(legacy)
	if get(legacy) != first || strings.Contains(first, "AccountId") || !strings.Contains(get(extended), `"AccountId" : "222222222222"`) {
		t.Fatalf("documents of unchanged credentials differ or mix:\n%s", first)
	}

	next := testCreds()
	next.AccessKeyID, next.SecretAccessKey, next.SessionToken = "ASIANEXTKEY000000001", "nextsecret", "nexttoken"
	next.LastUpdated = next.LastUpdated.Add(30 * time.Minute)
	e.src.set(next, nil)
	for _, path := range []string{legacy, extended} {
		body := get(path)
		if !strings.Contains(body, "ASIANEXTKEY000000001") || !strings.Contains(body, "nextsecret") || strings.Contains(body, testKeyID) {
			t.Fatalf("%s after rotation still serves the old credentials:\n%s", path, body)
		}
	}

	// Credentials without LastUpdated are rendered with the current time.
	noStamp := next
	noStamp.LastUpdated = time.Time{}
	e.src.set(noStamp, nil)
	if body := get(legacy); !strings.Contains(body, imdsTime(t0)) {
		t.Fatalf("LastUpdated should be now when the source sets none:\n%s", body)
	}
}
