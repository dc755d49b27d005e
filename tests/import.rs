//! `lorahost import gguf`: GGUF files written here by hand (a test-only writer), dequantized blocks checked
//! against values worked out from ggml's block layouts, llama.cpp's q/k row permutation undone, names,
//! config.json, tokenizer.json through the `tokenizers` crate, and the errors for broken files.
use lorahost::import::dequant::{dequantize, GgmlType};
use lorahost::import::safetensors_out::OutDtype;
use lorahost::import::{import_gguf, names, Options};
use lorahost::tokenizer::{HfTokenizer, Tokenizer};
use serde_json::Value;
use std::path::{Path, PathBuf};

// ---------------------------------------------------------------------------------------------------------
// A GGUF writer for the tests: magic, version, tensor and key/value counts, key/values, tensor table, data
// aligned to 32 bytes (the default `general.alignment`).

struct Gguf {
    version: u32,
    n_kv: u64,
    kv: Vec<u8>,
    tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

impl Gguf {
    fn new() -> Gguf {
        Gguf { version: 3, n_kv: 0, kv: Vec::new(), tensors: Vec::new() }
    }

    fn key(&mut self, k: &str, ty: u32) {
        self.n_kv += 1;
        put_str(&mut self.kv, k);
        self.kv.extend(ty.to_le_bytes());
    }

    fn str(mut self, k: &str, v: &str) -> Gguf {
        self.key(k, 8);
        put_str(&mut self.kv, v);
        self
    }

    fn u32(mut self, k: &str, v: u32) -> Gguf {
        self.key(k, 4);
        self.kv.extend(v.to_le_bytes());
        self
    }

    fn f32(mut self, k: &str, v: f32) -> Gguf {
        self.key(k, 6);
        self.kv.extend(v.to_le_bytes());
        self
    }

    fn bool(mut self, k: &str, v: bool) -> Gguf {
        self.key(k, 7);
        self.kv.push(v as u8);
        self
    }

    fn strs(mut self, k: &str, v: &[String]) -> Gguf {
        self.key(k, 9);
        self.kv.extend(8u32.to_le_bytes());
        self.kv.extend((v.len() as u64).to_le_bytes());
        for s in v {
            put_str(&mut self.kv, s);
        }
        self
    }

    fn i32s(mut self, k: &str, v: &[i32]) -> Gguf {
        self.key(k, 9);
        self.kv.extend(5u32.to_le_bytes());
        self.kv.extend((v.len() as u64).to_le_bytes());
        for x in v {
            self.kv.extend(x.to_le_bytes());
        }
        self
    }

    fn tensor(mut self, name: &str, dims: &[u64], ty: u32, data: Vec<u8>) -> Gguf {
        self.tensors.push((name.to_string(), dims.to_vec(), ty, data));
        self
    }

    fn bytes(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(self.version.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend(self.n_kv.to_le_bytes());
        out.extend(&self.kv);
        let mut offset = 0u64;
        for (name, dims, ty, data) in &self.tensors {
            put_str(&mut out, name);
            out.extend((dims.len() as u32).to_le_bytes());
            dims.iter().for_each(|d| out.extend(d.to_le_bytes()));
            out.extend(ty.to_le_bytes());
            out.extend(offset.to_le_bytes());
            offset = (offset + data.len() as u64).div_ceil(32) * 32;
        }
        out.resize(out.len().div_ceil(32) * 32, 0);
        for (_, _, _, data) in &self.tensors {
            out.extend(data);
            out.resize(out.len().div_ceil(32) * 32, 0);
        }
        out
    }

    fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, self.bytes()).unwrap();
        p
    }
}

// f16 bit patterns used below: 0x3C00 = 1.0, 0x3800 = 0.5, 0x3400 = 0.25, 0x4000 = 2.0, 0xBC00 = -1.0.
fn h(bits: u16) -> [u8; 2] {
    bits.to_le_bytes()
}

fn deq(ty: GgmlType, block: &[u8]) -> Vec<f32> {
    let mut y = vec![f32::NAN; block.len() / ty.block_bytes() * ty.block_len()];
    dequantize(ty, block, &mut y).unwrap();
    y
}

// ---------------------------------------------------------------------------------------------------------
// Blocks: each built from chosen quants by the layout of ggml-common.h, each value checked against d*q (+m).

#[test]
fn float_types() {
    assert_eq!(deq(GgmlType::F32, &(-1.5f32).to_le_bytes()), [-1.5]);
    // f16: 0x3C00 = 1.0, 0xC000 = -2.0, 0x3555 = 0.333251953125, 0x0001 = 2^-24 (smallest subnormal)
    let f16: Vec<u8> = [0x3C00u16, 0xC000, 0x3555, 0x0001].iter().flat_map(|b| b.to_le_bytes()).collect();
    assert_eq!(deq(GgmlType::F16, &f16), [1.0, -2.0, 0.333_251_95, 5.960_464_5e-8]);
    // bf16: the top half of an f32: 0x3F80 = 1.0, 0xC0A0 = -5.0, 0x4049 = 3.140625
    let bf16: Vec<u8> = [0x3F80u16, 0xC0A0, 0x4049].iter().flat_map(|b| b.to_le_bytes()).collect();
    assert_eq!(deq(GgmlType::BF16, &bf16), [1.0, -5.0, 3.140625]);
}

