//! Tokenizers: `tokenizer.json` beside the weights, or built from GGUF metadata ([`gguf`]).

pub mod gguf;

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::loader::gguf::GgufFile;

/// A model's tokenizer plus the special ids and chat template that travel with it.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    source: PathBuf,
    bos_token_id: Option<u32>,
    eos_token_ids: Vec<u32>,
    chat_template: Option<String>,
    /// The grammar engine's vocabulary, built on the first constrained generation.
    constraints: crate::generation::constraint::FactoryCache,
}

impl Tokenizer {
    /// Loads a HF `tokenizer.json`; the chat template and special ids come from
    /// `tokenizer_config.json` beside it when present.
    pub fn from_file(path: &Path) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| Error::Tokenizer {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let mut tok = Self {
            inner,
            source: path.to_path_buf(),
            bos_token_id: None,
            eos_token_ids: Vec::new(),
            chat_template: None,
            constraints: Default::default(),
        };
        if let Some(dir) = path.parent() {
            tok.read_tokenizer_config(&dir.join("tokenizer_config.json"))?;
            tok.read_generation_config(&dir.join("generation_config.json"))?;
        }
        Ok(tok)
    }

    /// Builds the tokenizer embedded in a GGUF file's metadata.
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let (inner, info) = gguf::tokenizer_from_gguf(&file.content().metadata).map_err(|source| Error::GgufTokenizer {
            path: file.path().to_path_buf(),
            source,
        })?;
        Ok(Self {
            inner,
            source: file.path().to_path_buf(),
            bos_token_id: info.bos_token_id,
            eos_token_ids: info.eos_token_ids,
            chat_template: info.chat_template,
            constraints: Default::default(),
        })
    }

    fn read_tokenizer_config(&mut self, path: &Path) -> Result<()> {
        let Ok(text) = std::fs::read_to_string(path) else {
            return Ok(());
        };
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|source| Error::Json { path: path.to_path_buf(), source })?;
        self.chat_template = json.get("chat_template").and_then(|t| t.as_str()).map(str::to_string);
        let id_of = |key: &str| {
            let tok = json.get(key)?;
            let text = tok.as_str().or_else(|| tok.get("content").and_then(|c| c.as_str()))?;
            self.inner.token_to_id(text)
        };
        self.bos_token_id = id_of("bos_token");
        self.eos_token_ids = id_of("eos_token").into_iter().collect();
        Ok(())
    }

    /// Adds `eos_token_id` (an int or a list, e.g. Llama 3's three) from `generation_config.json`,
    /// when the file exists, to the end-of-sequence ids.
    fn read_generation_config(&mut self, path: &Path) -> Result<()> {
        let Ok(text) = std::fs::read_to_string(path) else {
            return Ok(());
        };
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|source| Error::Json { path: path.to_path_buf(), source })?;
        let ids: Vec<u32> = match json.get("eos_token_id") {
            Some(serde_json::Value::Array(items)) => items.iter().filter_map(|v| v.as_u64()).map(|v| v as u32).collect(),
            Some(v) => v.as_u64().map(|v| v as u32).into_iter().collect(),
            None => Vec::new(),
        };
        for id in ids {
            if !self.eos_token_ids.contains(&id) {
                self.eos_token_ids.push(id);
            }
        }
        Ok(())
    }

    /// The file the tokenizer was read from (tokenizer.json or the GGUF).
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// Token ids of `text`. With `add_special_tokens` the tokenizer's post-processor adds BOS etc.
    /// as HF's `tokenizer(text)` does.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, add_special_tokens).map_err(|e| Error::Tokenizer {
            path: self.source.clone(),
            reason: e.to_string(),
        })?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`; ids outside the vocabulary are an error (tokenizers would drop them).
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        // tokenizers silently drops unknown ids; an id is known iff it maps to a token (ids need
        // not be contiguous).
        if let Some(bad) = ids.iter().find(|&&id| self.inner.id_to_token(id).is_none()) {
            return Err(Error::InvalidParameter {
                name: "ids",
                reason: format!("token id {bad} is not in the tokenizer vocabulary ({} tokens)", self.vocab_size()),
            });
        }
        self.inner.decode(ids, skip_special_tokens).map_err(|e| Error::Tokenizer {
            path: self.source.clone(),
            reason: e.to_string(),
        })
    }

    /// Number of ids the tokenizer can produce, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The BOS id, if the model has one.
    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_token_id
    }

    /// Every id that ends a generation: the EOS token and the `eos_token_id` list of the config.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    /// The model's Jinja chat template, if it ships one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// The wrapped `tokenizers::Tokenizer`.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// The grammar engine over this vocabulary (`vocab` ids, end of sequence `eos`), shared by
    /// every constrained sequence.
    pub(crate) fn constraint_factory(&self, vocab: usize, eos: u32) -> Result<crate::generation::constraint::ConstraintFactory> {
        self.constraints.get(self, vocab, eos)
    }

    /// The raw bytes token `id` stands for, as OpenAI's `logprobs[].bytes` reports them: a
    /// byte-level BPE token's bytes (GPT-2's byte-to-character map undone), a byte-fallback
    /// token's byte (`<0xE2>`), a SentencePiece piece with `▁` as a space, an added token's text.
    /// `None` for an id outside the vocabulary.
    pub fn token_bytes(&self, id: u32) -> Option<Vec<u8>> {
        let piece = self.inner.id_to_token(id)?;
        if let Some(b) = byte_fallback(&piece) {
            return Some(vec![b]);
        }
        let byte_level = matches!(self.inner.get_decoder(), Some(tokenizers::DecoderWrapper::ByteLevel(_)));
        let is_added = self.inner.get_added_tokens_decoder().contains_key(&id);
        if byte_level && !is_added {
            if let Some(bytes) = piece.chars().map(gpt2_byte).collect::<Option<Vec<u8>>>() {
                return Some(bytes);
            }
        }
        Some(piece.replace('\u{2581}', " ").into_bytes())
    }
}

/// `<0xHH>` → the byte.
fn byte_fallback(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    (hex.len() == 2).then(|| u8::from_str_radix(hex, 16).ok()).flatten()
}

/// The byte a GPT-2 byte-level character stands for (the inverse of `bytes_to_unicode`, OpenAI's
/// encoder.py): printable Latin-1 bytes map to themselves, the other 68 bytes to U+0100.. in
/// byte order.
fn gpt2_byte(c: char) -> Option<u8> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let code = c as u32;
    if code < 256 {
        return printable(code).then_some(code as u8);
    }
    let k = code.checked_sub(256)? as usize;
    (0u32..256).filter(|&b| !printable(b)).nth(k).map(|b| b as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt2_characters_map_back_to_bytes() {
        assert_eq!(gpt2_byte('Ġ'), Some(b' '));
        assert_eq!(gpt2_byte('Ċ'), Some(b'\n'));
        assert_eq!(gpt2_byte('a'), Some(b'a'));
        assert_eq!(gpt2_byte('\u{ad}'), None); // soft hyphen is remapped, never itself
        assert_eq!(gpt2_byte('ł'), Some(0xa0)); // U+0142, the 67th remapped byte
        assert_eq!(gpt2_byte('Ń'), Some(0xad)); // U+0143, the 68th and last
        assert_eq!(gpt2_byte('ń'), None);
        assert_eq!(byte_fallback("<0xE2>"), Some(0xe2));
        assert_eq!(byte_fallback("<0xE>"), None);
    }
}
