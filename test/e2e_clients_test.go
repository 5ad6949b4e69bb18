package test

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/credentials/ec2rolecreds"
	"github.com/aws/aws-sdk-go-v2/feature/ec2/imds"
)

// clientCreds is what a client printed.
type clientCreds struct {
	AccessKeyId     string //nolint:revive // wire name
	SecretAccessKey string
	SessionToken    string
	Expiration      string
}

// assertExactlyIssued checks that a client got exactly the credentials the
// fake STS issued last.
func (e *daemonEnv) assertExactlyIssued(t *testing.T, client string, got clientCreds) {
	t.Helper()
	last, ok := e.sts.Last()
	if !ok {
		t.Fatalf("%s: the fake STS issued nothing", client)
	}
	if got.AccessKeyId != last.AccessKeyID {
		t.Fatalf("%s got access key id %q, STS issued %q", client, got.AccessKeyId, last.AccessKeyID)
	}
	if got.SecretAccessKey != last.SecretAccessKey {
		t.Fatalf("%s got a different secret access key than STS issued", client)
	}
	if got.SessionToken != last.SessionToken {
		t.Fatalf("%s got a different session token than STS issued (len %d vs %d)", client, len(got.SessionToken), len(last.SessionToken))
	}
	if got.Expiration != "" {
		exp, err := time.Parse(time.RFC3339, got.Expiration)
		if err != nil {
			t.Fatalf("%s: Expiration %q: %v", client, got.Expiration, err)
		}
		// Clients may shorten the lifetime (Go caps it), never extend it
		// beyond what STS issued when it is that far away.
		if exp.After(last.Expiration.Add(time.Second)) {
			t.Fatalf("%s: Expiration %s is after STS's %s", client, exp, last.Expiration)
		}
	}
}

func TestClientGoSDK(t *testing.T) {
	t.Parallel()
	e := startDaemon(t, envOptions{})
	ctx := context.Background()

	t.Run("LoadDefaultConfig", func(t *testing.T) {
		cfg, err := config.LoadDefaultConfig(ctx,
			config.WithRegion("us-east-1"),
			config.WithEC2IMDSEndpoint(e.imdsURL),
			config.WithSharedConfigFiles([]string{e.emptyFile}),
			config.WithSharedCredentialsFiles([]string{e.emptyFile}),
		)
		if err != nil {
			t.Fatal(err)
		}
		c, err := cfg.Credentials.Retrieve(ctx)
		if err != nil {
			t.Fatalf("Retrieve: %v", err)
		}
		if c.Source != ec2rolecreds.ProviderName {
			t.Fatalf("credentials came from %q, not from IMDS", c.Source)
		}
		e.assertExactlyIssued(t, "aws-sdk-go-v2 default chain", clientCreds{c.AccessKeyID, c.SecretAccessKey, c.SessionToken, ""})
		if !c.CanExpire || !c.Expires.After(time.Now()) {
			t.Fatalf("expiry %v CanExpire %v", c.Expires, c.CanExpire)
		}
	})

	t.Run("ec2rolecreds", func(t *testing.T) {
		// IMDSv1 fallback disabled: must work over IMDSv2 only.
		client := imds.New(imds.Options{Endpoint: e.imdsURL, EnableFallback: aws.FalseTernary})
		p := aws.NewCredentialsCache(ec2rolecreds.New(func(o *ec2rolecreds.Options) { o.Client = client }))
		c, err := p.Retrieve(ctx)
		if err != nil {
			t.Fatalf("Retrieve: %v", err)
		}
		e.assertExactlyIssued(t, "aws-sdk-go-v2 ec2rolecreds", clientCreds{c.AccessKeyID, c.SecretAccessKey, c.SessionToken, ""})
	})
}

