//! What the end-to-end tests share: the repository's fixtures and running the binary.
// Each test crate uses its own subset.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository root, where the binary runs (configs/ and tests/fixtures/ are relative to it).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

/// `tests/fixtures/<name>`.
pub fn fixture(name: &str) -> PathBuf {
    root().join("tests/fixtures").join(name)
}

/// Copies every file of `from` into the directory `to`, which must exist.
pub fn copy_files(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

/// `lora <args>` from the repository root.
pub fn lora(args: &[&str]) -> Output {
    command().args(args).output().expect("run lora")
}

/// `lora fuse --model <model> --adapter-path tests/fixtures/fuse_reference/lora --save-path
/// <save> <extra>`: the PEFT adapter of the fuse reference fused into `model`.
pub fn fuse_reference(model: &str, save: &str, extra: &[&str]) -> Output {
    let args = ["fuse", "--model", model, "--adapter-path", "tests/fixtures/fuse_reference/lora", "--save-path", save];
    lora(&[&args[..], extra].concat())
}

/// The `lora` binary, run from the repository root, with cubecl's autotuning at its minimal
/// level unless `CUBECL_AUTOTUNE_LEVEL` says otherwise: tuning one new matmul shape on
/// lavapipe takes up to minutes (the shipped binary tunes fully).
pub fn command() -> Command {
    in_test_env(Command::new(env!("CARGO_BIN_EXE_lora")))
}

/// `lora <args>` as [`lora`] runs it, under an address-space limit of `kib` KiB (`ulimit -v`),
/// so that an input that would allocate without bound ends the process instead of the machine.
pub fn lora_limited(kib: u64, args: &[&str]) -> Output {
    let mut c = Command::new("bash");
    c.arg("-c").arg(format!("ulimit -v {kib} && exec \"$@\"")).arg("bash").arg(env!("CARGO_BIN_EXE_lora")).args(args);
    in_test_env(c).output().expect("run lora under ulimit")
}

/// `lora <args>` as [`lora`] runs it, under the file-creation mask `umask` (octal, as the
/// shell's `umask` takes it), so that the modes of the files it makes are known.
pub fn lora_with_umask(umask: &str, args: &[&str]) -> Output {
    let mut c = Command::new("bash");
    c.arg("-c").arg(format!("umask {umask} && exec \"$@\"")).arg("bash").arg(env!("CARGO_BIN_EXE_lora")).args(args);
    in_test_env(c).output().expect("run lora under umask")
}

/// `c` run from the repository root with the tests' autotune level.
fn in_test_env(mut c: Command) -> Command {
    c.current_dir(root());
    if std::env::var_os("CUBECL_AUTOTUNE_LEVEL").is_none() {
        c.env("CUBECL_AUTOTUNE_LEVEL", "minimal");
    }
    c
}

/// A run's stderr as text.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A path as a flag value.
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The f32 model in `dir`, on the CPU.
pub fn load_model(dir: &Path) -> lora_model::CausalLm {
    use burn::tensor::{DType, Device};
    let config = lora_model::ModelConfig::from_dir(dir).unwrap();
    lora_model::CausalLm::load(&config, &lora_model::Checkpoint::open(dir).unwrap(), &Device::flex(), DType::F32, |_| {}).unwrap()
}

/// `model`'s logits for one sequence of `ids`: `[ids.len() * vocab]`, position-major.
pub fn all_logits(model: &lora_model::CausalLm, ids: Vec<i32>) -> Vec<f32> {
    use burn::tensor::{Device, Int, Tensor, TensorData};
    let n = ids.len();
    let t = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, n]), &Device::flex());
    model.forward(t, None).into_data().convert::<f32>().try_into_vec::<f32>().unwrap()
}

/// The largest absolute difference of two equally long slices.
pub fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Every tensor of an f32 safetensors file, sorted by name.
pub fn tensors(path: &Path) -> Vec<(String, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<(String, Vec<f32>)> =
        st.tensors().into_iter().map(|(n, t)| (n, lora_model::checkpoint::decode_floats(t.data(), t.dtype()).unwrap())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}
