//! Preallocated key/value caches, one per layer, owned outside the layers.
//!
//! A full-attention layer writes into a buffer that grows geometrically (no `Tensor::cat` per
//! step). A sliding-window layer keeps a ring of `window` slots: a decode step writes its key over
//! the slot of the position that just left the window, then attends over the ring.

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// First allocation of a full-attention buffer, in positions.
const INITIAL_CAPACITY: usize = 256;

/// Keys/values to attend over for one step, and the mask to apply.
pub struct AttendKv {
    /// Keys, (b, n_kv, kv_len, hd).
    pub k: Tensor, // (b, n_kv, kv_len, hd)
    /// Values, (b, n_kv, kv_len, hd).
    pub v: Tensor, // (b, n_kv, kv_len, hd)
    /// Additive mask (t, kv_len) with -inf at masked entries, or `None` when every key is visible.
    pub mask: Option<Tensor>,
}

#[derive(Debug)]
enum Storage {
    Full { k: Tensor, v: Tensor, capacity: usize },
    Ring { k: Tensor, v: Tensor },
}

/// The cache of one attention layer. Not `Clone`: buffers are written in place, so a shallow
/// copy would alias them; use [`KvCache::deep_clone`].
#[derive(Debug)]
pub struct LayerCache {
    window: Option<usize>,
    max_positions: usize,
    /// Tokens seen so far (also the position of the next token).
    seen: usize,
    storage: Option<Storage>,
}

impl LayerCache {
    fn deep_clone(&self) -> Result<Self> {
        let storage = match &self.storage {
            None => None,
            Some(Storage::Full { k, v, capacity }) => Some(Storage::Full {
                k: k.copy()?,
                v: v.copy()?,
                capacity: *capacity,
            }),
            Some(Storage::Ring { k, v }) => Some(Storage::Ring { k: k.copy()?, v: v.copy()? }),
        };
        Ok(Self {
            window: self.window,
            max_positions: self.max_positions,
            seen: self.seen,
            storage,
        })
    }

    /// An empty cache; `window` keeps only the last positions (sliding window), `max_positions` bounds growth.
    pub fn new(window: Option<usize>, max_positions: usize) -> Self {
        Self {
            window,
            max_positions,
            seen: 0,
            storage: None,
        }
    }

    /// Tokens seen so far.
    pub fn seq_len(&self) -> usize {
        self.seen
    }

    /// Bytes of the key and value buffers allocated so far.
    pub fn allocated_bytes(&self) -> usize {
        let bytes = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        match &self.storage {
            None => 0,
            Some(Storage::Full { k, v, .. } | Storage::Ring { k, v }) => bytes(k) + bytes(v),
        }
    }

    /// Whether [`LayerCache::truncate`] to `len` would succeed: `len` ≤ tokens seen, and for a
    /// sliding-window ring no slot has been overwritten yet.
    pub fn can_truncate(&self, len: usize) -> bool {
        len <= self.seen && self.window.is_none_or(|w| self.seen <= w)
    }

    /// Keeps the first `len` positions (later appends overwrite the rest). Returns `false`, leaving
    /// the cache unchanged, when [`LayerCache::can_truncate`] is false.
    pub fn truncate(&mut self, len: usize) -> bool {
        if !self.can_truncate(len) {
            return false;
        }
        self.seen = len;
        true
    }

    /// Appends `k`/`v` (b, n_kv, t, hd), contiguous, at position `seq_len()`, and returns what the
    /// new queries attend to.
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<AttendKv> {
        let t = k.dim(2)?;
        let offset = self.seen;
        let end = offset + t;
        if end > self.max_positions {
            return Err(Error::ContextOverflow {
                prompt_tokens: end,
                context: self.max_positions,
            });
        }
        let out = match self.window {
            None => self.append_full(k, v)?,
            Some(w) => self.append_ring(k, v, w)?,
        };
        self.seen = end;
        Ok(out)
    }

