//! `libllmroute_sse_usage.so`: an Envoy dynamic module (HTTP filter) on the gateway's front
//! listener. It reads the usage object of a streamed answer (server-sent events) as the bytes pass
//! and writes it to the `llmroute` dynamic metadata key `usage`, which the gateway's access log
//! carries to the Pod's sidecar (docs/design/usage.md). It replaces Envoy's `sse_to_metadata`
//! filter, which built a JSON tree of every event: that delayed a stream's first byte by about
//! 0.06 ms (docs/benchmarks.md). This one scans each byte once and builds nothing.
//!
//! On the streams whose usage the gateway asked for and the client did not (the backend listener
//! marks their answer `x-llmroute-usage-added`), it also takes the usage-only event out, which the
//! front Lua did before with a per-chunk loop; it says so by setting the mark to `hidden`.
//!
//! - [`scan`]: the scanner, pure and unit-tested (every cut of a stream).
//! - `ffi`: the C ABI of Envoy 1.40.0's dynamic modules that Envoy calls.

pub mod scan;

// Not in the crate's unit tests: the callbacks it calls are Envoy's, resolved when Envoy loads
// the library.
#[cfg(not(test))]
mod ffi;
