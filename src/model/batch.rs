//! [`StepBatch`]: the unit of work of one forward pass — the tokens of many sequences, each row
//! at its own position in its own KV slot, with its own adapter set.

use candle_core::Tensor;

use super::linear::RowRange;
use super::Model;
use crate::error::{Error, Result};

/// Which logits a row wants back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowLogits {
    /// None (a prefill chunk that does not end the prompt).
    None,
    /// The row's last token: one row of logits.
    Last,
    /// Every token of the row: `len` rows (prompt logprobs, perplexity).
    All,
}

/// One sequence's part of a step: `ids` continue KV slot `slot` at position `start` (which must be
/// what the slot holds), computed with variant `variant` of the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchRow {
    /// The KV slot the row reads and extends.
    pub slot: usize,
    /// Position of the row's first token.
    pub start: usize,
    /// Number of tokens.
    pub len: usize,
    /// Index into [`StepBatch::variants`]; 0 (or no variants at all) is the model itself.
    pub variant: usize,
    /// Logits to return.
    pub logits: RowLogits,
}

/// The tokens of one step, flat `(N,)`, and one [`BatchRow`] per sequence. Rows may differ in
/// length, position, slot and adapter set; [`Model::forward_batch`] returns each row's logits as
/// if that sequence ran alone.
///
/// Variants: clones of the model with other adapters attached ([`crate::SharedModel::snapshot`]),
/// sharing its base weights. A row keeps whichever variant it was given, so an adapter swapped
/// on the shared model meanwhile does not change rows already running.
#[derive(Debug, Clone, Default)]
pub struct StepBatch {
    ids: Vec<u32>,
    rows: Vec<BatchRow>,
    variants: Vec<Model>,
}

/// What the layers read of a step, built once by [`Model::forward_batch`].
pub(crate) struct StepPlan {
    /// Rows in execution order (grouped by variant), with the offset of their first token.
    pub spans: Vec<(BatchRow, usize)>,
    /// Runs of consecutive tokens sharing a variant, in execution order.
    pub ranges: Vec<RowRange>,
    /// Token ids in execution order: (N,).
    pub ids: Vec<u32>,
    /// Positions in execution order: (N,).
    pub positions: Vec<u32>,
    /// Flat token indices (execution order) whose logits are returned, in row push order.
    pub logit_tokens: Vec<u32>,
}

impl StepBatch {
    /// An empty batch whose rows all use the model itself (variant 0).
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty batch over `variants` of the model (index 0 is usually the base itself).
    pub fn with_variants(variants: Vec<Model>) -> Self {
        Self { variants, ..Self::default() }
    }

    /// Adds a row: `ids` continue `slot` at `start`. Errors: [`Error::InvalidBatch`] for no ids or
    /// a variant the batch does not have.
    pub fn push(&mut self, slot: usize, start: usize, ids: &[u32], variant: usize, logits: RowLogits) -> Result<()> {
        if ids.is_empty() {
            return Err(Error::InvalidBatch { reason: format!("row for slot {slot} has no tokens") });
        }
        if variant > 0 && variant >= self.variants.len() {
            return Err(Error::InvalidBatch { reason: format!("variant {variant} of {}", self.variants.len()) });
        }
        if self.rows.iter().any(|r| r.slot == slot) {
            return Err(Error::InvalidBatch { reason: format!("two rows for slot {slot}") });
        }
        self.ids.extend_from_slice(ids);
        self.rows.push(BatchRow { slot, start, len: ids.len(), variant, logits });
        Ok(())
    }

    /// The rows, in push order.
    pub fn rows(&self) -> &[BatchRow] {
        &self.rows
    }

    /// The model variants rows may name.
    pub fn variants(&self) -> &[Model] {
        &self.variants
    }

    /// Tokens in the step.
    pub fn n_tokens(&self) -> usize {
        self.ids.len()
    }

    /// Whether the batch has no rows.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Rows of logits [`Model::forward_batch`] returns: per row 0, 1 or `len`, in push order.
    pub fn logit_rows(&self) -> usize {
        self.rows.iter().map(row_logit_count).sum()
    }

