package sts

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	v4 "github.com/aws/aws-sdk-go-v2/aws/signer/v4"
	"github.com/aws/aws-sdk-go-v2/credentials"
	awssts "github.com/aws/aws-sdk-go-v2/service/sts"
	"github.com/aws/aws-sdk-go-v2/service/sts/types"
	"github.com/aws/smithy-go"

	"github.com/imdsproxy/imdsproxy/test/fakes/oidc"
)

const (
	baseKey    = "AKIAIOSFODNN7EXAMPLE"
	baseSecret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
	tmpKey     = "ASIAIOSFODNN7TEMPKEY"
	tmpSecret  = "tmpSecretAccessKeyEXAMPLEtmpSecretAccessK"
	tmpToken   = "IQoJb3JpZ2luX2VjEBASETOKENexampleexampleexample=="
)

// arClient is an SDK STS client signing with the given credentials.
func arClient(fake *Server, id, secret, token string) *awssts.Client {
	return awssts.New(awssts.Options{
		Region:       "us-east-1",
		BaseEndpoint: aws.String(fake.URL),
		Credentials:  credentials.NewStaticCredentialsProvider(id, secret, token),
		Retryer:      aws.NopRetryer{},
	})
}

func arInput() *awssts.AssumeRoleInput {
	return &awssts.AssumeRoleInput{
		RoleArn:         aws.String(roleARN),
		RoleSessionName: aws.String("i-1234567890abcdef0"),
		DurationSeconds: aws.Int32(3600),
	}
}

func apiCode(t *testing.T, err error) string {
	t.Helper()
	var api smithy.APIError
	if !errors.As(err, &api) {
		t.Fatalf("not an API error: %v", err)
	}
	return api.ErrorCode()
}

func TestAssumeRoleSigned(t *testing.T) {
	fake := Start(t, Config{RoleARN: roleARN, ExternalID: "ext-123"})
	fake.AllowBase(baseKey, baseSecret)
	in := arInput()
	in.ExternalId = aws.String("ext-123")
	in.SourceIdentity = aws.String("host-1")
	in.Tags = []types.Tag{{Key: aws.String("env"), Value: aws.String("prod")}, {Key: aws.String("team"), Value: aws.String("payments")}}
	out, err := arClient(fake, baseKey, baseSecret, "").AssumeRole(context.Background(), in)
	if err != nil {
		t.Fatal(err)
	}
	is, ok := fake.Last()
	if !ok {
		t.Fatal("nothing issued")
	}
	if aws.ToString(out.Credentials.AccessKeyId) != is.AccessKeyID || aws.ToString(out.Credentials.SecretAccessKey) != is.SecretAccessKey ||
		aws.ToString(out.Credentials.SessionToken) != is.SessionToken || !aws.ToTime(out.Credentials.Expiration).Equal(is.Expiration) {
		t.Fatalf("response credentials differ from the issued ones")
	}
	if aws.ToString(out.AssumedRoleUser.Arn) != "arn:aws:sts::222222222222:assumed-role/app/i-1234567890abcdef0" ||
		!strings.HasPrefix(aws.ToString(out.AssumedRoleUser.AssumedRoleId), "AROA") {
		t.Fatalf("AssumedRoleUser = %+v", out.AssumedRoleUser)
	}
	if aws.ToString(out.SourceIdentity) != "host-1" || out.PackedPolicySize == nil || *out.PackedPolicySize <= 0 {
		t.Fatalf("SourceIdentity %q PackedPolicySize %v", aws.ToString(out.SourceIdentity), out.PackedPolicySize)
	}
	if is.Action != ActionAssumeRole || is.BaseAccessKeyID != baseKey || is.ExternalID != "ext-123" || is.SourceIdentity != "host-1" ||
		is.Tags["env"] != "prod" || is.Tags["team"] != "payments" || len(is.Tags) != 2 || is.DurationSeconds != 3600 {
		t.Fatalf("issued %+v", is)
	}
	c := fake.CallLog()[0]
	if c.Action != ActionAssumeRole || c.AccessKeyID != baseKey || !c.SignatureValid || c.Status != 200 ||
		c.ExternalID != "ext-123" || c.SourceIdentity != "host-1" || len(c.Tags) != 2 || c.Tags["team"] != "payments" {
		t.Fatalf("call %+v", c)
	}
}

