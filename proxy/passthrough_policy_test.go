package proxy

import (
	"errors"
	"net/http"
	"testing"

	"github.com/imdsproxy/imdsproxy/access"
	"github.com/imdsproxy/imdsproxy/peer"
)

// TestPassthroughPolicy: with identity material protected (imds.passthrough,
// as when the daemon uses the instance identity or tells clients apart), the
// identity document, its signatures and identity-credentials are refused to
// every process but the allowed ones, through every spelling of the path;
// other metadata is forwarded; a client that could not be identified is told
// to retry; the refusal is counted.
func TestPassthroughPolicy(t *testing.T) {
	f := &fakeIMDS{}
	u := startIMDS(t, f)
	sec := access.PassthroughSection{Deny: []string{"user-data"}, AllowUIDs: []int{1001}, AllowUnits: []string{"agent.service"}}
	if err := sec.Validate(); err != nil {
		t.Fatal(err)
	}
	pc := defaultPlanConfig()
	pc.Passthrough = sec.Resolve(true, false)
	e := newEnv(t, Config{Upstream: u, Plan: planOf(t, pc)})
	base, client := serveEnv(t, e)

	protected := []string{
		"/latest/dynamic/instance-identity/document",
		"/latest/dynamic/instance-identity/pkcs7",
		"/latest/dynamic/instance-identity/signature",
		"/latest/dynamic/instance-identity/rsa2048",
		"/latest/dynamic/instance-identity/",
		"/latest/dynamic/instance-identity",
		"/2021-01-03/dynamic/instance-identity/document",
		"/latest/dynamic/Instance-Identity/document",
		"//latest//dynamic//instance-identity//document",
		"/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
		"/latest/user-data",
	}
	for _, tc := range []struct {
		name string
		who  peer.Info
		err  error
		want int
	}{
		{"another uid", peer.Info{UID: 1004}, nil, http.StatusForbidden},
		{"a workload unit not allowed", peer.Info{UID: 1004, Unit: "app.service"}, nil, http.StatusForbidden},
		{"not local", peer.Info{}, peer.ErrNotFound, http.StatusForbidden},
		{"unresolved", peer.Info{}, errors.New("timeout"), http.StatusServiceUnavailable},
		{"allowed uid", peer.Info{UID: 1001}, nil, http.StatusOK},
		{"allowed unit", peer.Info{UID: 1004, Unit: "agent.service"}, nil, http.StatusOK},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e.id.set(tc.who, tc.err)
			client.CloseIdleConnections() // a new connection: identified anew
			for _, p := range protected {
				r := fetch(t, client, http.MethodGet, base+p, "")
				forwarded := r.code != http.StatusForbidden && r.code != http.StatusServiceUnavailable
				if forwarded != (tc.want == http.StatusOK) || (!forwarded && r.code != tc.want) {
					t.Errorf("GET %s = %d %q, want %d", p, r.code, r.body, tc.want)
				}
				if tc.want == http.StatusForbidden && r.body != pathDeniedBody {
					t.Errorf("GET %s: body %q", p, r.body)
				}
			}
			if r := fetch(t, client, http.MethodGet, base+"/latest/meta-data/instance-id", ""); r.code != http.StatusOK {
				t.Errorf("instance-id = %d: unprotected metadata must be forwarded", r.code)
			}
		})
	}
	if got := metricValue(t, e.reg, "imdsproxy_passthrough_refused_total", map[string]string{"outcome": "deny"}); got != float64(3*len(protected)) {
		t.Errorf("refused{deny} = %v, want %d", got, 3*len(protected))
	}
	if got := metricValue(t, e.reg, "imdsproxy_passthrough_refused_total", map[string]string{"outcome": "retry"}); got != float64(len(protected)) {
		t.Errorf("refused{retry} = %v, want %d", got, len(protected))
	}
}

