//go:build !linux

package peer

import (
	"context"
	"net"
	"syscall"
)

func (r *Resolver) lookup(context.Context, *net.TCPAddr, *net.TCPAddr) (Info, error) {
	return Info{}, ErrUnsupported
}

func originalDst(syscall.Conn, bool) (*net.TCPAddr, error) { return nil, ErrUnsupported }

func scanProc(context.Context, string, uint64, int, bool, map[uint64]int) int { return 0 }

func scanPIDs(context.Context, string, []int, uint64, map[uint64]int) int { return 0 }

func canReadAllFDs() bool { return false }

func inodeOf(string) (uint64, error) { return 0, ErrUnsupported }
