# imdsproxy — see README.md. Every target works on a fresh Debian machine as root.
SHELL := /bin/bash
GO ?= go
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo devel)
LDFLAGS := -s -w -X main.version=$(VERSION)
BIN := bin/imdsproxy
ISSUER_BIN := bin/imdsproxy-issuer
TOOLS := $(CURDIR)/bin/tools
AEMM := $(TOOLS)/ec2-metadata-mock
AEMM_VERSION := v1.13.0
RAH := $(TOOLS)/rolesanywhere-credential-helper
RAH_VERSION := v1.4.0
FAKESTS := bin/fakests
FUZZTIME ?= 1m
PREFIX ?= /usr/local

.PHONY: all build demo test test-deps unit e2e bench fuzz lint install uninstall clean tools

all: build

build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags "$(LDFLAGS)" -o $(BIN) ./cmd/imdsproxy
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags "$(LDFLAGS)" -o $(ISSUER_BIN) ./cmd/imdsproxy-issuer

$(FAKESTS): $(shell find test/fakes -name '*.go' 2>/dev/null)
	$(GO) build -o $(FAKESTS) ./test/fakes/cmd/fakests

# The stand-in for the real IMDS (pass-through paths), AWS's own mock.
$(AEMM):
	mkdir -p $(TOOLS)
	GOBIN=$(TOOLS) $(GO) install github.com/aws/amazon-ec2-metadata-mock/cmd/ec2-metadata-mock@$(AEMM_VERSION)

# The IAM Roles Anywhere credential helper (aws_signing_helper), AWS's own
# signer: make test checks the fake Roles Anywhere against it
# (TestRolesAnywhereHelperInterop) and make bench measures its serve beside
# the daemon (the fastest peer issue 13 found). It is built with cgo
# (PKCS#11), so gcc (Debian's package) is installed first. Both targets go
# on without it, saying so, when it cannot be built.
$(RAH):
	@command -v gcc >/dev/null 2>&1 || { \
		echo "installing gcc (Debian package): the Roles Anywhere credential helper is built with cgo"; \
		apt-get install -y gcc >/dev/null 2>&1 || { apt-get update >/dev/null && apt-get install -y gcc >/dev/null; }; }
	mkdir -p $(TOOLS)
	GOBIN=$(TOOLS) CGO_ENABLED=1 $(GO) install github.com/aws/rolesanywhere-credential-helper@$(RAH_VERSION)

tools: $(AEMM) $(FAKESTS)

# demo: the whole chain on loopback: a stand-in EC2 instance, imdsproxy-issuer,
# the daemon with a workload, a fake STS verifying the issuer's tokens; the
# AWS CLI gets credentials through it, then it prints what to type. Ctrl-C
# stops everything and keeps the logs. demo-deps.sh installs only what the
# demo needs (awscli, curl, openssl), and says so first.
demo: build tools
	./scripts/demo-deps.sh
	./scripts/demo.sh

# test-deps installs the real SDK clients the end-to-end tests drive:
# Debian's awscli and python3-boto3, nftables and iproute2, and the
# JavaScript SDK v3 from npm (pinned in test/js/package-lock.json).
test-deps: tools
	./scripts/test-deps.sh

unit:
	$(GO) test -race -count=1 $$($(GO) list ./... | grep -v '/test$$')

e2e: build tools
	IMDSPROXY_BIN=$(CURDIR)/$(BIN) AEMM_BIN=$(AEMM) RAH_BIN=$(RAH) $(GO) test -race -count=1 -timeout 15m ./test/
	IMDSPROXY_CLOCK_STEP=1 IMDSPROXY_BIN=$(CURDIR)/$(BIN) AEMM_BIN=$(AEMM) $(GO) test -race -count=1 -timeout 5m -run '^TestClockStepReal$$' ./test/

# test: everything CI runs — formatting, vet, unit tests and fuzz seed corpora
# (with the race detector), and the end-to-end tests against the built binary.
test: test-deps build lint
	@$(MAKE) --no-print-directory $(RAH) || \
		echo "test: *** could not build AWS's Roles Anywhere credential helper: TestRolesAnywhereHelperInterop skips ***" >&2
	IMDSPROXY_BIN=$(CURDIR)/$(BIN) AEMM_BIN=$(AEMM) RAH_BIN=$(RAH) $(GO) test -race -count=1 -timeout 20m ./...
	IMDSPROXY_CLOCK_STEP=1 IMDSPROXY_BIN=$(CURDIR)/$(BIN) AEMM_BIN=$(AEMM) $(GO) test -race -count=1 -timeout 5m -run '^TestClockStepReal$$' ./test/

# lint also checks and unit-tests the Prometheus rules (docs/metrics.md and
# docs/issuer.md, "Alerts") with promtool, from Debian's prometheus package (test-deps).
lint:
	@unformatted=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	if [ -n "$$unformatted" ]; then echo "gofmt would change: $$unformatted"; exit 1; fi
	$(GO) vet ./...
	@command -v promtool >/dev/null 2>&1 || { \
		echo "lint: promtool is not installed: the Prometheus rules cannot be checked." >&2; \
		echo "lint: run 'make test-deps' (as root it installs Debian's prometheus package, which ships promtool)." >&2; \
		exit 1; }
	promtool check rules deploy/prometheus/imdsproxy.rules.yaml deploy/prometheus/imdsproxy-issuer.rules.yaml
	promtool test rules deploy/prometheus/imdsproxy.rules.test.yaml deploy/prometheus/imdsproxy-issuer.rules.test.yaml