    fn append_full(&mut self, k: &Tensor, v: &Tensor) -> Result<AttendKv> {
        let t = k.dim(2)?;
        let (offset, end) = (self.seen, self.seen + t);
        let needed = end;
        let grow = match &self.storage {
            Some(Storage::Full { capacity, .. }) => *capacity < needed,
            _ => true,
        };
        if grow {
            let old_cap = match &self.storage {
                Some(Storage::Full { capacity, .. }) => *capacity,
                _ => 0,
            };
            let capacity = needed.max(old_cap * 2).max(INITIAL_CAPACITY).min(self.max_positions);
            let (nk, nv) = (alloc(k, capacity)?, alloc(v, capacity)?);
            if let Some(Storage::Full { k: ok, v: ov, .. }) = &self.storage {
                if offset > 0 {
                    nk.slice_set(&ok.narrow(2, 0, offset)?.contiguous()?, 2, 0)?;
                    nv.slice_set(&ov.narrow(2, 0, offset)?.contiguous()?, 2, 0)?;
                }
            }
            self.storage = Some(Storage::Full { k: nk, v: nv, capacity });
        }
        let Some(Storage::Full { k: ck, v: cv, .. }) = &self.storage else {
            return Err(candle_core::Error::Msg("kv cache: storage kind changed".into()).into());
        };
        ck.slice_set(k, 2, offset)?;
        cv.slice_set(v, 2, offset)?;
        let mask = if t > 1 {
            Some(build_mask(offset, t, 0, end, None, k.device(), k.dtype())?)
        } else {
            None
        };
        Ok(AttendKv {
            k: ck.narrow(2, 0, end)?,
            v: cv.narrow(2, 0, end)?,
            mask,
        })
    }

    fn append_ring(&mut self, k: &Tensor, v: &Tensor, window: usize) -> Result<AttendKv> {
        let t = k.dim(2)?;
        let offset = self.seen;
        if self.storage.is_none() {
            self.storage = Some(Storage::Ring {
                k: alloc(k, window)?,
                v: alloc(v, window)?,
            });
        }
        let Some(Storage::Ring { k: rk, v: rv, .. }) = &self.storage else {
            return Err(candle_core::Error::Msg("kv cache: storage kind changed".into()).into());
        };
        if t == 1 {
            // The slot being overwritten holds position offset - window, which the new query
            // (at `offset`) no longer sees.
            write_ring(rk, k, offset, window)?;
            write_ring(rv, v, offset, window)?;
            let filled = (offset + 1).min(window);
            return Ok(AttendKv {
                k: rk.narrow(2, 0, filled)?,
                v: rv.narrow(2, 0, filled)?,
                mask: None,
            });
        }
        // Several new tokens: attend over the cached window (in position order) plus all new keys,
        // then keep the last `window` positions in the ring.
        let first_cached = offset.saturating_sub(window);
        let (kk, vv) = if offset == 0 {
            (k.clone(), v.clone())
        } else {
            let (ok, ov) = (ring_in_order(rk, first_cached, offset, window)?, ring_in_order(rv, first_cached, offset, window)?);
            (Tensor::cat(&[&ok, k], 2)?, Tensor::cat(&[&ov, v], 2)?)
        };
        let mask = build_mask(offset, t, first_cached, offset + t, Some(window), k.device(), k.dtype())?;
        let keep = t.min(window);
        let tail_start = t - keep;
        write_ring(rk, &k.narrow(2, tail_start, keep)?.contiguous()?, offset + tail_start, window)?;
        write_ring(rv, &v.narrow(2, tail_start, keep)?.contiguous()?, offset + tail_start, window)?;
        Ok(AttendKv { k: kk, v: vv, mask: Some(mask) })
    }
}

fn alloc(like: &Tensor, capacity: usize) -> Result<Tensor> {
    let (b, n_kv, _, hd) = like.dims4()?;
    Ok(Tensor::zeros((b, n_kv, capacity, hd), like.dtype(), like.device())?)
}

