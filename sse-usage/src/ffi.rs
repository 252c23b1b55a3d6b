//! The C ABI between Envoy 1.40.0 and this module (Envoy's `dynamic_modules` HTTP filter).
//!
//! Envoy's Rust SDK is not published on crates.io, so the functions used are declared here, after
//! Envoy's `source/extensions/dynamic_modules/abi/abi.h` of the 1.40 era, and checked against the
//! pinned binary (`scripts/install-envoy`), whose dynamic symbol table exports the callbacks:
//! - `envoy_dynamic_module_callback_http_get_body_chunks_size(filter, body_type) -> size_t` and
//!   `..._get_body_chunks(filter, body_type, envoy_buffer*) -> bool`; `body_type` 2 is the
//!   received response body (the disassembly's jump table: 0 and 2 read the filter's current
//!   request and response data, 1 and 3 the decoder's and encoder's buffered bodies).
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

/// A stream starts: its scanner (a few words; the usage buffers grow only when usage is read).
#[unsafe(no_mangle)]
extern "C" fn envoy_dynamic_module_on_http_filter_new(
    _config: *const c_void,
    _filter_envoy: *mut c_void,
) -> *mut c_void {
    Box::into_raw(Box::new(UsageScanner::new())).cast()
}

/// Each chunk of the answer, as it passes: scanned in place (Envoy's own slices), never held.
#[unsafe(no_mangle)]
extern "C" fn envoy_dynamic_module_on_http_filter_response_body(
    filter_envoy: *mut c_void,
    filter: *mut c_void,
    _end_of_stream: bool,
) -> u32 {
    // SAFETY: `filter` is the scanner this module made for the stream (`on_http_filter_new`),
    // used by the one worker that runs the stream and freed only in `on_http_filter_destroy`.
    let scanner = unsafe { &mut *filter.cast::<UsageScanner>() };
    // SAFETY: Envoy's callbacks with the pointer it gave this hook; the slices it writes stay
    // valid until the hook returns and are only read before then.
    let completed = unsafe {
        let n = envoy_dynamic_module_callback_http_get_body_chunks_size(
            filter_envoy,
            RECEIVED_RESPONSE_BODY,
        );
        let mut slices = [Buffer::EMPTY; 8];
        let mut many = Vec::new();
        let out: &mut [Buffer] = if n <= slices.len() {
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
                out.as_mut_ptr(),
            )
        {
            for s in out.iter() {
                if !s.ptr.is_null() && s.len > 0 {
                    completed |= scanner.feed(std::slice::from_raw_parts(s.ptr, s.len));
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
        drop(unsafe { Box::from_raw(filter.cast::<UsageScanner>()) });
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
    envoy_dynamic_module_on_http_filter_response_headers,
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
