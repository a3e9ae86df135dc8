//! HF safetensors weights: one `model.safetensors` or shards listed by
//! `model.safetensors.index.json`, memory-mapped and pre-validated.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;

use super::safetensors_validate::{validate_safetensors, SafetensorsTensorSummary};
use super::weights::WeightSource;
use crate::error::{Error, Result};
use crate::kernels::KernelPolicy;
use crate::model::linear::LinearWeight;

struct Shard {
    path: PathBuf,
    mmap: Mmap,
    data_start: usize,
}

/// Weights from safetensors files, converted to the model dtype as they are read.
pub struct SafetensorsWeights {
    dir: PathBuf,
    shards: Vec<Shard>,
    /// name → (shard index, summary)
    index: HashMap<String, (usize, SafetensorsTensorSummary)>,
    dtype: DType,
    device: Device,
    /// In-situ quantization of projections ([`super::LoadOptions::quantize`]) and the kernel
    /// policy the quantized projections load for.
    quantize: Option<(GgmlDType, KernelPolicy)>,
}

impl SafetensorsWeights {
    /// Quantizes every projection to `dtype` as it is read (one f32 copy of one tensor at a
    /// time); rows whose length the type's block does not divide take llama.cpp's fallback type,
    /// and stay dense if none fits.
    pub fn with_quantize(mut self, dtype: GgmlDType, kernels: KernelPolicy) -> Self {
        self.quantize = Some((dtype, kernels));
        self
    }

    /// Opens the safetensors of the model directory `dir`: the shards named by
    /// `model.safetensors.index.json` if present, else `model.safetensors`.
    pub fn open(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let files = shard_files(dir)?;
        let mut shards = Vec::with_capacity(files.len());
        let mut index = HashMap::new();
        for (i, path) in files.into_iter().enumerate() {
            let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
            // SAFETY: the map is read-only; a file truncated underneath a running process is the
            // caller's responsibility (replace model files by atomic rename).
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
            let summaries = validate_safetensors(&mmap).map_err(|source| Error::MalformedSafetensors {
                path: path.clone(),
                source,
            })?;
            let header_len = mmap
                .get(..8)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_le_bytes)
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| Error::NotAModel { path: path.clone(), reason: "no safetensors header".into() })?;
            for s in summaries {
                if index.contains_key(&s.name) {
                    return Err(Error::NotAModel {
                        path: path.clone(),
                        reason: format!("tensor `{}` appears in more than one shard", s.name),
                    });
                }
                index.insert(s.name.clone(), (i, s));
            }
            shards.push(Shard { path, mmap, data_start: 8 + header_len });
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            shards,
            index,
            dtype,
            device: device.clone(),
            quantize: None,
        })
    }

    /// Scans every tensor of every shard for NaN/±Inf ([`super::LoadOptions::check_tensors`]),
    /// shard by shard in file order. Errors: [`Error::NonFiniteTensor`] naming the first bad one.
    pub fn check_tensors(&self) -> Result<()> {
        for (i, shard) in self.shards.iter().enumerate() {
            let mut tensors: Vec<&SafetensorsTensorSummary> =
                self.index.values().filter(|(s, _)| *s == i).map(|(_, t)| t).collect();
            tensors.sort_by_key(|t| t.data_offsets.0);
            let data = tensors.into_iter().map(|t| {
                let (a, b) = t.data_offsets;
                // The validator checked the offsets lie inside the file; `get` keeps this total.
                let bytes = shard.mmap.get(shard.data_start + a..shard.data_start + b).unwrap_or_default();
                (t.name.as_str(), t.dtype.as_str(), bytes)
            });
            super::scan::check_safetensors(&shard.path, data)?;
        }
        Ok(())
    }

    /// A tensor's stored bytes (in the memory map), its safetensors dtype name (`F32`, `F16`,
    /// `BF16`, …) and shape. Errors: [`Error::MissingTensor`].
    pub fn raw(&self, name: &str) -> Result<(&[u8], &str, &[usize])> {
        let missing = || Error::MissingTensor { path: self.dir.clone(), name: name.to_string() };
        let (shard_idx, s) = self.index.get(name).ok_or_else(missing)?;
        let shard = self.shards.get(*shard_idx).ok_or_else(missing)?;
        let (begin, end) = s.data_offsets;
        let bytes = shard.mmap.get(shard.data_start + begin..shard.data_start + end).ok_or_else(missing)?;
        Ok((bytes, s.dtype.as_str(), s.shape.as_slice()))
    }

    /// Drops a tensor's pages from resident memory (see [`super::gguf::GgufFile::release`]).
    pub fn release(&self, name: &str) {
        #[cfg(unix)]
        if let Some((shard, s)) = self.index.get(name).and_then(|(i, s)| Some((self.shards.get(*i)?, s))) {
            let (begin, end) = s.data_offsets;
            // SAFETY: a read-only file mapping; MADV_DONTNEED only evicts its pages, and a later
            // access faults in the same file bytes again. Failure just leaves the pages resident.
            let _ = unsafe {
                shard.mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, shard.data_start + begin, end - begin)
            };
        }
    }

    fn load(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let (shard_idx, s) = self.index.get(name).ok_or_else(|| Error::MissingTensor {
            path: self.dir.clone(),
            name: name.to_string(),
        })?;
        let shard = self.shards.get(*shard_idx).ok_or_else(|| Error::MissingTensor {
            path: self.dir.clone(),
            name: name.to_string(),
        })?;
        if s.shape != shape {
            return Err(Error::ShapeMismatch {
                path: shard.path.clone(),
                name: name.to_string(),
                expected: shape.to_vec(),
                got: s.shape.clone(),
            });
        }
        let dtype = match s.dtype.as_str() {
            "F32" => DType::F32,
            "F16" => DType::F16,
            "BF16" => DType::BF16,
            other => {
                return Err(Error::UnsupportedQuant {
                    path: shard.path.clone(),
                    name: name.to_string(),
                    dtype: other.to_string(),
                    supported: "F32, F16, BF16",
                })
            }
        };
        let (begin, end) = s.data_offsets;
        let bytes = shard
            .mmap
            .get(shard.data_start + begin..shard.data_start + end)
            .ok_or_else(|| Error::NotAModel { path: shard.path.clone(), reason: format!("tensor `{name}` data out of bounds") })?;
        let t = Tensor::from_raw_buffer(bytes, dtype, shape, &self.device)?;
        Ok(t.to_dtype(self.dtype)?)
    }
}

