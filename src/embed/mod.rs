//! Sentence embeddings: sentence-transformers encoders (BERT family, MPNet) and decoders used as
//! embedders (Qwen3-Embedding style), on the same loaders, devices and error rules as the decoder.
//!
//! ```no_run
//! use metal_candle::embed::EmbeddingModel;
//! use metal_candle::LoadOptions;
//! # fn main() -> metal_candle::Result<()> {
//! let model = EmbeddingModel::load("all-MiniLM-L6-v2".as_ref(), &LoadOptions::default())?;
//! let vectors = model.encode(&["A man is eating food.", "Someone eats."])?; // 2 × 384, L2-normalised
//! # let _ = vectors; Ok(()) }
//! ```
//!
//! A model directory is the sentence-transformers layout: `config.json`, `model.safetensors`,
//! `tokenizer.json`, and optionally `modules.json` (a `Normalize` module turns on L2
//! normalisation), `1_Pooling/config.json` (the pooling mode), `sentence_bert_config.json`
//! (`max_seq_length`) and `config_sentence_transformers.json` (named prompts). Without the pooling
//! config an encoder is mean-pooled and not normalised (sentence-transformers' default for a plain
//! transformers directory); a decoder without it is not an embedding model (an error).
//!
//! Inputs longer than `max_seq_length` tokens are truncated and reported
//! ([`Embeddings::truncated`]). Inputs are batched by length (sorted, right-padded, masked), the
//! batch size bounded by [`MAX_BATCH_TOKENS`] and [`MAX_BATCH_SCORES`]; results come back in the
//! caller's order. [`EmbeddingModel::embed`] is the call an HTTP handler needs: text or token-id
//! inputs, a prompt name, and per-input token counts for `usage.prompt_tokens`.

pub mod config;
pub mod decoder;
pub mod encoder;
pub mod kernels;
pub mod pooling;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use tokenizers::{PostProcessor, TruncationDirection, TruncationParams, TruncationStrategy};

use self::config::{load_sentence_config, read_model_config, EncoderArch, EncoderConfig, SentenceConfig};
use self::decoder::DecoderEmbedder;
use self::encoder::Encoder;
use self::pooling::{l2_normalize, Pooling};
use crate::config::Arch;
use crate::device::{default_dtype, select_device};
use crate::error::{Error, Result};
use crate::loader::safetensors::SafetensorsWeights;
use crate::loader::LoadOptions;
use crate::tokenizer::Tokenizer;

/// Upper bound on padded tokens (rows × longest row) in one forward pass.
pub const MAX_BATCH_TOKENS: usize = 8192;
/// Upper bound on attention scores (rows × heads × t²) in one forward pass: 64 MiB in f32.
pub const MAX_BATCH_SCORES: usize = 1 << 24;

/// What [`Error::UnsupportedArchitecture`] lists for embedding models.
pub const SUPPORTED_EMBEDDING_ARCHS: &str =
    "BertModel, MPNetModel, and decoders with a sentence-transformers pooling config: Qwen2, Qwen3, Llama, Mistral";

/// Which kind of network an [`EmbeddingModel`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmbeddingKind {
    /// A BERT-family encoder (MiniLM, E5, BGE, GTE).
    Bert,
    /// An MPNet encoder (all-mpnet-base-v2).
    MPNet,
    /// A decoder of this architecture (Qwen3-Embedding style).
    Decoder(Arch),
}

impl fmt::Display for EmbeddingKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Bert => write!(f, "BERT encoder embedding model"),
            Self::MPNet => write!(f, "MPNet encoder embedding model"),
            Self::Decoder(arch) => write!(f, "{arch:?} decoder embedding model"),
        }
    }
}

