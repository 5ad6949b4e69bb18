package issuer

import (
	"bytes"
	"context"
	"crypto/dsa" //nolint:staticcheck // AWS signs the pkcs7 document with DSA; verification only.
	"crypto/sha1"
	"crypto/x509"
	_ "embed"
	"encoding/asn1"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"os"
	"regexp"
	"strings"
	"time"

	"github.com/smallstep/pkcs7"
)

// awsCertificates are the AWS public certificates that sign instance
// identity documents, shipped with the issuer (see the file's header for
// where they come from).
//
//go:embed aws-certificates.pem
var awsCertificates []byte

// AWSCertificates returns the shipped AWS certificates (PEM).
func AWSCertificates() []byte { return bytes.Clone(awsCertificates) }

// Limits of the instance identity document method.
const (
	maxDocument  = 16 << 10
	maxSignature = 16 << 10
)

var (
	instanceIDRe = regexp.MustCompile(`^i-[0-9a-f]{8,17}$`)
)

// Document is the part of an EC2 instance identity document the issuer
// uses.
type Document struct {
	AccountID   string    `json:"accountId"`
	InstanceID  string    `json:"instanceId"`
	Region      string    `json:"region"`
	PendingTime time.Time `json:"pendingTime"`
	ImageID     string    `json:"imageId"`
}

// trustStore holds the certificates trusted to sign documents, indexed by
// issuer and serial number (how a PKCS7 SignerInfo names its signer).
type trustStore struct {
	certs []*x509.Certificate
}

// parseCertificates reads every CERTIFICATE block of data; text between
// blocks is ignored.
func parseCertificates(data []byte, name string) ([]*x509.Certificate, error) {
	var out []*x509.Certificate
	for {
		var b *pem.Block
		b, data = pem.Decode(data)
		if b == nil {
			break
		}
		if b.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return nil, fmt.Errorf("%s: certificate %d: %w", name, len(out)+1, err)
		}
		out = append(out, c)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("%s holds no PEM certificate", name)
	}
	return out, nil
}

// loadTrustStore reads the files, or the shipped AWS certificates when
// files is empty.
func loadTrustStore(files []string) (*trustStore, error) {
	if len(files) == 0 {
		certs, err := parseCertificates(awsCertificates, "shipped AWS certificates")
		if err != nil {
			return nil, err
		}
		return &trustStore{certs: certs}, nil
	}
	ts := &trustStore{}
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			return nil, err
		}
		certs, err := parseCertificates(data, f)
		if err != nil {
			return nil, err
		}
		ts.certs = append(ts.certs, certs...)
	}
	return ts, nil
}

// verifyPKCS7 checks that sigB64 (base64 DER or BER PKCS #7 SignedData, as
// IMDS serves /pkcs7 and /rsa2048, line breaks allowed) is signed by one of
// the trusted certificates and returns the signed content. Certificates
// carried inside the PKCS7 are ignored: the signer must be a trusted
// certificate itself, named by its issuer and serial number.
func (ts *trustStore) verifyPKCS7(sigB64 string) ([]byte, error) {
	if len(sigB64) > maxSignature {
		return nil, attestErr(reasonMalformed, "the signature is larger than %d bytes", maxSignature)
	}
	der, err := base64.StdEncoding.DecodeString(strings.Join(strings.Fields(sigB64), ""))
	if err != nil {
		return nil, attestErr(reasonMalformed, "the signature is not base64")
	}
	p7, err := parsePKCS7(der)
	if err != nil {
		return nil, attestErr(reasonMalformed, "the signature is not a PKCS7 SignedData: %v", err)
	}
	if len(p7.Signers) != 1 {
		return nil, attestErr(reasonMalformed, "the PKCS7 has %d signers; want 1", len(p7.Signers))
	}
	if len(p7.Content) == 0 {
		return nil, attestErr(reasonMalformed, "the PKCS7 carries no signed content")
	}
	p7.Certificates = ts.certs
	signer := p7.GetOnlySigner()
	if signer == nil {
		return nil, attestErr(reasonUntrusted, "the PKCS7 is not signed by a trusted certificate")
	}
	err = p7.Verify()
	if errors.Is(err, x509.ErrUnsupportedAlgorithm) {
		if pub, ok := signer.PublicKey.(*dsa.PublicKey); ok {
			err = verifyDSA(p7, pub)
		}
	}
	if err != nil {
		return nil, attestErr(reasonBadSignature, "the PKCS7 signature does not verify with the trusted certificate %q: %v", signer.Subject.String(), err)
	}
	return p7.Content, nil
}

// parsePKCS7 parses der, turning a panic of the parser on hostile input
// into an error.
func parsePKCS7(der []byte) (p7 *pkcs7.PKCS7, err error) {
	defer func() {
		if r := recover(); r != nil {
			p7, err = nil, fmt.Errorf("unparsable: %v", r)
		}
	}()
	return pkcs7.Parse(der)
}

