//! Devices the quantization tests run on.

use burn::tensor::Device;

/// flex, plus wgpu where an adapter exists (lavapipe counts); `LORA_REQUIRE_WGPU` makes a
/// missing adapter a failure rather than a skip.
pub fn devices() -> Vec<Device> {
    std::iter::once(Device::flex()).chain(lora_kernels::device::wgpu_device_for_tests()).collect()
}