// TestPassthroughPolicyOff: with nothing protected (identity: allow, no
// deny), the identity document is forwarded to anyone, and no client is
// identified for it.
func TestPassthroughPolicyOff(t *testing.T) {
	f := &fakeIMDS{}
	u := startIMDS(t, f)
	sec := access.PassthroughSection{Identity: "allow"}
	if err := sec.Validate(); err != nil {
		t.Fatal(err)
	}
	pc := defaultPlanConfig()
	pc.Passthrough = sec.Resolve(true, true)
	e := newEnv(t, Config{Upstream: u, Plan: planOf(t, pc)})
	e.id.set(peer.Info{UID: 1004}, nil)
	if w := e.do(http.MethodGet, "/latest/dynamic/instance-identity/document", nil); w.Code == http.StatusForbidden {
		t.Fatalf("identity: allow: refused")
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.paths) == 0 {
		t.Fatal("identity: allow: not forwarded")
	}
}

func TestPassthroughSection(t *testing.T) {
	for _, tc := range []struct {
		sec                      access.PassthroughSection
		usesIdentity, tellsApart bool
		protected                bool
	}{
		{access.PassthroughSection{}, false, false, false},
		{access.PassthroughSection{}, true, false, true},
		{access.PassthroughSection{}, false, true, true},
		{access.PassthroughSection{Identity: "deny"}, false, false, true},
		{access.PassthroughSection{Identity: "allow"}, true, true, false},
	} {
		s := tc.sec
		if err := s.Validate(); err != nil {
			t.Fatal(err)
		}
		got := s.Resolve(tc.usesIdentity, tc.tellsApart).Protected("/latest/dynamic/instance-identity/document")
		if got != tc.protected {
			t.Errorf("%+v uses %v apart %v: protected %v, want %v", tc.sec, tc.usesIdentity, tc.tellsApart, got, tc.protected)
		}
	}
	for _, bad := range []access.PassthroughSection{{Identity: "maybe"}, {Deny: []string{"../x"}}, {Deny: []string{"a?b"}},
		{AllowUIDs: []int{-1}}, {AllowUnits: []string{"x"}}} {
		if err := bad.Validate(); err == nil {
			t.Errorf("%+v accepted", bad)
		}
	}
}

// TestPassthroughOnlyVersionedPaths: the protected paths and the iam block
// are recognised after the version segment, so a path without one — which
// the real IMDS might answer — must not be forwarded, or a process refused
// /latest/dynamic/instance-identity/document could read it as
// /dynamic/instance-identity/document with the daemon's token. Such paths
// are 404 and never reach upstream; "/" (the version listing), "latest",
// "1.0" and dated versions still pass through.
func TestPassthroughOnlyVersionedPaths(t *testing.T) {
	f := &fakeIMDS{}
	u := startIMDS(t, f)
	pc := defaultPlanConfig()
	sec := access.PassthroughSection{}
	if err := sec.Validate(); err != nil {
		t.Fatal(err)
	}
	pc.Passthrough = sec.Resolve(true, true) // identity material refused to everyone
	e := newEnv(t, Config{Upstream: u, Plan: planOf(t, pc)})
	base, client := serveEnv(t, e)
	e.id.set(peer.Info{UID: 1004}, nil) // a local process, not allowed
	forwarded := func() int {
		f.mu.Lock()
		defer f.mu.Unlock()
		return len(f.paths)
	}
	for _, p := range []string{
		"/dynamic/instance-identity/document",
		"/dynamic/instance-identity/pkcs7",
		"/meta-data/iam/security-credentials/",
		"/meta-data/iam/security-credentials/role",
		"/meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
		"/Latest/dynamic/instance-identity/document",
		"/2021-7-15/dynamic/instance-identity/document",
		"/x/meta-data/iam/security-credentials/",
		"/user-data",
	} {
		before := forwarded()
		if r := fetch(t, client, http.MethodGet, base+p, ""); r.code != http.StatusNotFound {
			t.Errorf("GET %s: %d %q, want 404", p, r.code, r.body)
		}
		if forwarded() != before {
			t.Errorf("GET %s was forwarded to the real IMDS", p)
		}
	}
	if r := fetch(t, client, http.MethodGet, base+"/latest/dynamic/instance-identity/document", ""); r.code != http.StatusForbidden {
		t.Errorf("the versioned protected path: %d, want 403", r.code)
	}
	for _, p := range []string{"/", "/latest/meta-data/instance-id", "/1.0/meta-data/instance-id", "/2021-07-15/meta-data/instance-id"} {
		before := forwarded()
		fetch(t, client, http.MethodGet, base+p, "") // the fake answers what it knows
		if forwarded() != before+1 {
			t.Errorf("GET %s was not forwarded", p)
		}
	}
}
