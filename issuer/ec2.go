package issuer

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials/stscreds"
	"github.com/aws/aws-sdk-go-v2/service/ec2"
	ec2types "github.com/aws/aws-sdk-go-v2/service/ec2/types"
	"github.com/aws/aws-sdk-go-v2/service/sts"
	"github.com/aws/smithy-go"
	"github.com/hashicorp/golang-lru/v2/simplelru"
	"golang.org/x/sync/singleflight"
)

// Instance is what EC2 DescribeInstances says about an instance.
type Instance struct {
	// Found is false when EC2 does not know the instance (terminated long
	// ago, another account or region, or made up).
	Found              bool
	ID                 string
	State              string // pending | running | stopping | stopped | shutting-down | terminated
	LaunchTime         time.Time
	InstanceProfileARN string
	Tags               map[string]string
}

// check refuses an instance that is unknown or not running.
func (i *Instance) check(id string) error {
	if !i.Found {
		return attestErr(reasonNotRunning, "EC2 does not know instance %s in this account and region", id)
	}
	if i.State != string(ec2types.InstanceStateNamePending) && i.State != string(ec2types.InstanceStateNameRunning) {
		return attestErr(reasonNotRunning, "instance %s is %s, not running", id, i.State)
	}
	return nil
}

// InstanceDescriber looks one instance up in an account and region. It
// returns an Instance with Found false when EC2 answers that the instance
// does not exist, and an error only when EC2 could not be asked.
type InstanceDescriber interface {
	DescribeInstance(ctx context.Context, account, region, instanceID string) (*Instance, error)
}

// instanceLookup caches an InstanceDescriber: answers about running
// instances for ttl, others for negTTL; concurrent lookups of one instance
// share one call. Safe for concurrent use.
type instanceLookup struct {
	describer InstanceDescriber
	ttl       time.Duration
	negTTL    time.Duration
	timeout   time.Duration
	now       func() time.Time
	count     func(result string) // metrics; never nil

	group singleflight.Group
	mu    sync.Mutex
	cache *simplelru.LRU[string, cachedInstance]
}

type cachedInstance struct {
	inst    *Instance
	expires time.Time
}

func newInstanceLookup(d InstanceDescriber, cfg EC2Config, now func() time.Time, count func(string)) *instanceLookup {
	c, _ := simplelru.NewLRU[string, cachedInstance](cfg.CacheSize, nil) // size checked by validate
	return &instanceLookup{describer: d, ttl: cfg.CacheTTL.D(), negTTL: cfg.NegativeCacheTTL.D(),
		timeout: cfg.Timeout.D(), now: now, count: count, cache: c}
}

// Describe returns the (cached) answer about instanceID, or an
// *attestError with reasonEC2Unavailable.
func (l *instanceLookup) Describe(ctx context.Context, account, region, instanceID string) (*Instance, error) {
	key := account + "/" + region + "/" + instanceID
	now := l.now()
	l.mu.Lock()
	c, ok := l.cache.Get(key)
	l.mu.Unlock()
	if ok && now.Before(c.expires) {
		l.count("hit")
		return c.inst, nil
	}
	ch := l.group.DoChan(key, func() (any, error) {
		ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), l.timeout)
		defer cancel()
		inst, err := l.describer.DescribeInstance(ctx, account, region, instanceID)
		if err != nil {
			l.count("error")
			return nil, attestErr(reasonEC2Unavailable, "EC2 DescribeInstances for %s in %s: %v", instanceID, region, err)
		}
		ttl := l.ttl
		if inst.check(instanceID) != nil {
			ttl = l.negTTL
			l.count("not_running")
		} else {
			l.count("running")
		}
		l.mu.Lock()
		l.cache.Add(key, cachedInstance{inst: inst, expires: l.now().Add(ttl)})
		l.mu.Unlock()
		return inst, nil
	})
	select {
	case r := <-ch:
		if r.Err != nil {
			return nil, r.Err
		}
		return r.Val.(*Instance), nil
	case <-ctx.Done():
		return nil, attestErr(reasonEC2Unavailable, "EC2 DescribeInstances for %s: %v", instanceID, ctx.Err())
	}
}

// ec2Describer calls EC2 DescribeInstances through aws-sdk-go-v2, with one
// client per account and region (assuming AssumeRoleARN in the account when
// set). Safe for concurrent use.
type ec2Describer struct {
	base       aws.Config
	endpoint   string
	assumeRole string // template with {accountId}

	mu      sync.Mutex
	clients map[string]*ec2.Client
}

