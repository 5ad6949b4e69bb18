package access

import (
	"strings"
	"testing"

	"github.com/imdsproxy/imdsproxy/config"
	"github.com/imdsproxy/imdsproxy/creds"
)

// TestWorkloadKeyCarriesSubject: a workload's subject is part of its key's
// role, so the exchange is handed it (and fetches with that subject's token)
// and two workloads never share a cache entry through it.
func TestWorkloadKeyCarriesSubject(t *testing.T) {
	list := []Workload{
		{UID: uid(1001), Subject: "billing", Role: config.Role{ARN: "arn:aws:iam::111122223333:role/billing"}},
		{Unit: "reports.service", Role: config.Role{ARN: "arn:aws:iam::111122223333:role/reports", SessionName: "rep"}},
	}
	if err := ValidateWorkloads(list, "app", 0); err != nil {
		t.Fatal(err)
	}
	k := list[0].Key("i-0123", nil)
	want := creds.Role{Name: "billing", ARN: "arn:aws:iam::111122223333:role/billing", SessionName: "i-0123", Duration: DefaultWorkloadDuration, Subject: "billing"}
	if k.Kind != creds.KindWorkload || k.Role != want {
		t.Errorf("key = %+v, want role %+v", k, want)
	}
	if r := list[1].Key("i-0123", nil).Role; r.Subject != "" || r.SessionName != "rep" {
		t.Errorf("role = %+v, want no subject and session rep", r)
	}
}

func TestValidateWorkloadSubjects(t *testing.T) {
	role := func(n string) config.Role { return config.Role{ARN: "arn:aws:iam::111122223333:role/" + n} }
	for _, tc := range []struct {
		name string
		list []Workload
		want string // "" accepted
	}{
		{"ok", []Workload{{UID: uid(1), Subject: "app:billing@prod/eu-1", Role: role("a")}}, ""},
		{"max length", []Workload{{UID: uid(1), Subject: "a" + strings.Repeat("b", creds.MaxSubject-1), Role: role("a")}}, ""},
		{"too long", []Workload{{UID: uid(1), Subject: "a" + strings.Repeat("b", creds.MaxSubject), Role: role("a")}}, "workloads[0].subject"},
		{"space", []Workload{{UID: uid(1), Subject: "a b", Role: role("a")}}, "workloads[0].subject"},
		{"leading dot", []Workload{{UID: uid(1), Subject: ".a", Role: role("a")}}, "workloads[0].subject"},
		{"newline", []Workload{{UID: uid(1), Subject: "a\nb", Role: role("a")}}, "workloads[0].subject"},
		{"shared", []Workload{{UID: uid(1), Subject: "s", Role: role("a")}, {UID: uid(2), Subject: "s", Role: role("b")}}, "workloads[1].subject"},
	} {
		err := ValidateWorkloads(tc.list, "host", 0)
		if tc.want == "" && err != nil || tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)) {
			t.Errorf("%s: err = %v, want %q", tc.name, err, tc.want)
		}
	}
}