func TestAssumeRoleAuthentication(t *testing.T) {
	fake := Start(t, Config{RoleARN: roleARN})
	fake.AllowBase(baseKey, baseSecret)
	fake.AllowBaseSession(tmpKey, tmpSecret, tmpToken)
	ctx := context.Background()
	tests := []struct {
		name              string
		id, secret, token string
		want              string // "" for success
	}{
		{"long-term key", baseKey, baseSecret, "", ""},
		{"session", tmpKey, tmpSecret, tmpToken, ""},
		{"wrong secret", baseKey, "nope" + baseSecret, "", "SignatureDoesNotMatch"},
		{"unknown key", "AKIAUNKNOWNKEY000000", baseSecret, "", "InvalidClientTokenId"},
		{"session token missing", tmpKey, tmpSecret, "", "InvalidClientTokenId"},
		{"session token wrong", tmpKey, tmpSecret, tmpToken + "x", "InvalidClientTokenId"},
		{"token on a long-term key", baseKey, baseSecret, tmpToken, "InvalidClientTokenId"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := arClient(fake, tc.id, tc.secret, tc.token).AssumeRole(ctx, arInput())
			if tc.want == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if err == nil {
				t.Fatalf("accepted, want %s", tc.want)
			}
			if got := apiCode(t, err); got != tc.want {
				t.Fatalf("code %s, want %s (%v)", got, tc.want, err)
			}
		})
	}
	for _, c := range fake.CallLog() {
		if c.SignatureValid != (c.Status == 200) {
			t.Errorf("call %+v: SignatureValid inconsistent", c)
		}
	}
}

