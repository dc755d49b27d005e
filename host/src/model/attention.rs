//! Causal self-attention pieces, forward and backward side by side: head split/merge (layout only),
//! rotary position embeddings (RoPE), and scaled dot-product attention with a causal mask.
//! Layout inside attention is [B, H, T, D] (batch, head, time, head dim), contiguous.
use super::config::RopeScaling;
use super::ops::{acc_dtype, rmsnorm_backward, rmsnorm_forward, tensor_bytes, RmsNormSaved};
use candle_core::{DType, Device, Result, Tensor, D};

// ---------------------------------------------------------------------------------------------------------
// Head split / merge. The fused attention-input output [N, (H + 2 Hkv) D] holds q | k | v along features
// (H query heads, Hkv key/value heads; Hkv = H without GQA), head h of each part at h*D .. (h+1)*D. The
// backward of a split is a concatenation and vice versa.

/// The head layout of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct Heads {
    pub b: usize,
    pub t: usize,
    /// Query heads.
    pub h: usize,
    /// Key/value heads (h / hkv query heads share each).
    pub hkv: usize,
    pub d: usize,
}

/// [N, (H + 2 Hkv) D] -> q [B, H, T, D], k and v [B, Hkv, T, D], contiguous.
pub fn split_qkv(qkv: &Tensor, s: Heads) -> Result<(Tensor, Tensor, Tensor)> {
    let (q_w, kv_w) = (s.h * s.d, s.hkv * s.d);
    let part = |off: usize, heads: usize| qkv.narrow(1, off, heads * s.d)?.reshape((s.b, s.t, heads, s.d))?.transpose(1, 2)?.contiguous();
    Ok((part(0, s.h)?, part(q_w, s.hkv)?, part(q_w + kv_w, s.hkv)?))
}

/// Per-head RMSNorm on q and k before RoPE (Qwen3): weights [D] and epsilon.
pub struct QkNorm<'a> {
    pub q: &'a Tensor,
    pub k: &'a Tensor,
    pub eps: f64,
}

/// What [`qkv_backward`] needs beyond the incoming gradients: the q/k norms' saved state, if any.
pub struct QkvSaved {
    norms: Option<(RmsNormSaved, RmsNormSaved, Tensor, Tensor)>,
}

impl QkvSaved {
    pub fn bytes(&self) -> usize {
        self.norms.as_ref().map_or(0, |(a, b, c, d)| a.bytes() + b.bytes() + tensor_bytes(c) + tensor_bytes(d))
    }
}

/// The attention input (x W^T with the LoRA delta, ops::linear_forward_delta) plus the bias -> rotated q, k and
/// v. Without q/k norms the fused kernel adds the bias, splits the heads and applies RoPE in one pass; with them
/// (Qwen3) the norm sits between the split and RoPE.
#[allow(clippy::too_many_arguments)]
pub fn qkv_forward(base: &Tensor, bias: Option<&Tensor>, norm: Option<QkNorm>, rope: &Rope, s: Heads, fused: bool, fused_norm: bool) -> Result<(Tensor, Tensor, Tensor, QkvSaved)> {
    #[cfg(feature = "cuda")]
    if norm.is_none() && super::fusion::on(fused, base) {
        let (q, k, v) = super::cuda::qkv_split_rope(base, bias, &rope.cos, &rope.sin, s.b, s.t, s.h, s.hkv, s.d)?;
        return Ok((q, k, v, QkvSaved { norms: None }));
    }
    let _ = fused;
    let qkv = match bias {
        Some(bias) => base.broadcast_add(bias)?,
        None => base.clone(),
    };
    let (q, k, v) = split_qkv(&qkv, s)?;
    let (q, k, norms) = match norm {
        None => (q, k, None),
        Some(n) => {
            let per_head = |x: &Tensor, w: &Tensor| -> Result<(Tensor, RmsNormSaved)> {
                let dims = x.dims4()?;
                let (y, saved) = rmsnorm_forward(&x.reshape((dims.0 * dims.1 * dims.2, dims.3))?, w, n.eps, fused_norm)?;
                Ok((y.reshape(dims)?, saved))
            };
            let (qn, q_saved) = per_head(&q, n.q)?;
            let (kn, k_saved) = per_head(&k, n.k)?;
            (qn, kn, Some((q_saved, k_saved, n.q.clone(), n.k.clone())))
        }
    };
    Ok((rope_forward(&q, rope)?, rope_forward(&k, rope)?, v, QkvSaved { norms }))
}

