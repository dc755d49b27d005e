//! Every way a plugin can fail, as one error that names the plugin, its digest and the call.
//!
//! A trap, a timeout, a memory-cap hit or a malformed reply never panics the host: it becomes a
//! [`PluginError`], and the instance that failed is not called again.
use std::fmt;
use std::time::Duration;

/// Why a plugin call failed.
#[derive(Debug, Clone, PartialEq)]
pub enum Failure {
    /// The plugin ran past its wall-clock limit for one call.
    Timeout(Duration),
    /// The plugin used up its fuel (instruction budget) for one call.
    OutOfFuel(u64),
    /// The plugin tried to grow its memory past the cap (bytes).
    MemoryCap(u64),
    /// One reply was larger than what a call may copy into the host (bytes).
    ReplyTooBig(u64),
    /// The plugin panicked (message from its stderr).
    Panic(String),
    /// Any other trap: an invalid memory access, `unreachable`, a stack overflow.
    Trap(String),
    /// The plugin itself returned an error, e.g. rejecting its configuration.
    Refused(String),
    /// The reply broke the contract, e.g. 3 verdicts for 4 records.
    Malformed(String),
    /// The component needs something the sandbox never grants (a socket, say).
    Link(String),
    /// The component is another kind of plugin.
    WrongKind { expected: String, found: String },
    /// The component was built against another version of the WIT contract.
    WrongVersion { expected: String, found: String },
    /// The file is not a WebAssembly component, or cannot be read.
    Invalid(String),
    /// A previous call trapped; a trapped instance is never re-entered.
    Poisoned,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Timeout(d) => write!(
                f,
                "ran past its time limit of {:.1}s for one call (raise `timeout_ms` in the plugin's `limits` if it is just slow)",
                d.as_secs_f64()
            ),
            Failure::OutOfFuel(n) => {
                write!(f, "used up its fuel of {n} for one call (raise `fuel` in the plugin's `limits`)")
            }
            Failure::MemoryCap(n) => write!(
                f,
                "tried to use more than its memory cap of {} MiB (raise `memory_mb` in the plugin's `limits`)",
                n / (1 << 20)
            ),
            Failure::ReplyTooBig(n) => write!(
                f,
                "replied with more than the {} MiB one call may copy into the host (raise `reply_mb` in the plugin's `limits`)",
                n / (1 << 20)
            ),
            Failure::Panic(m) => write!(f, "panicked: {m}"),
            Failure::Trap(m) => write!(f, "crashed: {m}"),
            Failure::Refused(m) => write!(f, "returned an error: {m}"),
            Failure::Malformed(m) => write!(f, "gave a malformed reply: {m}"),
            Failure::Link(m) => write!(f, "cannot run in the sandbox: {m}"),
            Failure::WrongKind { expected, found } => {
                write!(f, "is a {found} plugin, but is used here as a {expected}")
            }
            Failure::WrongVersion { expected, found } => write!(
                f,
                "was built for the plugin contract {found}, but this lorahost speaks {expected}: rebuild it against the matching lorahost-sdk"
            ),
            Failure::Invalid(m) => write!(f, "is not a valid plugin component: {m}"),
            Failure::Poisoned => write!(f, "is not called again after an earlier failure"),
        }
    }
}

/// A plugin failure, with everything needed to find the culprit.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginError {
    /// The plugin's name in the manifest (or its file name).
    pub plugin: String,
    /// sha256 of the component, hex.
    pub digest: String,
    /// The call that failed: `load`, `instantiate`, `init`, `filter-batch`...
    pub call: String,
    pub failure: Failure,
}

impl PluginError {
    pub fn new(plugin: &str, digest: &str, call: &str, failure: Failure) -> Self {
        PluginError { plugin: plugin.to_string(), digest: digest.to_string(), call: call.to_string(), failure }
    }
}

impl fmt::Display for PluginError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let short = &self.digest[..self.digest.len().min(12)];
        write!(f, "plugin `{}` (sha256:{short}) {} in `{}`", self.plugin, self.failure, self.call)
    }
}

impl std::error::Error for PluginError {}