    /// Orders the rows by variant (so each variant's tokens are contiguous) and lays out the
    /// step's per-token data.
    pub(crate) fn plan(&self) -> StepPlan {
        let mut order: Vec<usize> = (0..self.rows.len()).collect();
        order.sort_by_key(|&i| self.rows[i].variant);
        let starts: Vec<usize> = self.rows.iter().scan(0, |acc, r| {
            let s = *acc;
            *acc += r.len;
            Some(s)
        }).collect();
        let mut plan = StepPlan {
            spans: Vec::with_capacity(order.len()),
            ranges: Vec::new(),
            ids: Vec::with_capacity(self.ids.len()),
            positions: Vec::with_capacity(self.ids.len()),
            logit_tokens: Vec::new(),
        };
        let mut offset_of = vec![0usize; self.rows.len()];
        for &i in &order {
            let row = &self.rows[i];
            let offset = plan.ids.len();
            offset_of[i] = offset;
            plan.ids.extend_from_slice(&self.ids[starts[i]..starts[i] + row.len]);
            plan.positions.extend((row.start..row.start + row.len).map(|p| p as u32));
            match plan.ranges.last_mut() {
                Some(last) if last.variant == row.variant => last.len += row.len,
                _ => plan.ranges.push(RowRange { variant: row.variant, start: offset, len: row.len }),
            }
            plan.spans.push((row.clone(), offset));
        }
        for (row, &offset) in self.rows.iter().zip(&offset_of) {
            let first = match row.logits {
                RowLogits::None => continue,
                RowLogits::Last => offset + row.len - 1,
                RowLogits::All => offset,
            };
            plan.logit_tokens.extend((first..offset + row.len).map(|t| t as u32));
        }
        plan
    }
}

fn row_logit_count(r: &BatchRow) -> usize {
    match r.logits {
        RowLogits::None => 0,
        RowLogits::Last => 1,
        RowLogits::All => r.len,
    }
}

/// Per-step tensors every layer reads: gathered RoPE tables for each token's own position.
pub(crate) struct StepTensors {
    pub cos: Tensor, // (N, hd/2)
    pub sin: Tensor, // (N, hd/2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_groups_rows_by_variant_and_returns_logits_in_push_order() {
        // Variants need models: the layout with variant 0 only here, a synthetic reorder below.
        let mut b = StepBatch::new();
        b.push(3, 10, &[1, 2, 3], 0, RowLogits::Last).unwrap();
        b.push(1, 0, &[4], 0, RowLogits::All).unwrap();
        b.push(2, 5, &[5, 6], 0, RowLogits::None).unwrap();
        let p = b.plan();
        assert_eq!(p.ids, vec![1, 2, 3, 4, 5, 6]);
        assert_eq!(p.positions, vec![10, 11, 12, 0, 5, 6]);
        assert_eq!(p.ranges, vec![RowRange { variant: 0, start: 0, len: 6 }]);
        assert_eq!(p.logit_tokens, vec![2, 3]);
        assert_eq!(b.logit_rows(), 2);
        assert!(b.push(1, 1, &[7], 0, RowLogits::Last).is_err(), "two rows for one slot");
        assert!(b.push(4, 0, &[], 0, RowLogits::Last).is_err(), "no tokens");
        assert!(b.push(4, 0, &[1], 1, RowLogits::Last).is_err(), "no such variant");
    }

    #[test]
    fn plan_sorts_variants_contiguously() {
        let b = StepBatch {
            ids: vec![1, 2, 3, 4],
            rows: vec![
                BatchRow { slot: 0, start: 0, len: 1, variant: 1, logits: RowLogits::Last },
                BatchRow { slot: 1, start: 0, len: 2, variant: 0, logits: RowLogits::Last },
                BatchRow { slot: 2, start: 0, len: 1, variant: 1, logits: RowLogits::Last },
            ],
            variants: Vec::new(),
        };
        let p = b.plan();
        assert_eq!(p.ids, vec![2, 3, 1, 4]);
        assert_eq!(
            p.ranges,
            vec![RowRange { variant: 0, start: 0, len: 2 }, RowRange { variant: 1, start: 2, len: 2 }]
        );
        // Push order: row 0 (token 2), row 1 (token 1), row 2 (token 3).
        assert_eq!(p.logit_tokens, vec![2, 1, 3]);
    }
}
