//! Which GGML type each tensor gets for a GGUF file type: llama.cpp's rules
//! (`llama-quant.cpp`: `llama_tensor_get_type_impl` for the `*_K_*` mixes and the output tensor,
//! `tensor_type_fallback` for rows that are not a multiple of the block size).

use candle_core::quantized::GgmlDType;

use crate::error::{Error, Result};

/// A GGUF file type (`general.file_type`, llama.cpp's `llama_ftype`): a default tensor type and,
/// for the `*_K_S/M/L` mixes, the rules that give some tensors more bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileType {
    /// `f32`: every tensor stays F32.
    F32,
    /// `f16`: weights in F16.
    F16,
    /// `bf16`: weights in BF16.
    BF16,
    /// `q8_0`: weights in Q8_0 (8 bits per weight plus a scale per 32).
    Q8_0,
    /// `q4_0`: weights in Q4_0.
    Q4_0,
    /// `q4_1`: weights in Q4_1 (Q4_0 plus a per-block minimum).
    Q4_1,
    /// `q5_0`: weights in Q5_0.
    Q5_0,
    /// `q5_1`: weights in Q5_1 (Q5_0 plus a per-block minimum).
    Q5_1,
    /// `q2_k`: mostly Q2_K, some tensors with more bits.
    Q2K,
    /// `q3_k_s`: Q3_K, the small mix (fewest tensors given more bits).
    Q3KS,
    /// `q3_k_m`: Q3_K, the medium mix.
    Q3KM,
    /// `q3_k_l`: Q3_K, the large mix (most tensors given more bits).
    Q3KL,
    /// `q4_k_s`: Q4_K, the small mix.
    Q4KS,
    /// `q4_k_m`: Q4_K, the medium mix (the usual choice).
    Q4KM,
    /// `q5_k_s`: Q5_K, the small mix.
    Q5KS,
    /// `q5_k_m`: Q5_K, the medium mix.
    Q5KM,
    /// `q6_k`: weights in Q6_K.
    Q6K,
}

/// What [`Error::UnsupportedQuantType`] lists.
pub const SUPPORTED_TYPES: &str =
    "f32, f16, bf16, q8_0, q6_k, q5_k_m, q5_k_s, q5_0, q5_1, q4_k_m, q4_k_s, q4_0, q4_1, q3_k_l, q3_k_m, q3_k_s, q2_k";

const ALL: [(FileType, &str, u32); 17] = [
    (FileType::F32, "f32", 0),
    (FileType::F16, "f16", 1),
    (FileType::BF16, "bf16", 32),
    (FileType::Q8_0, "q8_0", 7),
    (FileType::Q4_0, "q4_0", 2),
    (FileType::Q4_1, "q4_1", 3),
    (FileType::Q5_0, "q5_0", 8),
    (FileType::Q5_1, "q5_1", 9),
    (FileType::Q2K, "q2_k", 10),
    (FileType::Q3KS, "q3_k_s", 11),
    (FileType::Q3KM, "q3_k_m", 12),
    (FileType::Q3KL, "q3_k_l", 13),
    (FileType::Q4KS, "q4_k_s", 14),
    (FileType::Q4KM, "q4_k_m", 15),
    (FileType::Q5KS, "q5_k_s", 16),
    (FileType::Q5KM, "q5_k_m", 17),
    (FileType::Q6K, "q6_k", 18),
];

impl FileType {
    /// Parses a type name as llama-quantize spells it (case-insensitive; `q4_k` means `q4_k_m`,
    /// `q5_k` means `q5_k_m`, `q3_k` means `q3_k_m`, as in llama-quantize).
    ///
    /// Errors: [`Error::UnsupportedQuantType`] naming the type and listing the supported ones.
    pub fn parse(name: &str) -> Result<Self> {
        let lower = name.to_ascii_lowercase();
        let alias = match lower.as_str() {
            "q4_k" => "q4_k_m",
            "q5_k" => "q5_k_m",
            "q3_k" => "q3_k_m",
            other => other,
        };
        ALL.iter()
            .find(|(_, n, _)| *n == alias)
            .map(|(t, _, _)| *t)
            .ok_or_else(|| Error::UnsupportedQuantType { name: name.to_string(), supported: SUPPORTED_TYPES })
    }