#[test]
fn q8_0_block() {
    let mut b = h(0x3800).to_vec(); // d = 0.5
    b.extend((0..32).map(|i| (i * 8 - 128) as i8 as u8));
    let y = deq(GgmlType::Q8_0, &b);
    for i in 0..32 {
        assert_eq!(y[i], 0.5 * (i as f32 * 8.0 - 128.0), "value {i}");
    }
    assert_eq!((y[0], y[31]), (-64.0, 60.0));
}

/// qs[j] holds value j in its low nibble and value j+16 in its high nibble: here j and 15-j.
fn nibble_qs() -> Vec<u8> {
    (0..16u8).map(|j| j | ((15 - j) << 4)).collect()
}

#[test]
fn q4_0_and_q4_1_blocks() {
    let mut b = h(0x4000).to_vec(); // d = 2
    b.extend(nibble_qs());
    let y = deq(GgmlType::Q4_0, &b);
    for j in 0..16 {
        assert_eq!(y[j], 2.0 * (j as f32 - 8.0), "value {j}");
        assert_eq!(y[j + 16], 2.0 * (15.0 - j as f32 - 8.0), "value {}", j + 16);
    }
    let mut b = [h(0x3400), h(0xBC00)].concat(); // d = 0.25, m = -1
    b.extend(nibble_qs());
    let y = deq(GgmlType::Q4_1, &b);
    for j in 0..16 {
        assert_eq!(y[j], 0.25 * j as f32 - 1.0);
        assert_eq!(y[j + 16], 0.25 * (15 - j) as f32 - 1.0);
    }
    assert_eq!((y[0], y[16]), (-1.0, 2.75));
}

#[test]
fn q5_0_and_q5_1_blocks() {
    // qh bit i is the fifth bit of value i. With qs[j] = j | j<<4 the low four bits of values j and j+16 are j.
    let qs: Vec<u8> = (0..16u8).map(|j| j | (j << 4)).collect();
    for (qh, fifth) in [(0xFFFF_0000u32, [0, 16]), (0x0000_FFFF, [16, 0])] {
        let mut b = h(0x3C00).to_vec(); // d = 1
        b.extend(qh.to_le_bytes());
        b.extend(&qs);
        let y = deq(GgmlType::Q5_0, &b);
        for j in 0..16 {
            assert_eq!(y[j], (j + fifth[0]) as f32 - 16.0, "qh {qh:#x} value {j}");
            assert_eq!(y[j + 16], (j + fifth[1]) as f32 - 16.0, "qh {qh:#x} value {}", j + 16);
        }
    }
    // Q5_1, d = 0.5, m = 1, only values 0 and 31 have the fifth bit.
    let mut b = [h(0x3800), h(0x3C00)].concat();
    b.extend(0x8000_0001u32.to_le_bytes());
    b.extend(&qs);
    let y = deq(GgmlType::Q5_1, &b);
    assert_eq!(y[0], 0.5 * 16.0 + 1.0);
    assert_eq!(y[31], 0.5 * 31.0 + 1.0);
    for j in 1..16 {
        assert_eq!(y[j], 0.5 * j as f32 + 1.0);
    }
    for j in 16..31 {
        assert_eq!(y[j], 0.5 * (j - 16) as f32 + 1.0);
    }
}

/// K-quant sub-block scales and mins (6 bits each) packed into 12 bytes: bytes 0..4 hold scales 0..4 in their
/// low six bits and the top two bits of scales 4..8 above; bytes 4..8 the same for the mins; bytes 8..12 hold
/// the low four bits of scale 4+i (low nibble) and min 4+i (high nibble).
fn pack_scales(sc: [u8; 8], m: [u8; 8]) -> [u8; 12] {
    let mut s = [0u8; 12];
    for i in 0..4 {
        s[i] = sc[i] | ((sc[i + 4] >> 4) << 6);
        s[i + 4] = m[i] | ((m[i + 4] >> 4) << 6);
        s[i + 8] = (sc[i + 4] & 15) | ((m[i + 4] & 15) << 4);
    }
    s
}

const SC: [u8; 8] = [1, 2, 3, 4, 33, 45, 63, 17];
const MN: [u8; 8] = [0, 5, 10, 20, 40, 50, 60, 3];

/// Four-bit quants of a 256-value K block: sub-blocks 2g and 2g+1 share qs[32g..32g+32], low nibble then high.
fn pack_k_nibbles(q: impl Fn(usize, usize) -> u8) -> Vec<u8> {
    let mut qs = vec![0u8; 128];
    for g in 0..4 {
        for l in 0..32 {
            qs[32 * g + l] = (q(2 * g, l) & 15) | ((q(2 * g + 1, l) & 15) << 4);
        }
    }
    qs
}

#[test]
fn q4_k_block() {
    let q = |s: usize, l: usize| ((l + s) % 16) as u8;
    let mut b = [h(0x3C00), h(0x3800)].concat(); // d = 1, dmin = 0.5
    b.extend(pack_scales(SC, MN));
    b.extend(pack_k_nibbles(q));
    let y = deq(GgmlType::Q4K, &b);
    for s in 0..8 {
        for l in 0..32 {
            let want = SC[s] as f32 * q(s, l) as f32 - 0.5 * MN[s] as f32;
            assert_eq!(y[32 * s + l], want, "sub-block {s} value {l}");
        }
    }
    // By hand: sub-block 4, value 0: q = 4, 33*4 - 0.5*40 = 112; sub-block 6, value 10: q = 0, -0.5*60 = -30;
    // sub-block 7, value 31: q = 38 % 16 = 6, 17*6 - 0.5*3 = 100.5.
    assert_eq!((y[128], y[202], y[255]), (112.0, -30.0, 100.5));
}

