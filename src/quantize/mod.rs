//! Quantization: an HF safetensors directory or a GGUF file → one complete GGUF file that
//! llama.cpp (and this crate) loads, in any type candle's `QTensor::quantize` writes.
//!
//! The output has llama.cpp's key and tensor names, Q/K rows permuted for `llama`-arch RoPE,
//! `rope_freqs.weight` for Llama 3 scaling, no `output.weight` for tied embeddings, the tokenizer
//! and chat template (`tokenizer.ggml.*`, `tokenizer.chat_template`), `general.file_type` and
//! provenance. Tensor types follow llama.cpp's rules for each file type ([`mix`]), including the
//! `*_K_M` mixes and the fallbacks for rows that are not a multiple of 256.
//!
//! It is written streaming ([`writer`]): one tensor is read, merged with adapters, quantized and
//! written at a time, so peak memory is about the largest tensor in f32 (plus the merged adapters'
//! base model when `merge_adapters` is used); and atomically: a temporary file in the output's
//! directory is renamed over the output at the end, and removed on any error.
//!
//! ```no_run
//! use metal_candle::quantize::{quantize_model, FileType, QuantizeOptions};
//! # fn main() -> metal_candle::Result<()> {
//! let opts = QuantizeOptions::new("hf-model-dir".into(), FileType::Q4KM, "model-q4_k_m.gguf".into());
//! let report = quantize_model(&opts)?;
//! println!("{} tensors, {} bytes", report.tensors.len(), report.bytes);
//! # Ok(()) }
//! ```

pub mod mix;
mod source;
mod vocab;
pub mod writer;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Tensor};
use rayon::prelude::*;
use regex::Regex;

pub use mix::{FileType, SUPPORTED_TYPES};
use source::{Input, Origin, Planned};
use writer::{GgufWriter, TensorInfo};

use crate::adapter::{AdapterOptions, LoraAdapter};
use crate::config::ModelConfig;
use crate::device::DeviceChoice;
use crate::error::{Error, Result};
use crate::loader::{load_model, LoadOptions};
use crate::model::linear::Projection;

/// Quantization version of the block formats (`general.quantization_version`, ggml's
/// `GGML_QNT_VERSION`).
const QUANTIZATION_VERSION: u32 = 2;
/// Rows per parallel quantization chunk (a multiple of nothing in particular: rows are
/// independent in every GGML block format).
const ROWS_PER_CHUNK: usize = 64;

/// A LoRA adapter to bake into the weights before quantizing.
#[derive(Debug, Clone)]
pub struct MergeAdapter {
    /// A PEFT directory or a llama.cpp GGUF LoRA file.
    pub path: PathBuf,
    /// Multiplies the adapter's own `alpha/r` scaling (1.0: as trained).
    pub scale: f64,
}

impl MergeAdapter {
    /// Parses `PATH[:SCALE]` (the part after the last `:` is the scale if it is a number).
    pub fn parse(s: &str) -> Result<Self> {
        if let Some((path, scale)) = s.rsplit_once(':') {
            if let Ok(scale) = scale.parse::<f64>() {
                if !scale.is_finite() {
                    return Err(Error::InvalidParameter { name: "merge-adapter", reason: format!("scale {scale} is not finite") });
                }
                return Ok(Self { path: path.into(), scale });
            }
        }
        Ok(Self { path: s.into(), scale: 1.0 })
    }
}

/// What to quantize and how.
#[derive(Debug, Clone)]
pub struct QuantizeOptions {
    /// An HF model directory (config.json, safetensors, tokenizer.json, tokenizer_config.json)
    /// or a GGUF file.
    pub model: PathBuf,
    /// The GGUF file type to write (`--type`, e.g. `q4_k_m`).
    pub file_type: FileType,
    /// The output GGUF path.
    pub out: PathBuf,
    /// Adapters merged into the weights (in order) before quantizing.
    pub merge_adapters: Vec<MergeAdapter>,
    /// Tensors (GGUF names) matching this regex stay F32.
    pub keep_f32: Option<Regex>,
    /// Every quantizable tensor gets the file type's default type, without the mix rules (still
    /// with the row-length fallbacks), like `llama-quantize --pure`.
    pub pure: bool,
    /// Overwrite an existing output file.
    pub force: bool,
    /// An importance matrix: not implemented, refused with [`Error::ImatrixUnsupported`].
    pub imatrix: Option<PathBuf>,
}

