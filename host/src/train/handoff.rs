//! What rank 0 hands the other ranks at the start of a run, so that they need nothing but the manifest
//! and the model files: the token stream (the data pipeline runs once, on rank 0), the step to start at
//! with each remaining step's learning rate (the scheduler plugin runs on rank 0), and the adapter and
//! optimizer state (fresh or from rank 0's checkpoint). On one rank nothing moves.
use super::dist::Collective;
use super::optim::AdamW;
use crate::data::{cache, TokenStream};
use crate::model::lora::Lora;
use anyhow::{bail, Context, Result};

/// Where every rank starts.
pub struct Start {
    pub stream: TokenStream,
    /// The padding token id.
    pub pad: u32,
    /// Optimizer steps already done (from the checkpoint).
    pub step: u64,
    /// The learning rate of each step from `step` to the end of the run.
    pub lrs: Vec<f64>,
}

impl Start {
    /// Optimizer steps of the whole run.
    pub fn total(&self) -> u64 {
        self.step + self.lrs.len() as u64
    }
}

/// Rank 0 gives its `Start` (`Some`), the others `None`; every rank gets rank 0's.
pub fn share_start(comm: &dyn Collective, mine: Option<Start>) -> Result<Start> {
    if comm.world_size() == 1 {
        return mine.context("rank 0 of 1 has no start to share");
    }
    let mut head = Vec::new();
    let mut stream = Vec::new();
    if let Some(s) = &mine {
        head.extend_from_slice(&s.pad.to_le_bytes());
        head.extend_from_slice(&s.step.to_le_bytes());
        s.lrs.iter().for_each(|lr| head.extend_from_slice(&lr.to_le_bytes()));
        stream = cache::encode(&s.stream);
    }
    comm.broadcast(&mut head, 0)?;
    comm.broadcast(&mut stream, 0)?;
    if let Some(s) = mine {
        return Ok(s);
    }
    if head.len() < 12 || (head.len() - 12) % 8 != 0 {
        bail!("rank {}: the start rank 0 sent is {} bytes, not a start (a lorahost of another version?)", comm.rank(), head.len());
    }
    let pad = u32::from_le_bytes(head[0..4].try_into().expect("4 bytes"));
    let step = u64::from_le_bytes(head[4..12].try_into().expect("8 bytes"));
    let lrs = head[12..].chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes"))).collect();
    let stream = cache::decode(&stream).with_context(|| format!("rank {}: the token stream rank 0 sent", comm.rank()))?;
    Ok(Start { stream, pad, step, lrs })
}

/// Every rank's adapter and optimizer state becomes rank 0's, bit for bit.
pub fn share_state(comm: &dyn Collective, lora: &mut Lora, opt: &mut AdamW) -> Result<()> {
    if comm.world_size() == 1 {
        return Ok(());
    }
    let names = lora.param_names();
    let (mut params, mut moments) = (Vec::new(), Vec::new());
    if comm.is_root() {
        let mut tensors = Vec::new();
        for (name, t) in names.iter().zip(lora.params()) {
            tensors.push((name.clone(), t.to_device(&candle_core::Device::Cpu)?));
        }
        params = safetensors::serialize(tensors, None).context("serialising the adapter for the other ranks")?;
        moments = opt.to_bytes()?;
    }
    comm.broadcast(&mut params, 0)?;
    comm.broadcast(&mut moments, 0)?;
    if comm.is_root() {
        return Ok(());
    }
    let origin = format!("rank {}: the adapter rank 0 sent", comm.rank());
    let st = safetensors::SafeTensors::deserialize(&params).map_err(|e| anyhow::anyhow!("{origin}: {e}"))?;
    for (name, p) in names.iter().zip(lora.params_mut()) {
        let view = st.tensor(name).map_err(|_| anyhow::anyhow!("{origin}: no tensor {name} (the ranks' adapters differ)"))?;
        if view.shape() != p.dims() {
            bail!("{origin}: {name} has shape {:?}, this rank's {:?}", view.shape(), p.dims());
        }
        *p = candle_core::safetensors::Load::load(&view, p.device())?.to_dtype(p.dtype())?;
    }
    let fused = opt.fused;
    *opt = AdamW::from_bytes(&moments, &format!("rank {}: the optimizer state rank 0 sent", comm.rank()), opt.config.clone(), names, &lora.params())?;
    opt.fused = fused;
    Ok(())
}
