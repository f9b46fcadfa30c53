//! Devices the quantization tests run on.

use burn::tensor::Device;

/// flex, plus wgpu where an adapter exists (lavapipe counts); `LORA_REQUIRE_WGPU` makes a
/// missing adapter a failure rather than a skip.
pub fn devices() -> Vec<Device> {
    let mut d = vec![Device::flex()];
    match wgpu_device() {
        Some(w) => d.push(w),
        None if std::env::var_os("LORA_REQUIRE_WGPU").is_some() => panic!("LORA_REQUIRE_WGPU is set but no wgpu adapter"),
        None => eprintln!("no wgpu adapter: wgpu cases skipped"),
    }
    d
}

fn wgpu_device() -> Option<Device> {
    use burn::tensor::wgpu::wgpu;
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    let adapters = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::PRIMARY));
    let gpu = adapters.iter().any(|a| !matches!(a.get_info().device_type, wgpu::DeviceType::Cpu | wgpu::DeviceType::Other));
    if adapters.is_empty() {
        None
    } else if gpu {
        Some(Device::wgpu(burn::tensor::DeviceKind::DefaultDevice))
    } else {
        Some(Device::wgpu(burn::tensor::DeviceKind::Cpu))
    }
}