/// Backward of [`qkv_forward`]: dq, dk (rotated back, through the norms) and dv -> d(qkv) [N, (H + 2 Hkv) D].
pub fn qkv_backward(saved: &QkvSaved, dq: &Tensor, dk: &Tensor, dv: &Tensor, rope: &Rope, fused: bool, fused_norm: bool) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if saved.norms.is_none() && super::fusion::on(fused, dq) {
        return super::cuda::qkv_merge_unrope(dq, dk, dv, &rope.cos, &rope.sin);
    }
    let _ = fused;
    let (dq, dk) = norms_backward(saved, rope_backward(dq, rope)?, rope_backward(dk, rope)?, fused_norm)?;
    Tensor::cat(&[merge_heads(&dq, false)?, merge_heads(&dk, false)?, merge_heads(dv, false)?], 1)
}

/// dq, dk [B, H, T, D] (RoPE undone) through the q/k norms, if any.
fn norms_backward(saved: &QkvSaved, dq: Tensor, dk: Tensor, fused_norm: bool) -> Result<(Tensor, Tensor)> {
    let Some((q_saved, k_saved, wq, wk)) = &saved.norms else {
        return Ok((dq, dk));
    };
    let per_head = |dy: &Tensor, s: &RmsNormSaved, w: &Tensor| -> Result<Tensor> {
        let dims = dy.dims4()?;
        rmsnorm_backward(s, w, &dy.reshape((dims.0 * dims.1 * dims.2, dims.3))?, None, fused_norm)?.reshape(dims)
    };
    Ok((per_head(&dq, q_saved, wq)?, per_head(&dk, k_saved, wk)?))
}

/// d(qkv) [N, (H + 2 Hkv) D] (c_attn's output gradient) from attention's input gradients, whichever form they
/// came in: per head through [`qkv_backward`], or written by flash attention (RoPE undone) through the q/k norms'
/// backward only.
pub fn qkv_backward_of(saved: &QkvSaved, grads: AttnGrads, rope: &Rope, s: Heads, fused: bool, fused_norm: bool) -> Result<Tensor> {
    match grads {
        AttnGrads::Heads(dq, dk, dv) => qkv_backward(saved, &dq, &dk, &dv, rope, fused, fused_norm),
        AttnGrads::Tokens { dqkv, .. } => qkv_backward_tokens(saved, dqkv, s, fused_norm),
    }
}

/// [`qkv_backward`] from attention's gradients as one token-major d(qkv) [N, (H + 2 Hkv) D] with RoPE undone
/// already (what flash attention's backward writes): only the q/k norms' backward is left, if any.
fn qkv_backward_tokens(saved: &QkvSaved, dqkv: Tensor, s: Heads, fused_norm: bool) -> Result<Tensor> {
    if saved.norms.is_none() {
        return Ok(dqkv);
    }
    let (dq, dk, dv) = split_qkv(&dqkv, s)?;
    let (dq, dk) = norms_backward(saved, dq, dk, fused_norm)?;
    Tensor::cat(&[merge_heads(&dq, false)?, merge_heads(&dk, false)?, merge_heads(&dv, false)?], 1)
}

// GQA: each key/value head serves `groups` consecutive query heads (query head h reads kv head
// h / groups). The attention runs on k and v repeated to every query head; the backward sums each group's
// gradients back onto its kv head.

/// [B, Hkv, T, D] -> [B, Hkv * groups, T, D].
pub fn repeat_kv(x: &Tensor, groups: usize) -> Result<Tensor> {
    if groups == 1 {
        return Ok(x.clone());
    }
    let (b, hkv, t, d) = x.dims4()?;
    x.unsqueeze(2)?.broadcast_as((b, hkv, groups, t, d))?.contiguous()?.reshape((b, hkv * groups, t, d))
}

