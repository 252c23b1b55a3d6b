//! The C ABI between Envoy 1.40.0 and this module (Envoy's `dynamic_modules` HTTP filter).
//!
//! Envoy's Rust SDK is not published on crates.io, so the functions used are declared here, after
//! Envoy's `source/extensions/dynamic_modules/abi/abi.h` of the 1.40 era, and checked against the
//! pinned binary (`scripts/install-envoy`), whose dynamic symbol table exports the callbacks:
//! - `envoy_dynamic_module_callback_http_get_body_chunks_size(filter, body_type) -> size_t` and
//!   `..._get_body_chunks(filter, body_type, envoy_buffer*) -> bool`; `body_type` 0 is the
//!   received request body, 1 the buffered request body, 2 the received response body (the
//!   disassembly's jump table: 0 and 2 read the filter's current request and response data, 1
//!   and 3 the decoder's and encoder's buffered bodies; abi.h's `envoy_dynamic_module_type_http_body_type`
//!   lists them in that order).
//! - The request hooks' return values are Envoy's `FilterHeadersStatus` and `FilterDataStatus`
//!   (abi.h: "This corresponds to `FilterHeadersStatus` in envoy/http/filter.h"): headers
//!   `Continue` 0, `StopIteration` 1; body `Continue` 0, `StopIterationAndBuffer` 1. The
//!   dataplane tests show the whole body reaching the checker in one piece.
//! - `..._http_drain_body(filter, body_type, size_t) -> bool` and
//!   `..._http_append_body(filter, body_type, buffer) -> bool` (the buffer's pointer and length in
//!   the third and fourth registers), with the same body-type table.
//! - `..._http_get_header(filter, header_type, key, envoy_buffer*, index, size_t*) -> bool` and
//!   `..._http_set_header(filter, header_type, key, value) -> bool`; `header_type` 0 is the
//!   request headers, 2 the response headers (the jump table: 0 and 1 read the decoder's request headers and trailers, 2
//!   and 3 the encoder's response headers and trailers).
//! - `..._http_get_headers_size(filter, header_type) -> size_t` (the disassembly: the header type
//!   in the second register, checked against 3, the count returned) and
//!   `..._http_get_headers(filter, header_type, envoy_http_header*) -> bool`, the header
//!   `{key_ptr, key_len, value_ptr, value_len}`; `set_header` with a null value removes the header
//!   (Envoy's own test of the callback, `DynamicModuleHttpFilterHeaderTest`).
//! - `envoy_dynamic_module_callback_http_set_dynamic_metadata_string(filter, ns, key, value)`
//!   takes three `{ptr, length}` buffers by value, returns nothing (the disassembly reads the
//!   namespace and key from registers and the value from the stack: structs, not pointer/length
//!   pairs, which would put the value's pointer in a register).
//!
//! - `envoy_dynamic_module_callback_http_send_response(filter, status, headers*, count, body,
//!   details)`: the disassembly of the pinned binary takes the filter in the first register, the
//!   status in the second (as 16 bits), the header array and its count in the third and fourth,
//!   the body as a `{ptr, length}` buffer by value in the fifth and sixth registers, and the
//!   details buffer from the stack (an empty one becomes `dynamic_module`); each header is
//!   `{key_ptr, key_len, value_ptr, value_len}` like the one `get_headers` fills.
//!
//! Envoy resolves every `envoy_dynamic_module_on_http_filter_*` event hook below when it loads
//! the filter's configuration (missing ones fail the listener); the ones this module has no use
//! for do nothing.
//! Every hook returns without panicking (no allocation failure aside): a panic cannot cross the
//! C ABI, it would abort Envoy.

use std::ffi::{c_char, c_void};

use crate::admission::{Verdict, shared};
use crate::request::{self, Operation, Stream};
use crate::scan::UsageScanner;

/// `envoy_dynamic_module_type_envoy_buffer` and `..._module_buffer`: `{const char*, size_t}`.
#[repr(C)]
#[derive(Clone, Copy)]
struct Buffer {
    ptr: *const u8,
    len: usize,
}

impl Buffer {
    const EMPTY: Buffer = Buffer {
        ptr: std::ptr::null(),
        len: 0,
    };

    fn of(bytes: &[u8]) -> Buffer {
        Buffer {
            ptr: bytes.as_ptr(),
            len: bytes.len(),
        }
    }
}

/// `envoy_dynamic_module_type_envoy_http_header`: a header's key and value, Envoy's bytes.
#[repr(C)]
#[derive(Clone, Copy)]
struct Header {
    key: Buffer,
    value: Buffer,
}