    /// The lower-case name (`q4_k_m`).
    pub fn name(self) -> &'static str {
        ALL.iter().find(|(t, _, _)| *t == self).map_or("?", |(_, n, _)| *n)
    }

    /// `general.file_type` (llama.cpp `LLAMA_FTYPE_*`).
    pub fn gguf_id(self) -> u32 {
        ALL.iter().find(|(t, _, _)| *t == self).map_or(0, |(_, _, id)| *id)
    }

    /// The type of a tensor no rule singles out (`llama_ftype_get_default_type`).
    pub fn default_type(self) -> GgmlDType {
        match self {
            Self::F32 => GgmlDType::F32,
            Self::F16 => GgmlDType::F16,
            Self::BF16 => GgmlDType::BF16,
            Self::Q8_0 => GgmlDType::Q8_0,
            Self::Q4_0 => GgmlDType::Q4_0,
            Self::Q4_1 => GgmlDType::Q4_1,
            Self::Q5_0 => GgmlDType::Q5_0,
            Self::Q5_1 => GgmlDType::Q5_1,
            Self::Q2K => GgmlDType::Q2K,
            Self::Q3KS | Self::Q3KM | Self::Q3KL => GgmlDType::Q3K,
            Self::Q4KS | Self::Q4KM => GgmlDType::Q4K,
            Self::Q5KS | Self::Q5KM => GgmlDType::Q5K,
            Self::Q6K => GgmlDType::Q6K,
        }
    }

    /// Whether the default type is a block-quantized one (not F32/F16/BF16).
    pub fn is_quantized(self) -> bool {
        !matches!(self, Self::F32 | Self::F16 | Self::BF16)
    }
}

/// The role of a tensor in llama.cpp's rules (`tensor_get_category`), from its GGUF name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Category {
    /// The output projection, `output.weight`.
    Output,
    /// The token embedding table, `token_embd.weight`.
    TokenEmbd,
    /// Attention value projections, `blk.N.attn_v.weight`.
    AttnV,
    /// Attention key projections, `blk.N.attn_k.weight`.
    AttnK,
    /// Attention query projections, `blk.N.attn_q.weight`.
    AttnQ,
    /// Attention output projections, `blk.N.attn_output.weight`.
    AttnOutput,
    /// MLP up projections, `blk.N.ffn_up*`.
    FfnUp,
    /// MLP gate projections, `blk.N.ffn_gate*`.
    FfnGate,
    /// MLP down projections, `blk.N.ffn_down*`.
    FfnDown,
    /// Anything else (norms, biases, RoPE factors).
    Other,
}

impl Category {
    /// The category of a GGUF tensor name (`blk.3.attn_v.weight` → `AttnV`).
    pub fn of(name: &str) -> Self {
        if name == "output.weight" {
            return Self::Output;
        }
        if name == "token_embd.weight" {
            return Self::TokenEmbd;
        }
        let table = [
            ("attn_v.weight", Self::AttnV),
            ("attn_k.weight", Self::AttnK),
            ("attn_q.weight", Self::AttnQ),
            ("attn_output.weight", Self::AttnOutput),
            ("ffn_up", Self::FfnUp),
            ("ffn_gate", Self::FfnGate),
            ("ffn_down", Self::FfnDown),
        ];
        table.iter().find(|(pat, _)| name.contains(pat)).map_or(Self::Other, |(_, c)| *c)
    }
}

/// The model facts the rules read.
#[derive(Debug, Clone, Copy)]
pub struct MixModel {
    /// Number of decoder layers (`block_count`).
    pub n_layers: usize,
    /// Query heads per key/value head (`n_gqa`).
    pub n_gqa: usize,
    /// No `output.weight`: the embedding table is also the output (gets the output's type).
    pub tied_embeddings: bool,
}

/// Whether llama.cpp quantizes this tensor at all (`tensor_allows_quantization`): 2-D, named
/// `*weight`, not a norm.
pub fn allows_quantization(name: &str, dims: &[usize]) -> bool {
    dims.len() >= 2 && name.ends_with("weight") && !name.contains("_norm.weight")
}

/// llama.cpp's `use_more_bits`: the first and last eighth of the layers and every third between.
fn use_more_bits(i: usize, n: usize) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

