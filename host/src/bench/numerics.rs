//! `lorahost bench numerics`: the GPU's bf16 training step against the CPU's f32 one, on the same inputs.
//!
//! Op by op, each fused kernel (through the same `ops::` / `attention::` / `loss::` entry points the model
//! calls) against its composite twin; then a whole small model: loss and every adapter gradient. Inputs are
//! drawn once in f32 and rounded to bf16 for both sides, so the differences are the GPU path's rounding
//! alone. The error of a tensor is ||gpu - cpu|| / ||cpu|| (relative, in the 2-norm).
use crate::model::lora::{Lora, LoraConfig};
use crate::model::attention::{self, Rope};
use crate::model::config::{Family, ModelConfig, RopeScaling};
use crate::model::tiny::TinySpec;
use crate::model::fusion::Fusion;
use crate::model::loss::{self, Targets};
use crate::model::ops;
use crate::model::transformer::Model;
use crate::rng::SplitMix;
use crate::model::weights::Weights;
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};

#[derive(Debug, Clone, serde::Serialize)]
pub struct Check {
    pub name: String,
    pub rel_err: f64,
    pub tolerance: f64,
    pub ok: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct NumericsReport {
    pub device: String,
    pub checks: Vec<Check>,
    pub ok: bool,
}

/// Per-op tolerance: a few bf16 roundings (2^-8 each) of the inputs and the output.
const OP_TOL: f64 = 1e-2;
/// Whole step: the "relative error around 1e-2"; gradients pass through every layer's rounding.
const LOSS_TOL: f64 = 1e-2;
const GRAD_TOL: f64 = 3e-2;

pub fn run(gpu: &Device) -> Result<NumericsReport> {
    if gpu.is_cpu() {
        bail!("bench numerics compares a GPU with the CPU: pass --device cuda:N");
    }
    let mut checks = Vec::new();
    ops_checks(gpu, &mut checks)?;
    optimizer_check(gpu, &mut checks)?;
    model_checks(gpu, &mut checks)?;
    let ok = checks.iter().all(|c| c.ok);
    Ok(NumericsReport { device: format!("{gpu:?}"), checks, ok })
}

fn rel_err(gpu: &Tensor, cpu: &Tensor) -> Result<f64> {
    let g = gpu.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let c = cpu.to_dtype(DType::F64)?;
    let diff = (g - &c)?.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    let norm = c.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    Ok(if norm > 0.0 { diff / norm } else { diff })
}

fn push(checks: &mut Vec<Check>, name: &str, gpu: &Tensor, cpu: &Tensor, tolerance: f64) -> Result<()> {
    let rel_err = rel_err(gpu, cpu)?;
    checks.push(Check { name: name.into(), rel_err, tolerance, ok: rel_err <= tolerance });
    Ok(())
}

/// How many elements of `a` and `b` (same shape; any dtype, any device) are not equal.
fn differing(a: &Tensor, b: &Tensor) -> Result<f64> {
    let b = b.to_device(a.device())?.to_dtype(DType::F32)?;
    Ok(a.to_dtype(DType::F32)?.ne(&b)?.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()? as f64)
}

/// A check that nothing differs: `differ` counts what did.
fn push_exact(checks: &mut Vec<Check>, name: impl Into<String>, differ: f64) {
    checks.push(Check { name: name.into(), rel_err: differ, tolerance: 0.0, ok: differ == 0.0 });
}

/// A pair of the same values: (CPU f32, GPU bf16), the f32 side already rounded through bf16.
struct Pair {
    cpu: Tensor,
    gpu: Tensor,
}

fn pair(rng: &mut SplitMix, shape: &[usize], mean: f64, std: f64, gpu: &Device) -> Result<Pair> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| (mean + std * rng.normal()) as f32).collect();
    let bf = Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(DType::BF16)?;
    Ok(Pair { cpu: bf.to_dtype(DType::F32)?, gpu: bf.to_device(gpu)? })
}

