package sts

import (
	"context"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	awssts "github.com/aws/aws-sdk-go-v2/service/sts"

	"github.com/imdsproxy/imdsproxy/test/fakes/oidc"
)

// issueWebIdentity has the fake issue credentials through the SDK.
func issueWebIdentity(t *testing.T, fake *Server, iss *oidc.Issuer) Issued {
	t.Helper()
	out, err := awssts.New(awssts.Options{Region: "us-east-1", BaseEndpoint: aws.String(fake.URL)}).AssumeRoleWithWebIdentity(context.Background(),
		&awssts.AssumeRoleWithWebIdentityInput{RoleArn: aws.String(roleARN), RoleSessionName: aws.String("i-0aaaabbbbccccdddd"),
			WebIdentityToken: aws.String(iss.Mint(oidc.Claims{Subject: "host-1"})), DurationSeconds: aws.Int32(900)})
	if err != nil {
		t.Fatal(err)
	}
	is, ok := fake.Find(aws.ToString(out.Credentials.AccessKeyId))
	if !ok {
		t.Fatal("issued credentials not recorded")
	}
	return is
}

func TestGetCallerIdentity(t *testing.T) {
	iss := oidc.Start(t)
	var skew atomic.Int64 // the fake's clock runs this far ahead
	fake := Start(t, Config{Issuer: iss, RoleARN: roleARN, Now: func() time.Time {
		return time.Now().Add(time.Duration(skew.Load()))
	}})
	fake.AllowBase(baseKey, baseSecret)
	is := issueWebIdentity(t, fake, iss)
	ctx := context.Background()

	out, err := arClient(fake, is.AccessKeyID, is.SecretAccessKey, is.SessionToken).GetCallerIdentity(ctx, &awssts.GetCallerIdentityInput{})
	if err != nil {
		t.Fatalf("GetCallerIdentity: %v", err)
	}
	if aws.ToString(out.Arn) != "arn:aws:sts::222222222222:assumed-role/app/i-0aaaabbbbccccdddd" ||
		aws.ToString(out.Arn) != is.AssumedRoleARN || aws.ToString(out.UserId) != is.AssumedRoleID ||
		aws.ToString(out.Account) != "222222222222" {
		t.Fatalf("GetCallerIdentity = arn %q user %q account %q", aws.ToString(out.Arn), aws.ToString(out.UserId), aws.ToString(out.Account))
	}
	last := fake.CallLog()[fake.Calls()-1]
	if last.Action != ActionGetCallerIdentity || last.AccessKeyID != is.AccessKeyID || !last.SignatureValid || last.Status != http.StatusOK {
		t.Fatalf("call %+v", last)
	}
	if n := len(fake.Issued()); n != 1 {
		t.Fatalf("GetCallerIdentity issued credentials: %d issued", n)
	}

	for _, tc := range []struct {
		name               string
		key, secret, token string
		code               string
	}{
		{"unknown key", "ASIAUNKNOWNUNKNOWN00", is.SecretAccessKey, is.SessionToken, "InvalidClientTokenId"},
		{"base key, not issued", baseKey, baseSecret, "", "InvalidClientTokenId"},
		{"wrong session token", is.AccessKeyID, is.SecretAccessKey, "IQoJwrong", "InvalidClientTokenId"},
		{"no session token", is.AccessKeyID, is.SecretAccessKey, "", "InvalidClientTokenId"},
		{"wrong secret", is.AccessKeyID, strings.Repeat("x", 40), is.SessionToken, "SignatureDoesNotMatch"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := arClient(fake, tc.key, tc.secret, tc.token).GetCallerIdentity(ctx, &awssts.GetCallerIdentityInput{})
			if got := apiCode(t, err); got != tc.code {
				t.Fatalf("code %s, want %s", got, tc.code)
			}
			last := fake.CallLog()[fake.Calls()-1]
			if last.Action != ActionGetCallerIdentity || last.SignatureValid || last.Status != http.StatusForbidden {
				t.Fatalf("call %+v", last)
			}
		})
	}

	t.Run("5xx mode", func(t *testing.T) {
		fake.SetMode(ModeFail5xx)
		defer fake.SetMode(ModeOK)
		_, err := arClient(fake, is.AccessKeyID, is.SecretAccessKey, is.SessionToken).GetCallerIdentity(ctx, &awssts.GetCallerIdentityInput{})
		if got := apiCode(t, err); got != "InternalFailure" {
			t.Fatalf("code %s, want InternalFailure", got)
		}
	})

	t.Run("expired", func(t *testing.T) {
		fake.SetSessionLength(time.Minute)
		short := issueWebIdentity(t, fake, iss)
		fake.SetSessionLength(0)
		// Past the expiry, well inside the 15-minute signature window.
		skew.Store(int64(time.Until(short.Expiration) + 2*time.Second))
		defer skew.Store(0)
		_, err := arClient(fake, short.AccessKeyID, short.SecretAccessKey, short.SessionToken).GetCallerIdentity(ctx, &awssts.GetCallerIdentityInput{})
		if got := apiCode(t, err); got != "ExpiredToken" {
			t.Fatalf("code %s, want ExpiredToken", got)
		}
	})

	if n := fake.CallCount(ActionGetCallerIdentity); n != 8 {
		t.Errorf("CallCount(GetCallerIdentity) = %d, want 8", n)
	}
	if n := fake.CallCount(ActionAssumeRoleWithWebIdentity); n != 2 {
		t.Errorf("CallCount(AssumeRoleWithWebIdentity) = %d, want 2", n)
	}
}
