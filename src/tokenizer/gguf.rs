//! Building a `tokenizers::Tokenizer` from GGUF metadata.
//!
//! A GGUF file has no `tokenizer.json`: llama.cpp stores the vocabulary, the merges (or the
//! SentencePiece scores they are recovered from), the token types and the special ids under
//! `tokenizer.ggml.*`. [`tokenizer_from_gguf`] rebuilds the pipeline the model's own HF
//! `tokenizer.json` has, so that a lone `.gguf` encodes and decodes exactly like the reference:
//!
//! - `tokenizer.ggml.model = "gpt2"`: byte-level BPE. The pre-tokenizer comes from
//!   `tokenizer.ggml.pre` (see [`SUPPORTED_PRE_TOKENIZERS`]), with the split regexes of the models'
//!   `tokenizer.json` files (llama.cpp `llm_tokenizer_bpe`, transformers `gguf_tokenizer_mapping.py`).
//! - `tokenizer.ggml.model = "llama"`: SentencePiece BPE with byte fallback (Llama 2, Mistral), as
//!   their `tokenizer.json` has it: a `Prepend ▁ + Replace " " → ▁` normalizer, merges derived from
//!   the vocabulary and its scores, and the `Replace ▁ / ByteFallback / Fuse / Strip` decoder.
//!
//! Tokens typed control (3) or unknown (2) become special added tokens and user-defined ones (4)
//! plain added tokens, so `<|im_end|>` stays one token; because control tokens are marked
//! `special`, `Tokenizer::set_encode_special_tokens(true)` encodes them as plain text instead
//! (what user-supplied text needs).
//!
//! What a GGUF cannot say, and what is assumed:
//! - SentencePiece vocabularies get the `legacy` Llama 2 / Mistral v0.1 pipeline, which matches
//!   sentencepiece itself. Newer `tokenizer.json` files with a `Metaspace(prepend_scheme="first")`
//!   pre-tokenizer differ from it only on text that starts with a space or follows a special token.
//! - `smollm`/`starcoder` split digits one at a time (`Digits` + `ByteLevel`, as their
//!   `tokenizer.json` and llama.cpp do; transformers' GGUF loader omits the `Digits` step, which
//!   gives the same ids because those vocabularies have no multi-digit tokens).
//! - A token listed twice keeps its last id, as in transformers and llama.cpp; the earlier id then
//!   decodes to nothing.

use std::collections::{HashMap, HashSet};

use candle_core::quantized::gguf_file::Value;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::{SpecialToken, Template, TemplateProcessing};
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior,
    Tokenizer,
};

const KEY_ARCH: &str = "general.architecture";
const KEY_MODEL: &str = "tokenizer.ggml.model";
const KEY_PRE: &str = "tokenizer.ggml.pre";
const KEY_TOKENS: &str = "tokenizer.ggml.tokens";
const KEY_SCORES: &str = "tokenizer.ggml.scores";
const KEY_TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
const KEY_MERGES: &str = "tokenizer.ggml.merges";
const KEY_BOS: &str = "tokenizer.ggml.bos_token_id";
const KEY_EOS: &str = "tokenizer.ggml.eos_token_id";
const KEY_EOT: &str = "tokenizer.ggml.eot_token_id";
const KEY_EOM: &str = "tokenizer.ggml.eom_token_id";
const KEY_UNK: &str = "tokenizer.ggml.unknown_token_id";
const KEY_PAD: &str = "tokenizer.ggml.padding_token_id";
const KEY_ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
const KEY_ADD_EOS: &str = "tokenizer.ggml.add_eos_token";
const KEY_ADD_SPACE_PREFIX: &str = "tokenizer.ggml.add_space_prefix";
const KEY_CHAT_TEMPLATE: &str = "tokenizer.chat_template";

/// Values of `tokenizer.ggml.model` this module can build.
pub const SUPPORTED_MODELS: &str =
    "gpt2 (byte-level BPE), llama (SentencePiece BPE; not the gemma architectures)";

/// Values of `tokenizer.ggml.pre` accepted with `tokenizer.ggml.model = "gpt2"` (absent means
/// `default`, as in llama.cpp).
pub const SUPPORTED_PRE_TOKENIZERS: &str = "default, gpt2, gpt-2, smollm, starcoder, refact, \
                                            qwen2, llama-bpe, llama3, llama-v3, falcon3";

/// llama.cpp's `llama_token_type` values (`tokenizer.ggml.token_type`).
const TOKEN_TYPE_UNKNOWN: i64 = 2;
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// The SentencePiece word-boundary marker.
const SPIECE_UNDERLINE: char = '\u{2581}';

/// Llama 3's split regex, as in its `tokenizer.json`.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen2's split regex, as in its `tokenizer.json` (digits one at a time).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Control tokens that end a turn, stop generation in llama.cpp (`special_eog_ids`) even when
/// the metadata names only one of them as EOS.
const END_OF_GENERATION_TOKENS: &[&str] = &[
    "<|eot_id|>",
    "<|eom_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<end_of_turn>",
    "<EOT>",
];

