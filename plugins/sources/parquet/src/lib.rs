//! `parquet`: reads a Parquet file with instruction/input/output columns, such as the published data mix of
//! the NeurIPS 2023 LLM efficiency challenge recipe (columns `instruction`, `input`, `output`, `data_source`) or
//! most Hugging Face dataset exports.
//!
//! ```toml
//! [[dataset]]
//! name = "mix"
//! [dataset.source]
//! plugin = "parquet"
//! path = "data/mix.parquet"
//! fields = { output = "response" }   # column names, when not instruction/input/output/system
//! meta = ["data_source"]             # extra columns copied into the record's metadata
//! ```
//!
//! Each row becomes an instruction record: the user turn is `{instruction}\n{input}`, or just `{instruction}`
//! when the input is empty or null, and the assistant turn is `{output}`; a non-empty `system` column (when the
//! file has one) becomes a system turn first. Ids are `<file name>#<row>` (0-based). A row whose instruction or
//! output is null, or a column that is not text, is reported as `<file name>#<row>: <what is wrong>` and
//! skipped. Only the columns used are read, one row group at a time.
//!
//! Compression: uncompressed, snappy, gzip and lz4 are read. zstd (and brotli, lzo) are not: a file that uses
//! them is refused when opened, with a message saying so.
use lorahost_record_shapes::{fill, open, Next};
use lorahost_sdk::{Batch, Example, Source, Turn};
use parquet::basic::Compression;
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::reader::RowIter;
use parquet::record::Field;
use parquet::schema::types::Type;
use std::io::{Read, Seek, SeekFrom};
use std::sync::Arc;

/// The file as parquet's chunk source, opened anew for each read. parquet's own `File` source clones the
/// file handle (`File::try_clone`), which WASI does not support ("operation not supported on this platform").
struct PathChunks {
    path: std::path::PathBuf,
    len: u64,
}

impl PathChunks {
    fn at(&self, start: u64) -> parquet::errors::Result<std::fs::File> {
        let mut f = std::fs::File::open(&self.path).map_err(|e| parquet::errors::ParquetError::External(Box::new(e)))?;
        f.seek(SeekFrom::Start(start)).map_err(|e| parquet::errors::ParquetError::External(Box::new(e)))?;
        Ok(f)
    }
}

impl parquet::file::reader::Length for PathChunks {
    fn len(&self) -> u64 {
        self.len
    }
}

impl parquet::file::reader::ChunkReader for PathChunks {
    type T = std::io::BufReader<std::fs::File>;

    fn get_read(&self, start: u64) -> parquet::errors::Result<Self::T> {
        Ok(std::io::BufReader::new(self.at(start)?))
    }

    fn get_bytes(&self, start: u64, length: usize) -> parquet::errors::Result<bytes::Bytes> {
        let mut buf = vec![0u8; length];
        self.at(start)?.read_exact(&mut buf).map_err(|e| parquet::errors::ParquetError::External(Box::new(e)))?;
        Ok(buf.into())
    }
}

/// Column names, for files whose columns are not called instruction/input/output/system.
#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Fields {
    instruction: Option<String>,
    input: Option<String>,
    output: Option<String>,
    system: Option<String>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    path: String,
    #[serde(default)]
    fields: Fields,
    #[serde(default)]
    meta: Vec<String>,
}

/// Where the columns a record needs sit in a projected row.
struct Columns {
    instruction: (String, usize),
    input: Option<(String, usize)>,
    output: (String, usize),
    system: Option<(String, usize)>,
    /// Metadata key (the column name) and position.
    meta: Vec<(String, usize)>,
}

struct Parquet {
    name: String,
    rows: RowIter<'static>,
    columns: Columns,
    /// 0-based index of the next row.
    row: usize,
}

/// The reason a codec cannot be read by this build, if it cannot.
fn unsupported(codec: Compression) -> Option<&'static str> {
    match codec {
        Compression::ZSTD(_) => Some("zstd (its decoder is a C library, which cannot be built into the sandbox)"),
        Compression::BROTLI(_) => Some("brotli (not built into this plugin)"),
        Compression::LZO => Some("lzo (no Parquet reader for Rust supports it)"),
        _ => None,
    }
}

/// A text column's value: `None` when null; numbers and other scalars become their text.
fn text(field: &Field, column: &str) -> Result<Option<String>, String> {
    match field {
        Field::Null => Ok(None),
        Field::Str(s) => Ok(Some(s.clone())),
        Field::Bytes(b) => match std::str::from_utf8(b.data()) {
            Ok(s) => Ok(Some(s.to_string())),
            Err(_) => Err(format!("column `{column}` is not valid UTF-8")),
        },
        Field::Group(_) => Err(format!("column `{column}` should be text, found a group")),
        Field::ListInternal(_) => Err(format!("column `{column}` should be text, found a list")),
        Field::MapInternal(_) => Err(format!("column `{column}` should be text, found a map")),
        other => Ok(Some(other.to_string())),
    }
}

