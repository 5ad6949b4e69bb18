package rollout

import (
	"bytes"
	"crypto/ed25519"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// Detached policy signatures.
//
// The publisher of a policy writes, beside it, a signature file: the
// policy's location with ".sig" appended (rollout.yaml.sig in the same
// directory, the S3 key plus ".sig" in the same bucket, the URL's path plus
// ".sig" with the same query). It is text, at most MaxSignatureSize bytes,
// one signature a line:
//
//	ed25519 <key id> <signature>
//	ed25519 <signature>
//
// where <signature> is the standard base64 (padded or not) of the 64-byte
// Ed25519 signature (RFC 8032, pure Ed25519, no pre-hash) of the exact
// bytes of the policy file, and <key id> (optional) is KeyID of the public
// key that verifies it: 16 lower-case hex digits, the first 8 bytes of the
// SHA-256 of the 32-byte public key. Empty lines and lines starting with
// "#" are ignored; CRLF line ends are accepted; at most MaxSignatureLines
// signatures. Anything else makes the whole file malformed.
//
// A policy is accepted when at least one line verifies with one of the
// configured keys: a line with a key id is checked against that key only,
// a line without one against every key. Several lines let a publisher sign
// with an old and a new key at once while hosts are moved from one to the
// other. A file whose lines all name keys that are not configured is
// refused as unknown_key; any other failure is bad_signature. SignPolicy
// writes such a file; docs/rollout.md shows how to write one with openssl.

// Limits of a signature file.
const (
	// MaxSignatureSize is the largest signature file accepted, in bytes.
	MaxSignatureSize = 4 << 10
	// MaxSignatureLines is the most signatures one file may hold.
	MaxSignatureLines = 16
)

// sigAlg is the only algorithm of signature files.
const sigAlg = "ed25519"

// Signature is one line of a signature file.
type Signature struct {
	// KeyID is the key id the line names, "" when it names none.
	KeyID string
	// Sig is the 64-byte Ed25519 signature.
	Sig []byte
}

// KeyID returns the key id of pub as signature files write it: the first 8
// bytes of SHA-256(pub), in lower-case hex (16 digits).
func KeyID(pub ed25519.PublicKey) string {
	sum := sha256.Sum256(pub)
	return hex.EncodeToString(sum[:8])
}

// SignPolicy returns the signature file of policy signed with priv: one
// line "ed25519 <KeyID> <base64 signature>\n". Write it beside the policy
// with ".sig" appended to the policy's name. It panics if priv is not an
// Ed25519 private key of the right length.
func SignPolicy(priv ed25519.PrivateKey, policy []byte) []byte {
	pub := priv.Public().(ed25519.PublicKey)
	sig := ed25519.Sign(priv, policy)
	return []byte(sigAlg + " " + KeyID(pub) + " " + base64.StdEncoding.EncodeToString(sig) + "\n")
}

// ParseSignatureFile parses a signature file (see above). Errors never
// quote the file beyond a line number and are safe to log.
func ParseSignatureFile(data []byte) ([]Signature, error) {
	if len(data) > MaxSignatureSize {
		return nil, fmt.Errorf("signature file is larger than %d bytes", MaxSignatureSize)
	}
	var sigs []Signature
	for i, line := range bytes.Split(data, []byte("\n")) {
		line = bytes.TrimSuffix(line, []byte("\r"))
		if len(bytes.TrimSpace(line)) == 0 || line[0] == '#' {
			continue
		}
		fail := func(why string) ([]Signature, error) {
			return nil, fmt.Errorf("signature file line %d: %s", i+1, why)
		}
		if len(sigs) == MaxSignatureLines {
			return fail(fmt.Sprintf("more than %d signatures", MaxSignatureLines))
		}
		f := strings.Split(string(line), " ")
		if len(f) != 2 && len(f) != 3 {
			return fail(`want "ed25519 [<key id>] <base64 signature>", single spaces`)
		}
		if f[0] != sigAlg {
			return fail(fmt.Sprintf("algorithm %s, want ed25519", strconv.QuoteToASCII(limit(f[0], 16))))
		}
		var s Signature
		if len(f) == 3 {
			if len(f[1]) != 16 || strings.Trim(f[1], "0123456789abcdef") != "" {
				return fail("the key id is not 16 lower-case hex digits")
			}
			s.KeyID = f[1]
		}
		b64 := f[len(f)-1]
		sig, err := base64.StdEncoding.DecodeString(b64)
		if err != nil {
			sig, err = base64.RawStdEncoding.DecodeString(b64)
		}
		if err != nil {
			return fail("the signature is not base64")
		}
		if len(sig) != ed25519.SignatureSize {
			return fail(fmt.Sprintf("the signature is %d bytes, want %d", len(sig), ed25519.SignatureSize))
		}
		s.Sig = sig
		sigs = append(sigs, s)
	}
	if len(sigs) == 0 {
		return nil, errors.New("signature file holds no signature")
	}
	return sigs, nil
}

func limit(s string, n int) string {
	if len(s) > n {
		return s[:n] + "…"
	}
	return s
}

// VerifyPolicy checks policy against the signature file sigFile with keys.
// It returns nil when a line verifies with one of keys, else a *LoadError
// with the reason unknown_key (every line names a key id none of keys has)
// or bad_signature (a malformed file, or a signature that does not
// verify). keys must not be empty.
func VerifyPolicy(keys []ed25519.PublicKey, policy, sigFile []byte) error {
	sigs, err := ParseSignatureFile(sigFile)
	if err != nil {
		return &LoadError{Reason: ReasonBadSignature, Err: err}
	}
	byID := make(map[string]ed25519.PublicKey, len(keys))
	for _, k := range keys {
		byID[KeyID(k)] = k
	}
	var unknown []string
	bad := 0
	for _, s := range sigs {
		if s.KeyID == "" {
			for _, k := range keys {
				if ed25519.Verify(k, policy, s.Sig) {
					return nil
				}
			}
			bad++
			continue
		}
		k, ok := byID[s.KeyID]
		if !ok {
			unknown = append(unknown, s.KeyID)
			continue
		}
		if ed25519.Verify(k, policy, s.Sig) {
			return nil
		}
		bad++
	}
	if bad == 0 {
		return &LoadError{Reason: ReasonUnknownKey, Err: fmt.Errorf(
			"signed only by unknown key %s (configured: %s)", strings.Join(unknown, ", "), keyIDs(keys))}
	}
	return &LoadError{Reason: ReasonBadSignature, Err: fmt.Errorf(
		"signature does not verify with the configured keys (%s): the policy or its signature was changed, or they are from two publications", keyIDs(keys))}
}

func keyIDs(keys []ed25519.PublicKey) string {
	ids := make([]string, len(keys))
	for i, k := range keys {
		ids[i] = KeyID(k)
	}
	return strings.Join(ids, ", ")
}

// ParsePublicKey parses one Ed25519 public key given as
//
//   - the standard base64 of the raw 32-byte key,
//   - the standard base64 of its DER SubjectPublicKeyInfo (the line between
//     the PEM armour of an openssl public key file: "MCowBQYDK2VwAyEA…"),
//   - PEM text with a "PUBLIC KEY" block (what `openssl pkey -pubout`
//     writes), or
//   - the absolute path of a file holding one of the above.
//
// Surrounding white space is ignored. A value is a path only when it starts
// with "/" and is not a key itself. Anything else, and keys of other
// algorithms, are errors.
func ParsePublicKey(s string) (ed25519.PublicKey, error) {
	s = strings.TrimSpace(s)
	if k, err := parseKeyText(s); err == nil {
		return k, nil
	} else if !strings.HasPrefix(s, "/") {
		return nil, err
	}
	b, err := os.ReadFile(filepath.Clean(s))
	if err != nil {
		return nil, fmt.Errorf("rollout: policy key file: %w", err)
	}
	k, err := parseKeyText(strings.TrimSpace(string(b)))
	if err != nil {
		return nil, fmt.Errorf("%w (in %s)", err, s)
	}
	return k, nil
}

// ParsePublicKeys parses each of specs with ParsePublicKey; its errors say
// which (1-based). Keys given twice are kept once.
func ParsePublicKeys(specs []string) ([]ed25519.PublicKey, error) {
	var keys []ed25519.PublicKey
	seen := map[string]bool{}
	for i, s := range specs {
		k, err := ParsePublicKey(s)
		if err != nil {
			return nil, fmt.Errorf("rollout: policy key %d: %w", i+1, err)
		}
		if !seen[string(k)] {
			seen[string(k)] = true
			keys = append(keys, k)
		}
	}
	return keys, nil
}

func parseKeyText(s string) (ed25519.PublicKey, error) {
	if s == "" {
		return nil, errors.New("rollout: empty policy key")
	}
	if strings.HasPrefix(s, "-----BEGIN") {
		block, _ := pem.Decode([]byte(s))
		if block == nil || block.Type != "PUBLIC KEY" {
			return nil, errors.New(`rollout: policy key: want a PEM "PUBLIC KEY" block`)
		}
		return spki(block.Bytes)
	}
	b, err := base64.StdEncoding.DecodeString(s)
	if err != nil {
		return nil, errors.New("rollout: policy key: not base64, PEM or an absolute file path")
	}
	if len(b) == ed25519.PublicKeySize {
		return ed25519.PublicKey(b), nil
	}
	return spki(b)
}

func spki(der []byte) (ed25519.PublicKey, error) {
	pub, err := x509.ParsePKIXPublicKey(der)
	if err != nil {
		return nil, errors.New("rollout: policy key: not a 32-byte Ed25519 key nor a DER SubjectPublicKeyInfo")
	}
	k, ok := pub.(ed25519.PublicKey)
	if !ok {
		return nil, fmt.Errorf("rollout: policy key: a %T, want Ed25519", pub)
	}
	return k, nil
}
