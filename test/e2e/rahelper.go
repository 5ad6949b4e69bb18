package e2e

import (
	"fmt"
	"os"
)

// RAHelperEnv names the binary of AWS's IAM Roles Anywhere credential
// helper (aws_signing_helper, github.com/aws/rolesanywhere-credential-helper),
// which make test and make bench build into bin/tools (with cgo, so it may
// be missing).
const RAHelperEnv = "RAH_BIN"

// RAHelperBinary returns $RAH_BIN when it names a file; else "" and why
// not, for a test or benchmark to say when it skips the helper.
func RAHelperBinary() (path, missing string) {
	bin := os.Getenv(RAHelperEnv)
	if bin == "" {
		return "", RAHelperEnv + " is not set (make test and make bench build the helper into bin/tools and set it)"
	}
	if st, err := os.Stat(bin); err != nil || st.IsDir() {
		return "", fmt.Sprintf("%s=%s: no such file (%v): the helper's build failed; see make's output", RAHelperEnv, bin, err)
	}
	return bin, ""
}

// RAHelperIdentity is what the helper signs in to a Roles Anywhere
// endpoint with: the certificate, its key and chain (files), the trust
// anchor, profile and role ARNs, and the endpoint's URL.
type RAHelperIdentity struct {
	Cert, Key, Chain                    string
	TrustAnchorARN, ProfileARN, RoleARN string
	Endpoint                            string
}

// Args are the helper's flags for id (in us-east-1), after its sub-command
// (serve, credential-process).
func (id RAHelperIdentity) Args() []string {
	return []string{"--certificate", id.Cert, "--private-key", id.Key, "--intermediates", id.Chain,
		"--trust-anchor-arn", id.TrustAnchorARN, "--profile-arn", id.ProfileARN, "--role-arn", id.RoleARN,
		"--endpoint", id.Endpoint, "--region", "us-east-1"}
}
