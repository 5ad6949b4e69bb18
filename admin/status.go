package admin

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/imdsproxy/imdsproxy/cache"
	"github.com/imdsproxy/imdsproxy/creds"
	"github.com/imdsproxy/imdsproxy/rollout"
)

// Status is the /debug/status document: readiness, what is served, the
// configuration in force, the rollout and the cache. It holds no secret.
// Fields are only ever added, so `imdsproxy status` of any version reads
// it.
type Status struct {
	Ready          bool          `json:"ready"`
	ReadyReason    string        `json:"ready_reason"`
	Version        string        `json:"version"`
	Source         string        `json:"source"`
	RoleARN        string        `json:"role_arn"`
	RoleName       string        `json:"role_name"`
	ServedRoleName string        `json:"served_role_name"`
	ServedKind     string        `json:"served_kind"`
	Config         ConfigStatus  `json:"config"`
	Doors          []DoorStatus  `json:"doors,omitempty"`
	Rollout        RolloutStatus `json:"rollout"`
	Cache          []CacheEntry  `json:"cache"`
}

// DoorStatus is one front door the daemon serves credentials through:
// the IMDS listener ("imds"), the container credentials endpoint
// ("container"), the credential_process socket ("process").
type DoorStatus struct {
	Door string `json:"door"`
	// Listen are its addresses (the socket's path for "process").
	Listen []string `json:"listen"`
	// URL is the container endpoint's URL for
	// AWS_CONTAINER_CREDENTIALS_FULL_URI (the first address).
	URL string `json:"url,omitempty"`
	// Tokens is the number of workloads with an authorization token
	// ("container"), LastRotation when they were last all replaced,
	// RotateInterval how often they are and RotateOverlap how long a
	// replaced one is still accepted (the values in use).
	Tokens         int    `json:"tokens,omitempty"`
	LastRotation   string `json:"last_rotation,omitempty"`
	RotateInterval string `json:"rotate_interval,omitempty"`
	RotateOverlap  string `json:"rotate_overlap,omitempty"`
}

// ConfigStatus is the configuration part of Status.
type ConfigStatus struct {
	// Path is the config file.
	Path string `json:"path"`
	// Generation counts the access plans published (reloads and rollout
	// changes).
	Generation uint32 `json:"generation"`
	// LastReload is when the config was last loaded (start or SIGHUP),
	// LastReloadOK whether that worked, LastReloadError why not.
	LastReload      string `json:"last_reload"`
	LastReloadOK    bool   `json:"last_reload_ok"`
	LastReloadError string `json:"last_reload_error,omitempty"`
	// RestartNeeded names the settings changed in the file that take
	// effect only at a restart (a reload changing them was refused).
	RestartNeeded []string `json:"restart_needed,omitempty"`
}

// RolloutStatus is rollout.Status plus the workloads.
type RolloutStatus struct {
	rollout.Status
	Workloads WorkloadsStatus `json:"workloads"`
}

// WorkloadsStatus says how many workloads are configured and whether they
// are served their own roles now.
type WorkloadsStatus struct {
	Configured int  `json:"configured"`
	Active     bool `json:"active"`
}

// CacheEntry is the view of one cache key: never a secret.
type CacheEntry struct {
	Key                 string `json:"key"`
	Kind                string `json:"kind"`
	AccessKeyID         string `json:"access_key_id"`
	Expires             string `json:"expires,omitempty"`
	LastUpdated         string `json:"last_updated,omitempty"`
	LastRefresh         string `json:"last_refresh,omitempty"`
	NextRefresh         string `json:"next_refresh,omitempty"`
	LastError           string `json:"last_error"`
	ErrorClass          string `json:"error_class"`
	Permanent           bool   `json:"permanent"`
	ConsecutiveFailures int    `json:"consecutive_failures"`
	Valid               bool   `json:"valid"`
	Kept                bool   `json:"kept"`
}

// Entry is the CacheEntry of a cache entry.
func Entry(e cache.Entry[creds.Key]) CacheEntry {
	return CacheEntry{
		Key:                 e.Name,
		Kind:                string(e.Key.Kind),
		AccessKeyID:         e.AccessKeyID,
		Expires:             rfc3339(e.Expires),
		LastUpdated:         rfc3339(e.LastUpdated),
		LastRefresh:         rfc3339(e.LastRefresh),
		NextRefresh:         rfc3339(e.NextRefresh),
		LastError:           e.LastError,
		ErrorClass:          e.ErrorClass,
		Permanent:           e.Permanent,
		ConsecutiveFailures: e.ConsecutiveFailures,
		Valid:               e.Valid,
		Kept:                e.Kept,
	}
}