impl Columns {
    /// The record of one row (its columns in projection order), or what is wrong with it.
    fn convert(&self, id: String, row: &[(String, Field)]) -> Result<Example, String> {
        let get = |(name, at): &(String, usize)| text(&row[*at].1, name);
        let instruction = get(&self.instruction)?
            .ok_or_else(|| format!("instruction (column `{}`) is null", self.instruction.0))?;
        let output =
            get(&self.output)?.ok_or_else(|| format!("output (column `{}`) is null", self.output.0))?;
        let input = match &self.input {
            Some(column) => get(column)?.unwrap_or_default(),
            None => String::new(),
        };
        let mut example = Example::instruction(id, "", &instruction, &input, output);
        if let Some(column) = &self.system {
            if let Some(system) = get(column)?.filter(|s| !s.is_empty()) {
                example.turns.insert(0, Turn::new("system", system));
            }
        }
        for (name, at) in &self.meta {
            match &row[*at].1 {
                Field::Null => {}
                Field::Str(s) => example.set_meta(name.as_str(), s.as_str()),
                Field::Bytes(b) => example.set_meta(name.as_str(), String::from_utf8_lossy(b.data())),
                other => example.set_meta(name.as_str(), other.to_string()),
            }
        }
        Ok(example)
    }
}

impl Source for Parquet {
    type Config = Config;

    fn open(c: Config) -> Result<Self, String> {
        let (file, name) = open(&c.path)?;
        let len = file.metadata().map_err(|e| format!("{name}: {e}"))?.len();
        let chunks = PathChunks { path: c.path.clone().into(), len };
        let reader = SerializedFileReader::new(chunks)
            .map_err(|e| format!("{name}: cannot read as a Parquet file: {e}"))?;
        let root = reader.metadata().file_metadata().schema();
        let available: Vec<&str> = root.get_fields().iter().map(|f| f.name()).collect();
        let has = |column: &str| available.contains(&column);
        let missing = |what: &str, column: &str| {
            format!("{name}: no column `{column}` for {what}; the file's columns are {}", available.join(", "))
        };

        // Required columns must exist; optional ones must exist only when named explicitly.
        let instruction = c.fields.instruction.unwrap_or_else(|| "instruction".into());
        let output = c.fields.output.unwrap_or_else(|| "output".into());
        for (what, column) in [("instruction", &instruction), ("output", &output)] {
            if !has(column) {
                return Err(missing(what, column));
            }
        }
        let optional = |what: &str, named: Option<String>| match named {
            Some(column) if !has(&column) => Err(missing(what, &column)),
            Some(column) => Ok(Some(column)),
            None => Ok(has(what).then(|| what.to_string())),
        };
        let input = optional("input", c.fields.input)?;
        let system = optional("system", c.fields.system)?;
        for column in &c.meta {
            if !has(column) {
                return Err(missing("meta", column));
            }
        }

        // Read only the columns used, in the file's order.
        let wanted = |column: &str| {
            column == instruction
                || column == output
                || input.as_deref() == Some(column)
                || system.as_deref() == Some(column)
                || c.meta.iter().any(|m| m == column)
        };
        let projected: Vec<Arc<Type>> = root.get_fields().iter().filter(|f| wanted(f.name())).cloned().collect();
        let position = |column: &str| projected.iter().position(|f| f.name() == column).unwrap_or(0);
        let columns = Columns {
            instruction: (instruction.clone(), position(&instruction)),
            input: input.as_deref().map(|i| (i.to_string(), position(i))),
            output: (output.clone(), position(&output)),
            system: system.as_deref().map(|s| (s.to_string(), position(s))),
            meta: c.meta.iter().map(|m| (m.clone(), position(m))).collect(),
        };

        // Refuse codecs this build cannot decompress before reading any row.
        for group in reader.metadata().row_groups() {
            for chunk in group.columns() {
                let column = chunk.column_path().parts().first().map(String::as_str).unwrap_or("");
                if !wanted(column) {
                    continue;
                }
                if let Some(why) = unsupported(chunk.compression()) {
                    return Err(format!(
                        "{name}: column `{column}` is compressed with {why}; this plugin reads uncompressed, \
                         snappy, gzip and lz4 Parquet files, so write the file again with one of those"
                    ));
                }
            }
        }

        let projection = Type::group_type_builder(root.name())
            .with_fields(projected)
            .build()
            .map_err(|e| format!("{name}: cannot select columns: {e}"))?;
        let rows = RowIter::from_file_into(Box::new(reader))
            .project(Some(projection))
            .map_err(|e| format!("{name}: cannot select columns: {e}"))?;
        Ok(Parquet { name, rows, columns, row: 0 })
    }

