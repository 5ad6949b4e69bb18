package sts

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"encoding/xml"
	"errors"
	"io"
	"net/http"
	"net/url"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	awssts "github.com/aws/aws-sdk-go-v2/service/sts"
	"github.com/aws/smithy-go"

	"github.com/imdsproxy/imdsproxy/test/fakes/oidc"
)

const roleARN = "arn:aws:iam::222222222222:role/app"

// post sends one raw AssumeRoleWithWebIdentity request.
func post(t *testing.T, base string, form url.Values) (int, string) {
	t.Helper()
	resp, err := http.PostForm(base+"/", form)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func form(tok string) url.Values {
	return url.Values{
		"Action": {"AssumeRoleWithWebIdentity"}, "Version": {"2011-06-15"},
		"RoleArn": {roleARN}, "RoleSessionName": {"i-1234567890abcdef0"},
		"WebIdentityToken": {tok}, "DurationSeconds": {"3600"},
	}
}

func errCode(t *testing.T, body string) string {
	t.Helper()
	var e errorXML
	if err := xml.Unmarshal([]byte(body), &e); err != nil {
		t.Fatalf("not an STS error document: %v\n%s", err, body)
	}
	if e.Xmlns != xmlns || e.RequestID == "" || e.Error.Message == "" || (e.Error.Type != "Sender" && e.Error.Type != "Receiver") {
		t.Fatalf("malformed error document: %s", body)
	}
	return e.Error.Code
}

func TestTokenVerification(t *testing.T) {
	iss := oidc.Start(t)
	other, err := oidc.New(oidc.Options{URL: iss.URL(), KeyID: iss.KeyID()}) // same kid and iss, different key
	if err != nil {
		t.Fatal(err)
	}
	fake := Start(t, Config{Issuer: iss})
	good := iss.Mint(oidc.Claims{Subject: "host-1"})
	p := strings.Split(good, ".")

	tampered := func() string {
		pb, _ := base64.RawURLEncoding.DecodeString(p[1])
		var c map[string]any
		_ = json.Unmarshal(pb, &c)
		c["sub"] = "someone-else"
		nb, _ := json.Marshal(c)
		return p[0] + "." + base64.RawURLEncoding.EncodeToString(nb) + "." + p[2]
	}()
	algNone := base64.RawURLEncoding.EncodeToString([]byte(`{"alg":"none","typ":"JWT","kid":"`+iss.KeyID()+`"}`)) + "." + p[1] + "."
	algHS := iss.Sign(map[string]any{"alg": "HS256", "kid": iss.KeyID()}, map[string]any{"iss": iss.URL(), "sub": "h", "aud": "sts.amazonaws.com", "exp": time.Now().Add(time.Hour).Unix()})
	wrongKid := iss.Sign(map[string]any{"alg": "RS256", "kid": "nope"}, map[string]any{"iss": iss.URL(), "sub": "h", "aud": "sts.amazonaws.com", "exp": time.Now().Add(time.Hour).Unix()})
	floatExp := iss.Sign(map[string]any{"alg": "RS256", "kid": iss.KeyID()}, map[string]any{"iss": iss.URL(), "sub": "h", "aud": "sts.amazonaws.com", "exp": float64(time.Now().Add(time.Hour).Unix()) + 0.5})

	tests := []struct {
		name   string
		tok    string
		status int
		code   string
	}{
		{"valid", good, 200, ""},
		{"valid aud list", iss.Mint(oidc.Claims{Audience: []string{"x", "sts.amazonaws.com"}}), 200, ""},
		{"wrong signature", other.Mint(oidc.Claims{}), 400, "InvalidIdentityToken"},
		{"wrong aud", iss.Mint(oidc.Claims{Audience: []string{"something-else"}}), 400, "InvalidIdentityToken"},
		{"wrong iss", iss.Mint(oidc.Claims{Issuer: "https://evil.example"}), 400, "InvalidIdentityToken"},
		{"expired", iss.MintExpired("host-1"), 400, "ExpiredTokenException"},
		{"alg none", algNone, 400, "InvalidIdentityToken"},
		{"alg HS256", algHS, 400, "InvalidIdentityToken"},
		{"unknown kid", wrongKid, 400, "InvalidIdentityToken"},
		{"tampered payload", tampered, 400, "InvalidIdentityToken"},
		{"not a jwt", "abcdefgh", 400, "InvalidIdentityToken"},
		{"fractional exp", floatExp, 400, "InvalidIdentityToken"},
		{"not yet valid", iss.Mint(oidc.Claims{IssuedAt: time.Now().Add(time.Hour)}), 400, "InvalidIdentityToken"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			st, body := post(t, fake.URL, form(tt.tok))
			if st != tt.status {
				t.Fatalf("status %d, want %d: %s", st, tt.status, body)
			}
			if tt.code != "" {
				if c := errCode(t, body); c != tt.code {
					t.Fatalf("code %s, want %s", c, tt.code)
				}
				if strings.Contains(body, tt.tok) {
					t.Fatal("error echoes the token")
				}
			}
		})
	}
}

