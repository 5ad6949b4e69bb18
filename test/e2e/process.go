package e2e

import (
	"errors"
	"os"
	"os/exec"
	"sync"
	"syscall"
	"time"
)

// Process is a started subprocess whose exit is awaited in the background.
// Its methods are safe for concurrent use. Exited, Err, State and Stop
// accept a nil *Process, as one that has exited (a server that never
// started).
type Process struct {
	// Cmd is the command, started.
	Cmd *exec.Cmd

	done     chan struct{}
	err      error // what Wait returned, set before done is closed
	termOnce sync.Once
}

// Start starts cmd and waits for its exit in the background. Set cmd's
// output, environment and directory before.
func Start(cmd *exec.Cmd) (*Process, error) {
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	p := &Process{Cmd: cmd, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	return p, nil
}

// Pid is the process id.
func (p *Process) Pid() int { return p.Cmd.Process.Pid }

// Done is closed when the process has exited.
func (p *Process) Done() <-chan struct{} { return p.done }

// Exited reports whether the process has exited.
func (p *Process) Exited() bool {
	if p == nil {
		return true
	}
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// Err returns what exec.Cmd.Wait returned (nil for exit status 0), or nil
// while the process runs.
func (p *Process) Err() error {
	if p == nil || !p.Exited() {
		return nil
	}
	return p.err
}

// State returns how the process ended (exec.Cmd.ProcessState), nil while it
// runs.
func (p *Process) State() *os.ProcessState {
	if p == nil || !p.Exited() {
		return nil
	}
	return p.Cmd.ProcessState
}

// Signal sends sig to the process.
func (p *Process) Signal(sig os.Signal) error { return p.Cmd.Process.Signal(sig) }

// Stop sends SIGTERM, once, unless the process has exited already, and
// waits up to timeout for it to exit; then it kills it. It returns the exit
// code (ExitCode), or -1 when it had to kill it (or p is nil).
func (p *Process) Stop(timeout time.Duration) int {
	if p == nil {
		return -1
	}
	if !p.Exited() {
		p.termOnce.Do(func() { _ = p.Cmd.Process.Signal(syscall.SIGTERM) })
	}
	select {
	case <-p.done:
	case <-time.After(timeout):
		_ = p.Cmd.Process.Kill()
		<-p.done
		return -1
	}
	return ExitCode(p.err)
}

// ExitCode is the exit code of a process whose Wait returned err: 0 for
// nil, 128+N for death by signal N (as a shell reports it), -1 when err
// says neither.
func ExitCode(err error) int {
	if err == nil {
		return 0
	}
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			return 128 + int(ws.Signal())
		}
		return ee.ExitCode()
	}
	return -1
}
