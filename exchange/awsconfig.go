package exchange

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/aws/ratelimit"
	"github.com/aws/aws-sdk-go-v2/aws/retry"
	"github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/feature/ec2/imds"
	"github.com/aws/smithy-go/logging"
	"github.com/aws/smithy-go/middleware"
	smithyhttp "github.com/aws/smithy-go/transport/http"
)

// MaxResponseBody bounds every answer the daemon reads from an AWS service
// or a credential endpoint, in bytes. The largest legitimate one (an STS
// answer with a padded session token, a policy object) is a few KiB; a
// hostile or broken upstream (an endpoint override, an HTTP proxy) could
// otherwise make the daemon buffer gigabytes.
const MaxResponseBody = 1 << 20

// awsOptions is what the daemon's own aws-sdk-go-v2 clients (STS, S3) are
// built from: one builder, so that every client honours the SDK's
// conventions (AWS_REGION, AWS_ENDPOINT_URL_<SERVICE>, AWS_ENDPOINT_URL, the
// shared config, HTTP(S)_PROXY) the same way, never asks IMDS for anything
// (on the hosts we run on, IMDS may be this daemon), leaves long-term
// backoff to the cache, and reads no answer larger than MaxResponseBody.
type awsOptions struct {
	// Region is the region; "" means the SDK's default configuration, and
	// it is an error if that names none.
	Region string
	// Credentials sign the calls. Nil with Chain false: anonymous (unsigned
	// calls, such as AssumeRoleWithWebIdentity).
	Credentials aws.CredentialsProvider
	// Chain uses the SDK's default credential chain (without its IMDS step)
	// when Credentials is nil.
	Chain bool
	// HTTPClient sends the requests; nil means the SDK's default client.
	HTTPClient *http.Client
	// MaxAttempts is the SDK attempts per call; 0 means DefaultMaxAttempts.
	MaxAttempts int
	// RetryCodes are error codes retried besides the standard ones.
	RetryCodes []string
}

// loadAWSConfig builds the aws.Config of o. ctx bounds loading only.
func loadAWSConfig(ctx context.Context, o awsOptions) (aws.Config, error) {
	attempts := o.MaxAttempts
	if attempts <= 0 {
		attempts = DefaultMaxAttempts
	}
	opts := []func(*config.LoadOptions) error{
		config.WithEC2IMDSClientEnableState(imds.ClientDisabled),
		// The SDK's own log lines (for example about draining a body the
		// limit cut) would go to stderr unstructured; errors reach our
		// logs through the returned errors.
		config.WithLogger(logging.Nop{}),
		config.WithAPIOptions([]func(*middleware.Stack) error{addLimitBody}),
		config.WithRetryer(func() aws.Retryer {
			return retry.NewStandard(func(so *retry.StandardOptions) {
				so.MaxAttempts = attempts
				// The cache owns long-term backoff; no client-side retry
				// quota that could starve a long-lived daemon.
				so.RateLimiter = ratelimit.None
				if len(o.RetryCodes) > 0 {
					codes := make(map[string]struct{}, len(o.RetryCodes))
					for _, c := range o.RetryCodes {
						codes[c] = struct{}{}
					}
					so.Retryables = append(so.Retryables, retry.RetryableErrorCode{Codes: codes})
				}
			})
		}),
	}
	switch {
	case o.Credentials != nil:
		opts = append(opts, config.WithCredentialsProvider(o.Credentials))
	case !o.Chain:
		opts = append(opts, config.WithCredentialsProvider(aws.AnonymousCredentials{}))
	}
	if o.Region != "" {
		opts = append(opts, config.WithRegion(o.Region))
	}
	if o.HTTPClient != nil {
		opts = append(opts, config.WithHTTPClient(o.HTTPClient))
	}
	cfg, err := config.LoadDefaultConfig(ctx, opts...)
	if err != nil {
		return aws.Config{}, fmt.Errorf("exchange: load AWS config: %w", err)
	}
	if cfg.Region == "" {
		return aws.Config{}, ErrNoRegion
	}
	return cfg, nil
}

// CheckRegion reports whether a region is known for the daemon's AWS calls
// (region, else the SDK's default configuration: AWS_REGION,
// AWS_DEFAULT_REGION, the shared config file), without any network call:
// ErrNoRegion when none is. check-config runs it.
func CheckRegion(ctx context.Context, region string) error {
	_, err := loadAWSConfig(ctx, awsOptions{Region: region})
	return err
}

// ErrNoRegion is returned when neither the config's region nor the SDK's
// default configuration names a region.
var ErrNoRegion = errors.New("exchange: no AWS region: set region: in the config file, or AWS_REGION in the daemon's environment")

// addLimitBody puts limitBody into an SDK client's stack, inside the
// operation's deserializer (so the deserializer reads the bounded body) and
// inside the retry loop (every attempt is bounded).
func addLimitBody(stack *middleware.Stack) error {
	return stack.Deserialize.Add(limitBody{}, middleware.After)
}

// limitBody bounds the raw response body to MaxResponseBody.
type limitBody struct{}

func (limitBody) ID() string { return "imdsproxy.LimitBody" }

func (limitBody) HandleDeserialize(ctx context.Context, in middleware.DeserializeInput, next middleware.DeserializeHandler) (
	middleware.DeserializeOutput, middleware.Metadata, error) {
	out, md, err := next.HandleDeserialize(ctx, in)
	if err != nil {
		return out, md, err
	}
	if resp, ok := out.RawResponse.(*smithyhttp.Response); ok && resp != nil && resp.Body != nil {
		if resp.ContentLength > MaxResponseBody {
			resp.Body.Close()
			return out, md, tooLarge()
		}
		resp.Body = &limitedBody{rc: resp.Body, left: MaxResponseBody}
	}
	return out, md, nil
}

// tooLarge is the error of an answer larger than MaxResponseBody: class
// invalid_response (not the protocol; retried with backoff). A new value
// each time: callers fill in Op and Role.
func tooLarge() *Error {
	return &Error{Op: "read response", Class: ClassInvalidResponse, tooLarge: true,
		Message: fmt.Sprintf("the answer is larger than %d bytes", MaxResponseBody)}
}

// limitedBody reads at most left bytes, then fails with tooLarge.
type limitedBody struct {
	rc   io.ReadCloser
	left int64
}

func (b *limitedBody) Read(p []byte) (int, error) {
	if b.left <= 0 {
		// One byte more tells a body of exactly the limit from a longer one.
		var one [1]byte
		n, err := b.rc.Read(one[:])
		switch {
		case n > 0:
			return 0, tooLarge()
		case err != nil:
			return 0, err
		}
		return 0, io.EOF
	}
	if int64(len(p)) > b.left {
		p = p[:b.left]
	}
	n, err := b.rc.Read(p)
	b.left -= int64(n)
	return n, err
}

func (b *limitedBody) Close() error { return b.rc.Close() }
