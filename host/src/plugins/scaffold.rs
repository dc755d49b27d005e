//! `lorahost plugin new <kind> <name>`: a plugin crate that builds as it is.
use super::kind::PluginKind;
use anyhow::{bail, Context};
use std::path::{Path, PathBuf};

/// The SDK in the source tree this binary was built from, if it is still there.
pub fn default_sdk_path() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/sdk");
    p.join("Cargo.toml").exists().then(|| p.canonicalize().ok()).flatten()
}

/// Writes a new plugin crate at `dir/<name>` and returns its folder.
pub fn scaffold(kind: PluginKind, name: &str, dir: &Path, sdk: &Path) -> anyhow::Result<PathBuf> {
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-') {
        bail!("plugin name `{name}`: use lowercase letters, digits and '-', e.g. `my-filter`");
    }
    let root = dir.join(name);
    if root.exists() {
        bail!("{} already exists: choose another name or remove it", root.display());
    }
    let sdk = sdk.canonicalize().with_context(|| format!("SDK folder {}", sdk.display()))?;
    if !sdk.join("Cargo.toml").exists() {
        bail!("{} is not the lorahost-sdk crate (no Cargo.toml): pass --sdk <path to plugins/sdk>", sdk.display());
    }
    let crate_name = name.to_string();
    let cargo_toml = format!(
        r#"[package]
name = "{crate_name}"
version = "0.1.0"
edition = "2021"

[lib]
crate-type = ["cdylib"]

[dependencies]
lorahost-sdk = {{ path = {sdk:?} }}
serde = {{ version = "1", features = ["derive"] }}

[profile.release]
opt-level = 3
lto = true
codegen-units = 1
panic = "abort"

# Its own workspace, so the crate builds wherever it is put.
[workspace]
"#,
        sdk = sdk.display().to_string()
    );
    let wasm = format!("target/wasm32-wasip2/release/{}.wasm", crate_name.replace('-', "_"));
    let readme = format!(
        "# {name}: a lorahost {kind} plugin\n\nBuild: `cargo build --release` (the target is set in `.cargo/config.toml`).\n\
         The plugin is `{wasm}`.\nUse it in a manifest:\n\n```toml\n[plugins]\n{name} = {{ path = \"{wasm}\", sha256 = \"<lorahost plugin inspect prints it>\" }}\n```\n"
    );
    let files: [(&str, String); 5] = [
        ("Cargo.toml", cargo_toml),
        (".cargo/config.toml", "[build]\ntarget = \"wasm32-wasip2\"\n".into()),
        ("rust-toolchain.toml", "[toolchain]\nchannel = \"1.95.0\"\ntargets = [\"wasm32-wasip2\"]\n".into()),
        ("src/lib.rs", lib_rs(kind)),
        ("README.md", readme),
    ];
    for (rel, text) in files {
        let path = root.join(rel);
        std::fs::create_dir_all(path.parent().unwrap())?;
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(root)
}