impl QuantizeOptions {
    /// Options with the defaults: no adapters, no `--keep-f32`, mix rules on, no overwrite, no imatrix.
    pub fn new(model: PathBuf, file_type: FileType, out: PathBuf) -> Self {
        Self { model, file_type, out, merge_adapters: Vec::new(), keep_f32: None, pure: false, force: false, imatrix: None }
    }
}

/// One written tensor.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TensorReport {
    /// The tensor's GGUF name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Candle order (rows first).
    pub dims: Vec<usize>,
    /// GGML type name (`Q4K`, `Q6K`, `F32`, …).
    pub dtype: String,
    /// The type rule asked for a 256-block type the rows do not fit; a 32-block one was used.
    pub fallback: bool,
}

/// What [`quantize_model`] wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct QuantizeReport {
    /// The GGUF file written.
    pub out: PathBuf,
    /// The file type's name, e.g. `"q4_k_m"`.
    pub file_type: String,
    /// Every tensor written, in the order written.
    pub tensors: Vec<TensorReport>,
    /// Size of the output file.
    pub bytes: u64,
    /// Wall-clock time the quantization took, in seconds.
    pub seconds: f64,
}

/// Progress after each tensor: (tensors done, total, the tensor just written).
pub type Progress<'a> = &'a mut dyn FnMut(usize, usize, &TensorReport);

/// Quantizes `opts.model` into `opts.out`. See the module docs and [`quantize_model_with_progress`].
pub fn quantize_model(opts: &QuantizeOptions) -> Result<QuantizeReport> {
    quantize_model_with_progress(opts, &mut |_, _, _| {})
}

/// [`quantize_model`], calling `progress` after each tensor.
///
/// Errors: [`Error::OutputExists`] (without `force`), [`Error::ImatrixUnsupported`],
/// [`Error::NoQuantFallback`] (a row length no type fits), [`Error::QuantizeWrite`] (disk full or
/// any write failure; no file is left), [`Error::UnsupportedTokenizer`], and every loader error
/// for a malformed input or adapter.
pub fn quantize_model_with_progress(opts: &QuantizeOptions, progress: Progress<'_>) -> Result<QuantizeReport> {
    let start = Instant::now();
    if let Some(path) = &opts.imatrix {
        return Err(Error::ImatrixUnsupported { path: path.clone() });
    }
    if opts.out.exists() && !opts.force {
        return Err(Error::OutputExists { path: opts.out.clone() });
    }
    let input = Input::open(&opts.model)?;
    let plan = input.plan()?;
    let deltas = adapter_deltas(opts)?;
    let mm = input.mix_model(&plan)?;
    let mut infos = Vec::with_capacity(plan.len());
    let mut reports = Vec::with_capacity(plan.len());
    for p in &plan {
        let (dtype, fallback) = choose_type(opts.file_type, opts.pure, opts.keep_f32.as_ref(), input.raw_gguf_type(p), p, &mm)?;
        infos.push(TensorInfo { name: p.name.clone(), dims: p.dims.clone(), dtype });
        reports.push(TensorReport { name: p.name.clone(), dims: p.dims.clone(), dtype: format!("{dtype:?}"), fallback });
    }
    let mut metadata = input.metadata()?;
    metadata.extend(provenance(opts));
    let mut w = GgufWriter::create(&opts.out, &metadata, &infos)?;
    for (i, (p, info)) in plan.iter().zip(&infos).enumerate() {
        write_tensor(&mut w, &input, p, info.dtype, deltas.get(&(p.layer, p.proj)))?;
        input.release(p);
        progress(i + 1, plan.len(), &reports[i]);
    }
    let bytes = w.finish()?;
    Ok(QuantizeReport {
        out: opts.out.clone(),
        file_type: opts.file_type.name().to_string(),
        tensors: reports,
        bytes,
        seconds: start.elapsed().as_secs_f64(),
    })
}

