package exchange

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/imdsproxy/imdsproxy/creds"
)

func TestCallerIdentityVerify(t *testing.T) {
	var auth, tokenHdr, action string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_ = r.ParseForm()
		auth, tokenHdr, action = r.Header.Get("Authorization"), r.Header.Get("X-Amz-Security-Token"), r.Form.Get("Action")
		if strings.Contains(auth, "ASIADENIED") {
			w.WriteHeader(http.StatusForbidden)
			_, _ = w.Write([]byte(errorXML("Sender", "InvalidClientTokenId", "The security token included in the request is invalid.")))
			return
		}
		_, _ = w.Write([]byte(`<GetCallerIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><GetCallerIdentityResult>
<Arn>arn:aws:sts::222222222222:assumed-role/app/host</Arn><UserId>AROAEXAMPLE:host</UserId><Account>222222222222</Account>
</GetCallerIdentityResult><ResponseMetadata><RequestId>1</RequestId></ResponseMetadata></GetCallerIdentityResponse>`))
	}))
	defer srv.Close()
	isolateAWSEnv(t)
	t.Setenv("AWS_ENDPOINT_URL_STS", srv.URL)
	v, err := NewCallerIdentity(context.Background(), "us-east-1", time.Second)
	if err != nil {
		t.Fatal(err)
	}
	c := creds.Credentials{AccessKeyID: testAccessKey, SecretAccessKey: testSecretKey, SessionToken: testSessionToken, Expires: time.Now().Add(time.Hour)}
	arn, err := v.Verify(context.Background(), c)
	if err != nil || arn != "arn:aws:sts::222222222222:assumed-role/app/host" {
		t.Fatalf("Verify = %q, %v", arn, err)
	}
	if action != "GetCallerIdentity" || !strings.Contains(auth, "Credential="+testAccessKey+"/") || tokenHdr != testSessionToken {
		t.Fatalf("request not signed with the credentials: action %q auth %q token %q", action, auth, tokenHdr)
	}

	c.AccessKeyID = "ASIADENIED"
	_, err = v.Verify(context.Background(), c)
	var e *Error
	if !errors.As(err, &e) || strings.Contains(err.Error(), testSecretKey) || strings.Contains(err.Error(), testSessionToken) {
		t.Fatalf("denied: %v", err)
	}
	if _, err := v.Verify(context.Background(), creds.Credentials{}); err == nil {
		t.Fatal("incomplete credentials verified")
	}
}
