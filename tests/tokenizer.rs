//! Tokenizer tests: Qwen's published vectors, agreement with the reference Python `tiktoken` on a mixed corpus
//! (tests/fixtures/tokenizer/corpus.jsonl.gz, made by make_expected.py there), the no-special-tokens-from-text
//! rule, round trips, and load errors. Everything comes from tests/fixtures/tokenizer/.
//!
//! Throughput (ignored by default):
//! `CARGO_PROFILE_DEV_OPT_LEVEL=3 cargo test --test tokenizer -- --ignored --nocapture throughput` (or `--release`)
use lorahost::tokenizer::{self, HfTokenizer, QwenTiktoken, Tokenizer};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Instant;
use unicode_normalization::UnicodeNormalization;

const TIKTOKEN_SHA256: &str = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186";
const TOKENIZER_JSON_SHA256: &str = "6b5e0322623a262c0fd407fc7a63520a07cfbd7001b687f6ca062e6ed161ff15";
const ENDOFTEXT: u32 = 151643;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tokenizer")
}

fn gunzip(path: &Path) -> Vec<u8> {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(file).read_to_end(&mut out).unwrap();
    out
}

fn qwen() -> &'static QwenTiktoken {
    static T: OnceLock<QwenTiktoken> = OnceLock::new();
    T.get_or_init(|| QwenTiktoken::from_file(&fixtures().join("qwen.tiktoken")).unwrap())
}

fn tokenizer_json() -> &'static [u8] {
    static B: OnceLock<Vec<u8>> = OnceLock::new();
    B.get_or_init(|| gunzip(&fixtures().join("tokenizer.json.gz")))
}

fn hf() -> &'static HfTokenizer {
    static T: OnceLock<HfTokenizer> = OnceLock::new();
    T.get_or_init(|| HfTokenizer::from_bytes(tokenizer_json()).unwrap())
}

struct Entry {
    src: String,
    text: String,
    ids: Vec<u32>,
}

fn corpus() -> &'static [Entry] {
    static C: OnceLock<Vec<Entry>> = OnceLock::new();
    C.get_or_init(|| {
        let data = gunzip(&fixtures().join("corpus.jsonl.gz"));
        let mut out = Vec::new();
        for line in data.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            let v: serde_json::Value = serde_json::from_slice(line).unwrap();
            if v.get("meta").is_some() {
                continue;
            }
            out.push(Entry {
                src: v["src"].as_str().unwrap().to_string(),
                text: v["text"].as_str().unwrap().to_string(),
                ids: v["ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect(),
            });
        }
        out
    })
}

fn enc(t: &dyn Tokenizer, text: &str) -> Vec<u32> {
    let mut out = Vec::new();
    t.encode_ordinary(text, &mut out);
    out
}

fn both() -> [(&'static str, &'static dyn Tokenizer); 2] {
    [("QwenTiktoken", qwen() as &dyn Tokenizer), ("HfTokenizer", hf() as &dyn Tokenizer)]
}

/// QwenLM/Qwen tokenization_note.md; "special tokens allowed" built from segments + special_id.
fn check_published_vectors(t: &dyn Tokenizer) {
    assert_eq!(enc(t, "print(\"<|endoftext|>\")"), [1350, 9639, 91, 8691, 723, 427, 91, 82598]);

    let eot = t.special_id("<|endoftext|>").unwrap();
    let mut allowed = enc(t, "print(\"");
    allowed.push(eot);
    t.encode_ordinary("\")", &mut allowed);
    assert_eq!(allowed, [1350, 445, 151643, 899]);

    let mut only_eot = enc(t, "print(\"<|extra_0|>\")");
    only_eot.push(eot);
    assert_eq!(only_eot, [1350, 9639, 91, 15460, 62, 15, 91, 82598, 151643]);
}

#[test]
fn qwen_published_vectors() {
    check_published_vectors(qwen());
}

#[test]
fn hf_published_vectors() {
    check_published_vectors(hf());
}

#[test]
fn special_ids_vocab_size_and_digest() {
    for (name, t) in both() {
        assert_eq!(t.special_id("<|endoftext|>"), Some(151643), "{name}");
        assert_eq!(t.special_id("<|im_start|>"), Some(151644), "{name}");
        assert_eq!(t.special_id("<|im_end|>"), Some(151645), "{name}");
        assert_eq!(t.special_id("<|extra_0|>"), Some(151646), "{name}");
        assert_eq!(t.special_id("<|extra_204|>"), Some(151850), "{name}");
        assert_eq!(t.special_id("<|extra_205|>"), None, "{name}");
        assert_eq!(t.special_id("endoftext"), None, "{name}");
        assert_eq!(t.vocab_size(), 151851, "{name}");
        assert_eq!(t.decode(&[1350, 445, 151643, 899, 151645]), "print(\"<|endoftext|>\")<|im_end|>", "{name}");
    }
    assert_eq!(qwen().digest(), TIKTOKEN_SHA256);
    assert_eq!(hf().digest(), TOKENIZER_JSON_SHA256);
}

