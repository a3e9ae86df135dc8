//! The scheduler: many [`Sequence`]s, one KV pool, one forward pass per step.
//!
//! Each step retires sequences that are due to finish, admits waiting ones into free slots
//! (reusing the slot whose cached tokens share the longest prefix with the prompt), then builds
//! one [`StepBatch`]: a decode row for every running sequence, then prefill chunks of the
//! sequences still reading their prompt until the step's token budget is spent, so a long prompt
//! never stalls running streams for its whole prefill. Each row's logits go to its sequence's
//! sampler; events go to the sequence's sink.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::generation::sequence::Sequence;
use crate::generation::Event;
use crate::model::{KvPool, Model, RowLogits, StepBatch};

/// Where a sequence's events go; returns `false` when nobody listens any more (the sequence is
/// then cancelled and its slot freed).
pub(crate) type Sink = Box<dyn FnMut(Result<Event>) -> bool + Send>;

/// A request waiting for slots: its sequence and, for `n > 1`, the forks that continue the same
/// prefilled prompt.
pub(crate) struct Admission {
    pub seq: Sequence,
    pub sink: Sink,
    /// The model variant (adapter set) the request runs with; `None` is the engine's model.
    pub variant: Option<Model>,
    pub forks: Vec<(Sequence, Sink)>,
}

impl Admission {
    fn slots_needed(&self) -> usize {
        1 + self.forks.len()
    }
}

struct Running {
    seq: Sequence,
    sink: Sink,
    slot: usize,
    variant: Option<Model>,
    /// Tokens of `seq.tokens()` whose keys/values the slot holds.
    fed: usize,
    /// Forks waiting for this sequence's prefill, each with the slot reserved for it.
    forks: Vec<(Sequence, Sink, usize)>,
}

/// Counts for monitoring (`/health`, `/metrics`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Sequences holding a slot.
    pub running: usize,
    /// Requests waiting for slots.
    pub waiting: usize,
    /// Slots in the pool.
    pub slots: usize,
}

pub(crate) struct EngineCore {
    model: Model,
    pool: KvPool,
    /// Per slot: the ids of the last sequence that used it; the slot's KV holds a prefix of them.
    held: Vec<Vec<u32>>,
    /// Per slot: the variant that computed its keys/values (`None`: the engine's model). A prefix
    /// is reused only by a request with the same adapters.
    held_variant: Vec<Option<Model>>,
    /// Per slot: the step it was last released at (least recently used slots are taken first).
    released_at: Vec<u64>,
    tick: u64,
    waiting: VecDeque<Admission>,
    running: Vec<Running>,
    max_step_tokens: usize,
    /// Requests submitted but not yet in a slot, counted by the submitting side; decremented here
    /// the moment one leaves the queue, so a full-queue check never counts an admitted request.
    waiting_count: Option<Arc<AtomicUsize>>,
}

impl EngineCore {
    /// A scheduler over `pool` (made by `model`); `held[s]` are the ids slot s already holds.
    pub fn new(model: Model, pool: KvPool, mut held: Vec<Vec<u32>>, max_step_tokens: usize) -> Self {
        let n = pool.n_slots();
        held.resize(n, Vec::new());
        Self {
            model,
            pool,
            held,
            held_variant: vec![None; n],
            released_at: vec![0; n],
            tick: 0,
            waiting: VecDeque::new(),
            running: Vec::new(),
            max_step_tokens: max_step_tokens.max(1),
            waiting_count: None,
        }
    }

    /// Decrements `counter` for every request that leaves the queue.
    pub fn with_waiting_count(mut self, counter: Arc<AtomicUsize>) -> Self {
        self.waiting_count = Some(counter);
        self
    }

    fn left_queue(&self) {
        if let Some(c) = &self.waiting_count {
            let _ = c.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        }
    }

    pub fn enqueue(&mut self, admission: Admission) {
        self.waiting.push_back(admission);
    }

    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    pub fn stats(&self) -> EngineStats {
        EngineStats { running: self.running.len(), waiting: self.waiting.len(), slots: self.pool.n_slots() }
    }

    /// Ids held by slot `slot` (the running sequence's tokens while one runs there).
    pub fn tokens_of(&self, slot: usize) -> &[u32] {
        match self.running.iter().find(|r| r.slot == slot) {
            Some(r) => r.seq.tokens(),
            None => self.held.get(slot).map_or(&[], Vec::as_slice),
        }
    }

    /// The pool and, per slot, the ids whose keys/values it holds.
    pub fn into_pool(mut self) -> (KvPool, Vec<Vec<u32>>) {
        for r in std::mem::take(&mut self.running) {
            let n = self.pool.seq_len(r.slot).min(r.seq.tokens().len());
            self.held[r.slot] = r.seq.tokens()[..n].to_vec();
        }
        for (slot, held) in self.held.iter_mut().enumerate() {
            held.truncate(self.pool.seq_len(slot));
        }
        (self.pool, self.held)
    }

