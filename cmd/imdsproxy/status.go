package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"time"
)

// Exit codes of `imdsproxy status` beyond exitOK (ready) and exitUsage.
const (
	exitStatusNotReady    = exitError // the daemon answered: not ready
	exitStatusUnreachable = 3         // the admin endpoint did not answer /debug/status
)

// statusTimeout bounds the whole GET of /debug/status.
const statusTimeout = 5 * time.Second

const statusUsage = `Usage: imdsproxy status [--admin HOST:PORT] [--config FILE] [--json]

Asks the running daemon's admin listener (GET /debug/status) and prints a
summary: readiness and why, the rollout stage and why, the instance group and
bucket, the policy, the role served, each cached credential's expiry and next
refresh, and the last shadow verification. With --config the admin address is
the file's admin_listen (unless --admin is given too). --json prints the
document as the daemon sent it.

Exit codes: 0 ready, 1 not ready, 2 usage error, 3 admin endpoint unreachable.
`

// cliStatusDoc is the /debug/status document as `imdsproxy status` reads it.
// Unknown fields are ignored and missing ones left zero, so the command keeps
// working across daemon versions.
type cliStatusDoc struct {
	Ready          bool            `json:"ready"`
	ReadyReason    string          `json:"ready_reason"`
	Version        string          `json:"version"`
	Source         string          `json:"source"`
	RoleARN        string          `json:"role_arn"`
	RoleName       string          `json:"role_name"`
	Rollout        cliRollout      `json:"rollout"`
	ServedRoleName string          `json:"served_role_name"`
	Cache          []cliCacheEntry `json:"cache"`
}

type cliRollout struct {
	Enabled      bool      `json:"enabled"`
	Stage        string    `json:"stage"`
	Percent      int       `json:"percent"`
	Group        string    `json:"group"`
	GroupSource  string    `json:"group_source"`
	Bucket       *int      `json:"bucket"`
	Serve        string    `json:"serve"`
	Shadow       bool      `json:"shadow"`
	KillSwitch   bool      `json:"kill_switch"`
	Reason       string    `json:"reason"`
	Fallback     string    `json:"fallback"`
	Policy       cliPolicy `json:"policy"`
	ShadowStatus cliShadow `json:"shadow_status"`
	Workloads    struct {
		Configured int  `json:"configured"`
		Active     bool `json:"active"`
	} `json:"workloads"`
}

type cliPolicy struct {
	Source      string `json:"source"`
	Version     string `json:"version"`
	LastLoad    string `json:"last_load"`
	LastSuccess string `json:"last_success"`
	LastError   string `json:"last_error"`
}

type cliShadow struct {
	LastCheck  string `json:"last_check"`
	LastResult string `json:"last_result"`
	LastARN    string `json:"last_arn"`
	LastError  string `json:"last_error"`
}

type cliCacheEntry struct {
	Key         string `json:"key"`
	AccessKeyID string `json:"access_key_id"`
	Expires     string `json:"expires"`
	NextRefresh string `json:"next_refresh"`
	LastError   string `json:"last_error"`
	ErrorClass  string `json:"error_class"`
	Valid       bool   `json:"valid"`
}

// runStatus is `imdsproxy status`.
func runStatus(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("status", flag.ContinueOnError)
	fs.SetOutput(stderr)
	admin := fs.String("admin", "127.0.0.1:8170", "address of the daemon's admin listener")
	cfgPath := fs.String("config", "", "the daemon's config file: use its admin_listen")
	asJSON := fs.Bool("json", false, "print the /debug/status document as received")
	fs.Usage = func() { fmt.Fprint(stderr, statusUsage) }
	if err := fs.Parse(args); err != nil {
		return flagExit(err)
	}
	if fs.NArg() != 0 {
		fs.Usage()
		return exitUsage
	}
	adminSet := false
	fs.Visit(func(f *flag.Flag) { adminSet = adminSet || f.Name == "admin" })
	addr := *admin
	if *cfgPath != "" && !adminSet {
		cfg, err := loadConfig(*cfgPath)
		if err != nil {
			fmt.Fprintf(stderr, "imdsproxy status: %v\n", err)
			return exitUsage
		}
		addr = cfg.AdminListen
	}
	addr, err := dialableAdmin(addr)
	if err != nil {
		fmt.Fprintf(stderr, "imdsproxy status: --admin %q: %v\n", *admin, err)
		return exitUsage
	}

	raw, err := getStatus(ctx, addr)
	if err != nil {
		fmt.Fprintf(stderr, "imdsproxy status: the admin endpoint at %s is unreachable: %v\n", addr, err)
		return exitStatusUnreachable
	}
	var doc cliStatusDoc
	if err := json.Unmarshal(raw, &doc); err != nil {
		fmt.Fprintf(stderr, "imdsproxy status: %s answered /debug/status with something that is not the status document: %v\n", addr, err)
		return exitStatusUnreachable
	}
	if *asJSON {
		_, _ = stdout.Write(raw)
		if len(raw) > 0 && raw[len(raw)-1] != '\n' {
			fmt.Fprintln(stdout)
		}
	} else {
		printStatus(stdout, addr, doc, time.Now())
	}
	if !doc.Ready {
		return exitStatusNotReady
	}
	return exitOK
}

// dialableAdmin turns a listen address into one to connect to: an
// unspecified host (":8170", "0.0.0.0:8170", "[::]:8170") becomes loopback.
// An "http://" prefix is tolerated.
func dialableAdmin(addr string) (string, error) {
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

// getStatus GETs http://addr/debug/status within statusTimeout.
func getStatus(ctx context.Context, addr string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, statusTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+"/debug/status", nil)
	if err != nil {
		return nil, err
	}
	// The admin listener is on loopback: never go through a proxy.
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

// printStatus writes the human summary of doc, times relative to now.
func printStatus(w io.Writer, addr string, doc cliStatusDoc, now time.Time) {
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

	kind := "workload"
	if doc.Rollout.Enabled && doc.Rollout.Serve != "" {
		kind = doc.Rollout.Serve
	}
	line("serving", "role %s (%s credentials)", orDash(doc.ServedRoleName), kind)
	workload := orDash(doc.RoleName)
	if doc.RoleARN != "" {
		workload += " (" + doc.RoleARN + ")"
	}
	line("workload role", "%s via %s", workload, orDash(doc.Source))

	ro := doc.Rollout
	if !ro.Enabled {
		line("rollout", "off (no rollout.policy configured: the workload role is always served)")
	} else {
		stage := orDash(ro.Stage)
		if ro.Stage == "canary" {
			stage = fmt.Sprintf("canary %d%%", ro.Percent)
		}
		line("stage", "%s — %s", stage, orDash(ro.Reason))
		group := orDash(ro.Group)
		if ro.GroupSource != "" {
			group += " (from " + ro.GroupSource + ")"
		}
		line("group", "%s", group)
		bucket := "-"
		if ro.Bucket != nil {
			bucket = fmt.Sprint(*ro.Bucket)
		}
		line("bucket", "%s of 0..9999 (canary N%% takes buckets below N×100; canary percent %d)", bucket, ro.Percent)
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
		s := ro.ShadowStatus
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
		switch w := ro.Workloads; {
		case w.Configured == 0:
		case w.Active:
			line("workloads", "%d configured, active: each is served its own role", w.Configured)
		default:
			line("workloads", "%d configured, inactive: every client is served the instance profile", w.Configured)
		}
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
