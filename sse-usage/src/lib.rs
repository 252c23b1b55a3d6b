//! `libllmroute_sse_usage.so`: llmroute's Envoy dynamic module, with two HTTP filters on the
//! gateway's front listener.
//!
//! - `request` (first in the chain): reads the body of each request of the operations the gateway
//!   checks (chat and text completions, embeddings, responses) with a real JSON parser, refuses
//!   what is ambiguous or malformed, and passes on one canonical body; it tells the front Lua its
//!   verdict, the model and whether a stream's client asked for usage in request headers the Lua
//!   reads and removes ([`request`]; docs/design/request-checking.md).
//! - `sse_usage`: reads the usage object of a streamed answer (server-sent events) as the bytes
//!   pass and writes it to the `llmroute` dynamic metadata key `usage`, which the gateway's access
//!   log carries to the Pod's sidecar (docs/design/usage.md). It replaced Envoy's
//!   `sse_to_metadata` filter, which built a JSON tree of every event: that delayed a stream's
//!   first byte by about 0.06 ms (docs/benchmarks.md). This one scans each byte once and builds
//!   nothing. On the streams whose usage the gateway asked for and the client did not (the
//!   backend listener marks their answer `x-llmroute-usage-added`), it also takes the usage-only
//!   event out; it says so by setting the mark to `hidden`.
//!
//! - [`request`], [`scan`]: the request checker and the stream scanner, pure and unit-tested.
//! - `ffi`: the C ABI of Envoy 1.40.0's dynamic modules that Envoy calls.

pub mod admission;
pub mod request;
pub mod scan;

// Not in the crate's unit tests: the callbacks it calls are Envoy's, resolved when Envoy loads
// the library.
#[cfg(not(test))]
mod ffi;