    /// Cancels every sequence (running and waiting): each gets its final event.
    pub fn cancel_all(&mut self) {
        for adm in &self.waiting {
            adm.seq.cancel_handle().cancel();
            for (f, _) in &adm.forks {
                f.cancel_handle().cancel();
            }
        }
        for r in &self.running {
            r.seq.cancel_handle().cancel();
        }
    }

    /// One step: retire, admit, one forward pass, sample. Every error goes to the sequences it
    /// concerns.
    pub fn step(&mut self) {
        self.tick += 1;
        self.admit();
        self.retire_due();
        if self.running.is_empty() {
            return;
        }
        let (batch, rows) = match self.build_batch() {
            Ok(b) => b,
            Err(e) => {
                self.fail_all(e);
                return;
            }
        };
        match self.model.forward_batch(&batch, &mut self.pool).and_then(|t| Ok(t.to_vec2::<f32>()?)) {
            Ok(logits) => self.deliver(rows, logits),
            Err(e) => {
                let slots: Vec<usize> = rows.iter().map(|r| self.running[r.index].slot).collect();
                for s in slots {
                    self.pool.reset(s); // possibly half-written
                }
                self.fail_all(e);
            }
        }
    }

    /// Moves waiting requests into free slots while there are enough for them (all `n` at once).
    fn admit(&mut self) {
        while let Some(adm) = self.waiting.front() {
            if adm.seq.cancel_handle().is_cancelled() {
                if let Some(mut adm) = self.waiting.pop_front() {
                    send(&mut adm.sink, adm.seq.finish(crate::generation::FinishReason::Cancelled));
                    for (mut f, mut sink) in adm.forks {
                        send(&mut sink, f.finish(crate::generation::FinishReason::Cancelled));
                    }
                }
                self.left_queue();
                continue;
            }
            if self.pool.free_slots().count() < adm.slots_needed() {
                break;
            }
            let Some(adm) = self.waiting.pop_front() else { break };
            self.start(adm);
            self.left_queue();
        }
    }

    /// Claims slots for `adm`: the free slot sharing the longest prefix with the prompt (rewound
    /// to it), else the least recently used; forks get further free slots.
    fn start(&mut self, adm: Admission) {
        let Admission { mut seq, sink, variant, forks } = adm;
        let prompt = &seq.tokens()[..seq.prompt_len()];
        let limit = prompt.len().saturating_sub(1);
        let mut best: Option<(usize, usize)> = None; // (slot, common)
        for slot in self.pool.free_slots() {
            let held = &self.held[slot];
            let same = self.same_variant(&self.held_variant[slot], &variant);
            let common = if same { common_prefix(held, prompt).min(limit).min(self.pool.seq_len(slot)) } else { 0 };
            let better = match best {
                None => true,
                Some((b, c)) => common > c || (common == c && self.released_at[slot] < self.released_at[b]),
            };
            if better {
                best = Some((slot, common));
            }
        }
        let Some((slot, mut common)) = best else { return };
        if !self.pool.truncate(slot, common) {
            self.pool.reset(slot);
            common = 0;
        }
        // Claiming a free slot cannot fail; the error path only guards the invariant.
        let _ = self.pool.claim(slot);
        self.held_variant[slot] = variant.clone();
        seq.set_cached(common);
        let mut reserved = Vec::with_capacity(forks.len());
        for (f, s) in forks {
            let Some(fs) = self.lru_free_slot() else { break };
            let _ = self.pool.claim(fs);
            self.held[fs].clear();
            self.held_variant[fs] = variant.clone();
            reserved.push((f, s, fs));
        }
        self.running.push(Running { seq, sink, slot, variant, fed: common, forks: reserved });
    }

    /// Whether keys/values computed by variant `a` are valid for variant `b`.
    fn same_variant(&self, a: &Option<Model>, b: &Option<Model>) -> bool {
        a.as_ref().unwrap_or(&self.model).same_adapters(b.as_ref().unwrap_or(&self.model))
    }

    fn lru_free_slot(&self) -> Option<usize> {
        self.pool.free_slots().min_by_key(|&s| self.released_at[s])
    }

    /// Finishes sequences that are cancelled, out of tokens or context, or stopped.
    fn retire_due(&mut self) {
        let mut i = 0;
        while i < self.running.len() {
            let r = &mut self.running[i];
            match r.seq.due_finish() {
                Some(event) => {
                    send(&mut r.sink, event);
                    self.retire(i);
                }
                None => i += 1,
            }
        }
    }

    fn retire(&mut self, i: usize) {
        let r = self.running.remove(i);
        for (mut f, mut sink, slot) in r.forks {
            send(&mut sink, f.finish(crate::generation::FinishReason::Cancelled));
            self.release(slot, Vec::new());
        }
        let tokens = r.seq.tokens().to_vec();
        self.release(r.slot, tokens);
    }

