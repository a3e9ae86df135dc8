//! Incremental, UTF-8-safe detokenization.
//!
//! Each new id yields the text it adds, computed as the difference of two decodes over a short
//! window of recent ids (`decode(ids[prefix..])` minus `decode(ids[prefix..read])`), like HF's
//! `DecodeStream`. The window always starts one emission back, so decoders that treat the first
//! token specially (SentencePiece's leading-space strip) see the same context in both decodes.
//!
//! Text is held back (the delta is empty) while it could still change:
//! - the decoded window ends in U+FFFD — an incomplete UTF-8 sequence of byte-level BPE tokens;
//! - the last id is a byte-fallback token (`<0xE2>`): tokenizers' `ByteFallback` decoder turns a
//!   whole run of byte tokens into U+FFFDs if any byte of the run is invalid, so a run is only
//!   final once a normal token ends it.
//!
//! **Incomplete tail policy:** [`StreamDecoder::finish`] flushes whatever is held back exactly as
//! the one-shot decode renders it (an unfinished character becomes U+FFFD). The concatenation of all
//! deltas and the flush therefore always equals `Tokenizer::decode(all ids, true)`.

use crate::error::Result;
use crate::tokenizer::Tokenizer;

/// Turns a stream of token ids into a stream of text deltas. See the module docs.
#[derive(Debug, Clone, Default)]
pub struct StreamDecoder {
    ids: Vec<u32>,
    /// Start of the decode window.
    prefix: usize,
    /// End of the text already emitted.
    read: usize,
    /// `decode(ids[prefix..read])`.
    prefix_text: String,
}

impl StreamDecoder {
    /// An empty decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every id pushed so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// Adds `id` and returns the text that is now final (possibly empty).
    ///
    /// Errors: ids outside the tokenizer vocabulary ([`crate::Error::InvalidParameter`]).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        if is_byte_fallback(tok, id) {
            return Ok(String::new());
        }
        let text = tok.decode(&self.ids[self.prefix..], true)?;
        if text.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        let delta = suffix_after(&text, &self.prefix_text);
        // Move the window start to the last emission point, unless the ids from there decode to
        // nothing (a skipped special token, a lone "▁" that SentencePiece strips when first):
        // then the next window would strip a later token's leading space.
        let next = tok.decode(&self.ids[self.read..], true)?;
        if next.is_empty() {
            self.prefix_text = text;
        } else {
            self.prefix = self.read;
            self.prefix_text = next;
        }
        self.read = self.ids.len();
        Ok(delta)
    }

    /// The held-back tail, rendered as the one-shot decode renders it (see the module docs).
    pub fn finish(&mut self, tok: &Tokenizer) -> Result<String> {
        let text = tok.decode(&self.ids[self.prefix..], true)?;
        let delta = suffix_after(&text, &self.prefix_text);
        self.prefix = self.ids.len();
        self.read = self.ids.len();
        self.prefix_text.clear();
        Ok(delta)
    }
}

/// `text` minus `prefix`. Decoders used here only append; if one ever rewrote earlier text, the
/// part after the longest common prefix is returned.
fn suffix_after(text: &str, prefix: &str) -> String {
    if let Some(rest) = text.strip_prefix(prefix) {
        return rest.to_string();
    }
    let common = text
        .char_indices()
        .zip(prefix.chars())
        .find(|((_, a), b)| a != b)
        .map_or(text.len().min(prefix.len()), |((i, _), _)| i);
    text.get(common..).unwrap_or_default().to_string()
}

/// `<0xHH>`: a SentencePiece byte-fallback piece.
fn is_byte_fallback(tok: &Tokenizer, id: u32) -> bool {
    tok.inner().id_to_token(id).is_some_and(|t| {
        let b = t.as_bytes();
        b.len() == 6 && b.starts_with(b"<0x") && b[5] == b'>' && b[3..5].iter().all(u8::is_ascii_hexdigit)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suffix_after_handles_rewrites() {
        assert_eq!(suffix_after("hello world", "hello"), " world");
        assert_eq!(suffix_after("hellO world", "hello"), "O world");
        assert_eq!(suffix_after("héllo", "hé"), "llo");
        assert_eq!(suffix_after("ab", "abc"), "");
    }
}
