package e2e

import (
	"fmt"
	"io"
	"os"
	"os/exec"
	"time"

	"github.com/imdsproxy/imdsproxy/test/fakes/instance"
	"github.com/imdsproxy/imdsproxy/test/fakes/sts"
)

// IssuerOptions configure StartIssuer.
type IssuerOptions struct {
	// Bin is the imdsproxy-issuer binary; "" is IssuerBinary().
	Bin string
	// Config is the path of its config file; Addr its listen address
	// (host:port, plain HTTP on loopback), where /readyz is awaited.
	Config, Addr string
	// Dir and Env are its working directory and environment (Environ is
	// where to start: AWS_* of the machine must not reach it).
	Dir string
	Env []string
	// Out receives its JSON log (debug level).
	Out io.Writer
	// Timeout bounds the wait for /readyz; 0 is 15 s.
	Timeout time.Duration
}

// StartIssuer starts `imdsproxy-issuer serve` and waits until its /readyz
// answers 200. On failure the process is stopped.
func StartIssuer(o IssuerOptions) (*Process, error) {
	if o.Bin == "" {
		bin, err := IssuerBinary()
		if err != nil {
			return nil, err
		}
		o.Bin = bin
	}
	if o.Timeout == 0 {
		o.Timeout = 15 * time.Second
	}
	cmd := exec.Command(o.Bin, "serve", "--config", o.Config, "--log-format", "json", "--log-level", "debug")
	cmd.Dir, cmd.Env = o.Dir, o.Env
	cmd.Stdout, cmd.Stderr = o.Out, o.Out
	p, err := Start(cmd)
	if err != nil {
		return nil, fmt.Errorf("start %s: %w", o.Bin, err)
	}
	if err := WaitOK(Client, "http://"+o.Addr+"/readyz", o.Timeout, 25*time.Millisecond, p); err != nil {
		p.Stop(5 * time.Second)
		return nil, fmt.Errorf("imdsproxy-issuer: %w", err)
	}
	return p, nil
}

// Instance is a stand-in EC2 instance (test/fakes/instance) served by
// amazon-ec2-metadata-mock: the real IMDS of a daemon whose identity an
// issuer can verify.
type Instance struct {
	*instance.Instance
	// AEMM serves it.
	AEMM *AEMM
	home string
}

// StartInstance makes an instance with o, has fake issue its instance
// profile's credentials for d (fake.IssueSession), and serves it with
// amazon-ec2-metadata-mock (AEMMBinary, IMDSv2 only) from a temporary home
// that Stop removes.
func StartInstance(fake *sts.Server, o instance.Options, d time.Duration) (*Instance, error) {
	in, err := instance.New(o)
	if err != nil {
		return nil, err
	}
	is, err := fake.IssueSession(in.ProfileRoleARN(), in.InstanceID, d)
	if err != nil {
		return nil, err
	}
	in.Credentials = instance.Credentials{AccessKeyID: is.AccessKeyID, SecretAccessKey: is.SecretAccessKey,
		SessionToken: is.SessionToken, Expiration: is.Expiration}
	home, err := os.MkdirTemp("", "imdsproxy-e2e-instance-")
	if err != nil {
		return nil, err
	}
	i := &Instance{Instance: in, home: home}
	if err := in.WriteAEMMConfig(home); err != nil {
		i.Stop()
		return nil, err
	}
	if i.AEMM, err = StartAEMM(AEMMOptions{Home: home, IMDSv2Only: true}); err != nil {
		i.Stop()
		return nil, err
	}
	return i, nil
}

// Stop stops amazon-ec2-metadata-mock and removes its home.
func (i *Instance) Stop() {
	i.AEMM.Stop(5 * time.Second)
	os.RemoveAll(i.home)
}