#[test]
fn q5_k_block() {
    let q = |s: usize, l: usize| ((l * 3 + s * 5) % 32) as u8;
    let mut b = [h(0x3800), h(0x3C00)].concat(); // d = 0.5, dmin = 1
    b.extend(pack_scales(SC, MN));
    // qh[l] bit s: the fifth bit of value l of sub-block s.
    b.extend((0..32).map(|l| (0..8).map(|s| (q(s, l) >> 4) << s).sum::<u8>()));
    b.extend(pack_k_nibbles(q));
    let y = deq(GgmlType::Q5K, &b);
    for s in 0..8 {
        for l in 0..32 {
            let want = 0.5 * SC[s] as f32 * q(s, l) as f32 - MN[s] as f32;
            assert_eq!(y[32 * s + l], want, "sub-block {s} value {l}");
        }
    }
    // By hand: sub-block 5, value 7: q = (21 + 25) % 32 = 14, 0.5*45*14 - 50 = 265.
    assert_eq!(y[5 * 32 + 7], 265.0);
}

#[test]
fn q6_k_block() {
    let q = |n: usize| ((n * 7) % 64) as i32 - 32; // value n's quant, -32..=31
    let sc: [i8; 16] = [1, -2, 3, -4, 5, -6, 7, -8, 9, -10, 11, -12, 13, -14, 127, -128];
    // Per 128-value half: value 32k+l stores its low four bits in ql[l + 32*(k%2)] (low nibble for k < 2, high
    // nibble for k >= 2) and its top two bits at bits 2k of qh[l].
    let (mut ql, mut qh) = (vec![0u8; 128], vec![0u8; 64]);
    for n in 0..256 {
        let (half, k, l) = (n / 128, (n % 128) / 32, n % 32);
        let u = (q(n) + 32) as u8;
        ql[64 * half + l + 32 * (k % 2)] |= (u & 15) << (4 * (k / 2));
        qh[32 * half + l] |= (u >> 4) << (2 * k);
    }
    let mut b = [ql, qh].concat();
    b.extend(sc.iter().map(|&s| s as u8));
    b.extend(h(0x3400)); // d = 0.25
    let y = deq(GgmlType::Q6K, &b);
    for n in 0..256 {
        assert_eq!(y[n], 0.25 * sc[n / 16] as f32 * q(n) as f32, "value {n}");
    }
    // By hand: value 0: q = -32, scale 1: -8; value 255: q = 1785 % 64 - 32 = 25, scale -128: -800.
    assert_eq!((y[0], y[255]), (-8.0, -800.0));
}

#[test]
fn block_size_mismatch_is_an_error() {
    let mut y = vec![0.0; 32];
    let e = dequantize(GgmlType::Q8_0, &[0u8; 33], &mut y).unwrap_err();
    assert!(e.to_string().contains("Q8_0"), "{e}");
}

// ---------------------------------------------------------------------------------------------------------
// Names and the rotary permutation.

#[test]
fn llama_cpp_names_map_to_hf_names() {
    for (g, hf) in [
        ("token_embd.weight", "model.embed_tokens.weight"),
        ("output_norm.weight", "model.norm.weight"),
        ("output.weight", "lm_head.weight"),
        ("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight"),
        ("blk.11.attn_q.bias", "model.layers.11.self_attn.q_proj.bias"),
        ("blk.2.attn_k.weight", "model.layers.2.self_attn.k_proj.weight"),
        ("blk.2.attn_v.bias", "model.layers.2.self_attn.v_proj.bias"),
        ("blk.3.attn_output.weight", "model.layers.3.self_attn.o_proj.weight"),
        ("blk.4.attn_q_norm.weight", "model.layers.4.self_attn.q_norm.weight"),
        ("blk.4.attn_k_norm.weight", "model.layers.4.self_attn.k_norm.weight"),
        ("blk.5.ffn_gate.weight", "model.layers.5.mlp.gate_proj.weight"),
        ("blk.5.ffn_up.weight", "model.layers.5.mlp.up_proj.weight"),
        ("blk.5.ffn_down.weight", "model.layers.5.mlp.down_proj.weight"),
        ("blk.6.attn_norm.weight", "model.layers.6.input_layernorm.weight"),
        ("blk.6.ffn_norm.weight", "model.layers.6.post_attention_layernorm.weight"),
    ] {
        assert_eq!(names::hf_name(g).unwrap(), hf);
    }
    for bad in ["blk.x.attn_q.weight", "blk.0.attn_qkv.weight", "token_embd", "blk.0.ffn_gate_exps.weight"] {
        let e = names::hf_name(bad).unwrap_err().to_string();
        assert!(e.contains(bad), "{e}");
    }
}

/// llama.cpp's converter: HF row (head h, half t, i) is stored at row (h, i, t), i.e.
/// reshape(heads, 2, d/2, cols).swapaxes(1, 2); written here as the forward map.
fn gguf_row_of_hf_row(r: usize, rows: usize, heads: usize) -> usize {
    let d = rows / heads;
    let (hh, t, i) = (r / d, (r % d) / (d / 2), r % (d / 2));
    hh * d + i * 2 + t
}

