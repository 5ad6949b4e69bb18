#!/usr/bin/env bash
# What `make demo` needs besides Go and what `make build tools` builds, and
# nothing else: the AWS CLI at /usr/bin/aws (Debian's awscli: the client the
# demo shows), curl (readiness checks and the commands it prints) and
# openssl (it makes the issuer's ES256 signing key the way docs/quickstart.md
# does). It says what is missing before it installs anything, installs
# only as root, and prints the apt-get command otherwise. Idempotent;
# quiet when everything is there.
set -euo pipefail

need=() why=()
if [ ! -x /usr/bin/aws ]; then need+=(awscli); why+=("awscli: the AWS CLI the demo runs, /usr/bin/aws"); fi
if ! command -v curl >/dev/null 2>&1; then need+=(curl); why+=("curl: readiness checks and the commands the demo prints"); fi
if ! command -v openssl >/dev/null 2>&1; then need+=(openssl); why+=("openssl: makes the issuer's signing key"); fi
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi

echo "demo: the demo needs these Debian packages, which are missing:"
printf '  %s\n' "${why[@]}"
if [ "$(id -u)" -ne 0 ]; then
  echo "demo: run as root to have them installed, or install them yourself:" >&2
  echo "  apt-get install --no-install-recommends ${need[*]}" >&2
  exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "demo: no apt-get here: install ${need[*]} (the AWS CLI at /usr/bin/aws) and run make demo again" >&2
  exit 1
fi
echo "demo: installing ${need[*]} (apt-get install --no-install-recommends ${need[*]})"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
echo "demo: installed ${need[*]}"