# fuzz runs every fuzz target for FUZZTIME each (seed corpora run in make test).
fuzz:
	./scripts/fuzz.sh $(FUZZTIME)

# bench: the micro-benchmarks of proxy and cache, the issuer's, then
# test/bench (docs/benchmarks.md): every server and the load generators on
# separate CPUs (-pin 0/1: servers on CPU 0, generators on CPU 1; needs two
# CPUs). The cached credential GET at saturation from wrk (Debian's, which
# this target installs when it is missing), the SDK's cold flow on new
# connections (1 and 8 clients, on an idle host and with 2,000 more idle
# processes), the paced p99 from the spin generator, interception, the token
# flood and cold start; it prints the table docs/benchmarks.md is written
# from. BENCH_ARGS adds flags, e.g. BENCH_ARGS='-other.bin /path/imdsproxy
# -other.name OLD' measures another build in the same run. Then the fleet
# simulation's representative set (docs/scale.md). About 6 minutes in all.
BENCH_ARGS ?=
bench: build tools
	@command -v wrk >/dev/null 2>&1 || { \
		echo "bench: installing wrk (Debian package), the load generator that saturates the server"; \
		apt-get install -y wrk >/dev/null 2>&1 || { apt-get update >/dev/null && apt-get install -y wrk >/dev/null; } || { \
		echo "bench: could not install wrk (as root: apt-get install wrk)" >&2; exit 1; }; }
	@$(MAKE) --no-print-directory $(RAH) || \
		echo "bench: *** could not build the Roles Anywhere credential helper: the bench skips it ***" >&2
	$(GO) test -run '^$$' -bench . -benchmem -count 1 ./proxy/ ./cache/
	IMDSPROXY_ISSUER_BENCH=1 $(GO) test -run '^TestPacedMintLatency$$' -bench 'BenchmarkMint|BenchmarkSignES256' -benchmem -count 1 -v ./issuer/
	IMDSPROXY_BIN=$(CURDIR)/$(BIN) AEMM_BIN=$(AEMM) RAH_BIN=$(RAH) $(GO) test -run '^$$' -bench . -benchtime 5s -count 1 -timeout 10m ./test/bench/ -args -pin 0/1 -paced.spin $(BENCH_ARGS)
	$(GO) run ./cmd/fleetsim -report

# install: binary, systemd units (ExecStart rewritten to $(PREFIX)/bin),
# sysusers and tmpfiles snippets and the example config. See docs/deploy.md.
# Also the Prometheus rules, for the Prometheus that scrapes the daemons
# (docs/metrics.md, "Alerts") and the issuer (docs/issuer.md, "Alerts").
SYSTEMDDIR ?= /etc/systemd/system
SYSUSERSDIR ?= /usr/lib/sysusers.d
TMPFILESDIR ?= /usr/lib/tmpfiles.d
UNITS := imdsproxy.service imdsproxy.socket imdsproxy-admin.socket imdsproxy-container.socket imdsproxy-credentials.socket

install: build
	install -D -m 0755 $(BIN) $(DESTDIR)$(PREFIX)/bin/imdsproxy
	install -D -m 0755 $(ISSUER_BIN) $(DESTDIR)$(PREFIX)/bin/imdsproxy-issuer
	for u in $(UNITS); do \
		install -d $(DESTDIR)$(SYSTEMDDIR) && \
		sed 's|/usr/local/bin/imdsproxy|$(PREFIX)/bin/imdsproxy|g' systemd/$$u > $(DESTDIR)$(SYSTEMDDIR)/$$u && \
		chmod 0644 $(DESTDIR)$(SYSTEMDDIR)/$$u || exit 1; \
	done
	install -D -m 0644 systemd/imdsproxy.sysusers $(DESTDIR)$(SYSUSERSDIR)/imdsproxy.conf
	install -D -m 0644 systemd/imdsproxy.tmpfiles $(DESTDIR)$(TMPFILESDIR)/imdsproxy.conf
	install -D -m 0644 systemd/config.example.yaml $(DESTDIR)/etc/imdsproxy/config.example.yaml
	install -D -m 0644 deploy/prometheus/imdsproxy.rules.yaml $(DESTDIR)/usr/share/imdsproxy/prometheus/imdsproxy.rules.yaml
	install -D -m 0644 deploy/prometheus/imdsproxy-issuer.rules.yaml $(DESTDIR)/usr/share/imdsproxy/prometheus/imdsproxy-issuer.rules.yaml

uninstall:
	rm -f $(DESTDIR)$(PREFIX)/bin/imdsproxy $(DESTDIR)$(PREFIX)/bin/imdsproxy-issuer $(DESTDIR)/etc/imdsproxy/config.example.yaml
	rm -f $(addprefix $(DESTDIR)$(SYSTEMDDIR)/,$(UNITS))
	rm -f $(DESTDIR)$(SYSUSERSDIR)/imdsproxy.conf $(DESTDIR)$(TMPFILESDIR)/imdsproxy.conf
	rm -f $(DESTDIR)/usr/share/imdsproxy/prometheus/imdsproxy.rules.yaml $(DESTDIR)/usr/share/imdsproxy/prometheus/imdsproxy-issuer.rules.yaml
	rmdir $(DESTDIR)/usr/share/imdsproxy/prometheus $(DESTDIR)/usr/share/imdsproxy 2>/dev/null || true

clean:
	rm -rf bin
