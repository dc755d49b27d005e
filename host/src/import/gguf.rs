//! Reading a GGUF file (llama.cpp's model format, versions 2 and 3): header, metadata, tensor table.
//!
//! Layout: magic `GGUF`, u32 version, u64 tensor count, u64 metadata count; the metadata key/values; one
//! entry per tensor (name, dims innermost-first, ggml type, offset into the data section); then, aligned to
//! `general.alignment` (default 32), the data section. All integers are little-endian. The file is
//! memory-mapped: a tensor's bytes are a slice of the map, read only when it is converted.
//!
//! Every length read from the file is checked against the bytes that remain before anything is allocated,
//! so a corrupt or hostile file gives an error, never an unbounded allocation.
use super::dequant::GgmlType;
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;

/// One metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    /// Any integer type as u64 (negative values are None).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any number as f64.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            // The shortest decimal that reads back as the same f32: 1e-6 stays 1e-6, not 9.99999997e-7.
            Value::F32(v) => format!("{v}").parse().ok(),
            Value::F64(v) => Some(v),
            Value::I8(v) => Some(v.into()),
            Value::I16(v) => Some(v.into()),
            Value::I32(v) => Some(v.into()),
            Value::I64(v) => Some(v as f64),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "u8",
            Value::I8(_) => "i8",
            Value::U16(_) => "u16",
            Value::I16(_) => "i16",
            Value::U32(_) => "u32",
            Value::I32(_) => "i32",
            Value::U64(_) => "u64",
            Value::I64(_) => "i64",
            Value::F32(_) => "f32",
            Value::F64(_) => "f64",
            Value::Bool(_) => "bool",
            Value::String(_) => "string",
            Value::Array(_) => "array",
        }
    }
}

/// One entry of the tensor table.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions as GGUF lists them: innermost (contiguous) first, so `dims[0]` is a row's length.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Absolute byte offset of the tensor's data in the file.
    pub start: u64,
    /// Byte length of the tensor's data.
    pub len: u64,
}

impl TensorInfo {
    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Length of one row (`dims[0]`) and number of rows (the product of the other dims).
    pub fn rows(&self) -> (u64, u64) {
        let cols = self.dims.first().copied().unwrap_or(1);
        (cols, self.dims.iter().skip(1).product())
    }
}

/// An opened GGUF file.
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    map: memmap2::Mmap,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile").field("path", &self.path).field("version", &self.version).finish_non_exhaustive()
    }
}

impl GgufFile {
    /// Opens and parses `path`; every tensor's data must lie inside the file.
    pub fn open(path: &Path) -> Result<GgufFile> {
        let file = std::fs::File::open(path).with_context(|| format!("cannot open GGUF file {}", path.display()))?;
        // SAFETY: the map is read-only; a file changed by another process while we read it can give wrong
        // weights but not memory unsafety in safe code that only reads bytes through slices.
        let map = unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("cannot map {}", path.display()))?;
        let (version, metadata, tensors) = parse(&map).with_context(|| format!("{}: not a valid GGUF file", path.display()))?;
        Ok(GgufFile { path: path.to_path_buf(), version, metadata, tensors, map })
    }

    /// The raw bytes of a tensor (a slice of the map).
    pub fn data(&self, t: &TensorInfo) -> &[u8] {
        &self.map[t.start as usize..(t.start + t.len) as usize]
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// A required unsigned integer.
    pub fn u64(&self, key: &str) -> Result<u64> {
        self.u64_opt(key)?.with_context(|| format!("{}: metadata key {key} is missing", self.path.display()))
    }

    pub fn u64_opt(&self, key: &str) -> Result<Option<u64>> {
        self.typed(key, "an unsigned integer", Value::as_u64)
    }

    pub fn f64_opt(&self, key: &str) -> Result<Option<f64>> {
        self.typed(key, "a number", Value::as_f64)
    }

    pub fn str_opt(&self, key: &str) -> Result<Option<&str>> {
        self.typed(key, "a string", Value::as_str)
    }

    pub fn bool_opt(&self, key: &str) -> Result<Option<bool>> {
        self.typed(key, "a bool", Value::as_bool)
    }

    /// An optional value read by `get`; a value of another type is an error naming the key.
    fn typed<'a, T>(&'a self, key: &str, want: &str, get: impl Fn(&'a Value) -> Option<T>) -> Result<Option<T>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => get(v).map(Some).with_context(|| {
                format!("{}: metadata key {key} is a {}, expected {want}", self.path.display(), v.type_name())
            }),
        }
    }

    pub fn required(&self, key: &str) -> Result<&Value> {
        self.get(key).with_context(|| format!("{}: metadata key {key} is missing", self.path.display()))
    }
}