/// Why a tokenizer could not be built from GGUF metadata.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenizerBuildError {
    /// A key the tokenizer needs is absent.
    #[error("GGUF metadata has no `{key}`")]
    MissingKey {
        /// The metadata key.
        key: &'static str,
    },
    /// A key holds a value of the wrong GGUF type.
    #[error("GGUF metadata `{key}` should be {expected}, found {found}")]
    WrongType {
        /// The metadata key.
        key: &'static str,
        /// The GGUF type it must have, in words.
        expected: &'static str,
        /// The type found.
        found: String,
    },
    /// `tokenizer.ggml.model` names a tokenizer this module cannot build.
    #[error("unsupported GGUF tokenizer model `{model}` (supported: {supported})")]
    UnsupportedModel {
        /// The value of `tokenizer.ggml.model`.
        model: String,
        /// The models that can be built ([`SUPPORTED_MODELS`]).
        supported: &'static str,
    },
    /// `tokenizer.ggml.pre` names a pre-tokenizer this module does not know.
    #[error("unsupported GGUF pre-tokenizer `{pre}` (supported: {supported})")]
    UnsupportedPreTokenizer {
        /// The value of `tokenizer.ggml.pre`.
        pre: String,
        /// The pre-tokenizers accepted ([`SUPPORTED_PRE_TOKENIZERS`]).
        supported: &'static str,
    },
    /// A per-token array (scores, token types) does not have one entry per token.
    #[error("GGUF metadata `{key}` has {got} entries, expected {expected} (one per token)")]
    LengthMismatch {
        /// The metadata key of the array.
        key: &'static str,
        /// The vocabulary size.
        expected: usize,
        /// The array's length.
        got: usize,
    },
    /// `tokenizer.ggml.tokens` is empty, or too long for `u32` ids.
    #[error("GGUF vocabulary has {len} tokens; expected between 1 and {max}")]
    BadVocabSize {
        /// The number of tokens in `tokenizer.ggml.tokens`.
        len: usize,
        /// The most tokens `u32` ids allow.
        max: usize,
    },
    /// A merge is not `"left right"` with both sides and their concatenation in the vocabulary.
    #[error("GGUF merge #{index} `{merge}` is invalid: {reason}")]
    BadMerge {
        /// The merge's 0-based position in `tokenizer.ggml.merges`.
        index: usize,
        /// The merge as written.
        merge: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A special-token id (BOS, EOS, ...) is negative or not below the vocabulary size.
    #[error("GGUF metadata `{key}` = {id} is not a token id (vocabulary has {vocab} tokens)")]
    TokenIdOutOfRange {
        /// The metadata key.
        key: &'static str,
        /// The id found.
        id: i64,
        /// The vocabulary size.
        vocab: usize,
    },
    /// The `tokenizers` library rejected a component.
    #[error("building the tokenizer failed: {reason}")]
    Build {
        /// The `tokenizers` library's error message.
        reason: String,
    },
}

type BuildResult<T> = std::result::Result<T, TokenizerBuildError>;

fn build_err(e: impl std::fmt::Display) -> TokenizerBuildError {
    TokenizerBuildError::Build {
        reason: e.to_string(),
    }
}

/// What the GGUF metadata says about special tokens and the chat format, next to the tokenizer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufTokenizerInfo {
    /// `tokenizer.ggml.bos_token_id`.
    pub bos_token_id: Option<u32>,
    /// Ids that end generation: `eos_token_id`, then `eot_token_id` and `eom_token_id`, then every
    /// control token llama.cpp also treats as end-of-generation (`<|eot_id|>`, `<|im_end|>`,
    /// `<|endoftext|>`, ...). No duplicates; may be empty.
    pub eos_token_ids: Vec<u32>,
    /// `tokenizer.ggml.padding_token_id`.
    pub pad_token_id: Option<u32>,
    /// Whether encoding with special tokens prepends BOS (`tokenizer.ggml.add_bos_token`; when
    /// absent, true for SentencePiece and Llama 3 vocabularies, as in llama.cpp).
    pub add_bos_token: bool,
    /// Whether encoding with special tokens appends EOS (`tokenizer.ggml.add_eos_token`, default false).
    pub add_eos_token: bool,
    /// The Jinja chat template (`tokenizer.chat_template`), if any.
    pub chat_template: Option<String>,
}

