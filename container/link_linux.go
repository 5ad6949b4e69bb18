package container

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// Addresses are the link-local addresses the daemon added to a link for the
// endpoint's listeners (container.link), and what it must undo at exit:
// remove those addresses, and delete the link when it created it.
type Addresses struct {
	link    string
	index   int
	created bool
	added   []netip.Addr
	netns   int // -1: this thread's network namespace
}

// AddAddresses adds addrs to the link named link, creating it as a dummy
// link (and setting it up) when there is none. An address already there is
// left as it is (and not removed at exit). netns is the network namespace
// to work in (a file descriptor, -1: the current one). Needs CAP_NET_ADMIN.
// On error, whatever was added is removed again.
func AddAddresses(link string, addrs []netip.Addr, netns int) (a *Addresses, err error) {
	a = &Addresses{link: link, netns: netns}
	c, err := a.dial()
	if err != nil {
		return nil, err
	}
	defer c.Close()
	defer func() {
		if err != nil {
			_ = a.remove(c)
			a = nil
		}
	}()
	if a.index, err = linkIndex(c, link); errors.Is(err, errNoLink) {
		if err = do(c, unix.RTM_NEWLINK, netlink.Create|netlink.Excl, newLink(link)); err != nil {
			if errors.Is(err, unix.EOPNOTSUPP) {
				return a, fmt.Errorf("container.link: create dummy link %s: %w (this kernel has no dummy links; use container.link: lo)", link, err)
			}
			return a, fmt.Errorf("container.link: create dummy link %s: %w", link, err)
		}
		a.created = true
		if a.index, err = linkIndex(c, link); err != nil {
			return a, fmt.Errorf("container.link: %s: %w", link, err)
		}
	} else if err != nil {
		return a, fmt.Errorf("container.link: %s: %w", link, err)
	}
	if err = do(c, unix.RTM_NEWLINK, 0, linkUp(a.index)); err != nil {
		return a, fmt.Errorf("container.link: set %s up: %w", link, err)
	}
	have, err := linkAddrs(c, a.index)
	if err != nil {
		return a, fmt.Errorf("container.link: list the addresses of %s: %w", link, err)
	}
	for _, ip := range addrs {
		if have[ip] {
			continue
		}
		if err = do(c, unix.RTM_NEWADDR, netlink.Create|netlink.Excl, addrMsg(a.index, ip)); err != nil {
			return a, fmt.Errorf("container.link: add %s to %s: %w", ip, link, err)
		}
		a.added = append(a.added, ip)
	}
	return a, nil
}

// Added returns the addresses AddAddresses added.
func (a *Addresses) Added() []netip.Addr { return a.added }

// Remove removes the addresses AddAddresses added and deletes the link if
// it created it. Safe to call on a nil *Addresses.
func (a *Addresses) Remove() error {
	if a == nil {
		return nil
	}
	c, err := a.dial()
	if err != nil {
		return err
	}
	defer c.Close()
	return a.remove(c)
}

func (a *Addresses) remove(c *netlink.Conn) error {
	var errs []error
	if a.created {
		if err := do(c, unix.RTM_DELLINK, 0, linkMsg(a.index, 0, 0)); err != nil {
			errs = append(errs, fmt.Errorf("delete link %s: %w", a.link, err))
		}
	} else {
		for _, ip := range a.added {
			if err := do(c, unix.RTM_DELADDR, 0, addrMsg(a.index, ip)); err != nil && !errors.Is(err, unix.EADDRNOTAVAIL) {
				errs = append(errs, fmt.Errorf("remove %s from %s: %w", ip, a.link, err))
			}
		}
	}
	a.added, a.created = nil, false
	return errors.Join(errs...)
}

func (a *Addresses) dial() (*netlink.Conn, error) {
	cfg := &netlink.Config{}
	if a.netns >= 0 {
		cfg.NetNS = a.netns
	}
	c, err := netlink.Dial(unix.NETLINK_ROUTE, cfg)
	if err != nil {
		return nil, fmt.Errorf("container.link: netlink: %w", err)
	}
	return c, nil
}

var errNoLink = errors.New("no such link")

// do sends one request and waits for its acknowledgement.
func do(c *netlink.Conn, typ uint16, flags netlink.HeaderFlags, data []byte) error {
	_, err := c.Execute(netlink.Message{
		Header: netlink.Header{Type: netlink.HeaderType(typ), Flags: netlink.Request | netlink.Acknowledge | flags},
		Data:   data,
	})
	return unwrap(err)
}

