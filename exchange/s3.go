package exchange

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"
)

// S3Objects reads small objects (the rollout policy) from Amazon S3 with
// aws-sdk-go-v2, built like every other AWS client of the daemon (see
// loadAWSConfig): region from region or AWS_REGION (required; IMDS is never
// asked), AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL honoured — with an endpoint
// override the client uses path-style addressing, as S3-compatible stand-ins
// need. Safe for concurrent use.
type S3Objects struct {
	client  *s3.Client
	maxSize int64
}

// NewS3Objects returns an S3 reader signing with creds (normally the
// instance profile's credentials) that refuses objects larger than maxSize
// bytes. ctx bounds configuration loading only.
func NewS3Objects(ctx context.Context, creds aws.CredentialsProvider, region string, maxSize int64) (*S3Objects, error) {
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
	return &S3Objects{client: client, maxSize: min(maxSize, MaxResponseBody)}, nil
}

// GetObject returns the object's body and ETag.
func (g *S3Objects) GetObject(ctx context.Context, bucket, key string) ([]byte, string, error) {
	out, err := g.client.GetObject(ctx, &s3.GetObjectInput{Bucket: aws.String(bucket), Key: aws.String(key)})
	if err != nil {
		return nil, "", fmt.Errorf("S3 GetObject: %w", err)
	}
	defer out.Body.Close()
	if out.ContentLength != nil && *out.ContentLength > g.maxSize {
		return nil, "", fmt.Errorf("S3 object is larger than %d bytes", g.maxSize)
	}
	data, err := io.ReadAll(io.LimitReader(out.Body, g.maxSize+1))
	if err != nil {
		return nil, "", fmt.Errorf("S3 GetObject: read body: %w", err)
	}
	if int64(len(data)) > g.maxSize {
		return nil, "", fmt.Errorf("S3 object is larger than %d bytes", g.maxSize)
	}
	return data, aws.ToString(out.ETag), nil
}