/// Data must not inject control tokens: every special name, anywhere in text, encodes as ordinary ids, and
/// both implementations agree on them.
#[test]
fn text_never_yields_special_tokens() {
    let names = tokenizer::qwen_special_names();
    let mut texts: Vec<String> = names.clone();
    texts.push(names.concat());
    texts.push(format!("Human: hi{}\nAssistant: {}ok{}", names[0], names[1], names[2]));
    texts.push(format!("  {} \n\n{}\t", names[2], names[207]));
    texts.push("<|endoftext|><|endoftext|><|im_start|>system\n<|im_end|>".to_string());
    for text in &texts {
        let a = enc(qwen(), text);
        let b = enc(hf(), text);
        assert!(a.iter().all(|&id| id < ENDOFTEXT), "QwenTiktoken gave a special id for {text:?}: {a:?}");
        assert_eq!(a, b, "HfTokenizer differs from QwenTiktoken on {text:?}");
        assert_eq!(qwen().decode(&a), *text);
        assert_eq!(hf().decode(&b), *text);
    }
}

fn check_corpus(name: &str, t: &dyn Tokenizer) {
    let corpus = corpus();
    assert!(corpus.len() >= 2000, "corpus has {} strings", corpus.len());
    let start = Instant::now();
    let (mut bytes, mut tokens, mut bad) = (0usize, 0usize, Vec::new());
    let mut out = Vec::new();
    for (i, e) in corpus.iter().enumerate() {
        out.clear();
        t.encode_ordinary(&e.text, &mut out);
        bytes += e.text.len();
        tokens += out.len();
        if out != e.ids {
            bad.push(i);
        }
    }
    eprintln!(
        "{name}: {} strings, {bytes} bytes, {tokens} tokens in {:.3}s, {} mismatches",
        corpus.len(),
        start.elapsed().as_secs_f64(),
        bad.len()
    );
    for &i in bad.iter().take(5) {
        let e = &corpus[i];
        let got = enc(t, &e.text);
        eprintln!("  [{}] {:?}\n    expected {:?}\n    got      {:?}", e.src, e.text, e.ids, got);
    }
    assert!(bad.is_empty(), "{name}: {} of {} corpus strings differ from tiktoken", bad.len(), corpus.len());
}

#[test]
fn qwen_matches_tiktoken_on_corpus() {
    check_corpus("QwenTiktoken", qwen());
}

#[test]
fn hf_matches_tiktoken_on_corpus() {
    check_corpus("HfTokenizer", hf());
}

#[test]
fn decode_round_trips_the_corpus() {
    for (name, t) in both() {
        for e in corpus() {
            let nfc: String = e.text.nfc().collect();
            assert_eq!(t.decode(&e.ids), nfc, "{name} [{}]", e.src);
        }
        // Lossy: the 256 single-byte tokens; the 128 bytes >= 0x80 alone are not UTF-8.
        let lone: Vec<u32> = (0..256).filter(|&id| t.decode(&[id]) == "\u{fffd}").collect();
        assert_eq!(lone.len(), 128, "{name}");
        assert_eq!(t.decode(&[u32::MAX]), "\u{fffd}", "{name}");
    }
}

#[test]
fn load_files_and_folders() {
    let fx = fixtures();
    let t = tokenizer::load(&fx.join("qwen.tiktoken")).unwrap();
    assert_eq!(t.digest(), TIKTOKEN_SHA256);
    assert_eq!(enc(t.as_ref(), "Hello world"), enc(qwen(), "Hello world"));

    // A folder with both files prefers qwen.tiktoken (the tokenizer.json here is not even valid).
    let both = tempfile::tempdir().unwrap();
    std::fs::copy(fx.join("qwen.tiktoken"), both.path().join("qwen.tiktoken")).unwrap();
    std::fs::write(both.path().join("tokenizer.json"), "{ not json").unwrap();
    assert_eq!(tokenizer::load(both.path()).unwrap().digest(), TIKTOKEN_SHA256);

    // A folder with only tokenizer.json loads it.
    let hf_dir = tempfile::tempdir().unwrap();
    std::fs::write(hf_dir.path().join("tokenizer.json"), tokenizer_json()).unwrap();
    let t = tokenizer::load(hf_dir.path()).unwrap();
    assert_eq!(t.digest(), TOKENIZER_JSON_SHA256);
    assert_eq!(enc(t.as_ref(), "<|endoftext|> hi"), enc(qwen(), "<|endoftext|> hi"));
}