    fn release(&mut self, slot: usize, tokens: Vec<u32>) {
        self.held[slot] = tokens;
        self.released_at[slot] = self.tick;
        self.pool.release(slot);
    }

    /// The step's rows: decodes first, then prefill chunks within the token budget.
    fn build_batch(&mut self) -> Result<(StepBatch, Vec<PlannedRow>)> {
        let mut variants: Vec<Model> = vec![self.model.clone()];
        let mut rows = Vec::new();
        let mut budget = self.max_step_tokens;
        let decoding = |r: &Running| r.seq.tokens().len() - r.fed == 1;
        let order: Vec<usize> = (0..self.running.len())
            .filter(|&i| decoding(&self.running[i]))
            .chain((0..self.running.len()).filter(|&i| !decoding(&self.running[i])))
            .collect();
        for i in order {
            let r = &self.running[i];
            let pending = r.seq.tokens().len() - r.fed;
            let len = pending.min(budget);
            if len == 0 {
                continue;
            }
            budget -= len;
            let variant = match &r.variant {
                None => 0,
                Some(m) => match variants.iter().position(|v| v.same_adapters(m)) {
                    Some(v) => v,
                    None => {
                        variants.push(m.clone());
                        variants.len() - 1
                    }
                },
            };
            let logits = if len == pending { RowLogits::Last } else { RowLogits::None };
            rows.push(PlannedRow { index: i, len, variant, logits });
        }
        let mut batch = StepBatch::with_variants(variants);
        for p in &rows {
            let r = &mut self.running[p.index];
            batch.push(r.slot, r.fed, &r.seq.tokens()[r.fed..r.fed + p.len], p.variant, p.logits)?;
            r.seq.forward_started();
        }
        Ok((batch, rows))
    }

    /// Hands each row's logits to its sequence (and to forks waiting on its prefill).
    fn deliver(&mut self, rows: Vec<PlannedRow>, logits: Vec<Vec<f32>>) {
        let mut logits = logits.into_iter();
        let mut finished = Vec::new();
        for p in rows {
            self.running[p.index].fed += p.len;
            if p.logits == RowLogits::None {
                continue;
            }
            let Some(row) = logits.next() else { break };
            let finite = crate::model::finite::all_finite(&row);
            let forks = std::mem::take(&mut self.running[p.index].forks);
            for (mut f, mut sink, slot) in forks {
                let r = &self.running[p.index];
                let (src, fed, variant) = (r.slot, r.fed, r.variant.clone());
                if let Err(e) = self.pool.fork(src, slot) {
                    send(&mut sink, Err(e));
                    self.release(slot, Vec::new());
                    continue;
                }
                let event = if finite { f.accept_logits(row.clone()) } else { non_finite(&mut f) };
                let done = f.is_done() || event.is_err();
                let listening = send(&mut sink, event);
                self.running.push(Running { seq: f, sink, slot, variant, fed, forks: Vec::new() });
                if done || !listening {
                    finished.push(self.running.len() - 1);
                }
            }
            let r = &mut self.running[p.index];
            let event = if finite { r.seq.accept_logits(row) } else { non_finite(&mut r.seq) };
            let done = r.seq.is_done() || event.is_err();
            if !send(&mut r.sink, event) && !done {
                r.seq.cancel_handle().cancel(); // nobody listens: finish (and free the slot) now
                finished.push(p.index);
            } else if done {
                finished.push(p.index);
            }
        }
        finished.sort_unstable();
        finished.dedup();
        for i in finished.into_iter().rev() {
            self.retire(i);
        }
    }

    /// Ends every running sequence with an error derived from `e`.
    fn fail_all(&mut self, e: Error) {
        let reason = e.to_string();
        let mut first = Some(e);
        for r in &mut self.running {
            r.seq.fail();
            let err = first.take().unwrap_or_else(|| Error::StepFailed { reason: reason.clone() });
            send(&mut r.sink, Err(err));
        }
        while !self.running.is_empty() {
            let slot = self.running[self.running.len() - 1].slot;
            self.pool.reset(slot);
            self.retire(self.running.len() - 1);
            self.held[slot].clear();
        }
    }
}

/// Fails `seq`, whose logits row holds NaN or ±Inf: only this sequence (and its forks) stop; the
/// others of the batch continue.
fn non_finite(seq: &mut Sequence) -> Result<Event> {
    seq.fail();
    Err(Error::NonFinite { what: "logits", position: seq.tokens().len().saturating_sub(1) })
}

/// A row of the step being built: running sequence `index` feeds `len` tokens.
struct PlannedRow {
    index: usize,
    len: usize,
    variant: usize,
    logits: RowLogits,
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

fn send(sink: &mut Sink, event: Result<Event>) -> bool {
    sink(event)
}

/// A sink collecting events in a shared queue (the one-sequence driver).
pub(crate) fn queue_sink(queue: Arc<std::sync::Mutex<VecDeque<Result<Event>>>>) -> Sink {
    Box::new(move |event| {
        queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push_back(event);
        true
    })
}
