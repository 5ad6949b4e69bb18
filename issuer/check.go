package issuer

import (
	"crypto/tls"
	"fmt"
	"os"
)

// CheckFiles reads every file cfg names (file keys, trusted certificates,
// the TLS pair), as check-config does, without contacting AWS: KMS keys
// are checked by New. Errors are *ConfigError naming the key.
func CheckFiles(cfg *Config) error {
	for i, k := range cfg.Signing.Keys {
		if k.File == "" {
			continue
		}
		if _, err := loadFileKey(k.File); err != nil {
			return keyErr(fmt.Sprintf("signing.keys[%d].file", i), "%v", err)
		}
	}
	if c := cfg.Attestation.AWSIID; c != nil {
		for i, f := range c.Certificates {
			data, err := os.ReadFile(f)
			if err == nil {
				_, err = parseCertificates(data, f)
			}
			if err != nil {
				return keyErr(fmt.Sprintf("attestation.aws_iid.certificates[%d]", i), "%v", err)
			}
		}
	}
	if cfg.TLS != nil {
		if _, err := tls.LoadX509KeyPair(cfg.TLS.Cert, cfg.TLS.Key); err != nil {
			return keyErr("tls", "%v", err)
		}
	}
	return nil
}
