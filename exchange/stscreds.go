package exchange

import (
	"fmt"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/sts/types"
	"go.uber.org/zap"

	"github.com/imdsproxy/imdsproxy/creds"
)

// stsCredentials turns the Credentials and AssumedRoleUser of an STS answer
// (AssumeRole or AssumeRoleWithWebIdentity) into creds.Credentials valid at
// now, or an invalid_response *Error naming what is missing. roleARN is the
// role asked for, used when STS names no assumed role.
func stsCredentials(op, source, roleARN string, sc *types.Credentials, user *types.AssumedRoleUser, now time.Time, log *zap.Logger) (creds.Credentials, error) {
	invalid := func(msg string) error {
		return &Error{Op: op, Role: roleARN, Class: ClassInvalidResponse, Message: msg}
	}
	if sc == nil {
		return creds.Credentials{}, invalid("response has no Credentials")
	}
	c := creds.Credentials{
		AccessKeyID:     aws.ToString(sc.AccessKeyId),
		SecretAccessKey: aws.ToString(sc.SecretAccessKey),
		SessionToken:    aws.ToString(sc.SessionToken),
		Expires:         aws.ToTime(sc.Expiration).UTC(),
		LastUpdated:     now.UTC(),
		Source:          source,
	}
	switch {
	case c.AccessKeyID == "":
		return creds.Credentials{}, invalid("response lacks Credentials.AccessKeyId")
	case c.SecretAccessKey == "":
		return creds.Credentials{}, invalid("response lacks Credentials.SecretAccessKey")
	case c.SessionToken == "":
		return creds.Credentials{}, invalid("response lacks Credentials.SessionToken")
	case sc.Expiration == nil || sc.Expiration.IsZero():
		return creds.Credentials{}, invalid("response lacks Credentials.Expiration")
	case !c.Expires.After(now):
		return creds.Credentials{}, invalid(fmt.Sprintf("credentials expired at %s (check the host clock)",
			c.Expires.Format(time.RFC3339)))
	}
	if user != nil && aws.ToString(user.Arn) != "" {
		c.RoleARN = aws.ToString(user.Arn)
	} else {
		// Real STS always sends AssumedRoleUser; fall back to what we asked for.
		log.Warn("STS response lacks AssumedRoleUser.Arn; using the configured role ARN")
		c.RoleARN = roleARN
	}
	c.AccountID = creds.AccountFromARN(c.RoleARN)
	if c.AccountID == "" {
		c.AccountID = creds.AccountFromARN(roleARN)
	}
	if !c.Complete() {
		return creds.Credentials{}, invalid("incomplete credentials")
	}
	return c, nil
}
