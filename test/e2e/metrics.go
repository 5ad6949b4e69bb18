package e2e

import (
	"fmt"
	"io"
	"maps"
	"net/http"
	"slices"
	"strings"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// Sample is one line of a Prometheus text exposition. A histogram or a
// summary is the samples its text shows (name_bucket with le, name_sum,
// name_count; quantiles), le and quantile written as client_golang writes
// them (le="0.1", le="1", le="+Inf"). As in Prometheus, a label with an
// empty value is no label: Labels leaves it out, and a wanted label ""
// matches its absence.
type Sample struct {
	Name   string
	Labels map[string]string
	Value  float64
}

// Metrics is a parsed /metrics: every sample, in no particular order.
type Metrics []Sample

// ParseMetrics parses a Prometheus text exposition (what /metrics answers
// a client that asks for no other format) with expfmt. Lines without a
// # TYPE are untyped samples, each its own name; the last line needs no
// newline.
func ParseMetrics(text string) (Metrics, error) {
	if text != "" && !strings.HasSuffix(text, "\n") {
		text += "\n"
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(strings.NewReader(text))
	if err != nil {
		return nil, fmt.Errorf("metrics: %w", err)
	}
	var m Metrics
	for _, f := range fams {
		vec, err := expfmt.ExtractSamples(&expfmt.DecodeOptions{}, f)
		if err != nil {
			return nil, fmt.Errorf("metrics: %s: %w", f.GetName(), err)
		}
		for _, s := range vec {
			labels := make(map[string]string, len(s.Metric)-1)
			for k, v := range s.Metric {
				if k != model.MetricNameLabel && v != "" {
					labels[string(k)] = string(v)
				}
			}
			m = append(m, Sample{Name: string(s.Metric[model.MetricNameLabel]), Labels: labels, Value: float64(s.Value)})
		}
	}
	return m, nil
}

// ScrapeMetrics GETs adminURL/metrics (adminURL is http://host:port) with
// client and parses it. It returns the text too.
func ScrapeMetrics(client *http.Client, adminURL string) (Metrics, string, error) {
	resp, err := client.Get(adminURL + "/metrics")
	if err != nil {
		return nil, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, "", err
	}
	if resp.StatusCode != http.StatusOK {
		return nil, string(b), fmt.Errorf("GET %s/metrics: %s", adminURL, resp.Status)
	}
	m, err := ParseMetrics(string(b))
	return m, string(b), err
}

// Select returns the samples called name whose labels include every label
// of labels (all of name's samples when labels is empty).
func (m Metrics) Select(name string, labels map[string]string) Metrics {
	var out Metrics
	for _, s := range m {
		if s.Name == name && includes(s.Labels, labels) {
			out = append(out, s)
		}
	}
	return out
}

// Sum is the sum of the values Select returns: 0 when there are none.
func (m Metrics) Sum(name string, labels map[string]string) float64 {
	var sum float64
	for _, s := range m.Select(name, labels) {
		sum += s.Value
	}
	return sum
}

// Value returns the value of the sample called name with exactly the labels
// labels (none: nil), and whether there is one.
func (m Metrics) Value(name string, labels map[string]string) (float64, bool) {
	n := 0 // labels that are not ""
	for _, v := range labels {
		if v != "" {
			n++
		}
	}
	for _, s := range m {
		if s.Name == name && len(s.Labels) == n && includes(s.Labels, labels) {
			return s.Value, true
		}
	}
	return 0, false
}

func includes(have, want map[string]string) bool {
	for k, v := range want {
		if have[k] != v {
			return false
		}
	}
	return true
}

// String renders m as text exposition lines (name{label="value",…} value),
// sorted: for a failure message.
func (m Metrics) String() string {
	lines := make([]string, 0, len(m))
	for _, s := range m {
		var b strings.Builder
		b.WriteString(s.Name)
		if len(s.Labels) > 0 {
			keys := slices.Sorted(maps.Keys(s.Labels))
			b.WriteByte('{')
			for i, k := range keys {
				if i > 0 {
					b.WriteByte(',')
				}
				fmt.Fprintf(&b, "%s=%q", k, s.Labels[k])
			}
			b.WriteByte('}')
		}
		fmt.Fprintf(&b, " %v", s.Value)
		lines = append(lines, b.String())
	}
	slices.Sort(lines)
	return strings.Join(lines, "\n")
}
