//! Finding a device at run time: a GPU through wgpu, a software wgpu adapter, or the CPU, and
//! the shader compiler wgpu uses on it.

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
            wgpu::DeviceType::DiscreteGpu | wgpu::DeviceType::IntegratedGpu | wgpu::DeviceType::VirtualGpu => found.gpu = true,
            wgpu::DeviceType::Cpu | wgpu::DeviceType::Other => found.software = true,
        }
    }
    found
}

/// Which shader compiler wgpu devices use (`LORA_WGPU_COMPILER`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShaderCompiler {
    /// The native compiler (SPIR-V on Vulkan, MSL on Metal) on a GPU, WGSL on a software
    /// adapter (lavapipe crashes compiling some of cubecl's SPIR-V).
    Auto,
    /// The native compiler wherever the adapter supports it.
    Native,
    /// WGSL everywhere: for drivers that misbehave on native shaders.
    Wgsl,
}

impl ShaderCompiler {
    /// From `LORA_WGPU_COMPILER` (`auto`, `native`, `wgsl`); `Auto` when unset.
    pub fn from_env() -> Result<Self, String> {
        match std::env::var("LORA_WGPU_COMPILER") {
            Err(_) => Ok(Self::Auto),
            Ok(v) => match v.to_ascii_lowercase().as_str() {
                "" | "auto" => Ok(Self::Auto),
                "native" | "spirv" | "msl" => Ok(Self::Native),
                "wgsl" => Ok(Self::Wgsl),
                _ => Err(format!("LORA_WGPU_COMPILER={v}: expected auto, native or wgsl")),
            },
        }
    }
}

/// Sets the compiler of the wgpu devices initialized from now on: WGSL when `compiler` asks for
/// it, or when it is `Auto` and the device is a software adapter. Must run before the device's
/// first tensor.
pub fn choose_compiler(compiler: ShaderCompiler, software: bool) {
    let wgsl = match compiler {
        ShaderCompiler::Wgsl => true,
        ShaderCompiler::Native => false,
        ShaderCompiler::Auto => software,
    };
    cubecl_wgpu::force_wgsl(wgsl);
}

/// A wgpu device on the best adapter: a GPU if there is one, else a software adapter, with the
/// shader compiler `LORA_WGPU_COMPILER` asks for (see [`ShaderCompiler`]; an unreadable value
/// counts as `auto`).
pub fn wgpu_device() -> Option<Device> {
    let found = wgpu_adapters();
    let compiler = ShaderCompiler::from_env().unwrap_or(ShaderCompiler::Auto);
    if found.gpu {
        choose_compiler(compiler, false);
        Some(Device::wgpu(DeviceKind::DefaultDevice))
    } else if found.software {
        choose_compiler(compiler, true);
        Some(Device::wgpu(DeviceKind::Cpu))
    } else {
        None
    }
}

/// Lowers cubecl's autotuning to its minimal level for this process, unless
/// `CUBECL_AUTOTUNE_LEVEL` is set or cubecl's configuration was already read. For test suites
/// on software adapters (lavapipe), where tuning one new matmul shape takes up to minutes; the
/// `lora` binary never calls it. Call it before the first tensor of a wgpu device.
pub fn minimal_autotune_for_tests() {
    use burn_cubecl::cubecl::config::CubeClRuntimeConfig;
    use burn_cubecl::cubecl::config::RuntimeConfig;
    use burn_cubecl::cubecl::config::autotune::AutotuneLevel;
    if std::env::var_os("CUBECL_AUTOTUNE_LEVEL").is_some() {
        return;
    }
    let mut config = CubeClRuntimeConfig::default().override_from_env();
    config.autotune.level = AutotuneLevel::Minimal;
    let _ = CubeClRuntimeConfig::try_set(config);
}

/// The wgpu device for a test, after [`minimal_autotune_for_tests`], or `None` (the test skips,
/// saying so) where this machine has no adapter. With `LORA_REQUIRE_WGPU` set (CI) a missing
/// adapter fails the test instead.
pub fn wgpu_device_for_tests() -> Option<Device> {
    minimal_autotune_for_tests();
    let device = wgpu_device();
    if device.is_none() {
        assert!(std::env::var_os("LORA_REQUIRE_WGPU").is_none(), "LORA_REQUIRE_WGPU is set but no wgpu adapter was found");
        eprintln!("no wgpu adapter: skipped");
    }
    device
}

/// Whether `device` is burn's CPU (flex) backend.
pub fn is_cpu(device: &Device) -> bool {
    *device == Device::flex()
}
