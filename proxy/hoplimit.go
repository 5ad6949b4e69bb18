package proxy

import "net"

// EC2 sends the token PUT response with the IP TTL (IPv6 hop limit) set to the
// instance's HttpPutResponseHopLimit, so that a token cannot travel further
// than that many hops (for example into a container network). The daemon does
// the same for the token response: it sets IP_TTL or IPV6_UNICAST_HOPS on the
// connection before writing the response, and leaves it set until the next
// request arrives on the connection, when it restores the previous value, so
// that the other responses on a keep-alive connection are unaffected.
//
// Why not restore right after writing: the kernel reads the option whenever
// it builds a segment, retransmissions included. A response dropped at the
// hop limit (the point of the limit) is retransmitted about 200 ms later,
// and after an immediate restore the retransmission carried the normal TTL
// and reached the client beyond the limit. A client that sends its next
// request has received the token response (HTTP/1.1 answers in order, and
// SDKs do not pipeline), so none of its segments is retransmitted after the
// restore. A client beyond the limit never receives the token response;
// should it send another request anyway (pipelined, or blind), the kernel
// still holds unacknowledged bytes of the token response (SIOCOUTQ), and the
// limit is kept for that request's answer too, so nothing of the connection
// ever leaves with the normal TTL while the token is unacknowledged.

// hopsUnset is the value of the IP TTL and IPv6 unicast hop limit options
// that means "not set, the route's default": a socket accepted from a
// listener that did not set them has it, and setting it restores that.
const hopsUnset = -1

// deferHopRestore keeps restore for the connection's next request and
// reports true, or reports false when there is no connection record (the
// handler is served outside Serve) and the caller must restore at once.
func (ci *connInfo) deferHopRestore(restore func() error) bool {
	if ci == nil {
		return false
	}
	ci.hopRestore.Store(&restore)
	return true
}

// takeHopRestore returns and clears the restore left by the connection's
// previous request, nil when there is none. It runs on every request: one
// atomic swap.
func (ci *connInfo) takeHopRestore() func() error {
	if ci == nil {
		return nil
	}
	if p := ci.hopRestore.Swap(nil); p != nil {
		return *p
	}
	return nil
}

// isIPv4Conn reports whether c carries IPv4 traffic (including IPv4 on a
// dual-stack socket, where Go reports the local address in its 4-byte form).
func isIPv4Conn(c net.Conn) (v4 bool, ok bool) {
	a, isTCP := c.LocalAddr().(*net.TCPAddr)
	if !isTCP {
		return false, false
	}
	return a.IP.To4() != nil, true
}