// signedRequest builds a raw AssumeRole POST signed with the base key.
func signedRequest(t *testing.T, base string, form url.Values, at time.Time) *http.Request {
	t.Helper()
	body := form.Encode()
	req, err := http.NewRequest(http.MethodPost, base+"/", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	sum := sha256.Sum256([]byte(body))
	err = v4.NewSigner().SignHTTP(context.Background(), aws.Credentials{AccessKeyID: baseKey, SecretAccessKey: baseSecret},
		req, hex.EncodeToString(sum[:]), "sts", "us-east-1", at)
	if err != nil {
		t.Fatal(err)
	}
	return req
}

func arForm() url.Values {
	return url.Values{"Action": {"AssumeRole"}, "Version": {"2011-06-15"}, "RoleArn": {roleARN},
		"RoleSessionName": {"host-1"}}
}

func do(t *testing.T, req *http.Request) (int, string) {
	t.Helper()
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func TestAssumeRoleRawSignature(t *testing.T) {
	fake := Start(t, Config{RoleARN: roleARN})
	fake.AllowBase(baseKey, baseSecret)
	now := time.Now()

	st, body := do(t, signedRequest(t, fake.URL, arForm(), now))
	if st != 200 {
		t.Fatalf("raw signed request: %d %s", st, body)
	}
	var doc assumeRoleSuccessXML
	if err := xml.Unmarshal([]byte(body), &doc); err != nil || doc.Xmlns != xmlns || doc.Result.Credentials.AccessKeyID == "" ||
		doc.ResponseMetadata.RequestID == "" || doc.Result.PackedPolicySize != nil || doc.Result.SourceIdentity != "" {
		t.Fatalf("success document %v: %s", err, body)
	}

	tests := []struct {
		name   string
		mutate func(*http.Request)
		status int
		code   string
	}{
		{"body changed after signing", func(r *http.Request) {
			f := arForm()
			f.Set("RoleSessionName", "host-2")
			b := f.Encode()
			r.Body, r.ContentLength = io.NopCloser(strings.NewReader(b)), int64(len(b))
		}, 403, "SignatureDoesNotMatch"},
		{"signed header changed", func(r *http.Request) {
			r.Header.Set("X-Amz-Date", now.Add(time.Second).UTC().Format(amzDateFormat))
		}, 403, "SignatureDoesNotMatch"},
		{"no authorization", func(r *http.Request) { r.Header.Del("Authorization") }, 403, "MissingAuthenticationToken"},
		{"other algorithm", func(r *http.Request) {
			r.Header.Set("Authorization", strings.Replace(r.Header.Get("Authorization"), "AWS4-HMAC-SHA256", "AWS4-ECDSA-P256-SHA256", 1))
		}, 400, "IncompleteSignature"},
		{"wrong service", func(r *http.Request) {
			r.Header.Set("Authorization", strings.Replace(r.Header.Get("Authorization"), "/sts/", "/iam/", 1))
		}, 403, "SignatureDoesNotMatch"},
		{"no date", func(r *http.Request) { r.Header.Del("X-Amz-Date") }, 400, "IncompleteSignature"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			req := signedRequest(t, fake.URL, arForm(), now)
			tc.mutate(req)
			st, body := do(t, req)
			if st != tc.status || errCode(t, body) != tc.code {
				t.Fatalf("got %d %s, want %d %s", st, body, tc.status, tc.code)
			}
		})
	}
	t.Run("old signature", func(t *testing.T) {
		st, body := do(t, signedRequest(t, fake.URL, arForm(), now.Add(-20*time.Minute)))
		if st != 403 || errCode(t, body) != "SignatureDoesNotMatch" || !strings.Contains(body, "Signature expired") {
			t.Fatalf("got %d %s", st, body)
		}
	})
}

func TestAssumeRoleValidation(t *testing.T) {
	fake := Start(t, Config{RoleARN: roleARN, MaxSessionDuration: 2 * time.Hour})
	fake.AllowBase(baseKey, baseSecret)
	fake.AllowBaseSession(tmpKey, tmpSecret, tmpToken)
	mod := func(k, v string) url.Values {
		f := arForm()
		if v == "" {
			f.Del(k)
		} else {
			f.Set(k, v)
		}
		return f
	}
	tooMany := arForm()
	for i := 1; i <= 51; i++ {
		tooMany.Set(fmt.Sprintf("Tags.member.%d.Key", i), "k"+strconv.Itoa(i))
		tooMany.Set(fmt.Sprintf("Tags.member.%d.Value", i), "v")
	}
	dup := arForm()
	dup.Set("Tags.member.1.Key", "Team")
	dup.Set("Tags.member.1.Value", "a")
	dup.Set("Tags.member.2.Key", "team")
	dup.Set("Tags.member.2.Value", "b")
	longValue := arForm()
	longValue.Set("Tags.member.1.Key", "k")
	longValue.Set("Tags.member.1.Value", strings.Repeat("v", 257))
	reserved := arForm()
	reserved.Set("Tags.member.1.Key", "aws:foo")
	reserved.Set("Tags.member.1.Value", "v")
	noValue := arForm()
	noValue.Set("Tags.member.1.Key", "k")

	tests := []struct {
		name string
		form url.Values
		code string
	}{
		{"no role", mod("RoleArn", ""), "ValidationError"},
		{"bad role", mod("RoleArn", "arn:aws:iam::1:role/x"), "ValidationError"},
		{"other role", mod("RoleArn", "arn:aws:iam::222222222222:role/other"), "AccessDenied"},
		{"no session name", mod("RoleSessionName", ""), "ValidationError"},
		{"bad session name", mod("RoleSessionName", "a b"), "ValidationError"},
		{"short duration", mod("DurationSeconds", "899"), "ValidationError"},
		{"above role maximum", mod("DurationSeconds", "7201"), "ValidationError"},
		{"bad external id", mod("ExternalId", "x"), "ValidationError"},
		{"bad source identity", mod("SourceIdentity", "a b"), "ValidationError"},
		{"51 tags", tooMany, "ValidationError"},
		{"duplicate tag keys", dup, "InvalidParameterValue"},
		{"long tag value", longValue, "ValidationError"},
		{"reserved tag key", reserved, "InvalidParameterValue"},
		{"tag without value", noValue, "ValidationError"},
		{"bad version", mod("Version", "2010-01-01"), "InvalidAction"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			st, body := do(t, signedRequest(t, fake.URL, tc.form, time.Now()))
			if code := errCode(t, body); code != tc.code || st == 200 {
				t.Fatalf("got %d %s, want %s", st, body, tc.code)
			}
		})
	}
	t.Run("role chaining is limited to one hour", func(t *testing.T) {
		in := arInput()
		in.DurationSeconds = aws.Int32(3601)
		_, err := arClient(fake, tmpKey, tmpSecret, tmpToken).AssumeRole(context.Background(), in)
		if err == nil || apiCode(t, err) != "ValidationError" || !strings.Contains(err.Error(), "role chaining") {
			t.Fatalf("got %v", err)
		}
		in.DurationSeconds = aws.Int32(3601) // a long-term key may ask for more
		if _, err := arClient(fake, baseKey, baseSecret, "").AssumeRole(context.Background(), in); err != nil {
			t.Fatal(err)
		}
	})
	if n := len(fake.Issued()); n != 1 {
		t.Fatalf("%d issued, want 1", n)
	}
}