// Readiness is the readiness of the credentials of role (served as key)
// given its cache entry (nil when not cached), and why, in one line, with
// what to check when upstream cannot be reached.
func Readiness(role string, e *cache.Entry[creds.Key]) (bool, string) {
	switch {
	case e == nil:
	case e.Valid && e.Permanent:
		return false, fmt.Sprintf("not ready: the last refresh for role %s failed with a permanent error (%s: %s); still serving cached credentials valid until %s",
			role, e.ErrorClass, e.LastError, e.Expires.UTC().Format(time.RFC3339))
	case e.Valid:
		return true, fmt.Sprintf("ready: credentials for role %s valid until %s", role, e.Expires.UTC().Format(time.RFC3339))
	case e.LastError != "":
		return false, fmt.Sprintf("not ready: no valid credentials for role %s: %s: %s%s", role, e.ErrorClass, e.LastError, hint(e.ErrorClass, e.Key.Kind))
	case e.AccessKeyID != "":
		// Held, no failure, yet not servable: they ran out without a failed
		// refresh, most often because the wall clock stepped forward; the
		// cache refreshes within seconds.
		return false, fmt.Sprintf("not ready: the cached credentials for role %s expire at %s, too soon by the local clock; refreshing (check the host clock if this persists)",
			role, e.Expires.UTC().Format(time.RFC3339))
	}
	return false, fmt.Sprintf("not ready: credentials for role %s not fetched yet", role)
}

// hint says what to check for an error class.
func hint(class string, kind creds.Kind) string {
	switch {
	case kind == creds.KindInstanceProfile && (class == "network" || class == "timeout"):
		return " — check that the daemon reaches the real IMDS (upstream:, 169.254.169.254) and that its own uid is exempt from interception"
	case class == "network" || class == "timeout":
		return " — check: egress and DNS to the regional endpoint (sts.<region>.amazonaws.com, or rolesanywhere.<region>.amazonaws.com), AWS_ENDPOINT_URL_STS / AWS_ENDPOINT_URL if set, and HTTPS_PROXY / NO_PROXY in the daemon's environment"
	case class == "region_disabled":
		return " — check: STS is enabled in this region (IAM account settings), or set region: to one where it is"
	case class == "identity":
		return " — check the identity: section (the token file, command or issuer) and the daemon's logs"
	}
	return ""
}

func rfc3339(t time.Time) string {
	if t.IsZero() {
		return ""
	}
	return t.UTC().Format(time.RFC3339)
}

// GetStatus GETs http://addr/debug/status within timeout (never through an
// HTTP proxy) and returns the document's bytes.
func GetStatus(ctx context.Context, addr string, timeout time.Duration) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+"/debug/status", nil)
	if err != nil {
		return nil, err
	}
	client := &http.Client{Transport: &http.Transport{Proxy: nil}}
	resp, err := client.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return nil, err
	}
	if resp.StatusCode == http.StatusNotFound {
		return nil, errors.New("GET /debug/status: 404 (a daemon older than `imdsproxy status`?)")
	}
	if !strings.HasPrefix(resp.Header.Get("Content-Type"), "application/json") {
		return nil, fmt.Errorf("GET /debug/status: %s, %s", resp.Status, resp.Header.Get("Content-Type"))
	}
	return body, nil
}

// Dialable turns a listen address into one to connect to: an unspecified
// host (":8170", "0.0.0.0:8170", "[::]:8170") becomes loopback. An
// "http://" prefix is tolerated.
func Dialable(addr string) (string, error) {
	addr = strings.TrimSuffix(strings.TrimPrefix(addr, "http://"), "/")
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return "", err
	}
	if port == "" || port == "0" {
		return "", errors.New("a fixed port is needed")
	}
	switch host {
	case "", "0.0.0.0":
		host = "127.0.0.1"
	case "::":
		host = "::1"
	}
	return net.JoinHostPort(host, port), nil
}

