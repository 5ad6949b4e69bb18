// Package instance is a stand-in EC2 instance with an identity that can be
// verified: a throwaway certificate authority standing in for AWS's
// instance identity signer, an instance identity document (12-digit
// account, instance id, region, pendingTime, ...), its PKCS7 signatures as
// IMDS serves them (/latest/dynamic/instance-identity/pkcs7 and /rsa2048),
// and the instance profile's credentials, and an amazon-ec2-metadata-mock
// (AEMM) config file that serves all of them.
//
// imdsproxy-issuer verifies the documents with the CA's certificate
// (attestation.aws_iid.certificates); the instance profile's credentials
// are whatever the caller sets in Instance.Credentials, typically issued by
// the STS fake (test/fakes/sts IssueSession) so that a GetCallerIdentity
// signed with them (attestation aws_iam) is answered.
//
// Differences from EC2: both signatures are SHA-256 with RSA by the one
// CA (EC2 signs /pkcs7 with SHA-1 and DSA, which Go cannot produce, and
// /rsa2048 with another certificate); AEMM has no rsa2048 path, so
// AEMMConfig serves it in place of the legacy /signature path; and the
// document is formatted the way AEMM formats it (tab-indented), because
// AEMM re-encodes it and the signed content must be what it serves.
//
// Nothing here is safe for production: the CA key is generated in memory
// and the values are for tests and `make demo` only.
package instance

import (
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"github.com/smallstep/pkcs7"
)

// Defaults of New.
const (
	DefaultAccountID   = "111111111111"
	DefaultRegion      = "us-east-1"
	DefaultProfileRole = "imdsproxy-host"
)

// AEMMConfigFile is the name amazon-ec2-metadata-mock reads from its HOME.
const AEMMConfigFile = "aemm-config.json"

// CA is the certificate authority standing in for AWS's instance identity
// signer: a self-signed RSA-2048 certificate and its key.
type CA struct {
	Cert *x509.Certificate
	Key  *rsa.PrivateKey
	// PEM is the certificate, PEM-encoded (what the issuer trusts).
	PEM []byte
}