/// Backward of [`repeat_kv`]: [B, H, T, D] -> [B, H / groups, T, D], summing each group.
pub fn sum_kv_groups(dx: &Tensor, groups: usize) -> Result<Tensor> {
    if groups == 1 {
        return Ok(dx.clone());
    }
    let (b, h, t, d) = dx.dims4()?;
    dx.reshape((b, h / groups, groups, t, d))?.sum(2)
}

/// [B, H, T, D] -> [N, C] contiguous (head-major features, as c_proj expects).
pub fn merge_heads(y: &Tensor, fused: bool) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if super::fusion::on(fused, y) {
        return super::cuda::merge_heads(y);
    }
    let _ = fused;
    let (b, h, t, d) = y.dims4()?;
    y.transpose(1, 2)?.contiguous()?.reshape((b * t, h * d))
}

/// Backward of [`merge_heads`]: [N, C] -> [B, H, T, D].
pub fn merge_heads_backward(dy: &Tensor, b: usize, t: usize, h: usize, d: usize, fused: bool) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if super::fusion::on(fused, dy) {
        return super::cuda::split_heads(dy, b, t, h, d);
    }
    let _ = fused;
    dy.reshape((b, t, h, d))?.transpose(1, 2)?.contiguous()
}

// ---------------------------------------------------------------------------------------------------------
// RoPE, non-interleaved ("rotate_half"), over the full head dim, as Qwen v1:
//   y = x * cos + rotate_half(x) * sin,  rotate_half([x1, x2]) = [-x2, x1]   (halves of the head dim)
// with angle(t, j) = t * base^(-2 (j mod D/2) / D). It is a rotation R per (t, pair), so the backward is
// the transposed rotation: dx = dy * cos + rotate_half^T(dy * sin),  rotate_half^T([g1, g2]) = [g2, -g1].
// Computed in f32 (acc dtype) and cast back, as Qwen does.

#[derive(Clone)]
pub struct Rope {
    /// [T, D] in the accumulation dtype.
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// The tables of positions 0..t (rows of these; contiguous views, no copy).
    pub fn prefix(&self, t: usize) -> Result<Rope> {
        Ok(Rope { cos: self.cos.narrow(0, 0, t)?, sin: self.sin.narrow(0, 0, t)? })
    }