fn lib_rs(kind: PluginKind) -> String {
    let body = match kind {
        PluginKind::Filter => {
            r#"//! A filter: keep, drop (with a reason) or rewrite each record.
use lorahost_sdk::{Example, Filter, Verdict};

/// Options from this plugin's table in the run manifest.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// Drop records that contain this text.
    #[serde(default)]
    banned: Option<String>,
}

struct MyFilter(Config);

impl Filter for MyFilter {
    type Config = Config;
    fn new(config: Config) -> Result<Self, String> {
        Ok(MyFilter(config))
    }
    fn filter(&mut self, example: &Example) -> Verdict {
        match &self.0.banned {
            Some(word) if example.contents().any(|c| c.contains(word.as_str())) => {
                Verdict::Drop(format!("contains {word:?}"))
            }
            _ => Verdict::Keep,
        }
    }
}

lorahost_sdk::export_filter!(MyFilter);
"#
        }
        PluginKind::Template => {
            r#"//! A template: a conversation becomes segments; trained segments carry the loss.
use lorahost_sdk::{Example, NoConfig, Segment, Template};

struct MyTemplate;

impl Template for MyTemplate {
    type Config = NoConfig;
    fn new(_: NoConfig) -> Result<Self, String> {
        Ok(MyTemplate)
    }
    fn eos(&self) -> String {
        "<|endoftext|>".into()
    }
    fn render(&self, example: &Example) -> Result<Vec<Segment>, String> {
        let mut out = Vec::new();
        for turn in &example.turns {
            match turn.role.as_str() {
                "assistant" => {
                    out.push(Segment::trained(turn.content.clone()));
                    out.push(Segment::special(self.eos(), true));
                }
                role => out.push(Segment::prompt(format!("{role}: {}\n", turn.content))),
            }
        }
        Ok(out)
    }
}

lorahost_sdk::export_template!(MyTemplate);
"#
        }
        PluginKind::Scheduler => {
            r#"//! A scheduler: the learning rate at each optimizer step.
use lorahost_sdk::Scheduler;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// Multiply the rate by this factor every `every` steps.
    factor: f64,
    every: u64,
}

struct StepDecay(Config);

impl Scheduler for StepDecay {
    type Config = Config;
    fn new(config: Config) -> Result<Self, String> {
        if config.every == 0 {
            return Err("`every` must be at least 1".into());
        }
        Ok(StepDecay(config))
    }
    fn lr(&self, step: u64, _total: u64, base: f64) -> f64 {
        base * self.0.factor.powi((step / self.0.every) as i32)
    }
}

lorahost_sdk::export_scheduler!(StepDecay);
"#
        }
        PluginKind::Scorer => {
            r#"//! A scorer: how good one generation is, given the record's references.
use lorahost_sdk::{Example, Score, Scorer};

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// Count a generation as right when it contains a reference anywhere (else: equals one, trimmed).
    #[serde(default)]
    contains: bool,
}

struct Match(Config);

impl Scorer for Match {
    type Config = Config;
    fn new(config: Config) -> Result<Self, String> {
        Ok(Match(config))
    }
    fn score(&mut self, generation: &str, _example: &Example, references: &[String]) -> Result<Score, String> {
        let g = generation.trim();
        let hit = references.iter().any(|r| if self.0.contains { g.contains(r.trim()) } else { g == r.trim() });
        Ok(Score::new(g, [("match", f64::from(u8::from(hit)))]))
    }
}

lorahost_sdk::export_scorer!(Match);
"#
        }
        PluginKind::Source => {
            r#"//! A source: reads records, batch by batch, from a file the manifest grants.
use lorahost_sdk::{Batch, Example, Source};
use std::io::BufRead;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// One prompt per line; the manifest resolves it to an absolute path and grants its folder.
    path: String,
    #[serde(default)]
    dataset: String,
}

struct Lines {
    lines: std::io::Lines<std::io::BufReader<std::fs::File>>,
    config: Config,
    line: usize,
}

impl Source for Lines {
    type Config = Config;
    fn open(config: Config) -> Result<Self, String> {
        let file = std::fs::File::open(&config.path).map_err(|e| format!("{}: {e}", config.path))?;
        Ok(Lines { lines: std::io::BufReader::new(file).lines(), config, line: 0 })
    }
    fn next_batch(&mut self, max: usize) -> Result<Option<Batch>, String> {
        let mut batch = Batch { records: Vec::new(), malformed: Vec::new() };
        while batch.records.len() < max {
            let Some(line) = self.lines.next() else { break };
            self.line += 1;
            let at = format!("{}:{}", self.config.path, self.line);
            match line {
                Ok(text) => batch.records.push(Example::instruction(at, &self.config.dataset, &text, "", "")),
                Err(e) => batch.malformed.push(format!("{at}: {e}")),
            }
        }
        let empty = batch.records.is_empty() && batch.malformed.is_empty();
        Ok(if empty { None } else { Some(batch) })
    }
}

lorahost_sdk::export_source!(Lines);
"#
        }
    };
    body.to_string()
}