/// One input: text (tokenized with the model's tokenizer, prompt prepended) or token ids (used as
/// given: no prompt, no special tokens added).
#[derive(Debug, Clone, Copy)]
pub enum EmbedInput<'a> {
    /// Text, tokenized with the model's tokenizer (and its prompt prefix).
    Text(&'a str),
    /// Token ids, used as given (no special tokens added).
    Ids(&'a [u32]),
}

/// Vectors with what each input cost.
#[derive(Debug, Clone, PartialEq)]
pub struct Embeddings {
    /// One vector of [`EmbeddingModel::dim`] values per input, in the caller's order.
    pub vectors: Vec<Vec<f32>>,
    /// Tokens each input ran as (after truncation, special tokens included).
    pub tokens: Vec<usize>,
    /// Whether each input was cut to [`EmbeddingModel::max_seq_length`] tokens.
    pub truncated: Vec<bool>,
}

impl Embeddings {
    /// All inputs' tokens together (OpenAI's `usage.prompt_tokens`).
    pub fn prompt_tokens(&self) -> usize {
        self.tokens.iter().sum()
    }
}

#[derive(Debug, Clone)]
enum Backend {
    Encoder(Encoder),
    Decoder(DecoderEmbedder),
}

/// A loaded embedding model with its tokenizer and pooling.
#[derive(Debug, Clone)]
pub struct EmbeddingModel {
    backend: Backend,
    /// The model's tokenizer, padding off, truncating to `max_seq_length` (less one when an EOS
    /// is appended).
    tokenizer: tokenizers::Tokenizer,
    /// The same without truncation: for inputs that reach the limit, to tell whether they were cut
    /// (tokenizers does not always record the overflow, e.g. after a ByteLevel post-processor).
    untruncated: tokenizers::Tokenizer,
    tokenizer_path: PathBuf,
    sentence: SentenceConfig,
    max_seq_length: usize,
    /// Decoder embedders: the id appended after truncation, when the tokenizer adds none itself.
    append_eos: Option<u32>,
    vocab_size: usize,
    dim: usize,
    heads: usize,
    pad_id: u32,
    device: Device,
}

impl EmbeddingModel {
    /// Loads an embedding model directory (see the module docs). `opts.device` and `opts.dtype`
    /// apply as for decoders, `opts.tokenizer` replaces `tokenizer.json`, and `opts.max_positions`
    /// bounds a decoder's input when `sentence_bert_config.json` gives no `max_seq_length`.
    ///
    /// Errors: not a directory or no `config.json` ([`Error::NotAModel`]); a decoder without a
    /// sentence-transformers pooling config ([`Error::NotAModel`]); an architecture that is
    /// neither ([`Error::UnsupportedArchitecture`]); bad pooling / module / prompt configs
    /// ([`Error::InvalidConfig`]); malformed weights as for [`crate::load_model`].
    pub fn load(path: &Path, opts: &LoadOptions) -> Result<Self> {
        if !path.is_dir() {
            return Err(Error::NotAModel {
                path: path.to_path_buf(),
                reason: "an embedding model is a directory (sentence-transformers or HF layout)".into(),
            });
        }
        let (json, config_path) = read_model_config(path)?;
        let sentence = load_sentence_config(path)?;
        let device = select_device(opts.device)?;
        let dtype = opts.dtype.unwrap_or_else(|| default_dtype(&device));
        let tokenizer_path = opts.tokenizer.clone().unwrap_or_else(|| path.join("tokenizer.json"));
        let tokenizer = Tokenizer::from_file(&tokenizer_path)?;
        let (backend, limit) = match EncoderConfig::detect(&json) {
            Some(arch) => {
                let config = EncoderConfig::from_json(&json, arch, &config_path)?;
                let weights = SafetensorsWeights::open(path, dtype, &device)?;
                let limit = config.max_positions();
                (Backend::Encoder(Encoder::load(config, &weights, &device)?), limit)
            }
            None => {
                let decoder = load_decoder(path, &sentence, opts.max_positions, (dtype, &device), &tokenizer)?;
                let limit = decoder.max_positions();
                (Backend::Decoder(decoder), limit)
            }
        };
        let max_seq_length = sentence.max_seq_length.unwrap_or(limit).min(limit);
        Self::assemble(backend, tokenizer, sentence, max_seq_length, device, &config_path)
    }

    fn assemble(
        backend: Backend,
        tokenizer: Tokenizer,
        sentence: SentenceConfig,
        max_seq_length: usize,
        device: Device,
        config_path: &Path,
    ) -> Result<Self> {
        let (vocab_size, dim, heads, pad_id, eos) = match &backend {
            Backend::Encoder(e) => {
                let c = e.config();
                (c.vocab_size, c.hidden_size, c.num_attention_heads, c.pad_token_id as u32, None)
            }
            Backend::Decoder(d) => {
                let c = d.model().config();
                (c.vocab_size, c.hidden_size, c.num_attention_heads, d.eos(), Some(d.eos()))
            }
        };
        if tokenizer.vocab_size() > vocab_size {
            return Err(Error::InvalidConfig {
                path: config_path.to_path_buf(),
                field: "vocab_size".into(),
                reason: format!("the tokenizer has {} tokens but the embedding table only {vocab_size} rows", tokenizer.vocab_size()),
            });
        }
        let append_eos = eos.filter(|_| !post_processor_ends_with_special(&tokenizer));
        let tokenizer_path = tokenizer.source().to_path_buf();
        let reserved = usize::from(append_eos.is_some());
        let limit = max_seq_length.saturating_sub(reserved);
        let inner = truncating_tokenizer(&tokenizer, limit, config_path)?;
        let mut untruncated = inner.clone();
        untruncated.with_truncation(None).map_err(|e| Error::Tokenizer { path: tokenizer_path.clone(), reason: e.to_string() })?;
        Ok(Self {
            backend,
            tokenizer: inner,
            untruncated,
            tokenizer_path,
            sentence,
            max_seq_length,
            append_eos,
            vocab_size,
            dim,
            heads,
            pad_id,
            device,
        })
    }

    /// Length of every vector.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Inputs are truncated to this many tokens, special tokens (and an appended EOS) included.
    pub fn max_seq_length(&self) -> usize {
        self.max_seq_length
    }

    /// Which network this is (for messages such as "X is an embedding model").
    pub fn kind(&self) -> EmbeddingKind {
        match &self.backend {
            Backend::Encoder(e) => match e.config().arch {
                EncoderArch::Bert => EmbeddingKind::Bert,
                EncoderArch::MPNet => EmbeddingKind::MPNet,
            },
            Backend::Decoder(d) => EmbeddingKind::Decoder(d.model().config().arch),
        }
    }

    /// The pooling mode from the pooling config.
    pub fn pooling(&self) -> Pooling {
        self.sentence.pooling
    }

    /// Whether vectors are L2-normalised (a `Normalize` module in `modules.json`).
    pub fn normalizes(&self) -> bool {
        self.sentence.normalize
    }

    /// Named prompts from `config_sentence_transformers.json`.
    pub fn prompts(&self) -> &BTreeMap<String, String> {
        &self.sentence.prompts
    }

    /// The device the model runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Embeds `texts` with the default prompt (if the model names one): one vector per text, in
    /// order. Errors: an empty list ([`Error::InvalidParameter`]), tokenizer or compute errors.
    pub fn encode(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        let inputs: Vec<EmbedInput> = texts.iter().map(|t| EmbedInput::Text(t)).collect();
        Ok(self.embed(&inputs, None)?.vectors)
    }

    /// [`EmbeddingModel::encode`] as one (n, dim) f32 tensor on the model's device.
    pub fn encode_tensor(&self, texts: &[&str]) -> Result<Tensor> {
        let vectors = self.encode(texts)?;
        let n = vectors.len();
        Ok(Tensor::from_vec(vectors.concat(), (n, self.dim), &self.device)?)
    }

    /// Embeds text or token-id inputs. `prompt` names one of [`EmbeddingModel::prompts`] to
    /// prepend to text inputs; `None` uses `default_prompt_name` (often no prompt).
    ///
    /// Errors: no inputs, an unknown prompt name, or a token id outside the vocabulary
    /// ([`Error::InvalidParameter`]); tokenizer and compute errors.
    pub fn embed(&self, inputs: &[EmbedInput], prompt: Option<&str>) -> Result<Embeddings> {
        if inputs.is_empty() {
            return Err(Error::InvalidParameter { name: "input", reason: "no inputs to embed".into() });
        }
        let prefix = self.prompt_text(prompt)?;
        let mut tokens = Vec::with_capacity(inputs.len());
        let mut truncated = Vec::with_capacity(inputs.len());
        let mut all_ids = Vec::with_capacity(inputs.len());
        for input in inputs {
            let (ids, cut) = self.tokenize(input, prefix)?;
            tokens.push(ids.len());
            truncated.push(cut);
            all_ids.push(ids);
        }
        let vectors = self.run_batched(&all_ids)?;
        Ok(Embeddings { vectors, tokens, truncated })
    }

    fn prompt_text(&self, prompt: Option<&str>) -> Result<&str> {
        let name = prompt.or(self.sentence.default_prompt_name.as_deref());
        match name {
            None => Ok(""),
            Some(name) => self.sentence.prompts.get(name).map(String::as_str).ok_or_else(|| Error::InvalidParameter {
                name: "prompt",
                reason: format!("the model has no prompt `{name}` (it has: {:?})", self.sentence.prompts.keys().collect::<Vec<_>>()),
            }),
        }
    }

    /// Token ids of one input and whether it was truncated.
    fn tokenize(&self, input: &EmbedInput, prefix: &str) -> Result<(Vec<u32>, bool)> {
        match input {
            EmbedInput::Text(text) => {
                let text = format!("{prefix}{text}");
                // Special-token text in the input is parsed as sentence-transformers does (the
                // reference); embeddings have no roles for it to forge.
                let encode = |tok: &tokenizers::Tokenizer| {
                    tok.encode(text.as_str(), true).map_err(|e| Error::Tokenizer {
                        path: self.tokenizer_path.clone(),
                        reason: e.to_string(),
                    })
                };
                let mut ids = encode(&self.tokenizer)?.get_ids().to_vec();
                let at_limit = ids.len() + usize::from(self.append_eos.is_some()) >= self.max_seq_length;
                let truncated = at_limit && encode(&self.untruncated)?.len() > ids.len();
                ids.extend(self.append_eos);
                Ok((ids, truncated))
            }
            EmbedInput::Ids(ids) => {
                if ids.is_empty() {
                    return Err(Error::InvalidParameter { name: "input", reason: "an input has no token ids".into() });
                }
                if let Some(bad) = ids.iter().find(|&&id| id as usize >= self.vocab_size) {
                    return Err(Error::InvalidParameter {
                        name: "input",
                        reason: format!("token id {bad} is outside the vocabulary of {}", self.vocab_size),
                    });
                }
                let keep = ids.len().min(self.max_seq_length);
                Ok((ids[..keep].to_vec(), keep < ids.len()))
            }
        }
    }

    /// Vectors of `ids`, run longest first in length-sorted batches, returned in input order.
    fn run_batched(&self, ids: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        let mut order: Vec<usize> = (0..ids.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(ids[i].len()));
        let mut out = vec![Vec::new(); ids.len()];
        let mut start = 0;
        while start < order.len() {
            let longest = ids[order[start]].len().max(1);
            let rows = batch_rows(longest, self.heads).min(order.len() - start);
            let batch = &order[start..start + rows];
            let vectors = self.run_batch(batch.iter().map(|&i| ids[i].as_slice()).collect())?;
            for (&i, v) in batch.iter().zip(vectors) {
                out[i] = v;
            }
            start += rows;
        }
        Ok(out)
    }

    /// One right-padded batch → its vectors (pooled, normalised if configured).
    fn run_batch(&self, rows: Vec<&[u32]>) -> Result<Vec<Vec<f32>>> {
        let lengths: Vec<usize> = rows.iter().map(|r| r.len()).collect();
        let t = lengths.iter().copied().max().unwrap_or(1);
        let flat: Vec<u32> = rows
            .iter()
            .flat_map(|r| r.iter().copied().chain(std::iter::repeat_n(self.pad_id, t - r.len())))
            .collect();
        let ids = Tensor::from_vec(flat, (rows.len(), t), &self.device)?; // (b, t)
        let hidden = match &self.backend {
            Backend::Encoder(e) => e.forward(&ids, &lengths)?,
            Backend::Decoder(d) => d.forward(&ids)?,
        }; // (b, t, hidden)
        let pooled = self.sentence.pooling.pool(&hidden, &lengths)?; // (b, hidden) f32
        let pooled = if self.sentence.normalize { l2_normalize(&pooled)? } else { pooled };
        Ok(pooled.to_vec2()?)
    }
}

/// Rows per batch for inputs of `t` tokens: within both memory bounds, at least one.
fn batch_rows(t: usize, heads: usize) -> usize {
    let by_tokens = MAX_BATCH_TOKENS / t;
    let by_scores = MAX_BATCH_SCORES / (heads.max(1) * t * t);
    by_tokens.min(by_scores).max(1)
}

/// The decoder of an embedding directory; only with a sentence-transformers pooling config.
fn load_decoder(
    path: &Path,
    sentence: &SentenceConfig,
    default_max_positions: usize,
    (dtype, device): (candle_core::DType, &Device),
    tokenizer: &Tokenizer,
) -> Result<DecoderEmbedder> {
    let config_path = path.join("config.json");
    let arch_probe = crate::config::hf::load_hf_config(&config_path).map_err(|e| match e {
        Error::UnsupportedArchitecture { path, arch, .. } => Error::UnsupportedArchitecture { path, arch, supported: SUPPORTED_EMBEDDING_ARCHS },
        other => other,
    })?;
    if !sentence.has_sentence_files {
        return Err(Error::NotAModel {
            path: path.to_path_buf(),
            reason: format!(
                "config.json describes a {:?} decoder and there is no sentence-transformers pooling config \
                 (modules.json, 1_Pooling/config.json): not an embedding model",
                arch_probe.arch
            ),
        });
    }
    let max_positions = sentence.max_seq_length.unwrap_or(default_max_positions);
    DecoderEmbedder::load(path, max_positions, dtype, device, tokenizer.eos_token_ids().first().copied())
}

/// Whether the tokenizer's post-processor ends a sequence with a special token (newer
/// Qwen3-Embedding tokenizers append `<|endoftext|>` themselves): then no EOS is appended.
fn post_processor_ends_with_special(tokenizer: &Tokenizer) -> bool {
    tokenizer
        .inner()
        .encode("a", true)
        .is_ok_and(|enc| enc.get_special_tokens_mask().last() == Some(&1))
}

/// A copy of the model's tokenizer that pads nothing and truncates to `max_length` tokens,
/// special tokens included, as sentence-transformers' tokenizer call does (`truncation=True`).
fn truncating_tokenizer(tokenizer: &Tokenizer, max_length: usize, config_path: &Path) -> Result<tokenizers::Tokenizer> {
    let mut inner = tokenizer.inner().clone();
    let specials = inner.get_post_processor().map_or(0, |p| p.added_tokens(false));
    if max_length <= specials {
        return Err(Error::InvalidConfig {
            path: config_path.to_path_buf(),
            field: "max_seq_length".into(),
            reason: format!("{max_length} leaves no room for text next to {specials} special tokens"),
        });
    }
    let params = TruncationParams {
        max_length,
        strategy: TruncationStrategy::LongestFirst,
        stride: 0,
        direction: TruncationDirection::Right,
    };
    inner.with_padding(None).with_truncation(Some(params)).map_err(|e| Error::Tokenizer {
        path: tokenizer.source().to_path_buf(),
        reason: e.to_string(),
    })?;
    Ok(inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_respect_both_bounds() {
        assert_eq!(batch_rows(8, 12), MAX_BATCH_TOKENS / 8);
        assert_eq!(batch_rows(256, 12), MAX_BATCH_SCORES / (12 * 256 * 256));
        assert_eq!(batch_rows(100_000, 12), 1);
    }
}
