package bench

import (
	"bytes"
	"fmt"
	"net/http"
	"os"
	"path/filepath"

	"github.com/imdsproxy/imdsproxy/test/e2e"
)

// amazon-ec2-metadata-mock (AEMM) is the third server: what a Go IMDS
// implementation does. It serves its own default role and credentials (a
// fixed JSON document, smaller than the daemon's), issues IMDSv2 tokens on
// PUT with the TTL header, and is measured with the same load generator.

// aemmRole is AEMM's default role.
const aemmRole = "baskinc-role"

// startAEMM starts AEMM (e2e.AEMMBinary) on a free loopback port and checks
// the flow. It returns a reason to skip instead of an error.
func (e *benchEnv) startAEMM() (_ *server, skip string) {
	bin, err := filepath.Abs(e2e.AEMMBinary())
	if err != nil {
		return nil, err.Error()
	}
	if st, err := os.Stat(bin); err != nil || st.IsDir() {
		return nil, fmt.Sprintf("%s=%s: no such file (%v); set %s or install it into bin/tools", e2e.AEMMEnv, bin, err, e2e.AEMMEnv)
	}
	home := filepath.Join(e.dir, "aemm")
	if err := os.MkdirAll(home, 0o700); err != nil {
		return nil, err.Error()
	}
	out, err := e.newOutput("aemm")
	if err != nil {
		return nil, err.Error()
	}
	a, err := e2e.StartAEMM(e2e.AEMMOptions{
		Bin: bin, Home: home, Env: e.daemonEnv(e.stsURL), Command: pinnedCommand, Out: out,
	})
	if err != nil {
		return nil, err.Error()
	}
	s := &server{name: "aemm", proc: a.Proc, pid: a.Proc.Pid(), base: a.URL, role: aemmRole, tok: a.Token, out: out}
	c := newClient()
	defer c.CloseIdleConnections()
	ls, err := roundTrip(c, http.MethodGet, s.base+e2e.CredentialsPath, s.tok)
	if err == nil && (ls.Status != http.StatusOK || string(ls.Body) != aemmRole) {
		err = fmt.Errorf("role listing: status %d body %.100q, want %q", ls.Status, ls.Body, aemmRole)
	}
	if err == nil {
		var cr wireResponse
		cr, err = roundTrip(c, http.MethodGet, s.base+e2e.CredentialsPath+aemmRole, s.tok)
		if err == nil && (cr.Status != http.StatusOK || !bytes.Contains(cr.Body, []byte(`"AccessKeyId"`))) {
			err = fmt.Errorf("credentials: status %d body %.200q", cr.Status, cr.Body)
		}
		e.aemmCredsLen = len(cr.Body)
	}
	if err != nil {
		s.stop()
		return nil, fmt.Sprintf("%s: %v", bin, err)
	}
	return s, ""
}
