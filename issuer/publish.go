package issuer

import (
	"bytes"
	"context"
	"fmt"
	"path"
	"strings"

	"github.com/aws/aws-sdk-go-v2/aws"
	awsconfig "github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/service/s3"
)

// Published is one object Publish wrote.
type Published struct {
	Bucket string
	Key    string
	Bytes  int
}

// S3Key is the key under which the document served at urlPath
// (PathDiscovery or PathJWKS) is published: prefix + urlPath.
func S3Key(prefix, urlPath string) string {
	p := strings.Trim(prefix, "/")
	if p == "" {
		return strings.TrimPrefix(urlPath, "/")
	}
	return path.Join(p, strings.TrimPrefix(urlPath, "/"))
}

// PublishDocuments writes the discovery document and the JWKS of cfg's keys to the
// S3 bucket of cfg.Publish, with Content-Type application/json and a short
// Cache-Control, so that a CDN serves them at the issuer URL. Only the
// public halves of the keys are read (a file key is parsed, a KMS key's
// public key is fetched with kms:GetPublicKey). awsCfg nil means
// config.LoadDefaultConfig.
func PublishDocuments(ctx context.Context, cfg *Config, awsCfg func(context.Context) (aws.Config, error)) ([]Published, error) {
	p := cfg.Publish
	if p == nil {
		return nil, &ConfigError{Key: "publish", Msg: "required for publish (bucket, prefix, region)"}
	}
	if awsCfg == nil {
		awsCfg = func(ctx context.Context) (aws.Config, error) { return awsconfig.LoadDefaultConfig(ctx) }
	}
	c, err := awsCfg(ctx)
	if err != nil {
		return nil, fmt.Errorf("issuer: AWS configuration: %w", err)
	}
	keys, err := loadKeys(ctx, cfg, func() (aws.Config, error) { return c, nil })
	if err != nil {
		return nil, err
	}
	jwks, disc, err := documents(cfg, keys)
	if err != nil {
		return nil, err
	}
	client := s3.NewFromConfig(c, func(o *s3.Options) {
		o.Region = p.Region
		o.UsePathStyle = p.PathStyle
		if p.Endpoint != "" {
			o.BaseEndpoint = aws.String(p.Endpoint)
		}
	})
	cc := p.CacheControl
	if cc == "" {
		cc = DefaultCacheControl
	}
	var out []Published
	// The JWKS first: a discovery document must never point at keys that
	// are not there yet.
	for _, obj := range []struct {
		path string
		body []byte
	}{{PathJWKS, jwks}, {PathDiscovery, disc}} {
		key := S3Key(p.Prefix, obj.path)
		_, err := client.PutObject(ctx, &s3.PutObjectInput{
			Bucket:        aws.String(p.Bucket),
			Key:           aws.String(key),
			Body:          bytes.NewReader(obj.body),
			ContentLength: aws.Int64(int64(len(obj.body))),
			ContentType:   aws.String("application/json"),
			CacheControl:  aws.String(cc),
		})
		if err != nil {
			return out, fmt.Errorf("issuer: publish s3://%s/%s: %w", p.Bucket, key, err)
		}
		out = append(out, Published{Bucket: p.Bucket, Key: key, Bytes: len(obj.body)})
	}
	return out, nil
}