func TestAssumeRoleExternalID(t *testing.T) {
	fake := Start(t, Config{RoleARN: roleARN})
	fake.AllowBase(baseKey, baseSecret)
	fake.RequireExternalID("ext-123")
	client := arClient(fake, baseKey, baseSecret, "")
	for _, ext := range []string{"", "ext-124"} {
		in := arInput()
		if ext != "" {
			in.ExternalId = aws.String(ext)
		}
		_, err := client.AssumeRole(context.Background(), in)
		if err == nil || apiCode(t, err) != "AccessDenied" {
			t.Fatalf("external id %q: %v, want AccessDenied", ext, err)
		}
	}
	in := arInput()
	in.ExternalId = aws.String("ext-123")
	if _, err := client.AssumeRole(context.Background(), in); err != nil {
		t.Fatal(err)
	}
	fake.RequireExternalID("")
	if _, err := client.AssumeRole(context.Background(), arInput()); err != nil {
		t.Fatal(err)
	}
}

func TestAssumeRoleModes(t *testing.T) {
	fake := Start(t, Config{RoleARN: roleARN})
	fake.AllowBase(baseKey, baseSecret)
	client := arClient(fake, baseKey, baseSecret, "")
	for _, tc := range []struct {
		mode Mode
		code string
	}{
		{ModeFail5xx, "InternalFailure"},
		{ModeUnavailable, "ServiceUnavailable"},
		{ModeThrottle, "Throttling"},
		{ModeAccessDenied, "AccessDenied"},
		{ModeExpiredToken, "ExpiredToken"},
	} {
		fake.SetMode(tc.mode)
		_, err := client.AssumeRole(context.Background(), arInput())
		if err == nil || apiCode(t, err) != tc.code {
			t.Fatalf("mode %s: %v, want %s", tc.mode, err, tc.code)
		}
	}
	// Authentication comes first: a bad signature is refused in any mode.
	_, err := arClient(fake, baseKey, "wrong", "").AssumeRole(context.Background(), arInput())
	if err == nil || apiCode(t, err) != "SignatureDoesNotMatch" {
		t.Fatalf("bad signature in throttle mode: %v", err)
	}
	fake.SetMode(ModeOK)
	if _, err := client.AssumeRole(context.Background(), arInput()); err != nil {
		t.Fatal(err)
	}
}

// Credentials issued by AssumeRoleWithWebIdentity can sign AssumeRole (role
// chaining).
func TestAssumeRoleChainingFromIssued(t *testing.T) {
	iss := oidc.Start(t)
	fake := Start(t, Config{Issuer: iss, RoleARN: roleARN})
	out, err := awssts.New(awssts.Options{Region: "us-east-1", BaseEndpoint: aws.String(fake.URL)}).AssumeRoleWithWebIdentity(context.Background(),
		&awssts.AssumeRoleWithWebIdentityInput{RoleArn: aws.String(roleARN), RoleSessionName: aws.String("host-1"),
			WebIdentityToken: aws.String(iss.Mint(oidc.Claims{Subject: "host-1"})), DurationSeconds: aws.Int32(900)})
	if err != nil {
		t.Fatal(err)
	}
	c := out.Credentials
	client := arClient(fake, *c.AccessKeyId, *c.SecretAccessKey, *c.SessionToken)
	if _, err := client.AssumeRole(context.Background(), arInput()); err != nil {
		t.Fatal(err)
	}
	if is, _ := fake.Last(); is.BaseAccessKeyID != *c.AccessKeyId {
		t.Fatalf("base %q", is.BaseAccessKeyID)
	}
}
