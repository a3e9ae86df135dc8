//! GGUF weights (llama.cpp layout), pre-validated before candle parses the header.

use std::collections::HashSet;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::quantized::ggml_file::qtensor_from_ggml;
use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;

use super::gguf_validate::{validate_gguf, GgufLimits};
use super::weights::WeightSource;
use crate::kernels::KernelPolicy;
use crate::error::{Error, Result};
use crate::model::embedding::EmbeddingWeight;
use crate::model::linear::LinearWeight;

/// The tensor holding llama.cpp's RoPE frequency factors (Llama 3 scaling), read by
/// [`GgufFile::rope_freqs`].
pub const ROPE_FREQS_TENSOR: &str = "rope_freqs.weight";

/// Alignment of tensor bytes that candle can view as its block structs (f32 fields at most).
const BLOCK_ALIGN: usize = 8;

/// An opened, validated GGUF file.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    content: Content,
}

impl GgufFile {
    /// Maps `path`, validates its structure, and parses the header with candle.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: read-only map; replace model files only by atomic rename while in use.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        validate_gguf(&mmap, &GgufLimits::default()).map_err(|source| Error::MalformedGguf {
            path: path.to_path_buf(),
            source,
        })?;
        let content = Content::read(&mut Cursor::new(&mmap[..]))?;
        Ok(Self {
            path: path.to_path_buf(),
            mmap,
            content,
        })
    }

    /// The file it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The parsed header: metadata and tensor infos.
    pub fn content(&self) -> &Content {
        &self.content
    }

    /// Reads a tensor by its GGUF name onto `device`: one copy, from the memory map.
    pub fn qtensor(&self, gguf_name: &str, device: &Device) -> Result<QTensor> {
        let (bytes, t) = self.raw(gguf_name)?;
        let dims = self.dims(gguf_name)?;
        // candle reinterprets the bytes as its block type in place, so they must be aligned for
        // it; a file with `general.alignment` below that goes through candle's reader (a copy).
        if (bytes.as_ptr() as usize).is_multiple_of(BLOCK_ALIGN) {
            return Ok(qtensor_from_ggml(t, bytes, dims, device)?);
        }
        Ok(self.content.tensor(&mut Cursor::new(&self.mmap[..]), gguf_name, device)?)
    }

    /// A tensor's dims (candle's order, rows last-but-one), by GGUF name.
    /// Errors: [`Error::MissingTensor`].
    pub fn dims(&self, gguf_name: &str) -> Result<Vec<usize>> {
        match self.content.tensor_infos.get(gguf_name) {
            Some(info) => Ok(info.shape.dims().to_vec()),
            None => Err(Error::MissingTensor { path: self.path.clone(), name: gguf_name.to_string() }),
        }
    }

    /// A tensor's stored bytes (in the memory map) and type, by GGUF name.
    /// Errors: [`Error::MissingTensor`].
    pub fn raw(&self, gguf_name: &str) -> Result<(&[u8], GgmlDType)> {
        let missing = || Error::MissingTensor { path: self.path.clone(), name: gguf_name.to_string() };
        let info = self.content.tensor_infos.get(gguf_name).ok_or_else(missing)?;
        let t = info.ggml_dtype;
        let size = info.shape.elem_count() / t.block_size() * t.type_size();
        let start = self.content.tensor_data_offset as usize + info.offset as usize;
        // The validator checked every tensor's bytes are present.
        let bytes = self.mmap.get(start..start + size).ok_or_else(missing)?;
        Ok((bytes, t))
    }

    /// Drops a tensor's pages from this process's resident memory (they are read from the file
    /// again if touched): a streaming reader then holds one tensor, not the whole file, in RSS.
    /// A no-op where the OS has no `madvise`.
    pub fn release(&self, gguf_name: &str) {
        #[cfg(unix)]
        if let Some(info) = self.content.tensor_infos.get(gguf_name) {
            let t = info.ggml_dtype;
            let size = info.shape.elem_count() / t.block_size() * t.type_size();
            let start = self.content.tensor_data_offset as usize + info.offset as usize;
            // SAFETY: a read-only file mapping; MADV_DONTNEED only evicts its pages, and a later
            // access faults in the same file bytes again. Failure just leaves the pages resident.
            let _ = unsafe { self.mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, size) };
        }
    }

    /// Scans every tensor for NaN/±Inf ([`super::LoadOptions::check_tensors`]), in file order.
    /// Errors: [`Error::NonFiniteTensor`] naming the first bad tensor (by its GGUF name).
    pub fn check_tensors(&self) -> Result<()> {
        let base = self.content.tensor_data_offset as usize;
        let mut infos: Vec<_> = self.content.tensor_infos.iter().collect();
        infos.sort_by_key(|(_, info)| info.offset);
        let tensors = infos.into_iter().map(|(name, info)| {
            let t = info.ggml_dtype;
            let size = info.shape.elem_count() / t.block_size() * t.type_size();
            let start = base + info.offset as usize;
            // The validator checked every tensor's bytes are present; `get` keeps this total.
            let bytes = self.mmap.get(start..start + size).unwrap_or_default();
            (name.as_str(), t, bytes)
        });
        super::scan::check_gguf(&self.path, tensors)
    }

    /// Every tensor name, in file (offset) order.
    pub fn tensor_names(&self) -> Vec<&str> {
        let mut infos: Vec<_> = self.content.tensor_infos.iter().collect();
        infos.sort_by_key(|(_, info)| info.offset);
        infos.into_iter().map(|(name, _)| name.as_str()).collect()
    }

    /// `rope_freqs.weight` (Llama 3 scaling baked by llama.cpp's converter), if present.
    pub fn rope_freqs(&self) -> Result<Option<Vec<f32>>> {
        if !self.content.tensor_infos.contains_key(ROPE_FREQS_TENSOR) {
            return Ok(None);
        }
        let t = self.qtensor(ROPE_FREQS_TENSOR, &Device::Cpu)?.dequantize(&Device::Cpu)?;
        Ok(Some(t.flatten_all()?.to_vec1::<f32>()?))
    }
}

