//! Writing a GGUF file through `gguf-rs-lib`, atomically: tensor data are streamed to a
//! temporary sibling as they come, the header (metadata and tensor descriptors, which name
//! each tensor's offset) is written once all are known, and the finished file is renamed
//! into place. Nothing of a failed export is left behind.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use gguf_rs_lib::format::metadata::{MetadataArray, MetadataValue};
use gguf_rs_lib::format::{GGUFHeader, GGUFValueType, Metadata};
use gguf_rs_lib::tensor::{TensorData, TensorInfo, TensorShape, TensorType};
use gguf_rs_lib::writer::GGUFFileWriter;

use crate::GgufError;

/// Tensor data offsets are multiples of this (GGUF's default `general.alignment`).
const ALIGNMENT: u64 = 32;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Meta {
    /// A string.
    Str(String),
    /// An unsigned 32-bit integer.
    U32(u32),
    /// A 32-bit float.
    F32(f32),
    /// A boolean.
    Bool(bool),
    /// An array of strings.
    StrArray(Vec<String>),
    /// An array of signed 32-bit integers.
    I32Array(Vec<i32>),
}

impl Meta {
    fn value(&self) -> Result<MetadataValue, String> {
        let array = |ty, values| MetadataArray::new(ty, values).map(|a| MetadataValue::Array(Box::new(a))).map_err(|e| e.to_string());
        Ok(match self {
            Self::Str(s) => MetadataValue::String(s.clone()),
            Self::U32(v) => MetadataValue::U32(*v),
            Self::F32(v) => MetadataValue::F32(*v),
            Self::Bool(v) => MetadataValue::Bool(*v),
            Self::StrArray(v) => array(GGUFValueType::String, v.iter().cloned().map(MetadataValue::String).collect())?,
            Self::I32Array(v) => array(GGUFValueType::I32, v.iter().copied().map(MetadataValue::I32).collect())?,
        })
    }
}

/// The element type of a written tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Element {
    /// f32.
    F32,
    /// IEEE half.
    F16,
}

impl Element {
    fn tensor_type(self) -> TensorType {
        match self {
            Self::F32 => TensorType::F32,
            Self::F16 => TensorType::F16,
        }
    }

    /// `values` as little-endian bytes of this type.
    pub fn encode(self, values: &[f32]) -> Vec<u8> {
        match self {
            Self::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            Self::F16 => values.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect(),
        }
    }
}

struct Entry {
    name: String,
    /// GGUF's `ne`: the fastest-moving dimension first.
    ne: Vec<u64>,
    element: Element,
    offset: u64,
    len: u64,
}

/// A GGUF file being written: [`GgufFile::add`] each tensor, then [`GgufFile::finish`].
/// Dropped unfinished, it removes its temporary files.
pub struct GgufFile {
    path: PathBuf,
    data_path: PathBuf,
    file_path: PathBuf,
    data: Option<BufWriter<File>>,
    entries: Vec<Entry>,
    end: u64,
}

impl GgufFile {
    /// Starts a file to be renamed to `path` when finished.
    pub fn create(path: &Path) -> Result<Self, GgufError> {
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model.gguf".into());
        let data_path = dir.join(format!(".{name}.data-{}", std::process::id()));
        let file_path = dir.join(format!(".{name}.tmp-{}", std::process::id()));
        let data = File::create(&data_path).map_err(|e| GgufError::io(&data_path, e))?;
        Ok(Self { path: path.to_path_buf(), data_path, file_path, data: Some(BufWriter::new(data)), entries: Vec::new(), end: 0 })
    }

    /// Appends a tensor of row-major `shape` (outermost first, as torch writes it).
    pub fn add(&mut self, name: &str, shape: &[usize], element: Element, values: &[f32]) -> Result<(), GgufError> {
        if shape.iter().product::<usize>() != values.len() {
            return Err(GgufError::invalid(&self.path, format!("{name}: {} values for shape {shape:?}", values.len())));
        }
        let bytes = element.encode(values);
        let offset = self.end.next_multiple_of(ALIGNMENT);
        let data = self.data.as_mut().expect("open until finished");
        let pad = vec![0u8; (offset - self.end) as usize];
        data.write_all(&pad).and_then(|()| data.write_all(&bytes)).map_err(|e| GgufError::io(&self.data_path, e))?;
        self.end = offset + bytes.len() as u64;
        let ne = shape.iter().rev().map(|&d| d as u64).collect();
        self.entries.push(Entry { name: name.to_string(), ne, element, offset, len: bytes.len() as u64 });
        Ok(())
    }

