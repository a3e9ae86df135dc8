//! A loaded LoRA adapter, prepared for one model: factors in the model's dtype and device, with
//! q/k rows in the base's layout.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::config::DEFAULT_MAX_RANK;
use super::AdapterError;
use crate::error::{Error, Result};
use crate::model::linear::{Linear, LoraWeights, Projection};
use crate::Model;

/// How to load adapters.
#[derive(Debug, Clone)]
pub struct AdapterOptions {
    /// The largest rank accepted (`r` and every `rank_pattern` value).
    pub max_rank: usize,
}

impl Default for AdapterOptions {
    fn default() -> Self {
        Self {
            max_rank: DEFAULT_MAX_RANK,
        }
    }
}

/// One adapted projection.
#[derive(Debug, Clone)]
pub struct AdapterModule {
    /// Decoder layer index.
    pub layer: usize,
    /// Which projection of the layer.
    pub proj: Projection,
    /// A (r, in), B (out, r) and the module's scaling.
    pub weights: Arc<LoraWeights>,
}

/// The model properties an adapter's tensors were prepared for.
#[derive(Debug, Clone)]
struct PreparedFor {
    dtype: DType,
    device: Device,
    rope_interleaved: bool,
}

/// A LoRA adapter ready to apply to the model it was loaded for (or any model of the same shape,
/// dtype, device and Q/K layout). Cheap to share: the factors are reference-counted, and applying
/// it to a model only attaches those references to the model's linear layers.
#[derive(Debug)]
pub struct LoraAdapter {
    source: PathBuf,
    modules: Vec<AdapterModule>, // sorted by (layer, proj)
    prepared: PreparedFor,
}

impl LoraAdapter {
    /// Loads a PEFT adapter directory (`adapter_config.json` + `adapter_model.safetensors`) or a
    /// llama.cpp GGUF LoRA file, checked against `model` (targets, ranks, layer shapes) and
    /// prepared for it: converted to its dtype and device, and on a `llama`-arch GGUF base with
    /// q/k rows permuted like the base's. Files are read into memory (never memory-mapped).
    ///
    /// Errors: [`Error::Adapter`] naming the path and the field or tensor at fault.
    pub fn load(path: &Path, model: &Model, opts: &AdapterOptions) -> Result<Self> {
        if path.is_dir() {
            super::peft::load(path, model, opts)
        } else if path.file_name().is_some_and(|n| n == "adapter_config.json") {
            super::peft::load(path.parent().unwrap_or(Path::new(".")), model, opts)
        } else if path.is_file() {
            super::gguf::load(path, model, opts)
        } else {
            Err(adapter_error(path, AdapterError::MissingConfig))
        }
    }

    /// An adapter from factors made in memory (tests, benchmarks, converters). Each module's
    /// factors must match the shape of its projection in `model` and be in its dtype/device.
    ///
    /// Errors: [`AdapterError::UnknownTarget`] for a layer the model lacks,
    /// [`AdapterError::ShapeMismatch`] for factors that do not fit.
    pub fn from_modules(source: PathBuf, model: &Model, mut modules: Vec<AdapterModule>) -> Result<Self> {
        modules.sort_by_key(|m| (m.layer, m.proj));
        for m in &modules {
            let (out, inp) = site(model, m.layer, m.proj, &source)?.weight().dims();
            if m.weights.dims() != (out, inp) {
                let (o, i) = m.weights.dims();
                let tensor = super::config::module_name(m.layer, m.proj);
                return Err(adapter_error(&source, AdapterError::ShapeMismatch { tensor, expected: vec![out, inp], got: vec![o, i] }));
            }
        }
        Ok(Self {
            source,
            modules,
            prepared: PreparedFor::of(model),
        })
    }

    /// The file or directory it was loaded from.
    pub fn path(&self) -> &Path {
        &self.source
    }

    /// The adapted projections, sorted by (layer, projection).
    pub fn modules(&self) -> &[AdapterModule] {
        &self.modules
    }

    /// Bytes held by all A and B factors.
    pub fn bytes(&self) -> usize {
        self.modules.iter().map(|m| m.weights.bytes()).sum()
    }

    /// Whether a model (or a snapshot of one) holds this adapter's factors.
    pub fn attached(&self) -> bool {
        self.modules.iter().any(|m| Arc::strong_count(&m.weights) > 1)
    }

