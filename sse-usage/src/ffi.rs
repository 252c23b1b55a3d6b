//! The C ABI between Envoy 1.40.0 and this module (Envoy's `dynamic_modules` HTTP filter).
//!
//! Envoy's Rust SDK is not published on crates.io, so the functions used are declared here, after
//! Envoy's `source/extensions/dynamic_modules/abi/abi.h` of the 1.40 era, and checked against the
//! pinned binary (`scripts/install-envoy`), whose dynamic symbol table exports the callbacks:
//! - `envoy_dynamic_module_callback_http_get_body_chunks_size(filter, body_type) -> size_t` and
//!   `..._get_body_chunks(filter, body_type, envoy_buffer*) -> bool`; `body_type` 2 is the
//!   received response body (the disassembly's jump table: 0 and 2 read the filter's current
//!   request and response data, 1 and 3 the decoder's and encoder's buffered bodies).
//! - `..._http_drain_body(filter, body_type, size_t) -> bool` and
//!   `..._http_append_body(filter, body_type, buffer) -> bool` (the buffer's pointer and length in
//!   the third and fourth registers), with the same body-type table.
//! - `..._http_get_header(filter, header_type, key, envoy_buffer*, index, size_t*) -> bool` and
//!   `..._http_set_header(filter, header_type, key, value) -> bool`; `header_type` 2 is the
//!   response headers (the jump table: 0 and 1 read the decoder's request headers and trailers, 2
//!   and 3 the encoder's response headers and trailers).
//! - `envoy_dynamic_module_callback_http_set_dynamic_metadata_string(filter, ns, key, value)`
//!   takes three `{ptr, length}` buffers by value, returns nothing (the disassembly reads the
//!   namespace and key from registers and the value from the stack: structs, not pointer/length
//!   pairs, which would put the value's pointer in a register).
//!
//! Envoy resolves every `envoy_dynamic_module_on_http_filter_*` event hook below when it loads
//! the filter's configuration (missing ones fail the listener); the ones this module has no use
//! for do nothing.
//! Every hook returns without panicking (no allocation failure aside): a panic cannot cross the
//! C ABI, it would abort Envoy.

use std::ffi::{c_char, c_void};

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

/// `envoy_dynamic_module_type_http_body_type_ReceivedResponseBody`.
const RECEIVED_RESPONSE_BODY: u32 = 2;
/// `envoy_dynamic_module_type_http_header_type_ResponseHeader`.
const RESPONSE_HEADERS: u32 = 2;

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

/// The filter's configuration: the module has none, Envoy needs a non-null pointer.
static CONFIG: u8 = 0;

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

#[unsafe(no_mangle)]
extern "C" fn envoy_dynamic_module_on_http_filter_config_new(
    _config_envoy: *mut c_void,
    _name: Buffer,
    _config: Buffer,
) -> *const c_void {
    (&raw const CONFIG).cast()
}

#[unsafe(no_mangle)]
extern "C" fn envoy_dynamic_module_on_http_filter_config_destroy(_config: *const c_void) {}

/// One stream's state.
struct Filter {
    scanner: UsageScanner,
    /// Take out the usage-only event (the gateway asked for it, the client did not).
    hide: bool,
    /// The chunk as it goes on, when hiding.
    out: Vec<u8>,
}

/// A stream starts: its scanner (a few words; the buffers grow only when used).
#[unsafe(no_mangle)]
extern "C" fn envoy_dynamic_module_on_http_filter_new(
    _config: *const c_void,
    _filter_envoy: *mut c_void,
) -> *mut c_void {
    Box::into_raw(Box::new(Filter {
        scanner: UsageScanner::new(),
        hide: false,
        out: Vec::new(),
    }))
    .cast()
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

/// Hooks of the request, the response's headers and trailers: the module lets them pass.
macro_rules! pass {
    ($($name:ident),* $(,)?) => {$(
        #[unsafe(no_mangle)]
        extern "C" fn $name(_filter_envoy: *mut c_void, _filter: *mut c_void, _end: bool) -> u32 {
            CONTINUE
        }
    )*};
}
pass!(
    envoy_dynamic_module_on_http_filter_request_headers,
    envoy_dynamic_module_on_http_filter_request_body,
    envoy_dynamic_module_on_http_filter_request_trailers,
    envoy_dynamic_module_on_http_filter_response_trailers,
);

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
