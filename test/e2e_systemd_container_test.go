package test

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/imdsproxy/imdsproxy/test/e2e"
)

// The container credentials endpoint as docs/deploy.md ("The container
// credentials endpoint") has an operator set it up on a host with the
// packaged units: the test takes the service's drop-in and the workload's
// commands from the document itself, so that the document is what runs.

// Names of the workload the procedure is run for.
const (
	ctWorkloadUnit    = "billing.service"
	ctWorkloadRole    = "billing"
	ctWorkloadRoleARN = "arn:aws:iam::111122223333:role/" + ctWorkloadRole
	ctWorkloadUID     = "5" // User= of the unit (games on Debian; not nobody, which systemd warns of), token_owners of the config
	ctWorkloadToken   = "/run/imdsproxy/container/" + ctWorkloadUnit + "/token"
	ctWorkloadOut     = "/run/" + ctWorkloadUnit + ".out" // what the unit printed, written before it exits
)

// containerEndpointAsDocumented runs the procedure on the booted container:
// the workload and container: in the config, the service's drop-in from the
// document, daemon-reload and a restart; then, for a workload unit running
// the Go SDK's default chain, the document's commands (imdsproxy workload env
// into the unit's drop-in, daemon-reload, restart of the unit). It checks
// that the SDK in the unit gets the workload's role through the endpoint,
// that the token file is the workload's alone, and that another unit of the
// same uid holding the token is refused. It returns the token, a secret the
// journal must not hold.
func (c *systemdContainer) containerEndpointAsDocumented(t *testing.T, ctx context.Context) string {
	t.Helper()
	etc := filepath.Join(c.dir, "etc") // the container's /etc
	serviceDropIn, commands := deployDocContainerSteps(t)

	// The config: a workload and the endpoint (docs/configuration.md).
	cfgPath := filepath.Join(etc, "imdsproxy", "config.yaml")
	f, err := os.OpenFile(cfgPath, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	_, err = f.WriteString("\nworkloads:\n  - unit: " + ctWorkloadUnit + "\n    role: {arn: \"" + ctWorkloadRoleARN + "\", name: " + ctWorkloadRole + "}\n" +
		"container:\n  enabled: true\n  token_owners: {" + ctWorkloadUnit + ": " + ctWorkloadUID + "}\n")
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		t.Fatal(err)
	}
	// The service's drop-in, as the document writes it.
	c.writeDocDropIn(t, serviceDropIn)
	c.must(t, ctx, "systemctl", "daemon-reload")
	c.must(t, ctx, "systemctl", "restart", "imdsproxy.service")
	c.waitActive(t, 30*time.Second, "imdsproxy.service")
	if out, err := c.run(ctx, "systemctl", "is-active", "imdsproxy-container.socket"); err != nil || strings.TrimSpace(out) != "active" {
		t.Fatalf("imdsproxy-container.socket after the drop-in: %q (%v); want active (Requires= of the drop-in)", strings.TrimSpace(out), err)
	}
	if got := strings.TrimSpace(c.must(t, ctx, "stat", "-c", "%u %a", ctWorkloadToken)); got != ctWorkloadUID+" 400" {
		t.Errorf("%s: owner and mode %q; want %q (the workload's uid alone may read it: CAP_CHOWN of the drop-in)", ctWorkloadToken, got, ctWorkloadUID+" 400")
	}
	if out, err := c.runAs(ctx, "1", nil, "cat", ctWorkloadToken); err == nil {
		t.Errorf("uid 1 read the workload's token file (%d bytes); want permission denied", len(out))
	}

	// The workload: an existing unit whose program resolves credentials with
	// aws-sdk-go-v2's default chain (test/fakes/cmd/imdsclient creds) as uid
	// ctWorkloadUID, with no credentials of its own: without the endpoint it
	// would fall back to IMDS and get the host's role. (Debian 12's AWS CLI
	// and boto3 do not read AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE:
	// docs/configuration.md.)
	writeEtc(t, filepath.Join(etc, "systemd", "system", ctWorkloadUnit), `[Unit]
Description=a workload of its own role (imdsproxy e2e)

[Service]
Type=oneshot
User=`+ctWorkloadUID+`
Environment=HOME=/tmp AWS_REGION=us-east-1 AWS_CONFIG_FILE=/nonexistent/config AWS_SHARED_CREDENTIALS_FILE=/nonexistent/credentials
ExecStart=/opt/imdsproxy/bin/imdsclient creds
StandardOutput=truncate:`+ctWorkloadOut+`
`)
	// The document's commands, with the binary where `make install
	// PREFIX=/opt/imdsproxy` puts it on the PATH.
	if out, err := c.runAs(ctx, "0", []string{"PATH=/opt/imdsproxy/bin:/usr/sbin:/usr/bin:/sbin:/bin"}, "/bin/sh", "-ec", commands); err != nil {
		t.Fatalf("docs/deploy.md's commands for the workload:\n%s\nfailed: %v\n%s\n%s", commands, err, out, e2e.TailLines(c.journal(ctx, ""), 60))
	}
	out := c.must(t, ctx, "cat", ctWorkloadOut)
	var got struct{ AccessKeyId string } //nolint:revive // wire name
	if err := json.Unmarshal([]byte(out), &got); err != nil || got.AccessKeyId == "" {
		t.Fatalf("the Go SDK in %s printed %q (%v); want its credentials\n%s", ctWorkloadUnit, out, err, e2e.TailLines(c.journal(ctx, ""), 40))
	}
	// The fake STS logs the role of every access key id it issues (after
	// answering, through journald: wait for it).
	var issuedTo string
	deadline := time.Now().Add(10 * time.Second)
	for issuedTo == "" && time.Now().Before(deadline) {
		for _, l := range strings.Split(c.journal(ctx, "fakests.service"), "\n") {
			if strings.Contains(l, " access_key_id="+got.AccessKeyId+" ") {
				issuedTo = l
			}
		}
		if issuedTo == "" {
			time.Sleep(100 * time.Millisecond)
		}
	}
	if !strings.Contains(issuedTo, " role="+ctWorkloadRoleARN+" ") {
		t.Fatalf("%s got access key id %s; want one the fake STS issued for %s (its log: %q)", ctWorkloadUnit, got.AccessKeyId, ctWorkloadRoleARN, issuedTo)
	}
	t.Logf("the Go SDK in %s, set up as docs/deploy.md says, got %s's credentials (%s)", ctWorkloadUnit, ctWorkloadRole, got.AccessKeyId)

	// The token alone is not enough: another unit of the same uid with it
	// is refused. (The token is read inside the unit: a transient unit's
	// command line is logged.)
	tok := strings.TrimSpace(c.must(t, ctx, "cat", ctWorkloadToken))
	code, err := c.run(ctx, "systemd-run", "--quiet", "--wait", "--pipe", "--uid="+ctWorkloadUID, "--",
		"/bin/sh", "-c", `exec /usr/bin/curl -sS -o /dev/null -w '%{http_code}' --max-time 10 -H "Authorization: $(cat `+ctWorkloadToken+`)" http://127.0.0.1:8171/v1/credentials`)
	if err != nil || strings.TrimSpace(code) != "403" {
		t.Errorf("another unit of uid %s with %s's token: %q (%v); want 403", ctWorkloadUID, ctWorkloadUnit, strings.TrimSpace(code), err)
	}
	return tok
}

