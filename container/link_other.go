//go:build !linux

package container

import (
	"errors"
	"net/netip"
)

// Addresses are the link-local addresses added for the endpoint (Linux
// only).
type Addresses struct{}

// AddAddresses is not supported off Linux.
func AddAddresses(string, []netip.Addr, int) (*Addresses, error) {
	return nil, errors.New("container.link: adding addresses needs Linux")
}

// Added returns nothing.
func (a *Addresses) Added() []netip.Addr { return nil }

// Remove does nothing.
func (a *Addresses) Remove() error { return nil }
