package main

import (
	"net"
	"os"
	"strings"
	"testing"

	"github.com/imdsproxy/imdsproxy/proxy"
)

const accessBase = `role: {arn: "arn:aws:iam::222222222222:role/app"}
identity: {jwt_file: /run/imdsproxy/token.jwt}
`

func TestAccessConfig(t *testing.T) {
	for _, tc := range []struct{ yaml, err string }{
		{"", ""},
		{"access: {}\n", ""},
		{"access: {allow_uids: [0, 1000], deny_uids: [65534], allow_units: [app.service, run-1.scope]}\n", ""},
		{"access: {audit: false}\n", ""},
		{"access: {allow_uids: [-1]}\n", "access.allow_uids[0]"},
		{"access: {deny_uids: [0, 4294967295]}\n", "access.deny_uids[1]"},
		{"access: {allow_uids: [root]}\n", "access.allow_uids[0]"},
		{"access: {allow_units: [app]}\n", "access.allow_units[0]"},
		{"access: {allow_units: [.service]}\n", "access.allow_units[0]"},
		{"access: {allow_units: [a/b.service]}\n", "access.allow_units[0]"},
		{"access: {allow_unit: [a.service]}\n", "unknown key access.allow_unit"},
		{"access: {allow_uids: 0}\n", "access.allow_uids: must be a list"},
	} {
		_, err := parseConfig([]byte(accessBase + tc.yaml))
		switch {
		case tc.err == "" && err != nil:
			t.Errorf("%q: %v", tc.yaml, err)
		case tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err)):
			t.Errorf("%q: error %v, want one naming %s", tc.yaml, err, tc.err)
		}
	}
}

func TestAccessPolicy(t *testing.T) {
	root := proxy.Peer{Known: true, UID: 0, Unit: "cron.service"}
	app := proxy.Peer{Known: true, UID: 1000, Unit: "app.service"}
	other := proxy.Peer{Known: true, UID: 2000}
	unknown := proxy.Peer{}
	for _, tc := range []struct {
		name string
		cfg  AccessConfig
		want [4]bool // root, app, other, unknown
	}{
		{"empty", AccessConfig{}, [4]bool{true, true, true, true}},
		{"deny root", AccessConfig{DenyUIDs: []int{0}}, [4]bool{false, true, true, false}},
		{"allow uid", AccessConfig{AllowUIDs: []int{1000}}, [4]bool{false, true, false, false}},
		{"allow unit", AccessConfig{AllowUnits: []string{"cron.service"}}, [4]bool{true, false, false, false}},
		{"allow both", AccessConfig{AllowUIDs: []int{2000}, AllowUnits: []string{"app.service"}}, [4]bool{false, true, true, false}},
		{"deny wins", AccessConfig{AllowUIDs: []int{1000}, AllowUnits: []string{"app.service"}, DenyUIDs: []int{1000}}, [4]bool{false, false, false, false}},
	} {
		ac := accessControl(tc.cfg)
		if ac == nil {
			t.Fatalf("%s: no access control", tc.name)
		}
		for i, p := range []proxy.Peer{root, app, other, unknown} {
			if got := ac.Allow(p); got != tc.want[i] {
				t.Errorf("%s: Allow(%+v) = %v, want %v", tc.name, p, got, tc.want[i])
			}
		}
	}
	off := false
	if ac := accessControl(AccessConfig{Audit: &off}); ac != nil {
		t.Errorf("audit off and no lists: got %v, want nil", ac)
	}
	if ac := accessControl(AccessConfig{Audit: &off, DenyUIDs: []int{0}}); ac == nil {
		t.Error("audit off with a list: want an access control")
	}
}

// TestAccessIdentify checks the wiring to package peer on a real loopback
// connection of this process.
func TestAccessIdentify(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	s, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	who, err := accessControl(AccessConfig{}).Identify(t.Context(), s)
	if err != nil {
		t.Skipf("sock_diag unavailable: %v", err)
	}
	if !who.Known || who.UID != os.Getuid() || who.PID != os.Getpid() {
		t.Errorf("Identify = %+v, want uid %d pid %d", who, os.Getuid(), os.Getpid())
	}
}
