package issuer

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/asn1"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"os"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/kms"
	kmstypes "github.com/aws/aws-sdk-go-v2/service/kms/types"
	"github.com/go-jose/go-jose/v4"
)

// JWS algorithms the issuer signs with.
const (
	AlgES256 = "ES256"
	AlgRS256 = "RS256"
)

// Key sources, the key_source label of the signing metrics.
const (
	sourceFile = "file"
	sourceKMS  = "kms"
)

// maxKeyFile bounds a PEM key file.
const maxKeyFile = 64 << 10

// signingKey is one configured key: its public half as published, and a
// way to sign with the private half. Safe for concurrent use.
type signingKey struct {
	alg    string
	kid    string // RFC 7638 thumbprint (SHA-256, base64url)
	source string // sourceFile | sourceKMS
	name   string // the file path or the KMS ARN: for logs, never secret
	public crypto.PublicKey
	jwk    jose.JSONWebKey // public, with kid, alg, use
	// header is the base64url JWS protected header {"alg","kid","typ"}.
	header string
	// publishedAt is the configured published_at (zero when unset).
	publishedAt time.Time
	// signDigest signs a SHA-256 digest and returns the JWS signature
	// (r||s for ES256, PKCS #1 v1.5 for RS256).
	signDigest func(ctx context.Context, digest []byte) ([]byte, error)
}

// newSigningKey derives kid, JWK and header from the public key.
func newSigningKey(alg, source, name string, pub crypto.PublicKey, sign func(context.Context, []byte) ([]byte, error)) (*signingKey, error) {
	jwk := jose.JSONWebKey{Key: pub, Algorithm: alg, Use: "sig"}
	tp, err := jwk.Thumbprint(crypto.SHA256)
	if err != nil {
		return nil, fmt.Errorf("thumbprint: %w", err)
	}
	jwk.KeyID = base64.RawURLEncoding.EncodeToString(tp)
	hdr, err := json.Marshal(struct {
		Alg string `json:"alg"`
		Kid string `json:"kid"`
		Typ string `json:"typ"`
	}{alg, jwk.KeyID, "JWT"})
	if err != nil {
		return nil, err
	}
	return &signingKey{alg: alg, kid: jwk.KeyID, source: source, name: name, public: pub, jwk: jwk,
		header: base64.RawURLEncoding.EncodeToString(hdr), signDigest: sign}, nil
}

// loadFileKey reads a PEM private key: EC P-256 (ES256) or RSA of at least
// 2048 bits (RS256), in PKCS #8, SEC 1 or PKCS #1 form. The file must not
// be readable by group or others. Errors name the file, never its content.
func loadFileKey(path string) (*signingKey, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if st.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("%s is readable by group or others (mode %v); a signing key must be 0600 or 0400", path, st.Mode().Perm())
	}
	if st.Size() > maxKeyFile {
		return nil, fmt.Errorf("%s is larger than %d bytes", path, maxKeyFile)
	}
	data := make([]byte, st.Size())
	if _, err := f.ReadAt(data, 0); err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	priv, err := parsePrivateKey(data)
	clear(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return fileSigner(priv, path)
}

// parsePrivateKey decodes the first PEM private key block of data.
func parsePrivateKey(data []byte) (crypto.Signer, error) {
	for {
		var b *pem.Block
		b, data = pem.Decode(data)
		if b == nil {
			return nil, errors.New("no PEM private key (PRIVATE KEY, EC PRIVATE KEY or RSA PRIVATE KEY) found")
		}
		var key any
		var err error
		switch b.Type {
		case "PRIVATE KEY":
			key, err = x509.ParsePKCS8PrivateKey(b.Bytes)
		case "EC PRIVATE KEY":
			key, err = x509.ParseECPrivateKey(b.Bytes)
		case "RSA PRIVATE KEY":
			key, err = x509.ParsePKCS1PrivateKey(b.Bytes)
		case "ENCRYPTED PRIVATE KEY":
			return nil, errors.New("encrypted private keys are not supported")
		default:
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("parse %s: %w", b.Type, err)
		}
		s, ok := key.(crypto.Signer)
		if !ok {
			return nil, fmt.Errorf("unsupported private key type %T", key)
		}
		return s, nil
	}
}

// fileSigner wraps a private key held in memory.
func fileSigner(priv crypto.Signer, name string) (*signingKey, error) {
	switch k := priv.(type) {
	case *ecdsa.PrivateKey:
		if k.Curve != elliptic.P256() {
			return nil, fmt.Errorf("EC key on curve %s; only P-256 (ES256) is supported", k.Curve.Params().Name)
		}
		return newSigningKey(AlgES256, sourceFile, name, &k.PublicKey, func(_ context.Context, digest []byte) ([]byte, error) {
			r, s, err := ecdsa.Sign(rand.Reader, k, digest)
			if err != nil {
				return nil, err
			}
			return joseECDSA(r, s), nil
		})
	case *rsa.PrivateKey:
		if k.N.BitLen() < 2048 {
			return nil, fmt.Errorf("RSA key of %d bits; at least 2048 are required", k.N.BitLen())
		}
		return newSigningKey(AlgRS256, sourceFile, name, &k.PublicKey, func(_ context.Context, digest []byte) ([]byte, error) {
			return rsa.SignPKCS1v15(nil, k, crypto.SHA256, digest)
		})
	default:
		return nil, fmt.Errorf("unsupported key type %T; use EC P-256 or RSA >= 2048", priv)
	}
}

