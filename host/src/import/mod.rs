//! `lorahost import gguf`: a llama.cpp GGUF file to a Hugging Face model folder.
//!
//! The folder holds `config.json` (the family's own HF format), `generation_config.json`, the weights as
//! safetensors (bf16 or f32; one `model.safetensors`, or ~2 GB shards with `model.safetensors.index.json`),
//! `tokenizer.json` and `tokenizer_config.json` (from the embedded vocabulary and chat template). Quantized
//! weights are dequantized, and llama.cpp's rotary row order of Llama's q/k projections is undone, so the
//! folder loads like the model's original HF release (up to the quantization error).
//!
//! The folder is written under a temporary name beside `out` and renamed when complete; memory holds one
//! chunk of one tensor's conversion at a time (the GGUF file is memory-mapped).
pub mod config;
pub mod dequant;
pub mod gguf;
pub mod names;
pub mod safetensors_out;
pub mod vocab;

use crate::fsutil::write_atomic;
use crate::model::weights::{CONFIG_FILE, INDEX_FILE};
use anyhow::{bail, Context, Result};
use gguf::{GgufFile, TensorInfo};
use names::Rows;
use rayon::prelude::*;
use safetensors_out::{OutDtype, Planned, ShardWriter};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// HF's default shard size.
pub const SHARD_BYTES: u64 = 2_000_000_000;
/// Output values converted per chunk (bounds the conversion buffers to a few MB whatever the tensor size).
const CHUNK_VALUES: usize = 1 << 20;

#[derive(Clone, Debug)]
pub struct Options {
    pub dtype: OutDtype,
    /// Largest shard in bytes; one `model.safetensors` when everything fits.
    pub shard_bytes: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options { dtype: OutDtype::Bf16, shard_bytes: SHARD_BYTES }
    }
}

/// What an import did.
#[derive(Debug, serde::Serialize)]
pub struct Report {
    pub architecture: String,
    pub gguf_version: u32,
    pub tensors: usize,
    pub parameters: u64,
    /// ggml type name -> number of tensors stored in it.
    pub types: BTreeMap<String, usize>,
    pub tied_embeddings: bool,
    /// The files written, in the output folder.
    pub files: Vec<String>,
    /// Things the user should know (e.g. repeated token strings).
    pub notes: Vec<String>,
}

/// One tensor of the plan: where its data is and how to read its rows.
struct Job<'a> {
    info: &'a TensorInfo,
    rows: Rows,
}

/// Converts `file` into the HF folder `out`, which must not exist or be empty.
pub fn import_gguf(file: &Path, out: &Path, opts: &Options) -> Result<Report> {
    let g = GgufFile::open(file)?;
    let family = config::family(&g)?;
    let shape = config::shape(&g, family)?;
    let vocab = vocab::Vocab::read(&g)?;

    let mut planned = Vec::new();
    let mut jobs = Vec::new();
    let mut types = BTreeMap::new();
    let mut rope_freqs = None;
    for t in &g.tensors {
        *types.entry(t.ty.name().to_string()).or_insert(0) += 1;
        if names::DERIVED.contains(&t.name.as_str()) {
            if t.name == "rope_freqs.weight" {
                rope_freqs = Some(read_f32(&g, t)?);
            }
            continue;
        }
        let name = names::hf_name(&t.name).with_context(|| g.path.display().to_string())?;
        let rows = names::rows(family.model_type(), &t.name, shape.heads, shape.kv_heads);
        let (cols, n_rows) = t.rows();
        if let Rows::Unpermute { heads } = rows {
            // A 1-D bias is one value per row.
            let total = if t.dims.len() == 1 { cols } else { n_rows };
            names::check_permutable(&t.name, total as usize, heads).with_context(|| g.path.display().to_string())?;
        }
        planned.push(Planned { name, shape: t.dims.iter().rev().map(|&d| d as usize).collect() });
        jobs.push(Job { info: t, rows });
    }
    let embed = g.tensors.iter().find(|t| t.name == "token_embd.weight").with_context(|| format!("{}: tensor token_embd.weight is missing", g.path.display()))?;
    let vocab_size = embed.dims.get(1).copied().unwrap_or(0) as usize;
    let tied = !g.tensors.iter().any(|t| t.name == "output.weight");
    let extra = config::Extra { vocab_size, tied, torch_dtype: opts.dtype.torch_name(), rope_freqs: rope_freqs.as_deref() };
    let config = config::hf_config(&g, family, &shape, &extra)?;
    let generation = config::generation_config(&g)?;
    let tokenizer = vocab.tokenizer_json()?;
    let tokenizer_config = vocab.tokenizer_config(&g)?;
    let mut notes = Vec::new();
    if !vocab.duplicates.is_empty() {
        notes.push(format!(
            "{} token strings appear more than once in the vocabulary; tokenizer.json keeps the first id of each (e.g. {:?})",
            vocab.duplicates.len(),
            &vocab.duplicates[..vocab.duplicates.len().min(3)]
        ));
    }

    let tmp = TempDir::beside(out)?;
    let json_file = |name: &str, v: &serde_json::Value| -> Result<String> {
        write_atomic(&tmp.path.join(name), serde_json::to_string_pretty(v)?.as_bytes())?;
        Ok(name.to_string())
    };
    let mut files = vec![
        json_file(CONFIG_FILE, &config)?,
        json_file("generation_config.json", &generation)?,
        json_file("tokenizer_config.json", &tokenizer_config)?,
    ];
    write_atomic(&tmp.path.join(crate::tokenizer::HF_FILE), tokenizer.as_bytes())?;
    files.push(crate::tokenizer::HF_FILE.to_string());
    drop(tokenizer);

    let shards = safetensors_out::plan_shards(&planned, opts.dtype, opts.shard_bytes);
    for (i, range) in shards.iter().enumerate() {
        let name = safetensors_out::shard_name(i, shards.len());
        let mut w = ShardWriter::create(&tmp.path.join(&name), &planned[range.clone()], opts.dtype)?;
        for job in &jobs[range.clone()] {
            w.tensor(|sink| convert(&g, job, opts.dtype, sink))
                .with_context(|| format!("{}: tensor {} ({} {:?})", g.path.display(), job.info.name, job.info.ty.name(), job.info.dims))?;
        }
        w.finish().with_context(|| format!("cannot write {name}"))?;
        files.push(name);
    }
    if shards.len() > 1 {
        let total: u64 = planned.iter().map(|t| t.bytes(opts.dtype)).sum();
        crate::model::weights::write_index(&tmp.path, safetensors_out::weight_map(&planned, &shards), total as usize)?;
        files.push(INDEX_FILE.to_string());
    }
    tmp.commit(out)?;
    Ok(Report {
        architecture: family.model_type().to_string(),
        gguf_version: g.version,
        tensors: planned.len(),
        parameters: jobs.iter().map(|j| j.info.elements()).sum(),
        types,
        tied_embeddings: tied,
        files,
        notes,
    })
}

