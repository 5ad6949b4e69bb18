package access

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
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
			var slot *auditSlot
			for i, want := range tc.want {
				got := m.Get(t.Context(), id, nil, tc.audit, true, nil)
				if got.slot == nil {
					t.Fatalf("request %d: no audit slot", i)
				}
				if i > 0 && tc.want[i-1] == want && got.slot != slot {
					t.Errorf("request %d: a new audit slot for the same identity", i)
				}
				slot, got.slot = got.slot, nil
				if got != want {
					t.Errorf("request %d: %+v, want %+v", i, got, want)
				}
			}
			if id.lookups != tc.lookups || id.procs != tc.processCall {
				t.Errorf("%d lookups, %d Process calls; want %d, %d", id.lookups, id.procs, tc.lookups, tc.processCall)
			}
		})
	}
}

// TestConnClientConcurrent: requests racing on a connection that is not
// identified yet identify it once, and all get that answer and its slot.
// Run with -race: the scripted Identifier's counters are unguarded, so a
// second lookup outside the lock is a data race as well as a count.
func TestConnClientConcurrent(t *testing.T) {
	id := &scriptedID{answers: []func() (peer.Info, error){func() (peer.Info, error) { return peer.Info{UID: 1001, Unit: "app.service"}, nil }}}
	var m ConnClient
	got := make([]Client, 16)
	var wg sync.WaitGroup
	for i := range got {
		wg.Go(func() { got[i] = m.Get(t.Context(), id, nil, true, true, nil) })
	}
	wg.Wait()
	if id.lookups != 1 {
		t.Fatalf("%d lookups, want 1", id.lookups)
	}
	for i, c := range got {
		if c != got[0] || c.Unit != "app.service" || c.slot == nil {
			t.Fatalf("request %d: %+v, want %+v with a slot", i, c, got[0])
		}
	}
}

// auditID is a scriptedID that also identifies for the audit alone: its
// LookupConnForAudit answers with the unit the checked lookup no longer
// confirms (a cgroup removed a moment ago).
type auditID struct {
	scriptedID
	auditLookups int
}

func (a *auditID) LookupConnForAudit(ctx context.Context, conn net.Conn) (peer.Info, error) {
	if _, ok := ctx.Deadline(); !ok {
		return peer.Info{}, errors.New("unbounded")
	}
	a.auditLookups++
	return peer.Info{UID: 1001, Unit: "gone.service"}, nil
}

// TestConnClientAuditOnly: a connection identified for the audit alone
// uses the Identifier's unchecked lookup and is remembered for further
// audit-only requests; a request whose decision depends on the client
// identifies the connection again with the checked lookup, whose answer is
// then kept for both; an Identifier without the audit lookup is asked the
// checked way every time.
func TestConnClientAuditOnly(t *testing.T) {
	checked := func() (peer.Info, error) { return peer.Info{UID: 1001, UnitUnknown: true}, nil }
	id := &auditID{scriptedID: scriptedID{answers: []func() (peer.Info, error){checked, func() (peer.Info, error) {
		return peer.Info{UID: 1001, Unit: "app.service"}, nil
	}}}}
	var m ConnClient
	for i := range 2 {
		if got := m.Get(t.Context(), id, nil, true, false, nil); got.Unit != "gone.service" || got.PID != 42 {
			t.Fatalf("audit-only request %d: %+v, want the unchecked answer with the pid", i, got)
		}
	}
	if id.auditLookups != 1 || id.lookups != 0 {
		t.Fatalf("%d unchecked and %d checked lookups after two audit-only requests, want 1 and 0", id.auditLookups, id.lookups)
	}
	if got := m.Get(t.Context(), id, nil, true, true, nil); !got.UnitUnknown {
		t.Fatalf("deciding request: %+v, want the checked answer (unit unknown)", got)
	}
	if got := m.Get(t.Context(), id, nil, true, true, nil); got.Unit != "app.service" || got.UnitUnknown {
		t.Fatalf("second deciding request: %+v, want app.service (unknown is asked again)", got)
	}
	if got := m.Get(t.Context(), id, nil, true, false, nil); got.Unit != "app.service" {
		t.Fatalf("audit-only after a checked answer: %+v, want the checked answer kept", got)
	}
	if id.auditLookups != 1 || id.lookups != 2 {
		t.Fatalf("%d unchecked and %d checked lookups, want 1 and 2", id.auditLookups, id.lookups)
	}

	plain := &scriptedID{answers: []func() (peer.Info, error){func() (peer.Info, error) { return peer.Info{UID: 7}, nil }}}
	var p ConnClient
	p.Get(t.Context(), plain, nil, true, false, nil)
	p.Get(t.Context(), plain, nil, true, true, nil)
	if plain.lookups != 1 {
		t.Fatalf("an Identifier without the audit lookup: %d lookups, want 1 (its answer is checked)", plain.lookups)
	}
}

// uidID is an Identifier that can also name a connection's uid alone.
type uidID struct {
	scriptedID
	uid      int
	err      error
	bounded  bool
	lookedUp int
}

func (u *uidID) LookupUID(ctx context.Context, _ net.Conn) (int, error) {
	_, u.bounded = ctx.Deadline()
	u.lookedUp++
	return u.uid, u.err
}

// TestConnOwner: a front door shares its connection slots by uid only with
// an Identifier that can name the uid alone; the connections whose uid
// cannot be found share one owner, and every lookup is bounded.
func TestConnOwner(t *testing.T) {
	if ConnOwner(nil) != nil || ConnOwner(&scriptedID{}) != nil {
		t.Fatal("an owner without an Identifier that can look up a uid alone")
	}
	id := &uidID{uid: 1001}
	owner := ConnOwner(id)
	if o, ok := owner(nil); !ok || o != 1001 || !id.bounded {
		t.Errorf("owner = %d, %v (bounded %v); want 1001, true, bounded", o, ok, id.bounded)
	}
	id.err = peer.ErrNotFound
	if o, ok := owner(nil); !ok || o != unknownOwner {
		t.Errorf("a failed lookup: owner %d, %v; want unknownOwner", o, ok)
	}
	if id.lookedUp != 2 {
		t.Errorf("%d lookups, want 2", id.lookedUp)
	}
	// An Identifier that knows the users of subordinate uids: the owner
	// is the user (one share for all of a user's uids).
	mapped := &usersID{uidID: uidID{uid: 100005}, users: map[uint32]uint32{100005: 1000}}
	if o, ok := ConnOwner(mapped)(nil); !ok || o != 1000 {
		t.Errorf("a delegated uid: owner %d, %v; want its user 1000", o, ok)
	}
	mapped.uid = 1002
	if o, ok := ConnOwner(mapped)(nil); !ok || o != 1002 {
		t.Errorf("a uid of its own: owner %d, %v; want 1002", o, ok)
	}
}

// usersID is a uidID that also maps subordinate uids to their users.
type usersID struct {
	uidID
	users map[uint32]uint32
}

func (u *usersID) UserOf(uid uint32) uint32 {
	if user, ok := u.users[uid]; ok {
		return user
	}
	return uid
}
