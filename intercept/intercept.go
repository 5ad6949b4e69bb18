// Package intercept installs, checks and removes the nftables rules that send
// local connections for the instance metadata service (169.254.169.254:80 and
// [fd00:ec2::254]:80) to the imdsproxy daemon instead.
//
// Everything lives in one table of our own, "inet imdsproxy":
//
//	table inet imdsproxy {
//	  chain output {      # locally generated connections
//	    type nat hook output priority -110; policy accept;
//	    meta nfproto ipv4 meta l4proto tcp ip daddr 169.254.169.254 tcp dport 80 meta skuid != UID redirect to :PORT
//	    meta nfproto ipv6 meta l4proto tcp ip6 daddr fd00:ec2::254 tcp dport 80 meta skuid != UID redirect to :PORT6
//	  }
//	  chain prerouting {  # only with Bridges: connections from local containers
//	    type nat hook prerouting priority -110; policy accept;
//	    iifname "docker0" meta nfproto ipv4 meta l4proto tcp ip daddr 169.254.169.254 tcp dport 80 redirect to :PORT
//	    …
//	  }
//	}
//
// Priority -110 runs before the standard destination NAT (-100), so no other
// NAT rule sees the metadata address first. The daemon's own uid (ExemptUID)
// is not redirected, so the daemon reaches the real IMDS. A redirect in the
// output hook delivers to 127.0.0.1:PORT (IPv4) and [::1]:PORT6 (IPv6); in
// the prerouting hook to the address of the incoming interface.
//
// Install replaces the whole table in one atomic netlink batch, so installing
// twice leaves one set of rules and there is no instant without rules. Remove
// deletes the table and nothing else. Check compares what the kernel holds
// with what Install would write. Every operation needs CAP_NET_ADMIN in the
// network namespace.
package intercept

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"reflect"
	"regexp"
	"slices"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// TableName is the name of the nftables table of family inet that holds every
// rule this package writes.
const TableName = "imdsproxy"

// Priority is the priority of our NAT chains: before the standard dstnat (-100).
const Priority = -110

// The metadata service addresses and port that are redirected.
var (
	IMDSv4 = netip.MustParseAddr("169.254.169.254")
	IMDSv6 = netip.MustParseAddr("fd00:ec2::254")
)

// IMDSPort is the TCP port of the metadata service.
const IMDSPort = 80

// Config says where to redirect and whom to leave alone. The zero value is
// not valid: Port is required.
type Config struct {
	// Port is the daemon's IPv4 IMDS port: connections to 169.254.169.254:80
	// from local processes go to 127.0.0.1:Port. Required.
	Port uint16
	// Port6 is the daemon's IPv6 IMDS port: connections to [fd00:ec2::254]:80
	// go to [::1]:Port6. Zero: IPv6 is not redirected.
	Port6 uint16
	// ExemptUID is the uid whose connections are never redirected: the
	// daemon's own, so it reaches the real IMDS.
	ExemptUID uint32
	// Bridges names interfaces (for example docker0) whose incoming
	// connections to the metadata addresses are redirected too, to the
	// interface's own address on Port (and Port6). Optional.
	Bridges []string
}

var ifnameRE = regexp.MustCompile(`^[A-Za-z0-9_.:@+-]{1,15}$`)

// Validate reports whether c can be installed.
func (c Config) Validate() error {
	if c.Port == 0 {
		return errors.New("intercept: port is required")
	}
	for _, b := range c.Bridges {
		if !ifnameRE.MatchString(b) {
			return fmt.Errorf("intercept: bridge %q is not an interface name (1 to 15 of A-Za-z0-9_.:@+-)", b)
		}
	}
	return nil
}

// State is what Check found.
type State int

// The states of our table.
const (
	// Absent: the table does not exist; nothing is redirected.
	Absent State = iota
	// Present: the table holds exactly the expected chains and rules.
	Present
	// Drifted: the table exists but differs from what Install writes.
	Drifted
)

func (s State) String() string {
	switch s {
	case Absent:
		return "absent"
	case Present:
		return "present"
	case Drifted:
		return "drifted"
	}
	return fmt.Sprintf("State(%d)", int(s))
}

// Status is the result of Check: the state and, when Drifted, what differs.
type Status struct {
	State  State
	Detail string
}

// Rules manages our table in one network namespace. It holds no open socket
// between calls; its methods are safe for concurrent use (each call uses a
// connection of its own).
type Rules struct {
	cfg   Config
	netns int // -1: the caller's namespace
}

// Option changes how Rules reaches the kernel.
type Option func(*Rules)

// WithNetNS makes Rules operate in the network namespace referred to by fd (an
// open /run/netns/NAME or /proc/PID/ns/net) instead of the caller's.
func WithNetNS(fd int) Option { return func(r *Rules) { r.netns = fd } }

// New validates cfg and returns the Rules for it.
func New(cfg Config, opts ...Option) (*Rules, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	cfg.Bridges = slices.Clone(cfg.Bridges)
	r := &Rules{cfg: cfg, netns: -1}
	for _, o := range opts {
		o(r)
	}
	return r, nil
}

