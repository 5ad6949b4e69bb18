package bench

import (
	"bytes"
	"strings"
	"testing"
)

// TestWriteDrift: the host's drift per round comes from the ceiling runs
// that bracket it (the next round's, then the closing run), a round that
// moved more than driftLimit is marked, and the steady medians leave its
// ratios out.
func TestWriteDrift(t *testing.T) {
	satMu.Lock()
	defer satMu.Unlock()
	saved := [...]any{satResults, satRatios, satP99, satRoundOf, satCeilClose}
	defer func() {
		satResults, satRatios, satP99 = saved[0].(map[string][]wrkRun), saved[1].(map[string][]float64), saved[2].(map[string][]float64)
		satRoundOf, satCeilClose = saved[3].(map[string][]int), saved[4].(*wrkRun)
	}()
	satResults = map[string][]wrkRun{"ceiling": {{ReqPerSec: 100}, {ReqPerSec: 105}, {ReqPerSec: 150}}}
	satCeilClose = &wrkRun{ReqPerSec: 148}
	satRatios = map[string][]float64{"daemon": {0.8, 0.5, 0.9}, "aemm": {0.6}}
	satP99 = map[string][]float64{"daemon": {1.2, 2.0, 1.1}, "aemm": {1.5}}
	satRoundOf = map[string][]int{"daemon": {0, 1, 2}, "aemm": {1}}

	d := hostDrift()
	if len(d) != 3 || !steady(d[0]) || steady(d[1]) || !steady(d[2]) {
		t.Fatalf("drift %v: want rounds 1 and 3 steady, 2 moved", d)
	}
	var b bytes.Buffer
	writeDrift(&b, []satTarget{{name: "ceiling"}, {name: "daemon"}, {name: "aemm"}})
	out := b.String()
	for _, want := range []string{
		"1.05, 1.43 (moved), 0.99",
		"Medians over the 2 steady round(s) of 3: daemon 0.85 × req/s, 1.15 × p99.",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("report lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "aemm") {
		t.Errorf("aemm ran only in the moved round, yet is in the steady medians:\n%s", out)
	}

	satCeilClose = nil // no closing run: nothing to say
	b.Reset()
	writeDrift(&b, nil)
	if b.Len() != 0 {
		t.Errorf("without a closing run: %q", b.String())
	}
}
