#!/usr/bin/env bash
# make demo: the whole model on loopback, every piece the real binary but
# STS and the instance:
#   fake STS                 127.0.0.1:8190  (bin/fakests; verifies tokens the way AWS STS
#                                            does, from the issuer's discovery document and JWKS)
#   stand-in EC2 instance    127.0.0.1:1338  (amazon-ec2-metadata-mock serving a signed identity
#                                            document and instance profile credentials fakests made)
#   imdsproxy-issuer         127.0.0.1:8191  (attests the instance, mints a token per workload)
#   imdsproxy                127.0.0.1:8169 (IMDS), 127.0.0.1:8170 (admin)
# The daemon serves your uid the workload role demo-app (subject demo-app)
# and every other process the host's role demo-host (subject demo-host);
# each role trusts only its own subject.
#
# Ctrl-C stops everything it started and keeps the work directory (configs,
# keys, logs). With --check it runs the AWS CLI once through the daemon,
# prints the result and exits (used by the tests). IMDSPROXY_DEMO_DIR, when
# set, is the work directory (it must exist and be empty).
set -euo pipefail
cd "$(dirname "$0")/.."
check=false
[ "${1:-}" = "--check" ] && check=true

aws=/usr/bin/aws
for f in bin/imdsproxy bin/imdsproxy-issuer bin/fakests bin/tools/ec2-metadata-mock "$aws"; do
  if [ ! -x "$f" ]; then
    echo "demo: $f is missing: run make demo (it builds the binaries and installs what it needs)" >&2
    exit 1
  fi
done

for port in 8169 8170 8190 8191 1338; do
  if (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null; then
    echo "demo: 127.0.0.1:$port is already in use (another demo running?)" >&2
    exit 1
  fi
done

if [ -n "${IMDSPROXY_DEMO_DIR:-}" ]; then
  work=$IMDSPROXY_DEMO_DIR
else
  work=$(mktemp -d /tmp/imdsproxy-demo.XXXXXX)
fi
chmod 0700 "$work"
mkdir -p "$work/instance" "$work/issuer"
echo "demo: work directory $work (configs, keys and logs; kept when the demo stops)"

pids=()
logs=(sts.log imds.log issuer.log imdsproxy.log)
failed=false
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if $failed; then
    for l in "${logs[@]}"; do
      [ -s "$work/$l" ] || continue
      echo "--- last lines of $work/$l:" >&2
      tail -n 15 "$work/$l" >&2
    done
  fi
  echo "demo: stopped. Logs kept: $(printf "$work/%s " "${logs[@]}")"
}
trap cleanup EXIT
trap 'exit 0' INT TERM
fail() { failed=true; echo "demo: $*" >&2; exit 1; }

# Every process gets a clean environment: your AWS_PROFILE, keys or proxy
# settings must not leak into the demo.
clean=(env -i PATH=/usr/local/bin:/usr/bin:/bin HOME="$work" LANG=C.UTF-8 NO_PROXY='*' no_proxy='*')

# waitfor URL WHAT LOG: poll until URL answers 200.
waitfor() {
  for _ in $(seq 150); do
    curl -fsS "$1" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  fail "$2 did not become ready ($1); see $work/$3"
}

host_role=arn:aws:iam::222222222222:role/demo-host
app_role=arn:aws:iam::222222222222:role/demo-app

# 1. The fake STS, trusting the issuer, and the stand-in instance it makes.
"${clean[@]}" bin/fakests -sts-listen 127.0.0.1:8190 -issuer-url http://127.0.0.1:8191 \
  -trust "$host_role=demo-host" -trust "$app_role=demo-app" \
  -instance-dir "$work/instance" >"$work/sts.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do [ -s "$work/instance/aemm-config.json" ] && break; sleep 0.1; done
