package main

import (
	"bytes"
	"context"
	"encoding/json"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}
func (l *lockedBuffer) String() string { l.mu.Lock(); defer l.mu.Unlock(); return l.b.String() }

// TestInstanceDir: -instance-dir writes the AEMM config (0600), the CA
// certificate and the instance's public facts, and the log never holds the
// instance profile's secret.
func TestInstanceDir(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "instance")
	ctx, cancel := context.WithCancel(context.Background())
	var out lockedBuffer
	done := make(chan error, 1)
	go func() {
		done <- run(ctx, []string{"-sts-listen", "127.0.0.1:0", "-issuer-url", "http://127.0.0.1:1",
			"-trust", "arn:aws:iam::222222222222:role/app=app,app-*", "-instance-dir", dir, "-instance-account", "123456789012"}, &out)
	}()
	cfg := filepath.Join(dir, "aemm-config.json")
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := os.Stat(cfg); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no %s:\n%s", cfg, out.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	if fi, err := os.Stat(cfg); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("aemm-config.json: %v %v", fi, err)
	}
	var facts instanceFacts
	b, err := os.ReadFile(filepath.Join(dir, "instance.json"))
	if err != nil || json.Unmarshal(b, &facts) != nil || facts.AccountID != "123456789012" || !strings.HasPrefix(facts.InstanceID, "i-") {
		t.Fatalf("instance.json %s %v", b, err)
	}
	if pemb, err := os.ReadFile(filepath.Join(dir, "iid-ca.pem")); err != nil || !bytes.Contains(pemb, []byte("BEGIN CERTIFICATE")) {
		t.Fatalf("iid-ca.pem: %v", err)
	}
	var aemm struct {
		Metadata struct {
			Values struct {
				Creds struct{ SecretAccessKey, Token string } `json:"iam-security-credentials"`
			} `json:"values"`
		} `json:"metadata"`
	}
	b, _ = os.ReadFile(cfg)
	if err := json.Unmarshal(b, &aemm); err != nil || aemm.Metadata.Values.Creds.SecretAccessKey == "" {
		t.Fatalf("aemm-config.json: %v", err)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	log := out.String()
	if strings.Contains(log, aemm.Metadata.Values.Creds.SecretAccessKey) || strings.Contains(log, aemm.Metadata.Values.Creds.Token) {
		t.Fatal("the log holds the instance profile's secret")
	}
	if !strings.Contains(log, "trust: arn:aws:iam::222222222222:role/app=app,app-*") {
		t.Fatalf("log:\n%s", log)
	}
}

func TestFlags(t *testing.T) {
	for _, args := range [][]string{
		{"-trust", "role=app"},
		{"-trust", "arn:aws:iam::1:role/a="},
		{"-trust", "arn:aws:iam::1:role/a=a,,b"},
		{"-issuer-url", "http://127.0.0.1:1", "-token-file", "/tmp/x"},
		{"-jwks-url", "http://127.0.0.1:1/jwks"},
		{"extra"},
	} {
		ln, _ := net.Listen("tcp", "127.0.0.1:0") // keep the default ports out of it
		addr := ln.Addr().String()
		ln.Close()
		if err := run(context.Background(), append([]string{"-sts-listen", addr, "-issuer-listen", "127.0.0.1:0"}, args...), &bytes.Buffer{}); err == nil {
			t.Errorf("run(%q) accepted", args)
		}
	}
}
