//! Finding a device at run time: a GPU through wgpu, a software wgpu adapter, or the CPU.

use burn::tensor::wgpu::wgpu;
use burn::tensor::{Device, DeviceKind};

/// The wgpu adapters this machine offers, by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WgpuAdapters {
    /// A discrete, integrated or virtual GPU.
    pub gpu: bool,
    /// A software rasterizer such as lavapipe or WARP.
    pub software: bool,
}

/// Lists wgpu adapters on the primary graphics APIs (Vulkan, Metal, DX12); OpenGL is not asked,
/// as burn does not run on it.
pub fn wgpu_adapters() -> WgpuAdapters {
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    let adapters = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::PRIMARY));
    let mut found = WgpuAdapters::default();
    for a in &adapters {
        match a.get_info().device_type {
            wgpu::DeviceType::DiscreteGpu | wgpu::DeviceType::IntegratedGpu | wgpu::DeviceType::VirtualGpu => {
                found.gpu = true
            }
            wgpu::DeviceType::Cpu | wgpu::DeviceType::Other => found.software = true,
        }
    }
    found
}

/// A wgpu device on the best adapter: a GPU if there is one, else a software adapter.
pub fn wgpu_device() -> Option<Device> {
    let found = wgpu_adapters();
    if found.gpu {
        Some(Device::wgpu(DeviceKind::DefaultDevice))
    } else if found.software {
        Some(Device::wgpu(DeviceKind::Cpu))
    } else {
        None
    }
}

/// Whether `device` is burn's CPU (flex) backend.
pub fn is_cpu(device: &Device) -> bool {
    *device == Device::flex()
}
