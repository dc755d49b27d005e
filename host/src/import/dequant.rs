//! ggml tensor types and their conversion to f32.
//!
//! Block layouts follow ggml's `ggml-common.h` (all fields little-endian, `half` = IEEE f16):
//! - Q8_0 (32 values): `half d; i8 q[32]`; x = d*q.
//! - Q4_0 (32): `half d; u8 qs[16]`; value j < 16 is the low nibble of qs[j], value j+16 its high nibble;
//!   x = d*(q-8).
//! - Q4_1 (32): `half d, m; u8 qs[16]`; nibbles as Q4_0; x = d*q + m.
//! - Q5_0 (32): `half d; u32 qh; u8 qs[16]`; the nibbles of Q4_0 plus bit j of qh as the fifth bit of
//!   value j; x = d*(q-16). Q5_1 (32): `half d, m; u32 qh; u8 qs[16]`; x = d*q + m.
//! - Q4_K (256): `half d, dmin; u8 scales[12]; u8 qs[128]`: eight sub-blocks of 32 with a 6-bit scale and a
//!   6-bit min each (packing in [`scale_min_k4`]); each 32 bytes of qs hold two sub-blocks (low nibbles, then
//!   high nibbles); x = d*scale*q - dmin*min.
//! - Q5_K (256): `half d, dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]`: Q4_K plus a fifth bit: sub-block s
//!   takes bit s of qh[l] for its value l.
//! - Q6_K (256): `u8 ql[128]; u8 qh[64]; i8 scales[16]; half d`: per 128 values, 64 bytes of ql (low nibbles)
//!   and 32 of qh (two bits for each of four values), sixteen sub-blocks of 16 with a signed 8-bit scale;
//!   x = d*scale*(q-32).
use anyhow::{bail, Result};
use half::{bf16, f16};

/// The ggml types this importer converts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
}

/// ggml's type ids and names (ggml.h `enum ggml_type`), for the ones read and for naming the others in errors.
const NAMES: &[(u32, &str)] = &[
    (0, "F32"),
    (1, "F16"),
    (2, "Q4_0"),
    (3, "Q4_1"),
    (6, "Q5_0"),
    (7, "Q5_1"),
    (8, "Q8_0"),
    (9, "Q8_1"),
    (10, "Q2_K"),
    (11, "Q3_K"),
    (12, "Q4_K"),
    (13, "Q5_K"),
    (14, "Q6_K"),
    (15, "Q8_K"),
    (16, "IQ2_XXS"),
    (17, "IQ2_XS"),
    (18, "IQ3_XXS"),
    (19, "IQ1_S"),
    (20, "IQ4_NL"),
    (21, "IQ3_S"),
    (22, "IQ2_S"),
    (23, "IQ4_XS"),
    (24, "I8"),
    (25, "I16"),
    (26, "I32"),
    (27, "I64"),
    (28, "F64"),
    (29, "IQ1_M"),
    (30, "BF16"),
    (34, "TQ1_0"),
    (35, "TQ2_0"),
    (39, "MXFP4"),
];

impl GgmlType {
    pub const SUPPORTED: [GgmlType; 11] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
    ];

    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q4K => 12,
            GgmlType::Q5K => 13,
            GgmlType::Q6K => 14,
            GgmlType::BF16 => 30,
        }
    }

    pub fn from_id(id: u32) -> Option<GgmlType> {
        GgmlType::SUPPORTED.into_iter().find(|t| t.id() == id)
    }

    /// ggml's name of a type id, or "unknown".
    pub fn name_of(id: u32) -> &'static str {
        NAMES.iter().find(|(i, _)| *i == id).map_or("unknown", |(_, n)| n)
    }

    pub fn name(self) -> &'static str {
        GgmlType::name_of(self.id())
    }

    /// Values per block.
    pub fn block_len(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => 32,
            GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K => 256,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => 2 + 16,
            GgmlType::Q4_1 => 2 + 2 + 16,
            GgmlType::Q5_0 => 2 + 4 + 16,
            GgmlType::Q5_1 => 2 + 2 + 4 + 16,
            GgmlType::Q8_0 => 2 + 32,
            GgmlType::Q4K => 2 + 2 + 12 + 128,
            GgmlType::Q5K => 2 + 2 + 12 + 32 + 128,
            GgmlType::Q6K => 128 + 64 + 16 + 2,
        }
    }

    /// Bytes holding `n` values; None when `n` is not a whole number of blocks (or overflows).
    pub fn byte_len(self, n: u64) -> Option<u64> {
        let b = self.block_len() as u64;
        (n % b == 0).then(|| (n / b).checked_mul(self.block_bytes() as u64)).flatten()
    }
}

