//! Writing a GGUF file through `gguf-rs-lib`, atomically and in one pass: the header
//! (metadata, and every tensor's name, shape, type and offset) is written first, each
//! tensor's data is streamed after it as it comes, and the finished file, written under a
//! temporary name, is renamed into place when committed. Nothing of a failed export is
//! left behind.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use gguf_rs_lib::format::metadata::{MetadataArray, MetadataValue};
use gguf_rs_lib::format::{GGUFHeader, GGUFValueType, Metadata};
use gguf_rs_lib::tensor::{TensorData, TensorInfo, TensorShape, TensorType};
use gguf_rs_lib::writer::GGUFFileWriter;

use lora_model::checkpoint::encode_floats;
use safetensors::Dtype;

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
    /// An array of 32-bit floats.
    F32Array(Vec<f32>),
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
            Self::F32Array(v) => array(GGUFValueType::F32, v.iter().copied().map(MetadataValue::F32).collect())?,
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

    /// Bytes per element.
    fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 => 2,
        }
    }

    /// The same type as safetensors names it.
    pub fn dtype(self) -> Dtype {
        match self {
            Self::F32 => Dtype::F32,
            Self::F16 => Dtype::F16,
        }
    }
}

/// A tensor to be written: its name, row-major shape (outermost first, as torch writes it)
/// and element type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Declared {
    /// The GGUF tensor name.
    pub name: String,
    /// Row-major shape.
    pub shape: Vec<usize>,
    /// The element type written.
    pub element: Element,
}

/// A GGUF file being written: created with its metadata and every tensor declared, then
/// each tensor's values [`GgufFile::add`]ed in the declared order, then
/// [`GgufFile::finish`]ed. Dropped unfinished, it removes its temporary file.
pub struct GgufFile {
    path: PathBuf,
    tmp: PathBuf,
    writer: Option<GGUFFileWriter<BufWriter<File>>>,
    infos: Vec<TensorInfo>,
    shapes: Vec<Vec<usize>>,
    elements: Vec<Element>,
    next: usize,
}

impl GgufFile {
    /// Starts the file to be renamed to `path` when committed, writing its header.
    pub fn create(path: &Path, metadata: &[(String, Meta)], tensors: &[Declared]) -> Result<Self, GgufError> {
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model.gguf".into());
        let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
        let writer_err = |e: gguf_rs_lib::error::GGUFError| GgufError::Write { path: path.to_path_buf(), message: e.to_string() };

        let mut meta = Metadata::new();
        for (key, value) in metadata {
            meta.insert(key.clone(), value.value().map_err(|m| GgufError::Write { path: path.to_path_buf(), message: format!("{key}: {m}") })?);
        }
        let mut infos = Vec::with_capacity(tensors.len());
        let mut offset = 0u64;
        for t in tensors {
            let ne: Vec<u64> = t.shape.iter().rev().map(|&d| d as u64).collect();
            offset = offset.next_multiple_of(ALIGNMENT);
            infos.push(TensorInfo::new(t.name.clone(), TensorShape::new(ne).map_err(writer_err)?, t.element.tensor_type(), offset));
            offset += (t.shape.iter().product::<usize>() * t.element.size()) as u64;
        }

        let file = File::create(&tmp).map_err(|e| GgufError::io(&tmp, e))?;
        let mut this = Self {
            path: path.to_path_buf(),
            tmp,
            writer: None,
            infos,
            shapes: tensors.iter().map(|t| t.shape.clone()).collect(),
            elements: tensors.iter().map(|t| t.element).collect(),
            next: 0,
        };
        let mut writer = GGUFFileWriter::new(BufWriter::new(file));
        writer.write_header(&GGUFHeader::new(this.infos.len() as u64, meta.len() as u64)).map_err(writer_err)?;
        writer.write_metadata(&meta).map_err(writer_err)?;
        writer.write_tensor_infos(&this.infos).map_err(writer_err)?;
        writer.align_for_tensor_data().map_err(writer_err)?;
        this.writer = Some(writer);
        Ok(this)
    }

    /// The name of the tensor [`GgufFile::add`] expects next, if any.
    pub fn expects(&self) -> Option<&str> {
        self.infos.get(self.next).map(|i| i.name())
    }