// NewCA generates a CA whose certificate's common name is cn, valid from an
// hour ago for ten years.
func NewCA(cn string) (*CA, error) {
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return nil, fmt.Errorf("instance: generate the CA key: %w", err)
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{Organization: []string{"imdsproxy stand-in"}, CommonName: cn},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(10 * 365 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, fmt.Errorf("instance: create the CA certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	return &CA{Cert: cert, Key: key, PEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}, nil
}

// WriteCert writes the CA's certificate (PEM, mode 0644: it is public) to
// path.
func (ca *CA) WriteCert(path string) error { return os.WriteFile(path, ca.PEM, 0o644) }

// Sign returns the base64 PKCS7 SignedData of content (embedded), signed
// with SHA-256 and RSA, wrapped at 64 characters as IMDS serves it.
func (ca *CA) Sign(content []byte) (string, error) {
	sd, err := pkcs7.NewSignedData(content)
	if err != nil {
		return "", err
	}
	sd.SetDigestAlgorithm(pkcs7.OIDDigestAlgorithmSHA256)
	if err := sd.AddSigner(ca.Cert, ca.Key, pkcs7.SignerInfoConfig{}); err != nil {
		return "", err
	}
	der, err := sd.Finish()
	if err != nil {
		return "", err
	}
	return wrap(base64.StdEncoding.EncodeToString(der), 64), nil
}

func wrap(s string, n int) string {
	var b strings.Builder
	for len(s) > n {
		b.WriteString(s[:n])
		b.WriteByte('\n')
		s = s[n:]
	}
	b.WriteString(s)
	return b.String()
}

// Options configure New. The zero value is a fresh instance of a fresh CA
// in DefaultAccountID and DefaultRegion, launched now.
type Options struct {
	// CA signs the documents; nil is a new one.
	CA *CA
	// AccountID is 12 digits; "" is DefaultAccountID.
	AccountID string
	// InstanceID is i- and 17 hex digits; "" is a random one.
	InstanceID string
	// Region; "" is DefaultRegion. AvailabilityZone "" is Region + "a".
	Region, AvailabilityZone string
	// PendingTime is the launch time; zero is now. It is kept to the
	// second, UTC.
	PendingTime time.Time
	// ProfileRole is the instance profile's role name; "" is
	// DefaultProfileRole.
	ProfileRole string
}

// Credentials are an instance profile's credentials. String and Format
// never print the secret or the token.
type Credentials struct {
	AccessKeyID, SecretAccessKey, SessionToken string
	Expiration                                 time.Time
}

// String names the access key id and the expiry only.
func (c Credentials) String() string {
	return fmt.Sprintf("{AccessKeyID: %s, Expiration: %s}", c.AccessKeyID, c.Expiration.UTC().Format(time.RFC3339))
}

// GoString is String, so %#v does not print the secret either.
func (c Credentials) GoString() string { return c.String() }

// Instance is one stand-in instance. Its fields are read-only once New
// returns, except Credentials, which must be set before AEMMConfig.
type Instance struct {
	CA                                              *CA
	AccountID, InstanceID, Region, AvailabilityZone string
	PendingTime                                     time.Time
	ProfileRole                                     string
	// Document is the instance identity document exactly as
	// amazon-ec2-metadata-mock serves it from AEMMConfig, which is the
	// content both signatures carry.
	Document string
	// PKCS7 and RSA2048 are the base64 PKCS7 signatures of Document,
	// wrapped at 64 characters (/pkcs7 and /rsa2048).
	PKCS7, RSA2048 string
	// Credentials are the instance profile's, served at
	// /latest/meta-data/iam/security-credentials/<ProfileRole>.
	Credentials Credentials
}

var (
	accountRe  = regexp.MustCompile(`^\d{12}$`)
	instanceRe = regexp.MustCompile(`^i-[0-9a-f]{8,17}$`)
	regionRe   = regexp.MustCompile(`^[a-z]{2}(-[a-z]+)+-\d+$`)
	roleNameRe = regexp.MustCompile(`^[\w+=,.@-]{1,64}$`)
)

// New makes an instance: its document and both signatures.
func New(o Options) (*Instance, error) {
	i := &Instance{CA: o.CA, AccountID: o.AccountID, InstanceID: o.InstanceID, Region: o.Region,
		AvailabilityZone: o.AvailabilityZone, PendingTime: o.PendingTime, ProfileRole: o.ProfileRole}
	var err error
	if i.CA == nil {
		if i.CA, err = NewCA("imdsproxy stand-in instance identity signer"); err != nil {
			return nil, err
		}
	}
	if i.AccountID == "" {
		i.AccountID = DefaultAccountID
	}
	if i.InstanceID == "" {
		b := make([]byte, 9)
		if _, err := rand.Read(b); err != nil {
			return nil, err
		}
		i.InstanceID = "i-" + hex.EncodeToString(b)[:17]
	}
	if i.Region == "" {
		i.Region = DefaultRegion
	}
	if i.AvailabilityZone == "" {
		i.AvailabilityZone = i.Region + "a"
	}
	if i.PendingTime.IsZero() {
		i.PendingTime = time.Now()
	}
	i.PendingTime = i.PendingTime.UTC().Truncate(time.Second)
	if i.ProfileRole == "" {
		i.ProfileRole = DefaultProfileRole
	}
	switch {
	case !accountRe.MatchString(i.AccountID):
		return nil, fmt.Errorf("instance: account id %q is not 12 digits", i.AccountID)
	case !instanceRe.MatchString(i.InstanceID):
		return nil, fmt.Errorf("instance: %q is not an instance id", i.InstanceID)
	case !regionRe.MatchString(i.Region):
		return nil, fmt.Errorf("instance: %q is not a region", i.Region)
	case !roleNameRe.MatchString(i.ProfileRole):
		return nil, fmt.Errorf("instance: %q is not a role name", i.ProfileRole)
	}
	doc, err := aemmJSON(i.document())
	if err != nil {
		return nil, err
	}
	i.Document = string(doc)
	if i.PKCS7, err = i.CA.Sign(doc); err != nil {
		return nil, fmt.Errorf("instance: sign the document: %w", err)
	}
	if i.RSA2048, err = i.CA.Sign(doc); err != nil {
		return nil, fmt.Errorf("instance: sign the document: %w", err)
	}
	return i, nil
}

// ProfileRoleARN is the ARN of the instance profile's role.
func (i *Instance) ProfileRoleARN() string {
	return "arn:aws:iam::" + i.AccountID + ":role/" + i.ProfileRole
}

// InstanceProfileARN is the ARN of the instance profile (named after its
// role).
func (i *Instance) InstanceProfileARN() string {
	return "arn:aws:iam::" + i.AccountID + ":instance-profile/" + i.ProfileRole
}

// identityDocument has the fields of amazon-ec2-metadata-mock v1.13.0's
// InstanceIdentityDocument, in its order: AEMM decodes the configured
// document into that struct and serves it re-encoded.
type identityDocument struct {
	AccountID               string   `json:"accountId"`
	ImageID                 string   `json:"imageId"`
	AvailabilityZone        string   `json:"availabilityZone"`
	RamdiskID               *string  `json:"ramdiskId"`
	KernelID                *string  `json:"kernelId"`
	DevpayProductCodes      *string  `json:"devpayProductCodes"`
	MarketplaceProductCodes []string `json:"marketplaceProductCodes"`
	Version                 string   `json:"version"`
	PrivateIP               string   `json:"privateIp"`
	BillingProducts         *string  `json:"billingProducts"`
	InstanceID              string   `json:"instanceId"`
	PendingTime             string   `json:"pendingTime"`
	Architecture            string   `json:"architecture"`
	InstanceType            string   `json:"instanceType"`
	Region                  string   `json:"region"`
}

func (i *Instance) document() identityDocument {
	return identityDocument{
		AccountID:        i.AccountID,
		ImageID:          "ami-0abcdef1234567890",
		AvailabilityZone: i.AvailabilityZone,
		Version:          "2017-09-30",
		PrivateIP:        "10.0.0.5",
		InstanceID:       i.InstanceID,
		PendingTime:      i.PendingTime.Format(time.RFC3339),
		Architecture:     "x86_64",
		InstanceType:     "t3.micro",
		Region:           i.Region,
	}
}

// aemmJSON encodes v as amazon-ec2-metadata-mock's JSON responses are:
// indented with tabs. (AEMM also folds lists onto one line; the document
// holds none: marketplaceProductCodes is null.)
func aemmJSON(v any) ([]byte, error) { return json.MarshalIndent(v, "", "\t") }

// aemmTime is the wire format of IMDS timestamps.
const aemmTime = "2006-01-02T15:04:05Z"

// AEMMConfig returns an amazon-ec2-metadata-mock config file (its
// aemm-config.json) that serves this instance: the identity document and
// both signatures, instance-id, placement, iam/info and the instance
// profile's credentials (which must be set).
func (i *Instance) AEMMConfig() ([]byte, error) {
	c := i.Credentials
	if c.AccessKeyID == "" || c.SecretAccessKey == "" || c.SessionToken == "" || c.Expiration.IsZero() {
		return nil, errors.New("instance: the instance profile's credentials are not set")
	}
	now := time.Now().UTC().Format(aemmTime)
	cfg := map[string]any{
		"metadata": map[string]any{
			"values": map[string]any{
				"instance-id":                 i.InstanceID,
				"instance-type":               "t3.micro",
				"ami-id":                      "ami-0abcdef1234567890",
				"placement-region":            i.Region,
				"placement-availability-zone": i.AvailabilityZone,
				"mac-owner-id":                i.AccountID,
				"iam-info": map[string]any{
					"Code":               "Success",
					"LastUpdated":        now,
					"InstanceProfileArn": i.InstanceProfileARN(),
					"InstanceProfileId":  "AIPA" + strings.ToUpper(strings.TrimPrefix(i.InstanceID, "i-")),
				},
				"iam-security-credentials-role": i.ProfileRole,
				"iam-security-credentials": map[string]any{
					"Code":            "Success",
					"LastUpdated":     now,
					"Type":            "AWS-HMAC",
					"AccessKeyId":     c.AccessKeyID,
					"SecretAccessKey": c.SecretAccessKey,
					"Token":           c.SessionToken,
					"Expiration":      c.Expiration.UTC().Format(aemmTime),
				},
			},
		},
		"dynamic": map[string]any{
			"paths": map[string]any{
				// AEMM has no rsa2048 path: serve it in place of the
				// legacy /signature.
				"instance-identity-signature": "/latest/dynamic/instance-identity/rsa2048",
			},
			"values": map[string]any{
				"instance-identity-document":  i.document(),
				"instance-identity-pkcs":      i.PKCS7,
				"instance-identity-signature": i.RSA2048,
			},
		},
	}
	return json.MarshalIndent(cfg, "", "  ")
}

// WriteAEMMConfig writes AEMMConfig to dir/aemm-config.json, mode 0600 (it
// holds the instance profile's secret), for an amazon-ec2-metadata-mock
// whose HOME is dir.
func (i *Instance) WriteAEMMConfig(dir string) error {
	b, err := i.AEMMConfig()
	if err != nil {
		return err
	}
	p := filepath.Join(dir, AEMMConfigFile)
	tmp := p + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, p)
}