/// Converts whole blocks: `src` holds exactly `out.len() / block_len` blocks of `ty`.
pub fn dequantize(ty: GgmlType, src: &[u8], out: &mut [f32]) -> Result<()> {
    let (bl, bb) = (ty.block_len(), ty.block_bytes());
    if out.len() % bl != 0 || src.len() != out.len() / bl * bb {
        bail!("{}: {} bytes for {} values (blocks of {bl} values in {bb} bytes)", ty.name(), src.len(), out.len());
    }
    let blocks = src.chunks_exact(bb).zip(out.chunks_exact_mut(bl));
    match ty {
        GgmlType::F32 => blocks.for_each(|(b, y)| y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        GgmlType::F16 => blocks.for_each(|(b, y)| y[0] = half_at(b, 0)),
        GgmlType::BF16 => blocks.for_each(|(b, y)| y[0] = bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()),
        GgmlType::Q8_0 => blocks.for_each(|(b, y)| {
            let d = half_at(b, 0);
            for (y, &q) in y.iter_mut().zip(&b[2..34]) {
                *y = d * f32::from(q as i8);
            }
        }),
        GgmlType::Q4_0 => blocks.for_each(|(b, y)| nibbles(&b[2..18], 0, y, half_at(b, 0), -8.0 * half_at(b, 0))),
        GgmlType::Q4_1 => blocks.for_each(|(b, y)| nibbles(&b[4..20], 0, y, half_at(b, 0), half_at(b, 2))),
        GgmlType::Q5_0 => blocks.for_each(|(b, y)| {
            let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
            nibbles(&b[6..22], qh, y, half_at(b, 0), -16.0 * half_at(b, 0))
        }),
        GgmlType::Q5_1 => blocks.for_each(|(b, y)| {
            let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
            nibbles(&b[8..24], qh, y, half_at(b, 0), half_at(b, 2))
        }),
        GgmlType::Q4K => blocks.for_each(|(b, y)| k_quant(b, None, &b[16..144], y)),
        GgmlType::Q5K => blocks.for_each(|(b, y)| k_quant(b, Some(&b[16..48]), &b[48..176], y)),
        GgmlType::Q6K => blocks.for_each(|(b, y)| q6_k(b, y)),
    }
    Ok(())
}

/// The f16 at byte `at`.
fn half_at(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

/// The 32-value blocks: value j < 16 from the low nibble of qs[j], value j+16 from its high nibble, bit j of
/// `qh` as a fifth bit (zero for the 4-bit types); x = scale*q + offset.
fn nibbles(qs: &[u8], qh: u32, y: &mut [f32], scale: f32, offset: f32) {
    for (j, &byte) in qs.iter().enumerate() {
        let lo = u32::from(byte & 0x0F) | ((qh >> j) & 1) << 4;
        let hi = u32::from(byte >> 4) | ((qh >> (j + 16)) & 1) << 4;
        y[j] = scale * lo as f32 + offset;
        y[j + 16] = scale * hi as f32 + offset;
    }
}

/// Scale and min of sub-block `j` (0..8) from the 12 packed bytes: sub-blocks 0..4 keep theirs in the low six
/// bits of bytes j and j+4; sub-blocks 4..8 have their low four bits in the nibbles of byte j+4 and their
/// top two bits in the spare top bits of bytes j-4 (scale) and j (min).
fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        ((s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4))
    }
}

/// Q4_K (`qh` None) and Q5_K: a 256-value block of eight 32-value sub-blocks.
fn k_quant(b: &[u8], qh: Option<&[u8]>, qs: &[u8], y: &mut [f32]) {
    let (d, dmin) = (half_at(b, 0), half_at(b, 2));
    let scales = &b[4..16];
    for sub in 0..8 {
        let (sc, m) = scale_min_k4(sub, scales);
        let (scale, min) = (d * f32::from(sc), dmin * f32::from(m));
        // Sub-blocks 2k and 2k+1 share 32 bytes of qs: low nibbles, then high nibbles.
        let bytes = &qs[32 * (sub / 2)..32 * (sub / 2) + 32];
        let shift = 4 * (sub % 2);
        for (l, &byte) in bytes.iter().enumerate() {
            let high = qh.map_or(0, |h| ((h[l] >> sub) & 1) << 4);
            let q = ((byte >> shift) & 0x0F) | high;
            y[32 * sub + l] = scale * f32::from(q) - min;
        }
    }
}

/// Q6_K: two halves of 128 values; in each, value 32*k + l (k in 0..4, l in 0..32) takes its low nibble from
/// ql[l + 32*(k%2)] (low nibble for k < 2, high for k >= 2), its top two bits from bits 2k..2k+2 of qh[l],
/// and the scale of its 16-value sub-block.
fn q6_k(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 208);
    for half in 0..2 {
        let ql = &b[64 * half..64 * half + 64];
        let qh = &b[128 + 32 * half..128 + 32 * half + 32];
        let scales = &b[192 + 8 * half..192 + 8 * half + 8];
        for k in 0..4 {
            for l in 0..32 {
                let low = (ql[l + 32 * (k % 2)] >> (4 * (k / 2))) & 0x0F;
                let top = (qh[l] >> (2 * k)) & 3;
                let q = i32::from(low | (top << 4)) - 32;
                let scale = f32::from(scales[2 * k + l / 16] as i8);
                y[128 * half + 32 * k + l] = d * scale * q as f32;
            }
        }
    }
}
