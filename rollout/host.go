package rollout

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strings"
	"time"
)

// DefaultTagKey is the instance tag read for the instance group when none is
// configured.
const DefaultTagKey = "aws:autoscaling:groupName"

// DetectTimeout bounds each metadata request of DetectHost.
const DetectTimeout = 2 * time.Second

// Values of Host.GroupSource.
const (
	// GroupFromTag: the group is the value of the instance tag.
	GroupFromTag = "tag"
	// GroupFromConfig: the group is the configured fallback group.
	GroupFromConfig = "config"
	// GroupNone: no group is known; the policy's default applies.
	GroupNone = "none"
)

// Values of Host.IDSource.
const (
	// IDFromIMDS: InstanceID is the EC2 instance id.
	IDFromIMDS = "imds"
	// IDFromHostname: the instance id was unavailable; InstanceID is the
	// host name, which then decides the canary bucket.
	IDFromHostname = "hostname"
)

// Host is this host's identity for the rollout.
type Host struct {
	// InstanceID identifies the host for Bucket: the EC2 instance id, or
	// the host name when IDSource is IDFromHostname.
	InstanceID string
	// Group is the instance group, "" when GroupSource is GroupNone.
	Group string
	// GroupSource is GroupFromTag, GroupFromConfig or GroupNone.
	GroupSource string
	// IDSource is IDFromIMDS or IDFromHostname.
	IDSource string
}

// DetectHost reads the instance id and the instance group from the instance
// metadata service at imdsBase (for example http://169.254.169.254: the
// real IMDS, never the daemon itself) with IMDSv2: a session token is
// obtained with PUT /latest/api/token and sent with each GET. Each request
// is bounded by DetectTimeout.
//
// The group is the value of the instance tag tagKey (DefaultTagKey when "")
// from /latest/meta-data/tags/instance/<tagKey> (the key path-escaped).
// When the tag is absent or instance tags are not exposed in metadata (404),
// the group is fallbackGroup (GroupSource "config"), or none when
// fallbackGroup is "". Any other failure to read the tag is an error, so a
// host is never put into the wrong group by a transient fault.
//
// When the instance id cannot be read (no IMDS, for example off EC2), the
// host name stands in for it (IDSource "hostname") and the group is
// fallbackGroup; DetectHost fails only when the host name is unavailable too.
func DetectHost(ctx context.Context, imdsBase, tagKey, fallbackGroup string) (Host, error) {
	if tagKey == "" {
		tagKey = DefaultTagKey
	}
	u, err := url.Parse(imdsBase)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || u.User != nil {
		return Host{}, fmt.Errorf("rollout: IMDS base %q is not a base URL such as http://169.254.169.254", imdsBase)
	}
	m := &imdsClient{
		base:   strings.TrimRight(u.String(), "/"),
		client: &http.Client{Timeout: DetectTimeout},
	}
	fallback := func() Host {
		if fallbackGroup != "" {
			return Host{Group: fallbackGroup, GroupSource: GroupFromConfig}
		}
		return Host{GroupSource: GroupNone}
	}

	id, idErr := m.instanceID(ctx)
	if idErr != nil {
		if ctx.Err() != nil {
			return Host{}, fmt.Errorf("rollout: read instance id: %w", ctx.Err())
		}
		name, err := os.Hostname()
		if err != nil || name == "" {
			return Host{}, fmt.Errorf("rollout: read instance id: %w; and no host name to stand in: %v", idErr, err)
		}
		h := fallback()
		h.InstanceID, h.IDSource = name, IDFromHostname
		return h, nil
	}

	body, status, err := m.get(ctx, "/latest/meta-data/tags/instance/"+url.PathEscape(tagKey))
	switch {
	case err != nil:
		return Host{}, fmt.Errorf("rollout: read instance tag %s: %w", tagKey, err)
	case status == http.StatusNotFound:
		h := fallback()
		h.InstanceID, h.IDSource = id, IDFromIMDS
		return h, nil
	case status != http.StatusOK:
		return Host{}, fmt.Errorf("rollout: read instance tag %s: HTTP status %d", tagKey, status)
	}
	group := strings.TrimSpace(string(body))
	if group == "" {
		h := fallback()
		h.InstanceID, h.IDSource = id, IDFromIMDS
		return h, nil
	}
	if err := checkText(group, maxGroupLen); err != nil {
		return Host{}, fmt.Errorf("rollout: instance tag %s: value %s", tagKey, err)
	}
	return Host{InstanceID: id, Group: group, GroupSource: GroupFromTag, IDSource: IDFromIMDS}, nil
}

// imdsClient is a minimal IMDSv2 client.
type imdsClient struct {
	base   string
	client *http.Client
	token  string
}

const maxIMDSBody = 4096

func (m *imdsClient) instanceID(ctx context.Context) (string, error) {
	if err := m.fetchToken(ctx); err != nil {
		return "", err
	}
	body, status, err := m.get(ctx, "/latest/meta-data/instance-id")
	if err != nil {
		return "", err
	}
	if status != http.StatusOK {
		return "", fmt.Errorf("instance-id: HTTP status %d", status)
	}
	id := strings.TrimSpace(string(body))
	if id == "" || checkText(id, 64) != nil || strings.ContainsAny(id, " \t") {
		return "", errors.New("instance-id: malformed answer")
	}
	return id, nil
}

func (m *imdsClient) fetchToken(ctx context.Context) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodPut, m.base+"/latest/api/token", nil)
	if err != nil {
		return err
	}
	req.Header.Set("X-Aws-Ec2-Metadata-Token-Ttl-Seconds", "60")
	resp, err := m.client.Do(req)
	if err != nil {
		return fmt.Errorf("IMDSv2 token: %w", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxIMDSBody))
	if err != nil {
		return fmt.Errorf("IMDSv2 token: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("IMDSv2 token: HTTP status %d", resp.StatusCode)
	}
	tok := strings.TrimSpace(string(body))
	if tok == "" {
		return errors.New("IMDSv2 token: empty answer")
	}
	m.token = tok
	return nil
}

// get returns the body and status of a GET; err only for transport errors.
func (m *imdsClient) get(ctx context.Context, path string) ([]byte, int, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, m.base+path, nil)
	if err != nil {
		return nil, 0, err
	}
	req.Header.Set("X-Aws-Ec2-Metadata-Token", m.token)
	resp, err := m.client.Do(req)
	if err != nil {
		return nil, 0, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxIMDSBody))
	if err != nil {
		return nil, 0, err
	}
	return body, resp.StatusCode, nil
}