    fn next_batch(&mut self, max: usize) -> Result<Option<Batch>, String> {
        let Parquet { name, rows, columns, row } = self;
        fill(max, || -> Result<Next, String> {
            let Some(next) = rows.next() else { return Ok(None) };
            let at = format!("{name}#{row}");
            let values = next.map_err(|e| format!("{at}: cannot read the row: {e}"))?.into_columns();
            *row += 1;
            Ok(Some(columns.convert(at.clone(), &values).map_err(|e| format!("{at}: {e}"))))
        })
    }
}

lorahost_sdk::export_source!(Parquet);

#[cfg(test)]
mod tests {
    use super::*;
    use lorahost_sdk::parse_config;

    fn sample(file: &str) -> String {
        format!("{}/../../../tests/fixtures/samples/parquet/{file}", env!("CARGO_MANIFEST_DIR"))
    }

    fn source(config: &str) -> Result<Parquet, String> {
        parse_config::<Config>(config).and_then(Parquet::open)
    }

    fn read_all(config: &str) -> (Vec<Example>, Vec<String>) {
        let mut source = source(config).unwrap();
        lorahost_record_shapes::read_all(&mut source, 8)
    }

    fn config(file: &str) -> String {
        format!("path = {:?}\nmeta = [\"data_source\"]", sample(file))
    }

    #[test]
    fn snappy_mix() {
        let (records, malformed) = read_all(&config("mix.sample.parquet"));
        assert_eq!(records.len(), 5);
        let ids: Vec<&str> = records.iter().map(|r| r.id.as_str()).collect();
        let expected = [0, 1, 2, 4, 5].map(|row| format!("mix.sample.parquet#{row}"));
        assert_eq!(ids, expected);
        let first = &records[0];
        assert_eq!(first.turns.len(), 2);
        assert_eq!(first.turns[0], Turn::new("user", "Give three tips for keeping a sourdough starter healthy."));
        assert_eq!(
            first.turns[1],
            Turn::new(
                "assistant",
                "1. Feed it at the same time every day with equal weights of flour and water.\n\
                 2. Keep it somewhere between 21 and 26 degrees Celsius.\n\
                 3. Discard part of it before each feeding so the acidity stays in check."
            )
        );
        assert_eq!(first.meta("data_source"), Some("dolly"));
        let second = &records[1];
        assert_eq!(
            second.turns[0].content,
            "Summarize the following news report in one sentence.\nThe town council of Larkford voted on Tuesday \
             to close Mill Street to cars on weekends from May to September. Shop owners had asked for the trial \
             after a similar scheme in a nearby town raised foot traffic by a fifth."
        );
        assert_eq!(second.meta("data_source"), Some("cnn_dailymail"));
        // Null input: the user turn is the instruction alone.
        let third = &records[2];
        assert_eq!(third.turns[0].content, "Write a haiku about a lighthouse in fog.");
        let haiku = "Grey breath on the sea\na slow eye opens and shuts\nships count the seconds";
        assert_eq!(third.turns[1].content, haiku);
        assert_eq!(third.meta("data_source"), Some("lima"));
        // Second row group.
        let mmlu = &records[3];
        assert_eq!(
            mmlu.turns[0].content,
            "Question: Which gas do plants take in from the air to make their food?\n\
             A.Oxygen\nB.Carbon dioxide\nC.Nitrogen\nD.Helium\nAnswer:"
        );
        assert_eq!(mmlu.turns[1].content, "B");
        assert_eq!(mmlu.meta("data_source"), Some("mmlu"));
        assert_eq!(records[4].meta("data_source"), Some("gsm8k"));
        assert!(records[4].turns[1].content.ends_with("#### 14"));
        assert_eq!(
            malformed,
            [
                "mix.sample.parquet#3: output (column `output`) is null",
                "mix.sample.parquet#6: instruction (column `instruction`) is null",
            ]
        );
    }

    #[test]
    fn no_meta_unless_asked() {
        let (records, _) = read_all(&format!("path = {:?}", sample("mix.sample.parquet")));
        assert_eq!(records.len(), 5);
        assert!(records.iter().all(|r| r.meta.is_empty()));
    }

