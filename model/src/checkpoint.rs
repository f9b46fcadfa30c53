//! Reading Hugging Face safetensors checkpoints, single-file or sharded, tensor by tensor.
//!
//! Every shard is memory-mapped. A tensor is copied out of the map once, uploaded to the
//! device, and its pages are released again, so the host never holds more than the model
//! plus one tensor, whatever the dtype conversion.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use burn::tensor::{DType, Device, Tensor, TensorData};
use memmap2::{Mmap, UncheckedAdvice};
use safetensors::{Dtype, SafeTensors, tensor::Metadata};

use crate::error::ModelError;

/// One memory-mapped safetensors file and its parsed header.
struct Shard {
    path: PathBuf,
    mmap: Mmap,
    /// Byte offset of the data section (8 + header length).
    data_start: usize,
    metadata: Metadata,
}

/// A checkpoint directory's safetensors files, indexed by tensor name; or, for benchmarks,
/// random weights of a model shape ([`Checkpoint::random`]).
pub struct Checkpoint {
    dir: PathBuf,
    shards: Vec<Shard>,
    /// Tensor name -> index into `shards`.
    index: HashMap<String, usize>,
    /// Tensor name -> shape, when the weights are drawn instead of read.
    random: HashMap<String, Vec<usize>>,
}

/// Standard deviation of random weights (transformers' `initializer_range`).
const RANDOM_STD: f64 = 0.02;

/// Where a tensor lives and how it is stored, without reading its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorMeta {
    /// The file that holds it.
    pub path: PathBuf,
    /// Stored dtype, as safetensors names it (`F32`, `BF16`, `U32`, ...).
    pub dtype: String,
    /// Stored shape.
    pub shape: Vec<usize>,
}

