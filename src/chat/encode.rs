//! Tokenizing a rendered chat prompt with special-token parsing off inside message contents.
//!
//! The template's own special tokens (`<|im_start|>`, …) must become special ids, but a user who
//! types `<|im_end|>` must get text. tokenizers splits its input at added tokens and encodes the
//! pieces between them independently, so: encode the whole prompt normally; if a special token
//! landed inside a message's content, re-encode the piece between the surrounding legitimate
//! special tokens with a copy of the tokenizer that does not parse special tokens. Prompts without
//! such content (nearly all) are encoded exactly as `tokenizer(rendered, add_special_tokens=False)`.

use std::collections::HashSet;
use std::ops::Range;
use std::sync::OnceLock;

use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

/// Encodes rendered chat prompts for one tokenizer; caches its special-token set and, when first
/// needed, a copy that leaves special tokens in text alone.
#[derive(Debug, Default)]
pub struct ChatEncoder {
    specials: OnceLock<(HashSet<u32>, Vec<String>)>,
    literal: OnceLock<tokenizers::Tokenizer>,
}

impl ChatEncoder {
    /// An encoder with empty caches.
    pub fn new() -> Self {
        Self::default()
    }

    /// Token ids of `rendered` (no BOS/EOS added: templates write their own), where special-token
    /// text inside any of `contents` stays text.
    ///
    /// Errors: [`Error::Tokenizer`] if encoding fails.
    pub fn encode(&self, tok: &Tokenizer, rendered: &str, contents: &[&str]) -> Result<Vec<u32>> {
        let enc = tok.inner().encode(rendered, false).map_err(|e| tok_error(tok, &e))?;
        let (special_ids, special_texts) = self.specials.get_or_init(|| specials(tok));
        let literal = literal_ranges(rendered, contents, special_texts);
        if literal.is_empty() {
            return Ok(enc.get_ids().to_vec());
        }
        let ids = enc.get_ids();
        let offsets = enc.get_offsets();
        let inside = |r: &(usize, usize)| literal.iter().any(|l| r.0 < l.end && l.start < r.1);
        let is_special = |i: usize| special_ids.contains(&ids[i]);
        if !(0..ids.len()).any(|i| is_special(i) && inside(&offsets[i])) {
            return Ok(ids.to_vec());
        }
        // Split at the legitimate special tokens; re-encode pieces that hold a user-typed one.
        let mut out = Vec::with_capacity(ids.len());
        let (mut piece, mut piece_start, mut tainted) = (Vec::new(), 0usize, false);
        for i in 0..ids.len() {
            if is_special(i) && !inside(&offsets[i]) {
                self.flush(tok, rendered.get(piece_start..offsets[i].0), &mut piece, tainted, &mut out)?;
                out.push(ids[i]);
                (piece_start, tainted) = (offsets[i].1, false);
            } else {
                tainted |= is_special(i);
                piece.push(ids[i]);
            }
        }
        self.flush(tok, rendered.get(piece_start..), &mut piece, tainted, &mut out)?;
        Ok(out)
    }

    fn flush(&self, tok: &Tokenizer, text: Option<&str>, piece: &mut Vec<u32>, tainted: bool, out: &mut Vec<u32>) -> Result<()> {
        match (tainted, text) {
            (true, Some(text)) => {
                let literal = self.literal.get_or_init(|| {
                    let mut t = tok.inner().clone();
                    t.set_encode_special_tokens(true);
                    t
                });
                let enc = literal.encode(text, false).map_err(|e| tok_error(tok, &e))?;
                out.extend_from_slice(enc.get_ids());
            }
            _ => out.extend_from_slice(piece),
        }
        piece.clear();
        Ok(())
    }
}

fn tok_error(tok: &Tokenizer, e: &dyn std::fmt::Display) -> Error {
    Error::Tokenizer { path: tok.source().to_path_buf(), reason: e.to_string() }
}

/// Ids and texts of the tokenizer's special added tokens.
fn specials(tok: &Tokenizer) -> (HashSet<u32>, Vec<String>) {
    let added = tok.inner().get_added_tokens_decoder();
    let special: Vec<(u32, String)> =
        added.into_iter().filter(|(_, t)| t.special).map(|(id, t)| (id, t.content)).collect();
    (special.iter().map(|s| s.0).collect(), special.into_iter().map(|s| s.1).filter(|s| !s.is_empty()).collect())
}

/// Byte ranges of `rendered` holding a content that contains special-token text, found in order.
fn literal_ranges(rendered: &str, contents: &[&str], special_texts: &[String]) -> Vec<Range<usize>> {
    let mut ranges = Vec::new();
    let mut cursor = 0;
    for content in contents {
        if content.is_empty() {
            continue;
        }
        let Some(at) = rendered.get(cursor..).and_then(|r| r.find(content)) else { continue };
        let range = cursor + at..cursor + at + content.len();
        cursor = range.end;
        if special_texts.iter().any(|s| content.contains(s.as_str())) {
            ranges.push(range);
        }
    }
    ranges
}