func TestRequestValidation(t *testing.T) {
	iss := oidc.Start(t)
	fake := Start(t, Config{Issuer: iss})
	tok := iss.Mint(oidc.Claims{})
	mod := func(k, v string) url.Values {
		f := form(tok)
		if v == "" {
			f.Del(k)
		} else {
			f.Set(k, v)
		}
		return f
	}
	tests := []struct {
		name string
		f    url.Values
		code string
	}{
		{"bad role arn", mod("RoleArn", "arn:aws:iam::12:role/app"), "ValidationError"},
		{"user arn", mod("RoleArn", "arn:aws:iam::222222222222:user/app"), "ValidationError"},
		{"missing role", mod("RoleArn", ""), "ValidationError"},
		{"session name space", mod("RoleSessionName", "a b"), "ValidationError"},
		{"session name short", mod("RoleSessionName", "a"), "ValidationError"},
		{"session name long", mod("RoleSessionName", strings.Repeat("a", 65)), "ValidationError"},
		{"duration low", mod("DurationSeconds", "899"), "ValidationError"},
		{"duration high", mod("DurationSeconds", "43201"), "ValidationError"},
		{"missing token", mod("WebIdentityToken", ""), "ValidationError"},
		{"bad version", mod("Version", "2010-01-01"), "InvalidAction"},
		{"other action", mod("Action", "GetSessionToken"), "InvalidAction"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			st, body := post(t, fake.URL, tt.f)
			if st != 400 || errCode(t, body) != tt.code {
				t.Fatalf("got %d %s, want 400 %s", st, body, tt.code)
			}
		})
	}
	if len(fake.Issued()) != 0 {
		t.Fatal("credentials issued for an invalid request")
	}
	// Session length override accepts short durations and sets the expiry.
	fake.SetSessionLength(20 * time.Second)
	if st, body := post(t, fake.URL, mod("DurationSeconds", "60")); st != 200 {
		t.Fatalf("with session override: %d %s", st, body)
	}
	last, _ := fake.Last()
	if d := time.Until(last.Expiration); d < 18*time.Second || d > 21*time.Second {
		t.Fatalf("expiry in %v, want about 20s", d)
	}
}

func TestSuccessDocument(t *testing.T) {
	iss := oidc.Start(t)
	fake := Start(t, Config{Issuer: iss})
	st, body := post(t, fake.URL, form(iss.Mint(oidc.Claims{Subject: "host-9"})))
	if st != 200 {
		t.Fatalf("%d %s", st, body)
	}
	var doc successXML
	if err := xml.Unmarshal([]byte(body), &doc); err != nil {
		t.Fatal(err)
	}
	last, ok := fake.Last()
	if !ok {
		t.Fatal("nothing recorded")
	}
	c := doc.Result.Credentials
	if c.AccessKeyID != last.AccessKeyID || c.SecretAccessKey != last.SecretAccessKey || c.SessionToken != last.SessionToken {
		t.Fatal("document differs from the record")
	}
	checks := map[string]bool{
		"xmlns":        doc.Xmlns == xmlns,
		"access key":   regexp.MustCompile(`^ASIA[A-Z0-9]{16}$`).MatchString(c.AccessKeyID),
		"secret":       len(c.SecretAccessKey) == 40,
		"token":        len(c.SessionToken) > 500,
		"expiration":   regexp.MustCompile(`^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$`).MatchString(c.Expiration),
		"subject":      doc.Result.SubjectFromWebIdentityToken == "host-9",
		"arn":          doc.Result.AssumedRoleUser.Arn == "arn:aws:sts::222222222222:assumed-role/app/i-1234567890abcdef0",
		"role id":      regexp.MustCompile(`^AROA[A-Z0-9]+:i-1234567890abcdef0$`).MatchString(doc.Result.AssumedRoleUser.AssumedRoleID),
		"provider":     doc.Result.Provider != "" && !strings.Contains(doc.Result.Provider, "://"),
		"audience":     doc.Result.Audience == "sts.amazonaws.com",
		"request id":   doc.ResponseMetadata.RequestID != "",
		"one call":     fake.Calls() == 1,
		"jwt recorded": last.WebIdentityToken != "",
	}
	for k, ok := range checks {
		if !ok {
			t.Errorf("%s wrong in\n%s", k, body)
		}
	}
	// Every credential is unique.
	seen := map[string]bool{}
	for range 20 {
		post(t, fake.URL, form(iss.Mint(oidc.Claims{})))
	}
	for _, is := range fake.Issued() {
		for _, s := range []string{is.AccessKeyID, is.SecretAccessKey, is.SessionToken} {
			if seen[s] {
				t.Fatalf("duplicate value issued")
			}
			seen[s] = true
		}
	}
}

