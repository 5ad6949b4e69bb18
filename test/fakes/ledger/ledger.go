// Package ledger keeps what a fake credential service issued, so that a test
// can check that a client got exactly that: the record-keeping the STS,
// Roles Anywhere and federation fakes share.
package ledger

import "sync"

// Credential is one issued credential: KeyID is its access key id.
type Credential interface{ KeyID() string }

// Ledger is the list of credentials of type T a fake issued, oldest first.
// The zero value is empty and ready; all methods are safe for concurrent
// use.
type Ledger[T Credential] struct {
	mu    sync.Mutex
	items []T
}

// Add records v.
func (l *Ledger[T]) Add(v T) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.items = append(l.items, v)
}

// All returns every credential issued so far, oldest first.
func (l *Ledger[T]) All() []T {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]T(nil), l.items...)
}

// Last returns the most recently issued credential, and false if none was.
func (l *Ledger[T]) Last() (T, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.items) == 0 {
		var zero T
		return zero, false
	}
	return l.items[len(l.items)-1], true
}

// Find returns the issued credential with the access key id, if any.
func (l *Ledger[T]) Find(accessKeyID string) (T, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, v := range l.items {
		if v.KeyID() == accessKeyID {
			return v, true
		}
	}
	var zero T
	return zero, false
}

// Reset forgets every credential.
func (l *Ledger[T]) Reset() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.items = nil
}
