#!/usr/bin/env bash
# Runs every fuzz target of the module for the given time each (default 1m).
# The seed corpora of the same targets run in `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."
t=${1:-1m}
for pkg in $(go list ./...); do
  dir=$(go list -f '{{.Dir}}' "$pkg")
  for target in $(grep -ho '^func Fuzz[A-Za-z0-9_]*' "$dir"/*_test.go 2>/dev/null | sed 's/^func //' | sort -u); do
    echo "== $pkg $target ($t)"
    go test -run '^$' -fuzz "^${target}\$" -fuzztime "$t" "$pkg"
  done
done