func TestModes(t *testing.T) {
	iss := oidc.Start(t)
	fake := Start(t, Config{Issuer: iss})
	tok := iss.Mint(oidc.Claims{})
	tests := []struct {
		mode   Mode
		status int
		code   string
	}{
		{ModeFail5xx, 500, "InternalFailure"},
		{ModeUnavailable, 503, "ServiceUnavailable"},
		{ModeThrottle, 400, "Throttling"},
		{ModeIDPError, 400, "IDPCommunicationError"},
		{ModeInvalidToken, 400, "InvalidIdentityToken"},
		{ModeExpiredToken, 400, "ExpiredTokenException"},
		{ModeAccessDenied, 403, "AccessDenied"},
	}
	for _, tt := range tests {
		t.Run(tt.mode.String(), func(t *testing.T) {
			fake.SetMode(tt.mode)
			st, body := post(t, fake.URL, form(tok))
			if st != tt.status || errCode(t, body) != tt.code {
				t.Fatalf("got %d %s", st, body)
			}
		})
	}
	if got, want := fake.Calls(), len(tests); got != want {
		t.Fatalf("Calls() = %d, want %d", got, want)
	}
	if len(fake.Issued()) != 0 {
		t.Fatal("issued while failing")
	}
	if m, err := ParseMode("fail5xx"); err != nil || m != ModeFail5xx {
		t.Fatalf("ParseMode: %v %v", m, err)
	}

	// Hang blocks until the client gives up.
	fake.SetMode(ModeHang)
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, fake.URL+"/", strings.NewReader(form(tok).Encode()))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	start := time.Now()
	if _, err := http.DefaultClient.Do(req); err == nil {
		t.Fatal("hang mode answered")
	}
	if time.Since(start) < 150*time.Millisecond {
		t.Fatal("hang mode did not block")
	}

	// Delay, then Reset.
	fake.Reset()
	fake.SetDelay(150 * time.Millisecond)
	start = time.Now()
	if st, body := post(t, fake.URL, form(tok)); st != 200 {
		t.Fatalf("%d %s", st, body)
	}
	if time.Since(start) < 150*time.Millisecond {
		t.Fatal("delay not applied")
	}
	if fake.Calls() != 1 || len(fake.CallLog()) != 1 || fake.CallLog()[0].Status != 200 {
		t.Fatalf("after Reset: calls %d log %+v", fake.Calls(), fake.CallLog())
	}
}

func TestHangReleasedByClose(t *testing.T) {
	iss := oidc.Start(t)
	fake := Start(t, Config{Issuer: iss})
	fake.SetMode(ModeHang)
	done := make(chan struct{})
	go func() {
		defer close(done)
		resp, err := http.PostForm(fake.URL+"/", form(iss.Mint(oidc.Claims{})))
		if err == nil {
			resp.Body.Close()
		}
	}()
	for fake.InFlight() == 0 {
		time.Sleep(5 * time.Millisecond)
	}
	fake.Close()
	select {
	case <-done:
	case <-time.After(2 * time.Second):
		t.Fatal("Close did not release the hanging request")
	}
}

