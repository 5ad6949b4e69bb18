package exchange

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"os"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/aws/aws-sdk-go-v2/service/s3/types"
	smithyhttp "github.com/aws/smithy-go/transport/http"
)

// S3Objects reads small objects (the rollout policy and its signature) from
// Amazon S3 with
// aws-sdk-go-v2, built like every other AWS client of the daemon (see
// loadAWSConfig): region from region or AWS_REGION (required; IMDS is never
// asked), AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL honoured — with an endpoint
// override the client uses path-style addressing, as S3-compatible stand-ins
// need. Safe for concurrent use.
type S3Objects struct {
	client *s3.Client
}

// NewS3Objects returns an S3 reader signing with creds (normally the
// instance profile's credentials). ctx bounds configuration loading only.
func NewS3Objects(ctx context.Context, creds aws.CredentialsProvider, region string) (*S3Objects, error) {
	if creds == nil {
		return nil, errors.New("exchange: S3: nil credentials provider")
	}
	cfg, err := loadAWSConfig(ctx, awsOptions{Region: region, Credentials: creds})
	if err != nil {
		return nil, err
	}
	envOverride := os.Getenv("AWS_ENDPOINT_URL_S3") != "" || os.Getenv("AWS_ENDPOINT_URL") != ""
	client := s3.NewFromConfig(cfg, func(o *s3.Options) {
		if o.BaseEndpoint != nil || envOverride {
			o.UsePathStyle = true
		}
		// A policy object usually has no checksum; do not log that on
		// every poll.
		o.DisableLogOutputChecksumValidationSkipped = true
	})
	return &S3Objects{client: client}, nil
}

// GetObject returns the object's body, at most max+1 bytes (a longer object
// is cut there: the caller refuses it, having read no more), and its ETag. A
// missing object (NoSuchKey, HTTP 404) is an error wrapping fs.ErrNotExist.
func (g *S3Objects) GetObject(ctx context.Context, bucket, key string, max int64) ([]byte, string, error) {
	out, err := g.client.GetObject(ctx, &s3.GetObjectInput{Bucket: aws.String(bucket), Key: aws.String(key)})
	if err != nil {
		var nsk *types.NoSuchKey
		var re *smithyhttp.ResponseError
		if errors.As(err, &nsk) || (errors.As(err, &re) && re.HTTPStatusCode() == http.StatusNotFound) {
			return nil, "", fmt.Errorf("S3 GetObject: %w: %w", fs.ErrNotExist, err)
		}
		return nil, "", fmt.Errorf("S3 GetObject: %w", err)
	}
	defer out.Body.Close()
	data, err := io.ReadAll(io.LimitReader(out.Body, min(max, MaxResponseBody)+1))
	if err != nil {
		return nil, "", fmt.Errorf("S3 GetObject: read body: %w", err)
	}
	return data, aws.ToString(out.ETag), nil
}