/// Writes `src` (b, n_kv, n, hd), n ≤ window, holding positions `pos..pos+n`, into ring slots
/// `pos % window ..`, wrapping around.
fn write_ring(ring: &Tensor, src: &Tensor, pos: usize, window: usize) -> Result<()> {
    let n = src.dim(2)?;
    let slot = pos % window;
    let first = n.min(window - slot);
    ring.slice_set(&src.narrow(2, 0, first)?.contiguous()?, 2, slot)?;
    if first < n {
        ring.slice_set(&src.narrow(2, first, n - first)?.contiguous()?, 2, 0)?;
    }
    Ok(())
}

/// Positions `from..to` (to - from ≤ window) read out of the ring in position order.
fn ring_in_order(ring: &Tensor, from: usize, to: usize, window: usize) -> Result<Tensor> {
    let n = to - from;
    let slot = from % window;
    let first = n.min(window - slot);
    let head = ring.narrow(2, slot, first)?;
    if first == n {
        return Ok(head);
    }
    Ok(Tensor::cat(&[&head, &ring.narrow(2, 0, n - first)?], 2)?)
}

/// Additive mask (t, kv_len) for queries at `q_start..q_start+t` over keys at `k_start..k_end`:
/// causal, and with a window `w` a query at p sees keys p-w+1..=p (HF `sliding_window_overlay`).
pub fn build_mask(
    q_start: usize,
    t: usize,
    k_start: usize,
    k_end: usize,
    window: Option<usize>,
    device: &Device,
    dtype: DType,
) -> Result<Tensor> {
    let kv_len = k_end - k_start;
    let mut data = Vec::with_capacity(t * kv_len);
    for i in 0..t {
        let q = q_start + i;
        for kpos in k_start..k_end {
            let visible = kpos <= q && window.is_none_or(|w| q - kpos < w);
            data.push(if visible { 0f32 } else { f32::NEG_INFINITY });
        }
    }
    Ok(Tensor::from_vec(data, (t, kv_len), device)?.to_dtype(dtype)?)
}

/// The per-layer caches of one sequence.
#[derive(Debug)]
struct SlotCache {
    layers: Vec<LayerCache>,
}

impl SlotCache {
    fn new(windows: &[Option<usize>], capacity: usize) -> Self {
        Self { layers: windows.iter().map(|w| LayerCache::new(*w, capacity)).collect() }
    }

    fn seq_len(&self) -> usize {
        self.layers.first().map_or(0, LayerCache::seq_len)
    }

    fn truncate(&mut self, len: usize) -> bool {
        if !self.layers.iter().all(|l| l.can_truncate(len)) {
            return false;
        }
        self.layers.iter_mut().all(|l| l.truncate(len))
    }

    fn reset(&mut self) {
        for layer in &mut self.layers {
            *layer = LayerCache::new(layer.window, layer.max_positions);
        }
    }

    fn deep_clone(&self) -> Result<Self> {
        Ok(Self { layers: self.layers.iter().map(LayerCache::deep_clone).collect::<Result<Vec<_>>>()? })
    }
}

/// A pool of KV slots: one slot per running sequence, each holding every layer's keys/values for
/// up to `capacity` positions (a ring of `window` positions for sliding-window layers). Buffers
/// are allocated on first write and grow geometrically up to `capacity`, so an idle pool costs
/// nothing and a short sequence never pays for the longest.
///
/// A slot is claimed by the engine for a sequence and released when it ends; a released slot keeps
/// its contents, so a later sequence sharing a prefix with it continues from there
/// ([`KvPool::truncate`]). Pools are tied to the model (and window setting) that made them:
/// [`crate::Model::forward_batch`] refuses another model's pool with [`Error::KvPoolMismatch`].
#[derive(Debug)]
pub struct KvPool {
    slots: Vec<SlotCache>,
    in_use: Vec<bool>,
    windows: Vec<Option<usize>>,
    capacity: usize,
    /// [`crate::Model::uid`] of the model this pool belongs to (`None`: any model with these windows).
    owner: Option<u64>,
}

impl KvPool {
    /// `n_slots` empty slots for layers with sliding windows `windows[i]`, each holding at most
    /// `capacity` positions.
    pub fn new(windows: &[Option<usize>], n_slots: usize, capacity: usize) -> Self {
        Self {
            slots: (0..n_slots).map(|_| SlotCache::new(windows, capacity)).collect(),
            in_use: vec![false; n_slots],
            windows: windows.to_vec(),
            capacity,
            owner: None,
        }
    }