#[test]
fn source_row_inverts_the_converters_permutation() {
    for (rows, heads) in [(8, 1), (24, 3), (64, 4), (576, 9)] {
        let mut hit = vec![false; rows];
        for r in 0..rows {
            let s = names::source_row(r, rows, heads);
            assert_eq!(s, gguf_row_of_hf_row(r, rows, heads), "rows {rows} heads {heads} row {r}");
            hit[s] = true;
        }
        assert!(hit.iter().all(|&x| x), "a permutation");
    }
    // By hand, one head of 8 rows: HF rows 0..8 are (t=0: i 0..4, t=1: i 0..4) -> stored at 0,2,4,6,1,3,5,7.
    let src: Vec<usize> = (0..8).map(|r| names::source_row(r, 8, 1)).collect();
    assert_eq!(src, [0, 2, 4, 6, 1, 3, 5, 7]);
}

// ---------------------------------------------------------------------------------------------------------
// Whole files.

/// GPT-2's byte-to-character table: printable bytes stand for themselves, the others for U+0100.. in order.
fn byte_chars() -> Vec<char> {
    let mut extra = 0;
    (0..=255u8)
        .map(|b| {
            if (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b) {
                char::from(b)
            } else {
                extra += 1;
                char::from_u32(255 + extra).unwrap()
            }
        })
        .collect()
}

const HELLO: u32 = 259;
const SPACE_W: u32 = 260;
const ENDOFTEXT: u32 = 261;
const IM_START: u32 = 262;
const TWELVE: u32 = 264;
const VOCAB: usize = 265;

/// Ids 0..256 the bytes, then merged tokens, two control tokens and a user-defined one.
fn vocab(g: Gguf, pre: &str) -> Gguf {
    let mut tokens: Vec<String> = byte_chars().iter().map(|c| c.to_string()).collect();
    tokens.extend(["he", "ll", "hell", "hello", "\u{120}w", "<|endoftext|>", "<|im_start|>", "<tool>", "12"].map(String::from));
    assert_eq!(tokens.len(), VOCAB);
    let mut types = vec![1; VOCAB];
    types[ENDOFTEXT as usize] = 3;
    types[IM_START as usize] = 3;
    types[263] = 4;
    let merges: Vec<String> = ["h e", "l l", "he ll", "hell o", "\u{120} w", "1 2"].map(String::from).to_vec();
    g.str("tokenizer.ggml.model", "gpt2")
        .str("tokenizer.ggml.pre", pre)
        .strs("tokenizer.ggml.tokens", &tokens)
        .i32s("tokenizer.ggml.token_type", &types)
        .strs("tokenizer.ggml.merges", &merges)
        .u32("tokenizer.ggml.bos_token_id", ENDOFTEXT)
        .u32("tokenizer.ggml.eos_token_id", IM_START)
        .bool("tokenizer.ggml.add_bos_token", false)
        .str("tokenizer.chat_template", "{% for m in messages %}{{ m.content }}{% endfor %}")
}

/// A deterministic byte stream (splitmix-style), for quantized payloads.
fn noise(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            (z ^ (z >> 27)) as u8
        })
        .collect()
}

/// `rows` rows of `cols` values in `ty`, random quants with sane f16 scales (0x3000 = 0.125) in every block.
fn quantized(ty: GgmlType, cols: usize, rows: usize, seed: u64) -> Vec<u8> {
    let blocks = cols * rows / ty.block_len();
    let mut data = noise(seed, blocks * ty.block_bytes());
    let halves: &[usize] = match ty {
        GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q5_0 => &[0],
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4K | GgmlType::Q5K => &[0, 2],
        GgmlType::Q6K => &[208],
        GgmlType::F16 | GgmlType::BF16 => {
            // Every value a small number: 0x3000.. (f16) / 0x3E00.. (bf16) plus noise in the low mantissa.
            let top = if ty == GgmlType::F16 { 0x30u8 } else { 0x3E };
            data.chunks_exact_mut(2).for_each(|c| c[1] = top | (c[1] & 0x83));
            return data;
        }
        GgmlType::F32 => return (0..cols * rows).flat_map(|i| (i as f32 * 0.001 - 0.5).to_le_bytes()).collect(),
    };
    for block in data.chunks_exact_mut(ty.block_bytes()) {
        for &at in halves {
            block[at..at + 2].copy_from_slice(&h(0x3000));
        }
    }
    data
}