func TestJWKSFromURL(t *testing.T) {
	iss := oidc.Start(t)
	fake := Start(t, Config{IssuerURL: iss.URL()}) // discovery + jwks over HTTP
	if st, body := post(t, fake.URL, form(iss.Mint(oidc.Claims{}))); st != 200 {
		t.Fatalf("%d %s", st, body)
	}
	// An unreachable issuer is IDPCommunicationError.
	dead := Start(t, Config{IssuerURL: "http://127.0.0.1:1"})
	other, _ := oidc.New(oidc.Options{URL: "http://127.0.0.1:1"})
	st, body := post(t, dead.URL, form(other.Mint(oidc.Claims{})))
	if st != 400 || errCode(t, body) != "IDPCommunicationError" {
		t.Fatalf("%d %s", st, body)
	}
}

func TestConcurrentCalls(t *testing.T) {
	iss := oidc.Start(t)
	fake := Start(t, Config{Issuer: iss})
	tok := iss.Mint(oidc.Claims{})
	var wg sync.WaitGroup
	for i := range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if i%5 == 0 {
				fake.SetDelay(time.Millisecond)
			}
			resp, err := http.PostForm(fake.URL+"/", form(tok))
			if err == nil {
				resp.Body.Close()
			}
		}()
	}
	wg.Wait()
	if fake.Calls() != 20 || len(fake.Issued()) != 20 {
		t.Fatalf("calls %d issued %d", fake.Calls(), len(fake.Issued()))
	}
}

// TestSDKClient points the real aws-sdk-go-v2 STS client at the fake.
func TestSDKClient(t *testing.T) {
	iss := oidc.Start(t)
	fake := Start(t, Config{Issuer: iss})
	client := awssts.New(awssts.Options{
		BaseEndpoint:     aws.String(fake.URL),
		Region:           "us-east-1",
		Credentials:      aws.AnonymousCredentials{},
		RetryMaxAttempts: 1,
	})
	ctx := context.Background()
	in := &awssts.AssumeRoleWithWebIdentityInput{
		RoleArn:          aws.String(roleARN),
		RoleSessionName:  aws.String("host-1"),
		WebIdentityToken: aws.String(iss.Mint(oidc.Claims{Subject: "host-1"})),
		DurationSeconds:  aws.Int32(3600),
	}
	out, err := client.AssumeRoleWithWebIdentity(ctx, in)
	if err != nil {
		t.Fatal(err)
	}
	last, _ := fake.Last()
	if aws.ToString(out.Credentials.AccessKeyId) != last.AccessKeyID ||
		aws.ToString(out.Credentials.SecretAccessKey) != last.SecretAccessKey ||
		aws.ToString(out.Credentials.SessionToken) != last.SessionToken ||
		!out.Credentials.Expiration.Equal(last.Expiration) {
		t.Fatal("SDK parsed different credentials from the ones issued")
	}
	if aws.ToString(out.AssumedRoleUser.Arn) != "arn:aws:sts::222222222222:assumed-role/app/host-1" ||
		aws.ToString(out.SubjectFromWebIdentityToken) != "host-1" || aws.ToString(out.Audience) != "sts.amazonaws.com" {
		t.Fatalf("unexpected output %+v", out)
	}
	if c := fake.CallLog()[0]; c.DurationSeconds != 3600 || c.RoleSessionName != "host-1" || c.RoleARN != roleARN {
		t.Fatalf("call log %+v", c)
	}

	for _, tt := range []struct {
		mode Mode
		code string
	}{
		{ModeInvalidToken, "InvalidIdentityToken"},
		{ModeExpiredToken, "ExpiredTokenException"},
		{ModeIDPError, "IDPCommunicationError"},
		{ModeAccessDenied, "AccessDenied"},
		{ModeThrottle, "Throttling"},
		{ModeFail5xx, "InternalFailure"},
		{ModeUnavailable, "ServiceUnavailable"},
	} {
		t.Run(tt.code, func(t *testing.T) {
			fake.SetMode(tt.mode)
			_, err := client.AssumeRoleWithWebIdentity(ctx, in)
			var apiErr smithy.APIError
			if !errors.As(err, &apiErr) || apiErr.ErrorCode() != tt.code {
				t.Fatalf("err = %v, want API error %s", err, tt.code)
			}
		})
	}
}
