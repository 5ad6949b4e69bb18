// Package e2e is what the end-to-end tests (package test) and the
// benchmarks (test/bench) share to run the built imdsproxy binary: finding
// or building it (IMDSPROXY_BIN), rendering its config, starting it and
// capturing its output, waiting for it (/healthz, /readyz, a port), the
// stand-in for the real IMDS (amazon-ec2-metadata-mock from AEMM_BIN, or a
// built-in stand-in), the fake OIDC issuer and STS wired together, an IMDS
// client (token PUT, GET, the credential document) and a reader of the
// daemon's /metrics. For the issuer's chain: the imdsproxy-issuer binary
// (IMDSPROXY_ISSUER_BIN, StartIssuer) and a stand-in instance whose
// identity it can verify, served by amazon-ec2-metadata-mock
// (StartInstance).
//
// Everything here is for tests: helpers return errors instead of failing a
// testing.TB, so that a benchmark's shared environment, built once outside
// any one benchmark, can use them too.
package e2e