fn f32s(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

const HIDDEN: usize = 256;
const FFN: usize = 512;
const HEADS: usize = 2;
const KV_HEADS: usize = 1;

/// A one-layer model of `arch` with a different tensor type for each weight.
fn tiny_model(arch: &str, pre: &str, tied: bool) -> (Gguf, Vec<(&'static str, GgmlType, usize, usize)>) {
    let head_dim = HIDDEN / HEADS;
    // (gguf name, type, cols = ne[0], rows = ne[1] (0 for a 1-D tensor))
    let mut t: Vec<(&'static str, GgmlType, usize, usize)> = vec![
        ("token_embd.weight", GgmlType::F16, HIDDEN, VOCAB),
        ("blk.0.attn_norm.weight", GgmlType::F32, HIDDEN, 0),
        ("blk.0.attn_q.weight", GgmlType::Q4K, HIDDEN, HIDDEN),
        ("blk.0.attn_k.weight", GgmlType::Q5K, HIDDEN, KV_HEADS * head_dim),
        ("blk.0.attn_v.weight", GgmlType::Q6K, HIDDEN, KV_HEADS * head_dim),
        ("blk.0.attn_output.weight", GgmlType::Q8_0, HIDDEN, HIDDEN),
        ("blk.0.ffn_gate.weight", GgmlType::Q4_0, HIDDEN, FFN),
        ("blk.0.ffn_up.weight", GgmlType::Q4_1, HIDDEN, FFN),
        ("blk.0.ffn_down.weight", GgmlType::Q5_0, FFN, HIDDEN),
        ("blk.0.ffn_norm.weight", GgmlType::BF16, HIDDEN, 0),
        ("output_norm.weight", GgmlType::F32, HIDDEN, 0),
    ];
    if arch == "qwen3" {
        t.push(("blk.0.attn_q_norm.weight", GgmlType::F32, head_dim, 0));
        t.push(("blk.0.attn_k_norm.weight", GgmlType::F32, head_dim, 0));
    }
    if arch == "qwen2" {
        t.push(("blk.0.attn_q.bias", GgmlType::F32, HIDDEN, 0));
    }
    if !tied {
        t.push(("output.weight", GgmlType::Q5_1, HIDDEN, VOCAB));
    }
    let mut g = Gguf::new()
        .str("general.architecture", arch)
        .str("general.name", "tiny test model")
        .u32(&format!("{arch}.block_count"), 1)
        .u32(&format!("{arch}.context_length"), 2048)
        .u32(&format!("{arch}.embedding_length"), HIDDEN as u32)
        .u32(&format!("{arch}.feed_forward_length"), FFN as u32)
        .u32(&format!("{arch}.attention.head_count"), HEADS as u32)
        .u32(&format!("{arch}.attention.head_count_kv"), KV_HEADS as u32)
        .f32(&format!("{arch}.rope.freq_base"), 500000.0)
        .f32(&format!("{arch}.attention.layer_norm_rms_epsilon"), 1e-5);
    g = vocab(g, pre);
    for (i, &(name, ty, cols, rows)) in t.iter().enumerate() {
        let dims: Vec<u64> = if rows == 0 { vec![cols as u64] } else { vec![cols as u64, rows as u64] };
        g = g.tensor(name, &dims, ty.id(), quantized(ty, cols, rows.max(1), i as u64 + 1));
    }
    (g, t)
}

fn read_json(p: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).unwrap()
}

/// Every tensor of a safetensors file as (shape, f32 values).
fn read_safetensors(p: &Path) -> std::collections::BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(p).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, v)| {
            let values = match v.dtype() {
                safetensors::Dtype::F32 => v.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(),
                safetensors::Dtype::BF16 => v.data().chunks_exact(2).map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16)).collect(),
                other => panic!("{name}: dtype {other:?}"),
            };
            (name, (v.shape().to_vec(), values))
        })
        .collect()
}

fn f32_opts() -> Options {
    Options { dtype: OutDtype::F32, ..Default::default() }
}

#[test]
fn llama_import_writes_an_hf_folder() {
    let dir = tempfile::tempdir().unwrap();
    let (g, spec) = tiny_model("llama", "llama-bpe", false);
    let file = g.write(dir.path(), "tiny.gguf");
    let out = dir.path().join("hf");
    let report = import_gguf(&file, &out, &f32_opts()).unwrap();
    assert_eq!(report.architecture, "llama");
    assert_eq!(report.tensors, spec.len());
    assert_eq!(report.types.get("Q4_K"), Some(&1));
    assert!(!report.tied_embeddings);
    let mut files: Vec<String> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    files.sort();
    assert_eq!(files, ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]);
    assert!(std::fs::read_dir(dir.path()).unwrap().all(|e| !e.unwrap().file_name().to_string_lossy().starts_with('.')), "no temporary folder left");

    // config.json in transformers' LlamaConfig terms.
    let c = read_json(&out.join("config.json"));
    assert_eq!(c["architectures"], serde_json::json!(["LlamaForCausalLM"]));
    assert_eq!(c["model_type"], "llama");
    assert_eq!(c["hidden_size"], HIDDEN);
    assert_eq!(c["intermediate_size"], FFN);
    assert_eq!(c["num_hidden_layers"], 1);
    assert_eq!(c["num_attention_heads"], HEADS);
    assert_eq!(c["num_key_value_heads"], KV_HEADS);
    assert_eq!(c["head_dim"], HIDDEN / HEADS);
    assert_eq!(c["rms_norm_eps"], 1e-5, "the f32 1e-5 written as 1e-5, not 9.99999974e-6");
    assert_eq!(c["rope_theta"], 500000.0);
    assert_eq!(c["max_position_embeddings"], 2048);
    assert_eq!(c["vocab_size"], VOCAB);
    assert_eq!(c["tie_word_embeddings"], false);
    assert_eq!(c["bos_token_id"], ENDOFTEXT);
    assert_eq!(c["eos_token_id"], IM_START);
    assert_eq!(c["torch_dtype"], "float32");
    assert_eq!(c["rope_scaling"], Value::Null);
    assert_eq!(read_json(&out.join("generation_config.json"))["eos_token_id"], IM_START);
    let tc = read_json(&out.join("tokenizer_config.json"));
    assert_eq!(tc["eos_token"], "<|im_start|>");
    assert_eq!(tc["chat_template"], "{% for m in messages %}{{ m.content }}{% endfor %}");

    // Tensors: HF names, reversed dims, values as the blocks dequantize, q/k rows back in HF's order.
    let st = read_safetensors(&out.join("model.safetensors"));
    assert_eq!(st.len(), spec.len());
    let bytes = g.bytes();
    let gf = lorahost::import::gguf::GgufFile::open(&file).unwrap();
    for (name, ty, cols, rows) in &spec {
        let info = gf.tensors.iter().find(|t| t.name == *name).unwrap();
        assert_eq!(info.ty, *ty);
        let nrows = (*rows).max(1);
        let mut flat = vec![0.0; cols * nrows];
        dequantize(*ty, &bytes[info.start as usize..(info.start + info.len) as usize], &mut flat).unwrap();
        let (shape, got) = &st[&names::hf_name(name).unwrap()];
        let want_shape = if *rows == 0 { vec![*cols] } else { vec![*rows, *cols] };
        assert_eq!(shape, &want_shape, "{name}");
        let heads = match *name {
            "blk.0.attn_q.weight" => Some(HEADS),
            "blk.0.attn_k.weight" => Some(KV_HEADS),
            _ => None,
        };
        for r in 0..nrows {
            let src = heads.map_or(r, |hd| gguf_row_of_hf_row(r, *rows, hd));
            assert_eq!(&got[r * cols..(r + 1) * cols], &flat[src * cols..(src + 1) * cols], "{name} row {r}");
        }
        if heads.is_some() {
            assert_ne!(got, &flat, "{name}: rows were reordered");
        }
    }
}

