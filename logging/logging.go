// Package logging builds the structured loggers of the project's commands
// (the daemon and the issuer): one format, one set of flags' meaning, and a
// writer that counts the lines that could not be written.
package logging

import (
	"fmt"
	"io"
	"sync/atomic"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// New builds a logger writing to w in format ("json" or "console") at
// level ("debug", "info", "warn", "error"); the errors name the flags
// --log-format and --log-level. Timestamps are ISO 8601 under "ts".
func New(format, level string, w io.Writer) (*zap.Logger, error) {
	lvl, err := zapcore.ParseLevel(level)
	if err != nil {
		return nil, fmt.Errorf("--log-level: %q is not one of debug, info, warn, error", level)
	}
	encCfg := zap.NewProductionEncoderConfig()
	encCfg.TimeKey = "ts"
	encCfg.EncodeTime = zapcore.ISO8601TimeEncoder
	var enc zapcore.Encoder
	switch format {
	case "json":
		enc = zapcore.NewJSONEncoder(encCfg)
	case "console":
		encCfg.EncodeLevel = zapcore.CapitalLevelEncoder
		enc = zapcore.NewConsoleEncoder(encCfg)
	default:
		return nil, fmt.Errorf("--log-format: %q is not json or console", format)
	}
	out := zapcore.Lock(zapcore.AddSync(w))
	return zap.New(zapcore.NewCore(enc, out, lvl), zap.ErrorOutput(out)), nil
}

// CountingWriter passes writes to W and counts those that failed (a full
// disk, a closed pipe), so that losing the log shows in the metrics.
type CountingWriter struct {
	W      io.Writer
	errors atomic.Int64
}

func (c *CountingWriter) Write(p []byte) (int, error) {
	n, err := c.W.Write(p)
	if err != nil {
		c.errors.Add(1)
	}
	return n, err
}

// Failures is the number of writes that failed so far.
func (c *CountingWriter) Failures() int64 { return c.errors.Load() }
