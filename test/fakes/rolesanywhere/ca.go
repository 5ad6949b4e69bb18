package rolesanywhere

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"os"
	"path/filepath"
	"time"
)

// KeyType selects the key of an issued leaf certificate. The daemon accepts
// RSA 2048..4096 and ECDSA P-256/P-384; the others exist to test refusals.
type KeyType string

// Key types.
const (
	RSA1024 KeyType = "rsa-1024" // refused by the daemon (too small)
	RSA2048 KeyType = "rsa-2048"
	RSA4096 KeyType = "rsa-4096"
	ECP256  KeyType = "ec-p256"
	ECP384  KeyType = "ec-p384"
	ECP521  KeyType = "ec-p521" // refused by the daemon (curve)
	Ed25519 KeyType = "ed25519" // refused by the daemon (algorithm)
)

// KeyFormat selects the PEM encoding of a private key.
type KeyFormat string

// Key formats.
const (
	PKCS8 KeyFormat = "pkcs8" // "PRIVATE KEY" (any key type); the default
	PKCS1 KeyFormat = "pkcs1" // "RSA PRIVATE KEY" (RSA only)
	SEC1  KeyFormat = "sec1"  // "EC PRIVATE KEY" (ECDSA only)
)

// CA is a test certificate authority: a self-signed RSA root and an ECDSA
// P-256 intermediate signed by it. Leaves are issued by the intermediate
// (or by the root with LeafOptions.Direct). It is safe for concurrent use.
type CA struct {
	Root            *x509.Certificate
	RootKey         crypto.Signer
	Intermediate    *x509.Certificate
	IntermediateKey crypto.Signer

	// RootPEM is the root certificate, PEM encoded (the trust anchor).
	RootPEM []byte
}

// NewCA creates a root (RSA-2048, valid 10 years around now) and an
// intermediate (ECDSA P-256).
func NewCA() (*CA, error) {
	now := time.Now()
	rootKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return nil, err
	}
	rootTmpl := &x509.Certificate{
		SerialNumber:          randSerial(),
		Subject:               pkix.Name{CommonName: "imdsproxy test root CA", Organization: []string{"imdsproxy tests"}},
		NotBefore:             now.Add(-24 * time.Hour),
		NotAfter:              now.Add(10 * 365 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	root, err := createCert(rootTmpl, rootTmpl, rootKey.Public(), rootKey)
	if err != nil {
		return nil, err
	}
	intKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	intTmpl := &x509.Certificate{
		SerialNumber:          randSerial(),
		Subject:               pkix.Name{CommonName: "imdsproxy test intermediate CA", Organization: []string{"imdsproxy tests"}},
		NotBefore:             now.Add(-24 * time.Hour),
		NotAfter:              now.Add(5 * 365 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	inter, err := createCert(intTmpl, root, intKey.Public(), rootKey)
	if err != nil {
		return nil, err
	}
	return &CA{
		Root: root, RootKey: rootKey, Intermediate: inter, IntermediateKey: intKey,
		RootPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: root.Raw}),
	}, nil
}

// Pool returns a pool holding the root only.
func (ca *CA) Pool() *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(ca.Root)
	return p
}

// LeafOptions configures CA.Issue. The zero value issues an RSA-2048 leaf
// valid from one hour ago for 24 hours, signed by the intermediate.
type LeafOptions struct {
	Key        KeyType   // default RSA2048
	Format     KeyFormat // default PKCS8
	CommonName string    // default "host-1.test"
	Serial     *big.Int  // default random 128-bit
	NotBefore  time.Time // default now-1h
	NotAfter   time.Time // default NotBefore+25h
	// Expired issues a certificate that expired an hour ago.
	Expired bool
	// NotYetValid issues a certificate valid from one hour from now.
	NotYetValid bool
	// Direct signs the leaf with the root: no intermediate, empty chain.
	Direct bool
	// Signer, when set, is the key to certify instead of a new one (Key and
	// Format still describe it).
	Signer crypto.Signer
}

// Leaf is an issued certificate with its key and chain.
type Leaf struct {
	Cert  *x509.Certificate
	Key   crypto.Signer
	Chain []*x509.Certificate // intermediates only (empty with Direct)

	CertPEM  []byte // the leaf only
	KeyPEM   []byte // in the requested Format; a secret
	ChainPEM []byte // intermediates, nil with Direct
}