#[test]
fn llama_q_and_k_round_trip_through_the_converters_permutation() {
    // HF weights with every value naming its row and column, permuted as llama.cpp's converter does, stored as
    // F32, imported: the HF layout comes back exactly. Also a q bias.
    let dir = tempfile::tempdir().unwrap();
    let head_dim = HIDDEN / HEADS;
    let hf = |rows: usize| -> Vec<f32> { (0..rows * HIDDEN).map(|i| (i / HIDDEN) as f32 * 1000.0 + (i % HIDDEN) as f32).collect() };
    let permute = |w: &[f32], rows: usize, cols: usize, heads: usize| -> Vec<f32> {
        let mut out = vec![0.0; rows * cols];
        for r in 0..rows {
            let g = gguf_row_of_hf_row(r, rows, heads);
            out[g * cols..(g + 1) * cols].copy_from_slice(&w[r * cols..(r + 1) * cols]);
        }
        out
    };
    let (q, k) = (hf(HIDDEN), hf(KV_HEADS * head_dim));
    let bias: Vec<f32> = (0..HIDDEN).map(|i| i as f32).collect();
    let (mut g, _) = tiny_model("llama", "llama-bpe", true);
    for (name, data) in [
        ("blk.0.attn_q.weight", permute(&q, HIDDEN, HIDDEN, HEADS)),
        ("blk.0.attn_k.weight", permute(&k, KV_HEADS * head_dim, HIDDEN, KV_HEADS)),
        ("blk.0.attn_q.bias", permute(&bias, HIDDEN, 1, HEADS)),
    ] {
        g.tensors.retain(|t| t.0 != name);
        let dims = if name.ends_with("bias") { vec![HIDDEN as u64] } else { vec![HIDDEN as u64, (data.len() / HIDDEN) as u64] };
        g = g.tensor(name, &dims, 0, f32s(&data));
    }
    let file = g.write(dir.path(), "perm.gguf");
    let report = import_gguf(&file, &dir.path().join("hf"), &f32_opts()).unwrap();
    assert!(report.tied_embeddings);
    let st = read_safetensors(&dir.path().join("hf/model.safetensors"));
    assert_eq!(st["model.layers.0.self_attn.q_proj.weight"].1, q);
    assert_eq!(st["model.layers.0.self_attn.k_proj.weight"].1, k);
    assert_eq!(st["model.layers.0.self_attn.q_proj.bias"].1, bias);
    assert!(!st.contains_key("lm_head.weight"), "tied: no lm_head");
    assert_eq!(read_json(&dir.path().join("hf/config.json"))["tie_word_embeddings"], true);
}

#[test]
fn qwen_models_keep_their_row_order_and_config() {
    for arch in ["qwen2", "qwen3"] {
        let dir = tempfile::tempdir().unwrap();
        let (g, _) = tiny_model(arch, "qwen2", true);
        let file = g.write(dir.path(), "q.gguf");
        let out = dir.path().join("hf");
        import_gguf(&file, &out, &Options::default()).unwrap();
        let c = read_json(&out.join("config.json"));
        let class = if arch == "qwen2" { "Qwen2ForCausalLM" } else { "Qwen3ForCausalLM" };
        assert_eq!(c["architectures"][0], class);
        assert_eq!(c["model_type"], arch);
        assert_eq!(c["torch_dtype"], "bfloat16");
        assert_eq!(c["tie_word_embeddings"], true);
        assert_eq!(c["head_dim"].is_null(), arch == "qwen2", "qwen3 names head_dim");
        let st = read_safetensors(&out.join("model.safetensors"));
        // bf16 of the Q4_K q_proj, row order as stored.
        let gf = lorahost::import::gguf::GgufFile::open(&file).unwrap();
        let info = gf.tensors.iter().find(|t| t.name == "blk.0.attn_q.weight").unwrap();
        let mut flat = vec![0.0; HIDDEN * HIDDEN];
        dequantize(info.ty, gf.data(info), &mut flat).unwrap();
        let (_, got) = &st["model.layers.0.self_attn.q_proj.weight"];
        for (a, b) in got.iter().zip(&flat) {
            assert!((a - b).abs() <= b.abs() / 256.0, "bf16 of {b} is {a}");
        }
        if arch == "qwen3" {
            assert!(st.contains_key("model.layers.0.self_attn.q_norm.weight"));
            assert!(st.contains_key("model.layers.0.self_attn.k_norm.weight"));
        } else {
            assert!(st.contains_key("model.layers.0.self_attn.q_proj.bias"));
        }
    }
}

