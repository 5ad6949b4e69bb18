package peer

import (
	"errors"
	"fmt"
	"os"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
)

// The socket table: two BPF_PROG_TYPE_CGROUP_SOCK programs attached to the
// root of the cgroup2 tree (so to every cgroup below it) keep an LRU hash
// map from the cookie of every TCP socket made since to the process that
// made it. The create program runs in socket(2) (BPF_CGROUP_INET_SOCK_CREATE)
// in the context of the calling process; the release program
// (BPF_CGROUP_INET_SOCK_RELEASE, Linux 5.9) deletes the entry when the last
// file of the socket is closed, so the map holds only open sockets and the
// LRU evicts only when more than bpfMapEntries TCP sockets are open.
//
// Both programs return 1 (allow) on every path: they never refuse a
// socket. They are attached with bpf_link (BPF_LINK_CREATE, Linux 5.7),
// never with the legacy BPF_PROG_ATTACH: a link is detached by the kernel
// when its last file descriptor is closed, so a daemon that exits or
// crashes leaves nothing attached.
const (
	// bpfMapEntries bounds the map: about 100 bytes of locked kernel
	// memory each (LRU maps are preallocated), 3 MiB in all.
	bpfMapEntries = 1 << 15
	// Offsets in struct bpf_sock (linux/bpf.h).
	bpfSockProtocolOff = 12
	// Offsets in the map value, which is sockRecord; on the program's
	// stack it starts at r10-32, the key at r10-8.
	bpfKeyOff     = -8
	bpfValueOff   = -32
	bpfTGIDOff    = bpfValueOff + 0
	bpfUIDOff     = bpfValueOff + 4
	bpfCgroupOff  = bpfValueOff + 8
	bpfCreatedOff = bpfValueOff + 16
)

// sockRecord is the map's value (its layout is the programs').
type sockRecord struct {
	TGID    uint32 // the creating process, in the initial pid namespace
	UID     uint32 // its real uid
	Cgroup  uint64 // its cgroup v2 id
	Created uint64 // CLOCK_BOOTTIME, ns
}

// bpfSockets is a loaded and attached socket table.
type bpfSockets struct {
	sockets *ebpf.Map
	progs   []*ebpf.Program
	links   []link.Link
}

// errBPFNotPermitted: the process lacks the capabilities to load and
// attach the programs.
var errBPFNotPermitted = errors.New("needs CAP_BPF and CAP_NET_ADMIN (or CAP_SYS_ADMIN)")

// procPidInitIno is the inode number of the initial pid namespace
// (PROC_PID_INIT_INO, include/linux/proc_ns.h).
const procPidInitIno = 0xEFFFFFFC

// inInitialPIDNamespace reports whether this process sees pids as the
// programs record them (bpf_get_current_pid_tgid: in the initial pid
// namespace).
func inInitialPIDNamespace() bool {
	var st unix.Stat_t
	return unix.Stat("/proc/self/ns/pid", &st) == nil && st.Ino == procPidInitIno
}

// bpfPermitted reports whether this process's effective capabilities let
// it create the map (CAP_BPF), load cgroup socket programs (CAP_BPF and
// CAP_NET_ADMIN) and attach them (CAP_NET_ADMIN); CAP_SYS_ADMIN stands for
// both on every kernel.
func bpfPermitted() bool {
	has := effectiveCaps()
	return has(unix.CAP_SYS_ADMIN) || has(unix.CAP_BPF) && has(unix.CAP_NET_ADMIN)
}

// loadBPF creates the map, loads both programs and attaches them to the
// cgroup2 directory at cgroupRoot. Without the release program (Linux <
// 5.9) the table still works, its entries left to the LRU.
func loadBPF(cgroupRoot string) (_ *bpfSockets, err error) {
	if !bpfPermitted() {
		return nil, errBPFNotPermitted
	}
	if !inInitialPIDNamespace() {
		return nil, errors.New("not in the initial pid namespace, whose pids the programs record")
	}
	b := &bpfSockets{}
	defer func() {
		if err != nil {
			b.Close()
		}
	}()
	b.sockets, err = ebpf.NewMap(&ebpf.MapSpec{
		Name:       "imdsproxy_socks",
		Type:       ebpf.LRUHash,
		KeySize:    8,
		ValueSize:  24,
		MaxEntries: bpfMapEntries,
	})
	if err != nil {
		return nil, fmt.Errorf("create map: %w", err)
	}
	cg, err := os.Open(cgroupRoot)
	if err != nil {
		return nil, fmt.Errorf("open cgroup: %w", err)
	}
	defer cg.Close()
	if err := b.attach(cg, "imdsproxy_sock_c", ebpf.AttachCGroupInetSockCreate, sockCreateInsns(b.sockets.FD())); err != nil {
		return nil, err
	}
	// Best effort: without it, closed sockets stay until evicted.
	_ = b.attach(cg, "imdsproxy_sock_r", ebpf.AttachCgroupInetSockRelease, sockReleaseInsns(b.sockets.FD()))
	return b, nil
}

