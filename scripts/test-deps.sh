#!/usr/bin/env bash
# Installs what the end-to-end tests drive, when it is missing: the AWS CLI and
# boto3 from Debian (the real clients, at /usr/bin/aws and /usr/bin/python3),
# nftables and iproute2, systemd-nspawn and curl (the units under systemd as
# PID 1, test/e2e_systemd_test.go), promtool (Debian's prometheus package; `make
# lint` tests the Prometheus rules with it) and the JavaScript SDK v3 from npm
# (pinned by test/js/package-lock.json). Idempotent; quiet when everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
[ -x /usr/bin/aws ] || need+=(awscli)
/usr/bin/python3 -c 'import boto3' 2>/dev/null || need+=(python3-boto3)
command -v nft >/dev/null 2>&1 || need+=(nftables)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v node >/dev/null 2>&1 || need+=(nodejs)
command -v npm >/dev/null 2>&1 || need+=(npm)
[ -x /lib/systemd/systemd ] || need+=(systemd)
command -v systemd-nspawn >/dev/null 2>&1 || need+=(systemd-container)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "test-deps: missing ${need[*]}; run as root (or apt-get install ${need[*]})" >&2
    exit 1
  fi
  echo "test-deps: installing ${need[*]} from Debian"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  if [[ " ${need[*]} " == *" prometheus "* ]]; then
    # Only promtool is wanted: the package also enables and starts a Prometheus
    # server on :9090. Stop it and keep it from starting at boot.
    if [ -d /run/systemd/system ]; then
      systemctl disable --now prometheus.service >/dev/null 2>&1 || true
    else
      systemctl disable prometheus.service >/dev/null 2>&1 || true
      invoke-rc.d prometheus stop >/dev/null 2>&1 || true
    fi
  fi
fi

if [ -f test/js/package.json ]; then
  if [ ! -d test/js/node_modules ] || [ test/js/package-lock.json -nt test/js/node_modules ]; then
    echo "test-deps: installing the JavaScript SDK (npm ci in test/js)"
    (cd test/js && npm ci --no-audit --no-fund --loglevel=error)
    touch test/js/node_modules
  fi
fi
echo "test-deps: ok ($(/usr/bin/aws --version 2>&1 | head -1); boto3 $(/usr/bin/python3 -c 'import boto3; print(boto3.__version__)'); node $(node --version); $(promtool --version 2>&1 | head -1 | cut -d' ' -f1-3))"