    /// Checks the adapter was prepared for a model like `model`.
    pub(crate) fn check_prepared_for(&self, model: &Model) -> Result<()> {
        let p = &self.prepared;
        let what = if p.dtype != model.dtype() {
            "dtype"
        } else if !p.device.same_device(model.device()) {
            "device"
        } else if p.rope_interleaved != model.config().rope_interleaved {
            "q/k row layout (GGUF llama base vs HF base)"
        } else {
            return Ok(());
        };
        Err(adapter_error(&self.source, AdapterError::PreparedForOtherModel { what }))
    }
}

impl PreparedFor {
    fn of(model: &Model) -> Self {
        Self {
            dtype: model.dtype(),
            device: model.device().clone(),
            rope_interleaved: model.config().rope_interleaved,
        }
    }
}

/// Wraps an adapter defect with its path.
pub(crate) fn adapter_error(path: &Path, source: AdapterError) -> Error {
    Error::Adapter {
        path: path.to_path_buf(),
        source,
    }
}

/// The linear layer of `proj` in decoder layer `layer`.
pub(crate) fn site<'a>(model: &'a Model, layer: usize, proj: Projection, path: &Path) -> Result<&'a Linear> {
    let l = model.layers().get(layer).ok_or_else(|| {
        adapter_error(path, AdapterError::UnknownTarget { target: super::config::module_name(layer, proj) })
    })?;
    Ok(l.projection(proj))
}

/// Raw factors of one module as read from a file, before checks and preparation.
pub(crate) struct RawModule {
    pub layer: usize,
    pub proj: Projection,
    pub a: Tensor, // (r, in), any float dtype, CPU
    pub b: Tensor, // (out, r)
    pub a_name: String,
    pub b_name: String,
    /// The rank the config promises (PEFT `r`/`rank_pattern`; GGUF: A's rank).
    pub rank: usize,
    pub scaling: f64,
}

/// Checks `raw` against the model's projection and rank, and prepares it: q/k rows of B
/// converted between HF half-split and llama.cpp interleaved layouts when the file's layout
/// (`interleaved`) differs from the base's, then the model dtype and device.
pub(crate) fn prepare(model: &Model, path: &Path, raw: RawModule, interleaved: bool) -> Result<AdapterModule> {
    let (out, inp) = site(model, raw.layer, raw.proj, path)?.weight().dims();
    let shape_err = |tensor: &str, expected: Vec<usize>, got: &[usize]| {
        adapter_error(path, AdapterError::ShapeMismatch { tensor: tensor.to_string(), expected, got: got.to_vec() })
    };
    if raw.a.dims() != [raw.rank, inp] {
        return Err(shape_err(&raw.a_name, vec![raw.rank, inp], raw.a.dims()));
    }
    if raw.b.dims() != [out, raw.rank] {
        return Err(shape_err(&raw.b_name, vec![out, raw.rank], raw.b.dims()));
    }
    let cfg = model.config();
    let heads = match raw.proj {
        Projection::Q => Some(cfg.num_attention_heads),
        Projection::K => Some(cfg.num_key_value_heads),
        _ => None,
    };
    let b = match heads {
        Some(n) if interleaved != cfg.rope_interleaved => permute_rows(&raw.b, n, cfg.rope_interleaved)?,
        _ => raw.b,
    };
    let to_model = |t: Tensor| -> Result<Tensor> { Ok(t.to_dtype(model.dtype())?.to_device(model.device())?.contiguous()?) };
    let weights = LoraWeights::new(to_model(raw.a)?, to_model(b)?, raw.scaling)?;
    Ok(AdapterModule {
        layer: raw.layer,
        proj: raw.proj,
        weights: Arc::new(weights),
    })
}

/// Reorders the rows of `b` (out, r), `out = n_heads · hd`, per head: `to_interleaved` maps HF's
/// half-split rotary layout to llama.cpp's adjacent pairs (`LlamaModel.permute`: row `2i + j` of a
/// head is HF row `j·hd/2 + i`); otherwise the inverse.
pub fn permute_rows(b: &Tensor, n_heads: usize, to_interleaved: bool) -> Result<Tensor> {
    let (out, r) = b.dims2()?;
    let half = out / n_heads.max(1) / 2;
    let t = if to_interleaved {
        b.reshape((n_heads, 2, half, r))?.transpose(1, 2)? // (n, half, 2, r)
    } else {
        b.reshape((n_heads, half, 2, r))?.transpose(1, 2)? // (n, 2, half, r)
    };
    Ok(t.contiguous()?.reshape((out, r))?)
}
