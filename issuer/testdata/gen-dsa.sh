#!/usr/bin/env bash
# Regenerates the DSA fixtures: a self-signed DSA certificate (as AWS's
# "pkcs7" certificates are) and an instance identity document signed with
# it the way EC2 signs /latest/dynamic/instance-identity/pkcs7: SHA-1 with
# DSA, the document embedded, streamed BER (indefinite lengths). Go cannot
# sign with DSA, hence openssl. Run from this directory.
set -euo pipefail
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
openssl dsaparam -out "$tmp/params.pem" 1024 2>/dev/null
openssl gendsa -out "$tmp/dsa.key" "$tmp/params.pem" 2>/dev/null
openssl req -new -x509 -key "$tmp/dsa.key" -sha1 -days 36500 \
  -subj "/C=US/ST=Washington State/L=Seattle/O=imdsproxy test DSA signer" -out dsa-cert.pem
cp dsa-document.json "$tmp/doc"
openssl smime -sign -binary -nodetach -stream -md sha1 -signer dsa-cert.pem -inkey "$tmp/dsa.key" \
  -nocerts -in "$tmp/doc" -outform DER -out "$tmp/sig.der"
base64 -w 64 "$tmp/sig.der" > dsa-document.pkcs7