func TestClientAWSCLI(t *testing.T) {
	t.Parallel()
	requireClient(t, awsCLIPath, "AWS CLI v2 (Debian package awscli)")
	// Debian 12 ships AWS CLI 2.9.19 (`aws-cli/2.9.19 ... source/x86_64.debian.12`),
	// which has `configure export-credentials`. A v1 CLI has not: then fall
	// back to botocore through Debian's python, as the CLI v1 would resolve it.
	out, err := runVersion(awsCLIPath)
	if err != nil {
		t.Fatalf("%s --version: %v", awsCLIPath, err)
	}
	t.Logf("AWS CLI: %s", out)
	e := startDaemon(t, envOptions{})
	var got clientCreds
	if strings.HasPrefix(out, "aws-cli/2.") {
		b := runClient(t, e.dir, e.clientEnviron(), awsCLIPath, "configure", "export-credentials", "--format", "process")
		if err := json.Unmarshal(b, &got); err != nil {
			t.Fatalf("aws configure export-credentials printed %q: %v", redactOutput(b), err)
		}
	} else {
		t.Logf("AWS CLI is not v2 (%s): using botocore's credential chain through %s instead", out, python3Path)
		got = runBotocore(t, e)
	}
	e.assertExactlyIssued(t, "AWS CLI", got)
}

func TestClientBoto3(t *testing.T) {
	t.Parallel()
	requireClient(t, python3Path, "python3 with boto3 (Debian package python3-boto3)")
	e := startDaemon(t, envOptions{})
	const script = `import boto3, json
s = boto3.Session()
c = s.get_credentials()
if c is None:
    raise SystemExit("boto3 found no credentials")
f = c.get_frozen_credentials()
exp = getattr(c, "_expiry_time", None)
print(json.dumps({"AccessKeyId": f.access_key, "SecretAccessKey": f.secret_key,
                  "SessionToken": f.token, "Method": c.method,
                  "Version": boto3.__version__}))`
	b := runClient(t, e.dir, e.clientEnviron(), python3Path, "-c", script)
	var got struct {
		clientCreds
		Method, Version string
	}
	if err := json.Unmarshal(b, &got); err != nil {
		t.Fatalf("boto3 printed %q: %v", redactOutput(b), err)
	}
	t.Logf("boto3 %s, credential method %q", got.Version, got.Method)
	if got.Method != "iam-role" {
		t.Fatalf("boto3 credential method %q, want iam-role (IMDS)", got.Method)
	}
	e.assertExactlyIssued(t, "boto3", got.clientCreds)
}

func TestClientJavaScriptSDK(t *testing.T) {
	t.Parallel()
	requireClient(t, nodePath, "Node.js")
	jsDir := filepath.Join(repoRoot, "test", "js")
	requireClient(t, filepath.Join(jsDir, "node_modules", "@aws-sdk", "credential-providers"), "the JavaScript SDK v3 (npm ci in test/js)")
	requireClient(t, filepath.Join(jsDir, "node_modules", "@aws-sdk", "credential-provider-node"), "the JavaScript SDK v3 (npm ci in test/js)")
	e := startDaemon(t, envOptions{})
	for _, p := range []string{"imds", "default"} {
		t.Run(p, func(t *testing.T) {
			b := runClient(t, jsDir, e.clientEnviron(), nodePath, "creds.mjs", p)
			var got clientCreds
			if err := json.Unmarshal(b, &got); err != nil {
				t.Fatalf("node creds.mjs %s printed %q: %v", p, redactOutput(b), err)
			}
			e.assertExactlyIssued(t, "JS SDK v3 "+p, got)
		})
	}
}

// runBotocore is the AWS CLI v1 fallback: botocore's own credential chain.
func runBotocore(t *testing.T, e *daemonEnv) clientCreds {
	t.Helper()
	const script = `import botocore.session, json
c = botocore.session.get_session().get_credentials().get_frozen_credentials()
print(json.dumps({"AccessKeyId": c.access_key, "SecretAccessKey": c.secret_key, "SessionToken": c.token}))`
	b := runClient(t, e.dir, e.clientEnviron(), python3Path, "-c", script)
	var got clientCreds
	if err := json.Unmarshal(b, &got); err != nil {
		t.Fatalf("botocore printed %q: %v", redactOutput(b), err)
	}
	return got
}

func runVersion(bin string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := execCommand(ctx, bin, "--version")
	cmd.Env = []string{"PATH=/usr/bin:/bin", "HOME=" + os.TempDir(), "LANG=C.UTF-8"}
	out, err := cmd.CombinedOutput()
	return strings.TrimSpace(string(out)), err
}

var secretish = regexp.MustCompile(`("(SecretAccessKey|SessionToken)"\s*:\s*)"[^"]*"`)

// redactOutput hides secrets in client output quoted in failure messages.
func redactOutput(b []byte) string {
	return secretish.ReplaceAllString(string(b), `$1"<redacted>"`)
}