impl Checkpoint {
    /// Opens `model.safetensors`, or every shard listed by `model.safetensors.index.json`.
    ///
    /// A directory that holds only pickle `.bin` weights is refused with an explanation.
    pub fn open(dir: &Path) -> Result<Self, ModelError> {
        let index_path = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let files: Vec<PathBuf> = if index_path.is_file() {
            let text = read_to_string(&index_path)?;
            let index: serde_json::Value = serde_json::from_str(&text).map_err(|source| ModelError::Json { path: index_path.clone(), source })?;
            let map = index
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ModelError::Config { path: index_path.clone(), message: "missing `weight_map` object".into() })?;
            let mut files: Vec<PathBuf> = Vec::new();
            for file in map.values() {
                let file =
                    file.as_str().ok_or_else(|| ModelError::Config { path: index_path.clone(), message: "`weight_map` values must be file names".into() })?;
                // A shard is a file of this directory: `../x`, `/x` or `a/b` is refused.
                let mut parts = Path::new(file).components();
                if !matches!((parts.next(), parts.next()), (Some(std::path::Component::Normal(_)), None)) {
                    return Err(ModelError::Config {
                        path: index_path.clone(),
                        message: format!("`weight_map` names the shard `{file}`, which is not a file name in this directory"),
                    });
                }
                let file = dir.join(file);
                if !files.contains(&file) {
                    files.push(file);
                }
            }
            files
        } else if single.is_file() {
            vec![single]
        } else {
            let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(|source| ModelError::Io { path: dir.to_path_buf(), source })?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                    name.starts_with("model") && name.ends_with(".safetensors")
                })
                .collect();
            found.sort();
            if found.is_empty() {
                let pickles: Vec<String> = std::fs::read_dir(dir)
                    .map_err(|source| ModelError::Io { path: dir.to_path_buf(), source })?
                    .filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.ends_with(".bin") || n.ends_with(".pt") || n.ends_with(".pth"))
                    .collect();
                if pickles.is_empty() {
                    return Err(ModelError::NoWeights { dir: dir.to_path_buf() });
                }
                return Err(ModelError::PickleOnly { dir: dir.to_path_buf(), files: pickles.join(", ") });
            }
            found
        };
        let mut shards = Vec::with_capacity(files.len());
        let mut index = HashMap::new();
        for path in files {
            let shard = Shard::open(path)?;
            for name in shard.metadata.tensors().keys() {
                index.insert(name.clone(), shards.len());
            }
            shards.push(shard);
        }
        Ok(Self { dir: dir.to_path_buf(), shards, index, random: HashMap::new() })
    }

    /// A checkpoint of random weights for `config`'s shape, drawn on the host when each tensor is
    /// loaded (the same values on every device): projections and embeddings from about
    /// N(0, 0.02²), norms 1, biases 0. For benchmarks of model
    /// shapes whose weights do not matter; nothing is read from disk.
    pub fn random(config: &crate::ModelConfig) -> Self {
        let c = config;
        let (h, d) = (c.hidden_size, c.head_dim);
        let mut shapes: HashMap<String, Vec<usize>> = HashMap::new();
        shapes.insert("model.embed_tokens.weight".into(), vec![c.vocab_size, h]);
        shapes.insert("model.norm.weight".into(), vec![h]);
        if !c.tie_word_embeddings {
            shapes.insert("lm_head.weight".into(), vec![c.vocab_size, h]);
        }
        for i in 0..c.num_layers {
            let p = format!("model.layers.{i}");
            let projections = [
                ("self_attn.q_proj", c.num_heads * d, h, c.qkv_bias),
                ("self_attn.k_proj", c.num_kv_heads * d, h, c.qkv_bias),
                ("self_attn.v_proj", c.num_kv_heads * d, h, c.qkv_bias),
                ("self_attn.o_proj", h, c.num_heads * d, c.o_bias),
                ("mlp.gate_proj", c.intermediate_size, h, c.mlp_bias),
                ("mlp.up_proj", c.intermediate_size, h, c.mlp_bias),
                ("mlp.down_proj", h, c.intermediate_size, c.mlp_bias),
            ];
            for (name, out, inp, bias) in projections {
                shapes.insert(format!("{p}.{name}.weight"), vec![out, inp]);
                if bias {
                    shapes.insert(format!("{p}.{name}.bias"), vec![out]);
                }
            }
            shapes.insert(format!("{p}.input_layernorm.weight"), vec![h]);
            shapes.insert(format!("{p}.post_attention_layernorm.weight"), vec![h]);
            if c.qk_norm {
                shapes.insert(format!("{p}.self_attn.q_norm.weight"), vec![d]);
                shapes.insert(format!("{p}.self_attn.k_norm.weight"), vec![d]);
            }
        }
        Self { dir: PathBuf::from("<random weights>"), shards: Vec::new(), index: HashMap::new(), random: shapes }
    }

    /// Whether the weights are drawn ([`Checkpoint::random`]) rather than read.
    pub fn is_random(&self) -> bool {
        !self.random.is_empty()
    }

    /// The shape of a random tensor, checked against `expected`.
    fn random_shape(&self, name: &str, expected: &[usize]) -> Result<Option<&Vec<usize>>, ModelError> {
        let Some(shape) = self.random.get(name) else {
            return Ok(None);
        };
        if shape != expected {
            return Err(ModelError::ShapeMismatch { name: name.to_string(), path: self.dir.clone(), expected: expected.to_vec(), found: shape.clone() });
        }
        Ok(Some(shape))
    }

    /// The checkpoint directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the checkpoint holds a tensor of this name.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name) || self.random.contains_key(name)
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.index.keys().chain(self.random.keys()).map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    /// Where a tensor lives and how it is stored.
    pub fn meta(&self, name: &str) -> Result<TensorMeta, ModelError> {
        if let Some(shape) = self.random.get(name) {
            return Ok(TensorMeta { path: self.dir.clone(), dtype: "BF16".into(), shape: shape.clone() });
        }
        let shard = self.shard(name)?;
        let info = shard.info(name)?;
        Ok(TensorMeta { path: shard.path.clone(), dtype: format!("{:?}", info.dtype), shape: info.shape.clone() })
    }

    fn shard(&self, name: &str) -> Result<&Shard, ModelError> {
        let i = self.index.get(name).ok_or_else(|| ModelError::MissingTensor {
            name: name.to_string(),
            path: if self.shards.len() == 1 { self.shards[0].path.clone() } else { self.dir.join("model.safetensors.index.json") },
        })?;
        Ok(&self.shards[*i])
    }

    /// Reads one float tensor, checks its shape, and creates it on `device` in `dtype`.
    ///
    /// The stored dtype may be F32, F16 or BF16; conversion happens once, on the host,
    /// for this tensor only.
    pub fn load<const D: usize>(&self, name: &str, expected: [usize; D], device: &Device, dtype: DType) -> Result<Tensor<D>, ModelError> {
        if self.random_shape(name, &expected)?.is_some() {
            // Drawn on the host, so every device gets the same weights.
            let data = TensorData::new(self.read_f32(name, &expected)?, expected).convert_dtype(dtype);
            return Ok(Tensor::from_data(data, (device, dtype)));
        }
        let shard = self.shard(name)?;
        let info = shard.info(name)?;
        if info.shape != expected {
            return Err(ModelError::ShapeMismatch { name: name.to_string(), path: shard.path.clone(), expected: expected.to_vec(), found: info.shape.clone() });
        }
        let stored = match info.dtype {
            Dtype::F32 => DType::F32,
            Dtype::F16 => DType::F16,
            Dtype::BF16 => DType::BF16,
            other => {
                return Err(ModelError::UnsupportedDType { name: name.to_string(), path: shard.path.clone(), found: format!("{other:?}") });
            }
        };
        let bytes = shard.bytes(info.data_offsets);
        let mut data = TensorData::from_bytes_vec(bytes.to_vec(), expected, stored);
        if stored != dtype {
            data = data.convert_dtype(dtype);
        }
        shard.release(info.data_offsets);
        Ok(Tensor::from_data(data, (device, dtype)))
    }

    /// Reads one float tensor to the host as f32, checking its shape.
    pub fn read_f32(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>, ModelError> {
        if self.random_shape(name, expected)?.is_some() {
            let n = expected.iter().product();
            return Ok(if name.ends_with("norm.weight") {
                vec![1.0; n]
            } else if name.ends_with(".bias") {
                vec![0.0; n]
            } else {
                random_normal(n, name, RANDOM_STD as f32)
            });
        }
        let shard = self.shard(name)?;
        let info = shard.info(name)?;
        self.check_shape(shard, name, &info.shape, expected)?;
        let Some(out) = decode_floats(shard.bytes(info.data_offsets), info.dtype) else {
            return Err(ModelError::UnsupportedDType { name: name.to_string(), path: shard.path.clone(), found: format!("{:?}", info.dtype) });
        };
        shard.release(info.data_offsets);
        Ok(out)
    }

    /// Reads a packed U32 tensor (an MLX quantized weight) to the host, with its shape.
    pub fn read_u32(&self, name: &str) -> Result<(Vec<u32>, Vec<usize>), ModelError> {
        let shard = self.shard(name)?;
        let info = shard.info(name)?;
        if info.dtype != Dtype::U32 {
            return Err(ModelError::Config {
                path: shard.path.clone(),
                message: format!("tensor `{name}` has `.scales` beside it but is stored as {:?}, not U32 packed codes", info.dtype),
            });
        }
        let bytes = shard.bytes(info.data_offsets);
        let out = bytes.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        shard.release(info.data_offsets);
        Ok((out, info.shape.clone()))
    }

    /// The stored shape of a tensor.
    pub fn shape(&self, name: &str) -> Result<Vec<usize>, ModelError> {
        if let Some(shape) = self.random.get(name) {
            return Ok(shape.clone());
        }
        Ok(self.shard(name)?.info(name)?.shape.clone())
    }

    fn check_shape(&self, shard: &Shard, name: &str, found: &[usize], expected: &[usize]) -> Result<(), ModelError> {
        if found != expected {
            return Err(ModelError::ShapeMismatch { name: name.to_string(), path: shard.path.clone(), expected: expected.to_vec(), found: found.to_vec() });
        }
        Ok(())
    }

    /// The raw little-endian bytes of a tensor, with its stored shape.
    pub fn raw(&self, name: &str) -> Result<(&[u8], TensorMeta), ModelError> {
        let shard = self.shard(name)?;
        let info = shard.info(name)?;
        let meta = TensorMeta { path: shard.path.clone(), dtype: format!("{:?}", info.dtype), shape: info.shape.clone() };
        Ok((shard.bytes(info.data_offsets), meta))
    }
}