    pub(crate) fn with_owner(mut self, owner: u64) -> Self {
        self.owner = Some(owner);
        self
    }

    /// Number of slots.
    pub fn n_slots(&self) -> usize {
        self.slots.len()
    }

    /// Bytes of key/value buffers allocated in every slot so far (buffers grow with use; see
    /// [`KvPool`]).
    pub fn allocated_bytes(&self) -> usize {
        self.slots.iter().flat_map(|s| &s.layers).map(LayerCache::allocated_bytes).sum()
    }

    /// Most positions one slot holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The sliding window of each layer.
    pub fn windows(&self) -> &[Option<usize>] {
        &self.windows
    }

    /// Whether `slot` is claimed by a sequence.
    pub fn in_use(&self, slot: usize) -> bool {
        self.in_use.get(slot).copied().unwrap_or(false)
    }

    /// Slots no sequence holds.
    pub fn free_slots(&self) -> impl Iterator<Item = usize> + '_ {
        self.in_use.iter().enumerate().filter(|(_, u)| !**u).map(|(i, _)| i)
    }

    /// Claims a free slot, keeping its contents (see [`KvPool::truncate`] / [`KvPool::reset`]).
    /// Errors: [`Error::KvSlot`] if it does not exist or is in use.
    pub fn claim(&mut self, slot: usize) -> Result<()> {
        match self.in_use.get_mut(slot) {
            Some(u) if !*u => {
                *u = true;
                Ok(())
            }
            _ => Err(Error::KvSlot { slot, reason: "does not exist or is in use" }),
        }
    }

    /// Releases `slot`; its contents stay for prefix reuse until it is claimed and changed.
    pub fn release(&mut self, slot: usize) {
        if let Some(u) = self.in_use.get_mut(slot) {
            *u = false;
        }
    }

    /// Positions `slot` holds (the position of its next token); 0 for a slot that does not exist.
    pub fn seq_len(&self, slot: usize) -> usize {
        self.slots.get(slot).map_or(0, SlotCache::seq_len)
    }

    /// Keeps the first `len` positions of `slot`. Returns `false`, changing nothing, when a layer
    /// cannot rewind (a sliding-window ring that has wrapped, or `len` > [`KvPool::seq_len`]).
    pub fn truncate(&mut self, slot: usize, len: usize) -> bool {
        self.slots.get_mut(slot).is_some_and(|s| s.truncate(len))
    }

    /// Empties `slot` (its buffers are dropped).
    pub fn reset(&mut self, slot: usize) {
        if let Some(s) = self.slots.get_mut(slot) {
            s.reset();
        }
    }

    /// Copies the contents of `src` into `dst` (for `n > 1`: one prefill, several continuations).
    /// The copy is independent: later writes to either never show in the other.
    /// Errors: [`Error::KvSlot`] for a slot that does not exist.
    pub fn fork(&mut self, src: usize, dst: usize) -> Result<()> {
        let copy = self.slots.get(src).ok_or(Error::KvSlot { slot: src, reason: "does not exist" })?.deep_clone()?;
        let d = self.slots.get_mut(dst).ok_or(Error::KvSlot { slot: dst, reason: "does not exist" })?;
        *d = copy;
        Ok(())
    }

    /// Checks that this pool fits a model with `uid` and layer `windows`.
    pub(crate) fn check_fits(&self, uid: u64, windows: &[Option<usize>]) -> Result<()> {
        if self.windows != windows {
            return Err(Error::KvPoolMismatch {
                reason: format!("pool made for layer windows {:?}, model has {:?}", self.windows, windows),
            });
        }
        if self.owner.is_some_and(|o| o != uid) {
            return Err(Error::KvPoolMismatch { reason: "pool made by another model".into() });
        }
        Ok(())
    }

    pub(crate) fn layer_mut(&mut self, slot: usize, layer: usize) -> Option<&mut LayerCache> {
        self.slots.get_mut(slot)?.layers.get_mut(layer)
    }

    fn deep_clone(&self) -> Result<Self> {
        Ok(Self {
            slots: self.slots.iter().map(SlotCache::deep_clone).collect::<Result<Vec<_>>>()?,
            in_use: self.in_use.clone(),
            windows: self.windows.clone(),
            capacity: self.capacity,
            owner: self.owner,
        })
    }
}

