// Package config decodes the YAML configuration files of imdsproxy and
// imdsproxy-issuer strictly: one document, a mapping at the top, no unknown
// or duplicate keys, no aliases, and values of the shape the Go type wants.
// Every error names the offending key by its dotted path ("role.arn",
// "workloads[2].uid") and the line it is on.
//
// Each package that owns a config section declares its struct with yaml
// tags and validates it itself; this package decodes, and holds the few
// shapes several sections share (Duration, Role, URL and path checks). It
// imports only the leaf package creds.
package config

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"reflect"
	"regexp"
	"strconv"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/imdsproxy/imdsproxy/creds"
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

// Role is a role section of a config file: the top-level `role:` and each
// workload's. Validate checks it and derives Name from ARN.
type Role struct {
	ARN         string   `yaml:"arn"`
	Name        string   `yaml:"name"`
	SessionName string   `yaml:"session_name"`
	Duration    Duration `yaml:"duration"`
}

var roleARNRe = regexp.MustCompile(`^arn:aws[a-z-]*:iam::[0-9]{12}:role/(?:[\x21-\x7e]+/)*([\w+=,.@-]{1,64})$`)

// Validate checks the role at path (for example "role" or
// "workloads[2].role"): an IAM role ARN (required unless arnOptional and
// empty), a valid name (default: the last part of the ARN), a valid session
// name when set, and a duration within the STS limits of 15m..12h (0 is
// replaced by def). Every error names the key.
func (r *Role) Validate(path string, arnOptional bool, def time.Duration) error {
	m := roleARNRe.FindStringSubmatch(r.ARN)
	switch {
	case m != nil:
		if r.Name == "" {
			r.Name = m[1]
		}
	case arnOptional && r.ARN == "":
	default:
		return fmt.Errorf("config: %s.arn: %q is not an IAM role ARN such as arn:aws:iam::222222222222:role/app", path, r.ARN)
	}
	if r.Name != "" && !creds.ValidRoleName(r.Name) {
		return fmt.Errorf("config: %s.name: %q may hold only letters, digits and _+=,.@- (1 to 64)", path, r.Name)
	}
	if r.SessionName != "" && !creds.ValidSessionName(r.SessionName) {
		return fmt.Errorf("config: %s.session_name: %q may hold only letters, digits and _+=,.@- (2 to 64)", path, r.SessionName)
	}
	if r.Duration == 0 {
		r.Duration = Duration(def)
	}
	if d := r.Duration.D(); d < 15*time.Minute || d > 12*time.Hour {
		return fmt.Errorf("config: %s.duration: %s is outside 15m..12h (the STS limits)", path, d)
	}
	return nil
}

// Creds is the role as the exchanges take it, with session as the session
// name when none is configured ("" leaves the choice to the source).
func (r Role) Creds(session string) creds.Role {
	if r.SessionName != "" {
		session = r.SessionName
	}
	return creds.Role{Name: r.Name, ARN: r.ARN, SessionName: session, Duration: r.Duration.D()}
}

// CheckURL accepts an absolute https URL without user info; plain http only
// to a loopback host and only when insecureHTTP is set (a local user who
// grabs the port while the real service is down would otherwise receive
// what is sent there, or answer in its place).
func CheckURL(raw string, insecureHTTP bool) error {
	u, err := url.Parse(raw)
	if err != nil || u.Host == "" || u.User != nil || u.Opaque != "" {
		return fmt.Errorf("%q is not an absolute URL without user info", RedactURL(raw))
	}
	switch u.Scheme {
	case "https":
		return nil
	case "http":
		loopback := IsLoopbackHost(u.Hostname())
		switch {
		case !loopback:
			return fmt.Errorf("%q: use https (plain http is allowed only to a loopback address, with insecure_http: true)", RedactURL(raw))
		case !insecureHTTP:
			return fmt.Errorf("%q: plain http needs insecure_http: true beside it (any local user who binds that port while the service is down gets what is sent there)", RedactURL(raw))
		}
		return nil
	}
	return fmt.Errorf("%q: the scheme must be https", RedactURL(raw))
}

// redactURL drops user info, query and fragment (a presigned URL carries its
// signature in the query).
func RedactURL(s string) string {
	u, err := url.Parse(s)
	if err != nil {
		if i := strings.IndexAny(s, "?#@"); i >= 0 {
			return s[:i] + "…"
		}
		return s
	}
	u.User, u.RawQuery, u.ForceQuery, u.Fragment, u.RawFragment = nil, "", false, "", ""
	return u.String()
}

// IsLoopbackHost reports whether host (a URL's Hostname) is "localhost" or
// a loopback address.
func IsLoopbackHost(host string) bool {
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// AbsPath checks that p (at key path) is empty or an absolute path.
func AbsPath(path, p string) error {
	if p != "" && !strings.HasPrefix(p, "/") {
		return fmt.Errorf("config: %s: %q must be an absolute path", path, p)
	}
	return nil
}