/// Builds the tokenizer a GGUF file's metadata describes (`gguf_file::Content::read(..)?.metadata`).
///
/// The returned tokenizer adds BOS/EOS when encoding with `add_special_tokens = true` as the
/// `add_*_token` flags in [`GgufTokenizerInfo`] say, and decodes byte-level or byte-fallback
/// tokens back to UTF-8.
///
/// # Errors
///
/// Every malformed input is an error, never a panic: a missing or wrongly typed key
/// ([`TokenizerBuildError::MissingKey`], [`TokenizerBuildError::WrongType`]), an unknown
/// tokenizer model or pre-tokenizer, per-token arrays of the wrong length, merges that reference
/// tokens outside the vocabulary, special-token ids outside the vocabulary, or a component the
/// `tokenizers` library refuses ([`TokenizerBuildError::Build`]).
///
/// ```no_run
/// use metal_candle::tokenizer::gguf::tokenizer_from_gguf;
///
/// let mut file = std::fs::File::open("SmolLM2-135M-Instruct.Q4_1.gguf")?;
/// let metadata = candle_core::quantized::gguf_file::Content::read(&mut file)?.metadata;
/// let (mut tokenizer, info) = tokenizer_from_gguf(&metadata)?;
/// // User text: a literal "<|im_end|>" in it must stay text, not become the control token.
/// tokenizer.set_encode_special_tokens(true);
/// let ids = tokenizer.encode("The capital of France is", true)?.get_ids().to_vec();
/// let stops = &info.eos_token_ids;
/// # let _ = (ids, stops);
/// # Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
/// ```
pub fn tokenizer_from_gguf(
    metadata: &HashMap<String, Value>,
) -> BuildResult<(Tokenizer, GgufTokenizerInfo)> {
    let md = Meta(metadata);
    let model = md
        .string(KEY_MODEL)?
        .ok_or(TokenizerBuildError::MissingKey { key: KEY_MODEL })?;
    let tokens = md
        .strings(KEY_TOKENS)?
        .ok_or(TokenizerBuildError::MissingKey { key: KEY_TOKENS })?;
    let max = u32::MAX as usize;
    if tokens.is_empty() || tokens.len() > max {
        return Err(TokenizerBuildError::BadVocabSize {
            len: tokens.len(),
            max,
        });
    }
    let token_types = md.ints(KEY_TOKEN_TYPE)?.unwrap_or_default();
    if !token_types.is_empty() && token_types.len() != tokens.len() {
        return Err(TokenizerBuildError::LengthMismatch {
            key: KEY_TOKEN_TYPE,
            expected: tokens.len(),
            got: token_types.len(),
        });
    }
    let vocab = Vocabulary::new(tokens, token_types);

    let (mut tokenizer, default_add_bos) = match model {
        "gpt2" => byte_level_bpe(&md, &vocab)?,
        // Gemma files say "llama" too, but their merges follow token order rather than scores
        // and multi-space tokens are respelled (transformers `gemma_tokenizer`): not this builder.
        "llama" if md.string(KEY_ARCH)?.is_some_and(|a| a.starts_with("gemma")) => {
            return Err(TokenizerBuildError::UnsupportedModel {
                model: "llama (gemma architecture)".to_string(),
                supported: SUPPORTED_MODELS,
            })
        }
        "llama" => (sentencepiece_bpe(&md, &vocab)?, true),
        other => {
            return Err(TokenizerBuildError::UnsupportedModel {
                model: other.to_string(),
                supported: SUPPORTED_MODELS,
            })
        }
    };
    add_special_tokens(&mut tokenizer, &vocab)?;

    let info = tokenizer_info(&md, &vocab, default_add_bos)?;
    if let Some(processor) = bos_eos_processor(&info, &vocab)? {
        tokenizer.with_post_processor(Some(processor));
    }
    Ok((tokenizer, info))
}

/// The vocabulary as the file spells it, with each token's llama.cpp type (1 = normal when the
/// file has no `token_type`).
struct Vocabulary {
    tokens: Vec<String>,
    types: Vec<i64>,
}

impl Vocabulary {
    fn new(tokens: Vec<String>, types: Vec<i64>) -> Self {
        Self { tokens, types }
    }

    fn len(&self) -> usize {
        self.tokens.len()
    }

    fn token_type(&self, id: usize) -> i64 {
        self.types.get(id).copied().unwrap_or(1)
    }

    /// Token -> id. A token listed twice keeps its last id, as a Python dict (transformers)
    /// and llama.cpp's `token_to_id` do.
    fn to_bpe_vocab(&self) -> Vocab {
        let mut vocab = Vocab::default();
        for (id, token) in (0u32..).zip(&self.tokens) {
            vocab.insert(token.clone(), id);
        }
        vocab
    }

    /// Checks an id read from `key` and converts it.
    fn check_id(&self, key: &'static str, id: i64) -> BuildResult<u32> {
        match u32::try_from(id) {
            Ok(v) if (v as usize) < self.len() => Ok(v),
            _ => Err(TokenizerBuildError::TokenIdOutOfRange {
                key,
                id,
                vocab: self.len(),
            }),
        }
    }
}

/// The pre-tokenization a byte-level BPE vocabulary was trained with.
enum ByteLevelStyle {
    /// GPT-2's regex inside the `ByteLevel` pre-tokenizer.
    Gpt2,
    /// Every digit on its own, then GPT-2's regex (SmolLM, StarCoder: `Digits` + `ByteLevel`).
    DigitsThenGpt2,
    /// A `Split` with the model's own regex, then `ByteLevel` without a regex.
    Split {
        regex: &'static str,
        nfc: bool,
        ignore_merges: bool,
        add_bos: bool,
    },
}

fn byte_level_style(pre: &str) -> BuildResult<ByteLevelStyle> {
    Ok(match pre {
        "default" | "gpt2" | "gpt-2" => ByteLevelStyle::Gpt2,
        "smollm" | "starcoder" | "refact" => ByteLevelStyle::DigitsThenGpt2,
        // Qwen2's tokenizer.json normalizes to NFC first.
        "qwen2" => ByteLevelStyle::Split {
            regex: QWEN2_SPLIT,
            nfc: true,
            ignore_merges: false,
            add_bos: false,
        },
        // Llama 3's tokenizer.json has `ignore_merges: true` and a BOS post-processor; llama.cpp
        // sets both for this group (`llama_vocab::impl::load`).
        "llama-bpe" | "llama3" | "llama-v3" | "falcon3" => ByteLevelStyle::Split {
            regex: LLAMA3_SPLIT,
            nfc: false,
            ignore_merges: true,
            add_bos: true,
        },
        other => {
            return Err(TokenizerBuildError::UnsupportedPreTokenizer {
                pre: other.to_string(),
                supported: SUPPORTED_PRE_TOKENIZERS,
            })
        }
    })
}

