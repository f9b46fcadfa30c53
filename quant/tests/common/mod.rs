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

/// The best wgpu adapter's device, after lowering autotuning for tests (shared with every
/// crate: `lora_kernels::device`).
fn wgpu_device() -> Option<Device> {
    lora_kernels::device::minimal_autotune_for_tests();
    lora_kernels::device::wgpu_device()
}