    /// Writes the header with `metadata` and the tensors to a temporary name beside the
    /// file; [`Written::commit`] renames it into place.
    pub fn finish(mut self, metadata: &[(String, Meta)]) -> Result<Written, GgufError> {
        let mut data = self.data.take().expect("finished once");
        data.flush().map_err(|e| GgufError::io(&self.data_path, e))?;
        drop(data);
        let writer_err = |e: gguf_rs_lib::error::GGUFError| GgufError::Write { path: self.path.clone(), message: e.to_string() };

        let mut meta = Metadata::new();
        for (key, value) in metadata {
            meta.insert(key.clone(), value.value().map_err(|m| GgufError::Write { path: self.path.clone(), message: format!("{key}: {m}") })?);
        }
        let infos: Vec<TensorInfo> = self
            .entries
            .iter()
            .map(|e| Ok(TensorInfo::new(e.name.clone(), TensorShape::new(e.ne.clone())?, e.element.tensor_type(), e.offset)))
            .collect::<Result<_, gguf_rs_lib::error::GGUFError>>()
            .map_err(writer_err)?;

        let file = File::create(&self.file_path).map_err(|e| GgufError::io(&self.file_path, e))?;
        let mut writer = GGUFFileWriter::new(BufWriter::new(file));
        writer.write_header(&GGUFHeader::new(infos.len() as u64, meta.len() as u64)).map_err(writer_err)?;
        writer.write_metadata(&meta).map_err(writer_err)?;
        writer.write_tensor_infos(&infos).map_err(writer_err)?;
        writer.align_for_tensor_data().map_err(writer_err)?;
        let mut source = BufReader::new(File::open(&self.data_path).map_err(|e| GgufError::io(&self.data_path, e))?);
        let mut position = 0u64;
        for (entry, info) in self.entries.iter().zip(&infos) {
            let mut skip = vec![0u8; (entry.offset - position) as usize];
            let mut bytes = vec![0u8; entry.len as usize];
            source.read_exact(&mut skip).and_then(|()| source.read_exact(&mut bytes)).map_err(|e| GgufError::io(&self.data_path, e))?;
            position = entry.offset + entry.len;
            writer.write_tensor_data(info, &TensorData::new_owned(bytes)).map_err(writer_err)?;
        }
        let mut out = writer.finalize().map_err(writer_err)?;
        out.flush().map_err(|e| GgufError::io(&self.file_path, e))?;
        let file = out.into_inner().map_err(|e| GgufError::io(&self.file_path, e.into_error()))?;
        file.sync_all().map_err(|e| GgufError::io(&self.file_path, e))?;
        let _ = std::fs::remove_file(&self.data_path);
        Ok(Written { tmp: std::mem::take(&mut self.file_path), path: self.path.clone() })
    }
}

/// A finished GGUF file under a temporary name. Dropped uncommitted, it is removed.
#[must_use = "a written GGUF file is removed unless committed"]
pub struct Written {
    tmp: PathBuf,
    path: PathBuf,
}

impl Written {
    /// Renames the file into place, replacing what is there.
    pub fn commit(mut self) -> Result<(), GgufError> {
        std::fs::rename(&self.tmp, &self.path).map_err(|e| GgufError::io(&self.path, e))?;
        self.tmp = PathBuf::new();
        Ok(())
    }
}

impl Drop for Written {
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

impl Drop for GgufFile {
    fn drop(&mut self) {
        self.data.take();
        let _ = std::fs::remove_file(&self.data_path);
        if !self.file_path.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.file_path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gguf_rs_lib::reader::GGUFFileReader;

    #[test]
    fn tensors_and_metadata_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.gguf");
        let mut f = GgufFile::create(&path).unwrap();
        f.add("a.weight", &[2, 3], Element::F16, &[1.0, 2.0, 3.0, 4.0, 5.0, -0.5]).unwrap();
        f.add("b.bias", &[3], Element::F32, &[0.25, 0.5, 0.75]).unwrap();
        let written = f.finish(&[("general.architecture".into(), Meta::Str("llama".into())), ("x.list".into(), Meta::I32Array(vec![1, 3]))]).unwrap();
        assert!(!path.exists(), "not in place before commit");
        written.commit().unwrap();
        // Only the finished file is left.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);

        let mut r = GGUFFileReader::new(File::open(&path).unwrap()).unwrap();
        assert_eq!(r.metadata().get("general.architecture").and_then(|v| v.as_str()), Some("llama"));
        let a = r.get_tensor_info("a.weight").unwrap().clone();
        assert_eq!(a.shape().dims(), &[3, 2]);
        assert_eq!(a.tensor_type(), TensorType::F16);
        let data = r.load_tensor_data("a.weight").unwrap().unwrap();
        let halves: Vec<f32> = data.as_slice().chunks(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect();
        assert_eq!(halves, vec![1.0, 2.0, 3.0, 4.0, 5.0, -0.5]);
        let b = r.load_tensor_data("b.bias").unwrap().unwrap();
        assert_eq!(b.as_slice(), Element::F32.encode(&[0.25, 0.5, 0.75]).as_slice());
    }

    #[test]
    fn an_unfinished_file_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = GgufFile::create(&dir.path().join("t.gguf")).unwrap();
        f.add("a.weight", &[1, 2], Element::F32, &[1.0, 2.0]).unwrap();
        drop(f);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        // Finished but not committed: nothing either.
        let mut f = GgufFile::create(&dir.path().join("t.gguf")).unwrap();
        f.add("a.weight", &[1, 2], Element::F32, &[1.0, 2.0]).unwrap();
        drop(f.finish(&[]).unwrap());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
