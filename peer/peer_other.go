//go:build !linux

package peer

import (
	"context"
	"errors"
	"io"
	"net"
	"os"
	"syscall"

	"go.uber.org/zap"
)

func (r *Resolver) lookup(context.Context, uint64, *net.TCPAddr, *net.TCPAddr, lookupHow) (Info, error) {
	return Info{}, ErrUnsupported
}

func (r *Resolver) process(_ context.Context, info Info) Info { return info }

func originalDst(syscall.Conn, bool) (*net.TCPAddr, error) { return nil, ErrUnsupported }

func connNetns(net.Conn) uint64 { return 0 }

// ListenerNetns is 0 (unknown) where network namespaces do not exist.
func ListenerNetns(net.Listener) uint64 { return 0 }

func canReadAllFDs() bool { return false }

func inodeOf(string) (uint64, error) { return 0, ErrUnsupported }

type cgroupWatcher struct{}

func startCgroupWatcher(*cgroupMap, *zap.Logger, cgroupLimits) (*cgroupWatcher, error) {
	return nil, ErrUnsupported
}

func (*cgroupWatcher) Close() error { return nil }

type bpfSockets struct{}

func loadBPF(string) (*bpfSockets, error) { return nil, errors.New("Linux only") }

func (*bpfSockets) Close() error { return nil }

func readFile(name string, max int) ([]byte, error) {
	f, err := os.Open(name)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return io.ReadAll(io.LimitReader(f, int64(max)))
}