    /// Tables for positions 0..seq_len. The angles are computed in f32 exactly as the HF code does
    /// (`inv_freq = 1 / base ** (arange(0, D, 2) / D)`, scaled as `rope_scaling` says, `outer(t, inv_freq)`),
    /// then cos/sin.
    pub fn new(seq_len: usize, head_dim: usize, base: f64, scaling: &RopeScaling, model_dtype: DType, device: &Device) -> Result<Rope> {
        let half = head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| scale_frequency(1.0f32 / (base as f32).powf((2 * i) as f32 / head_dim as f32), scaling))
            .collect();
        let mut cos = Vec::with_capacity(seq_len * head_dim);
        let mut sin = Vec::with_capacity(seq_len * head_dim);
        for t in 0..seq_len {
            for j in 0..head_dim {
                let angle = (t as f32 * inv_freq[j % half]) as f64;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let acc = acc_dtype(model_dtype);
        let cos = Tensor::from_vec(cos, (seq_len, head_dim), device)?.to_dtype(acc)?;
        let sin = Tensor::from_vec(sin, (seq_len, head_dim), device)?.to_dtype(acc)?;
        Ok(Rope { cos, sin })
    }

    /// The tables of positions start..start + t (a KV-cached step's new positions).
    pub fn slice(&self, start: usize, t: usize) -> Result<Rope> {
        Ok(Rope { cos: self.cos.narrow(0, start, t)?, sin: self.sin.narrow(0, start, t)? })
    }

    /// The cos and sin tables, [positions, D] (or per token, [B, 1, T, D]).
    pub fn tables(&self) -> (&Tensor, &Tensor) {
        (&self.cos, &self.sin)
    }

    /// Positions the tables cover.
    pub fn len(&self) -> usize {
        self.cos.dim(0).unwrap_or(0)
    }

    /// The tables at each token's own position (a padding-free batch, positions restarting at every
    /// sequence): rows gathered by `positions` [B*T] into [B, 1, T, D], which broadcast over the heads.
    pub fn at(&self, positions: &[u32], b: usize, t: usize) -> Result<Rope> {
        let index = Tensor::from_slice(positions, positions.len(), self.cos.device())?;
        let gather = |table: &Tensor| -> Result<Tensor> {
            let d = table.dim(1)?;
            table.index_select(&index, 0)?.reshape((b, 1, t, d))
        };
        Ok(Rope { cos: gather(&self.cos)?, sin: gather(&self.sin)? })
    }
}

/// One RoPE frequency after `rope_scaling` (HF's `_compute_linear_scaling_rope_parameters` and
/// `_compute_llama3_parameters`, in f32 like them).
fn scale_frequency(inv_freq: f32, scaling: &RopeScaling) -> f32 {
    match *scaling {
        RopeScaling::None => inv_freq,
        RopeScaling::Linear { factor } => inv_freq / factor as f32,
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
            let (factor, low, high, old) = (factor as f32, low_freq_factor as f32, high_freq_factor as f32, original_max_position_embeddings as f32);
            let wavelen = 2.0 * std::f32::consts::PI / inv_freq;
            if wavelen > old / low {
                inv_freq / factor // long wavelengths: interpolated
            } else if wavelen < old / high {
                inv_freq // short wavelengths: kept
            } else {
                let smooth = (old / wavelen - low) / (high - low);
                (1.0 - smooth) * inv_freq / factor + smooth * inv_freq
            }
        }
    }
}

fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)
}

fn rotate_half_transposed(g: &Tensor) -> Result<Tensor> {
    let half = g.dim(D::Minus1)? / 2;
    let g1 = g.narrow(D::Minus1, 0, half)?;
    let g2 = g.narrow(D::Minus1, half, half)?;
    Tensor::cat(&[&g2, &g1.neg()?], D::Minus1)
}

/// x [B, H, T, D] -> rotated x, same dtype.
pub fn rope_forward(x: &Tensor, rope: &Rope) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(rope.cos.dtype())?;
    let y = (xf.broadcast_mul(&rope.cos)? + rotate_half(&xf)?.broadcast_mul(&rope.sin)?)?;
    y.to_dtype(dtype)
}

pub fn rope_backward(dy: &Tensor, rope: &Rope) -> Result<Tensor> {
    let dtype = dy.dtype();
    let g = dy.to_dtype(rope.cos.dtype())?;
    let dx = (g.broadcast_mul(&rope.cos)? + rotate_half_transposed(&g.broadcast_mul(&rope.sin)?)?)?;
    dx.to_dtype(dtype)
}

// ---------------------------------------------------------------------------------------------------------
// Scaled dot-product attention with a causal mask:
//   s = q k^T / sqrt(D) + mask   (mask: 0 where key <= query, -inf above the diagonal)
//   p = softmax(s) along keys,  y = p v
// Backward, with dy:
//   dv = p^T dy;  dp = dy v^T;  ds = p * (dp - sum_keys(dp * p))   (softmax backward);
//   dq = ds k / sqrt(D);  dk = ds^T q / sqrt(D).
// Masked entries have p = 0, so their ds is 0 and nothing flows to future keys.
// Scores, softmax and its backward run in the acc dtype (f32 for bf16); matmuls in the model dtype.

/// [T, T] additive causal mask in the acc dtype.
pub fn causal_mask(t: usize, model_dtype: DType, device: &Device) -> Result<Tensor> {
    causal_mask_after(t, 0, model_dtype, device)
}

