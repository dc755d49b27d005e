//! One running plugin: its store, its bindings, and the guard around every call into it.
use super::engine::{LoadedPlugin, PluginEngine};
use super::error::{Failure, PluginError};
use super::kind::PluginKind;
use super::sandbox::{self, Grants, HostState, Limits};
use wasmtime::component::InstancePre;
use wasmtime::Store;

pub(crate) struct Instance<B> {
    pub(crate) name: String,
    pub(crate) digest: String,
    pub(crate) store: Store<HostState>,
    pub(crate) bindings: B,
    limits: Limits,
    poisoned: bool,
}

impl<B> Instance<B> {
    /// Instantiates `plugin` as a `kind` plugin in a fresh sandbox; `bind` turns the pre-linked component
    /// into the world's typed bindings.
    pub(crate) fn new(
        engine: &PluginEngine,
        plugin: &LoadedPlugin,
        kind: PluginKind,
        grants: &Grants,
        bind: impl FnOnce(InstancePre<HostState>, &mut Store<HostState>) -> wasmtime::Result<B>,
    ) -> Result<Self, PluginError> {
        let fail = |f: Failure| PluginError::new(&plugin.name, &plugin.digest, "instantiate", f);
        plugin.info.expect(kind).map_err(fail)?;
        let mut store = sandbox::new_store(engine.engine(), grants).map_err(|e| fail(Failure::Invalid(format!("{e:#}"))))?;
        let pre = engine.linker().instantiate_pre(&plugin.component).map_err(|e| fail(link_failure(&e)))?;
        sandbox::arm(&mut store, &grants.limits);
        let bindings = match bind(pre, &mut store) {
            Ok(b) => b,
            Err(e) => {
                let failure = sandbox::classify(&mut store, &grants.limits, &e);
                return Err(fail(failure));
            }
        };
        Ok(Instance {
            name: plugin.name.clone(),
            digest: plugin.digest.clone(),
            store,
            bindings,
            limits: grants.limits.clone(),
            poisoned: false,
        })
    }

    /// Runs one call into the guest under the limits. A trap poisons the instance: it is never re-entered.
    pub(crate) fn call<R>(
        &mut self,
        call: &str,
        f: impl FnOnce(&B, &mut Store<HostState>) -> wasmtime::Result<R>,
    ) -> Result<R, PluginError> {
        if self.poisoned {
            return Err(self.error(call, Failure::Poisoned));
        }
        sandbox::arm(&mut self.store, &self.limits);
        match f(&self.bindings, &mut self.store) {
            Ok(r) => Ok(r),
            Err(e) => {
                self.poisoned = true;
                let failure = sandbox::classify(&mut self.store, &self.limits, &e);
                Err(self.error(call, failure))
            }
        }
    }

    pub(crate) fn error(&self, call: &str, failure: Failure) -> PluginError {
        PluginError::new(&self.name, &self.digest, call, failure)
    }

    /// Like [`call`](Self::call) for calls that return `result<T, string>`: the plugin's own error becomes
    /// [`Failure::Refused`].
    pub(crate) fn call_fallible<R>(
        &mut self,
        call: &str,
        f: impl FnOnce(&B, &mut Store<HostState>) -> wasmtime::Result<Result<R, String>>,
    ) -> Result<R, PluginError> {
        self.call(call, f)?.map_err(|m| self.error(call, Failure::Refused(m)))
    }
}

/// Explains why a component cannot be linked, in terms of what the sandbox grants.
fn link_failure(err: &wasmtime::Error) -> Failure {
    let text = format!("{err:#}");
    if text.contains("wasi:sockets") {
        Failure::Link(format!("it imports the network (wasi:sockets), which plugins are never granted ({text})"))
    } else if text.contains("wasi:http") {
        Failure::Link(format!("it imports HTTP (wasi:http), which plugins are never granted ({text})"))
    } else {
        Failure::Link(format!("it imports something the plugin sandbox does not provide: {text}"))
    }
}
