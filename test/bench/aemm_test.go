package bench

import (
	"bytes"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"time"
)

// amazon-ec2-metadata-mock (AEMM) is the third server: what a Go IMDS
// implementation does. It serves its own default role and credentials (a
// fixed JSON document, smaller than the daemon's), issues IMDSv2 tokens on
// PUT with the TTL header, and is measured with the same load generator.

const (
	aemmEnv  = "AEMM_BIN"
	aemmRole = "baskinc-role" // AEMM's default role
)

// aemmBinary returns AEMM_BIN, or bin/tools/ec2-metadata-mock of the
// repository (this package runs in test/bench).
func aemmBinary() string {
	if b := os.Getenv(aemmEnv); b != "" {
		return b
	}
	return filepath.Join("..", "..", "bin", "tools", "ec2-metadata-mock")
}

// startAEMM starts AEMM on a free loopback port and checks the flow. It
// returns a reason to skip instead of an error.
func (e *benchEnv) startAEMM() (_ *server, skip string) {
	bin, err := filepath.Abs(aemmBinary())
	if err != nil {
		return nil, err.Error()
	}
	if st, err := os.Stat(bin); err != nil || st.IsDir() {
		return nil, fmt.Sprintf("%s=%s: no such file (%v); set %s or install it into bin/tools", aemmEnv, bin, err, aemmEnv)
	}
	port, err := freePort()
	if err != nil {
		return nil, err.Error()
	}
	home := filepath.Join(e.dir, "aemm")
	if err := os.MkdirAll(home, 0o700); err != nil {
		return nil, err.Error()
	}
	s := &server{name: "aemm", base: fmt.Sprintf("http://127.0.0.1:%d", port), role: aemmRole,
		out: &capBuffer{}, done: make(chan struct{})}
	s.cmd = pinnedCommand(bin, "-n", "127.0.0.1", "-p", fmt.Sprint(port))
	s.cmd.Dir = home
	s.cmd.Env = append(e.daemonEnv(e.stsURL), "HOME="+home)
	s.cmd.Stdout, s.cmd.Stderr = s.out, s.out
	if err := s.cmd.Start(); err != nil {
		return nil, fmt.Sprintf("start %s: %v", bin, err)
	}
	s.pid = s.cmd.Process.Pid
	go func() { _ = s.cmd.Wait(); close(s.done) }()
	c := newClient()
	defer c.CloseIdleConnections()
	deadline := time.Now().Add(10 * time.Second)
	for {
		tr, err := roundTrip(c, http.MethodPut, s.base+tokenPath, "")
		if err == nil && tr.Status == http.StatusOK && len(tr.Body) > 0 {
			s.tok = string(tr.Body)
			break
		}
		if s.exited() || time.Now().After(deadline) {
			s.stop()
			return nil, fmt.Sprintf("%s did not answer a token PUT within 10s (last: %v %d); output:\n%s", bin, err, tr.Status, s.out)
		}
		time.Sleep(10 * time.Millisecond)
	}
	ls, err := roundTrip(c, http.MethodGet, s.base+listingPath, s.tok)
	if err == nil && (ls.Status != http.StatusOK || string(ls.Body) != aemmRole) {
		err = fmt.Errorf("role listing: status %d body %.100q, want %q", ls.Status, ls.Body, aemmRole)
	}
	if err == nil {
		var cr wireResponse
		cr, err = roundTrip(c, http.MethodGet, s.base+listingPath+aemmRole, s.tok)
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