// PrintStatus writes the human summary of doc, times relative to now.
func PrintStatus(w io.Writer, addr string, doc Status, now time.Time) {
	line := func(label, format string, a ...any) {
		fmt.Fprintf(w, "%-14s %s\n", label+":", fmt.Sprintf(format, a...))
	}
	yesNo := map[bool]string{true: "yes", false: "NO"}
	version := ""
	if doc.Version != "" {
		version = " " + doc.Version
	}
	fmt.Fprintf(w, "imdsproxy%s, admin %s\n", version, addr)
	line("ready", "%s (%s)", yesNo[doc.Ready], orDash(doc.ReadyReason))
	kind := orDash(doc.ServedKind)
	line("serving", "role %s (%s credentials)", orDash(doc.ServedRoleName), kind)
	workload := orDash(doc.RoleName)
	if doc.RoleARN != "" {
		workload += " (" + doc.RoleARN + ")"
	}
	line("role", "%s via %s", workload, orDash(doc.Source))
	c := doc.Config
	if c.Path != "" {
		ok := "ok"
		if !c.LastReloadOK {
			ok = "REFUSED: " + orDash(c.LastReloadError) + " (the running configuration is kept)"
		}
		line("config", "%s, generation %d, last load %s: %s", c.Path, c.Generation, when(c.LastReload, now), ok)
	}
	if len(c.RestartNeeded) > 0 {
		line("restart", "NEEDED: %s changed in the file; these take effect only at a restart", strings.Join(c.RestartNeeded, ", "))
	}
	for _, d := range doc.Doors {
		detail := strings.Join(d.Listen, ", ")
		if d.URL != "" {
			detail = d.URL
		}
		if d.Door == "container" {
			rotated := "not since start"
			if d.LastRotation != "" {
				rotated = when(d.LastRotation, now)
			}
			detail += fmt.Sprintf("; %d workload tokens, rotated every %s (a replaced one accepted for %s), last %s",
				d.Tokens, orDash(d.RotateInterval), orDash(d.RotateOverlap), rotated)
		}
		line("door "+d.Door, "%s", detail)
	}

	ro := doc.Rollout
	if !ro.Enabled {
		line("rollout", "disabled (no rollout.policy: the configured source is always served)")
	} else {
		stage := orDash(string(ro.Stage))
		if ro.Stage == rollout.StageCanary {
			stage = fmt.Sprintf("canary %d%%", ro.Percent)
		}
		line("stage", "%s — %s", stage, orDash(ro.Reason))
		group := orDash(ro.Group)
		if ro.GroupSource != "" {
			group += " (from " + ro.GroupSource + ")"
		}
		line("group", "%s", group)
		line("bucket", "%d of 0..9999 (canary N%% takes buckets below N×100; canary percent %d)", ro.Bucket, ro.Percent)
		ks := "off"
		if ro.KillSwitch {
			ks = "ON: every group is off"
		}
		line("kill switch", "%s", ks)
		line("fallback", "%s", orDash(ro.Fallback))
		p := ro.Policy
		line("policy", "version %s from %s", orDash(p.Version), orDash(p.Source))
		line("  last load", "%s; last success %s", when(p.LastLoad, now), when(p.LastSuccess, now))
		if p.LastError != "" {
			line("  last error", "%s (the last good policy stays in force)", p.LastError)
		}
		s := ro.ShadowCheck
		switch {
		case s.LastCheck == "" && !ro.Shadow:
			line("shadow", "not running")
		case s.LastCheck == "":
			line("shadow", "running, no verification yet")
		default:
			detail := s.LastARN
			if s.LastError != "" {
				detail = s.LastError
			}
			line("shadow", "%s at %s: %s", orDash(s.LastResult), when(s.LastCheck, now), orDash(detail))
		}
	}
	switch wl := ro.Workloads; {
	case wl.Configured == 0:
	case wl.Active:
		line("workloads", "%d configured, active: each is served its own role", wl.Configured)
	default:
		line("workloads", "%d configured, inactive: every client is served the instance profile", wl.Configured)
	}

	if len(doc.Cache) == 0 {
		line("cache", "empty")
	}
	for _, e := range doc.Cache {
		switch {
		case e.Valid:
			line("cache "+e.Key, "%s, valid until %s", orDash(e.AccessKeyID), until(e.Expires, now))
		case e.Expires != "":
			line("cache "+e.Key, "%s, NOT valid (expires %s)", orDash(e.AccessKeyID), until(e.Expires, now))
		default:
			line("cache "+e.Key, "no valid credentials")
		}
		line("  next refresh", "%s", when(e.NextRefresh, now))
		if e.LastError != "" {
			class := ""
			if e.ErrorClass != "" {
				class = e.ErrorClass + ": "
			}
			line("  last error", "%s%s", class, e.LastError)
		}
	}
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// when renders an RFC 3339 time with its distance from now.
func when(ts string, now time.Time) string {
	t, err := time.Parse(time.RFC3339, ts)
	if err != nil {
		return orDash(ts)
	}
	d := t.Sub(now).Round(time.Second)
	switch {
	case d > 0:
		return fmt.Sprintf("%s (in %s)", ts, d)
	case d < 0:
		return fmt.Sprintf("%s (%s ago)", ts, -d)
	}
	return ts + " (now)"
}

// until renders an expiry with the time left.
func until(ts string, now time.Time) string {
	t, err := time.Parse(time.RFC3339, ts)
	if err != nil {
		return orDash(ts)
	}
	if d := t.Sub(now).Round(time.Second); d > 0 {
		return fmt.Sprintf("%s (%s left)", ts, d)
	}
	return ts + " (expired)"
}
