package main

import (
	"bytes"
	"context"
	"os"
	"strings"
	"testing"

	"github.com/imdsproxy/imdsproxy/proxy"
)

func TestRunCommands(t *testing.T) {
	cases := []struct {
		name       string
		args       []string
		code       int
		wantOut    string
		wantErr    string
		notWantErr string
		region     string // AWS_REGION of the run; none set otherwise
	}{
		{name: "no args", args: nil, code: exitUsage, wantErr: "Usage:"},
		{name: "unknown", args: []string{"frobnicate"}, code: exitUsage, wantErr: `unknown command "frobnicate"`},
		{name: "help", args: []string{"help"}, code: exitOK, wantOut: "check-config"},
		{name: "version", args: []string{"version"}, code: exitOK, wantOut: "imdsproxy "},
		{name: "check good", args: []string{"check-config", "testdata/good/full.yaml"}, code: exitOK, wantOut: "ok (source web-identity"},
		{name: "check good flag", args: []string{"check-config", "--config", "testdata/good/minimal.yaml"}, code: exitOK, wantOut: "app-prod",
			notWantErr: "every interface", region: "eu-west-1"},
		{name: "check no region", args: []string{"check-config", "testdata/good/minimal.yaml"}, code: exitConfig,
			wantErr: "set region: in the config file, or AWS_REGION in the daemon's environment"},
		{name: "check token file missing", args: []string{"check-config", "testdata/good/minimal.yaml"}, code: exitOK,
			wantErr: "warning: identity.jwt_file /run/imdsproxy/token.jwt does not exist yet", region: "eu-west-1"},
		{name: "check wildcard listen", args: []string{"check-config", "testdata/good/wildcard-listen.yaml"}, code: exitOK, wantOut: "listen 0.0.0.0:8169",
			wantErr: "warning: 0.0.0.0:8169: the IMDS listener accepts connections on every interface", region: "eu-west-1"},
		{name: "check admin off loopback", args: []string{"check-config", "testdata/good/admin-exposed.yaml"}, code: exitOK,
			wantErr: "warning: admin_listen 0.0.0.0:8170: the admin listener is not on a loopback address", region: "eu-west-1"},
		{name: "check aws_iam subjects and rollout", args: []string{"check-config", "testdata/good/iam-subjects-rollout.yaml"}, code: exitOK,
			wantErr: "warning: identity.attestation aws_iam with workloads[].subject and a rollout", region: "eu-west-1"},
		{name: "check aws_iid subjects no warning", args: []string{"check-config", "testdata/good/workloads.yaml"}, code: exitOK,
			notWantErr: "aws_iam", region: "eu-west-1"},
		{name: "check unknown key", args: []string{"check-config", "testdata/bad/unknown-key.yaml"}, code: exitConfig, wantErr: "role.nmae"},
		{name: "check bad tokens", args: []string{"check-config", "testdata/bad/bad-tokens.yaml"}, code: exitConfig, wantErr: "imds.tokens"},
		{name: "check bad duration", args: []string{"check-config", "testdata/bad/bad-duration.yaml"}, code: exitConfig, wantErr: "role.duration"},
		{name: "check bad arn", args: []string{"check-config", "testdata/bad/bad-arn.yaml"}, code: exitConfig, wantErr: "role.arn"},
		{name: "check no identity", args: []string{"check-config", "testdata/bad/no-identity.yaml"}, code: exitConfig, wantErr: "identity.jwt_file"},
		{name: "check missing file", args: []string{"check-config", "testdata/nope.yaml"}, code: exitConfig, wantErr: "no such file"},
		{name: "check no arg", args: []string{"check-config"}, code: exitUsage, wantErr: "Usage"},
		{name: "check two args", args: []string{"check-config", "a", "b"}, code: exitUsage, wantErr: "Usage"},
		{name: "serve bad flag", args: []string{"serve", "--bogus"}, code: exitUsage, wantErr: "bogus"},
		{name: "serve bad level", args: []string{"serve", "--log-level", "loud"}, code: exitUsage, wantErr: "--log-level"},
		{name: "serve bad format", args: []string{"serve", "--log-format", "xml"}, code: exitUsage, wantErr: "--log-format"},
		{name: "serve stray arg", args: []string{"serve", "extra"}, code: exitUsage, wantErr: "Usage"},
		{name: "serve bad config", args: []string{"serve", "--config", "testdata/bad/bad-tokens.yaml"}, code: exitConfig, wantErr: "imds.tokens"},
		{name: "serve missing config", args: []string{"serve", "--config", "testdata/none.yaml"}, code: exitConfig, wantErr: "no such file"},
	}
	t.Setenv("AWS_DEFAULT_REGION", "")
	t.Setenv("AWS_CONFIG_FILE", os.DevNull)
	t.Setenv("AWS_SHARED_CREDENTIALS_FILE", os.DevNull)
	t.Setenv("AWS_PROFILE", "")
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Setenv("AWS_REGION", tc.region)
			var out, errOut bytes.Buffer
			code := run(context.Background(), tc.args, &out, &errOut)
			if code != tc.code {
				t.Fatalf("exit %d, want %d\nstdout: %s\nstderr: %s", code, tc.code, out.String(), errOut.String())
			}
			if tc.wantOut != "" && !strings.Contains(out.String(), tc.wantOut) {
				t.Errorf("stdout %q lacks %q", out.String(), tc.wantOut)
			}
			if tc.wantErr != "" && !strings.Contains(errOut.String(), tc.wantErr) {
				t.Errorf("stderr %q lacks %q", errOut.String(), tc.wantErr)
			}
			if tc.notWantErr != "" && strings.Contains(errOut.String(), tc.notWantErr) {
				t.Errorf("stderr %q has %q", errOut.String(), tc.notWantErr)
			}
		})
	}
}

// TestUsageNamesEveryCommand keeps --help true to the code.
func TestUsageNamesEveryCommand(t *testing.T) {
	for _, cmd := range []string{"serve", "check-config", "version", "--config", "--log-format", "--log-level", "SIGHUP", "SIGTERM"} {
		if !strings.Contains(usageText, cmd) {
			t.Errorf("usage text does not mention %s", cmd)
		}
	}
}

func TestWildcardAddr(t *testing.T) {
	for addr, want := range map[string]bool{
		"0.0.0.0:8169": true, "[::]:8169": true, ":8169": true,
		"127.0.0.1:8169": false, "[::1]:8169": false, "172.17.0.1:8169": false,
		"localhost:8169": false, "garbage": false,
	} {
		if got := proxy.Exposed(addr); got != want {
			t.Errorf("proxy.Exposed(%q) = %v, want %v", addr, got, want)
		}
	}
}
