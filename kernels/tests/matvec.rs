//! The decode-time matrix-vector product of a frozen weight against burn's matmul: a few rows
//! of `x`, widths that are not multiples of the unrolled step or of the outputs per workgroup,
//! in f32 and f16.

use burn::tensor::{DType, Device, Distribution, FloatDType, Tensor};
use lora_kernels::device::{minimal_autotune_for_tests, wgpu_device};
use lora_kernels::frozen_linear;
use lora_kernels::matvec::MATVEC_ROWS;

#[test]
fn frozen_linear_of_a_few_rows_matches_the_matmul_on_wgpu() {
    minimal_autotune_for_tests();
    let Some(device) = wgpu_device() else {
        assert!(std::env::var_os("LORA_REQUIRE_WGPU").is_none(), "LORA_REQUIRE_WGPU is set but no wgpu adapter");
        return;
    };
    // k = 2·256 + 37 covers the unrolled loop and its tail; n = 8·5 + 3 a partial workgroup.
    let (k, n) = (549, 43);
    for (m, dtype, tolerance) in [(MATVEC_ROWS, FloatDType::F32, 1e-4), (3, FloatDType::F16, 2e-2)] {
        // The reference on the CPU: the GPU compiles only the kernel under test.
        let cpu = Device::flex();
        let x = Tensor::<2>::random([m, k], Distribution::Normal(0.0, 1.0), (&cpu, DType::F32));
        let w = Tensor::<2>::random([n, k], Distribution::Normal(0.0, 0.05), (&cpu, DType::F32));
        let want: Vec<f32> = x.clone().matmul(w.clone().transpose()).into_data().to_vec().unwrap();
        let (x, w) = (x.to_device(&device), w.to_device(&device));
        let got = frozen_linear(x.cast(dtype), w.cast(dtype));
        assert_eq!(got.dims(), [m, n]);
        let got: Vec<f32> = got.into_data().convert::<f32>().to_vec().unwrap();
        let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(worst < tolerance, "m {m} {dtype:?}: max difference {worst}");
    }
}