fn ops_checks(gpu: &Device, checks: &mut Vec<Check>) -> Result<()> {
    let mut rng = SplitMix::new(11);
    let (b, t, h, d) = (2usize, 48usize, 4usize, 32usize);
    let (n, c, f) = (b * t, h * d, 352usize);
    let eps = 1e-6;

    // RMSNorm, with a residual gradient in backward.
    let x = pair(&mut rng, &[n, c], 0.0, 1.5, gpu)?;
    let w = pair(&mut rng, &[c], 1.0, 0.1, gpu)?;
    let (yc, sc) = ops::rmsnorm_forward(&x.cpu, &w.cpu, eps, false)?;
    let (yg, sg) = ops::rmsnorm_forward(&x.gpu, &w.gpu, eps, true)?;
    push(checks, "rmsnorm forward", &yg, &yc, OP_TOL)?;
    let dy = pair(&mut rng, &[n, c], 0.0, 1.0, gpu)?;
    let dr = pair(&mut rng, &[n, c], 0.0, 1.0, gpu)?;
    let dxc = ops::rmsnorm_backward(&sc, &w.cpu, &dy.cpu, Some(&dr.cpu), false)?;
    let dxg = ops::rmsnorm_backward(&sg, &w.gpu, &dy.gpu, Some(&dr.gpu), true)?;
    push(checks, "rmsnorm backward (+ residual)", &dxg, &dxc, OP_TOL)?;
    let rc = ops::residual_add(&x.cpu, &dy.cpu, false)?;
    let rg = ops::residual_add(&x.gpu, &dy.gpu, true)?;
    push(checks, "residual add", &rg, &rc, OP_TOL)?;

    // The attention input -> q, k, v with RoPE, and back: GQA (2 query heads per kv head), as the
    // Qwen2/Qwen3/Llama models call it, with the rank-24 delta of q, k and v adapters side by side in the
    // input (the low-rank kernel up to rank 32 and the GEMM adding into it).
    let rope_c = Rope::new(t, d, 10000.0, &RopeScaling::None, DType::F32, &Device::Cpu)?;
    let rope_g = Rope::new(t, d, 10000.0, &RopeScaling::None, DType::BF16, gpu)?;
    let heads = attention::Heads { b, t, h, hkv: h / 2, d };
    let width = (h + 2 * heads.hkv) * d;
    let x = pair(&mut rng, &[n, c], 0.0, 1.0, gpu)?;
    let wq = pair(&mut rng, &[width, c], 0.0, 0.05, gpu)?;
    let bias = pair(&mut rng, &[width], 0.0, 0.5, gpu)?;
    let u = pair(&mut rng, &[n, 24], 0.0, 1.0, gpu)?;
    let lb = pair(&mut rng, &[width, 24], 0.0, 0.1, gpu)?;
    let base_c = ops::linear_forward_delta(&x.cpu, &wq.cpu, Some((&u.cpu, &lb.cpu)), false)?;
    let base_g = ops::linear_forward_delta(&x.gpu, &wq.gpu, Some((&u.gpu, &lb.gpu)), true)?;
    push(checks, "linear + rank-24 delta (q, k, v adapters side by side)", &base_g, &base_c, OP_TOL)?;
    let (qc, kc, vc, sc) = attention::qkv_forward(&base_c, Some(&bias.cpu), None, &rope_c, heads, false, false)?;
    let (qg, kg, vg, sg) = attention::qkv_forward(&base_g, Some(&bias.gpu), None, &rope_g, heads, true, true)?;
    push(checks, "qkv split + rope (GQA): q", &qg, &qc, OP_TOL)?;
    push(checks, "qkv split + rope (GQA): k", &kg, &kc, OP_TOL)?;
    push(checks, "qkv split + rope (GQA): v", &vg, &vc, OP_TOL)?;
    // Without GQA (Qwen v1's c_attn), head dim a multiple of 16: the 8-wide split.
    {
        let heads = attention::Heads { b, t, h, hkv: h, d };
        let width = 3 * h * d;
        let base = pair(&mut rng, &[n, width], 0.0, 1.0, gpu)?;
        let bias = pair(&mut rng, &[width], 0.0, 0.5, gpu)?;
        let (qc, kc, vc, _) = attention::qkv_forward(&base.cpu, Some(&bias.cpu), None, &rope_c, heads, false, false)?;
        let (qg, kg, vg, _) = attention::qkv_forward(&base.gpu, Some(&bias.gpu), None, &rope_g, heads, true, true)?;
        push(checks, "qkv split + rope (8 wide): q", &qg, &qc, OP_TOL)?;
        push(checks, "qkv split + rope (8 wide): k", &kg, &kc, OP_TOL)?;
        push(checks, "qkv split + rope (8 wide): v", &vg, &vc, OP_TOL)?;
    }
    let g = (0..3).map(|i| pair(&mut rng, &[b, if i == 0 { h } else { heads.hkv }, t, d], 0.0, 1.0, gpu)).collect::<Result<Vec<_>>>()?;
    let dqkv_c = attention::qkv_backward(&sc, &g[0].cpu, &g[1].cpu, &g[2].cpu, &rope_c, false, false)?;
    let dqkv_g = attention::qkv_backward(&sg, &g[0].gpu, &g[1].gpu, &g[2].gpu, &rope_g, true, true)?;
    push(checks, "qkv backward (GQA; un-rope + merge)", &dqkv_g, &dqkv_c, OP_TOL)?;
    let mc = attention::merge_heads(&g[0].cpu, false)?;
    let mg = attention::merge_heads(&g[0].gpu, true)?;
    push(checks, "merge heads", &mg, &mc, OP_TOL)?;
    let sc = attention::merge_heads_backward(&mc, b, t, h, d, false)?;
    let sg = attention::merge_heads_backward(&mg, b, t, h, d, true)?;
    push(checks, "merge heads backward", &sg, &sc, OP_TOL)?;

    // Causal attention, forward and backward (q, k scaled up so the softmax is far from uniform).
    let q = pair(&mut rng, &[b, h, t, d], 0.0, 2.0, gpu)?;
    let k = pair(&mut rng, &[b, h, t, d], 0.0, 2.0, gpu)?;
    let v = pair(&mut rng, &[b, h, t, d], 0.0, 1.0, gpu)?;
    let mask = attention::causal_mask(t, DType::F32, &Device::Cpu)?;
    let (yc, sc) = attention::attention_forward(&q.cpu, &k.cpu, &v.cpu, 1, Some(&mask), false, None)?;
    let (yg, sg) = attention::attention_forward(&q.gpu, &k.gpu, &v.gpu, 1, None, true, None)?;
    push(checks, "attention forward", &yg, &yc, OP_TOL)?;
    let dy = pair(&mut rng, &[b * t, h * d], 0.0, 1.0, gpu)?;
    let (dqc, dkc, dvc) = attention::attention_backward(&sc, &dy.cpu, false, false, None)?.tokens()?;
    let (dqg, dkg, dvg) = attention::attention_backward(&sg, &dy.gpu, true, true, None)?.tokens()?;
    push(checks, "attention backward: dq", &dqg, &dqc, OP_TOL)?;
    push(checks, "attention backward: dk", &dkg, &dkc, OP_TOL)?;
    push(checks, "attention backward: dv", &dvg, &dvc, OP_TOL)?;

    // Flash attention at each head dim it is built for, with GQA (4 query heads over 2 kv heads), over a
    // length that is not a multiple of its 64-row blocks: rows of one sequence each, then a padding-free
    // batch (sequences of 70 + 130 and 1 + 64 + 135 tokens) against the composite path's block mask.
    #[cfg(feature = "cuda")]
    for d in attention::FLASH_HEAD_DIMS {
        let (b, h, hkv, t) = (2usize, 4usize, 2usize, 200usize);
        let q = pair(&mut rng, &[b, h, t, d], 0.0, 1.5, gpu)?;
        let k = pair(&mut rng, &[b, hkv, t, d], 0.0, 1.5, gpu)?;
        let v = pair(&mut rng, &[b, hkv, t, d], 0.0, 1.0, gpu)?;
        let dy = pair(&mut rng, &[b * t, h * d], 0.0, 1.0, gpu)?;
        let packed = attention::Packed::new(&[0, 70, 200, 201, 265, 400], b, t)?;
        let cases = [
            ("rows", attention::causal_mask(t, DType::F32, &Device::Cpu)?, attention::FlashBlocks::rows(b, t, gpu)?),
            ("padding-free", packed.mask(DType::F32, &Device::Cpu)?, attention::FlashBlocks::packed(&packed, gpu)?),
        ];
        for (layout, mask, blocks) in cases {
            let (yc, sc) = attention::attention_forward(&q.cpu, &k.cpu, &v.cpu, h / hkv, Some(&mask), false, None)?;
            let (yg, sg) = attention::attention_forward(&q.gpu, &k.gpu, &v.gpu, h / hkv, None, true, Some(&blocks))?;
            let name = |what: &str| format!("flash attention {what} (d {d}, GQA, T {t}, {layout})");
            push(checks, &name("forward"), &yg, &yc, OP_TOL)?;
            // The other forward kernel (64- or 128-query blocks; which one runs depends on the lengths).
            let other = attention::FlashBlocks { forward128: !blocks.forward128, ..blocks.clone() };
            let (yo, _) = attention::attention_forward(&q.gpu, &k.gpu, &v.gpu, h / hkv, None, true, Some(&other))?;
            let queries = if other.forward128 { 128 } else { 64 };
            push(checks, &name(&format!("forward, {queries}-query blocks")), &yo, &yc, OP_TOL)?;
            let grads_c = attention::attention_backward(&sc, &dy.cpu, false, false, None)?;
            // RoPE undone as the flash backward stores dq and dk (rows: tables by position) against RoPE's
            // composite backward of the CPU's per-head gradients.
            if layout == "rows" {
                let rope_c = Rope::new(t, d, 10000.0, &RopeScaling::None, DType::F32, &Device::Cpu)?;
                let rope_g = Rope::new(t, d, 10000.0, &RopeScaling::None, DType::BF16, gpu)?;
                let attention::AttnGrads::Heads(dq, dk, _) = &grads_c else { bail!("the CPU gives per-head gradients") };
                let want = [attention::rope_backward(dq, &rope_c)?, attention::rope_backward(dk, &rope_c)?];
                let (gq, gk, _) = attention::attention_backward(&sg, &dy.gpu, true, true, Some(&rope_g))?.tokens()?;
                for ((what, got), want) in [("dq", gq), ("dk", gk)].into_iter().zip(want) {
                    let want = attention::merge_heads(&want, false)?;
                    push(checks, &name(&format!("backward: {what}, RoPE undone as stored")), &got, &want, OP_TOL)?;
                }
            }
            let (dqc, dkc, dvc) = grads_c.tokens()?;
            // The dS tiles in groups of one kv head (what a long sequence gets) against all at once: the same bits.
            if layout == "rows" {
                use crate::model::cuda::{flash_backward_within, flash_forward};
                let scale = 1.0 / (d as f64).sqrt();
                let (o, lse) = flash_forward(&q.gpu, &k.gpu, &v.gpu, &blocks, scale)?;
                let one_kv_head = (h / hkv) * blocks.n_tiles * 64 * 64 * 2;
                let within = |budget| flash_backward_within(&q.gpu, &k.gpu, &v.gpu, &o, &lse, &dy.gpu, &blocks, scale, budget, None);
                let (whole, grouped) = (within(usize::MAX)?, within(one_kv_head)?);
                let differ = differing(&whole, &grouped)?;
                push_exact(checks, name("backward: dS tiles one kv head at a time (elements differing)"), differ);
            }
            // dQ from the stored dS tiles, and recomputed.
            for ds_tiles in [true, false] {
                let (dqg, dkg, dvg) = attention::attention_backward(&sg, &dy.gpu, true, ds_tiles, None)?.tokens()?;
                let how = if ds_tiles { "" } else { ", dQ recomputed" };
                push(checks, &name(&format!("backward: dq{how}")), &dqg, &dqc, OP_TOL)?;
                push(checks, &name(&format!("backward: dk{how}")), &dkg, &dkc, OP_TOL)?;
                push(checks, &name(&format!("backward: dv{how}")), &dvg, &dvc, OP_TOL)?;
            }
        }
    }

    // SwiGLU.
    let a = pair(&mut rng, &[n, f], 0.0, 1.0, gpu)?;
    let gate = pair(&mut rng, &[n, f], 0.0, 2.0, gpu)?;
    let (hc, sc) = ops::swiglu_forward(&a.cpu, &gate.cpu, false)?;
    let (hg, sg) = ops::swiglu_forward(&a.gpu, &gate.gpu, true)?;
    push(checks, "swiglu forward", &hg, &hc, OP_TOL)?;
    let dh = pair(&mut rng, &[n, f], 0.0, 1.0, gpu)?;
    let (dac, dgc) = ops::swiglu_backward(&sc, &dh.cpu, false)?;
    let (dag, dgg) = ops::swiglu_backward(&sg, &dh.gpu, true)?;
    push(checks, "swiglu backward: da", &dag, &dac, OP_TOL)?;
    push(checks, "swiglu backward: dg", &dgg, &dgc, OP_TOL)?;

    // Dropout: the kernel's hash must drop exactly the elements the CPU mask drops.
    #[cfg(feature = "cuda")]
    {
        let key = crate::rng::stream_key(5, &[3, 1]);
        let x = pair(&mut rng, &[n, f], 0.0, 1.0, gpu)?;
        let yc = (&x.cpu * ops::dropout_mask(key, n, f, 0.1, DType::F32, &Device::Cpu)?)?;
        let yg = crate::model::cuda::dropout(&x.gpu, key, 0.1, false)?.0;
        push(checks, "dropout (values)", &yg, &yc, OP_TOL)?;
        let dropped_c = yc.eq(0f32)?;
        let dropped_g = yg.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.eq(0f32)?;
        push_exact(checks, "dropout (same mask, elements differing)", differing(&dropped_c, &dropped_g)?);
        // The mask as bits, which the LoRA backward reads instead of hashing again.
        let bits = crate::model::cuda::dropout(&x.gpu, key, 0.1, true)?.1.expect("bits asked for").to_vec1::<u8>()?;
        let unpacked: Vec<u8> = (0..n * f).map(|i| (bits[i / 8] >> (i % 8)) & 1).collect();
        let unpacked = Tensor::from_vec(unpacked, (n, f), &Device::Cpu)?;
        push_exact(checks, "dropout mask bits (elements differing from the mask)", differing(&dropped_c, &unpacked)?);
    }

    // The embedding gathered from page-locked host memory (recomputation's offloaded table) against the
    // device table's rows: the same bits.
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = gpu {
        let table = pair(&mut rng, &[500, c], 0.0, 1.0, gpu)?;
        let ids: Vec<u32> = (0..n).map(|_| (rng.next_u64() % 500) as u32).collect();
        let ids = Tensor::from_vec(ids, n, gpu)?;
        let got = crate::model::cuda::HostTable::new(&table.gpu, dev)?.gather(&ids)?;
        let want = table.gpu.index_select(&ids, 0)?;
        push_exact(checks, "embedding from host memory (elements differing)", differing(&got, &want)?);
    }

    // LoRA folded into a frozen linear, forward and backward, with the kernel's dropout against the mask:
    // rank 8 (the kernels with 16-byte accesses) and rank 16.
    #[cfg(feature = "cuda")]
    for r in [8usize, 16] {
        use crate::model::ops::Dropout;
        let (fan_in, fan_out) = (c, 3 * c);
        let key = crate::rng::stream_key(9, &[1, 0]);
        let x = pair(&mut rng, &[n, fan_in], 0.0, 1.0, gpu)?;
        let a = pair(&mut rng, &[r, fan_in], 0.0, 0.1, gpu)?;
        let lb = pair(&mut rng, &[fan_out, r], 0.0, 0.1, gpu)?;
        let y = pair(&mut rng, &[n, fan_out], 0.0, 1.0, gpu)?;
        let dy = pair(&mut rng, &[n, fan_out], 0.0, 1.0, gpu)?;
        let dx = pair(&mut rng, &[n, fan_in], 0.0, 1.0, gpu)?;
        let mask = Dropout::Mask(ops::dropout_mask(key, n, fan_in, 0.1, DType::F32, &Device::Cpu)?);
        let sc = ops::lora_forward(&x.cpu, &a.cpu, 4.0, Some(mask))?;
        let sg = ops::lora_forward(&x.gpu, &a.gpu, 4.0, Some(Dropout::Key { key, p: 0.1, bits: None }))?;
        // Fresh copies: the fused path adds in place.
        let yc = ops::lora_add(y.cpu.copy()?, sc.u(), &lb.cpu, false)?;
        let yg = ops::lora_add(y.gpu.copy()?, sg.u(), &lb.gpu, true)?;
        push(checks, &format!("lora r{r} forward (added to the output)"), &yg, &yc, OP_TOL)?;
        let (dxc, dac, dbc) = ops::lora_backward(&sc, &a.cpu, &lb.cpu, 4.0, &dy.cpu, ops::InputGrad::Add(dx.cpu.copy()?), false)?;
        let (dxg, dag, dbg) = ops::lora_backward(&sg, &a.gpu, &lb.gpu, 4.0, &dy.gpu, ops::InputGrad::Add(dx.gpu.copy()?), true)?;
        let (dxc, dxg) = (dxc.expect("asked for"), dxg.expect("asked for"));
        push(checks, &format!("lora r{r} backward: dx (added to the input gradient)"), &dxg, &dxc, OP_TOL)?;
        push(checks, &format!("lora r{r} backward: dA"), &dag, &dac, OP_TOL)?;
        push(checks, &format!("lora r{r} backward: dB"), &dbg, &dbc, OP_TOL)?;
        // The same written first with the frozen linear's GEMM adding into it (the low-rank tensor-core kernel
        // and cuBLAS beta = 1), forward and backward.
        let w = pair(&mut rng, &[fan_out, fan_in], 0.0, 0.05, gpu)?;
        let yc = ops::linear_forward_delta(&x.cpu, &w.cpu, Some((sc.u(), &lb.cpu)), false)?;
        let yg = ops::linear_forward_delta(&x.gpu, &w.gpu, Some((sg.u(), &lb.gpu)), true)?;
        push(checks, &format!("lora r{r} with its linear: x W^T + u B^T"), &yg, &yc, OP_TOL)?;
        let res = pair(&mut rng, &[n, fan_out], 0.0, 1.0, gpu)?;
        let yc = ops::linear_forward_onto(&x.cpu, &w.cpu, Some((sc.u(), &lb.cpu)), Some(&res.cpu), false, false)?;
        let yg = ops::linear_forward_onto(&x.gpu, &w.gpu, Some((sg.u(), &lb.gpu)), Some(&res.gpu), true, true)?;
        push(checks, &format!("lora r{r} with its linear onto the residual: res + x W^T + u B^T"), &yg, &yc, OP_TOL)?;
        let dxc = ops::lora_backward(&sc, &a.cpu, &lb.cpu, 4.0, &dy.cpu, ops::InputGrad::Linear(&w.cpu), false)?.0.expect("asked for");
        let dxg = ops::lora_backward(&sg, &a.gpu, &lb.gpu, 4.0, &dy.gpu, ops::InputGrad::Linear(&w.gpu), true)?.0.expect("asked for");
        push(checks, &format!("lora r{r} with its linear: dy W + dropout(du A)"), &dxg, &dxc, OP_TOL)?;
    }

    // The branch's way in as one kernel (lora_a: what lora_forward above ran with the key dropout), at rows
    // not a multiple of 16 and columns not a multiple of 256: h and the mask bits exactly as the dropout
    // kernel's, u against the CPU's masked product.
    #[cfg(feature = "cuda")]
    {
        use crate::model::cuda;
        let (rows, cols, key) = (100usize, f, crate::rng::stream_key(9, &[2, 0]));
        let x = pair(&mut rng, &[rows, cols], 0.0, 1.0, gpu)?;
        let mask = ops::dropout_mask(key, rows, cols, 0.1, DType::F32, &Device::Cpu)?;
        let (want_h, want_bits) = cuda::dropout(&x.gpu, key, 0.1, true)?;
        for r in [8usize, 24] {
            let a = pair(&mut rng, &[r, cols], 0.0, 0.1, gpu)?;
            let (h, ug, bits) = cuda::lora_a(&x.gpu, &a.gpu, 2.0, key, 0.1)?.expect("rank and columns the kernel takes");
            push_exact(checks, format!("lora r{r} way in: dropout(x) against the dropout kernel's (elements differing)"), differing(&h, &want_h)?);
            push_exact(checks, format!("lora r{r} way in: mask bits against the dropout kernel's (bytes differing)"), differing(&bits, want_bits.as_ref().expect("asked for"))?);
            let uc = ((&x.cpu * &mask)?.matmul(&a.cpu.t()?)? * 2.0)?;
            push(checks, &format!("lora r{r} way in: u = scale dropout(x) A^T"), &ug, &uc, OP_TOL)?;
        }
    }

    // lm_head + cross-entropy over a real-size vocabulary, every other row counted.
    let vocab = 151_936;
    let hf = pair(&mut rng, &[n, c], 0.0, 1.0, gpu)?;
    let lm = pair(&mut rng, &[vocab, c], 0.0, 0.2, gpu)?;
    let labels: Vec<Vec<i64>> =
        (0..b).map(|_| (0..t).map(|i| if i % 2 == 0 { (rng.next_u64() % vocab as u64) as i64 } else { -100 }).collect()).collect();
    let targets = Targets::from_labels(&labels, vocab)?;
    let (lc, dc) = loss::cross_entropy(&hf.cpu, &lm.cpu, &targets, 16, true, false)?;
    let (lg, dg) = loss::cross_entropy(&hf.gpu, &lm.gpu, &targets, 16, true, true)?;
    push(checks, "cross-entropy: loss", &lg, &lc, OP_TOL)?;
    push(checks, "cross-entropy: d(hidden)", &dg.expect("grad"), &dc.expect("grad"), OP_TOL)?;

    // An input feeding two linears (the MLP's up and gate): the second input gradient added by its GEMM.
    let (dya, dyg) = (pair(&mut rng, &[n, f], 0.0, 1.0, gpu)?, pair(&mut rng, &[n, f], 0.0, 1.0, gpu)?);
    let (wu, wg) = (pair(&mut rng, &[f, c], 0.0, 0.05, gpu)?, pair(&mut rng, &[f, c], 0.0, 0.05, gpu)?);
    let want = ops::linear_backward_add(ops::linear_backward(&dya.cpu, &wu.cpu)?, &dyg.cpu, &wg.cpu, false)?;
    let got = ops::linear_backward_add(ops::linear_backward(&dya.gpu, &wu.gpu)?, &dyg.gpu, &wg.gpu, true)?;
    push(checks, "two linears' input gradients, the second added by its GEMM", &got, &want, OP_TOL)?;
    Ok(())
}

