package container

import (
	"strings"
	"testing"
	"time"

	"github.com/imdsproxy/imdsproxy/access"
	"github.com/imdsproxy/imdsproxy/config"
)

func TestSectionValidate(t *testing.T) {
	ok := DefaultSection()
	ok.Enabled = true
	for _, tc := range []struct {
		name   string
		modify func(*Section)
		err    string
	}{
		{"defaults", func(*Section) {}, ""},
		{"link-local listeners", func(s *Section) { s.Listen = []string{"127.0.0.1:8171", "169.254.170.23:80", "[fd00:ec2::23]:80"} }, ""},
		{"IPv6 loopback", func(s *Section) { s.Listen = []string{"[::1]:8171"} }, ""},
		{"no listener", func(s *Section) { s.Listen = nil }, "container.listen: 0 addresses"},
		{"a wildcard", func(s *Section) { s.Listen = []string{"0.0.0.0:8171"} }, "container.listen[0]: 0.0.0.0"},
		{"another address", func(s *Section) { s.Listen = []string{"10.0.0.1:80"} }, "listens only on loopback"},
		{"ECS's address", func(s *Section) { s.Listen = []string{"169.254.170.2:80"} }, "container.listen[0]"},
		{"a host name", func(s *Section) { s.Listen = []string{"localhost:8171"} }, "not an IP:port"},
		{"port 0", func(s *Section) { s.Listen = []string{"127.0.0.1:0"} }, "not an IP:port"},
		{"no link", func(s *Section) { s.Link = "" }, ""},
		{"lo", func(s *Section) { s.Link = "lo" }, ""},
		{"bad link", func(s *Section) { s.Link = "a/b" }, "container.link"},
		{"long link", func(s *Section) { s.Link = strings.Repeat("a", 16) }, "container.link"},
		{"relative path", func(s *Section) { s.Path = "v1/credentials" }, "container.path"},
		{"dot segment", func(s *Section) { s.Path = "/v1/../x" }, "container.path"},
		{"query", func(s *Section) { s.Path = "/v1?x" }, "container.path"},
		{"root path", func(s *Section) { s.Path = "/" }, "container.path"},
		{"relative token dir", func(s *Section) { s.TokenDir = "run/x" }, "container.token_dir"},
		{"root token dir", func(s *Section) { s.TokenDir = "/" }, "container.token_dir"},
		{"unclean token dir", func(s *Section) { s.TokenDir = "/run/x/" }, "container.token_dir"},
		{"short interval", func(s *Section) { s.RotateInterval = config.Duration(time.Second) }, "container.rotate_interval"},
		{"long overlap", func(s *Section) { s.RotateOverlap = config.Duration(40 * time.Minute) }, "container.rotate_overlap"},
		{"zero overlap", func(s *Section) { s.RotateOverlap = 0 }, "container.rotate_overlap"},
		{"owner of a unit", func(s *Section) { s.TokenOwners = map[string]int{"backup.service": 1000} }, ""},
		{"owner of no workload", func(s *Section) { s.TokenOwners = map[string]int{"web.service": 1000} }, "container.token_owners"},
		{"owner of a uid workload", func(s *Section) { s.TokenOwners = map[string]int{"uid:64101": 1000} }, "container.token_owners"},
		{"bad owner uid", func(s *Section) { s.TokenOwners = map[string]int{"backup.service": -1} }, "container.token_owners.backup.service"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := ok
			s.Listen = append([]string(nil), ok.Listen...)
			tc.modify(&s)
			err := s.Validate(testWorkloads)
			if tc.err == "" && err != nil || tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err)) {
				t.Fatalf("Validate = %v, want %q", err, tc.err)
			}
		})
	}
	s := ok
	if err := s.Validate(nil); err == nil || !strings.Contains(err.Error(), "container.enabled") {
		t.Errorf("enabled without workloads: %v", err)
	}
	s.Enabled = false
	if err := s.Validate(nil); err != nil {
		t.Errorf("disabled without workloads: %v", err)
	}
}

func TestSectionDerived(t *testing.T) {
	s := DefaultSection()
	s.Listen = []string{"127.0.0.1:8171", "169.254.170.23:80", "[fd00:ec2::23]:80", "169.254.170.23:8080"}
	s.TokenOwners = map[string]int{"backup.service": 1000}
	if got := s.URL(false); got != "http://127.0.0.1:8171/v1/credentials" {
		t.Errorf("URL(false) = %q", got)
	}
	if got := s.URL(true); got != "http://169.254.170.23/v1/credentials" {
		t.Errorf("URL(true) = %q", got)
	}
	if got := s.LinkLocal(); len(got) != 2 || got[0] != LinkLocalIPv4 || got[1] != LinkLocalIPv6 {
		t.Errorf("LinkLocal = %v", got)
	}
	if got := s.Owners(testWorkloads); got["uid:64101"] != 64101 || got["backup.service"] != 1000 {
		t.Errorf("Owners = %v", got)
	}
	if got := s.TokenFile("uid:64101"); got != "/run/imdsproxy/container/uid-64101/token" {
		t.Errorf("TokenFile = %q", got)
	}
	v6 := DefaultSection()
	v6.Listen = []string{"[fd00:ec2::23]:80"}
	if got := v6.URL(true); got != "http://[fd00:ec2::23]/v1/credentials" {
		t.Errorf("IPv6 URL = %q", got)
	}
	if got := v6.URL(false); got != "" {
		t.Errorf("no loopback: URL(false) = %q", got)
	}
}

func TestEnvRendering(t *testing.T) {
	s := DefaultSection()
	s.Listen = []string{"127.0.0.1:8171", "169.254.170.23:80"}
	w, ok := FindWorkload(testWorkloads, "backup.service")
	if !ok {
		t.Fatal("FindWorkload by unit")
	}
	if w2, ok := FindWorkload(testWorkloads, "billing"); !ok || w2.ID() != "uid:64101" {
		t.Error("FindWorkload by role name")
	}
	if _, ok := FindWorkload(testWorkloads, "nope"); ok {
		t.Error("FindWorkload found an unknown name")
	}
	dropIn, err := s.SystemdDropIn(w)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"[Service]\n",
		"\nEnvironment=AWS_CONTAINER_CREDENTIALS_FULL_URI=http://127.0.0.1:8171/v1/credentials\n",
		"\nEnvironment=AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE=/run/imdsproxy/container/backup.service/token\n",
		"/etc/systemd/system/backup.service.d/imdsproxy.conf",
	} {
		if !strings.Contains(dropIn, want) {
			t.Errorf("drop-in lacks %q:\n%s", want, dropIn)
		}
	}
	docker, err := s.DockerArgs(w)
	if err != nil {
		t.Fatal(err)
	}
	want := "--env AWS_CONTAINER_CREDENTIALS_FULL_URI=http://169.254.170.23/v1/credentials \\\n" +
		"--env AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE=/run/imdsproxy-token/token \\\n" +
		"--mount type=bind,src=/run/imdsproxy/container/backup.service,dst=/run/imdsproxy-token,readonly\n"
	if docker != want {
		t.Errorf("docker lines:\n%s\nwant:\n%s", docker, want)
	}
	s.Listen = []string{"127.0.0.1:8171"}
	if _, err := s.DockerArgs(w); err == nil || !strings.Contains(err.Error(), "link-local") {
		t.Errorf("docker lines without a link-local listener: %v", err)
	}
	_ = access.Workload{}
}
