package bench

import (
	"strings"
	"testing"
	"time"
)

// wrkSample is wrk 4.1.0's report with --latency, with errors.
const wrkSample = `Running 5s test @ http://127.0.0.1:41234/latest/meta-data/iam/security-credentials/app
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.21ms  300.00us  12.00ms   90.00%
    Req/Sec    41.50k     1.20k   43.00k    70.00%
  Latency Distribution
     50%    1.15ms
     75%    1.30ms
     90%  850.00us
     99%    2.50ms
  206512 requests in 5.00s, 246.00MB read
  Socket errors: connect 0, read 2, write 0, timeout 0
  Non-2xx or 3xx responses: 3
Requests/sec:  41301.17
Transfer/sec:     49.20MB
`

func TestParseWrk(t *testing.T) {
	r, err := parseWrk(strings.NewReader(wrkSample))
	if err != nil {
		t.Fatal(err)
	}
	if r.ReqPerSec != 41301.17 || r.Requests != 206512 || r.P50 != 1150*time.Microsecond ||
		r.P90 != 850*time.Microsecond || r.P99 != 2500*time.Microsecond || r.Non2xx != 3 ||
		r.SocketErrors != "connect 0, read 2, write 0, timeout 0" {
		t.Errorf("parsed %+v", r)
	}
	if _, err := parseWrk(strings.NewReader("Requests/sec: 5\n")); err == nil {
		t.Error("a report without the latency distribution parsed")
	}
}
