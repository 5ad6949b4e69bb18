package rollout

import (
	"context"
	"fmt"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/imdsproxy/imdsproxy/metadata"
)

// DefaultTagKey is the instance tag read for the instance group when none is
// configured.
const DefaultTagKey = "aws:autoscaling:groupName"

// DetectTimeout bounds the metadata reads of DetectHost.
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

// TagReader reads instance metadata; *metadata.Client implements it.
type TagReader interface {
	Get(ctx context.Context, path string) ([]byte, error)
}

// DetectHost returns this host's rollout identity: instanceID (read once by
// the daemon from the instance metadata service; "" when unavailable, for
// example off EC2, and then the host name stands in, IDSource "hostname")
// and the instance group, the value of the instance tag tagKey
// (DefaultTagKey when "") read with md from
// /latest/meta-data/tags/instance/<tagKey> (the key path-escaped).
//
// When the tag is absent or instance tags are not exposed in metadata (404),
// or the instance id is unknown, the group is fallbackGroup (GroupSource
// "config"), or none when fallbackGroup is "". Any other failure to read the
// tag is an error, so a host is never put into the wrong group by a
// transient fault. The reads are bounded by DetectTimeout.
func DetectHost(ctx context.Context, md TagReader, instanceID, tagKey, fallbackGroup string) (Host, error) {
	if tagKey == "" {
		tagKey = DefaultTagKey
	}
	h := Host{GroupSource: GroupNone, InstanceID: instanceID, IDSource: IDFromIMDS}
	if fallbackGroup != "" {
		h.Group, h.GroupSource = fallbackGroup, GroupFromConfig
	}
	if instanceID == "" || md == nil {
		name, err := os.Hostname()
		if err != nil || name == "" {
			return Host{}, fmt.Errorf("rollout: no instance id, and no host name to stand in: %v", err)
		}
		h.InstanceID, h.IDSource = name, IDFromHostname
		return h, nil
	}
	ctx, cancel := context.WithTimeout(ctx, DetectTimeout)
	defer cancel()
	body, err := md.Get(ctx, "/latest/meta-data/tags/instance/"+url.PathEscape(tagKey))
	switch {
	case metadata.IsNotFound(err):
		return h, nil
	case err != nil:
		return Host{}, fmt.Errorf("rollout: read instance tag %s: %w", tagKey, err)
	}
	group := strings.TrimSpace(string(body))
	if group == "" {
		return h, nil
	}
	if err := checkText(group, maxGroupLen); err != nil {
		return Host{}, fmt.Errorf("rollout: instance tag %s: value %s", tagKey, err)
	}
	h.Group, h.GroupSource = group, GroupFromTag
	return h, nil
}