// Config returns the configuration the rules are built from.
func (r *Rules) Config() Config {
	c := r.cfg
	c.Bridges = slices.Clone(c.Bridges)
	return c
}

func (r *Rules) conn() (*nftables.Conn, error) {
	var opts []nftables.ConnOption
	if r.netns >= 0 {
		opts = append(opts, nftables.WithNetNSFd(r.netns))
	}
	c, err := nftables.New(opts...)
	if err != nil {
		return nil, fmt.Errorf("intercept: netlink: %w", err)
	}
	return c, nil
}

func table() *nftables.Table {
	return &nftables.Table{Name: TableName, Family: nftables.TableFamilyINet}
}

// Install writes our table with the expected rules, replacing whatever the
// table held, in one atomic batch. Other tables are not touched.
func (r *Rules) Install() error {
	c, err := r.conn()
	if err != nil {
		return err
	}
	t := table()
	// add (no-op if present) + delete + add: one transaction that works
	// whether or not the table exists, and never leaves a gap.
	c.AddTable(t)
	c.DelTable(t)
	c.AddTable(t)
	for _, ch := range r.expected() {
		ch.chain.Table = t
		c.AddChain(ch.chain)
		for _, exprs := range ch.rules {
			c.AddRule(&nftables.Rule{Table: t, Chain: ch.chain, Exprs: exprs})
		}
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("intercept: install table inet %s: %w", TableName, err)
	}
	return nil
}

// Remove deletes our table if it exists. It reports whether there was one.
func (r *Rules) Remove() (bool, error) {
	c, err := r.conn()
	if err != nil {
		return false, err
	}
	exists, err := tableExists(c)
	if err != nil || !exists {
		return false, err
	}
	c.DelTable(table())
	if err := c.Flush(); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return false, nil // removed concurrently
		}
		return false, fmt.Errorf("intercept: remove table inet %s: %w", TableName, err)
	}
	return true, nil
}

func tableExists(c *nftables.Conn) (bool, error) {
	ts, err := c.ListTablesOfFamily(nftables.TableFamilyINet)
	if err != nil {
		return false, fmt.Errorf("intercept: list tables: %w", err)
	}
	for _, t := range ts {
		if t.Name == TableName {
			return true, nil
		}
	}
	return false, nil
}

// Check compares our table in the kernel with what Install writes.
func (r *Rules) Check() (Status, error) {
	c, err := r.conn()
	if err != nil {
		return Status{}, err
	}
	exists, err := tableExists(c)
	if err != nil {
		return Status{}, err
	}
	if !exists {
		return Status{State: Absent}, nil
	}
	t := table()
	chains, err := c.ListChainsOfTableFamily(nftables.TableFamilyINet)
	if err != nil {
		return Status{}, fmt.Errorf("intercept: list chains: %w", err)
	}
	got := map[string]*nftables.Chain{}
	for _, ch := range chains {
		if ch.Table != nil && ch.Table.Name == TableName {
			got[ch.Name] = ch
		}
	}
	want := r.expected()
	if len(got) != len(want) {
		return drifted("table has %d chains, want %d", len(got), len(want)), nil
	}
	for _, w := range want {
		g, ok := got[w.chain.Name]
		if !ok {
			return drifted("chain %s is missing", w.chain.Name), nil
		}
		if d := chainDiff(g, w.chain); d != "" {
			return drifted("chain %s: %s", w.chain.Name, d), nil
		}
		rules, err := c.GetRules(t, g)
		if err != nil {
			return Status{}, fmt.Errorf("intercept: list rules of chain %s: %w", w.chain.Name, err)
		}
		if len(rules) != len(w.rules) {
			return drifted("chain %s has %d rules, want %d", w.chain.Name, len(rules), len(w.rules)), nil
		}
		for i, rule := range rules {
			if !reflect.DeepEqual(rule.Exprs, w.rules[i]) {
				return drifted("chain %s: rule %d differs", w.chain.Name, i+1), nil
			}
		}
	}
	return Status{State: Present}, nil
}

func drifted(format string, args ...any) Status {
	return Status{State: Drifted, Detail: fmt.Sprintf(format, args...)}
}

func chainDiff(got, want *nftables.Chain) string {
	switch {
	case got.Type != want.Type:
		return fmt.Sprintf("type %q, want %q", got.Type, want.Type)
	case got.Hooknum == nil || *got.Hooknum != *want.Hooknum:
		return "wrong hook"
	case got.Priority == nil || *got.Priority != *want.Priority:
		return "wrong priority"
	case got.Policy != nil && *got.Policy != nftables.ChainPolicyAccept:
		return "policy is not accept"
	}
	return ""
}

// Ensure installs the rules unless Check finds them present. It reports the
// state found before any repair.
func (r *Rules) Ensure() (Status, error) {
	st, err := r.Check()
	if err != nil {
		return st, err
	}
	if st.State == Present {
		return st, nil
	}
	return st, r.Install()
}