/// [T, past + T] additive causal mask for T new queries after `past` cached positions: query i sees keys
/// 0 ..= past + i.
pub fn causal_mask_after(t: usize, past: usize, model_dtype: DType, device: &Device) -> Result<Tensor> {
    let keys = past + t;
    let m: Vec<f32> = (0..t * keys).map(|i| if i % keys > past + i / keys { f32::NEG_INFINITY } else { 0.0 }).collect();
    Tensor::from_vec(m, (t, keys), device)?.to_dtype(acc_dtype(model_dtype))
}

/// Sequences laid end to end in the rows of a batch (padding-free): `cu_seqlens` are the cumulative offsets
/// of the sequences over the flattened [B*T] tokens (0, l0, l0 + l1, ..., B*T), and no sequence crosses
/// the end of a row. Each sequence attends causally within itself only, and its positions start at 0, so
/// every sequence computes exactly what it would alone in a row of its own.
#[derive(Clone, Debug, PartialEq)]
pub struct Packed {
    cu_seqlens: Vec<u32>,
    b: usize,
    t: usize,
}

impl Packed {
    /// Checks that `cu_seqlens` cut the [b, t] batch into non-empty sequences, each within one row.
    pub fn new(cu_seqlens: &[u32], b: usize, t: usize) -> Result<Packed> {
        let n = b * t;
        let ok_ends = cu_seqlens.first() == Some(&0) && cu_seqlens.last().map(|&e| e as usize) == Some(n);
        if !ok_ends || cu_seqlens.windows(2).any(|w| w[1] <= w[0]) {
            candle_core::bail!("cu_seqlens {cu_seqlens:?} must rise strictly from 0 to the {n} tokens of the batch");
        }
        for row in 1..b {
            if cu_seqlens.binary_search(&((row * t) as u32)).is_err() {
                candle_core::bail!("cu_seqlens {cu_seqlens:?}: a sequence crosses the end of row {}", row - 1);
            }
        }
        Ok(Packed { cu_seqlens: cu_seqlens.to_vec(), b, t })
    }

    pub fn sequences(&self) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
        self.cu_seqlens.windows(2).map(|w| w[0] as usize..w[1] as usize)
    }

    /// The longest sequence (the RoPE positions needed).
    pub fn longest(&self) -> usize {
        self.sequences().map(|s| s.len()).max().unwrap_or(0)
    }

    /// Each token's position within its sequence, [B*T].
    pub fn positions(&self) -> Vec<u32> {
        self.sequences().flat_map(|s| 0..s.len() as u32).collect()
    }

    /// True at the flattened tokens that begin a sequence: the token before them predicts nothing.
    pub fn starts(&self) -> Vec<bool> {
        let mut starts = vec![false; self.b * self.t];
        for s in self.sequences() {
            starts[s.start] = true;
        }
        starts
    }

    /// [B, 1, T, T] additive mask in the acc dtype: 0 where the key is at or before the query in the same
    /// sequence, -inf elsewhere (block-diagonal and causal per sequence).
    pub fn mask(&self, model_dtype: DType, device: &Device) -> Result<Tensor> {
        let t = self.t;
        let mut m = vec![f32::NEG_INFINITY; self.b * t * t];
        for s in self.sequences() {
            let (row, first) = (s.start / t, s.start % t);
            for q in first..first + s.len() {
                let at = (row * t + q) * t;
                m[at + first..=at + q].iter_mut().for_each(|x| *x = 0.0);
            }
        }
        Tensor::from_vec(m, (self.b, 1, t, t), device)?.to_dtype(acc_dtype(model_dtype))
    }
}

/// The head dimensions the flash kernels are built for; other shapes take the scores-in-memory path.
pub const FLASH_HEAD_DIMS: [usize; 2] = [64, 128];

/// Tokens per block of the flash kernels' work list (keys in dK/dV, queries in the short-sequence forward and
/// the dQ that recomputes the tiles).
pub const FLASH_BLOCK: usize = 64;

/// Queries per block of the long-sequence forward and of dQ from the stored dS tiles (two 64-blocks).
pub const FLASH_BLOCK_LONG: usize = 128;

