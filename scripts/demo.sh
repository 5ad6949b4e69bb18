#!/usr/bin/env bash
# make demo: runs imdsproxy on loopback with local stand-ins for everything it
# talks to, so an unmodified AWS SDK gets workload credentials through it.
#   fake STS + OIDC issuer  127.0.0.1:8190 / :8191  (bin/fakests; mints the host JWT)
#   stand-in real IMDS      127.0.0.1:1338          (amazon-ec2-metadata-mock)
#   imdsproxy               127.0.0.1:8169 (IMDS), 127.0.0.1:8170 (admin)
# Ctrl-C stops everything it started. With --check it runs the AWS CLI once
# against the daemon, prints the result and exits (used by the tests).
set -euo pipefail
cd "$(dirname "$0")/.."
check=false
[ "${1:-}" = "--check" ] && check=true

work=$(mktemp -d /tmp/imdsproxy-demo.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 0' INT TERM

for port in 8169 8170 8190 8191 1338; do
  if (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null; then
    echo "demo: 127.0.0.1:$port is already in use (another demo running?)" >&2
    exit 1
  fi
done

bin/tools/ec2-metadata-mock -n 127.0.0.1 -p 1338 >"$work/imds.log" 2>&1 &
pids+=($!)
bin/fakests -sts-listen 127.0.0.1:8190 -issuer-listen 127.0.0.1:8191 \
  -token-file "$work/token.jwt" >"$work/sts.log" 2>&1 &
pids+=($!)

cat >"$work/config.yaml" <<YAML
listen: 127.0.0.1:8169
admin_listen: 127.0.0.1:8170
upstream: http://127.0.0.1:1338
region: us-east-1
imds: {tokens: required, hop_limit: 1}
role:
  arn: arn:aws:iam::222222222222:role/demo-app
  duration: 1h
source: web-identity
identity:
  jwt_file: $work/token.jwt
YAML

for _ in $(seq 100); do [ -s "$work/token.jwt" ] && break; sleep 0.1; done
[ -s "$work/token.jwt" ] || { echo "demo: the fake issuer wrote no token; see $work/sts.log" >&2; cat "$work/sts.log" >&2; exit 1; }

env -u AWS_ACCESS_KEY_ID -u AWS_SECRET_ACCESS_KEY -u AWS_SESSION_TOKEN -u AWS_PROFILE \
  AWS_REGION=us-east-1 AWS_ENDPOINT_URL_STS=http://127.0.0.1:8190 \
  bin/imdsproxy serve --config "$work/config.yaml" --log-format console >"$work/imdsproxy.log" 2>&1 &
pids+=($!)

ready=false
for _ in $(seq 100); do
  if curl -fsS http://127.0.0.1:8170/readyz >/dev/null 2>&1; then ready=true; break; fi
  sleep 0.1
done
if ! $ready; then
  echo "demo: the daemon did not become ready:" >&2
  curl -sS http://127.0.0.1:8170/readyz >&2 || true
  cat "$work/imdsproxy.log" >&2
  exit 1
fi

aws_cmd=(env -u AWS_ACCESS_KEY_ID -u AWS_SECRET_ACCESS_KEY -u AWS_SESSION_TOKEN -u AWS_PROFILE
  AWS_CONFIG_FILE=/dev/null AWS_SHARED_CREDENTIALS_FILE=/dev/null
  AWS_EC2_METADATA_SERVICE_ENDPOINT=http://127.0.0.1:8169/ /usr/bin/aws configure export-credentials --format env-no-export)

# One real client call, so the demo shows it working at once. Only the access
# key id is printed: the secret and the session token stay out of terminals.
out=$("${aws_cmd[@]}") || { echo "demo: the AWS CLI could not get credentials; see $work/imdsproxy.log" >&2; exit 1; }
echo "$out" | grep '^AWS_ACCESS_KEY_ID='
echo "$out" | grep -q '^AWS_SECRET_ACCESS_KEY=.' && echo "demo: the AWS CLI got a complete set of credentials through imdsproxy"
$check && exit 0

cat <<TXT

imdsproxy is running on 127.0.0.1:8169, in front of a fake STS and a stand-in IMDS.
Logs: $work/imdsproxy.log (daemon), $work/sts.log (fake STS).

Try it in another terminal (an unmodified AWS CLI, no credentials configured):

  AWS_EC2_METADATA_SERVICE_ENDPOINT=http://127.0.0.1:8169/ aws configure export-credentials

  # pass-through to the (stand-in) real IMDS:
  TOKEN=\$(curl -s -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 300' http://127.0.0.1:8169/latest/api/token)
  curl -s -H "X-aws-ec2-metadata-token: \$TOKEN" http://127.0.0.1:8169/latest/meta-data/instance-id; echo

  # what the daemon is doing:
  curl -s http://127.0.0.1:8170/debug/cache
  curl -s http://127.0.0.1:8170/metrics | grep ^imdsproxy_
  curl -s http://127.0.0.1:8170/readyz

Ctrl-C stops everything.
TXT
wait "${pids[@]}"
