//! `lorahost plugin inspect`: what a plugin file is, without running it.
use super::engine::{sha256_hex, PluginEngine};
use std::path::Path;

#[derive(Debug, serde::Serialize)]
pub struct Inspection {
    pub file: String,
    pub sha256: String,
    pub bytes: usize,
    /// "source", "filter", "template", "scheduler", or null when it exports no lorahost interface.
    pub kind: Option<String>,
    /// The lorahost contract it was built for, e.g. "lorahost:plugin@0.1.0".
    pub wit: Option<String>,
    /// True for a native shared library: it would run unsandboxed and needs `trusted = true`.
    pub native: bool,
    pub imports: Vec<String>,
    pub exports: Vec<String>,
}

pub fn inspect(engine: &PluginEngine, path: &Path) -> anyhow::Result<Inspection> {
    let bytes = std::fs::read(path).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    let sha256 = sha256_hex(&bytes);
    let file = path.display().to_string();
    if bytes.starts_with(b"\x7fELF") || bytes.starts_with(b"MZ") || bytes.starts_with(&[0xcf, 0xfa, 0xed, 0xfe]) {
        return Ok(Inspection {
            file,
            sha256,
            bytes: bytes.len(),
            kind: None,
            wit: None,
            native: true,
            imports: vec![],
            exports: vec![],
        });
    }
    let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let loaded = engine.load(&name, &bytes)?;
    let info = loaded.info;
    Ok(Inspection {
        file,
        sha256,
        bytes: bytes.len(),
        kind: info.kind.map(|k| k.to_string()),
        wit: info.wit_version.map(|v| format!("{}@{v}", super::bindings::WIT_PACKAGE)),
        native: false,
        imports: info.imports,
        exports: info.exports,
    })
}

impl std::fmt::Display for Inspection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "file     {}", self.file)?;
        writeln!(f, "sha256   {}", self.sha256)?;
        writeln!(f, "size     {} bytes", self.bytes)?;
        if self.native {
            return writeln!(f, "kind     native library: runs UNSANDBOXED, loads only with `trusted = true`");
        }
        writeln!(f, "kind     {}", self.kind.as_deref().unwrap_or("none (exports no lorahost interface)"))?;
        writeln!(f, "wit      {}", self.wit.as_deref().unwrap_or("-"))?;
        writeln!(f, "exports")?;
        for e in &self.exports {
            writeln!(f, "  {e}")?;
        }
        writeln!(f, "imports")?;
        for i in &self.imports {
            writeln!(f, "  {i}")?;
        }
        Ok(())
    }
}
