//! What can be wrong with an adapter. Wrapped in [`crate::Error::Adapter`] with the path it was
//! found in; every variant names the field, module or tensor at fault.

use crate::loader::gguf_validate::GgufFormatError;
use crate::loader::safetensors_validate::SafetensorsFormatError;

/// A defect in an adapter, or an adapter operation the model cannot perform.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdapterError {
    /// The adapter directory has no `adapter_config.json`.
    #[error("no adapter_config.json")]
    MissingConfig,

    /// `adapter_config.json` is not valid JSON (or not an object).
    #[error("adapter_config.json is not valid JSON: {source}")]
    InvalidJson {
        /// The JSON parser's error.
        #[source]
        source: serde_json::Error,
    },

    /// A required field of `adapter_config.json` is absent or null.
    #[error("adapter_config.json: missing field `{field}`")]
    MissingField {
        /// The missing field's name.
        field: &'static str,
    },

    /// A field has the wrong JSON type or an unusable value.
    #[error("adapter_config.json: field `{field}` must be {expected}, got {got}")]
    InvalidField {
        /// The field's name.
        field: String,
        /// What the field must be, in words.
        expected: &'static str,
        /// The value found.
        got: String,
    },

    /// A rank (`r` or a `rank_pattern` entry) is ≤ 0 or above the configured maximum.
    #[error("adapter_config.json: `{field}` = {rank} is outside 1..={max}")]
    RankOutOfRange {
        /// Where the rank comes from (`r`, a `rank_pattern` entry, or a GGUF lora_a tensor).
        field: String,
        /// The rank found.
        rank: i64,
        /// The largest rank allowed.
        max: usize,
    },

    /// A PEFT feature metal-candle does not implement is enabled.
    #[error("adapter_config.json: `{field}` = {value} is not supported")]
    Unsupported {
        /// The field that enables the feature.
        field: &'static str,
        /// Its value in the config.
        value: String,
    },

    /// A regular expression in the config (target_modules, exclude_modules, a pattern key) does
    /// not compile.
    #[error("adapter_config.json: `{field}`: invalid regular expression: {source}")]
    InvalidRegex {
        /// The field the expression is in.
        field: String,
        /// The regex compiler's error.
        #[source]
        source: regex::Error,
    },

    /// A target names no module the base model has.
    #[error("target `{target}` matches no module of the base model (projections: q/k/v/o_proj, gate/up/down_proj)")]
    UnknownTarget {
        /// The target as the config names it.
        target: String,
    },

    /// A target names a module adapters cannot attach to (embeddings, lm_head).
    #[error("target `{target}` is not supported (adapters attach to the attention and MLP projections only)")]
    UnsupportedTarget {
        /// The target as the config names it.
        target: String,
    },

    /// A targeted module has no lora_A/lora_B tensors in the weights file.
    #[error("targeted module `{module}` has no lora_A/lora_B tensors")]
    TargetWithoutTensors {
        /// The module's name.
        module: String,
    },

    /// A module has `lora_A` but no `lora_B`.
    #[error("module `{module}` has lora_A but no lora_B")]
    MissingLoraB {
        /// The module's name.
        module: String,
    },

    /// A module has `lora_B` but no `lora_A`.
    #[error("module `{module}` has lora_B but no lora_A")]
    MissingLoraA {
        /// The module's name.
        module: String,
    },

    /// A tensor that is not the lora_A/lora_B of a targeted module.
    #[error("unexpected tensor `{tensor}` (not lora_A/lora_B of a targeted module)")]
    UnexpectedTensor {
        /// The tensor's name.
        tensor: String,
    },

    /// A tensor's shape disagrees with the rank or with the base model's layer (base-model
    /// mismatch).
    #[error("tensor `{tensor}`: expected shape {expected:?}, got {got:?}")]
    ShapeMismatch {
        /// The tensor's name.
        tensor: String,
        /// The shape the rank and base model imply.
        expected: Vec<usize>,
        /// The shape the file stores.
        got: Vec<usize>,
    },

    /// A tensor has a dtype adapters cannot use.
    #[error("tensor `{tensor}` has unsupported dtype {dtype} (supported: F32, F16, BF16)")]
    UnsupportedDtype {
        /// The tensor's name.
        tensor: String,
        /// Its dtype.
        dtype: String,
    },

    /// Only a pickle `adapter_model.bin` is present (never unpickled: it can run code).
    #[error("only a pickle adapter_model.bin is present; convert it to adapter_model.safetensors")]
    PickleOnly,

    /// No weights file at all.
    #[error("no adapter_model.safetensors")]
    MissingWeights,

    /// A name or path resolves outside the adapter directory.
    #[error("`{path}` escapes the adapter directory")]
    PathEscapes {
        /// The name or path as given.
        path: String,
    },

    /// The weights file failed safetensors pre-validation.
    #[error("malformed adapter_model.safetensors: {source}")]
    MalformedSafetensors {
        /// The first defect found.
        #[source]
        source: SafetensorsFormatError,
    },

    /// The GGUF adapter failed pre-validation.
    #[error("malformed GGUF adapter: {source}")]
    MalformedGguf {
        /// The first defect found.
        #[source]
        source: GgufFormatError,
    },

    /// A GGUF metadata key is absent or of the wrong type (`general.type`, `adapter.lora.alpha`).
    #[error("GGUF adapter: key `{key}`: expected {expected}")]
    GgufKey {
        /// The metadata key.
        key: &'static str,
        /// What it must be, in words.
        expected: &'static str,
    },

    /// The GGUF adapter's architecture is not the base model's.
    #[error("GGUF adapter is for architecture `{adapter}`, the base model is `{base}`")]
    ArchitectureMismatch {
        /// The architecture the adapter declares.
        adapter: String,
        /// The base model's architecture.
        base: String,
    },

    /// The adapter was prepared for a model with another dtype, device or Q/K row layout.
    #[error("adapter was prepared for a different model ({what} differs); load it for this model")]
    PreparedForOtherModel {
        /// What differs (`"dtype"`, `"device"`, the Q/K row layout).
        what: &'static str,
    },

    /// No adapter of this name is active on the model.
    #[error("no active adapter named `{name}`")]
    NotActive {
        /// The adapter name asked for.
        name: String,
    },

    /// Merging needs a dense base weight.
    #[error("adapter `{adapter}` cannot be merged into a quantized base (apply it unmerged)")]
    MergeQuantized {
        /// The adapter's name.
        adapter: String,
    },

    /// The registry has no adapter of this name.
    #[error("no adapter named `{name}` in the registry")]
    NotRegistered {
        /// The adapter name asked for.
        name: String,
    },

    /// The registry cannot fit the adapter in its byte budget (everything else is in use).
    #[error("adapter `{name}` needs {bytes} bytes; budget {budget}, {in_use} held by adapters in use")]
    OverBudget {
        /// The adapter's name.
        name: String,
        /// Bytes its weights need.
        bytes: usize,
        /// The registry's byte budget.
        budget: usize,
        /// Bytes held by adapters that are in use and cannot be evicted.
        in_use: usize,
    },
}