// deployDocContainerSteps returns, from docs/deploy.md's section "The
// container credentials endpoint", the ini block of the service's drop-in
// and the sh block of the workload's commands.
func deployDocContainerSteps(t *testing.T) (serviceDropIn, commands string) {
	t.Helper()
	const section = "The container credentials endpoint"
	for _, block := range deployDocBlocks(t, section) {
		switch {
		case block.lang == "ini" && strings.HasPrefix(block.text, "# /etc/systemd/system/imdsproxy.service.d/"):
			serviceDropIn = block.text
		case block.lang == "sh" && strings.Contains(block.text, "imdsproxy workload env "+ctWorkloadUnit):
			commands = block.text
		}
	}
	if serviceDropIn == "" || commands == "" {
		t.Fatalf("docs/deploy.md, %q: found drop-in %t, workload commands for %s %t; update the test with the document",
			section, serviceDropIn != "", ctWorkloadUnit, commands != "")
	}
	return serviceDropIn, commands
}

// deployDocBlocks returns the fenced blocks of docs/deploy.md's section
// "## heading".
func deployDocBlocks(t *testing.T, heading string) []fenced {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(repoRoot, "docs", "deploy.md"))
	if err != nil {
		t.Fatal(err)
	}
	doc := string(b)
	start := strings.Index(doc, "\n## "+heading+"\n")
	if start < 0 {
		t.Fatalf("docs/deploy.md has no section %q; update the test", heading)
	}
	section := doc[start+1:]
	if end := strings.Index(section, "\n## "); end >= 0 {
		section = section[:end]
	}
	return fencedBlocks(section)
}