    #[test]
    fn gzip_and_uncompressed_read_the_same() {
        let (snappy, snappy_bad) = read_all(&config("mix.sample.parquet"));
        for file in ["mix.gzip.parquet", "mix.none.parquet"] {
            let (records, malformed) = read_all(&config(file));
            assert_eq!(records.len(), 5, "{file}");
            for (a, b) in records.iter().zip(&snappy) {
                assert_eq!((&a.turns, &a.meta), (&b.turns, &b.meta), "{file}");
            }
            assert_eq!(records[3].id, format!("{file}#4"));
            let expected: Vec<String> = snappy_bad.iter().map(|m| m.replace("mix.sample.parquet", file)).collect();
            assert_eq!(malformed, expected);
        }
    }

    #[test]
    fn batches_of_at_most_max() {
        let mut source = source(&config("mix.sample.parquet")).unwrap();
        let mut sizes = Vec::new();
        while let Some(batch) = source.next_batch(2).unwrap() {
            sizes.push((batch.records.len(), batch.malformed.len()));
        }
        // 7 rows: 5 records and 2 malformed, two entries a batch.
        assert_eq!(sizes, [(2, 0), (1, 1), (2, 0), (0, 1)]);
        assert!(source.next_batch(2).unwrap().is_none());
    }

    #[test]
    fn renamed_fields() {
        // Read data_source as the output and input as the system prompt, to check the mapping.
        let config = format!(
            "path = {:?}\nfields = {{ output = \"data_source\", system = \"input\", input = \"output\" }}",
            sample("mix.sample.parquet")
        );
        let (records, malformed) = read_all(&config);
        assert_eq!(records.len(), 6);
        assert_eq!(malformed, ["mix.sample.parquet#6: instruction (column `instruction`) is null"]);
        let second = &records[1];
        assert_eq!(second.turns[0].role, "system");
        assert!(second.turns[0].content.starts_with("The town council of Larkford"));
        assert_eq!(
            second.turns[1].content,
            "Summarize the following news report in one sentence.\n\
             Larkford will close Mill Street to cars on summer weekends after shop owners asked for a trial."
        );
        assert_eq!(second.turns[2], Turn::new("assistant", "cnn_dailymail"));
        // Empty system (row 0) and null output used as input (row 3): no system turn, no input.
        assert_eq!(records[0].turns.len(), 2);
        assert_eq!(records[3].turns[0], Turn::new("user", "Explain what a hash map is to a ten-year-old."));
    }

    #[test]
    fn zstd_is_refused_clearly() {
        let err = source(&config("mix.zstd.parquet")).err().unwrap();
        assert!(err.starts_with("mix.zstd.parquet: column `instruction` is compressed with zstd"), "{err}");
        assert!(err.contains("uncompressed, snappy, gzip and lz4"), "{err}");
    }

    #[test]
    fn bad_configurations() {
        let path = sample("mix.sample.parquet");
        let err = source(&format!("path = {path:?}\nfields = {{ output = \"response\" }}")).err().unwrap();
        assert_eq!(
            err,
            "mix.sample.parquet: no column `response` for output; the file's columns are instruction, input, \
             output, data_source"
        );
        let err = source(&format!("path = {path:?}\nmeta = [\"category\"]")).err().unwrap();
        assert!(err.starts_with("mix.sample.parquet: no column `category` for meta"), "{err}");
        let err = source(&format!("path = {path:?}\nfields = {{ prompt = \"x\" }}")).err().unwrap();
        assert!(err.contains("unknown field `prompt`"), "{err}");
        let err = source(&format!("path = {path:?}\nlimit = 3")).err().unwrap();
        assert!(err.contains("unknown field `limit`"), "{err}");
        let err = source("path = \"mix.sample.parquet\"").err().unwrap();
        assert!(err.contains("is not absolute"), "{err}");
    }

    #[test]
    fn unreadable_files() {
        let dir = std::env::temp_dir().join(format!("lorahost-parquet-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notes.parquet");
        std::fs::write(&path, "instruction,output\nHi,Hello\n").unwrap();
        let err = source(&format!("path = {:?}", path.to_str().unwrap())).err().unwrap();
        assert!(err.starts_with("notes.parquet: cannot read as a Parquet file"), "{err}");
        let missing = dir.join("missing.parquet");
        let err = source(&format!("path = {:?}", missing.to_str().unwrap())).err().unwrap();
        assert!(err.starts_with("cannot open ") && err.contains("missing.parquet"), "{err}");
        std::fs::remove_dir_all(dir).ok();
    }
}