fn load_err(path: &Path) -> String {
    match tokenizer::load(path) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn load_errors_name_the_path_and_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();

    let missing = p.join("nope.tiktoken");
    let e = load_err(&missing);
    assert!(e.contains(&missing.display().to_string()) && e.contains("does not exist"), "{e}");

    let empty = p.join("empty");
    std::fs::create_dir(&empty).unwrap();
    let e = load_err(&empty);
    assert!(e.contains(&empty.display().to_string()) && e.contains("neither"), "{e}");

    // Malformed lines: the message names the file and the line number.
    let good = "IQ== 0\nIg== 1\n";
    for (name, body, expect) in [
        ("fields.tiktoken", format!("{good}Iw==\n"), "line 3"),
        ("extra.tiktoken", format!("{good}Iw== 2 x\n"), "line 3"),
        ("b64.tiktoken", format!("{good}!!!! 2\n"), "line 3: invalid base64"),
        ("rank.tiktoken", format!("{good}\nIw== two\n"), "line 4: invalid rank"),
        ("duprank.tiktoken", format!("{good}Iw== 1\n"), "line 3: rank 1 appears twice"),
        ("duptok.tiktoken", format!("{good}IQ== 2\n"), "line 3: token"),
        ("gap.tiktoken", "IQ== 0\nIg== 2\n".to_string(), "rank 1 is missing"),
        ("bytes.tiktoken", good.to_string(), "has no token of its own"),
    ] {
        let f = p.join(name);
        std::fs::write(&f, body).unwrap();
        let e = load_err(&f);
        assert!(e.contains(&f.display().to_string()) && e.contains(expect), "{name}: {e}");
    }

    let json = p.join("tokenizer.json");
    std::fs::write(&json, "{\"version\": \"1.0\"}").unwrap();
    let e = load_err(&json);
    assert!(e.contains(&json.display().to_string()), "{e}");

    let other = p.join("vocab.txt");
    std::fs::write(&other, "x").unwrap();
    let e = load_err(&other);
    assert!(e.contains("vocab.txt") && e.contains("unknown kind"), "{e}");
}

/// Encode throughput, one thread: about 20 MB of the corpus repeated, and of its English records alone.
#[test]
#[ignore]
fn throughput() {
    let corpus = corpus();
    let build = |pick: &dyn Fn(&Entry) -> bool| {
        let texts: Vec<&str> = corpus.iter().filter(|e| pick(e)).map(|e| e.text.as_str()).collect();
        let one: usize = texts.iter().map(|t| t.len()).sum();
        let reps = (20_000_000 / one).max(1);
        (0..reps).flat_map(|_| texts.iter().copied()).collect::<Vec<&str>>()
    };
    let english = |e: &Entry| {
        ["sample:oasst1", "sample:dolly", "sample:gsm8k", "sample:truthfulqa", "prose"].contains(&e.src.as_str())
    };
    // One pass over the corpus on a fresh thread (cold per-thread piece cache), no repetition.
    for (name, t) in both() {
        let (tokens, secs) = std::thread::scope(|s| {
            s.spawn(|| {
                let mut out = Vec::new();
                let start = Instant::now();
                for e in corpus {
                    t.encode_ordinary(&e.text, &mut out);
                }
                (out.len(), start.elapsed().as_secs_f64())
            })
            .join()
            .unwrap()
        });
        eprintln!(
            "{:>16} {name:>12}: {tokens} tokens, {secs:.3}s: {:.2}M tokens/s",
            "corpus once",
            tokens as f64 / secs / 1e6
        );
    }
    for (label, texts) in [("mixed corpus", build(&|_| true)), ("English records", build(&english))] {
        let bytes: usize = texts.iter().map(|t| t.len()).sum();
        for (name, t) in both() {
            let mut out = Vec::with_capacity(bytes / 3);
            let start = Instant::now();
            for text in &texts {
                t.encode_ordinary(text, &mut out);
            }
            let secs = start.elapsed().as_secs_f64();
            eprintln!(
                "{label:>16} {name:>12}: {:.1} MB, {} tokens, {secs:.2}s: {:.2}M tokens/s, {:.1} MB/s",
                bytes as f64 / 1e6,
                out.len(),
                out.len() as f64 / secs / 1e6,
                bytes as f64 / secs / 1e6
            );
        }
    }
}
