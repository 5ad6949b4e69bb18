package access

import (
	"context"
	"errors"
	"fmt"
	"net"
	"testing"

	"github.com/imdsproxy/imdsproxy/peer"
)

// scriptedID answers LookupConn from a script, one answer per call.
type scriptedID struct {
	answers []func() (peer.Info, error)
	lookups int
	procs   int
}

func (s *scriptedID) LookupConn(ctx context.Context, conn net.Conn) (peer.Info, error) {
	if _, ok := ctx.Deadline(); !ok {
		return peer.Info{}, errors.New("unbounded")
	}
	a := s.answers[min(s.lookups, len(s.answers)-1)]
	s.lookups++
	return a()
}

func (s *scriptedID) Process(_ context.Context, info peer.Info) peer.Info {
	s.procs++
	info.PID, info.Exe, info.Unit = 42, "/usr/bin/app", "from-proc.service"
	return info
}

// TestConnClient: a connection is identified once; an unresolved client or
// one whose unit is unknown is asked again on the next request; the pid and
// exe come from Process only with the audit, and a unit from /proc never
// replaces the kernel's.
func TestConnClient(t *testing.T) {
	ok := func() (peer.Info, error) { return peer.Info{UID: 1001, Unit: "app.service"}, nil }
	unknown := func() (peer.Info, error) { return peer.Info{UID: 1001, UnitUnknown: true}, nil }
	failed := func() (peer.Info, error) { return peer.Info{}, fmt.Errorf("sock_diag: %w", context.DeadlineExceeded) }
	remote := func() (peer.Info, error) { return peer.Info{}, fmt.Errorf("lookup: %w", peer.ErrNotFound) }
	for _, tc := range []struct {
		name        string
		answers     []func() (peer.Info, error)
		audit       bool
		want        []Client
		lookups     int
		processCall int
	}{
		{"identified once", []func() (peer.Info, error){ok}, false,
			[]Client{{Local: true, Info: peer.Info{UID: 1001, Unit: "app.service"}}, {Local: true, Info: peer.Info{UID: 1001, Unit: "app.service"}}}, 1, 0},
		{"audit adds pid and exe only", []func() (peer.Info, error){ok}, true,
			[]Client{{Local: true, Info: peer.Info{UID: 1001, Unit: "app.service", PID: 42, Exe: "/usr/bin/app"}}}, 1, 1},
		{"unresolved asked again", []func() (peer.Info, error){failed, ok}, false,
			[]Client{{Unresolved: true}, {Local: true, Info: peer.Info{UID: 1001, Unit: "app.service"}}, {Local: true, Info: peer.Info{UID: 1001, Unit: "app.service"}}}, 2, 0},
		{"unit unknown asked again", []func() (peer.Info, error){unknown, ok}, false,
			[]Client{{Local: true, Info: peer.Info{UID: 1001, UnitUnknown: true}}, {Local: true, Info: peer.Info{UID: 1001, Unit: "app.service"}}}, 2, 0},
		{"another namespace remembered", []func() (peer.Info, error){remote, ok}, true,
			[]Client{{}, {}}, 1, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			id := &scriptedID{answers: tc.answers}
			var m ConnClient
			for i, want := range tc.want {
				if got := m.Get(t.Context(), id, nil, tc.audit, nil); got != want {
					t.Errorf("request %d: %+v, want %+v", i, got, want)
				}
			}
			if id.lookups != tc.lookups || id.procs != tc.processCall {
				t.Errorf("%d lookups, %d Process calls; want %d, %d", id.lookups, id.procs, tc.lookups, tc.processCall)
			}
		})
	}
}