fn provenance(opts: &QuantizeOptions) -> Vec<(String, Value)> {
    let mut md = vec![
        ("general.file_type".to_string(), Value::U32(opts.file_type.gguf_id())),
        ("general.quantization_version".into(), Value::U32(QUANTIZATION_VERSION)),
        ("general.quantized_by".into(), Value::String(format!("metal-candle {}", env!("CARGO_PKG_VERSION")))),
    ];
    if !opts.merge_adapters.is_empty() {
        let list = opts
            .merge_adapters
            .iter()
            .map(|a| Value::String(format!("{}:{}", a.path.display(), a.scale)))
            .collect();
        md.push(("metal_candle.merged_adapters".into(), Value::Array(list)));
    }
    md
}

/// The output type of one tensor and whether a row-length fallback was taken. `kept` is the type
/// a tensor llama.cpp does not quantize keeps (a GGUF input's own; F32 for HF tensors).
fn choose_type(
    ft: FileType,
    pure: bool,
    keep_f32: Option<&Regex>,
    kept: Option<GgmlDType>,
    p: &Planned,
    mm: &mix::MixModel,
) -> Result<(GgmlDType, bool)> {
    if keep_f32.is_some_and(|re| re.is_match(&p.name)) {
        return Ok((GgmlDType::F32, false));
    }
    if !mix::allows_quantization(&p.name, &p.dims) {
        return Ok((kept.unwrap_or(GgmlDType::F32), false));
    }
    let cols = p.dims.last().copied().unwrap_or(0);
    let wanted = if pure { ft.default_type() } else { mix::mixed_type(ft, mix::Category::of(&p.name), p.layer, cols, mm) };
    if !ft.is_quantized() {
        return Ok((wanted, false));
    }
    let t = mix::with_fallback(wanted, cols, &p.name)?;
    Ok((t, t != wanted))
}

/// The tensors (GGUF names, candle-order dims) and types [`quantize_model`] would write for an
/// HF model with this config, without reading any weights: the type mix of a file type on a
/// model shape.
///
/// Errors: [`Error::NoQuantFallback`].
pub fn hf_tensor_types(config: &ModelConfig, ft: FileType, keep_f32: Option<&Regex>) -> Result<Vec<TensorReport>> {
    let plan = source::hf_plan(config);
    let mm = mix::MixModel {
        n_layers: config.num_hidden_layers,
        n_gqa: config.n_rep(),
        tied_embeddings: !plan.iter().any(|p| p.name == "output.weight"),
    };
    plan.iter().map(|p| report(ft, keep_f32, None, p, &mm)).collect()
}

fn report(ft: FileType, keep_f32: Option<&Regex>, kept: Option<GgmlDType>, p: &Planned, mm: &mix::MixModel) -> Result<TensorReport> {
    let (dtype, fallback) = choose_type(ft, false, keep_f32, kept, p, mm)?;
    Ok(TensorReport { name: p.name.clone(), dims: p.dims.clone(), dtype: format!("{dtype:?}"), fallback })
}

impl Input {
    fn raw_gguf_type(&self, p: &Planned) -> Option<GgmlDType> {
        match (self, &p.origin) {
            (Input::Gguf { file }, Origin::Gguf) => file.content().tensor_infos.get(&p.name).map(|i| i.ggml_dtype),
            _ => None,
        }
    }
}