// writeDocDropIn writes, under the container's /etc, a drop-in block of
// the document, which names its path in its first line (# /etc/...).
func (c *systemdContainer) writeDocDropIn(t *testing.T, dropIn string) {
	t.Helper()
	first, _, _ := strings.Cut(dropIn, "\n")
	rel, ok := strings.CutPrefix(first, "# /etc/")
	if !ok {
		t.Fatalf("docs/deploy.md: a drop-in starts %q; want its path in a comment (# /etc/...)", first)
	}
	writeEtc(t, filepath.Join(c.dir, "etc", rel), dropIn)
}

// fenced is a fenced code block of a markdown document.
type fenced struct{ lang, text string }

// fencedBlocks returns the ``` blocks of doc, in order.
func fencedBlocks(doc string) []fenced {
	var out []fenced
	for {
		i := strings.Index(doc, "```")
		if i < 0 {
			return out
		}
		rest := doc[i+3:]
		lang, body, ok := strings.Cut(rest, "\n")
		if !ok {
			return out
		}
		j := strings.Index(body, "```")
		if j < 0 {
			return out
		}
		out = append(out, fenced{lang: strings.TrimSpace(lang), text: body[:j]})
		doc = body[j+3:]
	}
}

// writeEtc writes a file of the container's /etc (path on the host),
// creating its directory.
func writeEtc(t *testing.T, path, content string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	writeFile(t, path, content, 0o644)
}

// memoryAsDocumented runs docs/deploy.md's "Memory" procedure on the booted
// container: the daemon starts with GOGC 200 (go_gc_gogc_percent on the
// admin socket); the document's drop-in and commands (daemon-reload, restart)
// make it 100.
func (c *systemdContainer) memoryAsDocumented(t *testing.T, ctx context.Context) {
	t.Helper()
	var dropIn, commands string
	for _, block := range deployDocBlocks(t, "Memory") {
		switch {
		case block.lang == "ini" && strings.Contains(block.text, "Environment=GOGC="):
			dropIn = block.text
		case block.lang == "sh" && strings.Contains(block.text, "systemctl restart imdsproxy.service"):
			commands = block.text
		}
	}
	if dropIn == "" || commands == "" {
		t.Fatalf("docs/deploy.md, \"Memory\": found drop-in %t, commands %t; update the test with the document", dropIn != "", commands != "")
	}
	gogc := func() float64 {
		m, _, err := e2e.ScrapeMetrics(c.httpClient(10*time.Second), "http://127.0.0.1:8170")
		if err != nil {
			t.Fatalf("/metrics: %v", err)
		}
		v, ok := m.Value("go_gc_gogc_percent", nil)
		if !ok {
			t.Fatal("/metrics has no go_gc_gogc_percent")
		}
		return v
	}
	if v := gogc(); v != 200 {
		t.Errorf("go_gc_gogc_percent of the packaged service: %v; want 200 (the daemon's default)", v)
	}
	c.writeDocDropIn(t, dropIn)
	if out, err := c.run(ctx, "/bin/sh", "-ec", commands); err != nil {
		t.Fatalf("docs/deploy.md's commands for the memory drop-in:\n%s\nfailed: %v\n%s", commands, err, out)
	}
	c.waitActive(t, 30*time.Second, "imdsproxy.service")
	if v := gogc(); v != 100 {
		t.Errorf("go_gc_gogc_percent after docs/deploy.md's memory drop-in: %v; want 100", v)
	}
}
