package rolesanywhere

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"net/http"
	"sort"
	"strings"
	"time"
)

// SignRequest signs r (whose body is body) the way a Roles Anywhere client
// does, with the fake's own implementation of the process. Tests use it to
// craft requests the daemon would refuse to build (out-of-range durations,
// odd bodies); the daemon's own signer lives in package exchange. Every
// header present is signed except Authorization, User-Agent and
// X-Amzn-Trace-Id.
func SignRequest(r *http.Request, body []byte, region string, now time.Time, leaf *x509.Certificate, chain []*x509.Certificate, key crypto.Signer) error {
	var alg string
	switch key.Public().(type) {
	case *rsa.PublicKey:
		alg = algRSA
	case *ecdsa.PublicKey:
		alg = algECDSA
	default:
		return errors.New("rolesanywhere: unsupported key")
	}
	amzDate := now.UTC().Format("20060102T150405Z")
	r.Header.Set("X-Amz-Date", amzDate)
	r.Header.Set("X-Amz-X509", base64.StdEncoding.EncodeToString(leaf.Raw))
	if len(chain) > 0 {
		var parts []string
		for _, c := range chain {
			parts = append(parts, base64.StdEncoding.EncodeToString(c.Raw))
		}
		r.Header.Set("X-Amz-X509-Chain", strings.Join(parts, ","))
	}
	names := []string{"host"}
	for k := range r.Header {
		lk := strings.ToLower(k)
		switch lk {
		case "authorization", "user-agent", "x-amzn-trace-id", "host":
			continue
		}
		names = append(names, lk)
	}
	sort.Strings(names)
	canon, err := canonicalRequest(r, names, body)
	if err != nil {
		return err
	}
	h := sha256.Sum256([]byte(canon))
	scope := amzDate[:8] + "/" + region + "/rolesanywhere/aws4_request"
	digest := sha256.Sum256([]byte(alg + "\n" + amzDate + "\n" + scope + "\n" + hex.EncodeToString(h[:])))
	sig, err := key.Sign(rand.Reader, digest[:], crypto.SHA256)
	if err != nil {
		return err
	}
	r.Header.Set("Authorization", alg+" Credential="+leaf.SerialNumber.String()+"/"+scope+
		", SignedHeaders="+strings.Join(names, ";")+", Signature="+hex.EncodeToString(sig))
	return nil
}