/// A bounds-checked reader over the file's bytes.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        let Some(end) = end else {
            bail!("truncated: {what} at byte {} needs {n} bytes, the file has {}", self.pos, self.bytes.len())
        };
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        Ok(self.take(N, what)?.try_into().expect("take returns N bytes"))
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count of items each at least `min_item` bytes long: refused when the rest of the file cannot hold them.
    fn count(&mut self, min_item: u64, what: &str) -> Result<usize> {
        let n = self.u64(what)?;
        let left = (self.bytes.len() - self.pos) as u64;
        if n.saturating_mul(min_item) > left {
            bail!("{what} is {n}, more than the {left} bytes left in the file can hold (corrupt or truncated file)");
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.count(1, what)?;
        let b = self.take(n, what)?;
        String::from_utf8(b.to_vec()).with_context(|| format!("{what} is not UTF-8"))
    }

    fn value(&mut self, ty: u32, key: &str) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.array::<1>(key)?[0]),
            1 => Value::I8(self.array::<1>(key)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(key)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(key)?)),
            4 => Value::U32(self.u32(key)?),
            5 => Value::I32(i32::from_le_bytes(self.array(key)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(key)?)),
            7 => match self.array::<1>(key)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => bail!("metadata {key}: bool byte is {b}, expected 0 or 1"),
            },
            8 => Value::String(self.string(key)?),
            9 => {
                let item = self.u32(key)?;
                if item == 9 {
                    // Nested arrays are allowed by the format but never written by llama.cpp for models.
                    let n = self.count(12, key)?;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        let inner = self.u32(key)?;
                        items.push(self.value_array(inner, key)?);
                    }
                    Value::Array(items)
                } else {
                    self.value_array(item, key)?
                }
            }
            10 => Value::U64(self.u64(key)?),
            11 => Value::I64(i64::from_le_bytes(self.array(key)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(key)?)),
            other => bail!("metadata {key}: unknown value type {other} (GGUF knows 0..=12)"),
        })
    }

    fn value_array(&mut self, item: u32, key: &str) -> Result<Value> {
        let min = match item {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4 | 5 | 6 => 4,
            8 | 10 | 11 | 12 => 8,
            9 => bail!("metadata {key}: arrays nested deeper than two levels are not supported"),
            other => bail!("metadata {key}: array of unknown value type {other} (GGUF knows 0..=12)"),
        };
        let n = self.count(min, key)?;
        let mut items = Vec::with_capacity(n);
        for _ in 0..n {
            items.push(self.value(item, key)?);
        }
        Ok(Value::Array(items))
    }
}

type Parsed = (u32, BTreeMap<String, Value>, Vec<TensorInfo>);

fn parse(bytes: &[u8]) -> Result<Parsed> {
    let mut c = Cursor { bytes, pos: 0 };
    let magic = c.take(4, "the magic number").context("the file is shorter than a GGUF header")?;
    if magic != MAGIC {
        bail!("bad magic {:02x?}: a GGUF file starts with the bytes \"GGUF\"", magic);
    }
    let version = c.u32("the version")?;
    if !(2..=3).contains(&version) {
        bail!("GGUF version {version} is not supported (versions 2 and 3 are; convert older files with llama.cpp)");
    }
    // Each tensor entry takes at least 8+4+4+8 bytes, each key/value 8+4+1.
    let n_tensors = c.count(24, "the tensor count")?;
    let n_kv = c.count(13, "the metadata count")?;
    let mut metadata = BTreeMap::new();
    for i in 0..n_kv {
        let key = c.string(&format!("metadata key #{i}"))?;
        let ty = c.u32(&key)?;
        let value = c.value(ty, &key)?;
        if metadata.insert(key.clone(), value).is_some() {
            bail!("metadata key {key} appears twice");
        }
    }
    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => match v.as_u64() {
            Some(a) if a > 0 && a.is_power_of_two() => a,
            _ => bail!("metadata general.alignment is {v:?}: it must be a power of two"),
        },
    };
    let mut infos = Vec::with_capacity(n_tensors);
    for i in 0..n_tensors {
        let name = c.string(&format!("the name of tensor #{i}"))?;
        let n_dims = c.u32(&name)?;
        if n_dims == 0 || n_dims > 4 {
            bail!("tensor {name}: {n_dims} dimensions (ggml tensors have 1 to 4)");
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(c.u64(&name)?);
        }
        let type_id = c.u32(&name)?;
        let ty = GgmlType::from_id(type_id)
            .with_context(|| format!("tensor {name}: ggml type {type_id} ({}) is not supported", GgmlType::name_of(type_id)))?;
        let offset = c.u64(&name)?;
        infos.push((name, dims, ty, offset));
    }
    let data_start = (c.pos as u64).div_ceil(alignment) * alignment;
    let mut tensors = Vec::with_capacity(infos.len());
    let mut names = std::collections::HashSet::new();
    for (name, dims, ty, offset) in infos {
        if !names.insert(name.clone()) {
            bail!("tensor {name} appears twice");
        }
        let elements = dims.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
        let len = elements
            .and_then(|n| ty.byte_len(n))
            .with_context(|| format!("tensor {name}: dims {dims:?} do not fit whole {} blocks of {} values", ty.name(), ty.block_len()))?;
        let start = data_start.checked_add(offset).context("offset overflow")?;
        match start.checked_add(len) {
            Some(end) if end <= bytes.len() as u64 => {}
            _ => bail!(
                "truncated: tensor {name} ({} {dims:?}) needs bytes {start}..{}, the file has {}",
                ty.name(),
                start.saturating_add(len),
                bytes.len()
            ),
        }
        tensors.push(TensorInfo { name, dims, ty, start, len });
    }
    Ok((version, metadata, tensors))
}
