package rollout

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/feature/ec2/imds"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/aws/aws-sdk-go-v2/service/s3/types"
	smithyhttp "github.com/aws/smithy-go/transport/http"
)

// s3Getter is the aws-sdk-go-v2 ObjectGetter.
type s3Getter struct {
	client *s3.Client
}

// NewS3Getter returns an ObjectGetter backed by aws-sdk-go-v2's S3 client,
// signing with creds (normally the instance profile's credentials).
//
// region "" means the SDK's default configuration (AWS_REGION, the shared
// config file); it is an error if none is found: the SDK is never allowed to
// ask IMDS for the region (on the hosts this runs on, IMDS may be the daemon
// itself). The endpoint overrides AWS_ENDPOINT_URL_S3 and AWS_ENDPOINT_URL
// are honoured, and with an override the client uses path-style addressing,
// as S3-compatible stand-ins need. Objects larger than MaxPolicySize are
// refused (ErrTooLarge) without reading more than that of them, and a
// missing object (NoSuchKey, HTTP 404) is ErrObjectNotFound. ctx bounds
// configuration loading only.
func NewS3Getter(ctx context.Context, creds aws.CredentialsProvider, region string) (ObjectGetter, error) {
	if creds == nil {
		return nil, errors.New("rollout: S3: nil credentials provider")
	}
	opts := []func(*config.LoadOptions) error{
		config.WithCredentialsProvider(creds),
		config.WithEC2IMDSClientEnableState(imds.ClientDisabled),
	}
	if region != "" {
		opts = append(opts, config.WithRegion(region))
	}
	cfg, err := config.LoadDefaultConfig(ctx, opts...)
	if err != nil {
		return nil, fmt.Errorf("rollout: S3: load AWS config: %w", err)
	}
	if cfg.Region == "" {
		return nil, errors.New("rollout: S3: no region: set AWS_REGION")
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
	return &s3Getter{client: client}, nil
}

// GetObject implements ObjectGetter.
func (g *s3Getter) GetObject(ctx context.Context, bucket, key string) ([]byte, string, error) {
	return g.getObjectLimit(ctx, bucket, key, MaxPolicySize)
}

// getObjectLimit reads bucket/key, at most max bytes: a larger object is
// refused (ErrTooLarge) and read no further.
func (g *s3Getter) getObjectLimit(ctx context.Context, bucket, key string, max int64) ([]byte, string, error) {
	out, err := g.client.GetObject(ctx, &s3.GetObjectInput{Bucket: aws.String(bucket), Key: aws.String(key)})
	if err != nil {
		var nsk *types.NoSuchKey
		var re *smithyhttp.ResponseError
		if errors.As(err, &nsk) || (errors.As(err, &re) && re.HTTPStatusCode() == 404) {
			return nil, "", fmt.Errorf("S3 GetObject: %w: %w", ErrObjectNotFound, err)
		}
		return nil, "", fmt.Errorf("S3 GetObject: %w", err)
	}
	defer out.Body.Close()
	if out.ContentLength != nil && *out.ContentLength > max {
		return nil, "", fmt.Errorf("S3 object of %d bytes is larger than %d bytes: %w", *out.ContentLength, max, ErrTooLarge)
	}
	data, err := io.ReadAll(io.LimitReader(out.Body, max+1))
	if err != nil {
		return nil, "", fmt.Errorf("S3 GetObject: read body: %w", err)
	}
	if int64(len(data)) > max {
		return nil, "", fmt.Errorf("S3 object is larger than %d bytes: %w", max, ErrTooLarge)
	}
	return data, aws.ToString(out.ETag), nil
}
