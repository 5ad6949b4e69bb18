package e2e

import (
	"net/http/httptest"
	"testing"

	"github.com/imdsproxy/imdsproxy/test/fakes/oidc"
	"github.com/imdsproxy/imdsproxy/test/fakes/sts"
)

// Fakes is a fake OIDC issuer and a fake STS that trusts it, each served
// by an httptest server on loopback.
type Fakes struct {
	// Issuer mints the web identity tokens; its URL is set.
	Issuer *oidc.Issuer
	// STS verifies them against Issuer's JWKS; its URL is set.
	STS *sts.Server

	srvs []*httptest.Server
}

// NewFakes starts an issuer with a fresh key and a fake STS configured by
// cfg, whose Issuer it sets. Close stops both.
func NewFakes(cfg sts.Config) (*Fakes, error) {
	iss, err := oidc.New(oidc.Options{})
	if err != nil {
		return nil, err
	}
	f := &Fakes{Issuer: iss}
	issSrv := httptest.NewServer(iss.Handler())
	iss.SetURL(issSrv.URL)
	cfg.Issuer = iss
	f.STS = sts.New(cfg)
	stsSrv := httptest.NewServer(f.STS.Handler())
	f.STS.URL = stsSrv.URL
	f.srvs = []*httptest.Server{stsSrv, issSrv}
	return f, nil
}

// StartFakes is NewFakes for one test: it fails tb on error and closes
// the fakes when tb ends.
func StartFakes(tb testing.TB, cfg sts.Config) *Fakes {
	tb.Helper()
	f, err := NewFakes(cfg)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(f.Close)
	return f
}

// Close releases the requests the fake STS holds (ModeHang, a delay) and
// stops both servers.
func (f *Fakes) Close() {
	f.STS.Close()
	for _, s := range f.srvs {
		s.Close()
	}
}