/// The cache of one call of [`crate::Model::forward`]: a [`KvPool`] whose slots are the rows of
/// that call's batch (one slot for the usual single sequence). The batch size is fixed by the
/// first forward. Not `Clone` (buffers are written in place); use [`KvCache::deep_clone`] to fork
/// a sequence.
#[derive(Debug)]
pub struct KvCache {
    pool: KvPool,
}

impl KvCache {
    /// An empty cache; `windows[i]` is layer i's sliding window, `max_positions` the most positions
    /// it holds.
    pub fn new(windows: &[Option<usize>], max_positions: usize) -> Self {
        Self { pool: KvPool::new(windows, 0, max_positions) }
    }

    pub(crate) fn with_owner(windows: &[Option<usize>], max_positions: usize, owner: u64) -> Self {
        Self { pool: KvPool::new(windows, 0, max_positions).with_owner(owner) }
    }

    /// Tokens the cache holds (the position of the next token).
    pub fn seq_len(&self) -> usize {
        self.pool.seq_len(0)
    }

    /// Bytes of key/value buffers allocated so far.
    pub fn allocated_bytes(&self) -> usize {
        self.pool.allocated_bytes()
    }

    /// Keeps the first `len` positions of every layer, so a new sequence sharing that prefix can
    /// continue from it. Returns `false` and changes nothing when a layer cannot rewind (a
    /// sliding-window ring that has wrapped, or `len` > [`KvCache::seq_len`]); reset and prefill
    /// again then.
    pub fn truncate(&mut self, len: usize) -> bool {
        let n = self.pool.n_slots();
        if !(0..n).all(|s| self.pool.slots[s].layers.iter().all(|l| l.can_truncate(len))) {
            return false;
        }
        (0..n).all(|s| self.pool.truncate(s, len))
    }

    /// An independent copy: the buffers are copied, so writes to one never show in the other.
    pub fn deep_clone(&self) -> Result<Self> {
        Ok(Self { pool: self.pool.deep_clone()? })
    }

    /// Forgets everything (buffers are dropped).
    pub fn reset(&mut self) {
        for s in 0..self.pool.n_slots() {
            self.pool.reset(s);
        }
    }

    /// The pool behind the cache, with `rows` slots (created on the first call; a later call with
    /// another count is an error).
    pub(crate) fn pool_for_rows(&mut self, rows: usize) -> Result<&mut KvPool> {
        if self.pool.n_slots() == 0 {
            let windows = self.pool.windows.clone();
            self.pool.slots = (0..rows).map(|_| SlotCache::new(&windows, self.pool.capacity)).collect();
            self.pool.in_use = vec![false; rows];
        }
        if self.pool.n_slots() != rows {
            return Err(Error::KvPoolMismatch {
                reason: format!("cache holds a batch of {} sequences, this call has {rows}", self.pool.n_slots()),
            });
        }
        Ok(&mut self.pool)
    }

    /// The pool, for a one-sequence driver of the engine.
    pub(crate) fn into_pool(self) -> KvPool {
        self.pool
    }

    /// A cache over slot 0 of `pool` (the pool's other slots are dropped).
    pub(crate) fn from_slot(mut pool: KvPool, slot: usize) -> Self {
        let one = if slot < pool.slots.len() { pool.slots.swap_remove(slot) } else { SlotCache::new(&pool.windows, pool.capacity) };
        Self {
            pool: KvPool { slots: vec![one], in_use: vec![false], windows: pool.windows, capacity: pool.capacity, owner: pool.owner },
        }
    }