/// `n` values of about N(0, std²) (a sum of four uniforms), a function of `name` only, drawn
/// on every core: the weights of [`Checkpoint::random`], and of the benchmarks.
pub fn random_normal(n: usize, name: &str, std: f32) -> Vec<f32> {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    name.hash(&mut hasher);
    let seed = hasher.finish();
    let mut out = vec![0f32; n];
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
    let chunk = n.div_ceil(threads).max(1 << 16);
    // Four uniforms on [0, 1) have variance 4/12: scale to `std`.
    let scale = std * 3f32.sqrt();
    std::thread::scope(|scope| {
        for (c, part) in out.chunks_mut(chunk).enumerate() {
            scope.spawn(move || {
                let mut s = (seed ^ (c as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1;
                for v in part {
                    let mut sum = 0f32;
                    for _ in 0..4 {
                        s ^= s << 13;
                        s ^= s >> 7;
                        s ^= s << 17;
                        sum += (s >> 40) as f32 / (1u64 << 24) as f32;
                    }
                    *v = (sum - 2.0) * scale;
                }
            });
        }
    });
    out
}

/// f32 values of little-endian F32, F16 or BF16 bytes; `None` for any other dtype.
pub fn decode_floats(bytes: &[u8], dtype: Dtype) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        Dtype::F16 => bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        Dtype::BF16 => bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        _ => return None,
    })
}

