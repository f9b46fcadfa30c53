//! Choosing the backend and compute dtype at run time.

use anyhow::{Context, Result, bail};
use burn::tensor::{DType, Device, DeviceKind};
use clap::ValueEnum;
use lora_model::device::{ShaderCompiler, choose_compiler, is_cpu, wgpu_adapters, wgpu_device};

/// `--device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceArg {
    /// A GPU through wgpu (Metal, Vulkan or DX12); the CPU when there is none.
    Auto,
    /// burn's pure-Rust CPU backend (flex).
    Cpu,
    /// wgpu on the best adapter, a software one (lavapipe) included.
    Wgpu,
    /// CUDA (needs a build with `--features cuda`).
    Cuda,
}

/// `--dtype`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DTypeArg {
    /// 32-bit float.
    F32,
    /// 16-bit float.
    F16,
    /// bfloat16.
    Bf16,
}

impl From<DTypeArg> for DType {
    fn from(d: DTypeArg) -> Self {
        match d {
            DTypeArg::F32 => DType::F32,
            DTypeArg::F16 => DType::F16,
            DTypeArg::Bf16 => DType::BF16,
        }
    }
}

/// Resolves `--device` to a burn device.
pub fn select(arg: DeviceArg) -> Result<Device> {
    let compiler = ShaderCompiler::from_env().map_err(anyhow::Error::msg)?;
    match arg {
        DeviceArg::Cpu => Ok(Device::flex()),
        DeviceArg::Auto => {
            if wgpu_adapters().gpu {
                choose_compiler(compiler, false);
                Ok(Device::wgpu(DeviceKind::DefaultDevice))
            } else {
                eprintln!("No GPU adapter found through wgpu; running on the CPU backend.");
                Ok(Device::flex())
            }
        }
        DeviceArg::Wgpu => wgpu_device().context("--device wgpu: no wgpu adapter found (is a Vulkan, Metal or DX12 driver installed?)"),
        DeviceArg::Cuda => cuda(),
    }
}

#[cfg(feature = "cuda")]
fn cuda() -> Result<Device> {
    Ok(Device::cuda(0))
}

#[cfg(not(feature = "cuda"))]
fn cuda() -> Result<Device> {
    bail!("--device cuda: this binary was built without CUDA; rebuild with `cargo build --release --features cuda` (needs network access for its LLVM bundle)")
}

/// The compute dtype: the one asked for, else f32 on the CPU and on a GPU the checkpoint's
/// half type when the device supports it (bf16, else f16), else f32.
pub fn compute_dtype(device: &Device, asked: Option<DTypeArg>, checkpoint: Option<&str>) -> Result<DType> {
    if let Some(d) = asked {
        let dtype = DType::from(d);
        if !device.supports_dtype(dtype) {
            bail!("--dtype {d:?}: this device does not support {dtype:?}; try f32");
        }
        return Ok(dtype);
    }
    if is_cpu(device) {
        return Ok(DType::F32);
    }
    let prefer_bf16 = checkpoint == Some("bfloat16");
    let order: &[DType] = if prefer_bf16 { &[DType::BF16, DType::F16] } else { &[DType::F16, DType::BF16] };
    Ok(order.iter().copied().find(|d| device.supports_dtype(*d)).unwrap_or(DType::F32))
}

/// Peak memory so far, in bytes: the device pool's for a GPU, the process's for the CPU.
pub struct PeakMemory {
    device: Device,
    peak: u64,
}

impl PeakMemory {
    pub fn new(device: &Device) -> Self {
        Self { device: device.clone(), peak: 0 }
    }

    /// Records the current usage: the bytes the device's memory pool holds, which only
    /// grows past the largest working set (live tensors are only visible between steps).
    pub fn sample(&mut self) {
        if let Some(u) = self.device.memory_pool_usage() {
            self.peak = self.peak.max(u.bytes_reserved.max(u.bytes_in_use));
        }
    }

    /// Peak bytes: the process high-water mark on the CPU backend.
    pub fn peak(&self) -> Result<u64> {
        if is_cpu(&self.device) {
            return process_peak_rss().context("reading the process's peak memory");
        }
        Ok(self.peak)
    }
}

/// `VmHWM` of /proc/self/status, in bytes (0 where there is no procfs).
fn process_peak_rss() -> Result<u64> {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return Ok(0);
    };
    let kb = status.lines().find_map(|l| l.strip_prefix("VmHWM:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok()).unwrap_or(0);
    Ok(kb * 1024)
}