[ -s "$work/instance/aemm-config.json" ] || fail "fakests made no stand-in instance; see $work/sts.log"
instance_id=$(sed -n 's/.*"instanceId": "\(i-[0-9a-f]*\)".*/\1/p' "$work/instance/instance.json")
echo "demo: fake STS on 127.0.0.1:8190, trusting the issuer http://127.0.0.1:8191 (discovery document and JWKS, as AWS STS does)"

# 2. amazon-ec2-metadata-mock serves the instance (its HOME holds aemm-config.json).
(cd "$work/instance" && exec env -i PATH=/usr/bin:/bin HOME="$work/instance" NO_PROXY='*' \
  "$OLDPWD/bin/tools/ec2-metadata-mock" -n 127.0.0.1 -p 1338 -I) >"$work/imds.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
  curl -fsS -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' http://127.0.0.1:1338/latest/api/token >/dev/null 2>&1 && break
  sleep 0.1
done
echo "demo: stand-in EC2 instance $instance_id (account 111111111111, us-east-1) on 127.0.0.1:1338: a signed identity document and instance profile credentials"

# 3. The issuer: an ES256 key made now, the stand-in's signer trusted, a policy with both subjects.
(umask 077 && openssl ecparam -name prime256v1 -genkey -noout | openssl pkcs8 -topk8 -nocrypt -out "$work/issuer/signing.pem")
chmod 0400 "$work/issuer/signing.pem"
cat >"$work/issuer/config.yaml" <<YAML
listen: 127.0.0.1:8191
issuer: http://127.0.0.1:8191          # loopback http for the demo; https in production
signing:
  keys:
    - {file: $work/issuer/signing.pem}
attestation:
  aws_iid:
    certificates: [$work/instance/iid-ca.pem]   # the stand-in's signer, not AWS's
    max_instance_age: 24h
tokens: {audience: sts.amazonaws.com, ttl: 1h}
policy:
  - name: demo-hosts
    match: {accounts: ["111111111111"], regions: [us-east-1]}
    subjects: [demo-host, demo-app]
    principal_tags: {team: demo, workload: "{workload}", instance: "{instanceId}"}
    transitive_tag_keys: [team]
YAML
"${clean[@]}" bin/imdsproxy-issuer check-config "$work/issuer/config.yaml" >"$work/issuer-check.txt" 2>&1 ||
  { failed=true; cat "$work/issuer-check.txt" >&2; fail "imdsproxy-issuer check-config refused the demo's config"; }
"${clean[@]}" bin/imdsproxy-issuer serve --config "$work/issuer/config.yaml" --log-format console >"$work/issuer.log" 2>&1 &
pids+=($!)
waitfor http://127.0.0.1:8191/readyz "imdsproxy-issuer" issuer.log
echo "demo: imdsproxy-issuer on 127.0.0.1:8191: aws_iid attestation, ES256 key $work/issuer/signing.pem (made just now)"

# 4. The daemon: its identity from the issuer, your uid the workload demo-app.
uid=$(id -u)
cat >"$work/config.yaml" <<YAML
listen: 127.0.0.1:8169
admin_listen: 127.0.0.1:8170
upstream: http://127.0.0.1:1338
region: us-east-1
imds: {tokens: required, hop_limit: 1}
role: {arn: "$host_role", duration: 1h}      # the host's role: every process no workload matches
source: web-identity
identity:
  jwt_url: http://127.0.0.1:8191/v1/token
  attestation: aws_iid
  insecure_http: true                   # the demo's issuer is on loopback; never in production
workloads:
  - uid: $uid                             # you
    subject: demo-app
    role: {arn: "$app_role", duration: 1h}
YAML
"${clean[@]}" AWS_ENDPOINT_URL_STS=http://127.0.0.1:8190 \
  bin/imdsproxy serve --config "$work/config.yaml" --log-format console >"$work/imdsproxy.log" 2>&1 &
pids+=($!)
waitfor http://127.0.0.1:8170/readyz "imdsproxy" imdsproxy.log
echo "demo: imdsproxy on 127.0.0.1:8169: uid $uid gets the workload role demo-app, every other process the host's role demo-host"

