// Package config decodes the YAML configuration files of imdsproxy and
// imdsproxy-issuer strictly: one document, a mapping at the top, no unknown
// or duplicate keys, no aliases, and values of the shape the Go type wants.
// Every error names the offending key by its dotted path ("role.arn",
// "workloads[2].uid") and the line it is on.
//
// Each package that owns a config section declares its struct with yaml
// tags and validates it itself; this package only decodes. It is a leaf: it
// imports nothing of the project.
package config

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"reflect"
	"strconv"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"
)

// MaxSize bounds a config file, in bytes; a real one is a few kilobytes.
const MaxSize = 1 << 20

// Duration is a time.Duration written as a Go duration string ("90s", "1h").
// Negative values are refused by Decode.
type Duration time.Duration

// D returns the value as a time.Duration.
func (d Duration) D() time.Duration { return time.Duration(d) }

// UnmarshalYAML parses a Go duration string. Decode has already produced a
// key-named error for bad values; this is the fallback for other decoders.
func (d *Duration) UnmarshalYAML(n *yaml.Node) error {
	v, err := time.ParseDuration(n.Value)
	if err != nil {
		return fmt.Errorf("line %d: %q is not a duration (use Go syntax such as 90s, 15m, 1h)", n.Line, n.Value)
	}
	*d = Duration(v)
	return nil
}

// MarshalYAML writes the duration as a Go duration string.
func (d Duration) MarshalYAML() (any, error) { return time.Duration(d).String(), nil }

// ReadFile reads the file at path, refusing one larger than MaxSize.
func ReadFile(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, MaxSize+1))
	if err != nil {
		return nil, fmt.Errorf("config: read %s: %w", path, err)
	}
	if len(data) > MaxSize {
		return nil, fmt.Errorf("config: %s is larger than %d bytes", path, MaxSize)
	}
	return data, nil
}

// Decode parses data into v (a pointer to a struct holding its defaults),
// refusing anything but one YAML mapping whose keys are exactly v's yaml
// tags, recursively. Fields not in data keep their value.
func Decode(data []byte, v any) error {
	rv := reflect.ValueOf(v)
	if rv.Kind() != reflect.Pointer || rv.Elem().Kind() != reflect.Struct {
		return errors.New("config: Decode needs a pointer to a struct")
	}
	var doc yaml.Node
	dec := yaml.NewDecoder(bytes.NewReader(data))
	if err := dec.Decode(&doc); err != nil {
		if errors.Is(err, io.EOF) {
			return errors.New("config: the file is empty")
		}
		return fmt.Errorf("config: %w", err)
	}
	var extra yaml.Node
	if err := dec.Decode(&extra); !errors.Is(err, io.EOF) {
		return errors.New("config: more than one YAML document")
	}
	if len(doc.Content) != 1 || doc.Content[0].Kind != yaml.MappingNode {
		return errors.New("config: the top level must be a mapping of keys")
	}
	if err := checkNode(doc.Content[0], rv.Elem().Type(), ""); err != nil {
		return err
	}
	if err := doc.Content[0].Decode(v); err != nil {
		return fmt.Errorf("config: %w", err)
	}
	return nil
}

var durationType = reflect.TypeOf(Duration(0))