/// The optimizer: three AdamW steps (scaled gradients) over tensors of adapter-like shapes, one launch a step
/// on the GPU with the moments updated in place, against the composite ops on the CPU, f32 both; and the
/// gradient norm from one launch.
fn optimizer_check(gpu: &Device, checks: &mut Vec<Check>) -> Result<()> {
    use crate::train::optim::{global_norm_with, AdamW, AdamWConfig};
    let mut rng = SplitMix::new(23);
    let shapes: [&[usize]; 3] = [&[8, 352], &[128, 8], &[5]];
    let mut random = |shape: &[usize]| -> Result<Tensor> {
        let n: usize = shape.iter().product();
        Ok(Tensor::from_vec((0..n).map(|_| rng.normal() as f32).collect::<Vec<_>>(), shape, &Device::Cpu)?)
    };
    let mut cpu = shapes.iter().map(|s| random(s)).collect::<Result<Vec<_>>>()?;
    let mut on_gpu = cpu.iter().map(|t| t.to_device(gpu)).collect::<candle_core::Result<Vec<_>>>()?;
    let names: Vec<String> = (0..shapes.len()).map(|i| format!("p{i}")).collect();
    let mut oc = AdamW::new(AdamWConfig::default(), names.clone(), &cpu.iter().collect::<Vec<_>>())?;
    oc.fused = false;
    let mut og = AdamW::new(AdamWConfig::default(), names, &on_gpu.iter().collect::<Vec<_>>())?;
    let mut norms = (0.0, 0.0);
    for _ in 0..3 {
        let gc = shapes.iter().map(|s| random(s)).collect::<Result<Vec<_>>>()?;
        let gg = gc.iter().map(|t| t.to_device(gpu)).collect::<candle_core::Result<Vec<_>>>()?;
        norms = (global_norm_with(&gc.iter().collect::<Vec<_>>(), false)?, global_norm_with(&gg.iter().collect::<Vec<_>>(), true)?);
        oc.step_scaled(&mut cpu.iter_mut().collect::<Vec<_>>(), &gc.iter().collect::<Vec<_>>(), 1e-2, 0.5)?;
        og.step_scaled(&mut on_gpu.iter_mut().collect::<Vec<_>>(), &gg.iter().collect::<Vec<_>>(), 1e-2, 0.5)?;
    }
    for (i, (g, c)) in on_gpu.iter().zip(&cpu).enumerate() {
        push(checks, &format!("AdamW, three steps in one launch each (moments in place): tensor {i}"), g, c, 1e-5)?;
    }
    let norm_err = (norms.1 - norms.0).abs() / norms.0;
    checks.push(Check { name: "gradient norm in one launch".into(), rel_err: norm_err, tolerance: 1e-5, ok: norm_err <= 1e-5 });

    // The update's factor worked out on the device (norm and clip coefficient, no wait for the host) against the
    // host's; and a non-finite gradient norm or loss making the update a no-op there.
    use crate::train::optim::GradScale;
    let gc = shapes.iter().map(|s| random(s)).collect::<Result<Vec<_>>>()?;
    let gg = gc.iter().map(|t| t.to_device(gpu)).collect::<candle_core::Result<Vec<_>>>()?;
    let finite_loss = Tensor::new(3.5f64, gpu)?;
    let host = GradScale::compute(&gc.iter().collect::<Vec<_>>(), None, 1e-3, Some(0.01), false)?;
    let dev = GradScale::compute(&gg.iter().collect::<Vec<_>>(), Some(&finite_loss), 1e-3, Some(0.01), true)?;
    let rel = |a: f64, b: f64| (a - b).abs() / b.abs().max(1e-30);
    let err = rel(dev.norm()?, host.norm()?).max(rel(dev.scale()?, host.scale()?));
    checks.push(Check {
        name: "gradient scale on the device (norm, clip coefficient)".into(),
        rel_err: err,
        tolerance: 1e-5,
        ok: err <= 1e-5 && host.scale()? < 1e-3, // the clip took effect
    });
    let nan_grads: Vec<Tensor> = gg.iter().map(|t| t * f64::NAN).collect::<candle_core::Result<_>>()?;
    let cases = [(&nan_grads, Tensor::new(3.5f64, gpu)?), (&gg, Tensor::new(f64::NAN, gpu)?)];
    let mut changed = 0.0;
    for (grads, loss) in cases {
        let refs: Vec<&Tensor> = grads.iter().collect();
        let before = on_gpu.clone();
        let scale = GradScale::compute(&refs, Some(&loss), 1e-3, Some(0.01), true)?;
        og.step_with(&mut on_gpu.iter_mut().collect::<Vec<_>>(), &refs, 1e-2, &scale)?;
        for (a, b) in on_gpu.iter().zip(&before) {
            changed += differing(a, b)?;
        }
    }
    push_exact(checks, "a non-finite gradient norm or loss skips the update on the device (elements changed)", changed);
    Ok(())
}

