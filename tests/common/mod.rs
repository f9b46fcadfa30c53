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

/// `lora <args>` from the repository root.
pub fn lora(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lora")).current_dir(root()).args(args).output().expect("run lora")
}

/// A run's stderr as text.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A path as a flag value.
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}
