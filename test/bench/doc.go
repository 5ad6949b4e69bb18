// Package bench measures the imdsproxy daemon binary against a bare net/http
// server (the ceiling) that returns byte-for-byte the same IMDS responses,
// and against amazon-ec2-metadata-mock (AEMM_BIN, default
// bin/tools/ec2-metadata-mock), all as subprocesses on loopback, in one run
// on one machine. As root it also measures the daemon behind its nftables
// redirect against direct loopback, in a network namespace of its own
// (BenchmarkIntercept), and BenchmarkNewConn measures a connection's first
// credential GET.
//
// Run it with `make bench`, or:
//
//	IMDSPROXY_BIN=$PWD/bin/imdsproxy AEMM_BIN=$PWD/bin/tools/ec2-metadata-mock go test -run '^$' -bench . -benchtime 5s -count 1 ./test/bench/
//
// BenchmarkIMDS is closed loop (saturation); BenchmarkIMDSPaced is open loop
// at a fixed offered load, set with -paced.rate (requests/s, comma-separated,
// default 2000) and -paced.duration (default 5s), e.g.
//
//	go test -run '^$' -bench Paced ./test/bench/ -paced.rate 500,2000
//
// The benchmarks skip when IMDSPROXY_BIN is unset or names no file; the AEMM
// rows skip when its binary is missing, and BenchmarkIntercept when not root
// or without ip netns and nft, each with a message. Results
// are reported with b.ReportMetric and, at the end of the run, as a markdown
// table on stdout for docs/benchmarks.md. The package has no non-test code
// besides this comment.
package bench