/// Reads, merges, permutes, quantizes and writes one tensor.
fn write_tensor(w: &mut GgufWriter, input: &Input, p: &Planned, dtype: GgmlDType, delta: Option<&Tensor>) -> Result<()> {
    if delta.is_none() {
        if let Some((raw, t)) = input.raw_gguf(p)? {
            if t == dtype {
                return w.write_tensor(&[raw]);
            }
        }
    }
    let mut values = input.read_values(p)?;
    let permute = match &p.origin {
        Origin::Hf { permute_heads, .. } => *permute_heads,
        _ => None,
    };
    if delta.is_some() || permute.is_some() {
        let mut t = Tensor::from_vec(values, p.dims.as_slice(), &candle_core::Device::Cpu)?;
        if let Some(d) = delta {
            t = (t + d)?;
        }
        if let Some(n) = permute {
            t = permute_for_rope(&t, n)?;
        }
        values = t.flatten_all()?.to_vec1::<f32>()?;
    }
    let cols = p.dims.last().copied().unwrap_or(1);
    let parts = quantize_rows(&values, cols, dtype)?;
    drop(values);
    let parts: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
    w.write_tensor(&parts)
}

/// llama.cpp's converter's Q/K permutation (`LlamaModel.permute`): within each head, rows
/// `[0, hd/2)` and `[hd/2, hd)` are interleaved so that RoPE rotates adjacent pairs.
/// `t` is (n_heads·hd, in) or a bias (n_heads·hd).
pub fn permute_for_rope(t: &Tensor, n_heads: usize) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let out = dims.first().copied().unwrap_or(0);
    let half = out / n_heads.max(1) / 2;
    let rest: usize = dims.iter().skip(1).product();
    let p = t.reshape((n_heads, 2, half, rest))?.transpose(1, 2)?.contiguous()?;
    Ok(p.reshape(dims)?)
}

/// Quantizes rows of `cols` values chunk by chunk in parallel (every GGML format is
/// row-independent); returns the chunks' bytes in order. Each chunk is its own tensor: candle's
/// `QTensor::quantize` reads its source's storage from the start, ignoring a view's offset.
fn quantize_rows(values: &[f32], cols: usize, dtype: GgmlDType) -> Result<Vec<Vec<u8>>> {
    let cols = cols.max(1);
    values
        .par_chunks(ROWS_PER_CHUNK * cols)
        .map(|chunk| {
            let src = Tensor::from_slice(chunk, (chunk.len() / cols, cols), &candle_core::Device::Cpu)?;
            let q = QTensor::quantize(&src, dtype)?;
            Ok(q.data()?.into_owned())
        })
        .collect()
}

/// Merged adapter deltas by (layer, projection), the keys of [`Planned`].
type Deltas = HashMap<(Option<usize>, Option<Projection>), Tensor>;

/// Each adapted projection's merged delta `Σ scale · s · B·A`, in the input's layout, on the CPU
/// in f32. The adapters are checked against the input model (loaded once for that, then dropped).
fn adapter_deltas(opts: &QuantizeOptions) -> Result<Deltas> {
    let mut deltas = Deltas::new();
    if opts.merge_adapters.is_empty() {
        return Ok(deltas);
    }
    let load = LoadOptions {
        device: DeviceChoice::Cpu,
        dtype: Some(DType::F32),
        dequantize_weights: true,
        ..LoadOptions::default()
    };
    let base = load_model(&opts.model, &load)?;
    for a in &opts.merge_adapters {
        let adapter = LoraAdapter::load(&a.path, &base.model, &AdapterOptions::default())?;
        for m in adapter.modules() {
            let w = &m.weights;
            let d = (w.b().to_dtype(DType::F32)?.matmul(&w.a().to_dtype(DType::F32)?)? * (w.scaling() * a.scale))?;
            let key = (Some(m.layer), Some(m.proj));
            let sum = match deltas.remove(&key) {
                Some(prev) => (prev + d)?,
                None => d,
            };
            deltas.insert(key, sum);
        }
    }
    Ok(deltas)
}