/// HF name → GGUF name (llama.cpp `tensor_mapping.py`), the one table of the format's names.
pub fn gguf_name(hf: &str) -> Option<String> {
    let global = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(g) = global {
        return Some(g.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, suffix) = rest.rsplit_once('.')?;
    let short = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{short}.{suffix}"))
}

/// Weights of a GGUF file addressed by HF names.
pub struct GgufWeights {
    file: Arc<GgufFile>,
    dtype: DType,
    device: Device,
    dequantize: bool,
    kernels: KernelPolicy,
    /// GGUF names of the tensors read so far, for [`GgufWeights::check_all_used`].
    used: Mutex<HashSet<String>>,
}

impl GgufWeights {
    /// With `dequantize`, quantized projections are expanded to dense `dtype` weights at load
    /// (exact reference numerics, more memory); otherwise they stay quantized.
    /// `kernels` decides which projections load for our CPU or Metal kernels.
    pub fn new(file: Arc<GgufFile>, dtype: DType, device: &Device, dequantize: bool, kernels: KernelPolicy) -> Self {
        Self {
            file,
            dtype,
            device: device.clone(),
            dequantize,
            kernels,
            used: Mutex::new(HashSet::new()),
        }
    }

    /// The file's tensors that were neither read through this source nor named in `consumed`
    /// (tensors the loader read itself, e.g. `rope_freqs.weight`) or `allowed`, in file order.
    pub fn unused_tensors(&self, consumed: &[&str], allowed: &[String]) -> Vec<String> {
        // A poisoned lock still holds a valid set: the names inserted before the panic.
        let used = self.used.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        self.file
            .tensor_names()
            .into_iter()
            .filter(|name| !used.contains(*name) && !consumed.contains(name) && !allowed.iter().any(|a| a == name))
            .map(str::to_string)
            .collect()
    }

    /// After the model is built: every tensor of the file was used, as llama.cpp's loader
    /// requires (`llama_model_loader::done_getting_tensors`).
    /// Errors: [`Error::UnusedTensors`] listing the others.
    pub fn check_all_used(&self, consumed: &[&str], allowed: &[String]) -> Result<()> {
        let names = self.unused_tensors(consumed, allowed);
        if names.is_empty() {
            return Ok(());
        }
        Err(Error::UnusedTensors { path: self.file.path.clone(), names })
    }

    /// The GGUF name of HF tensor `hf`, checked to have `shape`, and marked used.
    fn checked_name(&self, hf: &str, shape: &[usize]) -> Result<String> {
        let name = gguf_name(hf).ok_or_else(|| Error::MissingTensor {
            path: self.file.path.clone(),
            name: hf.to_string(),
        })?;
        let dims = self.file.dims(&name)?;
        self.used.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).insert(name.clone());
        if dims != shape {
            return Err(Error::ShapeMismatch { path: self.file.path.clone(), name, expected: shape.to_vec(), got: dims });
        }
        Ok(name)
    }

    /// Reads HF tensor `hf` of `shape` onto `device`; its pages of the map are then dropped from
    /// RSS (the copy is what the model keeps).
    fn read(&self, hf: &str, shape: &[usize], device: &Device) -> Result<QTensor> {
        let name = self.checked_name(hf, shape)?;
        let q = self.file.qtensor(&name, device);
        self.file.release(&name);
        q
    }

    /// Whether a projection of GGML type `t` and `(out, in)` runs on our CPU kernels.
    fn takes_cpu_kernels(&self, t: GgmlDType, dims: &[usize]) -> bool {
        takes_cpu_kernels(t, dims, self.dtype, &self.device, self.dequantize, self.kernels)
    }
}