/// Sequences at least this long on average take the 128-query forward; shorter ones the 64-query one (at
/// 167-token records the 128-query blocks left more warps idle: 0.040 vs 0.034 ms a layer; at 1024 and
/// 2048 tokens they were 9% and 14% faster, `scripts/flash-bench.cu`).
pub const FLASH_LONG_MEAN_LEN: usize = 512;

/// The work lists of the flash kernels (model/cuda/flash.cu): one entry (row, first, len, block) per
/// 64-token block of every sequence (tokens first..first + len of batch row `row`), and the same per
/// 128-token block; each with the most forward work (the latest blocks of the longest sequences) first, so
/// the long blocks start first and the short ones fill the tail. Built once per forward and shared by every
/// layer (for rows of one sequence each, once per shape: `Model` keeps the last table).
///
/// The backward stores the 64 x 64 dS tiles of each sequence's causal triangle (nb (nb + 1) / 2 of them
/// for nb blocks), per head: `tiles[i]` (`tiles128[i]`) is where entry i's sequence starts in that list,
/// `n_tiles` its length.
#[derive(Clone, Debug)]
pub struct FlashBlocks {
    /// u32 [n, 4] on the model's device: 64-token blocks.
    pub table: Tensor,
    /// u32 [n] on the model's device.
    pub tiles: Tensor,
    /// u32 [n128, 4] and [n128]: 128-token blocks.
    pub table128: Tensor,
    pub tiles128: Tensor,
    pub n_tiles: usize,
    /// The forward runs on 128-query blocks (mean sequence length at least [`FLASH_LONG_MEAN_LEN`]).
    pub forward128: bool,
}

type Entries = Vec<([u32; 4], u32)>;

impl FlashBlocks {
    /// The entries of `sequences` (row, first, len) per `block` tokens, in launch order, each with its
    /// sequence's first dS tile; and the number of tiles.
    pub fn entries(sequences: impl IntoIterator<Item = (usize, usize, usize)>, block: usize) -> (Entries, usize) {
        let mut e = Vec::new();
        let mut n_tiles = 0;
        for (row, first, len) in sequences {
            e.extend((0..len.div_ceil(block)).map(|blk| ([row as u32, first as u32, len as u32, blk as u32], n_tiles as u32)));
            let nb = len.div_ceil(FLASH_BLOCK);
            n_tiles += nb * (nb + 1) / 2;
        }
        // Stable: equal work keeps the batch order.
        e.sort_by_key(|(x, _)| std::cmp::Reverse(x[3]));
        (e, n_tiles)
    }

    /// Rows of one sequence each ([b, t]).
    pub fn rows(b: usize, t: usize, device: &Device) -> Result<FlashBlocks> {
        Self::new(&(0..b).map(|row| (row, 0, t)).collect::<Vec<_>>(), device)
    }

    /// The sequences of a padding-free batch.
    pub fn packed(p: &Packed, device: &Device) -> Result<FlashBlocks> {
        Self::new(&p.sequences().map(|s| (s.start / p.t, s.start % p.t, s.len())).collect::<Vec<_>>(), device)
    }

    fn new(sequences: &[(usize, usize, usize)], device: &Device) -> Result<FlashBlocks> {
        let upload = |(entries, _): &(Entries, usize)| -> Result<(Tensor, Tensor)> {
            let flat: Vec<u32> = entries.iter().flat_map(|(e, _)| *e).collect();
            let tiles: Vec<u32> = entries.iter().map(|(_, t)| *t).collect();
            Ok((Tensor::from_vec(flat, (entries.len(), 4), device)?, Tensor::from_vec(tiles, entries.len(), device)?))
        };
        let short = Self::entries(sequences.iter().copied(), FLASH_BLOCK);
        let long = Self::entries(sequences.iter().copied(), FLASH_BLOCK_LONG);
        let ((table, tiles), (table128, tiles128)) = (upload(&short)?, upload(&long)?);
        let tokens: usize = sequences.iter().map(|s| s.2).sum();
        let forward128 = tokens >= FLASH_LONG_MEAN_LEN * sequences.len().max(1);
        Ok(FlashBlocks { table, tiles, table128, tiles128, n_tiles: short.1, forward128 })
    }
}