/// A 4-layer model of every family, CPU f32 vs GPU bf16 with every fused kernel (flash attention included:
/// head dim 128): loss and adapter gradients, dropout on, every linear adapted.
fn model_checks(gpu: &Device, checks: &mut Vec<Check>) -> Result<()> {
    for family in Family::ALL {
        let spec = TinySpec { num_layers: 4, hidden_size: 256, num_heads: 2, head_dim: Some(128), intermediate_size: 1024, seq_length: 256, ..TinySpec::of_family(family) };
        let spec = if family == Family::QwenV1 { spec } else { TinySpec { num_heads: 4, num_kv_heads: 2, ..spec } };
        model_check(gpu, checks, spec.config())?;
    }
    Ok(())
}

fn model_check(gpu: &Device, checks: &mut Vec<Check>, config: ModelConfig) -> Result<()> {
    let fam = config.family.model_type();
    let weights = Weights::random(&config, 0.05, DType::F32, &Device::Cpu)?;
    // The GPU model holds the bf16 weights; the CPU model the same values back in f32.
    let weights_gpu = weights.to(DType::BF16, gpu)?;
    let weights_cpu = weights_gpu.to(DType::F32, &Device::Cpu)?;
    let mut cpu_model = Model::new(config.clone(), weights_cpu, DType::F32, &Device::Cpu);
    let mut gpu_model = Model::new(config.clone(), weights_gpu, DType::BF16, gpu);
    (cpu_model.loss_chunk, cpu_model.fusion) = (64, Fusion::NONE);
    (gpu_model.loss_chunk, gpu_model.fusion) = (64, Fusion::ALL);

    let lora_cfg = LoraConfig { r: 8, alpha: 32.0, dropout: 0.1, targets: vec!["all-linear".into()], base_model_name_or_path: "numerics".into() };
    let mut lora_cpu = Lora::new(lora_cfg, &config, 3, &Device::Cpu)?;
    // B starts at zero in a fresh adapter, which would make every dA zero: give it values.
    let mut rng = SplitMix::new(5);
    for p in lora_cpu.params_mut().into_iter().skip(1).step_by(2) {
        let n = p.elem_count();
        let v: Vec<f32> = (0..n).map(|_| (0.02 * rng.normal()) as f32).collect();
        *p = Tensor::from_vec(v, p.shape(), &Device::Cpu)?;
    }
    let mut lora_gpu = lora_cpu.clone();
    for p in lora_gpu.params_mut() {
        *p = p.to_device(gpu)?;
    }

    let (b, t) = (2usize, 96usize);
    let ids: Vec<u32> = (0..b * t).map(|_| (rng.next_u64() % 151_000) as u32).collect();
    let labels: Vec<i64> = ids.iter().enumerate().map(|(i, &id)| if i % 5 == 0 { -100 } else { id as i64 }).collect();
    let ids = Tensor::from_vec(ids, (b, t), &Device::Cpu)?;
    let labels = Tensor::from_vec(labels, (b, t), &Device::Cpu)?;
    // The worst relative error of a GPU model's adapter gradients against the CPU's, and its tensor's name.
    let worst_of = |oc: &crate::model::transformer::LossAndGrads, og: &crate::model::transformer::LossAndGrads| -> Result<(f64, String)> {
        let (mut worst, mut worst_name) = (0.0f64, String::new());
        for ((name, gc), gg) in lora_cpu.param_names().iter().zip(oc.grads.tensors()).zip(og.grads.tensors()) {
            let e = rel_err(gg, gc)?;
            if e > worst {
                (worst, worst_name) = (e, name.clone());
            }
        }
        Ok((worst, worst_name))
    };
    // bf16 itself sets a floor: the same step through candle's composite bf16 ops on the GPU (checked only
    // for sanity, within twice GRAD_TOL). The fused kernels pass within GRAD_TOL, or within a fifth above
    // that floor where the floor is itself near it (the worst of 20-odd tensors after four layers of bf16
    // rounding is a noisy maximum).
    gpu_model.fusion = Fusion::NONE;
    let plain = gpu_model.loss_and_grads(&ids, &labels, None, &lora_gpu, &mut SplitMix::new(9), false)?;
    gpu_model.fusion = Fusion::ALL;
    let oc = cpu_model.loss_and_grads(&ids, &labels, None, &lora_cpu, &mut SplitMix::new(9), false)?;
    let (floor, floor_name) = worst_of(&oc, &plain)?;
    checks.push(Check { name: format!("model adapter gradients, composite bf16 ops ({fam}, the floor): {floor_name}"), rel_err: floor, tolerance: 2.0 * GRAD_TOL, ok: floor <= 2.0 * GRAD_TOL });
    let grad_tol = GRAD_TOL.max(1.2 * floor);
    for recompute in [false, true] {
        let tag = if recompute { format!(" ({fam}, recompute)") } else { format!(" ({fam})") };
        let oc = cpu_model.loss_and_grads(&ids, &labels, None, &lora_cpu, &mut SplitMix::new(9), recompute)?;
        let og = gpu_model.loss_and_grads(&ids, &labels, None, &lora_gpu, &mut SplitMix::new(9), recompute)?;
        let loss_err = (og.loss_sum()? - oc.loss_sum()?).abs() / oc.loss_sum()?.abs();
        checks.push(Check { name: format!("model loss{tag}"), rel_err: loss_err, tolerance: LOSS_TOL, ok: loss_err <= LOSS_TOL });
        let (worst, worst_name) = worst_of(&oc, &og)?;
        checks.push(Check { name: format!("model adapter gradients, worst of all{tag}: {worst_name}"), rel_err: worst, tolerance: grad_tol, ok: worst <= grad_tol });
    }

    // Reproducibility: the same step twice on the GPU gives the same loss and gradients, bit for bit, and
    // so does the gradient norm the optimizer clips with.
    let a = gpu_model.loss_and_grads(&ids, &labels, None, &lora_gpu, &mut SplitMix::new(9), false)?;
    let b = gpu_model.loss_and_grads(&ids, &labels, None, &lora_gpu, &mut SplitMix::new(9), false)?;
    let mut differ = (a.loss_sum()? != b.loss_sum()?) as u8 as f64;
    for (ga, gb) in a.grads.tensors().iter().zip(b.grads.tensors()) {
        differ += differing(ga, gb)?;
    }
    let norms = (crate::train::optim::global_norm(&a.grads.tensors())?, crate::train::optim::global_norm(&b.grads.tensors())?);
    differ += (norms.0 != norms.1) as u8 as f64;
    push_exact(checks, format!("the same GPU step twice ({fam}): values differing (loss, gradients, gradient norm)"), differ);
    packed_check(&gpu_model, &lora_gpu, &fam, checks)
}

