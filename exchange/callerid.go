package exchange

import (
	"context"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/sts"

	"github.com/imdsproxy/imdsproxy/creds"
)

// CallerIdentity verifies credentials with sts:GetCallerIdentity: the call
// succeeds only for credentials AWS accepts, and answers the identity behind
// them. The rollout's shadow stage uses it to prove workload credentials work
// before any client is given them. Safe for concurrent use.
type CallerIdentity struct {
	cfg     aws.Config
	timeout time.Duration
}

// NewCallerIdentity builds the STS client like NewWebIdentity does (region
// from region or AWS_REGION, AWS_ENDPOINT_URL_STS / AWS_ENDPOINT_URL
// honoured, no IMDS lookups by the SDK itself). timeout bounds one Verify
// (0: 10s).
func NewCallerIdentity(ctx context.Context, region string, timeout time.Duration) (*CallerIdentity, error) {
	awsCfg, err := loadAWSConfig(ctx, awsOptions{Region: region})
	if err != nil {
		return nil, err
	}
	if timeout <= 0 {
		timeout = 10 * time.Second
	}
	return &CallerIdentity{cfg: awsCfg, timeout: timeout}, nil
}

// Verify calls GetCallerIdentity signed with c and returns the caller's ARN.
// Errors are classified like every exchange error and never hold a secret.
func (v *CallerIdentity) Verify(ctx context.Context, c creds.Credentials) (string, error) {
	if !c.Complete() {
		return "", &Error{Op: "GetCallerIdentity", Class: ClassInvalidResponse, Message: "incomplete credentials"}
	}
	ctx, cancel := context.WithTimeout(ctx, v.timeout)
	defer cancel()
	client := sts.NewFromConfig(v.cfg, func(o *sts.Options) {
		o.Credentials = aws.CredentialsProviderFunc(func(context.Context) (aws.Credentials, error) {
			return aws.Credentials{AccessKeyID: c.AccessKeyID, SecretAccessKey: c.SecretAccessKey,
				SessionToken: c.SessionToken, CanExpire: true, Expires: c.Expires}, nil
		})
	})
	out, err := client.GetCallerIdentity(ctx, &sts.GetCallerIdentityInput{})
	if err != nil {
		e := Classify(err)
		e.Op = "GetCallerIdentity"
		return "", e
	}
	return aws.ToString(out.Arn), nil
}
