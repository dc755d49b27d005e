//! The escape hatch: a filter or source compiled as a native shared library (with
//! `lorahost_sdk::export_native!`), for work WebAssembly cannot do (a C library, a big language-id model).
//!
//! It runs UNSANDBOXED, with the full rights of the lorahost process, so it is loaded only when the
//! manifest marks it `trusted = true`, and `check` and the run log say so. Records cross as JSON; the ABI is
//! documented in `plugins/sdk/src/native.rs`.
use super::bindings::types::{Batch, Example, Verdict};
use super::engine::sha256_hex;
use super::error::{Failure, PluginError};
use super::filter::{check_verdicts, RecordFilter};
use super::kind::PluginKind;
use super::source::{check_batch, RecordSource};
use std::ffi::{c_char, c_void, CStr};
use std::path::Path;

const ABI_VERSION: u32 = 1;

#[repr(C)]
struct NativeBuf {
    ptr: *mut u8,
    len: usize,
    cap: usize,
}

impl NativeBuf {
    const EMPTY: NativeBuf = NativeBuf { ptr: std::ptr::null_mut(), len: 0, cap: 0 };
}

type OpenFn = unsafe extern "C" fn(*const u8, usize, *mut NativeBuf) -> *mut c_void;
type CallFn = unsafe extern "C" fn(*mut c_void, *const u8, usize, *mut NativeBuf) -> i32;
type CloseFn = unsafe extern "C" fn(*mut c_void);
type FreeFn = unsafe extern "C" fn(NativeBuf);

/// A loaded native plugin with one open state.
pub struct NativePlugin {
    name: String,
    digest: String,
    state: *mut c_void,
    call: CallFn,
    close: CloseFn,
    free: FreeFn,
    // Last, so the library is unloaded after the state is closed.
    _lib: libloading::Library,
}

// The plugin's state is only ever used from the thread that owns this value.
unsafe impl Send for NativePlugin {}

impl NativePlugin {
    /// Loads `path` as a native `kind` plugin and opens it with `config` (TOML text).
    /// `trusted` must be the manifest's explicit `trusted = true`: without it nothing is loaded.
    pub fn open(name: &str, path: &Path, kind: PluginKind, trusted: bool, config: &str) -> Result<Self, PluginError> {
        let bytes = std::fs::read(path).map_err(|e| {
            PluginError::new(name, "", "load", Failure::Invalid(format!("cannot read {}: {e}", path.display())))
        })?;
        let digest = sha256_hex(&bytes);
        let fail = |call: &str, f: Failure| PluginError::new(name, &digest, call, f);
        if !trusted {
            return Err(fail(
                "load",
                Failure::Link(format!(
                    "{} is a native library, which runs unsandboxed with all your rights; load it only if you trust it, by adding `trusted = true` to its entry in the manifest",
                    path.display()
                )),
            ));
        }
        // SAFETY: loading a native library runs its initialisers; the user has marked it trusted.
        let lib = unsafe { libloading::Library::new(path) }
            .map_err(|e| fail("load", Failure::Invalid(format!("cannot load native library: {e}"))))?;
        let sym = |s: &str| fail("load", Failure::Invalid(format!("missing symbol `{s}`: not a lorahost native plugin")));
        // SAFETY: symbol types follow the ABI in plugins/sdk/src/native.rs, checked by version first.
        unsafe {
            let abi: libloading::Symbol<unsafe extern "C" fn() -> u32> =
                lib.get(b"lorahost_native_abi").map_err(|_| sym("lorahost_native_abi"))?;
            let v = abi();
            if v != ABI_VERSION {
                return Err(fail(
                    "load",
                    Failure::WrongVersion { expected: format!("native ABI {ABI_VERSION}"), found: format!("native ABI {v}") },
                ));
            }
            let kind_fn: libloading::Symbol<unsafe extern "C" fn() -> *const c_char> =
                lib.get(b"lorahost_native_kind").map_err(|_| sym("lorahost_native_kind"))?;
            let found = CStr::from_ptr(kind_fn()).to_string_lossy().into_owned();
            if found != kind.name() {
                return Err(fail("load", Failure::WrongKind { expected: kind.to_string(), found }));
            }
            let open: OpenFn = *lib.get(b"lorahost_native_open").map_err(|_| sym("lorahost_native_open"))?;
            let call: CallFn = *lib.get(b"lorahost_native_call").map_err(|_| sym("lorahost_native_call"))?;
            let close: CloseFn = *lib.get(b"lorahost_native_close").map_err(|_| sym("lorahost_native_close"))?;
            let free: FreeFn = *lib.get(b"lorahost_native_free").map_err(|_| sym("lorahost_native_free"))?;
            let mut err = NativeBuf::EMPTY;
            let state = open(config.as_ptr(), config.len(), &mut err);
            if state.is_null() {
                let msg = take(free, err);
                return Err(fail("open", Failure::Refused(String::from_utf8_lossy(&msg).into_owned())));
            }
            Ok(NativePlugin { name: name.to_string(), digest, state, call, close, free, _lib: lib })
        }
    }

    pub fn digest(&self) -> &str {
        &self.digest
    }

    fn call_json(&mut self, call: &str, input: &[u8]) -> Result<Vec<u8>, PluginError> {
        let mut out = NativeBuf::EMPTY;
        // SAFETY: `state` came from this library's open and is closed only on drop.
        let code = unsafe { (self.call)(self.state, input.as_ptr(), input.len(), &mut out) };
        let bytes = unsafe { take(self.free, out) };
        if code != 0 {
            let msg = String::from_utf8_lossy(&bytes).into_owned();
            return Err(PluginError::new(&self.name, &self.digest, call, Failure::Refused(msg)));
        }
        Ok(bytes)
    }

    fn malformed(&self, call: &str, e: impl std::fmt::Display) -> PluginError {
        PluginError::new(&self.name, &self.digest, call, Failure::Malformed(e.to_string()))
    }
}

/// Copies a plugin-owned buffer and hands it back to the plugin to free.
unsafe fn take(free: FreeFn, buf: NativeBuf) -> Vec<u8> {
    let bytes = if buf.ptr.is_null() { Vec::new() } else { std::slice::from_raw_parts(buf.ptr, buf.len).to_vec() };
    free(buf);
    bytes
}

impl Drop for NativePlugin {
    fn drop(&mut self) {
        // SAFETY: `state` came from open and is closed exactly once.
        unsafe { (self.close)(self.state) }
    }
}

impl RecordFilter for NativePlugin {
    fn name(&self) -> &str {
        &self.name
    }

    fn filter_batch(&mut self, batch: &[Example]) -> Result<Vec<Verdict>, PluginError> {
        let input = serde_json::to_vec(batch).map_err(|e| self.malformed("filter-batch", e))?;
        let reply = self.call_json("filter-batch", &input)?;
        let verdicts: Vec<Verdict> = serde_json::from_slice(&reply).map_err(|e| self.malformed("filter-batch", e))?;
        check_verdicts(batch.len(), verdicts)
            .map_err(|f| PluginError::new(&self.name, &self.digest, "filter-batch", f))
    }
}

impl RecordSource for NativePlugin {
    fn name(&self) -> &str {
        &self.name
    }

    fn next_batch(&mut self, max: u32) -> Result<Option<Batch>, PluginError> {
        let reply = self.call_json("next-batch", max.to_string().as_bytes())?;
        let batch: Option<Batch> =
            serde_json::from_slice(&reply).map_err(|e| self.malformed("next-batch", e))?;
        check_batch(max, batch).map_err(|f| PluginError::new(&self.name, &self.digest, "next-batch", f))
    }
}