/// Whether the flash kernels run for this dtype, device and head dim (the `flash` and `attention`
/// switches on, built with `cuda`, bf16 on a GPU).
pub fn flash_runs(fusion: super::fusion::Fusion, dtype: DType, device: &Device, head_dim: usize) -> bool {
    FLASH_HEAD_DIMS.contains(&head_dim) && super::fusion::on_for(fusion.flash && fusion.attention, dtype, device)
}

pub struct AttnSaved {
    q: Tensor,
    /// k and v: repeated to every query head on the scores paths; as they came (Hkv heads) after flash
    /// attention, whose kernels read each kv head for its query heads.
    k: Tensor,
    v: Tensor,
    groups: usize,
    /// Softmax probabilities [B, H, T, T]: the acc dtype on the composite path, bf16 from the fused kernel
    /// (what the following matmul consumes anyway). None after flash attention.
    p: Option<Tensor>,
    /// Flash attention's output (token-major [N, H D]: it is also c_proj's input, kept once), per-row
    /// log-sum-exp [B, H, T] (its backward recomputes the probabilities from them) and block table.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    flash: Option<(Tensor, Tensor, FlashBlocks)>,
}

impl AttnSaved {
    pub fn bytes(&self) -> usize {
        let flash = self.flash.as_ref().map_or(0, |(o, lse, _)| tensor_bytes(o) + tensor_bytes(lse));
        tensor_bytes(&self.q) + tensor_bytes(&self.k) + tensor_bytes(&self.v) + self.p.as_ref().map_or(0, tensor_bytes) + flash
    }
}

/// q [B, H, T, D]; k, v [B, H / groups, T, D] (GQA when groups > 1) -> the output token-major [N, H D] (c_proj's
/// input). `mask` is needed only by the composite path (the fused softmax masks by index). `fused`: scores
/// from one GEMM and the fused softmax kernels; `flash` (the block table, when [`flash_runs`]): flash
/// attention, which also serves padding-free batches and writes the token-major output itself.
pub fn attention_forward(q: &Tensor, k: &Tensor, v: &Tensor, groups: usize, mask: Option<&Tensor>, fused: bool, flash: Option<&FlashBlocks>) -> Result<(Tensor, AttnSaved)> {
    let scale = 1.0 / (q.dim(D::Minus1)? as f64).sqrt();
    #[cfg(feature = "cuda")]
    if let Some(blocks) = flash {
        let (y, lse) = super::cuda::flash_forward(q, k, v, blocks, scale)?;
        let saved = AttnSaved { q: q.clone(), k: k.clone(), v: v.clone(), groups, p: None, flash: Some((y.clone(), lse, blocks.clone())) };
        return Ok((y, saved));
    }
    let _ = flash;
    let (k, v) = (&repeat_kv(k, groups)?, &repeat_kv(v, groups)?);
    let dtype = q.dtype();
    #[cfg(feature = "cuda")]
    if super::fusion::on(fused, q) {
        let p = super::cuda::causal_softmax(&super::cuda::attention_scores(q, k, scale)?)?;
        let y = merge_heads(&p.matmul(v)?, true)?;
        return Ok((y, AttnSaved { q: q.clone(), k: k.clone(), v: v.clone(), groups, p: Some(p), flash: None }));
    }
    let _ = fused;
    let Some(mask) = mask else { candle_core::bail!("attention_forward: the composite path needs the causal mask") };
    let s = (q.matmul(&k.t()?)?.to_dtype(mask.dtype())? * scale)?.broadcast_add(mask)?;
    let s_max = s.max_keepdim(D::Minus1)?; // finite: the diagonal is never masked
    let e = s.broadcast_sub(&s_max)?.exp()?;
    let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
    let y = merge_heads(&p.to_dtype(dtype)?.matmul(v)?, false)?;
    Ok((y, AttnSaved { q: q.clone(), k: k.clone(), v: v.clone(), groups, p: Some(p), flash: None }))
}

