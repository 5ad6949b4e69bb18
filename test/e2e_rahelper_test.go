package test

import (
	"context"
	"encoding/json"
	"os/exec"
	"testing"
	"time"

	"github.com/imdsproxy/imdsproxy/test/e2e"
	"github.com/imdsproxy/imdsproxy/test/fakes/rolesanywhere"
)

// TestRolesAnywhereHelperInterop anchors the fake Roles Anywhere the
// daemon's tests sign in to (test/fakes/rolesanywhere) to AWS's own
// signer: AWS's credential helper, run as users run it
// (credential-process), signs CreateSession with an RSA and an ECDSA
// certificate; the fake, which verifies the SigV4-X509 signature, the chain
// and the resource ARNs as the service does, must accept both and hand the
// helper the credentials it issued. The daemon's Roles Anywhere exchange is
// tested against the same fake (TestRolesAnywhereClients), so the two sign
// alike. Skipped, saying why, when the helper could not be built (make test
// builds it with cgo; without gcc or the module download it cannot).
func TestRolesAnywhereHelperInterop(t *testing.T) {
	t.Parallel()
	bin, missing := e2e.RAHelperBinary()
	if bin == "" {
		t.Skip("SKIPPED: AWS's Roles Anywhere credential helper: " + missing)
	}
	ca, fake := startRAFake(t)
	for _, key := range []rolesanywhere.KeyType{rolesanywhere.RSA2048, rolesanywhere.ECP256} {
		t.Run(string(key), func(t *testing.T) {
			leaf, err := ca.Issue(rolesanywhere.LeafOptions{Key: key})
			if err != nil {
				t.Fatal(err)
			}
			certPath, keyPath, chainPath, err := leaf.WriteFiles(t.TempDir())
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			id := e2e.RAHelperIdentity{Cert: certPath, Key: keyPath, Chain: chainPath,
				TrustAnchorARN: raTrustAnchorARN, ProfileARN: raProfileARN, RoleARN: e2e.RoleARN, Endpoint: fake.URL}
			cmd := exec.CommandContext(ctx, bin, append([]string{"credential-process"}, id.Args()...)...)
			cmd.Env = e2e.Environ()
			var stderr e2e.LockedBuffer
			cmd.Stderr = &stderr
			out, err := cmd.Output()
			if err != nil {
				t.Fatalf("%s credential-process: %v\nstderr: %s\nthe fake's calls: %+v", bin, err, stderr.String(), fake.CallLog())
			}
			var doc struct {
				Version                                   int
				AccessKeyID                               string `json:"AccessKeyId"`
				SecretAccessKey, SessionToken, Expiration string
			}
			if err := json.Unmarshal(out, &doc); err != nil {
				t.Fatalf("the helper's output is not a credential_process document: %v", err)
			}
			issued, ok := fake.Find(doc.AccessKeyID)
			if !ok || doc.Version != 1 || doc.SecretAccessKey != issued.SecretAccessKey || doc.SessionToken != issued.SessionToken {
				t.Fatalf("the helper printed access key id %q (version %d), not credentials the fake issued (%d issued)", doc.AccessKeyID, doc.Version, len(fake.Issued()))
			}
			if issued.Serial != leaf.Cert.SerialNumber.String() {
				t.Errorf("issued for certificate serial %s, want the leaf's %s", issued.Serial, leaf.Cert.SerialNumber)
			}
			t.Logf("%s: the fake accepted AWS's signature (%s) and issued %s", key, issued.Algorithm, issued.AccessKeyID)
		})
	}
}