// unwrap turns a netlink error into its errno, for errors.Is.
func unwrap(err error) error {
	var oe *netlink.OpError
	if errors.As(err, &oe) && oe.Err != nil {
		return oe.Err
	}
	return err
}

// linkMsg is a struct ifinfomsg.
func linkMsg(index int, flags, change uint32) []byte {
	b := make([]byte, unix.SizeofIfInfomsg)
	b[0] = unix.AF_UNSPEC
	binary.NativeEndian.PutUint32(b[4:], uint32(int32(index)))
	binary.NativeEndian.PutUint32(b[8:], flags)
	binary.NativeEndian.PutUint32(b[12:], change)
	return b
}

// newLink is an RTM_NEWLINK body creating a dummy link named name.
func newLink(name string) []byte {
	ae := netlink.NewAttributeEncoder()
	ae.String(unix.IFLA_IFNAME, name)
	ae.Nested(unix.IFLA_LINKINFO, func(nae *netlink.AttributeEncoder) error {
		nae.String(unix.IFLA_INFO_KIND, "dummy")
		return nil
	})
	attrs, _ := ae.Encode()
	return append(linkMsg(0, 0, 0), attrs...)
}

// linkUp is an RTM_NEWLINK body setting the link up.
func linkUp(index int) []byte { return linkMsg(index, unix.IFF_UP, unix.IFF_UP) }

// linkIndex returns the index of the link named name, errNoLink when there
// is none.
func linkIndex(c *netlink.Conn, name string) (int, error) {
	ae := netlink.NewAttributeEncoder()
	ae.String(unix.IFLA_IFNAME, name)
	attrs, _ := ae.Encode()
	msgs, err := c.Execute(netlink.Message{
		Header: netlink.Header{Type: unix.RTM_GETLINK, Flags: netlink.Request},
		Data:   append(linkMsg(0, 0, 0), attrs...),
	})
	if err != nil {
		if errors.Is(unwrap(err), unix.ENODEV) {
			return 0, errNoLink
		}
		return 0, unwrap(err)
	}
	for _, m := range msgs {
		if len(m.Data) >= unix.SizeofIfInfomsg {
			return int(int32(binary.NativeEndian.Uint32(m.Data[4:]))), nil
		}
	}
	return 0, errNoLink
}

// addrMsg is an RTM_NEWADDR/RTM_DELADDR body for ip as a host address
// (/32, /128) of the link index; IPv6 without duplicate address detection,
// so it can be bound at once.
func addrMsg(index int, ip netip.Addr) []byte {
	b := make([]byte, unix.SizeofIfAddrmsg)
	b[0], b[1] = unix.AF_INET, 32
	if ip.Is6() {
		b[0], b[1] = unix.AF_INET6, 128
		b[2] = unix.IFA_F_NODAD
	}
	binary.NativeEndian.PutUint32(b[4:], uint32(int32(index)))
	ae := netlink.NewAttributeEncoder()
	ae.Bytes(unix.IFA_LOCAL, ip.AsSlice())
	ae.Bytes(unix.IFA_ADDRESS, ip.AsSlice())
	if ip.Is6() {
		ae.Uint32(unix.IFA_FLAGS, unix.IFA_F_NODAD)
	}
	attrs, _ := ae.Encode()
	return append(b, attrs...)
}

// linkAddrs returns the addresses of the link index.
func linkAddrs(c *netlink.Conn, index int) (map[netip.Addr]bool, error) {
	msgs, err := c.Execute(netlink.Message{
		Header: netlink.Header{Type: unix.RTM_GETADDR, Flags: netlink.Request | netlink.Dump},
		Data:   make([]byte, unix.SizeofIfAddrmsg),
	})
	if err != nil {
		return nil, unwrap(err)
	}
	out := map[netip.Addr]bool{}
	for _, m := range msgs {
		if len(m.Data) < unix.SizeofIfAddrmsg || int(int32(binary.NativeEndian.Uint32(m.Data[4:]))) != index {
			continue
		}
		ad, err := netlink.NewAttributeDecoder(m.Data[unix.SizeofIfAddrmsg:])
		if err != nil {
			continue
		}
		for ad.Next() {
			if ad.Type() == unix.IFA_ADDRESS || ad.Type() == unix.IFA_LOCAL {
				if ip, ok := netip.AddrFromSlice(ad.Bytes()); ok {
					out[ip.Unmap()] = true
				}
			}
		}
	}
	return out, nil
}
