//! Writing files so that a crash never leaves half of one behind.

use std::io::Write;
use std::path::Path;

use crate::AdapterError;

/// Writes `bytes` to `path` through a temporary file in the same directory, synced and then
/// renamed over `path`: readers see the old file or the new one, never a part.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), AdapterError> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        AdapterError::io(path, e)
    })
}

/// Moves the finished directory `tmp` to `out`, replacing what is there by way of `old` (a
/// free name beside it): readers see the old directory or the new one, whole. On failure the
/// old `out` is put back; a replaced directory that cannot be removed stays at `old`, with a
/// warning.
pub fn replace_dir(tmp: &Path, out: &Path, old: &Path) -> Result<(), AdapterError> {
    let rename = |from: &Path, to: &Path, what: &str| {
        std::fs::rename(from, to)
            .map_err(|e| AdapterError::io(to, std::io::Error::new(e.kind(), format!("{what} {} to {}: {e}", from.display(), to.display()))))
    };
    if !out.exists() {
        return rename(tmp, out, "renaming");
    }
    rename(out, old, "moving the old directory aside:")?;
    if let Err(e) = rename(tmp, out, "renaming") {
        let _ = std::fs::rename(old, out);
        return Err(e);
    }
    if let Err(e) = std::fs::remove_dir_all(old) {
        eprintln!("warning: could not remove the replaced {}: {e}", old.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_a_directory_whole_and_leaves_nothing_beside_it() {
        let root = tempfile::tempdir().unwrap();
        let (out, tmp, old) = (root.path().join("out"), root.path().join(".out.new"), root.path().join(".out.old"));
        std::fs::create_dir(&tmp).unwrap();
        std::fs::write(tmp.join("a"), "first").unwrap();
        replace_dir(&tmp, &out, &old).unwrap();
        std::fs::create_dir(&tmp).unwrap();
        std::fs::write(tmp.join("b"), "second").unwrap();
        replace_dir(&tmp, &out, &old).unwrap();
        assert!(!out.join("a").exists(), "the old directory's files are gone with it");
        assert_eq!(std::fs::read_to_string(out.join("b")).unwrap(), "second");
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 1, "nothing but out is left");
        // A missing new directory fails and puts the old one back.
        assert!(replace_dir(&tmp, &out, &old).is_err());
        assert_eq!(std::fs::read_to_string(out.join("b")).unwrap(), "second");
        assert!(!old.exists());
    }

    #[test]
    fn replaces_the_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.json");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_missing_directory_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing").join("a.json");
        let err = write_atomic(&path, b"x").unwrap_err().to_string();
        assert!(err.contains("missing/a.json"), "{err}");
    }
}