/// Padding-free against padded on the GPU: three records of different lengths as padded micro-batches of
/// two (every fused kernel) and laid end to end in one row (composite RoPE and block-diagonal attention);
/// the summed losses and gradients must agree within bf16 rounding. No dropout: its masks are drawn per pass.
fn packed_check(model: &Model, lora: &Lora, fam: &str, checks: &mut Vec<Check>) -> Result<()> {
    use crate::data::{batch::Layout, TokenStream};
    use crate::manifest::Packing;
    let mut lora = lora.clone();
    lora.config.dropout = 0.0;
    let lengths = [96usize, 40, 71];
    let n: usize = lengths.iter().sum();
    let mut rng = SplitMix::new(17);
    let stream = TokenStream {
        lengths: lengths.iter().map(|&l| l as u32).collect(),
        ids: (0..n).map(|_| (rng.next_u64() % 151_000) as u32).collect(),
        trained: (0..n).map(|i| (i % 7 != 0) as u8).collect(),
        dataset: vec![0; lengths.len()],
        n_train: lengths.len(),
    };
    let sums = |packing| -> Result<(f64, Vec<Tensor>)> {
        let layout = Layout { packing, micro_batch: 2, tokens_per_pass: n, pad: 0 };
        let (mut loss, mut grads) = (0.0, None::<crate::model::LoraGrads>);
        for b in layout.passes(&stream, &stream.offsets(), &[0, 1, 2]) {
            let (ids, labels) = b.tensors()?;
            let out = model.loss_and_grads(&ids, &labels, b.cu_seqlens.as_deref(), &lora, &mut SplitMix::new(9), false)?;
            loss += out.loss_sum()?;
            match grads.as_mut() {
                Some(g) => g.add_assign(&out.grads)?,
                None => grads = Some(out.grads),
            }
        }
        Ok((loss, grads.expect("three records make passes").tensors().into_iter().cloned().collect()))
    };
    let (padded, padded_grads) = sums(Packing::None)?;
    let (packed, packed_grads) = sums(Packing::PaddingFree)?;
    let loss_err = (packed - padded).abs() / padded.abs();
    checks.push(Check { name: format!("padding-free vs padded loss ({fam})"), rel_err: loss_err, tolerance: LOSS_TOL, ok: loss_err <= LOSS_TOL });
    let mut worst = 0.0f64;
    for (g, want) in packed_grads.iter().zip(&padded_grads) {
        worst = worst.max(rel_err(g, &want.to_device(&Device::Cpu)?)?);
    }
    checks.push(Check { name: format!("padding-free vs padded adapter gradients, worst of all ({fam})"), rel_err: worst, tolerance: GRAD_TOL, ok: worst <= GRAD_TOL });
    Ok(())
}
