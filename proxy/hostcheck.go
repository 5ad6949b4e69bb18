package proxy

import (
	"fmt"
	"net"
	"net/http"
	"slices"
	"strings"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promauto"
)

// defaultHosts are the Host header values (without port) every Server
// accepts: the IMDS addresses SDKs use and the loopback names of a directly
// configured endpoint. Config.AllowedHosts adds to them, and the address of
// the listener a request arrived on is always accepted.
var defaultHosts = []string{"169.254.169.254", "fd00:ec2::254", "localhost", "127.0.0.1", "::1"}

// hostForbidden is the body of a request refused for its Host header.
const hostForbidden = "Forbidden: Host header not allowed"

// normalizeHosts validates Config.AllowedHosts and returns a lower-cased copy:
// each entry is a host name or IP address without port or brackets.
func normalizeHosts(hosts []string) ([]string, error) {
	out := make([]string, 0, len(hosts))
	for _, h := range hosts {
		l := strings.ToLower(h)
		if ip := net.ParseIP(l); ip != nil {
			l = ip.String() // canonical, as hostAllowed compares
		} else if len(l) > 253 || !validHostName(l) {
			return nil, fmt.Errorf("proxy: allowed host %q: want a host name or IP address without port or brackets", h)
		}
		out = append(out, l)
	}
	return out, nil
}

// validHostName reports whether s is a DNS name in lower case:
// dot-separated labels of 1..63 letters, digits and hyphens, neither
// starting nor ending with a hyphen. (Not a regular expression: the counted
// repetitions compile to 12 KB that every GC cycle marks.)
func validHostName(s string) bool {
	for label := range strings.SplitSeq(s, ".") {
		if len(label) == 0 || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return false
		}
		for i := 0; i < len(label); i++ {
			if c := label[i]; !('a' <= c && c <= 'z' || '0' <= c && c <= '9' || c == '-') {
				return false
			}
		}
	}
	return true
}

// hostAllowed reports whether the Host header value host (r.Host, which for
// an absolute-form request target is the target's host) names this IMDS:
// empty (HTTP/1.0), one of defaultHosts or extra, or the IP of local (the
// listener's address the request arrived on, nil if unknown), each with or
// without a numeric port. IPv6 addresses must be bracketed. Anything else, in
// particular a DNS name a browser sends after DNS rebinding, user info or
// non-ASCII, is refused.
func hostAllowed(host string, local net.Addr, extra []string) bool {
	if host == "" {
		return true
	}
	name := host
	switch {
	case !strings.ContainsAny(host, ":[]"):
		// A name or IPv4 address without port, as SDKs send it. (Checked
		// first: net.SplitHostPort allocates its error for the forms
		// without a port.)
	case strings.HasPrefix(host, "[") && strings.HasSuffix(host, "]"):
		name = host[1 : len(host)-1]
	default:
		h, port, err := net.SplitHostPort(host)
		if err != nil || !digits(port) {
			return false // a bare IPv6 address or a malformed port
		}
		if strings.Contains(h, ":") && !strings.HasPrefix(host, "[") {
			return false
		}
		name = h
	}
	if strings.Contains(name, "%") {
		return false // IPv6 zones are not used to reach the IMDS
	}
	name = strings.ToLower(name)
	if slices.Contains(defaultHosts, name) || slices.Contains(extra, name) {
		// The lists hold canonical names and addresses: what SDKs send
		// (169.254.169.254) matches as it is, on every request, without
		// parsing or allocating.
		return true
	}
	ip := net.ParseIP(name)
	if ip == nil {
		return false // a name, and not one of the lists'
	}
	if canon := ip.String(); canon != name && (slices.Contains(defaultHosts, canon) || slices.Contains(extra, canon)) {
		return true // another spelling of a listed address (::ffff:…, 0-padded IPv6)
	}
	ta, ok := local.(*net.TCPAddr)
	return ok && ta.IP != nil && ip.Equal(ta.IP)
}

