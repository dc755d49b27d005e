//! A frozen table kept in page-locked host memory that the GPU reads through its mapping: the embedding
//! table when recomputation trades speed for memory. Only the rows a batch uses cross the bus (~10 KiB per
//! token at Qwen-14B), the gather is one kernel in the stream (no host synchronisation), and the table's
//! device memory (1.45 GiB at Qwen-14B) is freed.
use super::launch::*;
use candle_core::cuda_backend::cudarc::driver::sys;
use candle_core::backend::BackendDevice;
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::{bail, DType, Result, Tensor};
use half::bf16;

pub struct HostTable {
    /// Never resized while registered: the device pointer maps this buffer.
    data: Vec<bf16>,
    rows: usize,
    cols: usize,
    device_ptr: u64,
    dev: CudaDevice,
}

// SAFETY: the buffer is plain host memory owned by this value; the device pointer is only handed to kernels.
unsafe impl Send for HostTable {}
unsafe impl Sync for HostTable {}

impl HostTable {
    /// Copies `table` ([rows, cols] bf16, any device) into page-locked host memory mapped for `dev`.
    pub fn new(table: &Tensor, dev: &CudaDevice) -> Result<HostTable> {
        let (rows, cols) = table.dims2()?;
        if table.dtype() != DType::BF16 || cols % 8 != 0 {
            bail!("host table: expected bf16 [rows, cols] with cols a multiple of 8, got {:?} {:?}", table.dtype(), table.dims());
        }
        let mut data: Vec<bf16> = table.flatten_all()?.to_device(&candle_core::Device::Cpu)?.to_vec1()?;
        let ctx = dev.cuda_stream().context().clone();
        ctx.bind_to_thread().w()?;
        let bytes = data.len() * 2;
        let mut device_ptr: sys::CUdeviceptr = 0;
        // SAFETY: `data` outlives the registration (unregistered in Drop before it is freed) and is not
        // resized meanwhile; DEVICEMAP makes it addressable from the GPU at the pointer queried next.
        unsafe {
            sys::cuMemHostRegister_v2(data.as_mut_ptr() as *mut _, bytes, sys::CU_MEMHOSTREGISTER_DEVICEMAP).result().w()?;
            if let Err(e) = sys::cuMemHostGetDevicePointer_v2(&mut device_ptr, data.as_mut_ptr() as *mut _, 0).result() {
                sys::cuMemHostUnregister(data.as_mut_ptr() as *mut _);
                return Err(e).w();
            }
        }
        Ok(HostTable { data, rows, cols, device_ptr, dev: dev.clone() })
    }

    pub fn bytes(&self) -> usize {
        self.data.len() * 2
    }

    /// Rows `ids` (u32 [n] on the GPU, each below the table's rows) -> [n, cols] bf16 on the GPU.
    pub fn gather(&self, ids: &Tensor) -> Result<Tensor> {
        let n = ids.elem_count();
        if ids.dtype() != DType::U32 {
            bail!("host table: ids must be u32, got {:?}", ids.dtype());
        }
        let ids = ids.flatten_all()?.contiguous()?;
        let out = uninit(&self.dev, (n, self.cols), DType::BF16)?;
        let args = [Arg::U(self.device_ptr), Arg::T(&ids), Arg::T(&out), Arg::I(n as i32), Arg::I(self.cols as i32), Arg::I(self.rows as i32)];
        launch(&self.dev, "gather_rows8", blocks(n * self.cols / 8, EW_THREADS)?, EW_THREADS, &args)?;
        Ok(out)
    }
}

impl Drop for HostTable {
    fn drop(&mut self) {
        // SAFETY: registered in `new`; no kernel reads it any more once the stream is synchronised.
        let _ = self.dev.synchronize();
        unsafe {
            sys::cuMemHostUnregister(self.data.as_mut_ptr() as *mut _);
        }
    }
}