/// `envoy_dynamic_module_type_http_body_type_*`.
const RECEIVED_REQUEST_BODY: u32 = 0;
const BUFFERED_REQUEST_BODY: u32 = 1;
const RECEIVED_RESPONSE_BODY: u32 = 2;
/// `envoy_dynamic_module_type_http_header_type_RequestHeader` and `..._ResponseHeader`.
const REQUEST_HEADERS: u32 = 0;
const RESPONSE_HEADERS: u32 = 2;
/// `..._request_headers_status_StopIteration` and `..._request_body_status_StopIterationAndBuffer`.
const STOP_ITERATION: u32 = 1;
const STOP_AND_BUFFER: u32 = 1;

/// What the request filter tells the front Lua, in request headers it sets on every request
/// (replacing a client's own) and the Lua reads and removes (`src/gateway/lua/front.lua`):
/// `x-llmroute-request` is `none` (no body read), `ok`, or `<status> <code> <message>`;
/// `x-llmroute-model` the body's model, `x-llmroute-stream` `hide` or `asked` (empty otherwise).
const VERDICT: &[u8] = b"x-llmroute-request";
const MODEL: &[u8] = b"x-llmroute-model";
const STREAM: &[u8] = b"x-llmroute-stream";
/// And to the admission filter: what the request may cost, in tokens ([`request::Checked::estimate`]),
/// empty when it has no bound (an uncapped request of a route that is not leased).
const ESTIMATE: &[u8] = b"x-llmroute-estimate";
/// Where the admission filter writes what it reserved for an admitted request
/// (`<boot> <tokens>`), which the usage log carries to the sidecar (settled when counted).
const RESERVED_KEY: &[u8] = b"reserved";
/// What the front Lua tells the admission filter of a route whose token budget says
/// `onUnknownUsage: Deny`: `required` (a replica without a lease of it refuses). The request
/// filter dropped a client's own (it is not in [`request::REQUEST_HEADERS`]).
const LEASE: &[u8] = b"x-llmroute-lease";
/// What the backend Lua tells the backend admission filter of a backend with rate limits: its
/// key, `<route>/<backend>`. The estimate comes along from the front listener (the front
/// admission filter leaves it; the account route removes both before the provider).
const RATE_KEY: &[u8] = b"x-llmroute-rate";

/// The backend listener's mark on an answer whose provider the gateway asked for a stream's usage
/// (`src/gateway/lua/backend.lua`): the client did not ask, so its usage-only event is taken out.
/// The module marks it [`HIDDEN`] once it does so; the front Lua, which removes the header, hides
/// the event itself when no module did (a gateway run without `--gateway-usage-module`).
const USAGE_ADDED: &[u8] = b"x-llmroute-usage-added";
const HIDDEN: &[u8] = b"hidden";
/// `..._status_Continue` of every header, body and trailer hook.
const CONTINUE: u32 = 0;

/// Where the usage goes: the dynamic metadata the gateway's access log reads
/// (`%DYNAMIC_METADATA(llmroute:usage)%`, the same key the front Lua writes for whole answers).
const NAMESPACE: &[u8] = b"llmroute";
const KEY: &[u8] = b"usage";

/// Returned to Envoy from the program init hook: Envoy 1.40.0's ABI version (the binary's
/// `ENVOY_DYNAMIC_MODULES_ABI_VERSION`; Envoy logs `Dynamic module ABI version v0.2.0 matched`).
/// Envoy only warns on a difference.
static ABI_VERSION: &[u8] = b"v0.2.0\0";

/// The module's filters.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `request`: checks request bodies (first on the front listener).
    Request,
    /// `sse_usage`: reads the usage of streamed answers.
    SseUsage,
    /// `admission`: admits requests of leased routes (after the front Lua, which checks the key).
    Admission,
    /// `backend_admission`: admits each attempt at its backend's rate limits (in the account
    /// listener, after the backend Lua, which names the backend).
    BackendAdmission,
}

/// A filter's configuration: which of the module's filters, and for `request` the largest body
/// it reads (its configuration string, in bytes; larger bodies are refused with 413). The
/// `admission` filter's configuration is the directory it exchanges grants and reservations in
/// with the Pod's sidecar (`crate::admission`).
struct Config {
    kind: Kind,
    max_body: usize,
}

/// Default largest request body, when the configuration does not say.
const DEFAULT_MAX_BODY: usize = 8 * 1024 * 1024;

