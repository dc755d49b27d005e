//! Opening the device a model trains on: `cpu`, `cuda` (the first GPU) or `cuda:N`.

use anyhow::{bail, Result};
use candle_core::Device;

/// Opens `cpu`, `cuda` or `cuda:N`. A GPU is prepared for training: its stream-ordered memory pool keeps freed
/// memory instead of returning it to the driver at every synchronisation (the pool's default), which would
/// unmap and map again gigabytes of activations each step; and its tensors skip cross-stream event tracking.
pub fn open(spec: &str) -> Result<Device> {
    if spec == "cpu" {
        return Ok(Device::Cpu);
    }
    let spec = if spec == "cuda" { "cuda:0" } else { spec };
    let Some(ordinal) = spec.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()) else {
        bail!("`{spec}` is not \"cpu\", \"cuda\" or \"cuda:N\"");
    };
    let device = Device::new_cuda(ordinal)?;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = &device {
        super::cuda::keep_pool_memory(d)?;
        // Every kernel of a run goes to candle's one stream, so cudarc's cross-stream tracking (two events
        // created per allocation, recorded and waited on per use) orders nothing and costs the host ~2 ms a
        // step at the step's ends, where the device waits for it.
        // SAFETY: no tensor made on this device is used on another stream.
        unsafe { d.disable_event_tracking() };
    }
    Ok(device)
}
