package logging

import (
	"bytes"
	"encoding/json"
	"errors"
	"strings"
	"testing"

	"go.uber.org/zap"
)

type failingWriter struct{}

func (failingWriter) Write([]byte) (int, error) { return 0, errors.New("no space left on device") }

// TestFailuresCounted: a logger whose output fails keeps working and every
// lost line is counted.
func TestFailuresCounted(t *testing.T) {
	w := &CountingWriter{W: failingWriter{}}
	log, err := New("json", "info", w)
	if err != nil {
		t.Fatal(err)
	}
	log.Info("one")
	log.Warn("two")
	log.Debug("below the level: not written")
	if got := w.Failures(); got < 2 {
		t.Errorf("%d failures counted, want at least 2", got)
	}
}

func TestFormats(t *testing.T) {
	var buf bytes.Buffer
	log, err := New("json", "debug", &buf)
	if err != nil {
		t.Fatal(err)
	}
	log.Named("proxy").Debug("hello", zap.String("k", "v"))
	var line map[string]any
	if err := json.Unmarshal(buf.Bytes(), &line); err != nil {
		t.Fatalf("not one JSON line: %v: %s", err, buf.String())
	}
	for k, v := range map[string]any{"level": "debug", "logger": "proxy", "msg": "hello", "k": "v"} {
		if line[k] != v {
			t.Errorf("%s = %v, want %v", k, line[k], v)
		}
	}
	if ts, _ := line["ts"].(string); !strings.Contains(ts, "T") {
		t.Errorf("ts = %v, want ISO 8601", line["ts"])
	}
	buf.Reset()
	if log, err = New("console", "info", &buf); err != nil {
		t.Fatal(err)
	}
	log.Info("hello")
	if !strings.Contains(buf.String(), "INFO") || !strings.Contains(buf.String(), "hello") {
		t.Errorf("console line %q", buf.String())
	}
	for _, bad := range [][2]string{{"xml", "info"}, {"json", "loud"}} {
		_, err := New(bad[0], bad[1], &buf)
		if err == nil || !strings.Contains(err.Error(), "--log-") {
			t.Errorf("New(%q, %q) = %v, want an error naming the flag", bad[0], bad[1], err)
		}
	}
}