// Issue creates a client-auth leaf certificate.
func (ca *CA) Issue(o LeafOptions) (*Leaf, error) {
	if o.Key == "" {
		o.Key = RSA2048
	}
	if o.Format == "" {
		o.Format = PKCS8
	}
	if o.CommonName == "" {
		o.CommonName = "host-1.test"
	}
	if o.Serial == nil {
		o.Serial = randSerial()
	}
	now := time.Now()
	switch {
	case o.Expired:
		o.NotBefore, o.NotAfter = now.Add(-48*time.Hour), now.Add(-time.Hour)
	case o.NotYetValid:
		o.NotBefore, o.NotAfter = now.Add(time.Hour), now.Add(48*time.Hour)
	}
	if o.NotBefore.IsZero() {
		o.NotBefore = now.Add(-time.Hour)
	}
	if o.NotAfter.IsZero() {
		o.NotAfter = o.NotBefore.Add(25 * time.Hour)
	}
	key := o.Signer
	if key == nil {
		var err error
		if key, err = GenerateKey(o.Key); err != nil {
			return nil, err
		}
	}
	keyPEM, err := EncodeKey(key, o.Format)
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          o.Serial,
		Subject:               pkix.Name{CommonName: o.CommonName, Organization: []string{"imdsproxy tests"}},
		NotBefore:             o.NotBefore,
		NotAfter:              o.NotAfter,
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
	}
	parent, parentKey := ca.Intermediate, ca.IntermediateKey
	if o.Direct {
		parent, parentKey = ca.Root, ca.RootKey
	}
	cert, err := createCert(tmpl, parent, key.Public(), parentKey)
	if err != nil {
		return nil, err
	}
	l := &Leaf{
		Cert: cert, Key: key,
		CertPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Raw}),
		KeyPEM:  keyPEM,
	}
	if !o.Direct {
		l.Chain = []*x509.Certificate{ca.Intermediate}
		l.ChainPEM = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.Intermediate.Raw})
	}
	return l, nil
}

// WriteFiles writes cert.pem (0644), key.pem (0600) and, when there is a
// chain, chain.pem (0644) into dir, each atomically (write to a temporary
// file, then rename), and returns their paths; chainPath is "" without a
// chain.
func (l *Leaf) WriteFiles(dir string) (certPath, keyPath, chainPath string, err error) {
	certPath, keyPath = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	if err = WriteFileAtomic(keyPath, l.KeyPEM, 0o600); err != nil {
		return "", "", "", err
	}
	if err = WriteFileAtomic(certPath, l.CertPEM, 0o644); err != nil {
		return "", "", "", err
	}
	if len(l.ChainPEM) > 0 {
		chainPath = filepath.Join(dir, "chain.pem")
		if err = WriteFileAtomic(chainPath, l.ChainPEM, 0o644); err != nil {
			return "", "", "", err
		}
	}
	return certPath, keyPath, chainPath, nil
}

// WriteFileAtomic writes b to a temporary file next to path with mode perm
// (set explicitly, whatever the umask) and renames it over path.
func WriteFileAtomic(path string, b []byte, perm os.FileMode) error {
	f, err := os.CreateTemp(filepath.Dir(path), ".tmp-"+filepath.Base(path)+"-*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer os.Remove(tmp)
	if _, err := f.Write(b); err != nil {
		f.Close()
		return err
	}
	if err := f.Chmod(perm); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// GenerateKey returns a new private key of type t.
func GenerateKey(t KeyType) (crypto.Signer, error) {
	switch t {
	case RSA1024:
		return rsa.GenerateKey(rand.Reader, 1024)
	case RSA2048:
		return rsa.GenerateKey(rand.Reader, 2048)
	case RSA4096:
		return rsa.GenerateKey(rand.Reader, 4096)
	case ECP256:
		return ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	case ECP384:
		return ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	case ECP521:
		return ecdsa.GenerateKey(elliptic.P521(), rand.Reader)
	case Ed25519:
		_, k, err := ed25519.GenerateKey(rand.Reader)
		return k, err
	}
	return nil, fmt.Errorf("rolesanywhere: unknown key type %q", t)
}

// EncodeKey PEM-encodes key in format f.
func EncodeKey(key crypto.Signer, f KeyFormat) ([]byte, error) {
	var typ string
	var der []byte
	var err error
	switch f {
	case PKCS8, "":
		typ = "PRIVATE KEY"
		der, err = x509.MarshalPKCS8PrivateKey(key)
	case PKCS1:
		k, ok := key.(*rsa.PrivateKey)
		if !ok {
			return nil, errors.New("rolesanywhere: PKCS#1 needs an RSA key")
		}
		typ, der = "RSA PRIVATE KEY", x509.MarshalPKCS1PrivateKey(k)
	case SEC1:
		k, ok := key.(*ecdsa.PrivateKey)
		if !ok {
			return nil, errors.New("rolesanywhere: SEC1 needs an ECDSA key")
		}
		typ = "EC PRIVATE KEY"
		der, err = x509.MarshalECPrivateKey(k)
	default:
		return nil, fmt.Errorf("rolesanywhere: unknown key format %q", f)
	}
	if err != nil {
		return nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), nil
}

func createCert(tmpl, parent *x509.Certificate, pub crypto.PublicKey, key crypto.Signer) (*x509.Certificate, error) {
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, pub, key)
	if err != nil {
		return nil, err
	}
	return x509.ParseCertificate(der)
}

func randSerial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		panic(err)
	}
	return n.Add(n, big.NewInt(1))
}
