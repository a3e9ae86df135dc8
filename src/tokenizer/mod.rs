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

    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_token_id
    }

    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// The wrapped `tokenizers::Tokenizer`.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}