/// The shard files of `dir`, checked to stay inside it.
fn shard_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index_path = dir.join("model.safetensors.index.json");
    if !index_path.exists() {
        let single = dir.join("model.safetensors");
        if !single.exists() {
            return Err(Error::NotAModel {
                path: dir.to_path_buf(),
                reason: "no model.safetensors or model.safetensors.index.json".into(),
            });
        }
        return Ok(vec![single]);
    }
    let text = std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|source| Error::Json { path: index_path.clone(), source })?;
    let map = json.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| Error::MissingConfigField {
        path: index_path.clone(),
        field: "weight_map".into(),
    })?;
    let mut files: Vec<PathBuf> = Vec::new();
    for (tensor, file) in map {
        let name = file.as_str().ok_or_else(|| Error::InvalidConfig {
            path: index_path.clone(),
            field: format!("weight_map.{tensor}"),
            reason: "not a file name".into(),
        })?;
        let plain = Path::new(name).file_name().is_some_and(|f| f == name) && !name.starts_with('.');
        if !plain {
            return Err(Error::InvalidConfig {
                path: index_path.clone(),
                field: format!("weight_map.{tensor}"),
                reason: format!("`{name}` is not a plain file name inside the model directory"),
            });
        }
        let path = dir.join(name);
        if !files.contains(&path) {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

impl WeightSource for SafetensorsWeights {
    fn path(&self) -> &Path {
        &self.dir
    }

    fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.load(name, shape)
    }

    fn linear(&self, name: &str, out_features: usize, in_features: usize) -> Result<LinearWeight> {
        let dense = self.load(name, &[out_features, in_features])?;
        let Some((qtype, kernels)) = self.quantize else {
            return Ok(LinearWeight::Dense(dense));
        };
        let Ok(qtype) = crate::quantize::mix::with_fallback(qtype, in_features, name) else {
            return Ok(LinearWeight::Dense(dense));
        };
        // Quantized on the CPU from f32, then placed like a GGUF tensor of that type.
        let q = QTensor::quantize(&dense.to_device(&Device::Cpu)?.to_dtype(DType::F32)?, qtype)?;
        drop(dense);
        // The file's pages of this tensor are not needed again: keep RSS at the quantized model.
        self.release(name);
        let q = if self.device.is_cpu() { q } else { QTensor::quantize_onto(&q.dequantize(&Device::Cpu)?, qtype, &self.device)? };
        super::gguf::linear_from_qtensor(q, self.dtype, &self.device, false, kernels)
    }
}
