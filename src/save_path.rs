//! Where a command may write: never over or inside what it reads.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

/// `p` as an absolute path with symbolic links resolved, whether it exists or not (then its
/// parent is resolved, as far up as exists, and the rest joined).
fn resolve(p: &Path) -> PathBuf {
    let p = if p.as_os_str().is_empty() { Path::new(".") } else { p };
    if let Ok(c) = std::fs::canonicalize(p) {
        return c;
    }
    let absolute = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    match (absolute.parent(), absolute.file_name()) {
        (Some(parent), Some(name)) if parent != absolute => resolve(parent).join(name),
        _ => absolute,
    }
}

/// Whether `out` is, holds or lies inside one of `inputs`.
pub fn overlaps(out: &Path, inputs: &[&Path]) -> bool {
    let o = resolve(out);
    inputs.iter().map(|i| resolve(i)).any(|i| o.starts_with(&i) || i.starts_with(&o))
}

/// Refuses a file to be written inside one of `inputs`, over a directory, or (without
/// `force`) over a file that exists.
pub fn check_save_file(out: &Path, inputs: &[&Path], force: bool, flag: &str) -> Result<()> {
    if overlaps(out, inputs) {
        bail!("{flag} {} is inside one of the inputs; nothing is ever written into them", out.display());
    }
    if out.is_dir() {
        bail!("{flag} {} is a directory; it names the file to write", out.display());
    }
    if out.exists() && !force {
        bail!("{flag} {} exists; choose another, or pass --force to replace it", out.display());
    }
    Ok(())
}

/// Refuses a save path that is, holds or lies inside one of `inputs`, a file, or (without
/// `force`) a directory that holds anything.
pub fn check_save_path(out: &Path, inputs: &[&Path], force: bool) -> Result<()> {
    if overlaps(out, inputs) {
        bail!("--save-path {} is, holds or lies inside one of the inputs; nothing is ever written over them", out.display());
    }
    if out.is_file() || (out.is_dir() && std::fs::read_dir(out)?.next().is_some() && !force) {
        bail!("--save-path {} exists and is not empty; choose another, or pass --force to replace it", out.display());
    }
    Ok(())
}