impl WeightSource for GgufWeights {
    fn path(&self) -> &Path {
        &self.file.path
    }

    fn contains(&self, name: &str) -> bool {
        gguf_name(name).is_some_and(|g| self.file.content.tensor_infos.contains_key(&g))
    }

    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let q = self.read(name, shape, &self.device)?;
        Ok(q.dequantize(&self.device)?.to_dtype(self.dtype)?)
    }

    fn linear(&self, name: &str, out_features: usize, in_features: usize) -> Result<LinearWeight> {
        let shape = [out_features, in_features];
        let gname = self.checked_name(name, &shape)?;
        let (bytes, t) = self.file.raw(&gname)?;
        // Types our kernels repack are packed straight from the map: no QTensor copy between.
        let quant = crate::kernels::cpu::CpuQuant::from_ggml(t).filter(|&q| crate::kernels::cpu::packed::packable(q));
        if let Some(quant) = quant.filter(|_| self.takes_cpu_kernels(t, &shape)) {
            let w = crate::kernels::cpu::CpuWeight::from_bytes(bytes, quant, out_features, in_features);
            self.file.release(&gname);
            return Ok(LinearWeight::Cpu(Arc::new(w?)));
        }
        let q = self.read(name, &shape, &self.device)?;
        linear_from_qtensor(q, self.dtype, &self.device, self.dequantize, self.kernels)
    }

    /// Quantized tables stay quantized (on the host; rows dequantized on lookup), tied ones are
    /// the lm_head's weight; with `dequantize` the table is dense, as every weight then is.
    fn embedding(&self, name: &str, vocab: usize, hidden: usize, tied_head: Option<&LinearWeight>) -> Result<EmbeddingWeight> {
        if let Some(shared) = tied_head.and_then(EmbeddingWeight::shared_with) {
            return Ok(shared);
        }
        if self.dequantize {
            return Ok(EmbeddingWeight::Dense(self.tensor(name, &[vocab, hidden])?));
        }
        Ok(EmbeddingWeight::Quantized(Arc::new(self.read(name, &[vocab, hidden], &Device::Cpu)?)))
    }
}

/// Whether a projection of GGML type `t` and shape `dims` loads for our CPU kernels: the types
/// they take (F16 only when the model computes in F32), on the CPU, unless `dequantize`.
fn takes_cpu_kernels(t: GgmlDType, dims: &[usize], dtype: DType, device: &Device, dequantize: bool, kernels: KernelPolicy) -> bool {
    device.is_cpu()
        && !dequantize
        && kernels.cpu
        && crate::kernels::cpu::cpu_kernels_available()
        && crate::kernels::cpu::CpuWeight::supports_type(t, dims)
        && (t != GgmlDType::F16 || dtype == DType::F32)
}

/// The projection a GGML tensor becomes: our CPU kernels for the types they take (and F16 kept
/// as F16 when the model computes in F32), dense for F32/F16/BF16 or with `dequantize`, our
/// Metal kernels when enabled, else candle's `QMatMul`. Shared by GGUF files and in-situ
/// quantization of safetensors ([`super::LoadOptions::quantize`]).
pub(crate) fn linear_from_qtensor(
    q: QTensor,
    dtype: DType,
    device: &Device,
    dequantize: bool,
    kernels: KernelPolicy,
) -> Result<LinearWeight> {
    if takes_cpu_kernels(q.dtype(), q.shape().dims(), dtype, device, dequantize, kernels) {
        let w = crate::kernels::cpu::CpuWeight::from_arc(Arc::new(q))?;
        return Ok(LinearWeight::Cpu(Arc::new(w)));
    }
    let dense = matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
    if dense || dequantize {
        return Ok(LinearWeight::Dense(q.dequantize(device)?.to_dtype(dtype)?));
    }
    let custom = device.is_metal() && kernels.metal && crate::kernels::QuantType::from_ggml(q.dtype()).is_some();
    if custom {
        let w = crate::kernels::QWeight::from_qtensor(Arc::new(q))?;
        return Ok(LinearWeight::Kernel(Arc::new(w)));
    }
    Ok(LinearWeight::Quantized(Arc::new(q)))
}

#[cfg(test)]
mod tests {
    use super::gguf_name;

    #[test]
    fn hf_names_map_to_llama_cpp_names() {
        assert_eq!(gguf_name("model.layers.3.self_attn.q_proj.bias").as_deref(), Some("blk.3.attn_q.bias"));
        assert_eq!(gguf_name("model.layers.0.mlp.down_proj.weight").as_deref(), Some("blk.0.ffn_down.weight"));
        assert_eq!(gguf_name("lm_head.weight").as_deref(), Some("output.weight"));
        assert_eq!(gguf_name("model.layers.x.mlp.down_proj.weight"), None);
        assert_eq!(gguf_name("model.layers.0.mlp.fc9.weight"), None);
    }
}
