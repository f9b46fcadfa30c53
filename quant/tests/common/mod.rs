//! Devices the quantization tests run on.

use burn::tensor::Device;

/// flex, plus wgpu where an adapter exists (lavapipe counts); `LORA_REQUIRE_WGPU` makes a
/// missing adapter a failure rather than a skip.
pub fn devices() -> Vec<Device> {
    let mut d = vec![Device::flex()];
    match wgpu_device() {
        Some(w) => d.push(w),
        None if std::env::var_os("LORA_REQUIRE_WGPU").is_some() => {
            panic!("LORA_REQUIRE_WGPU is set but no wgpu adapter")
        }
        None => eprintln!("no wgpu adapter: wgpu cases skipped"),
    }
    d
}

fn wgpu_device() -> Option<Device> {
    use burn::tensor::wgpu::wgpu;
    minimal_autotune();
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    let adapters = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::PRIMARY));
    let gpu = adapters.iter().any(|a| !matches!(a.get_info().device_type, wgpu::DeviceType::Cpu | wgpu::DeviceType::Other));
    if adapters.is_empty() {
        None
    } else if gpu {
        Some(Device::wgpu(burn::tensor::DeviceKind::DefaultDevice))
    } else {
        // lavapipe crashes compiling some of cubecl's SPIR-V: WGSL, as `lora` does there.
        cubecl_wgpu::force_wgsl(std::env::var("LORA_WGPU_COMPILER").map_or(true, |v| v != "native"));
        Some(Device::wgpu(burn::tensor::DeviceKind::Cpu))
    }
}

/// As `lora_model::device::minimal_autotune_for_tests` (this crate is below lora-model).
fn minimal_autotune() {
    use burn_cubecl::cubecl::config::CubeClRuntimeConfig;
    use burn_cubecl::cubecl::config::RuntimeConfig;
    use burn_cubecl::cubecl::config::autotune::AutotuneLevel;
    if std::env::var_os("CUBECL_AUTOTUNE_LEVEL").is_none() {
        let mut config = CubeClRuntimeConfig::default().override_from_env();
        config.autotune.level = AutotuneLevel::Minimal;
        let _ = CubeClRuntimeConfig::try_set(config);
    }
}