type chainSpec struct {
	chain *nftables.Chain
	rules [][]expr.Any
}

// expected returns the chains and rules Install writes, in order.
func (r *Rules) expected() []chainSpec {
	accept := nftables.ChainPolicyAccept
	out := chainSpec{chain: &nftables.Chain{
		Name: "output", Type: nftables.ChainTypeNAT, Hooknum: nftables.ChainHookOutput,
		Priority: nftables.ChainPriorityRef(Priority), Policy: &accept,
	}}
	uid := binary.NativeEndian.AppendUint32(nil, r.cfg.ExemptUID)
	exempt := []expr.Any{
		&expr.Meta{Key: expr.MetaKeySKUID, Register: 1},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: uid},
	}
	out.rules = append(out.rules, redirectRule(nil, exempt, IMDSv4, r.cfg.Port))
	if r.cfg.Port6 != 0 {
		out.rules = append(out.rules, redirectRule(nil, exempt, IMDSv6, r.cfg.Port6))
	}
	specs := []chainSpec{out}
	if len(r.cfg.Bridges) > 0 {
		pre := chainSpec{chain: &nftables.Chain{
			Name: "prerouting", Type: nftables.ChainTypeNAT, Hooknum: nftables.ChainHookPrerouting,
			Priority: nftables.ChainPriorityRef(Priority), Policy: &accept,
		}}
		for _, b := range r.cfg.Bridges {
			iif := []expr.Any{
				&expr.Meta{Key: expr.MetaKeyIIFNAME, Register: 1},
				&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: ifname(b)},
			}
			pre.rules = append(pre.rules, redirectRule(iif, nil, IMDSv4, r.cfg.Port))
			if r.cfg.Port6 != 0 {
				pre.rules = append(pre.rules, redirectRule(iif, nil, IMDSv6, r.cfg.Port6))
			}
		}
		specs = append(specs, pre)
	}
	return specs
}

// redirectRule is: [pre] meta nfproto F meta l4proto tcp ip[6] daddr ADDR
// tcp dport 80 [post] redirect to :port.
func redirectRule(pre, post []expr.Any, addr netip.Addr, port uint16) []expr.Any {
	proto, off := byte(unix.NFPROTO_IPV4), uint32(16) // offsetof(iphdr, daddr)
	if addr.Is6() {
		proto, off = unix.NFPROTO_IPV6, 24 // offsetof(ipv6hdr, daddr)
	}
	a := addr.AsSlice()
	e := slices.Clone(pre)
	e = append(e,
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{proto}},
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_TCP}},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: off, Len: uint32(len(a))},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: a},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binary.BigEndian.AppendUint16(nil, IMDSPort)},
	)
	e = append(e, post...)
	return append(e,
		&expr.Immediate{Register: 1, Data: binary.BigEndian.AppendUint16(nil, port)},
		// as the kernel reports it back: the port range is [reg1, reg1]
		&expr.Redir{RegisterProtoMin: 1, RegisterProtoMax: 1, Flags: unix.NF_NAT_RANGE_PROTO_SPECIFIED},
	)
}

// ifname is an interface name as the kernel compares it: NUL-padded to
// IFNAMSIZ (16 bytes).
func ifname(n string) []byte {
	b := make([]byte, unix.IFNAMSIZ)
	copy(b, n)
	return b
}

// Describe renders the rules Install writes, in nft syntax, for humans.
func (r *Rules) Describe() string {
	var b strings.Builder
	fmt.Fprintf(&b, "table inet %s {\n", TableName)
	fmt.Fprintf(&b, "  chain output { type nat hook output priority %d; policy accept;\n", Priority)
	fmt.Fprintf(&b, "    ip daddr %s tcp dport %d meta skuid != %d redirect to :%d\n", IMDSv4, IMDSPort, r.cfg.ExemptUID, r.cfg.Port)
	if r.cfg.Port6 != 0 {
		fmt.Fprintf(&b, "    ip6 daddr %s tcp dport %d meta skuid != %d redirect to :%d\n", IMDSv6, IMDSPort, r.cfg.ExemptUID, r.cfg.Port6)
	}
	b.WriteString("  }\n")
	if len(r.cfg.Bridges) > 0 {
		fmt.Fprintf(&b, "  chain prerouting { type nat hook prerouting priority %d; policy accept;\n", Priority)
		for _, br := range r.cfg.Bridges {
			fmt.Fprintf(&b, "    iifname %q ip daddr %s tcp dport %d redirect to :%d\n", br, IMDSv4, IMDSPort, r.cfg.Port)
			if r.cfg.Port6 != 0 {
				fmt.Fprintf(&b, "    iifname %q ip6 daddr %s tcp dport %d redirect to :%d\n", br, IMDSv6, IMDSPort, r.cfg.Port6)
			}
		}
		b.WriteString("  }\n")
	}
	b.WriteString("}\n")
	return b.String()
}
