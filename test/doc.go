// Package test holds the end-to-end tests of imdsproxy. They run the built
// daemon binary (IMDSPROXY_BIN, default bin/imdsproxy) as a subprocess against
// in-process fakes of STS and an OIDC issuer (test/fakes), with
// amazon-ec2-metadata-mock as the real IMDS, and check it with real AWS SDK
// clients: aws-sdk-go-v2 in process, the AWS CLI and boto3 from Debian, and
// the JavaScript SDK v3 from npm (test/js).
//
// The harness (harness_test.go) is built on package e2e (test/e2e), which
// the benchmarks of test/bench share: the binary, the stand-in IMDS, the
// fakes wired together, the IMDS client and the /metrics reader.
//
// Run with `make test` or `go test ./test/`. Set IMDSPROXY_E2E_ALLOW_MISSING=1
// to skip (instead of fail) the client tests whose client is not installed.
package test
