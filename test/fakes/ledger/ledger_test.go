package ledger

import (
	"sync"
	"testing"
)

type cred struct{ ak, secret string }

func (c cred) KeyID() string { return c.ak }

func TestLedger(t *testing.T) {
	var l Ledger[cred]
	if _, ok := l.Last(); ok || len(l.All()) != 0 {
		t.Fatal("an empty ledger has credentials")
	}
	var wg sync.WaitGroup
	for _, ak := range []string{"A", "B"} {
		wg.Go(func() { l.Add(cred{ak, "s" + ak}) })
	}
	wg.Wait()
	l.Add(cred{"C", "sC"})
	if got := l.All(); len(got) != 3 || got[2].ak != "C" {
		t.Fatalf("All = %v", got)
	}
	if c, ok := l.Last(); !ok || c.ak != "C" {
		t.Fatalf("Last = %v, %v", c, ok)
	}
	if c, ok := l.Find("B"); !ok || c.secret != "sB" {
		t.Fatalf("Find(B) = %v, %v", c, ok)
	}
	if _, ok := l.Find("Z"); ok {
		t.Fatal("Find of an id never issued succeeded")
	}
	all := l.All()
	all[0].ak = "changed"
	if _, ok := l.Find("changed"); ok {
		t.Fatal("All returned the ledger's own slice")
	}
	l.Reset()
	if _, ok := l.Last(); ok {
		t.Fatal("Reset kept credentials")
	}
}
