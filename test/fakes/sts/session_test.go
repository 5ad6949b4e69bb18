package sts

import (
	"context"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	awssts "github.com/aws/aws-sdk-go-v2/service/sts"

	"github.com/imdsproxy/imdsproxy/test/fakes/oidc"
)

// TestIssueSession: credentials issued directly (an instance profile's)
// answer GetCallerIdentity with their assumed-role session, are recorded,
// and are refused once expired; bad arguments are errors.
func TestIssueSession(t *testing.T) {
	var skew atomic.Int64 // the fake's clock runs this far ahead
	fake := Start(t, Config{RoleARN: roleARN, Now: func() time.Time { return time.Now().Add(time.Duration(skew.Load())) }})
	const profile = "arn:aws:iam::111111111111:role/imdsproxy-host"
	is, err := fake.IssueSession(profile, "i-0123456789abcdef0", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if is.Action != ActionIssueSession || !strings.HasPrefix(is.AccessKeyID, "ASIA") || len(is.SecretAccessKey) != 40 ||
		is.SessionToken == "" || time.Until(is.Expiration) < 59*time.Minute || is.Expiration.Nanosecond() != 0 {
		t.Fatalf("issued %v", is)
	}
	if got, ok := fake.Find(is.AccessKeyID); !ok || got.SessionToken != is.SessionToken {
		t.Fatal("not recorded")
	}
	if fake.Calls() != 0 {
		t.Fatalf("IssueSession counted %d calls", fake.Calls())
	}
	out, err := arClient(fake, is.AccessKeyID, is.SecretAccessKey, is.SessionToken).GetCallerIdentity(context.Background(), &awssts.GetCallerIdentityInput{})
	if err != nil {
		t.Fatal(err)
	}
	if aws.ToString(out.Arn) != "arn:aws:sts::111111111111:assumed-role/imdsproxy-host/i-0123456789abcdef0" || aws.ToString(out.Account) != "111111111111" {
		t.Fatalf("GetCallerIdentity = %s %s", aws.ToString(out.Arn), aws.ToString(out.Account))
	}

	// Past the expiry, well inside the 15-minute signature window.
	short, err := fake.IssueSession(profile, "i-0123456789abcdef0", 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	skew.Store(int64(time.Until(short.Expiration) + 2*time.Second))
	_, err = arClient(fake, short.AccessKeyID, short.SecretAccessKey, short.SessionToken).GetCallerIdentity(context.Background(), &awssts.GetCallerIdentityInput{})
	if got := apiCode(t, err); got != "ExpiredToken" {
		t.Fatalf("expired credentials: code %s, want ExpiredToken", got)
	}

	for _, bad := range []struct {
		role, session string
		d             time.Duration
	}{
		{"not-an-arn", "i-0123456789abcdef0", time.Hour},
		{profile, "has space", time.Hour},
		{profile, "i-0123456789abcdef0", 0},
	} {
		if _, err := fake.IssueSession(bad.role, bad.session, bad.d); err == nil {
			t.Errorf("IssueSession(%q, %q, %s) accepted", bad.role, bad.session, bad.d)
		}
	}
}

// TestIssuedRecordsTokenKey: an accepted web identity token's kid and alg
// are recorded on what was issued.
func TestIssuedRecordsTokenKey(t *testing.T) {
	iss := oidc.Start(t)
	fake := Start(t, Config{Issuer: iss, RoleARN: roleARN})
	is := issueWebIdentity(t, fake, iss)
	if _, ok := iss.PublicKeys()[is.TokenKID]; !ok || is.TokenAlg != "RS256" {
		t.Fatalf("recorded kid %q alg %q; the issuer's keys are %v", is.TokenKID, is.TokenAlg, iss.PublicKeys())
	}
}
