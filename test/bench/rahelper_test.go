package bench

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/imdsproxy/imdsproxy/test/e2e"
	"github.com/imdsproxy/imdsproxy/test/fakes/rolesanywhere"
)

// The IAM Roles Anywhere credential helper's `serve` (aws_signing_helper,
// github.com/aws/rolesanywhere-credential-helper, built by make bench) is
// the fastest peer issue 13 measured: a Go IMDSv2 endpoint for one role that
// answers the credential GET from memory. It runs here as a user would run
// it, with its defaults, against the fake Roles Anywhere of
// test/fakes/rolesanywhere (in this process, on loopback), which verifies
// its SigV4-X509 signature like the real service; it signs once at start,
// and the credentials last an hour, longer than the bench.

// The fake trust anchor, profile and role the helper is configured with.
const (
	rahTrustAnchorARN = "arn:aws:rolesanywhere:us-east-1:111111111111:trust-anchor/9f3c1e2a-0000-4000-8000-000000000001"
	rahProfileARN     = "arn:aws:rolesanywhere:us-east-1:111111111111:profile/9f3c1e2a-0000-4000-8000-000000000002"
	rahRole           = "imdsproxy-bench-ra"
	rahRoleARN        = "arn:aws:iam::111111111111:role/" + rahRole
)

// rahFake is the fake Roles Anywhere the helper signs in to; teardown closes it.
type rahFake struct {
	fake *rolesanywhere.Server
	srv  *httptest.Server
}

func (f *rahFake) close() {
	if f != nil {
		f.fake.Close()
		f.srv.Close()
	}
}

// startRAHelper starts the helper's serve on a free loopback port, pinned
// like the other servers, and checks the flow: a token, the role listing,
// and the credentials the fake issued. It returns a reason to skip instead
// of an error.
func (e *benchEnv) startRAHelper() (_ *server, skip string) {
	bin, missing := e2e.RAHelperBinary()
	if bin == "" {
		return nil, missing
	}
	dir := filepath.Join(e.dir, "ra-helper")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err.Error()
	}
	ca, err := rolesanywhere.NewCA()
	if err != nil {
		return nil, err.Error()
	}
	leaf, err := ca.Issue(rolesanywhere.LeafOptions{Key: rolesanywhere.ECP256})
	if err != nil {
		return nil, err.Error()
	}
	certPath, keyPath, chainPath, err := leaf.WriteFiles(dir)
	if err != nil {
		return nil, err.Error()
	}
	fake := rolesanywhere.New(rolesanywhere.Config{
		Roots: ca.Pool(), TrustAnchorARN: rahTrustAnchorARN, ProfileARN: rahProfileARN, RoleARN: rahRoleARN,
	})
	e.rahFake = &rahFake{fake: fake, srv: httptest.NewServer(fake.Handler())}
	port, err := e2e.FreePort()
	if err != nil {
		return nil, err.Error()
	}
	out, err := e.newOutput("ra-helper")
	if err != nil {
		return nil, err.Error()
	}
	id := e2e.RAHelperIdentity{Cert: certPath, Key: keyPath, Chain: chainPath,
		TrustAnchorARN: rahTrustAnchorARN, ProfileARN: rahProfileARN, RoleARN: rahRoleARN, Endpoint: e.rahFake.srv.URL}
	cmd := pinnedCommand(bin, append(append([]string{"serve"}, id.Args()...), "--port", strconv.Itoa(port))...)
	cmd.Env, cmd.Dir = e2e.Environ(), dir
	cmd.Stdout, cmd.Stderr = out.f, out.f
	proc, err := e2e.Start(cmd)
	if err != nil {
		return nil, fmt.Sprintf("start %s: %v", bin, err)
	}
	s := &server{name: "ra-helper", proc: proc, pid: proc.Pid(), base: "http://127.0.0.1:" + strconv.Itoa(port), role: rahRole, out: out}
	if err := s.checkRAHelper(fake); err != nil {
		s.stop()
		return nil, fmt.Sprintf("%s: %v; its output:\n%s", bin, err, tail(out.String(), 2000))
	}
	return s, ""
}

// checkRAHelper waits (10 s at most) for the helper's first token, then
// checks that it lists rahRole and hands out the credentials the fake
// issued to it.
func (s *server) checkRAHelper(fake *rolesanywhere.Server) error {
	deadline := time.Now().Add(10 * time.Second)
	for {
		tok, err := e2e.IMDSToken(context.Background(), e2e.Client, s.base, 21600)
		if err == nil && tok != "" {
			s.tok = tok
			break
		}
		if s.exited() {
			return fmt.Errorf("exited (%s)", s.state())
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("no token at %s within 10s (last: %v)", s.base, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	c := newClient()
	defer c.CloseIdleConnections()
	ls, err := roundTrip(c, http.MethodGet, s.base+e2e.CredentialsPath, s.tok)
	if err != nil {
		return err
	}
	if ls.Status != http.StatusOK || strings.TrimSpace(string(ls.Body)) != rahRole {
		return fmt.Errorf("role listing: status %d body %.100q, want %q", ls.Status, ls.Body, rahRole)
	}
	cr, err := roundTrip(c, http.MethodGet, s.base+e2e.CredentialsPath+rahRole, s.tok)
	if err != nil {
		return err
	}
	issued, ok := fake.Last()
	if !ok {
		return errors.New("the fake Roles Anywhere issued nothing (see its call log in the helper's output)")
	}
	if cr.Status != http.StatusOK || !bytes.Contains(cr.Body, []byte(`"AccessKeyId":"`+issued.AccessKeyID+`"`)) {
		return fmt.Errorf("credentials: status %d, want 200 with the access key id the fake issued (%d bytes)", cr.Status, len(cr.Body))
	}
	return nil
}
