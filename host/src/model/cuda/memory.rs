//! The stream-ordered memory pool candle allocates from: its peak, and keeping freed memory between steps.
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::Result;

// ----- memory ---------------------------------------------------------------------------------------------

/// The stream-ordered memory pool candle allocates from (cudarc uses cuMemAllocAsync when it can).
fn default_pool(dev: &CudaDevice) -> Result<candle_core::cuda_backend::cudarc::driver::sys::CUmemoryPool> {
    use candle_core::cuda_backend::cudarc::driver::result;
    let ctx = dev.cuda_stream().context().clone();
    ctx.bind_to_thread().w()?;
    // SAFETY: the device handle comes from a live context.
    unsafe { result::device::get_default_mem_pool(ctx.cu_device()) }.w()
}

/// Highest bytes in use by tensors since the last [`reset_peak_memory`] (the equivalent of PyTorch's
/// `max_memory_allocated`).
pub fn peak_memory(dev: &CudaDevice) -> Result<u64> {
    use candle_core::cuda_backend::cudarc::driver::{result, sys};
    let pool = default_pool(dev)?;
    let mut v: u64 = 0;
    // SAFETY: USED_MEM_HIGH is a cuuint64_t attribute.
    unsafe { result::mem_pool::get_attribute(pool, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH, &mut v as *mut u64 as *mut _) }.w()?;
    Ok(v)
}

/// Sets the pool's release threshold to "never": freed blocks stay in the pool for the next step.
pub fn keep_pool_memory(dev: &CudaDevice) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::{result, sys};
    let pool = default_pool(dev)?;
    let mut threshold: u64 = u64::MAX;
    // SAFETY: RELEASE_THRESHOLD is a cuuint64_t attribute.
    unsafe { result::mem_pool::set_attribute(pool, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, &mut threshold as *mut u64 as *mut _) }.w()?;
    Ok(())
}

pub fn reset_peak_memory(dev: &CudaDevice) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::{result, sys};
    let pool = default_pool(dev)?;
    let mut zero: u64 = 0;
    // SAFETY: resetting the high-water mark takes a zero cuuint64_t.
    unsafe { result::mem_pool::set_attribute(pool, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH, &mut zero as *mut u64 as *mut _) }.w()?;
    Ok(())
}