    /// Writes the next declared tensor's `values` (row-major, `shape.iter().product()` of them).
    pub fn add(&mut self, values: &[f32]) -> Result<(), GgufError> {
        let (Some(info), Some(shape)) = (self.infos.get(self.next), self.shapes.get(self.next)) else {
            return Err(GgufError::invalid(&self.path, "more tensors than were declared"));
        };
        if shape.iter().product::<usize>() != values.len() {
            return Err(GgufError::invalid(&self.path, format!("{}: {} values for shape {shape:?}", info.name(), values.len())));
        }
        let bytes = encode_floats(values, self.elements[self.next].dtype());
        let writer = self.writer.as_mut().expect("open until finished");
        writer.write_tensor_data(info, &TensorData::new_owned(bytes)).map_err(|e| GgufError::Write { path: self.path.clone(), message: e.to_string() })?;
        self.next += 1;
        Ok(())
    }

    /// Checks that every declared tensor was written and flushes the file, still under its
    /// temporary name; [`Written::commit`] renames it into place.
    pub fn finish(mut self) -> Result<Written, GgufError> {
        if let Some(missing) = self.expects() {
            return Err(GgufError::invalid(&self.path, format!("tensor {missing} was declared but never written")));
        }
        let writer = self.writer.take().expect("finished once");
        let mut out = writer.finalize().map_err(|e| GgufError::Write { path: self.path.clone(), message: e.to_string() })?;
        out.flush().map_err(|e| GgufError::io(&self.tmp, e))?;
        let file = out.into_inner().map_err(|e| GgufError::io(&self.tmp, e.into_error()))?;
        file.sync_all().map_err(|e| GgufError::io(&self.tmp, e))?;
        Ok(Written { tmp: std::mem::take(&mut self.tmp), path: self.path.clone() })
    }
}

impl Drop for GgufFile {
    fn drop(&mut self) {
        self.writer.take();
        if !self.tmp.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.tmp);
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use gguf_rs_lib::reader::GGUFFileReader;

    fn declared(name: &str, shape: &[usize], element: Element) -> Declared {
        Declared { name: name.into(), shape: shape.to_vec(), element }
    }

    #[test]
    fn tensors_and_metadata_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.gguf");
        let meta = [("general.architecture".into(), Meta::Str("llama".into())), ("x.list".into(), Meta::I32Array(vec![1, 3]))];
        let mut f = GgufFile::create(&path, &meta, &[declared("a.weight", &[2, 3], Element::F16), declared("b.bias", &[3], Element::F32)]).unwrap();
        assert_eq!(f.expects(), Some("a.weight"));
        f.add(&[1.0, 2.0, 3.0, 4.0, 5.0, -0.5]).unwrap();
        f.add(&[0.25, 0.5, 0.75]).unwrap();
        assert_eq!(f.expects(), None);
        let written = f.finish().unwrap();
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
        let halves = lora_model::checkpoint::decode_floats(data.as_slice(), Dtype::F16).unwrap();
        assert_eq!(halves, vec![1.0, 2.0, 3.0, 4.0, 5.0, -0.5]);
        let b = r.load_tensor_data("b.bias").unwrap().unwrap();
        assert_eq!(b.as_slice(), encode_floats(&[0.25, 0.5, 0.75], Dtype::F32).as_slice());
    }

    #[test]
    fn an_unfinished_file_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.gguf");
        let two = [declared("a.weight", &[1, 2], Element::F32), declared("b.weight", &[2], Element::F32)];
        // Dropped half written; finished with a tensor missing; finished but not committed.
        let mut f = GgufFile::create(&path, &[], &two).unwrap();
        f.add(&[1.0, 2.0]).unwrap();
        drop(f);
        let mut f = GgufFile::create(&path, &[], &two).unwrap();
        f.add(&[1.0, 2.0]).unwrap();
        let err = f.finish().err().unwrap().to_string();
        assert!(err.contains("b.weight"), "{err}");
        let mut f = GgufFile::create(&path, &[], &two).unwrap();
        assert!(f.add(&[1.0]).is_err(), "a wrong count of values");
        f.add(&[1.0, 2.0]).unwrap();
        f.add(&[3.0, 4.0]).unwrap();
        assert!(f.add(&[5.0]).is_err(), "an undeclared tensor");
        drop(f.finish().unwrap());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