// verifyDSA checks the DSA signature of p7's only signer, which Go's x509
// no longer verifies. pkcs7.Verify has already checked the content digest
// against the signed attributes (that is where it stopped); what is left
// is the signature over those attributes (or over the content when there
// are none), SHA-1 as AWS uses.
func verifyDSA(p7 *pkcs7.PKCS7, pub *dsa.PublicKey) error {
	si := p7.Signers[0]
	signed := p7.Content
	if len(si.AuthenticatedAttributes) > 0 {
		var err error
		if signed, err = marshalSet(si.AuthenticatedAttributes); err != nil {
			return err
		}
	}
	var sig struct{ R, S *big.Int }
	if rest, err := asn1.Unmarshal(si.EncryptedDigest, &sig); err != nil || len(rest) != 0 || sig.R == nil || sig.S == nil {
		return errors.New("malformed DSA signature")
	}
	digest := sha1.Sum(signed)
	if !dsa.Verify(pub, digest[:], sig.R, sig.S) {
		return errors.New("DSA verification failure")
	}
	return nil
}

// marshalSet DER-encodes attrs as the SET OF Attribute that a SignerInfo's
// signature covers (RFC 5652 §5.4: the explicit SET tag, not [0]).
func marshalSet[T any](attrs []T) ([]byte, error) {
	b, err := asn1.Marshal(struct {
		A []T `asn1:"set"`
	}{attrs})
	if err != nil {
		return nil, err
	}
	var raw asn1.RawValue
	if _, err := asn1.Unmarshal(b, &raw); err != nil {
		return nil, err
	}
	return raw.Bytes, nil
}

// iidVerifier verifies the aws_iid method's request.
type iidVerifier struct {
	trust  *trustStore
	maxAge time.Duration
	verify bool
	lookup *instanceLookup // nil without verify_instance
	now    func() time.Time
}

// Verify checks the signatures and the replay defences and returns the
// host's identity, or an *attestError.
func (v *iidVerifier) Verify(ctx context.Context, req *TokenRequest) (*Identity, error) {
	if req.Document == "" {
		return nil, attestErr(reasonMalformed, `"document" is required`)
	}
	if req.PKCS7 == "" && req.RSA2048 == "" {
		return nil, attestErr(reasonMalformed, `"pkcs7" (or "rsa2048") is required`)
	}
	if len(req.Document) > maxDocument {
		return nil, attestErr(reasonMalformed, "the document is larger than %d bytes", maxDocument)
	}
	var signed []byte
	for _, sig := range []string{req.PKCS7, req.RSA2048} {
		if sig == "" {
			continue
		}
		content, err := v.trust.verifyPKCS7(sig)
		if err != nil {
			return nil, err
		}
		if !bytes.Equal(bytes.TrimSpace(content), bytes.TrimSpace([]byte(req.Document))) {
			return nil, attestErr(reasonDocumentMismatch, "the signed content differs from \"document\"")
		}
		signed = content
	}
	var doc Document
	if err := json.Unmarshal(signed, &doc); err != nil {
		return nil, attestErr(reasonMalformed, "the signed document is not an instance identity document: %v", err)
	}
	switch {
	case !instanceIDRe.MatchString(doc.InstanceID):
		return nil, attestErr(reasonMalformed, "the signed document has no valid instanceId")
	case !accountRe.MatchString(doc.AccountID):
		return nil, attestErr(reasonMalformed, "the signed document has no valid accountId")
	case !regionRe.MatchString(doc.Region):
		return nil, attestErr(reasonMalformed, "the signed document has no valid region")
	case doc.PendingTime.IsZero():
		return nil, attestErr(reasonMalformed, "the signed document has no pendingTime")
	}
	if v.maxAge > 0 {
		if age := v.now().Sub(doc.PendingTime); age > v.maxAge {
			return nil, attestErr(reasonTooOld, "instance %s was launched %s ago, more than max_instance_age %s",
				doc.InstanceID, age.Round(time.Second), v.maxAge)
		}
	}
	id := &Identity{Method: MethodIID, AccountID: doc.AccountID, InstanceID: doc.InstanceID,
		Region: doc.Region, RegionVerified: true, lookup: v.lookup}
	if v.verify {
		inst, err := id.Instance(ctx)
		if err != nil {
			return nil, err
		}
		if err := inst.check(doc.InstanceID); err != nil {
			return nil, err
		}
		if d := inst.LaunchTime.Sub(doc.PendingTime); d > time.Second || d < -time.Second {
			return nil, attestErr(reasonLaunchMismatch, "instance %s was launched at %s, the document says %s: the document belongs to an earlier launch",
				doc.InstanceID, inst.LaunchTime.UTC().Format(time.RFC3339), doc.PendingTime.UTC().Format(time.RFC3339))
		}
	}
	return id, nil
}