unsafe extern "C" {
    fn envoy_dynamic_module_callback_http_get_body_chunks_size(
        filter: *mut c_void,
        body_type: u32,
    ) -> usize;
    fn envoy_dynamic_module_callback_http_get_body_chunks(
        filter: *mut c_void,
        body_type: u32,
        result: *mut Buffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_drain_body(
        filter: *mut c_void,
        body_type: u32,
        bytes: usize,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_append_body(
        filter: *mut c_void,
        body_type: u32,
        data: Buffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_get_header(
        filter: *mut c_void,
        header_type: u32,
        key: Buffer,
        result: *mut Buffer,
        index: usize,
        count: *mut usize,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_set_header(
        filter: *mut c_void,
        header_type: u32,
        key: Buffer,
        value: Buffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_get_headers_size(
        filter: *mut c_void,
        header_type: u32,
    ) -> usize;
    fn envoy_dynamic_module_callback_http_get_headers(
        filter: *mut c_void,
        header_type: u32,
        result: *mut Header,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_send_response(
        filter_envoy: *mut c_void,
        status: u32,
        headers: *const Header,
        count: usize,
        body: Buffer,
        details: Buffer,
    );
    fn envoy_dynamic_module_callback_http_set_dynamic_metadata_string(
        filter: *mut c_void,
        namespace: Buffer,
        key: Buffer,
        value: Buffer,
    );
}

#[unsafe(no_mangle)]
extern "C" fn envoy_dynamic_module_on_program_init() -> *const c_char {
    ABI_VERSION.as_ptr().cast()
}

/// The filter `request` or `sse_usage` (the configuration's `filter_name`); any other name is
/// refused (null: Envoy rejects the configuration).
#[unsafe(no_mangle)]
extern "C" fn envoy_dynamic_module_on_http_filter_config_new(
    _config_envoy: *mut c_void,
    name: Buffer,
    config: Buffer,
) -> *const c_void {
    // SAFETY: Envoy's buffers, valid for the duration of the call.
    let (name, config) = unsafe { (bytes_of(name), bytes_of(config)) };
    let kind = match name {
        b"request" => Kind::Request,
        b"sse_usage" => Kind::SseUsage,
        b"admission" => Kind::Admission,
        b"backend_admission" => Kind::BackendAdmission,
        _ => return std::ptr::null(),
    };
    let config = std::str::from_utf8(config).unwrap_or_default().trim();
    if matches!(kind, Kind::Admission | Kind::BackendAdmission) {
        if config.is_empty() {
            return std::ptr::null();
        }
        shared::start(config);
    }
    let max_body = config.parse().unwrap_or(DEFAULT_MAX_BODY);
    Box::into_raw(Box::new(Config { kind, max_body })).cast()
}

#[unsafe(no_mangle)]
extern "C" fn envoy_dynamic_module_on_http_filter_config_destroy(config: *const c_void) {
    if !config.is_null() {
        // SAFETY: made by `Box::into_raw` in `on_http_filter_config_new`, destroyed once.
        drop(unsafe { Box::from_raw(config.cast_mut().cast::<Config>()) });
    }
}

/// # Safety
/// `b` is a buffer Envoy handed to the running hook (or empty).
unsafe fn bytes_of<'a>(b: Buffer) -> &'a [u8] {
    if b.ptr.is_null() || b.len == 0 {
        &[]
    } else {
        // SAFETY: as the function's contract says.
        unsafe { std::slice::from_raw_parts(b.ptr, b.len) }
    }
}

/// One stream's state.
struct Filter {
    /// The `request` filter (the response hooks do nothing), the `sse_usage` filter (the request
    /// hooks do nothing) or the `admission` filter (request headers only).
    kind: Kind,
    /// The `request` filter's: the operation whose body is being read, and the body's size so far.
    reading: Option<Operation>,
    max_body: usize,
    received: usize,
    /// The `sse_usage` filter's.
    scanner: UsageScanner,
    /// Take out the usage-only event (the gateway asked for it, the client did not).
    hide: bool,
    /// The chunk as it goes on, when hiding.
    out: Vec<u8>,
}

/// A stream starts: its state (a few words; the buffers grow only when used).
#[unsafe(no_mangle)]
extern "C" fn envoy_dynamic_module_on_http_filter_new(
    config: *const c_void,
    _filter_envoy: *mut c_void,
) -> *mut c_void {
    // SAFETY: the configuration this module made (`on_http_filter_config_new`), alive while
    // Envoy has filters of it.
    let config = unsafe { &*config.cast::<Config>() };
    Box::into_raw(Box::new(Filter {
        kind: config.kind,
        reading: None,
        max_body: config.max_body,
        received: 0,
        scanner: UsageScanner::new(),
        hide: false,
        out: Vec::new(),
    }))
    .cast()
}

/// A request header's first value, copied.
fn request_header(filter_envoy: *mut c_void, name: &[u8]) -> Option<Vec<u8>> {
    let (mut value, mut count) = (Buffer::EMPTY, 0usize);
    // SAFETY: Envoy's callback with the pointer it gave the running hook; the value it writes
    // is copied before the hook returns.
    unsafe {
        envoy_dynamic_module_callback_http_get_header(
            filter_envoy,
            REQUEST_HEADERS,
            Buffer::of(name),
            &mut value,
            0,
            &mut count,
        )
        .then(|| bytes_of(value).to_vec())
    }
}

fn set_request_header(filter_envoy: *mut c_void, name: &[u8], value: &[u8]) {
    // SAFETY: Envoy copies both buffers before returning.
    unsafe {
        envoy_dynamic_module_callback_http_set_header(
            filter_envoy,
            REQUEST_HEADERS,
            Buffer::of(name),
            Buffer::of(value),
        );
    }
}

/// Removes a request header.
fn set_request_header_removed(filter_envoy: *mut c_void, name: &[u8]) {
    // SAFETY: Envoy copies the name before returning; a null value removes the header.
    unsafe {
        envoy_dynamic_module_callback_http_set_header(
            filter_envoy,
            REQUEST_HEADERS,
            Buffer::of(name),
            Buffer::EMPTY,
        );
    }
}

/// Removes every header of `header_type` (0 request, 2 response) that `allowed` does not pass
/// ([`request::passes`]).
fn keep_only(filter_envoy: *mut c_void, header_type: u32, allowed: &[&str]) {
    // SAFETY: Envoy's callbacks with the pointer it gave the running hook; Envoy writes `n`
    // headers, whose bytes are copied before any header is changed.
    let drop: Vec<Vec<u8>> = unsafe {
        let n = envoy_dynamic_module_callback_http_get_headers_size(filter_envoy, header_type);
        let mut got = vec![
            Header {
                key: Buffer::EMPTY,
                value: Buffer::EMPTY
            };
            n
        ];
        if n == 0
            || !envoy_dynamic_module_callback_http_get_headers(
                filter_envoy,
                header_type,
                got.as_mut_ptr(),
            )
        {
            return;
        }
        got.iter()
            .map(|h| bytes_of(h.key))
            .filter(|k| !request::passes(allowed, k))
            .map(<[u8]>::to_vec)
            .collect()
    };
    for key in &drop {
        // SAFETY: as above; a null value removes the header (every value of it).
        unsafe {
            envoy_dynamic_module_callback_http_set_header(
                filter_envoy,
                header_type,
                Buffer::of(key),
                Buffer::EMPTY,
            );
        }
    }
}

/// Tells the front Lua the verdict (and clears what a client sent in the gateway's headers).
fn tell(filter_envoy: *mut c_void, verdict: &[u8], model: &[u8], stream: &[u8]) {
    set_request_header(filter_envoy, VERDICT, verdict);
    set_request_header(filter_envoy, MODEL, model);
    set_request_header(filter_envoy, STREAM, stream);
    set_request_header(filter_envoy, ESTIMATE, b"");
}

fn refuse(filter_envoy: *mut c_void, status: u16, code: &str, message: &str) {
    // A header value: the message without line breaks (it names at most a key, escaped).
    let message: String = message
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    tell(
        filter_envoy,
        format!("{status} {code} {message}").as_bytes(),
        b"",
        b"",
    );
}

/// The route a path names (`/<route>/v1/...`).
fn route_of(path: &[u8]) -> Option<String> {
    let rest = path.strip_prefix(b"/")?;
    let end = rest.iter().position(|b| *b == b'/')?;
    std::str::from_utf8(&rest[..end]).ok().map(str::to_string)
}

/// The admission filter (after the front Lua: the request has its route's key): a request of a
/// leased route is admitted against the route's grant, what it reserves written for the usage
/// log, or refused with an OpenAI-shaped 429 and `Retry-After`. A request the checker put no
/// bound on (none of its body is read: an opted-in operation, a `GET`) reserves nothing.
fn admit(filter_envoy: *mut c_void) -> u32 {
    // The estimate stays for the backend admission filter of each attempt.
    let estimate = request_header(filter_envoy, ESTIMATE);
    let required = request_header(filter_envoy, LEASE).as_deref() == Some(b"required");
    set_request_header_removed(filter_envoy, LEASE);
    let Some(route) = request_header(filter_envoy, b":path").and_then(|p| route_of(&p)) else {
        return CONTINUE;
    };
    let estimate = estimate
        .and_then(|e| std::str::from_utf8(&e).ok()?.parse::<u64>().ok())
        .unwrap_or(0);
    let (verdict, boot, retry_after) = {
        let mut state = shared::state();
        let verdict = state.admit(&route, estimate, shared::now());
        (verdict, state.boot().to_string(), state.retry_after())
    };
    match verdict {
        Verdict::NotLeased if required => {
            let message = format!(
                "llmroute: this gateway replica holds no lease of route '{route}''s token budget yet, and the budget says onUnknownUsage: Deny. Retry later."
            );
            too_many(
                filter_envoy,
                &message,
                retry_after,
                "usage_unknown",
                "insufficient_quota",
                "BudgetExhausted",
            );
            STOP_ITERATION
        }
        Verdict::NotLeased => CONTINUE,
        Verdict::RateLimited {
            kind,
            share,
            retry_after,
        } => {
            let message = format!(
                "llmroute: rate limit reached for {kind} per minute on route '{route}' (this gateway replica's share: {share} per minute; this request may cost {estimate} tokens: its body's bytes plus its completion limit). Please try again in {retry_after}s."
            );
            too_many(
                filter_envoy,
                &message,
                retry_after,
                "rate_limit_exceeded",
                kind,
                "RateLimited",
            );
            STOP_ITERATION
        }
        Verdict::Admitted(n) => {
            let value = format!("{boot} {n}");
            // SAFETY: Envoy's callback with the pointer it gave the running hook; it copies the
            // three buffers before returning.
            unsafe {
                envoy_dynamic_module_callback_http_set_dynamic_metadata_string(
                    filter_envoy,
                    Buffer::of(NAMESPACE),
                    Buffer::of(RESERVED_KEY),
                    Buffer::of(value.as_bytes()),
                );
            }
            CONTINUE
        }
        Verdict::Refused {
            left,
            retry_after,
            resets_at,
        } => {
            let resets = if resets_at.is_empty() {
                String::new()
            } else {
                format!(" The budget resets at {resets_at}.")
            };
            let message = format!(
                "llmroute: route '{route}' has no budget left for this request: it may cost {estimate} tokens (its body's bytes plus its completion limit) and this gateway replica holds {left} of what is left of the route's token budget now. Retry later, or ask for fewer tokens (max_tokens).{resets}"
            );
            too_many(
                filter_envoy,
                &message,
                retry_after,
                "budget_exceeded",
                "insufficient_quota",
                "BudgetExhausted",
            );
            STOP_ITERATION
        }
    }
}

/// The backend admission filter: an attempt at a backend with rate limits (the backend Lua named
/// it) is admitted at this process's share of them, or answered 429 `RateLimited`, which the
/// backend Lua marks for the front route to retry on the next backend (when the route's
/// `failoverOn` has `RateLimited`, the default).
fn admit_backend(filter_envoy: *mut c_void) -> u32 {
    let key = request_header(filter_envoy, RATE_KEY);
    let estimate = request_header(filter_envoy, ESTIMATE);
    set_request_header_removed(filter_envoy, RATE_KEY);
    set_request_header_removed(filter_envoy, ESTIMATE);
    let Some(key) = key.and_then(|k| String::from_utf8(k).ok()) else {
        return CONTINUE;
    };
    let estimate = estimate
        .and_then(|e| std::str::from_utf8(&e).ok()?.parse::<u64>().ok())
        .unwrap_or(0);
    let verdict = shared::state().admit_backend(&key, estimate, shared::now());
    let Verdict::RateLimited {
        kind,
        share,
        retry_after,
    } = verdict
    else {
        return CONTINUE;
    };
    let (route, backend) = key.split_once('/').unwrap_or((&key, ""));
    let message = format!(
        "llmroute: backend '{backend}' of route '{route}' is at its rate limit for {kind} per minute (this gateway replica's share: {share} per minute; this request may cost {estimate} tokens), and no other backend of the route took the request. Please try again in {retry_after}s."
    );
    too_many(
        filter_envoy,
        &message,
        retry_after,
        "rate_limit_exceeded",
        kind,
        "RateLimited",
    );
    STOP_ITERATION
}

/// Answers 429 in OpenAI's error shape (`type`, `code`) with `Retry-After` and
/// `x-llmroute-failure` (`BudgetExhausted`, `RateLimited`).
fn too_many(
    filter_envoy: *mut c_void,
    message: &str,
    retry_after: u64,
    code: &str,
    kind: &str,
    failure: &str,
) {
    let mut body = br#"{"error":{"message":"#.to_vec();
    request::json_string(message, &mut body);
    body.extend_from_slice(br#","type":"#);
    request::json_string(kind, &mut body);
    body.extend_from_slice(br#","param":null,"code":"#);
    request::json_string(code, &mut body);
    body.extend_from_slice(b"}}");
    let retry = retry_after.to_string();
    let headers = [
        (b"content-type".as_slice(), b"application/json".as_slice()),
        (b"retry-after", retry.as_bytes()),
        (b"x-llmroute-failure", failure.as_bytes()),
    ]
    .map(|(k, v)| Header {
        key: Buffer::of(k),
        value: Buffer::of(v),
    });
    // SAFETY: Envoy's callback with the pointer it gave the running hook; the header array and
    // the buffers outlive the call (Envoy copies them).
    unsafe {
        envoy_dynamic_module_callback_http_send_response(
            filter_envoy,
            429,
            headers.as_ptr(),
            headers.len(),
            Buffer::of(&body),
            Buffer::of(b"llmroute_budget_admission"),
        );
    }
}

/// A request's headers: a body of an operation the gateway reads is held until it is whole.
#[unsafe(no_mangle)]
extern "C" fn envoy_dynamic_module_on_http_filter_request_headers(
    filter_envoy: *mut c_void,
    filter: *mut c_void,
    end_of_stream: bool,
) -> u32 {
    // SAFETY: see `on_http_filter_response_body`.
    let state = unsafe { &mut *filter.cast::<Filter>() };
    match state.kind {
        Kind::Request => {}
        Kind::SseUsage => return CONTINUE,
        Kind::Admission => return admit(filter_envoy),
        Kind::BackendAdmission => return admit_backend(filter_envoy),
    }
    // (Content-Encoding is not passed on: read it first.)
    let encoding = request_header(filter_envoy, b"content-encoding");
    keep_only(filter_envoy, REQUEST_HEADERS, request::REQUEST_HEADERS);
    tell(filter_envoy, b"none", b"", b"");
    if encoding.is_some_and(|e| !e.trim_ascii().eq_ignore_ascii_case(b"identity")) {
        refuse(
            filter_envoy,
            400,
            "unsupported_content_encoding",
            "The gateway does not accept compressed request bodies (Content-Encoding); send the body uncompressed.",
        );
        return CONTINUE;
    }
    if end_of_stream || request_header(filter_envoy, b":method").as_deref() != Some(b"POST") {
        return CONTINUE;
    }
    let Some(op) = request_header(filter_envoy, b":path").and_then(|p| Operation::of_path(&p))
    else {
        return CONTINUE;
    };
    let json = request_header(filter_envoy, b"content-type").is_none_or(|t| {
        let t = t.trim_ascii_start().to_ascii_lowercase();
        t == b"application/json" || t.starts_with(b"application/json;")
    });
    if !json {
        refuse(
            filter_envoy,
            400,
            "invalid_content_type",
            "The request body must be JSON (Content-Type: application/json).",
        );
        return CONTINUE;
    }
    state.reading = Some(op);
    STOP_ITERATION
}

/// The body's chunks: held (Envoy buffers them) until the last, then checked whole and replaced
/// by its canonical form. Too large a body is refused as soon as it passes the limit.
#[unsafe(no_mangle)]
extern "C" fn envoy_dynamic_module_on_http_filter_request_body(
    filter_envoy: *mut c_void,
    filter: *mut c_void,
    end_of_stream: bool,
) -> u32 {
    // SAFETY: see `on_http_filter_response_body`.
    let state = unsafe { &mut *filter.cast::<Filter>() };
    let Some(op) = state.reading else {
        return CONTINUE;
    };
    // SAFETY: Envoy's callbacks with the pointer it gave this hook.
    let (buffered, received) = unsafe {
        (
            body_chunks(filter_envoy, BUFFERED_REQUEST_BODY),
            body_chunks(filter_envoy, RECEIVED_REQUEST_BODY),
        )
    };
    let size = |chunks: &[&[u8]]| chunks.iter().map(|c| c.len()).sum::<usize>();
    let (buffered_len, received_len) = (size(&buffered), size(&received));
    state.received = buffered_len + received_len;
    if state.received > state.max_body {
        state.reading = None;
        // The body is refused: what was held goes, so that Envoy does not add a large last read
        // to it and answer its own plain-text 413 first.
        // SAFETY: the slices read above are not used past this point.
        unsafe { drain_request_body(filter_envoy, buffered_len, received_len) };
        refuse(
            filter_envoy,
            413,
            "request_too_large",
            &format!(
                "The request body is larger than the gateway reads ({} bytes).",
                state.max_body
            ),
        );
        return CONTINUE;
    }
    if !end_of_stream {
        return STOP_AND_BUFFER;
    }
    state.reading = None;
    let mut body = Vec::with_capacity(state.received);
    for chunk in buffered.iter().chain(received.iter()) {
        body.extend_from_slice(chunk);
    }
    let route = request_header(filter_envoy, b":path").and_then(|p| route_of(&p));
    let cap = route.and_then(|r| shared::state().cap(&r));
    match request::check_capped(&body, op, cap) {
        Err(r) => refuse(filter_envoy, r.status, r.code, &r.message),
        Ok(checked) => {
            // SAFETY: Envoy's callbacks; the slices read above are not used past this point.
            unsafe {
                drain_request_body(filter_envoy, buffered_len, received_len);
                envoy_dynamic_module_callback_http_append_body(
                    filter_envoy,
                    RECEIVED_REQUEST_BODY,
                    Buffer::of(&checked.body),
                );
            }
            if request_header(filter_envoy, b"content-length").is_some() {
                set_request_header(
                    filter_envoy,
                    b"content-length",
                    checked.body.len().to_string().as_bytes(),
                );
            }
            let stream: &[u8] = match checked.stream {
                Stream::No => b"",
                Stream::Hide => b"hide",
                Stream::Asked => b"asked",
            };
            tell(filter_envoy, b"ok", checked.model.as_bytes(), stream);
            if let Some(estimate) = checked.estimate() {
                set_request_header(filter_envoy, ESTIMATE, estimate.to_string().as_bytes());
            }
        }
    }
    CONTINUE
}

/// A body that ends with trailers is not read (HTTP/1 chunked trailers, HTTP/2 trailers): it is
/// refused rather than passed on unchecked.
#[unsafe(no_mangle)]
extern "C" fn envoy_dynamic_module_on_http_filter_request_trailers(
    filter_envoy: *mut c_void,
    filter: *mut c_void,
) -> u32 {
    // SAFETY: see `on_http_filter_response_body`.
    let state = unsafe { &mut *filter.cast::<Filter>() };
    if state.reading.take().is_some() {
        refuse(
            filter_envoy,
            400,
            "invalid_request_body",
            "Request trailers are not accepted.",
        );
    }
    CONTINUE
}

/// Drains the request body held so far (`buffered` bytes) and the chunk of the running hook.
///
/// # Safety
/// `filter_envoy` is the pointer Envoy gave the running request body hook; no slice of the body
/// is used afterwards.
unsafe fn drain_request_body(filter_envoy: *mut c_void, buffered: usize, received: usize) {
    // SAFETY: as the function's contract says.
    unsafe {
        if buffered > 0 {
            envoy_dynamic_module_callback_http_drain_body(
                filter_envoy,
                BUFFERED_REQUEST_BODY,
                buffered,
            );
        }
        envoy_dynamic_module_callback_http_drain_body(
            filter_envoy,
            RECEIVED_REQUEST_BODY,
            received,
        );
    }
}

/// The chunks of a body, as Envoy's own slices (valid until the running hook returns).
///
/// # Safety
/// `filter_envoy` is the pointer Envoy gave the running hook.
unsafe fn body_chunks<'a>(filter_envoy: *mut c_void, body_type: u32) -> Vec<&'a [u8]> {
    // SAFETY: as the function's contract says; Envoy writes `n` buffers.
    unsafe {
        let n = envoy_dynamic_module_callback_http_get_body_chunks_size(filter_envoy, body_type);
        if n == 0 {
            return Vec::new();
        }
        let mut got = vec![Buffer::EMPTY; n];
        if !envoy_dynamic_module_callback_http_get_body_chunks(
            filter_envoy,
            body_type,
            got.as_mut_ptr(),
        ) {
            return Vec::new();
        }
        got.into_iter().map(|b| bytes_of(b)).collect()
    }
}

/// The answer's headers: hide its usage-only event when the backend listener marked it.
#[unsafe(no_mangle)]
extern "C" fn envoy_dynamic_module_on_http_filter_response_headers(
    filter_envoy: *mut c_void,
    filter: *mut c_void,
    _end_of_stream: bool,
) -> u32 {
    // SAFETY: see `on_http_filter_response_body`.
    let state = unsafe { &mut *filter.cast::<Filter>() };
    if matches!(state.kind, Kind::Admission | Kind::BackendAdmission) {
        return CONTINUE;
    }
    if state.kind == Kind::Request {
        // Last on the way back (first in the chain): what the workload gets.
        keep_only(filter_envoy, RESPONSE_HEADERS, request::RESPONSE_HEADERS);
        return CONTINUE;
    }
    let (mut value, mut count) = (Buffer::EMPTY, 0usize);
    // SAFETY: Envoy's callbacks with the pointer it gave this hook; `value` and `count` are
    // written by Envoy and not read; the key and value buffers are copied before the calls return.
    state.hide = unsafe {
        envoy_dynamic_module_callback_http_get_header(
            filter_envoy,
            RESPONSE_HEADERS,
            Buffer::of(USAGE_ADDED),
            &mut value,
            0,
            &mut count,
        ) && envoy_dynamic_module_callback_http_set_header(
            filter_envoy,
            RESPONSE_HEADERS,
            Buffer::of(USAGE_ADDED),
            Buffer::of(HIDDEN),
        )
    };
    CONTINUE
}

/// Each chunk of the answer, as it passes: scanned in place (Envoy's own slices). When hiding,
/// a chunk is rewritten only if it holds the usage-only event or part of an event (held back
/// until the event is whole); otherwise it goes on untouched.
#[unsafe(no_mangle)]
extern "C" fn envoy_dynamic_module_on_http_filter_response_body(
    filter_envoy: *mut c_void,
    filter: *mut c_void,
    _end_of_stream: bool,
) -> u32 {
    // SAFETY: `filter` is the state this module made for the stream (`on_http_filter_new`),
    // used by the one worker that runs the stream and freed only in `on_http_filter_destroy`.
    let state = unsafe { &mut *filter.cast::<Filter>() };
    if state.kind != Kind::SseUsage {
        return CONTINUE;
    }
    let (scanner, out) = (&mut state.scanner, &mut state.out);
    // SAFETY: Envoy's callbacks with the pointer it gave this hook; the slices it writes stay
    // valid until the hook returns and are only read before then.
    let completed = unsafe {
        let n = envoy_dynamic_module_callback_http_get_body_chunks_size(
            filter_envoy,
            RECEIVED_RESPONSE_BODY,
        );
        let mut slices = [Buffer::EMPTY; 8];
        let mut many = Vec::new();
        let got: &mut [Buffer] = if n <= slices.len() {
            &mut slices[..n]
        } else {
            many.resize(n, Buffer::EMPTY);
            &mut many
        };
        let mut completed = false;
        if n > 0
            && envoy_dynamic_module_callback_http_get_body_chunks(
                filter_envoy,
                RECEIVED_RESPONSE_BODY,
                got.as_mut_ptr(),
            )
        {
            let held_before = scanner.holding();
            let mut received = 0;
            out.clear();
            for s in got.iter() {
                if !s.ptr.is_null() && s.len > 0 {
                    let bytes = std::slice::from_raw_parts(s.ptr, s.len);
                    received += s.len;
                    completed |= if state.hide {
                        scanner.feed_hiding(bytes, out)
                    } else {
                        scanner.feed(bytes)
                    };
                }
            }
            // The chunk changes only when an event was taken out or is held back (or one held
            // before goes on now); Envoy's slices are not used past this point.
            let unchanged = held_before == 0 && scanner.holding() == 0 && out.len() == received;
            if state.hide && !unchanged {
                envoy_dynamic_module_callback_http_drain_body(
                    filter_envoy,
                    RECEIVED_RESPONSE_BODY,
                    received,
                );
                if !out.is_empty() {
                    envoy_dynamic_module_callback_http_append_body(
                        filter_envoy,
                        RECEIVED_RESPONSE_BODY,
                        Buffer::of(out),
                    );
                }
            }
        }
        completed
    };
    if completed {
        // SAFETY: as above; Envoy copies the three buffers before returning.
        unsafe {
            envoy_dynamic_module_callback_http_set_dynamic_metadata_string(
                filter_envoy,
                Buffer::of(NAMESPACE),
                Buffer::of(KEY),
                Buffer::of(scanner.usage()),
            );
        }
    }
    CONTINUE
}

#[unsafe(no_mangle)]
extern "C" fn envoy_dynamic_module_on_http_filter_destroy(filter: *mut c_void) {
    if !filter.is_null() {
        // SAFETY: made by `Box::into_raw` in `on_http_filter_new`; Envoy destroys a filter once.
        drop(unsafe { Box::from_raw(filter.cast::<Filter>()) });
    }
}

/// The response's trailers: the module lets them pass.
macro_rules! pass {
    ($($name:ident),* $(,)?) => {$(
        #[unsafe(no_mangle)]
        extern "C" fn $name(_filter_envoy: *mut c_void, _filter: *mut c_void, _end: bool) -> u32 {
            CONTINUE
        }
    )*};
}
pass!(envoy_dynamic_module_on_http_filter_response_trailers,);

/// Event hooks the module never triggers (callouts, streams, schedulers, watermarks): Envoy
/// requires them to exist. They return nothing; their arguments are not read.
macro_rules! unused {
    ($($name:ident),* $(,)?) => {$(
        #[unsafe(no_mangle)]
        extern "C" fn $name() {}
    )*};
}
unused!(
    envoy_dynamic_module_on_http_filter_stream_complete,
    envoy_dynamic_module_on_http_filter_http_callout_done,
    envoy_dynamic_module_on_http_filter_http_stream_headers,
    envoy_dynamic_module_on_http_filter_http_stream_data,
    envoy_dynamic_module_on_http_filter_http_stream_trailers,
    envoy_dynamic_module_on_http_filter_http_stream_complete,
    envoy_dynamic_module_on_http_filter_http_stream_reset,
    envoy_dynamic_module_on_http_filter_scheduled,
    envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark,
    envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark,
);