/// A small F32 tensor as values (rope_freqs).
fn read_f32(g: &GgufFile, t: &TensorInfo) -> Result<Vec<f32>> {
    let mut v = vec![0.0; t.elements() as usize];
    dequant::dequantize(t.ty, g.data(t), &mut v).with_context(|| format!("tensor {}", t.name))?;
    Ok(v)
}

/// Writes one tensor in HF's row order, a chunk of rows at a time (rows dequantized in parallel).
fn convert(g: &GgufFile, job: &Job, dtype: OutDtype, sink: &mut dyn Write) -> Result<()> {
    let t = job.info;
    let data = g.data(t);
    let (cols, rows) = t.rows();
    let (cols, rows) = (cols as usize, rows as usize);
    // A permuted 1-D bias reorders single values: treat each as a row of one (F32/F16 only have 1-value blocks).
    let (cols, rows) = match job.rows {
        Rows::Unpermute { .. } if t.dims.len() == 1 => {
            if t.ty.block_len() != 1 {
                bail!("a quantized 1-D tensor cannot have its rotary order undone");
            }
            (1, cols)
        }
        _ => (cols, rows),
    };
    if cols == 0 || rows == 0 {
        return Ok(());
    }
    let row_bytes = t.ty.byte_len(cols as u64).context("a row is not a whole number of blocks")? as usize;
    let source = |r: usize| match job.rows {
        Rows::AsStored => r,
        Rows::Unpermute { heads } => names::source_row(r, rows, heads),
    };
    let chunk_rows = (CHUNK_VALUES / cols).max(1);
    let mut values = vec![0f32; chunk_rows.min(rows) * cols];
    let mut bytes = Vec::with_capacity(values.len() * dtype.size() as usize);
    for first in (0..rows).step_by(chunk_rows) {
        let n = chunk_rows.min(rows - first);
        values[..n * cols].par_chunks_mut(cols).enumerate().try_for_each(|(k, y)| {
            let s = source(first + k);
            dequant::dequantize(t.ty, &data[s * row_bytes..(s + 1) * row_bytes], y)
        })?;
        bytes.clear();
        dtype.extend(&values[..n * cols], &mut bytes);
        sink.write_all(&bytes)?;
    }
    Ok(())
}

/// The output folder under construction: `.<name>.import-<pid>` beside it, removed unless committed.
struct TempDir {
    path: PathBuf,
    committed: bool,
}

impl TempDir {
    fn beside(out: &Path) -> Result<TempDir> {
        if out.exists() {
            let empty = std::fs::read_dir(out).map(|mut d| d.next().is_none()).unwrap_or(false);
            if !empty {
                bail!("{} already exists and is not an empty folder: choose a new output folder (nothing was written)", out.display());
            }
        }
        let name = out.file_name().with_context(|| format!("{}: the output folder needs a name", out.display()))?;
        let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
        let path = parent.join(format!(".{}.import-{}", name.to_string_lossy(), std::process::id()));
        if path.exists() {
            std::fs::remove_dir_all(&path)?;
        }
        std::fs::create_dir(&path).with_context(|| format!("cannot create {}", path.display()))?;
        Ok(TempDir { path, committed: false })
    }

    fn commit(mut self, out: &Path) -> Result<()> {
        if out.exists() {
            if let Err(e) = std::fs::remove_dir(out) {
                self.committed = true; // keep the finished import where the message says it is
                bail!("{} is no longer empty ({e}): the import is left in {}", out.display(), self.path.display());
            }
        }
        std::fs::rename(&self.path, out).with_context(|| format!("cannot rename {} to {}", self.path.display(), out.display()))?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}
