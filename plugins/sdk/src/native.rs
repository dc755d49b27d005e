//! The native escape hatch: the same [`Filter`](crate::Filter) or [`Source`](crate::Source), compiled as a
//! shared library (`crate-type = ["cdylib"]`, built for the host, not for wasm) and loaded by lorahost with
//! `libloading`. It runs **unsandboxed**, so lorahost accepts it only where the manifest says
//! `trusted = true`. Use it for what WebAssembly cannot do: a C library, a large language-id model.
//!
//! ABI version 1, every symbol `extern "C"`; records cross as JSON of the shared types:
//!
//! | symbol | meaning |
//! |---|---|
//! | `lorahost_native_abi() -> u32` | always 1 for this layout |
//! | `lorahost_native_kind() -> *const c_char` | `"filter"` or `"source"`, NUL-terminated, static |
//! | `lorahost_native_open(config, len, out) -> *mut c_void` | config is TOML text; null on error, with the message in `out` |
//! | `lorahost_native_call(state, input, len, out) -> i32` | filter: JSON `[Example]` in, `[Verdict]` out; source: JSON `u32` max in, `Option<Batch>` out. 0 = ok, else `out` holds an error message |
//! | `lorahost_native_close(state)` | frees the state |
//! | `lorahost_native_free(buf)` | frees a buffer returned in `out` |
//!
//! Panics are caught at the boundary and returned as errors.
use crate::{parse_config, Example, Filter, Source};
use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};

pub const ABI_VERSION: u32 = 1;

/// A byte buffer owned by the plugin; the host hands it back to `lorahost_native_free`.
#[repr(C)]
pub struct NativeBuf {
    pub ptr: *mut u8,
    pub len: usize,
    pub cap: usize,
}

impl NativeBuf {
    fn from_vec(v: Vec<u8>) -> Self {
        let mut v = std::mem::ManuallyDrop::new(v);
        NativeBuf { ptr: v.as_mut_ptr(), len: v.len(), cap: v.capacity() }
    }
}

/// # Safety
/// `buf` must come from this library and be freed once.
pub unsafe fn free(buf: NativeBuf) {
    if !buf.ptr.is_null() {
        drop(Vec::from_raw_parts(buf.ptr, buf.len, buf.cap));
    }
}

/// What one native plugin kind does with a call's input.
pub trait NativeCall: Sized {
    fn open(config: &str) -> Result<Self, String>;
    fn call(&mut self, input: &[u8]) -> Result<Vec<u8>, String>;
}

/// Wraps a filter for the native ABI.
pub struct NativeFilter<T>(pub T);
/// Wraps a source for the native ABI.
pub struct NativeSource<T>(pub T);

impl<T: Filter> NativeCall for NativeFilter<T> {
    fn open(config: &str) -> Result<Self, String> {
        Ok(NativeFilter(T::new(parse_config(config)?)?))
    }
    fn call(&mut self, input: &[u8]) -> Result<Vec<u8>, String> {
        let batch: Vec<Example> = serde_json::from_slice(input).map_err(|e| format!("bad batch: {e}"))?;
        let verdicts = self.0.filter_batch(&batch)?;
        serde_json::to_vec(&verdicts).map_err(|e| e.to_string())
    }
}

impl<T: Source> NativeCall for NativeSource<T> {
    fn open(config: &str) -> Result<Self, String> {
        Ok(NativeSource(T::open(parse_config(config)?)?))
    }
    fn call(&mut self, input: &[u8]) -> Result<Vec<u8>, String> {
        let max: u32 = serde_json::from_slice(input).map_err(|e| format!("bad request: {e}"))?;
        let batch = self.0.next_batch(max as usize)?;
        serde_json::to_vec(&batch).map_err(|e| e.to_string())
    }
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    match p.downcast::<String>() {
        Ok(s) => format!("panicked: {s}"),
        Err(p) => match p.downcast::<&str>() {
            Ok(s) => format!("panicked: {s}"),
            Err(_) => "panicked".to_string(),
        },
    }
}

/// # Safety
/// Called by the generated `lorahost_native_open` with the host's pointers.
pub unsafe fn open<T: NativeCall>(config: *const u8, len: usize, out: *mut NativeBuf) -> *mut c_void {
    let config = std::slice::from_raw_parts(config, len);
    let result = catch_unwind(|| {
        let config = std::str::from_utf8(config).map_err(|e| e.to_string())?;
        T::open(config)
    })
    .unwrap_or_else(|p| Err(panic_message(p)));
    match result {
        Ok(state) => Box::into_raw(Box::new(state)) as *mut c_void,
        Err(message) => {
            *out = NativeBuf::from_vec(message.into_bytes());
            std::ptr::null_mut()
        }
    }
}

/// # Safety
/// `state` must come from [`open`] with the same `T`.
pub unsafe fn call<T: NativeCall>(state: *mut c_void, input: *const u8, len: usize, out: *mut NativeBuf) -> i32 {
    let state = &mut *(state as *mut T);
    let input = std::slice::from_raw_parts(input, len);
    let result = catch_unwind(AssertUnwindSafe(|| state.call(input))).unwrap_or_else(|p| Err(panic_message(p)));
    let (code, bytes) = match result {
        Ok(bytes) => (0, bytes),
        Err(message) => (1, message.into_bytes()),
    };
    *out = NativeBuf::from_vec(bytes);
    code
}

/// # Safety
/// `state` must come from [`open`] with the same `T`, and is freed.
pub unsafe fn close<T: NativeCall>(state: *mut c_void) {
    if !state.is_null() {
        drop(Box::from_raw(state as *mut T));
    }
}

/// Exports a [`Filter`](crate::Filter) or [`Source`](crate::Source) with the native ABI:
/// `lorahost_sdk::export_native!(filter MyFilter);` or `lorahost_sdk::export_native!(source MySource);`
#[macro_export]
macro_rules! export_native {
    (filter $plugin:ty) => { $crate::export_native!(@abi "filter\0", $crate::native::NativeFilter<$plugin>); };
    (source $plugin:ty) => { $crate::export_native!(@abi "source\0", $crate::native::NativeSource<$plugin>); };
    (@abi $kind:literal, $wrapped:ty) => {
        #[no_mangle]
        pub extern "C" fn lorahost_native_abi() -> u32 { $crate::native::ABI_VERSION }
        #[no_mangle]
        pub extern "C" fn lorahost_native_kind() -> *const ::std::ffi::c_char { $kind.as_ptr().cast() }
        #[no_mangle]
        pub unsafe extern "C" fn lorahost_native_open(
            config: *const u8, len: usize, out: *mut $crate::native::NativeBuf,
        ) -> *mut ::std::ffi::c_void {
            $crate::native::open::<$wrapped>(config, len, out)
        }
        #[no_mangle]
        pub unsafe extern "C" fn lorahost_native_call(
            state: *mut ::std::ffi::c_void, input: *const u8, len: usize, out: *mut $crate::native::NativeBuf,
        ) -> i32 {
            $crate::native::call::<$wrapped>(state, input, len, out)
        }
        #[no_mangle]
        pub unsafe extern "C" fn lorahost_native_close(state: *mut ::std::ffi::c_void) {
            $crate::native::close::<$wrapped>(state)
        }
        #[no_mangle]
        pub unsafe extern "C" fn lorahost_native_free(buf: $crate::native::NativeBuf) {
            $crate::native::free(buf)
        }
    };
}