// digits reports whether s is empty (RFC 3986 allows "host:") or at most
// five ASCII digits.
func digits(s string) bool {
	if len(s) > 5 {
		return false
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return true
}

// checkRequest applies the checks against request smuggling and DNS
// rebinding, on every route, before any handler runs. It returns false when
// it has written the refusal.
//
// Framing: a request with a Transfer-Encoding (chunked, alone or together
// with a Content-Length that net/http then ignores) is refused with 400 and
// its connection closed, so that whatever follows on the connection is never
// parsed as a request. No SDK sends a body on IMDS requests; a
// Content-Length body (at most maxBodyBytes) is still read and discarded.
//
// Host: a request that arrived over a connection (ci, Serve's record of it,
// or http.LocalAddrContextKey, which every http.Server sets) whose Host is
// not allowed (see hostAllowed) gets 403: a page loaded from a rebound DNS name
// must get neither a token, nor credentials, nor metadata. A request built
// in process without a connection (httptest.NewRequest) has no listener
// address and its Host is not checked.
func (s *Server) checkRequest(w http.ResponseWriter, r *http.Request, ci *connInfo, st *state) bool {
	if len(r.TransferEncoding) > 0 {
		w.Header().Set("Connection", "close")
		writeText(w, http.StatusBadRequest, "Bad Request")
		return false
	}
	if ci.allowedBefore(r.Host, st) {
		return true
	}
	local, ok := localAddr(r, ci)
	if !ok {
		return true
	}
	if hostAllowed(r.Host, local, st.cfg.AllowedHosts) {
		ci.rememberHost(r.Host, st)
		return true
	}
	s.lim.hostRejections.Inc()
	writeText(w, http.StatusForbidden, hostForbidden)
	return false
}

// hostMemo is a Host header value found allowed on a connection under the
// configuration st: hostAllowed's answer depends only on the value, the
// connection's local address and st's AllowedHosts.
type hostMemo struct {
	host string
	st   *state
}

// allowedBefore reports whether host was found allowed on this connection
// under the configuration st (the same state, not an equal one: an Update
// checks again). False without a record.
func (ci *connInfo) allowedBefore(host string, st *state) bool {
	if ci == nil {
		return false
	}
	m := ci.host.Load()
	return m != nil && m.st == st && m.host == host
}

// rememberHost records host as allowed under st (a no-op without a record).
func (ci *connInfo) rememberHost(host string, st *state) {
	if ci != nil {
		ci.host.Store(&hostMemo{host: host, st: st})
	}
}

// localAddr is the listener address r arrived at: from Serve's record of
// the connection (what http.Server also stores as LocalAddrContextKey), else
// from the context; false for a request built without a connection.
func localAddr(r *http.Request, ci *connInfo) (net.Addr, bool) {
	if ci != nil {
		return ci.conn.LocalAddr(), true
	}
	a, ok := r.Context().Value(http.LocalAddrContextKey).(net.Addr)
	return a, ok
}

// limitMetrics are the collectors of the Host check and the connection
// limit.
type limitMetrics struct {
	hostRejections prometheus.Counter
	openConns      prometheus.Gauge
	limitReached   prometheus.Counter
	idleClosed     prometheus.Counter
	overShare      prometheus.Counter
}

// newLimitMetrics builds the collectors and registers them with reg (nil:
// not registered).
func newLimitMetrics(reg prometheus.Registerer) (*limitMetrics, error) {
	factory := promauto.With(reg)
	m := &limitMetrics{
		hostRejections: factory.NewCounter(prometheus.CounterOpts{
			Name: "imdsproxy_http_host_rejections_total",
			Help: "IMDS requests refused with 403 because their Host header does not name the IMDS (DNS rebinding defence).",
		}),
		openConns: factory.NewGauge(prometheus.GaugeOpts{
			Name: "imdsproxy_http_open_connections",
			Help: "Client connections to the IMDS listeners currently open.",
		}),
		limitReached: factory.NewCounter(prometheus.CounterOpts{
			Name: "imdsproxy_http_connection_limit_reached_total",
			Help: "Times a new IMDS connection had to wait because max connections were open.",
		}),
		idleClosed: factory.NewCounter(prometheus.CounterOpts{
			Name: "imdsproxy_http_idle_connections_closed_total",
			Help: "Keep-alive IMDS connections closed while idle to make room for a new one at the connection limit.",
		}),
		overShare: factory.NewCounter(prometheus.CounterOpts{
			Name: "imdsproxy_http_connections_over_share_total",
			Help: "New IMDS connections closed at once because their uid already held a quarter of the connection slots while more than half were taken.",
		}),
	}

	return m, nil
}
