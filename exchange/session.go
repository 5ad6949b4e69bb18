package exchange

import (
	"context"
	"io"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	awshttp "github.com/aws/aws-sdk-go-v2/aws/transport/http"
	"github.com/aws/aws-sdk-go-v2/feature/ec2/imds"
)

// Session name limits of STS (RoleSessionName).
const (
	minSessionName = 2
	maxSessionName = 64
	// sessionNamePrefix pads names shorter than minSessionName and is the
	// name of last resort.
	sessionNamePrefix = "imdsproxy"
)

// instanceIDTimeout bounds the whole IMDS lookup in SessionName.
const instanceIDTimeout = time.Second

// SessionName resolves the RoleSessionName: configured when it is not blank;
// else the instance id read from the EC2 instance metadata service at
// imdsBase (for example "http://169.254.169.254"; IMDSv2 only, at most about
// one second, no HTTP proxy; "" skips IMDS); else the host name; else
// "imdsproxy". The result is always passed through SanitizeSessionName.
// SessionName never fails.
func SessionName(ctx context.Context, configured string, imdsBase string) string {
	if strings.TrimSpace(configured) != "" {
		return SanitizeSessionName(configured)
	}
	if imdsBase != "" {
		if id := instanceID(ctx, imdsBase); id != "" {
			return SanitizeSessionName(id)
		}
	}
	if h, err := os.Hostname(); err == nil && strings.TrimSpace(h) != "" {
		return SanitizeSessionName(h)
	}
	return sessionNamePrefix
}

// instanceID asks IMDS for the instance id; "" when that fails or the
// answer does not look like an EC2 instance id.
func instanceID(ctx context.Context, base string) string {
	ctx, cancel := context.WithTimeout(ctx, instanceIDTimeout)
	defer cancel()
	client := imds.New(imds.Options{
		Endpoint:       base,
		EnableFallback: aws.FalseTernary, // IMDSv2 only
		Retryer:        aws.NopRetryer{},
		HTTPClient: awshttp.NewBuildableClient().WithTransportOptions(func(tr *http.Transport) {
			tr.Proxy = nil // IMDS is link-local: never through an HTTP proxy
		}),
	})
	out, err := client.GetMetadata(ctx, &imds.GetMetadataInput{Path: "instance-id"})
	if err != nil {
		return ""
	}
	defer out.Content.Close()
	b, err := io.ReadAll(io.LimitReader(out.Content, maxSessionName+1))
	if err != nil || len(b) > maxSessionName {
		return ""
	}
	id := strings.TrimSpace(string(b))
	if !strings.HasPrefix(id, "i-") || len(id) < 3 {
		return ""
	}
	for _, r := range id[2:] {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9') {
			return ""
		}
	}
	return id
}

// SanitizeSessionName makes s acceptable to STS as a RoleSessionName:
// surrounding whitespace is trimmed, every character outside [A-Za-z0-9_=,.@-]
// becomes '-', the result is cut to 64 bytes, and a result shorter than 2
// bytes is prefixed with "imdsproxy-" (an empty one becomes "imdsproxy").
// A valid name is returned unchanged.
func SanitizeSessionName(s string) string {
	s = strings.TrimSpace(s)
	var b strings.Builder
	for _, r := range s {
		if b.Len() >= maxSessionName {
			break
		}
		if sessionNameChar(r) {
			b.WriteRune(r)
		} else {
			b.WriteByte('-')
		}
	}
	out := b.String()
	switch {
	case out == "":
		return sessionNamePrefix
	case len(out) < minSessionName:
		return sessionNamePrefix + "-" + out
	}
	return out
}

func sessionNameChar(r rune) bool {
	switch {
	case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9':
		return true
	}
	return strings.ContainsRune("_=,.@-", r)
}