/// Byte-level BPE (`tokenizer.ggml.model = "gpt2"`); also returns whether BOS is added by default.
fn byte_level_bpe(md: &Meta<'_>, vocab: &Vocabulary) -> BuildResult<(Tokenizer, bool)> {
    let pre = md.string(KEY_PRE)?.unwrap_or("default");
    let style = byte_level_style(pre)?;
    let raw_merges = md
        .strings(KEY_MERGES)?
        .ok_or(TokenizerBuildError::MissingKey { key: KEY_MERGES })?;
    let bpe_vocab = vocab.to_bpe_vocab();
    let merges = parse_merges(&raw_merges, &bpe_vocab)?;
    let ignore_merges = matches!(
        style,
        ByteLevelStyle::Split {
            ignore_merges: true,
            ..
        }
    );
    let bpe = BPE::builder()
        .vocab_and_merges(bpe_vocab, merges)
        .ignore_merges(ignore_merges)
        .build()
        .map_err(build_err)?;

    let mut tokenizer = Tokenizer::new(bpe);
    let (pre_tokenizer, add_bos): (PreTokenizerWrapper, bool) = match style {
        ByteLevelStyle::Gpt2 => (ByteLevel::new(false, true, true).into(), false),
        ByteLevelStyle::DigitsThenGpt2 => (
            PreSequence::new(vec![
                Digits::new(true).into(),
                ByteLevel::new(false, true, true).into(),
            ])
            .into(),
            false,
        ),
        ByteLevelStyle::Split {
            regex,
            nfc,
            add_bos,
            ..
        } => {
            if nfc {
                tokenizer.with_normalizer(Some(NFC)).map_err(build_err)?;
            }
            let split = Split::new(
                SplitPattern::Regex(regex.to_string()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(build_err)?;
            let pre = PreSequence::new(vec![
                split.into(),
                ByteLevel::new(false, false, false).into(),
            ]);
            (pre.into(), add_bos)
        }
    };
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    Ok((tokenizer, add_bos))
}

/// SentencePiece BPE with byte fallback (`tokenizer.ggml.model = "llama"`), as in the Llama 2 and
/// Mistral `tokenizer.json` files.
fn sentencepiece_bpe(md: &Meta<'_>, vocab: &Vocabulary) -> BuildResult<Tokenizer> {
    let bpe_vocab = vocab.to_bpe_vocab();
    // A file's own merges win; SentencePiece files have none and they are recovered from scores.
    let merges = match md.strings(KEY_MERGES)? {
        Some(raw) => parse_merges(&raw, &bpe_vocab)?,
        None => {
            let scores = md
                .floats(KEY_SCORES)?
                .ok_or(TokenizerBuildError::MissingKey { key: KEY_SCORES })?;
            if scores.len() != vocab.len() {
                return Err(TokenizerBuildError::LengthMismatch {
                    key: KEY_SCORES,
                    expected: vocab.len(),
                    got: scores.len(),
                });
            }
            merges_from_scores(&vocab.tokens, &scores, &bpe_vocab)
        }
    };
    let mut builder = BPE::builder()
        .vocab_and_merges(bpe_vocab, merges)
        .fuse_unk(true)
        .byte_fallback(true);
    if let Some(unk) = md.int(KEY_UNK)? {
        let unk = vocab.check_id(KEY_UNK, unk)?;
        builder = builder.unk_token(vocab.tokens[unk as usize].clone());
    }
    let bpe = builder.build().map_err(build_err)?;

    // The normalizer form of the Llama 2 / Mistral `tokenizer.json` (`legacy: true`): it prepends
    // "▁" even to text that already starts with a space, as sentencepiece's dummy prefix does.
    // transformers' newer `Metaspace(prepend_scheme="first")` form does not, and so differs from
    // the sentencepiece model on such text.
    let add_prefix_space = md.bool(KEY_ADD_SPACE_PREFIX)?.unwrap_or(true);
    let underline = SPIECE_UNDERLINE.to_string();
    let mut normalizers: Vec<NormalizerWrapper> = Vec::new();
    if add_prefix_space {
        normalizers.push(Prepend::new(underline.clone()).into());
    }
    normalizers.push(
        Replace::new(" ", underline.as_str())
            .map_err(build_err)?
            .into(),
    );
    let mut decoders: Vec<DecoderWrapper> = vec![
        Replace::new(underline.as_str(), " ")
            .map_err(build_err)?
            .into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if add_prefix_space {
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer
        .with_normalizer(Some(NormalizerSequence::new(normalizers)))
        .map_err(build_err)?;
    tokenizer.with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(tokenizer)
}

/// Parses `"left right"` merges, checking both sides and their concatenation are tokens.
fn parse_merges(raw: &[String], vocab: &Vocab) -> BuildResult<Merges> {
    let mut merges = Merges::with_capacity(raw.len());
    for (index, merge) in raw.iter().enumerate() {
        let bad = |reason| TokenizerBuildError::BadMerge {
            index,
            merge: merge.clone(),
            reason,
        };
        // llama.cpp splits at the first space after the first byte (`llm_tokenizer_bpe`).
        let split = merge
            .char_indices()
            .skip(1)
            .find(|&(_, c)| c == ' ')
            .map(|(i, _)| i)
            .ok_or_else(|| bad("no space separating two tokens"))?;
        let (left, right) = (&merge[..split], &merge[split + 1..]);
        if !vocab.contains_key(left) || !vocab.contains_key(right) {
            return Err(bad("a side is not in the vocabulary"));
        }
        if !vocab.contains_key(&format!("{left}{right}")) {
            return Err(bad("the merged token is not in the vocabulary"));
        }
        merges.push((left.to_string(), right.to_string()));
    }
    Ok(merges)
}

/// Merges implied by a SentencePiece vocabulary: every split of a token into two tokens, best
/// score first. A port of transformers' `generate_merges(vocab, vocab_scores)`, orders and ties
/// included, so the result equals what transformers builds from the same file.
fn merges_from_scores(tokens: &[String], scores: &[f32], vocab: &Vocab) -> Merges {
    // Python's `dict(zip(tokens, scores))`: first position, last score for a repeated token.
    let mut last_score: HashMap<&str, f32> = HashMap::with_capacity(tokens.len());
    for (token, &score) in tokens.iter().zip(scores) {
        last_score.insert(token.as_str(), score);
    }
    let mut seen = HashSet::with_capacity(tokens.len());
    let mut candidates: Vec<(&str, &str, f32)> = Vec::new();
    for token in tokens {
        if !seen.insert(token.as_str()) {
            continue;
        }
        let score = last_score.get(token.as_str()).copied().unwrap_or(0.0);
        let mut local: Vec<(&str, &str, u32, u32)> = token
            .char_indices()
            .skip(1)
            .filter_map(|(i, _)| {
                let (left, right) = token.split_at(i);
                Some((left, right, *vocab.get(left)?, *vocab.get(right)?))
            })
            .collect();
        local.sort_by_key(|&(_, _, l, r)| (l, r));
        candidates.extend(local.into_iter().map(|(l, r, _, _)| (l, r, score)));
    }
    // `sorted(key=(score, len(l), len(r)), reverse=True)`: stable, so ties keep their order.
    candidates.sort_by(|a, b| {
        b.2.total_cmp(&a.2)
            .then_with(|| b.0.chars().count().cmp(&a.0.chars().count()))
            .then_with(|| b.1.chars().count().cmp(&a.1.chars().count()))
    });
    candidates
        .into_iter()
        .map(|(l, r, _)| (l.to_string(), r.to_string()))
        .collect()
}

/// Control and unknown tokens become special added tokens, user-defined ones plain added tokens
/// (transformers `add_gguf_special_tokens`, llama.cpp `tokenizer_st_partition`), so they are
/// matched whole in the text. Their content is in the model vocabulary, so ids do not change.
fn add_special_tokens(tokenizer: &mut Tokenizer, vocab: &Vocabulary) -> BuildResult<()> {
    let mut special = Vec::new();
    let mut user = Vec::new();
    for (id, token) in vocab.tokens.iter().enumerate() {
        match vocab.token_type(id) {
            TOKEN_TYPE_CONTROL | TOKEN_TYPE_UNKNOWN => {
                special.push(AddedToken::from(token.clone(), true).normalized(false));
            }
            TOKEN_TYPE_USER_DEFINED => {
                user.push(AddedToken::from(token.clone(), false).normalized(false));
            }
            _ => {}
        }
    }
    tokenizer.add_special_tokens(special).map_err(build_err)?;
    tokenizer.add_tokens(user).map_err(build_err)?;
    Ok(())
}

fn tokenizer_info(
    md: &Meta<'_>,
    vocab: &Vocabulary,
    default_add_bos: bool,
) -> BuildResult<GgufTokenizerInfo> {
    let id = |key| -> BuildResult<Option<u32>> {
        md.int(key)?.map(|v| vocab.check_id(key, v)).transpose()
    };
    let bos_token_id = id(KEY_BOS)?;
    let pad_token_id = id(KEY_PAD)?;
    let mut eos_token_ids: Vec<u32> = Vec::new();
    for key in [KEY_EOS, KEY_EOT, KEY_EOM] {
        if let Some(eos) = id(key)? {
            if !eos_token_ids.contains(&eos) {
                eos_token_ids.push(eos);
            }
        }
    }
    for (id, token) in (0u32..).zip(&vocab.tokens) {
        let control = vocab.token_type(id as usize) == TOKEN_TYPE_CONTROL;
        if control
            && END_OF_GENERATION_TOKENS.contains(&token.as_str())
            && !eos_token_ids.contains(&id)
        {
            eos_token_ids.push(id);
        }
    }
    Ok(GgufTokenizerInfo {
        bos_token_id,
        eos_token_ids,
        pad_token_id,
        add_bos_token: md.bool(KEY_ADD_BOS)?.unwrap_or(default_add_bos),
        add_eos_token: md.bool(KEY_ADD_EOS)?.unwrap_or(false),
        chat_template: md.string(KEY_CHAT_TEMPLATE)?.map(str::to_string),
    })
}

/// `BOS $A EOS` for the flags that are set (transformers `LlamaTokenizer.update_post_processor`);
/// `None` when neither is.
fn bos_eos_processor(
    info: &GgufTokenizerInfo,
    vocab: &Vocabulary,
) -> BuildResult<Option<TemplateProcessing>> {
    let mut specials: Vec<(&str, u32)> = Vec::new();
    if info.add_bos_token {
        let bos = info
            .bos_token_id
            .ok_or(TokenizerBuildError::MissingKey { key: KEY_BOS })?;
        specials.push(("bos", bos));
    }
    let mut eos = None;
    if info.add_eos_token {
        // The declared `eos_token_id` comes first in `eos_token_ids`.
        let id = info
            .eos_token_ids
            .first()
            .copied()
            .ok_or(TokenizerBuildError::MissingKey { key: KEY_EOS })?;
        specials.push(("eos", id));
        eos = Some(id);
    }
    if specials.is_empty() {
        return Ok(None);
    }
    // Template keys are placeholders ("bos"/"eos"), so token text with spaces or ':' is safe.
    let mut single = Vec::new();
    let mut pair = Vec::new();
    for type_id in [0, 1] {
        let seq = if type_id == 0 { "$A" } else { "$B" };
        let mut part = Vec::new();
        if info.add_bos_token {
            part.push(format!("bos:{type_id}"));
        }
        part.push(format!("{seq}:{type_id}"));
        if eos.is_some() {
            part.push(format!("eos:{type_id}"));
        }
        if type_id == 0 {
            single.clone_from(&part);
        }
        pair.extend(part);
    }
    let tokens = specials
        .iter()
        .map(|&(key, id)| {
            SpecialToken::new(
                key.to_string(),
                vec![id],
                vec![vocab.tokens[id as usize].clone()],
            )
            .map_err(build_err)
        })
        .collect::<BuildResult<Vec<_>>>()?;
    let processor = TemplateProcessing::builder()
        .single(Template::try_from(single).map_err(build_err)?)
        .pair(Template::try_from(pair).map_err(build_err)?)
        .special_tokens(tokens)
        .build()
        .map_err(build_err)?;
    Ok(Some(processor))
}

/// Typed, error-reporting access to GGUF metadata.
struct Meta<'a>(&'a HashMap<String, Value>);

fn type_name(v: &Value) -> String {
    match v {
        Value::Array(items) => match items.first() {
            Some(first) => format!("array of {:?}", first.value_type()),
            None => "empty array".to_string(),
        },
        other => format!("{:?}", other.value_type()),
    }
}

fn value_as_int(v: &Value) -> Option<i64> {
    match *v {
        Value::U8(x) => Some(x.into()),
        Value::I8(x) => Some(x.into()),
        Value::U16(x) => Some(x.into()),
        Value::I16(x) => Some(x.into()),
        Value::U32(x) => Some(x.into()),
        Value::I32(x) => Some(x.into()),
        Value::U64(x) => Some(i64::try_from(x).unwrap_or(i64::MAX)),
        Value::I64(x) => Some(x),
        _ => None,
    }
}

fn value_as_float(v: &Value) -> Option<f32> {
    match *v {
        Value::F32(x) => Some(x),
        // Scores are f32 in every llama.cpp writer; an f64 array is narrowed.
        Value::F64(x) => Some(x as f32),
        _ => None,
    }
}

impl<'a> Meta<'a> {
    fn wrong(key: &'static str, expected: &'static str, found: String) -> TokenizerBuildError {
        TokenizerBuildError::WrongType {
            key,
            expected,
            found,
        }
    }

    fn string(&self, key: &'static str) -> BuildResult<Option<&'a str>> {
        match self.0.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(other) => Err(Self::wrong(key, "a string", type_name(other))),
        }
    }

    fn bool(&self, key: &'static str) -> BuildResult<Option<bool>> {
        match self.0.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(Self::wrong(key, "a bool", type_name(other))),
        }
    }

    fn int(&self, key: &'static str) -> BuildResult<Option<i64>> {
        match self.0.get(key) {
            None => Ok(None),
            Some(v) => value_as_int(v)
                .map(Some)
                .ok_or_else(|| Self::wrong(key, "an integer", type_name(v))),
        }
    }

    /// An array whose every element `convert` accepts.
    fn array<T>(
        &self,
        key: &'static str,
        expected: &'static str,
        convert: impl Fn(&'a Value) -> Option<T>,
    ) -> BuildResult<Option<Vec<T>>> {
        let items = match self.0.get(key) {
            None => return Ok(None),
            Some(Value::Array(items)) => items,
            Some(other) => return Err(Self::wrong(key, expected, type_name(other))),
        };
        items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                convert(item).ok_or_else(|| {
                    let found = format!("{:?} at index {i}", item.value_type());
                    Self::wrong(key, expected, found)
                })
            })
            .collect::<BuildResult<Vec<T>>>()
            .map(Some)
    }

    fn strings(&self, key: &'static str) -> BuildResult<Option<Vec<String>>> {
        self.array(key, "an array of strings", |v| match v {
            Value::String(s) => Some(s.clone()),
            _ => None,
        })
    }

    fn ints(&self, key: &'static str) -> BuildResult<Option<Vec<i64>>> {
        self.array(key, "an array of integers", value_as_int)
    }

    fn floats(&self, key: &'static str) -> BuildResult<Option<Vec<f32>>> {
        self.array(key, "an array of floats", value_as_float)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(items: &[&str]) -> Value {
        Value::Array(items.iter().map(|s| Value::String(s.to_string())).collect())
    }

    /// A byte-level BPE vocabulary small enough to write by hand: "hello" merges to one token.
    fn gpt2_metadata() -> HashMap<String, Value> {
        let tokens = [
            "h", "e", "l", "o", "Ġ", "he", "ll", "hell", "hello", "<|end|>",
        ];
        let mut md = HashMap::new();
        md.insert(KEY_MODEL.to_string(), Value::String("gpt2".into()));
        md.insert(KEY_PRE.to_string(), Value::String("smollm".into()));
        md.insert(KEY_TOKENS.to_string(), strings(&tokens));
        md.insert(
            KEY_MERGES.to_string(),
            strings(&["h e", "l l", "he ll", "hell o"]),
        );
        let types = (0..tokens.len()).map(|i| Value::I32(if i == 9 { 3 } else { 1 }));
        md.insert(KEY_TOKEN_TYPE.to_string(), Value::Array(types.collect()));
        md.insert(KEY_EOS.to_string(), Value::U32(9));
        md
    }

    /// A SentencePiece vocabulary: merges come from the scores.
    fn spm_metadata() -> HashMap<String, Value> {
        let tokens = [
            "<unk>", "<s>", "</s>", "<0xE2>", "<0x82>", "<0xAC>", "▁", "a", "b", "▁a", "ab", "▁ab",
        ];
        let scores = [
            0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0, -6.0,
        ];
        let types = [2, 3, 3, 6, 6, 6, 1, 1, 1, 1, 1, 1];
        let mut md = HashMap::new();
        md.insert(KEY_MODEL.to_string(), Value::String("llama".into()));
        md.insert(KEY_TOKENS.to_string(), strings(&tokens));
        md.insert(
            KEY_SCORES.to_string(),
            Value::Array(scores.into_iter().map(Value::F32).collect()),
        );
        md.insert(
            KEY_TOKEN_TYPE.to_string(),
            Value::Array(types.into_iter().map(Value::I32).collect()),
        );
        md.insert(KEY_UNK.to_string(), Value::U32(0));
        md.insert(KEY_BOS.to_string(), Value::U32(1));
        md.insert(KEY_EOS.to_string(), Value::U32(2));
        md
    }

    fn build_err_of(md: &HashMap<String, Value>) -> TokenizerBuildError {
        match tokenizer_from_gguf(md) {
            Ok(_) => panic!("expected an error"),
            Err(e) => e,
        }
    }

    #[test]
    fn byte_level_bpe_encodes_and_decodes() {
        let (tok, info) = tokenizer_from_gguf(&gpt2_metadata()).unwrap();
        let enc = tok.encode("hello<|end|>", true).unwrap();
        assert_eq!(enc.get_ids(), &[8, 9]);
        assert_eq!(tok.decode(&[8, 4, 8], false).unwrap(), "hello hello");
        assert_eq!(info.eos_token_ids, vec![9]);
        assert!(!info.add_bos_token && info.bos_token_id.is_none());
    }

    #[test]
    fn sentencepiece_bpe_prepends_space_adds_bos_and_falls_back_to_bytes() {
        let (tok, info) = tokenizer_from_gguf(&spm_metadata()).unwrap();
        assert!(info.add_bos_token);
        let enc = tok.encode("ab€", true).unwrap();
        assert_eq!(enc.get_ids(), &[1, 11, 3, 4, 5]);
        assert_eq!(tok.decode(enc.get_ids(), true).unwrap(), "ab€");
        assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), "<s> ab€");
    }

    /// transformers `generate_merges`: best score first; among equal scores, longer left piece
    /// first, then longer right piece; otherwise file order.
    #[test]
    fn merges_from_scores_follow_transformers_order() {
        let tokens: Vec<String> = ["a", "b", "c", "ab", "bc", "abc", "x"]
            .map(String::from)
            .into();
        let scores = [0.0, 0.0, 0.0, -2.0, -1.0, -1.0, 0.0];
        let vocab = Vocabulary::new(tokens.clone(), vec![]).to_bpe_vocab();
        let merges = merges_from_scores(&tokens, &scores, &vocab);
        let got: Vec<(&str, &str)> = merges
            .iter()
            .map(|(l, r)| (l.as_str(), r.as_str()))
            .collect();
        // Checked against transformers 5.23 `generate_merges` on the same input.
        assert_eq!(got, [("ab", "c"), ("a", "bc"), ("b", "c"), ("a", "b")]);
    }

    #[test]
    fn missing_keys_are_reported() {
        for key in [KEY_MODEL, KEY_TOKENS, KEY_MERGES] {
            let mut md = gpt2_metadata();
            md.remove(key);
            assert!(
                matches!(build_err_of(&md), TokenizerBuildError::MissingKey { key: k } if k == key),
                "{key}"
            );
        }
        let mut md = spm_metadata();
        md.remove(KEY_SCORES);
        assert!(matches!(
            build_err_of(&md),
            TokenizerBuildError::MissingKey { key: KEY_SCORES }
        ));
        // add_bos_token with no BOS id to add.
        let mut md = gpt2_metadata();
        md.insert(KEY_ADD_BOS.to_string(), Value::Bool(true));
        assert!(matches!(
            build_err_of(&md),
            TokenizerBuildError::MissingKey { key: KEY_BOS }
        ));
    }

    #[test]
    fn wrong_types_are_reported() {
        let cases: Vec<(&str, Value)> = vec![
            (KEY_MODEL, Value::U32(2)),
            (KEY_TOKENS, Value::String("h e l o".into())),
            (
                KEY_TOKENS,
                Value::Array(vec![Value::String("h".into()), Value::U32(1)]),
            ),
            (KEY_MERGES, Value::Array(vec![Value::Bool(true)])),
            (KEY_TOKEN_TYPE, Value::Array(vec![Value::F32(1.0); 10])),
            (KEY_EOS, Value::String("<|end|>".into())),
            (KEY_ADD_BOS, Value::U8(1)),
            (KEY_CHAT_TEMPLATE, Value::Array(vec![])),
        ];
        for (key, value) in cases {
            let mut md = gpt2_metadata();
            md.insert(key.to_string(), value);
            let err = build_err_of(&md);
            assert!(
                matches!(err, TokenizerBuildError::WrongType { key: k, .. } if k == key),
                "{key}: {err}"
            );
        }
        let mut md = spm_metadata();
        md.insert(KEY_SCORES.to_string(), strings(&["0"; 12]));
        assert!(matches!(
            build_err_of(&md),
            TokenizerBuildError::WrongType {
                key: KEY_SCORES,
                ..
            }
        ));
    }

    #[test]
    fn unsupported_model_and_pre_tokenizer_are_reported() {
        let mut md = spm_metadata();
        md.insert(KEY_ARCH.to_string(), Value::String("gemma2".into()));
        assert!(matches!(
            build_err_of(&md),
            TokenizerBuildError::UnsupportedModel { .. }
        ));
        for model in ["bert", "rwkv", "t5", ""] {
            let mut md = gpt2_metadata();
            md.insert(KEY_MODEL.to_string(), Value::String(model.into()));
            let err = build_err_of(&md);
            assert!(
                matches!(&err, TokenizerBuildError::UnsupportedModel { model: m, .. } if m == model)
            );
            assert!(err.to_string().contains("gpt2") && err.to_string().contains("llama"));
        }
        let mut md = gpt2_metadata();
        md.insert(KEY_PRE.to_string(), Value::String("deepseek-llm".into()));
        let err = build_err_of(&md);
        assert!(
            matches!(&err, TokenizerBuildError::UnsupportedPreTokenizer { pre, .. } if pre == "deepseek-llm")
        );
        assert!(err.to_string().contains("qwen2"));
    }

    #[test]
    fn per_token_arrays_must_match_the_vocabulary() {
        let mut md = gpt2_metadata();
        md.insert(
            KEY_TOKEN_TYPE.to_string(),
            Value::Array(vec![Value::I32(1); 3]),
        );
        assert!(matches!(
            build_err_of(&md),
            TokenizerBuildError::LengthMismatch {
                key: KEY_TOKEN_TYPE,
                expected: 10,
                got: 3
            }
        ));
        let mut md = spm_metadata();
        md.insert(
            KEY_SCORES.to_string(),
            Value::Array(vec![Value::F32(0.0); 13]),
        );
        assert!(matches!(
            build_err_of(&md),
            TokenizerBuildError::LengthMismatch {
                key: KEY_SCORES,
                expected: 12,
                got: 13
            }
        ));
        let mut md = gpt2_metadata();
        md.insert(KEY_TOKENS.to_string(), Value::Array(vec![]));
        assert!(matches!(
            build_err_of(&md),
            TokenizerBuildError::BadVocabSize { len: 0, .. }
        ));
    }

    #[test]
    fn bad_merges_are_reported() {
        for (merge, index) in [("h x", 1), ("hl", 1), ("h l", 1), (" h", 1)] {
            let mut md = gpt2_metadata();
            md.insert(KEY_MERGES.to_string(), strings(&["h e", merge]));
            let err = build_err_of(&md);
            assert!(
                matches!(&err, TokenizerBuildError::BadMerge { index: i, merge: m, .. } if *i == index && m == merge),
                "{merge:?}: {err}"
            );
        }
    }

    #[test]
    fn token_ids_must_be_in_the_vocabulary() {
        for (key, value, id) in [
            (KEY_BOS, Value::U32(10), 10),
            (KEY_EOS, Value::U64(u64::MAX), i64::MAX),
            (KEY_PAD, Value::I32(-1), -1),
            (KEY_EOT, Value::U32(1_000_000), 1_000_000),
        ] {
            let mut md = gpt2_metadata();
            md.insert(key.to_string(), value);
            let err = build_err_of(&md);
            assert!(
                matches!(err, TokenizerBuildError::TokenIdOutOfRange { key: k, id: i, vocab: 10 } if k == key && i == id),
                "{key}: {err}"
            );
        }
        let mut md = spm_metadata();
        md.insert(KEY_UNK.to_string(), Value::U32(12));
        assert!(matches!(
            build_err_of(&md),
            TokenizerBuildError::TokenIdOutOfRange { key: KEY_UNK, .. }
        ));
    }
}