func (b *bpfSockets) attach(cg *os.File, name string, at ebpf.AttachType, insns asm.Instructions) error {
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Name:         name,
		Type:         ebpf.CGroupSock,
		AttachType:   at,
		Instructions: insns,
		// No GPL-only helper is called.
		License: "Proprietary",
	})
	if err != nil {
		return fmt.Errorf("load %s program: %w", at, err)
	}
	b.progs = append(b.progs, prog)
	l, err := link.AttachRawLink(link.RawLinkOptions{Target: int(cg.Fd()), Program: prog, Attach: at})
	if err != nil {
		return fmt.Errorf("attach %s program: %w", at, err)
	}
	b.links = append(b.links, l)
	return nil
}

// sockCreateInsns: for a TCP socket, map[cookie] = {tgid, uid, cgroup id,
// boot time}; always allow.
func sockCreateInsns(mapFD int) asm.Instructions {
	return asm.Instructions{
		asm.Mov.Reg(asm.R6, asm.R1), // r6 = ctx (struct bpf_sock *)
		asm.LoadMem(asm.R2, asm.R6, bpfSockProtocolOff, asm.Word),
		asm.JNE.Imm(asm.R2, unix.IPPROTO_TCP, "allow"),
		asm.Mov.Reg(asm.R1, asm.R6),
		asm.FnGetSocketCookie.Call(),
		asm.StoreMem(asm.RFP, bpfKeyOff, asm.R0, asm.DWord),
		asm.FnGetCurrentPidTgid.Call(),
		asm.RSh.Imm(asm.R0, 32),
		asm.StoreMem(asm.RFP, bpfTGIDOff, asm.R0, asm.Word),
		asm.FnGetCurrentUidGid.Call(), // uid in the low half
		asm.StoreMem(asm.RFP, bpfUIDOff, asm.R0, asm.Word),
		asm.FnGetCurrentCgroupId.Call(),
		asm.StoreMem(asm.RFP, bpfCgroupOff, asm.R0, asm.DWord),
		asm.FnKtimeGetBootNs.Call(),
		asm.StoreMem(asm.RFP, bpfCreatedOff, asm.R0, asm.DWord),
		asm.LoadMapPtr(asm.R1, mapFD),
		asm.Mov.Reg(asm.R2, asm.RFP),
		asm.Add.Imm(asm.R2, bpfKeyOff),
		asm.Mov.Reg(asm.R3, asm.RFP),
		asm.Add.Imm(asm.R3, bpfValueOff),
		asm.Mov.Imm(asm.R4, 0), // BPF_ANY
		asm.FnMapUpdateElem.Call(),
		asm.Mov.Imm(asm.R0, 1).WithSymbol("allow"),
		asm.Return(),
	}
}

// sockReleaseInsns: for a TCP socket, delete map[cookie]; always allow.
func sockReleaseInsns(mapFD int) asm.Instructions {
	return asm.Instructions{
		asm.Mov.Reg(asm.R6, asm.R1),
		asm.LoadMem(asm.R2, asm.R6, bpfSockProtocolOff, asm.Word),
		asm.JNE.Imm(asm.R2, unix.IPPROTO_TCP, "allow"),
		asm.Mov.Reg(asm.R1, asm.R6),
		asm.FnGetSocketCookie.Call(),
		asm.StoreMem(asm.RFP, bpfKeyOff, asm.R0, asm.DWord),
		asm.LoadMapPtr(asm.R1, mapFD),
		asm.Mov.Reg(asm.R2, asm.RFP),
		asm.Add.Imm(asm.R2, bpfKeyOff),
		asm.FnMapDeleteElem.Call(),
		asm.Mov.Imm(asm.R0, 1).WithSymbol("allow"),
		asm.Return(),
	}
}

// lookup returns the record of the socket with the given cookie.
func (b *bpfSockets) lookup(cookie uint64) (sockRecord, bool) {
	var rec sockRecord
	if err := b.sockets.Lookup(&cookie, &rec); err != nil {
		return sockRecord{}, false
	}
	return rec, true
}

// Close detaches the programs and frees the map.
func (b *bpfSockets) Close() error {
	var errs []error
	for _, l := range b.links {
		errs = append(errs, l.Close())
	}
	for _, p := range b.progs {
		errs = append(errs, p.Close())
	}
	if b.sockets != nil {
		errs = append(errs, b.sockets.Close())
	}
	return errors.Join(errs...)
}