/// The type for a tensor that [`allows_quantization`], before the row-length fallback.
/// `layer` is the block index (`blk.N.`), `cols` the row length (GGUF `ne[0]`).
pub fn mixed_type(ft: FileType, cat: Category, layer: Option<usize>, cols: usize, m: &MixModel) -> GgmlDType {
    use GgmlDType as G;
    let default = ft.default_type();
    if !ft.is_quantized() {
        return default;
    }
    let i = layer.unwrap_or(0);
    let n = m.n_layers;
    if cat == Category::Output || (m.tied_embeddings && cat == Category::TokenEmbd) {
        return if !cols.is_multiple_of(default.block_size()) {
            G::Q8_0
        } else if default != G::Q8_0 {
            G::Q6K
        } else {
            default
        };
    }
    match (cat, ft) {
        (Category::AttnV, FileType::Q2K) => {
            if m.n_gqa >= 4 {
                G::Q4K
            } else {
                G::Q3K
            }
        }
        (Category::AttnV, FileType::Q3KM) => {
            if i < 2 {
                G::Q5K
            } else {
                G::Q4K
            }
        }
        (Category::AttnV, FileType::Q3KL) => G::Q5K,
        (Category::AttnV, FileType::Q4KM | FileType::Q5KM) if use_more_bits(i, n) => G::Q6K,
        (Category::AttnV, FileType::Q4KS) if i < 4 => G::Q5K,
        (Category::FfnDown, FileType::Q2K) => G::Q3K,
        (Category::FfnDown, FileType::Q3KM) => {
            if i < n / 16 {
                G::Q5K
            } else {
                G::Q4K
            }
        }
        (Category::FfnDown, FileType::Q3KL) => G::Q5K,
        (Category::FfnDown, FileType::Q4KM | FileType::Q5KM) if use_more_bits(i, n) => G::Q6K,
        (Category::FfnDown, FileType::Q4KS) if i < n / 8 => G::Q5K,
        (Category::AttnOutput, FileType::Q2K) => G::Q3K,
        (Category::AttnOutput, FileType::Q3KM) => G::Q4K,
        (Category::AttnOutput, FileType::Q3KL) => G::Q5K,
        _ => default,
    }
}

/// llama.cpp's `tensor_type_fallback`: a 256-block type whose block does not divide the row
/// length falls back to a 32-block type. Where that does not fit either, llama.cpp writes F16;
/// we refuse instead ([`Error::NoQuantFallback`]) so that no tensor silently loses its type.
pub fn with_fallback(t: GgmlDType, cols: usize, tensor: &str) -> Result<GgmlDType> {
    use GgmlDType as G;
    if cols.is_multiple_of(t.block_size()) {
        return Ok(t);
    }
    let fallback = match t {
        G::Q2K | G::Q3K => G::Q4_0,
        G::Q4K => G::Q5_0,
        G::Q5K => G::Q5_1,
        G::Q6K => G::Q8_0,
        other => other,
    };
    if fallback != t && cols.is_multiple_of(fallback.block_size()) {
        return Ok(fallback);
    }
    Err(Error::NoQuantFallback {
        tensor: tensor.to_string(),
        cols,
        dtype: format!("{t:?}"),
        fallback: format!("{fallback:?}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn more_bits_layers_match_llama_cpp() {
        // 24 layers (Qwen2.5-0.5B): n/8 = 3, 7n/8 = 21.
        let picked: Vec<usize> = (0..24).filter(|&i| use_more_bits(i, 24)).collect();
        assert_eq!(picked, vec![0, 1, 2, 5, 8, 11, 14, 17, 20, 21, 22, 23]);
    }

    #[test]
    fn fallbacks_follow_llama_cpp() {
        assert_eq!(with_fallback(GgmlDType::Q4K, 896, "t").unwrap(), GgmlDType::Q5_0);
        assert_eq!(with_fallback(GgmlDType::Q6K, 896, "t").unwrap(), GgmlDType::Q8_0);
        assert_eq!(with_fallback(GgmlDType::Q4K, 4864, "t").unwrap(), GgmlDType::Q4K);
        assert!(matches!(with_fallback(GgmlDType::Q4K, 40, "t"), Err(Error::NoQuantFallback { cols: 40, .. })));
        assert!(matches!(with_fallback(GgmlDType::Q8_0, 40, "t"), Err(Error::NoQuantFallback { .. })));
    }

    #[test]
    fn names_parse() {
        assert_eq!(FileType::parse("Q4_K_M").unwrap(), FileType::Q4KM);
        assert_eq!(FileType::parse("q4_k").unwrap(), FileType::Q4KM);
        assert!(matches!(FileType::parse("iq2_xs"), Err(Error::UnsupportedQuantType { .. })));
        for (t, name, _) in ALL {
            assert_eq!(FileType::parse(name).unwrap(), t);
        }
    }
}