/// Attention's input gradients: per head as q, k, v came (the scores paths), or written by flash attention's
/// backward token-major into d(qkv).
#[derive(Clone)]
pub enum AttnGrads {
    /// dq [B, H, T, D], dk and dv [B, H / groups, T, D].
    Heads(Tensor, Tensor, Tensor),
    /// d(qkv) [N, (H + 2 Hkv) D]: dq, dk, dv side by side, RoPE undone on dq and dk when the backward was given
    /// the tables.
    Tokens { dqkv: Tensor, h: usize, hkv: usize, d: usize },
}

impl AttnGrads {
    /// dq [N, H D], dk and dv [N, Hkv D], token-major (for comparisons).
    pub fn tokens(self) -> Result<(Tensor, Tensor, Tensor)> {
        match self {
            AttnGrads::Heads(dq, dk, dv) => Ok((merge_heads(&dq, false)?, merge_heads(&dk, false)?, merge_heads(&dv, false)?)),
            AttnGrads::Tokens { dqkv, h, hkv, d } => Ok((dqkv.narrow(1, 0, h * d)?, dqkv.narrow(1, h * d, hkv * d)?, dqkv.narrow(1, (h + hkv) * d, hkv * d)?)),
        }
    }
}

/// The backward of [`attention_forward`] from d(output) token-major [N, H D]. `ds_tiles`: flash's dQ from the
/// dS tiles its dK/dV pass stores (the `ds_tiles` switch); `unrope`: flash's backward undoes RoPE on dq and dk
/// as it writes them.
pub fn attention_backward(saved: &AttnSaved, dy: &Tensor, fused: bool, ds_tiles: bool, unrope: Option<&Rope>) -> Result<AttnGrads> {
    #[cfg(feature = "cuda")]
    if let Some((o, lse, blocks)) = &saved.flash {
        let (_, h, _, d) = saved.q.dims4()?;
        let hkv = saved.k.dim(1)?;
        let scale = 1.0 / (d as f64).sqrt();
        let dqkv = super::cuda::flash_backward(&saved.q, &saved.k, &saved.v, o, lse, dy, blocks, scale, ds_tiles, unrope.map(Rope::tables))?;
        return Ok(AttnGrads::Tokens { dqkv, h, hkv, d });
    }
    let _ = (ds_tiles, unrope);
    let (b, h, t, d) = saved.q.dims4()?;
    let dy = merge_heads_backward(dy, b, t, h, d, fused)?;
    let (dq, dk, dv) = attention_backward_repeated(saved, &dy, fused)?;
    Ok(AttnGrads::Heads(dq, sum_kv_groups(&dk, saved.groups)?, sum_kv_groups(&dv, saved.groups)?))
}

/// The backward with k and v at every query head.
fn attention_backward_repeated(saved: &AttnSaved, dy: &Tensor, fused: bool) -> Result<(Tensor, Tensor, Tensor)> {
    let dtype = dy.dtype();
    let scale = 1.0 / (saved.q.dim(D::Minus1)? as f64).sqrt();
    let Some(p) = &saved.p else { candle_core::bail!("attention_backward: no saved probabilities") };
    #[cfg(feature = "cuda")]
    if super::fusion::on(fused, dy) {
        let dv = p.t()?.matmul(dy)?;
        let dp = dy.matmul(&saved.v.t()?)?;
        let ds = super::cuda::causal_softmax_backward(p, &dp, scale)?;
        return Ok((ds.matmul(&saved.k)?, ds.t()?.matmul(&saved.q)?, dv));
    }
    let _ = fused;
    let p_m = p.to_dtype(dtype)?;
    let dv = p_m.t()?.matmul(dy)?;
    let dp = dy.matmul(&saved.v.t()?)?.to_dtype(p.dtype())?;
    let row_dot = (&dp * p)?.sum_keepdim(D::Minus1)?;
    let ds = ((dp.broadcast_sub(&row_dot)? * p)? * scale)?.to_dtype(dtype)?;
    let dq = ds.matmul(&saved.k)?;
    let dk = ds.t()?.matmul(&saved.q)?;
    Ok((dq, dk, dv))
}
