package credproc

import (
	"bytes"
	"encoding/json"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/credentials/processcreds"
)

// FuzzParseResponse: whatever the socket answers, the client either fails
// with one line, or prints exactly one line that the AWS SDK for Go's
// credential_process provider parses back to the same credentials, with
// the checks it applies (Version 1, an access key id and a secret, an
// expiry in the future).
func FuzzParseResponse(f *testing.F) {
	now := time.Date(2026, 12, 7, 12, 0, 0, 0, time.UTC)
	good := Document{Version: 1, AccessKeyID: "ASIAEXAMPLE000000000", SecretAccessKey: "s/e+c", SessionToken: "t==", Expiration: "2026-12-07T13:00:00Z", AccountID: "222222222222"}
	for _, r := range []Response{
		{Version: 1, Credentials: &good},
		{Version: 1, Error: &Error{Code: "retry", Message: "again"}},
		{Version: 1, Credentials: &Document{Version: 1, AccessKeyID: "AKIA0000000000000000", SecretAccessKey: "x", SessionToken: "y", Expiration: "2027-01-01T00:00:00Z"}},
	} {
		b, _ := json.Marshal(r)
		f.Add(append(b, '\n'))
	}
	f.Add([]byte(`{"version":1,"credentials":{"Version":1,"AccessKeyId":"ASIA0000000000000000","SecretAccessKey":"\u0041","SessionToken":"t","Expiration":"2026-12-07T13:00:00Z"}}` + "\n"))
	f.Add([]byte("{}\n"))
	f.Add([]byte("not json\n"))
	f.Fuzz(func(t *testing.T, raw []byte) {
		d, _, err := ParseResponse(raw, now)
		if err != nil {
			if bytes.ContainsAny([]byte(err.Error()), "\r\n") {
				t.Fatalf("a multi-line error: %q", err)
			}
			return
		}
		out := d.Marshal()
		if bytes.Count(out, []byte("\n")) != 1 || out[len(out)-1] != '\n' {
			t.Fatalf("output is not one line: %q", out)
		}
		var sdk processcreds.CredentialProcessResponse
		if err := json.Unmarshal(out, &sdk); err != nil {
			t.Fatalf("the SDK cannot parse %q: %v", out, err)
		}
		if sdk.Version != 1 || sdk.AccessKeyID == "" || sdk.SecretAccessKey == "" {
			t.Fatalf("the SDK refuses %q", out)
		}
		if sdk.AccessKeyID != d.AccessKeyID || sdk.SecretAccessKey != d.SecretAccessKey || sdk.SessionToken != d.SessionToken || sdk.AccountID != d.AccountID {
			t.Fatalf("the SDK reads other credentials from %q", out)
		}
		if sdk.Expiration == nil || !sdk.Expiration.After(now) || sdk.Expiration.Format(TimeLayout) != d.Expiration {
			t.Fatalf("the SDK reads the expiry %v from %q", sdk.Expiration, out)
		}
		var generic map[string]any
		if err := json.Unmarshal(out, &generic); err != nil || generic["Version"] != float64(1) {
			t.Fatalf("a JavaScript-like parse of %q: %v %v", out, generic, err)
		}
	})
}