// joseECDSA is the JWS form of a P-256 signature: r and s as 32-byte
// big-endian integers, concatenated (RFC 7518 §3.4).
func joseECDSA(r, s *big.Int) []byte {
	out := make([]byte, 64)
	r.FillBytes(out[:32])
	s.FillBytes(out[32:])
	return out
}

// derToJOSE converts an ASN.1 DER ECDSA signature (as KMS returns it) to
// the JWS r||s form for P-256.
func derToJOSE(der []byte) ([]byte, error) {
	var sig struct{ R, S *big.Int }
	rest, err := asn1.Unmarshal(der, &sig)
	if err != nil || len(rest) != 0 || sig.R == nil || sig.S == nil {
		return nil, errors.New("not a DER ECDSA signature")
	}
	if sig.R.Sign() <= 0 || sig.S.Sign() <= 0 || sig.R.BitLen() > 256 || sig.S.BitLen() > 256 {
		return nil, errors.New("ECDSA signature values out of range for P-256")
	}
	return joseECDSA(sig.R, sig.S), nil
}

// KMSAPI is the part of the KMS client the issuer uses.
type KMSAPI interface {
	GetPublicKey(ctx context.Context, in *kms.GetPublicKeyInput, opts ...func(*kms.Options)) (*kms.GetPublicKeyOutput, error)
	Sign(ctx context.Context, in *kms.SignInput, opts ...func(*kms.Options)) (*kms.SignOutput, error)
}

// loadKMSKey asks KMS for the public key of arn and returns a key that signs
// with kms:Sign (MessageType DIGEST); the private key never leaves KMS.
func loadKMSKey(ctx context.Context, client KMSAPI, arn string) (*signingKey, error) {
	out, err := client.GetPublicKey(ctx, &kms.GetPublicKeyInput{KeyId: aws.String(arn)})
	if err != nil {
		return nil, fmt.Errorf("kms GetPublicKey: %w", err)
	}
	if out.KeyUsage != kmstypes.KeyUsageTypeSignVerify {
		return nil, fmt.Errorf("key usage is %s; SIGN_VERIFY is required", out.KeyUsage)
	}
	pub, err := x509.ParsePKIXPublicKey(out.PublicKey)
	if err != nil {
		return nil, fmt.Errorf("kms public key: %w", err)
	}
	keyID := arn
	if out.KeyId != nil && *out.KeyId != "" {
		keyID = *out.KeyId // the key ARN even when arn is an alias
	}
	var alg string
	var sa kmstypes.SigningAlgorithmSpec
	switch out.KeySpec {
	case kmstypes.KeySpecEccNistP256:
		if _, ok := pub.(*ecdsa.PublicKey); !ok {
			return nil, errors.New("KMS says ECC_NIST_P256 but the public key is not ECDSA")
		}
		alg, sa = AlgES256, kmstypes.SigningAlgorithmSpecEcdsaSha256
	case kmstypes.KeySpecRsa2048, kmstypes.KeySpecRsa3072, kmstypes.KeySpecRsa4096:
		if _, ok := pub.(*rsa.PublicKey); !ok {
			return nil, errors.New("KMS says RSA but the public key is not RSA")
		}
		alg, sa = AlgRS256, kmstypes.SigningAlgorithmSpecRsassaPkcs1V15Sha256
	default:
		return nil, fmt.Errorf("key spec %s is not supported; use ECC_NIST_P256 or RSA_2048", out.KeySpec)
	}
	return newSigningKey(alg, sourceKMS, arn, pub, func(ctx context.Context, digest []byte) ([]byte, error) {
		res, err := client.Sign(ctx, &kms.SignInput{
			KeyId:            aws.String(keyID),
			Message:          digest,
			MessageType:      kmstypes.MessageTypeDigest,
			SigningAlgorithm: sa,
		})
		if err != nil {
			return nil, fmt.Errorf("kms Sign: %w", err)
		}
		if alg == AlgES256 {
			return derToJOSE(res.Signature)
		}
		return res.Signature, nil
	})
}

// signJWT returns the compact JWS of claims (JSON) signed with k.
func (k *signingKey) signJWT(ctx context.Context, claims []byte) (string, error) {
	n := len(k.header) + 1 + base64.RawURLEncoding.EncodedLen(len(claims))
	buf := make([]byte, 0, n+1+base64.RawURLEncoding.EncodedLen(512))
	buf = append(buf, k.header...)
	buf = append(buf, '.')
	buf = base64.RawURLEncoding.AppendEncode(buf, claims)
	digest := sha256.Sum256(buf)
	sig, err := k.signDigest(ctx, digest[:])
	if err != nil {
		return "", err
	}
	buf = append(buf, '.')
	buf = base64.RawURLEncoding.AppendEncode(buf, sig)
	return string(buf), nil
}