#[test]
fn large_models_are_sharded_with_an_index() {
    let dir = tempfile::tempdir().unwrap();
    let (g, spec) = tiny_model("qwen2", "qwen2", false);
    let file = g.write(dir.path(), "q.gguf");
    let out = dir.path().join("hf");
    import_gguf(&file, &out, &Options { shard_bytes: 300_000, ..Default::default() }).unwrap();
    let index = read_json(&out.join("model.safetensors.index.json"));
    let map = index["weight_map"].as_object().unwrap();
    assert_eq!(map.len(), spec.len());
    let shards: std::collections::BTreeSet<&str> = map.values().map(|v| v.as_str().unwrap()).collect();
    assert!(shards.len() > 1, "{shards:?}");
    let n = shards.len();
    let mut total = 0;
    for (i, shard) in shards.iter().enumerate() {
        assert_eq!(*shard, format!("model-{:05}-of-{n:05}.safetensors", i + 1));
        let st = read_safetensors(&out.join(shard));
        for (name, (shape, _)) in &st {
            assert_eq!(map[name], *shard);
            total += shape.iter().product::<usize>() * 2;
        }
    }
    assert_eq!(index["metadata"]["total_size"], total);
    assert!(!out.join("model.safetensors").exists());
}

#[test]
fn tokenizer_json_loads_and_encodes_like_the_bpe() {
    let dir = tempfile::tempdir().unwrap();
    for pre in ["qwen2", "llama-bpe", "smollm"] {
        let (g, _) = tiny_model("llama", pre, true);
        let file = g.write(dir.path(), &format!("{pre}.gguf"));
        let out = dir.path().join(pre);
        import_gguf(&file, &out, &Options::default()).unwrap();
        let path = out.join("tokenizer.json");
        let hf = tokenizers::Tokenizer::from_file(&path).unwrap();
        // "hello" merges h e, l l, he ll, hell o; " world" starts with the "Ġ w" merge, then bytes.
        let ids = hf.encode("hello world", false).unwrap().get_ids().to_vec();
        assert_eq!(ids, [HELLO, SPACE_W, b'o' as u32, b'r' as u32, b'l' as u32, b'd' as u32], "{pre}");
        // Control tokens are added tokens with their GGUF ids.
        let ids = hf.encode("<|im_start|>hello<|endoftext|>", false).unwrap().get_ids().to_vec();
        assert_eq!(ids, [IM_START, HELLO, ENDOFTEXT], "{pre}");
        assert_eq!(hf.get_vocab_size(true), VOCAB);
        // Numbers: Qwen2 and SmolLM split single digits, Llama 3 keeps up to three together (so "1 2" merges).
        let ids = hf.encode("x 12", false).unwrap().get_ids().to_vec();
        let twelve = if pre == "llama-bpe" { vec![TWELVE] } else { vec![b'1' as u32, b'2' as u32] };
        assert_eq!(ids, [vec![b'x' as u32, b' ' as u32], twelve].concat(), "{pre}"); // the space byte is id 32 ("\u{120}")

        // lorahost's own loader: probes a round trip, never yields a control token from text.
        let tok = HfTokenizer::from_file(&path).unwrap();
        for text in ["hello world", "caf\u{e9} \u{4e2d}\u{6587} 123\r\n\tx", "<|im_start|>hello"] {
            let mut ids = Vec::new();
            tok.encode_ordinary(text, &mut ids);
            assert_eq!(tok.decode(&ids), text, "{pre}");
            assert!(!ids.contains(&IM_START), "{pre}: {ids:?}");
        }
        assert_eq!(tok.special_id("<|im_start|>"), Some(IM_START));
        assert_eq!(tok.vocab_size(), VOCAB);
    }
}

// ---------------------------------------------------------------------------------------------------------
// Errors name the file, the tensor or key, and what to do.

/// The error of importing `g` (written as `name`); checks that nothing was left behind.
fn import_err(g: &Gguf, name: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let file = g.write(dir.path(), name);
    let out = dir.path().join("out");
    let e = format!("{:#}", import_gguf(&file, &out, &Options::default()).unwrap_err());
    assert!(!out.exists(), "nothing written on error: {e}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary folder left: {e}");
    assert!(e.contains(name), "the error names the file: {e}");
    e
}

#[test]
fn bad_magic_truncation_and_unknown_types_are_named() {
    let (g, _) = tiny_model("llama", "smollm", true);
    let mut bad = g.bytes();
    bad[..4].copy_from_slice(b"GGML");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("magic.gguf"), &bad).unwrap();
    let e = format!("{:#}", import_gguf(&dir.path().join("magic.gguf"), &dir.path().join("o"), &Options::default()).unwrap_err());
    assert!(e.contains("magic.gguf") && e.contains("magic"), "{e}");

    // Cut inside the last tensor's data: the error names it.
    let whole = g.bytes();
    std::fs::write(dir.path().join("cut.gguf"), &whole[..whole.len() - 100]).unwrap();
    let e = format!("{:#}", import_gguf(&dir.path().join("cut.gguf"), &dir.path().join("o"), &Options::default()).unwrap_err());
    let last = &g.tensors.last().unwrap().0;
    assert!(e.contains("cut.gguf") && e.contains("truncated") && e.contains(last.as_str()), "{e}");
    // Cut inside the metadata.
    std::fs::write(dir.path().join("short.gguf"), &whole[..200]).unwrap();
    let e = format!("{:#}", import_gguf(&dir.path().join("short.gguf"), &dir.path().join("o"), &Options::default()).unwrap_err());
    assert!(e.contains("short.gguf") && e.contains("truncated"), "{e}");

    // Q2_K (type 10) is a ggml type this importer does not convert.
    let g2 = tiny_model("llama", "smollm", true).0.tensor("blk.0.extra.weight", &[256, 1], 10, vec![0; 84]);
    let e = import_err(&g2, "q2k.gguf");
    assert!(e.contains("blk.0.extra.weight") && e.contains("Q2_K") && e.contains("not supported"), "{e}");

    let mut g3 = tiny_model("llama", "smollm", true).0;
    g3.version = 1;
    let e = import_err(&g3, "v1.gguf");
    assert!(e.contains("version 1"), "{e}");
}