    #[cfg(test)]
    fn layer_mut(&mut self, i: usize) -> Option<&mut LayerCache> {
        self.pool_for_rows(1).ok()?.layer_mut(0, i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(t: usize, start: usize) -> Tensor {
        // (1, 1, t, 1) holding the positions themselves.
        let v: Vec<f32> = (start..start + t).map(|p| p as f32).collect();
        Tensor::from_vec(v, (1, 1, t, 1), &Device::Cpu).unwrap()
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn deep_clones_do_not_alias() {
        let mut a = KvCache::new(&[None, Some(4)], 100);
        for layer in 0..2 {
            a.layer_mut(layer).unwrap().append(&seq(3, 0), &seq(3, 0)).unwrap();
        }
        let mut b = a.deep_clone().unwrap();
        // Writing position 3 in `b` must not show in `a`'s buffers.
        let zeros = Tensor::zeros((1, 1, 1, 1), DType::F32, &Device::Cpu).unwrap();
        let from_b = b.layer_mut(0).unwrap().append(&zeros, &zeros).unwrap();
        let from_a = a.layer_mut(0).unwrap().append(&seq(1, 3), &seq(1, 3)).unwrap();
        assert_eq!(values(&from_a.k), vec![0.0, 1.0, 2.0, 3.0]);
        assert_eq!(values(&from_b.k), vec![0.0, 1.0, 2.0, 0.0]);
    }

    #[test]
    fn full_cache_grows_and_keeps_order() {
        let mut c = LayerCache::new(None, 1000);
        let out = c.append(&seq(300, 0), &seq(300, 0)).unwrap();
        assert_eq!(out.k.dim(2).unwrap(), 300);
        let out = c.append(&seq(1, 300), &seq(1, 300)).unwrap();
        assert_eq!(values(&out.k), (0..301).map(|p| p as f32).collect::<Vec<_>>());
        assert!(out.mask.is_none());
        assert!(matches!(c.append(&seq(700, 301), &seq(700, 301)), Err(Error::ContextOverflow { .. })));
    }

    #[test]
    fn truncate_rewinds_full_caches_and_unwrapped_rings() {
        let mut c = KvCache::new(&[None, Some(4)], 100);
        for i in 0..2 {
            c.layer_mut(i).unwrap().append(&seq(3, 0), &seq(3, 0)).unwrap_or_else(|e| panic!("layer {i}: {e}"));
        }
        assert!(c.truncate(1));
        assert_eq!(c.seq_len(), 1);
        let out = c.layer_mut(0).unwrap().append(&seq(2, 1), &seq(2, 1)).unwrap();
        assert_eq!(values(&out.k), vec![0.0, 1.0, 2.0]);
        assert!(!c.truncate(5), "cannot grow");
        let mut ring = LayerCache::new(Some(2), 100);
        ring.append(&seq(3, 0), &seq(3, 0)).unwrap();
        assert!(!ring.truncate(1), "a wrapped ring cannot rewind");
        assert_eq!(ring.seq_len(), 3);
    }

    #[test]
    fn ring_cache_keeps_the_window() {
        let mut c = LayerCache::new(Some(4), 1000);
        let out = c.append(&seq(6, 0), &seq(6, 0)).unwrap();
        assert_eq!(out.k.dim(2).unwrap(), 6);
        // Decode at position 6 sees 3..=6.
        let out = c.append(&seq(1, 6), &seq(1, 6)).unwrap();
        let mut got = values(&out.k);
        got.sort_by(f32::total_cmp);
        assert_eq!(got, vec![3.0, 4.0, 5.0, 6.0]);
        // A multi-token step after that sees the cached window in order plus the new keys.
        let out = c.append(&seq(2, 7), &seq(2, 7)).unwrap();
        assert_eq!(values(&out.k), vec![3.0, 4.0, 5.0, 6.0, 7.0, 8.0]);
        let mask = out.mask.unwrap().to_vec2::<f32>().unwrap();
        // Query 7 sees 4..=7; query 8 sees 5..=8.
        let visible: Vec<Vec<bool>> = mask.iter().map(|r| r.iter().map(|m| *m == 0.0).collect()).collect();
        assert_eq!(visible[0], vec![false, true, true, true, true, false]);
        assert_eq!(visible[1], vec![false, false, true, true, true, true]);
    }
}
