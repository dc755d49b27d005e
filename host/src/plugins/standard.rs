//! The standard plugins shipped inside the binary, so manifests can name them without a path.
use super::kind::PluginKind;

pub struct StandardPlugin {
    pub name: &'static str,
    pub kind: PluginKind,
    pub wasm: &'static [u8],
}

include!(concat!(env!("OUT_DIR"), "/standard_plugins.rs"));

/// The standard plugin of this kind and name, if there is one.
pub fn find(kind: PluginKind, name: &str) -> Option<&'static StandardPlugin> {
    STANDARD.iter().find(|p| p.kind == kind && p.name == name)
}

/// Names of the standard plugins of a kind, for error messages ("did you mean ...").
pub fn names(kind: PluginKind) -> Vec<&'static str> {
    STANDARD.iter().filter(|p| p.kind == kind).map(|p| p.name).collect()
}