/// `values` as little-endian F16 or BF16 bytes, else F32.
pub fn encode_floats(values: &[f32], dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::F16 => values.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect(),
        Dtype::BF16 => values.iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect(),
        _ => values.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

impl Shard {
    fn open(path: PathBuf) -> Result<Self, ModelError> {
        let file = File::open(&path).map_err(|source| ModelError::Io { path: path.clone(), source })?;
        // SAFETY: the map is read-only and private; a checkpoint file modified while we read
        // it gives wrong numbers, not memory unsafety in our code, as for every mmap loader.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|source| ModelError::Io { path: path.clone(), source })?;
        let (header_len, metadata) = SafeTensors::read_metadata(&mmap).map_err(|e| ModelError::Safetensors { path: path.clone(), message: e.to_string() })?;
        Ok(Self { path, mmap, data_start: 8 + header_len, metadata })
    }

    fn info(&self, name: &str) -> Result<&safetensors::tensor::TensorInfo, ModelError> {
        self.metadata.info(name).ok_or_else(|| ModelError::MissingTensor { name: name.to_string(), path: self.path.clone() })
    }

    fn bytes(&self, (start, end): (usize, usize)) -> &[u8] {
        &self.mmap[self.data_start + start..self.data_start + end]
    }

    /// Drops the pages of a tensor already copied out, so the map does not keep a
    /// second copy of the model resident.
    fn release(&self, (start, end): (usize, usize)) {
        let page = 4096;
        let from = (self.data_start + start).div_ceil(page) * page;
        let to = (self.data_start + end) / page * page;
        if to > from {
            // SAFETY: the mapping is private and read-only, and no slice into this range
            // outlives `load`: the bytes were copied before this call. Dropped pages are
            // read again from the file if touched later.
            let _ = unsafe { self.mmap.unchecked_advise_range(UncheckedAdvice::DontNeed, from, to - from) };
        }
    }
}

fn read_to_string(path: &Path) -> Result<String, ModelError> {
    std::fs::read_to_string(path).map_err(|source| ModelError::Io { path: path.to_path_buf(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 14, defect 8: a shard index that points outside the model directory is refused,
    /// naming the index and the shard, before anything is opened.
    #[test]
    fn a_shard_index_pointing_outside_the_model_directory_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("secret.safetensors");
        std::fs::write(&outside, b"not read").unwrap();
        let dir = tmp.path().join("model");
        std::fs::create_dir(&dir).unwrap();
        for shard in ["../secret.safetensors", outside.to_str().unwrap(), "sub/model.safetensors", ".."] {
            let index = serde_json::json!({ "weight_map": { "model.embed_tokens.weight": shard } });
            std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
            let message = Checkpoint::open(&dir).err().expect("refused").to_string();
            assert!(message.contains("model.safetensors.index.json") && message.contains(shard), "{message}");
        }
    }
}
