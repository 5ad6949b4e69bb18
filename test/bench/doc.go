// Package bench measures the imdsproxy daemon binary against a bare net/http
// server (the ceiling) that returns byte-for-byte the same IMDS responses,
// and against amazon-ec2-metadata-mock (AEMM_BIN, default
// bin/tools/ec2-metadata-mock) and, in the saturation and cold-flow
// benchmarks, the IAM Roles Anywhere credential helper's serve (RAH_BIN,
// built by make bench), all as subprocesses on loopback, in one run on one
// machine (docs/benchmarks.md). In the saturation and cold-flow benchmarks
// a second replay, raw, answers the same bytes from a hand-written HTTP/1.1
// loop instead of net/http's server: the measure of what that server costs
// (not a candidate server: it checks next to nothing). Two daemons run side
// by side: the
// default config (audit on, logging at info into a file, as on a host) and
// the same with `access: {audit: false}`; -other.bin adds a third, another
// build (an older commit, say), with the default config.
//
// Run it with `make bench`, or:
//
//	IMDSPROXY_BIN=$PWD/bin/imdsproxy AEMM_BIN=$PWD/bin/tools/ec2-metadata-mock \
//	  RAH_BIN=$PWD/bin/tools/rolesanywhere-credential-helper \
//	  go test -run '^$' -bench . -benchtime 5s -count 1 -timeout 10m ./test/bench/ -args -pin 0/1 -paced.spin
//
// -pin SERVER/CLIENT puts every server on the SERVER CPUs and every load
// generator on the CLIENT CPUs. A generator that shares the server's CPUs
// saturates before the server does and hides its cost, so the headline
// benchmarks need it:
//
//   - BenchmarkSaturation: the cached credential GET at 50 keep-alive
//     connections from wrk (Debian's wrk, -t1 -c50), in alternating rounds
//     over every server; req/s, p50, p99 and their ratios to the ceiling,
//     and both processes' CPU to show which one was the bottleneck.
//   - BenchmarkColdFlow: what an SDK does when a process starts (PUT token,
//     GET listing, GET credentials, each on a new connection), from 1 and 8
//     clients, on the idle host and with 2,000 more idle processes holding
//     50 open files each, which it starts, kills and reaps itself.
//
// Also: BenchmarkIMDSPaced (open loop at a fixed offered load, the spin
// generator with -paced.spin), BenchmarkIntercept (as root: the daemon
// behind its nftables redirect in a network namespace of its own, against
// direct loopback), BenchmarkTokenFlood (RSS under a token flood) and
// BenchmarkColdStart. The RSS of each daemon is sampled from its start to
// the end of the run.
//
// The benchmarks skip when IMDSPROXY_BIN is unset or names no file; the AEMM
// and helper rows skip when their binary is missing, BenchmarkSaturation
// without -pin or wrk, and BenchmarkIntercept when not root or without ip
// netns and nft, each with a message. Results are reported with b.ReportMetric and, at the
// end of the run, as markdown tables on stdout for docs/benchmarks.md. The
// package has no non-test code besides this comment.
package bench
