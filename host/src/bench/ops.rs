//! `lorahost bench ops`: where a training step's time goes. Each op of one layer at the named shape (the
//! same `ops::` / `attention::` / `loss::` calls the model makes, with the chosen fused kernels), the loss
//! and the optimizer step are timed alone on the device; times the number of calls per step, their sum
//! predicts the step that `bench train` measures.
use super::train::{shape, Options};
use crate::model::lora::{Lora, LoraConfig, LoraGrads};
use crate::model::attention::{self, Rope};
use crate::model::loss::{self, Targets};
use crate::model::ops::{self, Dropout};
use crate::train::optim::{self, AdamW, AdamWConfig};
use anyhow::Result;
use candle_core::{Device, Tensor};
use std::time::Instant;

#[derive(Debug, Clone, serde::Serialize)]
pub struct OpTime {
    pub op: String,
    /// One call, averaged over repetitions.
    pub ms: f64,
    pub calls_per_step: usize,
    /// ms * calls_per_step.
    pub step_ms: f64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct OpsReport {
    pub shape: String,
    pub micro_batch: usize,
    pub seq: usize,
    pub recompute: bool,
    pub ops: Vec<OpTime>,
    /// The sum of `step_ms`: the step these ops predict.
    pub predicted_step_ms: f64,
}

/// Mean ms of `f` over `reps` calls after two warm-up calls, the device synchronised around them.
fn time(device: &Device, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    f()?;
    device.synchronize()?;
    let t0 = Instant::now();
    for _ in 0..reps {
        f()?;
    }
    device.synchronize()?;
    Ok(t0.elapsed().as_secs_f64() * 1e3 / reps as f64)
}

pub fn run(o: &Options) -> Result<OpsReport> {
    let cfg = shape(&o.shape)?;
    let dev = &o.device;
    let dt = o.dtype;
    let f = o.fusion;
    let (b, t) = (o.micro_batch, o.seq);
    let (n, c, h, d) = (b * t, cfg.hidden_size, cfg.num_heads, cfg.head_dim);
    let (ff, qkv) = (cfg.mlp_width, cfg.qkv_width());
    let layers = cfg.num_layers;
    // Recomputation runs each layer's forward twice, but the top one's (its backward comes first: it keeps its state).
    let fwd = if o.recompute { 2 * layers - 1 } else { layers };
    let rnd = |shape: &[usize], std: f64| -> Result<Tensor> { Ok(Tensor::randn(0f32, std as f32, shape, dev)?.to_dtype(dt)?) };
    let reps = 10;
    let mut rows: Vec<OpTime> = Vec::new();
    let mut add = |op: &str, ms: f64, calls: usize| {
        rows.push(OpTime { op: op.into(), ms, calls_per_step: calls, step_ms: ms * calls as f64 });
    };

    // Frozen linears, forward x W^T and backward dy W.
    for (name, fan_in, fan_out, count) in
        [("q|k|v", c, qkv, 1), ("o", cfg.q_width(), c, 1), ("up / gate", c, ff, 2), ("down", ff, c, 1)]
    {
        let w = rnd(&[fan_out, fan_in], 0.02)?;
        let x = rnd(&[n, fan_in], 1.0)?;
        let dy = rnd(&[n, fan_out], 1.0)?;
        add(&format!("linear {name} forward"), time(dev, reps, || Ok(drop(ops::linear_forward(&x, &w, None)?)))?, count * fwd);
        add(&format!("linear {name} backward"), time(dev, reps, || Ok(drop(ops::linear_backward(&dy, &w)?)))?, count * layers);
    }

    // LoRA (r 8, dropout 0.1) on the recipe's adapted sites, as the model runs it: the branch (dropout, u), its
    // delta written first with the frozen linear's GEMM adding into it (ops::linear_forward_onto; o and down
    // onto the residual stream, the residual add folded in), and back. Each row is what the branch adds to its
    // linear: the pair's time less the linear's alone (rows above).
    for (name, fan_in, fan_out, onto_residual) in [("q|k|v", c, qkv, false), ("o", cfg.q_width(), c, true), ("down", ff, c, true)] {
        let a = Tensor::randn(0f32, 0.01, (8, fan_in), dev)?;
        let bm = Tensor::randn(0f32, 0.01, (fan_out, 8), dev)?;
        let w = rnd(&[fan_out, fan_in], 0.02)?;
        let x = rnd(&[n, fan_in], 1.0)?;
        let dy = rnd(&[n, fan_out], 1.0)?;
        let dropout = || -> Result<Dropout> {
            Ok(match crate::model::fusion::on(f.dropout, &x) {
                true => Dropout::Key { key: 7, p: 0.1, bits: None },
                false => Dropout::Mask(ops::dropout_mask(7, n, fan_in, 0.1, dt, dev)?),
            })
        };
        let res = rnd(&[n, fan_out], 1.0)?;
        let res = onto_residual.then_some(&res);
        let forward = || -> Result<()> {
            let saved = ops::lora_forward(&x, &a, 4.0, Some(dropout()?))?;
            drop(ops::linear_forward_onto(&x, &w, Some((saved.u(), &bm)), res, f.lora, f.norm)?);
            Ok(())
        };
        let linear_fwd = time(dev, reps, || Ok(drop(ops::linear_forward(&x, &w, None)?)))?;
        let label = if onto_residual { "forward onto the residual (beyond its linear)" } else { "forward (beyond its linear)" };
        add(&format!("lora {name} {label}"), time(dev, reps, forward)? - linear_fwd, fwd);
        let saved = ops::lora_forward(&x, &a, 4.0, Some(dropout()?))?;
        let backward = || Ok(drop(ops::lora_backward(&saved, &a, &bm, 4.0, &dy, ops::InputGrad::Linear(&w), f.lora)?));
        let linear_bwd = time(dev, reps, || Ok(drop(ops::linear_backward(&dy, &w)?)))?;
        add(&format!("lora {name} backward (beyond its linear)"), time(dev, reps, backward)? - linear_bwd, layers);
        // Its rank-8 GEMMs alone (already inside the two rows above: not added again).
        let (a16, b16) = (a.to_dtype(dt)?, bm.to_dtype(dt)?);
        let u = saved.u().clone();
        add(&format!("  of which x A^T ({name})"), time(dev, reps, || Ok(drop(x.matmul(&a16.t()?)?)))?, 0);
        add(&format!("  of which dy B ({name})"), time(dev, reps, || Ok(drop(dy.matmul(&b16)?)))?, 0);
        add(&format!("  of which dy^T u ({name})"), time(dev, reps, || Ok(drop(dy.t()?.matmul(&u)?)))?, 0);
        add(&format!("  of which du^T h ({name})"), time(dev, reps, || Ok(drop(u.t()?.matmul(&x)?)))?, 0);
        // What the key dropout runs instead of the dropout kernel and x A^T: one pass over x.
        #[cfg(feature = "cuda")]
        if crate::model::fusion::on(f.dropout, &x) {
            let way_in = || Ok(drop(crate::model::cuda::lora_a(&x, &a16, 4.0, 7, 0.1)?));
            add(&format!("  of which dropout(x), x A^T in one kernel ({name})"), time(dev, reps, way_in)?, 0);
        }
    }

    // Norms and residual adds (two per layer; the final norm once).
    let x = rnd(&[n, c], 1.0)?;
    let w = (Tensor::ones(c, dt, dev)? * 1.1)?;
    let dy = rnd(&[n, c], 1.0)?;
    add("rmsnorm forward", time(dev, reps, || Ok(drop(ops::rmsnorm_forward(&x, &w, 1e-6, f.norm)?)))?, 2 * fwd + 1);
    let (_, saved) = ops::rmsnorm_forward(&x, &w, 1e-6, f.norm)?;
    add("rmsnorm backward (+ residual)", time(dev, reps, || Ok(drop(ops::rmsnorm_backward(&saved, &w, &dy, Some(&x), f.norm)?)))?, 2 * layers + 1);
    // With the adapter on o and down (the recipe) the adds are in the LoRA rows below.
    add("residual add (in the LoRA rows)", time(dev, reps, || Ok(drop(ops::residual_add(&x, &dy, f.norm)?)))?, 0);

    // Attention: layout + RoPE, the attention itself, heads merged.
    let rope = Rope::new(t, d, cfg.rope_base, &cfg.rope_scaling, dt, dev)?;
    let heads = attention::Heads { b, t, h, hkv: cfg.num_kv_heads, d };
    let qkv_in = rnd(&[n, qkv], 1.0)?;
    let bias = rnd(&[qkv], 0.1)?;
    // The LoRA delta is in the GEMM's output already (the lora rows above), as in the model.
    let qkv_fwd = || attention::qkv_forward(&qkv_in, Some(&bias), None, &rope, heads, f.rope, f.norm);
    add("qkv split + rope", time(dev, reps, || Ok(drop(qkv_fwd()?)))?, fwd);
    let (q, k, v, qkv_saved) = qkv_fwd()?;
    let mask = match crate::model::fusion::on(f.attention, &q) {
        true => None,
        false => Some(attention::causal_mask(t, dt, dev)?),
    };
    // As the model decides: flash attention wherever its kernels run.
    let flash = match attention::flash_runs(f, dt, dev, d) {
        true => Some(attention::FlashBlocks::rows(b, t, dev)?),
        false => None,
    };
    let attn_fwd = || attention::attention_forward(&q, &k, &v, cfg.kv_groups(), mask.as_ref(), f.attention, flash.as_ref());
    add("attention forward", time(dev, reps, || Ok(drop(attn_fwd()?)))?, fwd);
    // The output is token-major (c_proj's input; the scores paths merge the heads inside), and so is its
    // gradient; flash attention's backward writes d(qkv) with RoPE undone, the scores paths leave the merge
    // (qkv backward) to do.
    let (y, saved) = attn_fwd()?;
    let attn_bwd = || attention::attention_backward(&saved, &y, f.attention, f.ds_tiles, Some(&rope));
    add("attention backward", time(dev, reps, || Ok(drop(attn_bwd()?)))?, layers);
    let grads = attn_bwd()?;
    let qkv_bwd = || attention::qkv_backward_of(&qkv_saved, grads.clone(), &rope, heads, f.rope, f.norm);
    add("qkv backward", time(dev, reps, || Ok(drop(qkv_bwd()?)))?, layers);

    // SwiGLU.
    let a = rnd(&[n, ff], 1.0)?;
    let g = rnd(&[n, ff], 1.0)?;
    add("swiglu forward", time(dev, reps, || Ok(drop(ops::swiglu_forward(&a, &g, f.swiglu)?)))?, fwd);
    let (hm, saved) = ops::swiglu_forward(&a, &g, f.swiglu)?;
    add("swiglu backward", time(dev, reps, || Ok(drop(ops::swiglu_backward(&saved, &hm, f.swiglu)?)))?, layers);

    // lm_head + loss over every position, forward and backward.
    let hf = rnd(&[n, c], 1.0)?;
    let lm = rnd(&[cfg.vocab_size, c], 0.02)?;
    let labels: Vec<Vec<i64>> = (0..b).map(|r| (0..t).map(|i| ((r * 7919 + i * 104_729) % 151_000) as i64).collect()).collect();
    let targets = Targets::from_labels(&labels, cfg.vocab_size)?;
    let chunk = loss::default_chunk(dev); // as the model takes it
    add("lm_head + loss, forward and backward", time(dev, 3, || Ok(drop(loss::cross_entropy(&hf, &lm, &targets, chunk, true, f.loss)?)))?, 1);

    // The optimizer step over every adapter: normalise, clip, AdamW.
    let lora_cfg = LoraConfig { r: 8, alpha: 32.0, dropout: 0.1, targets: super::train::recipe_targets(cfg.family), base_model_name_or_path: o.shape.clone() };
    let mut lora = Lora::new(lora_cfg, &cfg, 1, dev)?;
    let mut opt = AdamW::new(AdamWConfig::default(), lora.param_names(), &lora.params())?;
    opt.fused = f.optimizer;
    let mut grads = LoraGrads::zeros_like(&lora)?;
    for gt in grads.tensors_mut() {
        *gt = gt.randn_like(0.0, 1e-3)?;
    }
    let ms = time(dev, 3, || {
        let norm = optim::global_norm_with(&grads.tensors(), f.optimizer)? * 0.5;
        opt.step_scaled(&mut lora.params_mut(), &grads.tensors(), 1e-4, 0.5 * optim::clip_coefficient(norm, 1.0))?;
        Ok(())
    })?;
    add("optimizer: norm, clip, AdamW", ms, 1);

    let predicted_step_ms = rows.iter().map(|r| r.step_ms).sum();
    Ok(OpsReport { shape: o.shape.clone(), micro_batch: b, seq: t, recompute: o.recompute, ops: rows, predicted_step_ms })
}
