// Package growstack grows the calling goroutine's stack ahead of need, in
// one copy while it is shallow.
//
// A goroutine starts with a small stack (2 KiB while most goroutines are
// small, as the daemon's are) and the runtime doubles it each time a call
// does not fit, copying the whole stack and adjusting every frame on it.
// The front doors serve each connection on a goroutine of its own, and a
// request's deepest path (decision, broker, audit, response) needs about
// 16 KiB: left alone, every new connection grows 2→4→8→16 KiB, the later
// copies from deep in the handler. An SDK's cold flow opens a connection
// per request, so those copies were 7–9% of the daemon's CPU there
// (docs/benchmarks.md, "What moved the cold flow"). Calling Grow at the
// top of the handler makes it one copy of a few frames.
package growstack

// Frame is the size of Grow's frame: a call to Grow needs Frame bytes of
// stack (plus the runtime's guard) beyond its caller's, so the stack it
// leaves has at least that much free below the caller.
const Frame = 8 << 10

// Grow returns at once. Its frame is Frame bytes (growstack.s), so when the
// caller's stack has less room than that, the runtime grows it — to
// 16 KiB from a handler's entry — in one copy; when it has room, Grow
// costs a call. It neither reads nor writes its frame.
func Grow()
