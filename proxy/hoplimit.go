package proxy

import (
	"context"
	"net"
)

// EC2 sends the token PUT response with the IP TTL (IPv6 hop limit) set to the
// instance's HttpPutResponseHopLimit, so that a token cannot travel further
// than that many hops (for example into a container network). The daemon does
// the same for the token response only: it sets IP_TTL or IPV6_UNICAST_HOPS on
// the connection, writes and flushes the response, then restores the previous
// value so that other responses on the keep-alive connection are unaffected.
//
// Limitation: the option is read by the kernel when a segment is built. A
// segment of the token response that is retransmitted after the restore
// carries the restored TTL. With TCP_NODELAY (Go's default) the response of a
// few hundred bytes leaves in the first write.

// connKey is the context key under which Serve stores the accepted net.Conn.
type connKey struct{}

// connContext is the http.Server.ConnContext of Serve.
func connContext(ctx context.Context, c net.Conn) context.Context {
	return context.WithValue(ctx, connKey{}, c)
}

// connFrom returns the connection stored by connContext, or nil.
func connFrom(ctx context.Context) net.Conn {
	c, _ := ctx.Value(connKey{}).(net.Conn)
	return c
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
