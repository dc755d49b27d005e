//! Writing safetensors shards one tensor at a time.
//!
//! Every tensor's shape and dtype are known before any data is converted, so each shard's header is written
//! first and the tensors are then streamed into it in order: memory holds one tensor's conversion buffer, never
//! a whole shard. Layout: u64 little-endian header length, the JSON header (padded with spaces to 8 bytes),
//! then the tensors back to back.
use anyhow::{bail, Context, Result};
use serde_json::{json, Map, Value};
use std::io::Write;
use std::ops::Range;
use crate::model::weights::SINGLE_FILE;
use std::path::Path;

/// The element type written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutDtype {
    Bf16,
    F32,
}

impl OutDtype {
    pub fn parse(s: &str) -> Result<OutDtype> {
        match s {
            "bf16" => Ok(OutDtype::Bf16),
            "f32" => Ok(OutDtype::F32),
            other => bail!("dtype {other:?}: bf16 or f32"),
        }
    }

    pub fn size(self) -> u64 {
        match self {
            OutDtype::Bf16 => 2,
            OutDtype::F32 => 4,
        }
    }

    fn safetensors_name(self) -> &'static str {
        match self {
            OutDtype::Bf16 => "BF16",
            OutDtype::F32 => "F32",
        }
    }

    /// transformers' `torch_dtype` name.
    pub fn torch_name(self) -> &'static str {
        match self {
            OutDtype::Bf16 => "bfloat16",
            OutDtype::F32 => "float32",
        }
    }

    /// Appends `values` in this type, little-endian (bf16 rounded to nearest even).
    pub fn extend(self, values: &[f32], out: &mut Vec<u8>) {
        match self {
            OutDtype::Bf16 => values.iter().for_each(|v| out.extend_from_slice(&half::bf16::from_f32(*v).to_le_bytes())),
            OutDtype::F32 => values.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        }
    }
}

/// One tensor to be written.
#[derive(Clone, Debug)]
pub struct Planned {
    pub name: String,
    pub shape: Vec<usize>,
}

impl Planned {
    pub fn bytes(&self, dtype: OutDtype) -> u64 {
        self.shape.iter().map(|&d| d as u64).product::<u64>() * dtype.size()
    }
}

/// Splits tensors (in order) into shards of at most `max_bytes` each (a larger tensor gets a shard of its own).
pub fn plan_shards(tensors: &[Planned], dtype: OutDtype, max_bytes: u64) -> Vec<Range<usize>> {
    let mut shards = Vec::new();
    let (mut start, mut size) = (0, 0u64);
    for (i, t) in tensors.iter().enumerate() {
        let b = t.bytes(dtype);
        if i > start && size + b > max_bytes {
            shards.push(start..i);
            (start, size) = (i, 0);
        }
        size += b;
    }
    if start < tensors.len() || shards.is_empty() {
        shards.push(start..tensors.len());
    }
    shards
}

/// HF's shard file names: `model.safetensors` alone, else `model-00001-of-0000N.safetensors`.
pub fn shard_name(i: usize, n: usize) -> String {
    if n == 1 {
        SINGLE_FILE.to_string()
    } else {
        format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
    }
}

/// Each tensor's shard file, for `model::weights::write_index`.
pub fn weight_map(tensors: &[Planned], shards: &[Range<usize>]) -> Vec<(String, String)> {
    let mut map = Vec::with_capacity(tensors.len());
    for (i, r) in shards.iter().enumerate() {
        map.extend(tensors[r.clone()].iter().map(|t| (t.name.clone(), shard_name(i, shards.len()))));
    }
    map
}

/// A shard being written: the header is out, the tensors follow in the planned order.
pub struct ShardWriter<'a> {
    file: std::io::BufWriter<std::fs::File>,
    tensors: &'a [Planned],
    dtype: OutDtype,
    next: usize,
}

impl<'a> ShardWriter<'a> {
    pub fn create(path: &Path, tensors: &'a [Planned], dtype: OutDtype) -> Result<ShardWriter<'a>> {
        let mut header = Map::new();
        header.insert("__metadata__".into(), json!({"format": "pt"}));
        let mut offset = 0u64;
        for t in tensors {
            let end = offset + t.bytes(dtype);
            header.insert(t.name.clone(), json!({"dtype": dtype.safetensors_name(), "shape": t.shape, "data_offsets": [offset, end]}));
            offset = end;
        }
        let mut text = serde_json::to_vec(&Value::Object(header))?;
        text.resize(text.len().div_ceil(8) * 8, b' ');
        let file = std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
        let mut file = std::io::BufWriter::with_capacity(1 << 20, file);
        file.write_all(&(text.len() as u64).to_le_bytes())?;
        file.write_all(&text)?;
        Ok(ShardWriter { file, tensors, dtype, next: 0 })
    }

    /// Writes the next tensor: `fill` must append exactly its bytes (in chunks, through the writer it is given).
    pub fn tensor(&mut self, fill: impl FnOnce(&mut dyn Write) -> Result<()>) -> Result<()> {
        let t = self.tensors.get(self.next).context("more tensors written than planned")?;
        let mut counted = Counting { inner: &mut self.file, n: 0 };
        fill(&mut counted)?;
        if counted.n != t.bytes(self.dtype) {
            bail!("tensor {}: wrote {} bytes, planned {}", t.name, counted.n, t.bytes(self.dtype));
        }
        self.next += 1;
        Ok(())
    }

    /// Flushes and syncs; every planned tensor must have been written.
    pub fn finish(self) -> Result<()> {
        if self.next != self.tensors.len() {
            bail!("{} of {} tensors written", self.next, self.tensors.len());
        }
        let file = self.file.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        Ok(())
    }
}

struct Counting<'a, W: Write> {
    inner: &'a mut W,
    n: u64,
}

impl<W: Write> Write for Counting<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let k = self.inner.write(buf)?;
        self.n += k as u64;
        Ok(k)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}