func newEC2Describer(base aws.Config, cfg EC2Config) *ec2Describer {
	return &ec2Describer{base: base, endpoint: cfg.Endpoint, assumeRole: cfg.AssumeRoleARN, clients: map[string]*ec2.Client{}}
}

func (d *ec2Describer) client(account, region string) *ec2.Client {
	key := account + "/" + region
	d.mu.Lock()
	defer d.mu.Unlock()
	if c := d.clients[key]; c != nil {
		return c
	}
	cfg := d.base.Copy()
	cfg.Region = region
	if d.assumeRole != "" {
		arn := strings.ReplaceAll(d.assumeRole, "{accountId}", account)
		stsc := sts.NewFromConfig(d.base, func(o *sts.Options) {
			if o.Region == "" {
				o.Region = region
			}
		})
		cfg.Credentials = aws.NewCredentialsCache(stscreds.NewAssumeRoleProvider(stsc, arn, func(o *stscreds.AssumeRoleOptions) {
			o.RoleSessionName = "imdsproxy-issuer"
		}))
	}
	c := ec2.NewFromConfig(cfg, func(o *ec2.Options) {
		if d.endpoint != "" {
			o.BaseEndpoint = aws.String(d.endpoint)
		}
	})
	d.clients[key] = c
	return c
}

// DescribeInstance implements InstanceDescriber.
func (d *ec2Describer) DescribeInstance(ctx context.Context, account, region, instanceID string) (*Instance, error) {
	out, err := d.client(account, region).DescribeInstances(ctx, &ec2.DescribeInstancesInput{InstanceIds: []string{instanceID}})
	if err != nil {
		var ae smithy.APIError
		if errors.As(err, &ae) && strings.HasPrefix(ae.ErrorCode(), "InvalidInstanceID.") {
			return &Instance{ID: instanceID}, nil
		}
		return nil, err
	}
	for _, r := range out.Reservations {
		for _, in := range r.Instances {
			if aws.ToString(in.InstanceId) != instanceID {
				continue
			}
			inst := &Instance{Found: true, ID: instanceID, LaunchTime: aws.ToTime(in.LaunchTime), Tags: map[string]string{}}
			if in.State != nil {
				inst.State = string(in.State.Name)
			}
			if in.IamInstanceProfile != nil {
				inst.InstanceProfileARN = aws.ToString(in.IamInstanceProfile.Arn)
			}
			for _, t := range in.Tags {
				inst.Tags[aws.ToString(t.Key)] = aws.ToString(t.Value)
			}
			return inst, nil
		}
	}
	return &Instance{ID: instanceID}, nil
}

// Identity is an attested host: who it is, as far as the attestation
// method (and EC2, when asked) proves it.
type Identity struct {
	Method     string
	AccountID  string
	InstanceID string
	// Region is the instance's region; "" when not proven (aws_iam without
	// an EC2 lookup). RegionVerified tells whether it was proven.
	Region         string
	RegionVerified bool
	// RoleARN is the instance profile's role (aws_iam), without its path:
	// arn:aws:iam::ACCOUNT:role/NAME.
	RoleARN string

	lookup  *instanceLookup
	inst    *Instance
	instErr error
}

// Instance returns what EC2 says about the instance (looked up once per
// request, cached across requests), or an error when the issuer cannot
// ask: no lookup configured or no region known.
func (id *Identity) Instance(ctx context.Context) (*Instance, error) {
	if id.inst != nil || id.instErr != nil {
		return id.inst, id.instErr
	}
	switch {
	case id.lookup == nil:
		id.instErr = errors.New("EC2 lookups are off")
	case id.Region == "":
		id.instErr = errors.New("the instance's region is not known")
	default:
		id.inst, id.instErr = id.lookup.Describe(ctx, id.AccountID, id.Region, id.InstanceID)
		if id.instErr == nil && id.inst.check(id.InstanceID) == nil {
			id.RegionVerified = true // EC2 knows it there
		}
	}
	return id.inst, id.instErr
}

// String is the identity for logs.
func (id *Identity) String() string {
	return fmt.Sprintf("%s %s/%s/%s", id.Method, id.AccountID, id.Region, id.InstanceID)
}