// checkNode walks the YAML tree against the Go type and reports the first key
// that is unknown, duplicated or of the wrong shape, by its dotted path.
func checkNode(n *yaml.Node, t reflect.Type, path string) error {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if n.Kind == yaml.AliasNode {
		return fmt.Errorf("config: line %d: %s: YAML aliases are not supported", n.Line, Name(path))
	}
	if n.Tag == "!!null" {
		return nil
	}
	switch {
	case t == durationType:
		if n.Kind != yaml.ScalarNode {
			return fmt.Errorf("config: line %d: %s: must be a duration such as 90s or 1h", n.Line, Name(path))
		}
		d, err := time.ParseDuration(n.Value)
		if err != nil {
			return fmt.Errorf("config: line %d: %s: %q is not a duration (use Go syntax such as 90s, 15m, 1h)", n.Line, Name(path), n.Value)
		}
		if d < 0 {
			return fmt.Errorf("config: line %d: %s: must not be negative", n.Line, Name(path))
		}
	case t.Kind() == reflect.Struct:
		if n.Kind != yaml.MappingNode {
			return fmt.Errorf("config: line %d: %s: must be a mapping of keys", n.Line, Name(path))
		}
		seen := map[string]bool{}
		for i := 0; i+1 < len(n.Content); i += 2 {
			k, v := n.Content[i], n.Content[i+1]
			key := Join(path, k.Value)
			if seen[k.Value] {
				return fmt.Errorf("config: line %d: %s: key given twice", k.Line, key)
			}
			seen[k.Value] = true
			f, ok := fieldByTag(t, k.Value)
			if !ok {
				return fmt.Errorf("config: line %d: unknown key %s%s", k.Line, key, suggest(t))
			}
			if err := checkNode(v, f.Type, key); err != nil {
				return err
			}
		}
	case t.Kind() == reflect.Slice:
		if n.Kind != yaml.SequenceNode {
			return fmt.Errorf("config: line %d: %s: must be a list", n.Line, Name(path))
		}
		for i, c := range n.Content {
			if err := checkNode(c, t.Elem(), fmt.Sprintf("%s[%d]", path, i)); err != nil {
				return err
			}
		}
	case t.Kind() == reflect.Map:
		if n.Kind != yaml.MappingNode {
			return fmt.Errorf("config: line %d: %s: must be a mapping", n.Line, Name(path))
		}
		seen := map[string]bool{}
		for i := 0; i+1 < len(n.Content); i += 2 {
			k, v := n.Content[i], n.Content[i+1]
			key := Join(path, k.Value)
			if k.Kind != yaml.ScalarNode || seen[k.Value] {
				return fmt.Errorf("config: line %d: %s: keys must be distinct strings", k.Line, key)
			}
			seen[k.Value] = true
			if err := checkNode(v, t.Elem(), key); err != nil {
				return err
			}
		}
	case t.Kind() == reflect.String:
		if n.Kind != yaml.ScalarNode {
			return fmt.Errorf("config: line %d: %s: must be a string", n.Line, Name(path))
		}
	case t.Kind() == reflect.Bool:
		if n.Kind != yaml.ScalarNode {
			return fmt.Errorf("config: line %d: %s: must be true or false", n.Line, Name(path))
		}
		if !isBool(n.Value) {
			return fmt.Errorf("config: line %d: %s: %q is not true or false", n.Line, Name(path), n.Value)
		}
	case t.Kind() == reflect.Int, t.Kind() == reflect.Int64, t.Kind() == reflect.Uint32:
		if n.Kind != yaml.ScalarNode {
			return fmt.Errorf("config: line %d: %s: must be a whole number", n.Line, Name(path))
		}
		if _, err := strconv.ParseInt(n.Value, 10, 64); err != nil {
			return fmt.Errorf("config: line %d: %s: %q is not a whole number", n.Line, Name(path), n.Value)
		}
	}
	return nil
}

// isBool reports whether s is a boolean as yaml.v3 decodes one into a bool
// (YAML 1.2 true/false, and the YAML 1.1 yes/no/on/off it still accepts).
func isBool(s string) bool {
	if _, err := strconv.ParseBool(s); err == nil {
		return true
	}
	switch strings.ToLower(s) {
	case "yes", "no", "on", "off", "y", "n":
		return true
	}
	return false
}

// Name is path for messages: "top level" when empty.
func Name(path string) string {
	if path == "" {
		return "top level"
	}
	return path
}

// Join appends key to the dotted path.
func Join(path, key string) string {
	if path == "" {
		return key
	}
	return path + "." + key
}

func fieldByTag(t reflect.Type, key string) (reflect.StructField, bool) {
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		if tagName(f) == key {
			return f, true
		}
	}
	return reflect.StructField{}, false
}

func tagName(f reflect.StructField) string {
	return strings.Split(f.Tag.Get("yaml"), ",")[0]
}

// suggest names the known keys of a section, to help with typos.
func suggest(t reflect.Type) string {
	var keys []string
	for i := 0; i < t.NumField(); i++ {
		if k := tagName(t.Field(i)); k != "" && k != "-" {
			keys = append(keys, k)
		}
	}
	return fmt.Sprintf(" (known keys here: %s)", strings.Join(keys, ", "))
}

// Keys lists every key path of the struct type of v, recursively (lists as
// "key[]"), in field order: the reference a test compares documentation
// against, so that no key goes undocumented.
func Keys(v any) []string {
	var out []string
	var walk func(t reflect.Type, path string)
	walk = func(t reflect.Type, path string) {
		for t.Kind() == reflect.Pointer {
			t = t.Elem()
		}
		switch {
		case t == durationType:
		case t.Kind() == reflect.Struct:
			for i := 0; i < t.NumField(); i++ {
				k := tagName(t.Field(i))
				if k == "" || k == "-" {
					continue
				}
				p := Join(path, k)
				out = append(out, p)
				walk(t.Field(i).Type, p)
			}
		case t.Kind() == reflect.Slice:
			walk(t.Elem(), path+"[]")
		}
	}
	walk(reflect.TypeOf(v), "")
	return out
}
