//! Model loaders: a GGUF file, or a directory with `config.json` + safetensors (+ `tokenizer.json`).
//!
//! Every file is validated before candle sees its bytes ([`gguf_validate`],
//! [`safetensors_validate`]); the config is normalised ([`crate::config`]); weights are then read
//! by HF name through a [`weights::WeightSource`].

pub mod gguf;
pub mod gguf_validate;
pub mod safetensors;
pub mod safetensors_validate;
mod scan;
pub mod weights;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::GgmlDType;
use candle_core::DType;

use crate::config::{gguf::config_from_gguf, hf::load_hf_config};
use crate::device::{default_dtype, select_device, DeviceChoice};
use crate::error::{Error, Result};
use crate::generation::defaults::ChatDefaults;
use crate::kernels::KernelPolicy;
use crate::model::Model;
use crate::tokenizer::Tokenizer;

/// Default bound on the context (prompt + generated tokens), clamped to the model's own limit.
pub const DEFAULT_MAX_POSITIONS: usize = 4096;

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Where the model runs.
    pub device: DeviceChoice,
    /// Activation/weight dtype for dense weights; `None` picks F32 on CPU, F16 on GPUs.
    pub dtype: Option<DType>,
    /// Upper bound on the context length (RoPE tables and KV caches are sized by it).
    pub max_positions: usize,
    /// A `tokenizer.json` to use instead of the one beside the weights / in the GGUF.
    pub tokenizer: Option<PathBuf>,
    /// Expand GGUF-quantized projections to dense weights at load: the numerics of the
    /// dequantized model exactly (quantized matmuls also quantize activations to 8 bit), at the
    /// cost of memory and speed.
    pub dequantize_weights: bool,
    /// Which of metal-candle's own kernels the model uses (decided here, once).
    pub kernels: KernelPolicy,
    /// Scan every tensor of the model file for NaN and ±Inf before building the model (like
    /// llama.cpp's `--check-tensors`): dense values one by one, quantized blocks through their
    /// f16 scales and mins. The first bad tensor is an [`Error::NonFiniteTensor`] naming it. Off
    /// by default: it reads the whole file once (a damaged weight is still caught later, when
    /// its NaN reaches the logits: [`Error::NonFinite`]).
    pub check_tensors: bool,
    /// Quantize an HF safetensors model's projections at load (in-situ, like mistral.rs's ISQ):
    /// each projection is read, quantized to this type (llama.cpp's fallback type where a row
    /// length is not a multiple of its block; dense where none fits) and its f32 copy dropped, so
    /// memory is that of the quantized model. Embeddings and norms stay dense. Ignored for GGUF
    /// files, whose weights are already typed.
    pub quantize: Option<GgmlDType>,
    /// GGUF tensor names (exact) that may be in the file without the model reading them. By
    /// default every tensor of a GGUF file must be used, as llama.cpp requires ("wrong number of
    /// tensors"): an unread tensor is an [`Error::UnusedTensors`] naming it, because it usually
    /// is a misnamed weight the model would silently replace (an output matrix under another
    /// name, replaced by the tied embedding). `rope_freqs.weight` (llama.cpp's Llama 3 RoPE
    /// factors) is read and needs no entry; the files llama.cpp's converter writes for the
    /// supported architectures have no extras. Ignored for safetensors directories.
    pub allow_unused_tensors: Vec<String>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: DeviceChoice::Auto,
            dtype: None,
            max_positions: DEFAULT_MAX_POSITIONS,
            tokenizer: None,
            dequantize_weights: false,
            kernels: KernelPolicy::default(),
            check_tensors: false,
            quantize: None,
            allow_unused_tensors: Vec::new(),
        }
    }
}

/// A model with its tokenizer (if one was found).
#[derive(Debug, Clone)]
pub struct LoadedModel {
    /// The decoder.
    pub model: Model,
    /// The tokenizer beside the weights, in the GGUF, or [`LoadOptions::tokenizer`].
    pub tokenizer: Option<Tokenizer>,
    /// Sampling settings for chat replies as the model states them (`generation_config.json`,
    /// GGUF `general.sampling.*`), else conversational defaults.
    pub chat_defaults: ChatDefaults,
}

/// Loads a GGUF file or a model directory. See [`LoadOptions`].
///
/// Errors: every malformed file is a typed [`Error`] naming the file and the defect.
pub fn load_model(path: &Path, opts: &LoadOptions) -> Result<LoadedModel> {
    let device = select_device(opts.device)?;
    let dtype = opts.dtype.unwrap_or_else(|| default_dtype(&device));
    let (model, tokenizer, chat_defaults) = if path.is_dir() {
        let config = load_hf_config(&path.join("config.json"))?;
        let mut weights = safetensors::SafetensorsWeights::open(path, dtype, &device)?;
        if let Some(q) = opts.quantize {
            weights = weights.with_quantize(q, opts.kernels);
        }
        if opts.check_tensors {
            weights.check_tensors()?;
        }
        let model = Model::load(config, &weights, opts.max_positions, dtype, &device)?.with_kernels(opts.kernels);
        let tok_path = path.join("tokenizer.json");
        let tokenizer = if tok_path.exists() { Some(Tokenizer::from_file(&tok_path)?) } else { None };
        (model, tokenizer, ChatDefaults::from_generation_config(&path.join("generation_config.json"))?)
    } else if path.is_file() {
        let file = Arc::new(gguf::GgufFile::open(path)?);
        if opts.check_tensors {
            file.check_tensors()?;
        }
        let rope_freqs = file.rope_freqs()?;
        // The loader reads `rope_freqs.weight` itself, for the config.
        let consumed: &[&str] = if rope_freqs.is_some() { &[gguf::ROPE_FREQS_TENSOR] } else { &[] };
        let config = config_from_gguf(file.content(), path, rope_freqs)?;
        let weights = gguf::GgufWeights::new(file.clone(), dtype, &device, opts.dequantize_weights, opts.kernels);
        let model = Model::load(config, &weights, opts.max_positions, dtype, &device)?.with_kernels(opts.kernels);
        weights.check_all_used(consumed, &opts.allow_unused_tensors)?;
        let tokenizer = Some(Tokenizer::from_gguf(&file)?);
        (model, tokenizer, ChatDefaults::from_gguf(&file.content().metadata, path)?)
    } else {
        return Err(Error::NotAModel {
            path: path.to_path_buf(),
            reason: "no such file or directory".into(),
        });
    };
    let tokenizer = match &opts.tokenizer {
        Some(p) => Some(Tokenizer::from_file(p)?),
        None => tokenizer,
    };
    if let Some(tok) = &tokenizer {
        check_vocab(model.config().vocab_size, tok, path)?;
    }
    Ok(LoadedModel { model, tokenizer, chat_defaults })
}

/// The tokenizer must not produce ids the embedding table lacks (padded tables may be larger).
/// Ids need not be contiguous (a vocabulary entry may be numbered past the rest), so the largest id
/// counts, not the number of tokens.
fn check_vocab(model_vocab: usize, tok: &Tokenizer, path: &Path) -> Result<()> {
    let id_rows = tok.inner().get_vocab(true).into_values().max().map_or(0, |id| id as usize + 1);
    let needed = id_rows.max(tok.vocab_size());
    if needed > model_vocab {
        return Err(Error::InvalidConfig {
            path: path.to_path_buf(),
            field: "vocab_size".into(),
            reason: format!(
                "the tokenizer needs {needed} embedding rows ({} tokens) but the table has only {model_vocab}",
                tok.vocab_size()
            ),
        });
    }
    Ok(())
}