# 5. One real client call, at once: the AWS CLI with no credentials of its
# own asks the daemon, and signs GetCallerIdentity with what it got; the
# fake STS checks the signature with the secret it issued. Nothing secret
# is printed.
client=(env -u AWS_PROFILE -u AWS_ACCESS_KEY_ID -u AWS_SECRET_ACCESS_KEY -u AWS_SESSION_TOKEN
  AWS_CONFIG_FILE=/dev/null AWS_SHARED_CREDENTIALS_FILE=/dev/null AWS_REGION=us-east-1
  AWS_EC2_METADATA_SERVICE_ENDPOINT=http://127.0.0.1:8169/
  "$aws" sts get-caller-identity --endpoint-url http://127.0.0.1:8190 --query Arn --output text)
arn=$("${client[@]}" 2>"$work/aws-cli.err") || { failed=true; cat "$work/aws-cli.err" >&2; fail "the AWS CLI could not get credentials through imdsproxy"; }
echo "demo: $aws sts get-caller-identity through imdsproxy: $arn"
seen=$(grep -o 'AssumeRoleWithWebIdentity role=arn:aws:iam::222222222222:role/demo-app .* -> 200' "$work/sts.log" | tail -n 1 |
  sed -n 's/.*\(sub=[^ ]*\) \(kid=[^ ]*\) \(alg=[^ ]*\) \(tags=[^ ]*\).*/\1 \2 \3 \4/p' || true)
[ -n "$seen" ] && echo "demo: STS verified the issuer's token for it: $seen"
case "$arn" in
  *:assumed-role/demo-app/*) echo "demo: the AWS CLI got demo-app's credentials through imdsproxy" ;;
  *) fail "the AWS CLI got credentials of $arn, not demo-app's" ;;
esac
$check && exit 0

path_aws=$(command -v aws 2>/dev/null || true)
if [ -n "$path_aws" ] && [ "$path_aws" != "$aws" ]; then
  echo
  echo "note: 'aws' on your PATH is $path_aws ($("$path_aws" --version 2>&1 | head -n 1)); the commands below name $aws, the CLI the demo used."
fi

cat <<TXT

The chain is running: the stand-in instance, imdsproxy-issuer, imdsproxy and the fake STS.
Logs: $work/imdsproxy.log (daemon), $work/issuer.log (issuer), $work/sts.log (fake STS), $work/imds.log (instance).

Try it in another terminal, as uid $uid (an unmodified AWS CLI with no credentials of its own;
the env -u drops your own AWS settings):

  env -u AWS_PROFILE -u AWS_ACCESS_KEY_ID -u AWS_SECRET_ACCESS_KEY -u AWS_SESSION_TOKEN \\
    AWS_CONFIG_FILE=/dev/null AWS_SHARED_CREDENTIALS_FILE=/dev/null AWS_REGION=us-east-1 \\
    AWS_EC2_METADATA_SERVICE_ENDPOINT=http://127.0.0.1:8169/ \\
    $aws sts get-caller-identity --endpoint-url http://127.0.0.1:8190

  # what STS trusts: the issuer's discovery document and keys
  curl -fsS http://127.0.0.1:8191/.well-known/openid-configuration; echo
  curl -fsS http://127.0.0.1:8191/.well-known/jwks.json; echo

  # pass-through to the (stand-in) real IMDS
  TOKEN=\$(curl -fsS -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 300' http://127.0.0.1:8169/latest/api/token)
  curl -fsS -H "X-aws-ec2-metadata-token: \$TOKEN" http://127.0.0.1:8169/latest/meta-data/instance-id; echo

  # what the daemon is doing
  curl -fsS http://127.0.0.1:8170/debug/cache; echo
  curl -fsS http://127.0.0.1:8170/metrics | grep '^imdsproxy_cache_'
  curl -fsS http://127.0.0.1:8170/readyz; echo

Ctrl-C stops everything (the logs stay in $work).
TXT
wait "${pids[@]}"