#[test]
fn unsupported_models_and_vocabularies_are_refused_by_key() {
    let e = import_err(&vocab(Gguf::new().str("general.architecture", "gemma2"), "qwen2"), "gemma.gguf");
    assert!(e.contains("general.architecture") && e.contains("gemma2") && e.contains("qwen3"), "{e}");

    let (g, _) = tiny_model("llama", "falcon", true);
    let e = import_err(&g, "pre.gguf");
    assert!(e.contains("tokenizer.ggml.pre") && e.contains("falcon") && e.contains("llama-bpe"), "{e}");

    let (mut g, _) = tiny_model("llama", "smollm", true);
    g.tensors.retain(|t| t.0 != "blk.0.attn_q.weight");
    g = g.tensor("blk.0.attn_qkv.weight", &[256, 2], 0, vec![0; 2048]);
    let e = import_err(&g, "fused.gguf");
    assert!(e.contains("blk.0.attn_qkv.weight"), "{e}");
}

#[test]
fn a_non_empty_output_folder_is_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (g, _) = tiny_model("llama", "smollm", true);
    let file = g.write(dir.path(), "m.gguf");
    let out = dir.path().join("mine");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("notes.txt"), "keep me").unwrap();
    let e = import_gguf(&file, &out, &Options::default()).unwrap_err().to_string();
    assert!(e.contains("mine") && e.contains("not an empty folder"), "{e}");
    assert_eq!(std::fs::read_to_string(out.join("notes.txt")).unwrap(), "keep me");
    // An empty folder is fine.
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    import_gguf(&file, &empty, &Options::default()).unwrap();
    assert!(empty.join("config.json").is_file());
}

#[test]
fn llama3_rope_scaling_is_recovered_from_rope_freqs() {
    // The divisors llama.cpp's converter writes for Llama 3.1 (factor 8, low 1, high 4, original 8192, theta
    // 500000, head_dim 128), computed here from that definition.
    let (theta, dim) = (500000.0f64, 128usize);
    let freqs: Vec<f32> = (0..dim / 2)
        .map(|i| {
            let wavelen = 2.0 * std::f64::consts::PI * theta.powf((2 * i) as f64 / dim as f64);
            let (lo_wl, hi_wl) = (8192.0, 8192.0 / 4.0);
            if wavelen < hi_wl {
                1.0
            } else if wavelen > lo_wl {
                8.0
            } else {
                let smooth = (8192.0 / wavelen - 1.0) / 3.0;
                (1.0 / ((1.0 - smooth) / 8.0 + smooth)) as f32
            }
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let (g, _) = tiny_model("llama", "llama-bpe", true);
    let file = g.tensor("rope_freqs.weight", &[64], 0, f32s(&freqs)).write(dir.path(), "l3.gguf");
    import_gguf(&file, &dir.path().join("hf"), &Options::default()).unwrap();
    let c = read_json(&dir.path().join("hf/config.json"));
    assert_eq!(c["rope_scaling"], serde_json::json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}));
    assert!(!read_safetensors(&dir.path().join("hf/model.safetensors")).contains_key("rope_freqs.weight"));

    // Divisors that are not Llama 3's: refused, naming the tensor.
    let mut odd = freqs.clone();
    odd[5] *= 1.5; // a high-frequency divisor (1.0) changed
    let (g, _) = tiny_model("llama", "llama-bpe", true);
    let e = import_err(&g.tensor("rope_freqs.weight", &[64], 0, f32s(&odd)), "odd.gguf");
    assert!(e.contains("rope_freqs.weight[5]"), "{e}");
}

#[test]
fn the_cli_imports_and_reports() {
    let dir = tempfile::tempdir().unwrap();
    let file = tiny_model("qwen3", "qwen2", true).0.write(dir.path(), "cli.gguf");
    let run = |args: &[&str]| std::process::Command::new(env!("CARGO_BIN_EXE_lorahost")).args(args).output().unwrap();
    let out = dir.path().join("hf");
    let o = run(&["import", "gguf", file.to_str().unwrap(), out.to_str().unwrap(), "--dtype", "f32"]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{stdout}{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout.contains("qwen3") && stdout.contains("Q4_K x1") && stdout.contains("tied embeddings"), "{stdout}");
    assert_eq!(read_json(&out.join("config.json"))["torch_dtype"], "float32");
    let o = run(&["import", "gguf", file.to_str().unwrap(), dir.path().join("x").to_str().unwrap(), "--dtype", "f16"]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && stderr.contains("--dtype") && stderr.contains("bf16 or f32"), "{stderr}");
}
