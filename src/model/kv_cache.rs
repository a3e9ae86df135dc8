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
    pub k: Tensor, // (b, n_kv, kv_len, hd)
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

/// The caches of every layer of one sequence. Not `Clone` (buffers are written in place); use
/// [`KvCache::deep_clone`] to fork a sequence.
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<LayerCache>,
}

impl KvCache {
    /// One cache per layer; `windows[i]` is layer i's sliding window.
    pub fn new(windows: &[Option<usize>], max_positions: usize) -> Self {
        Self {
            layers: windows.iter().map(|w| LayerCache::new(*w, max_positions)).collect(),
        }
    }

    /// Tokens the cache holds (the position of the next token).
    pub fn seq_len(&self) -> usize {
        self.layers.first().map_or(0, LayerCache::seq_len)
    }

    /// Keeps the first `len` positions of every layer, so a new sequence sharing that prefix can
    /// continue from it. Returns `false` and changes nothing when a layer cannot rewind (a
    /// sliding-window ring that has wrapped, or `len` > [`KvCache::seq_len`]); reset and prefill
    /// again then.
    pub fn truncate(&mut self, len: usize) -> bool {
        if !self.layers.iter().all(|l| l.can_truncate(len)) {
            return false;
        }
        self.layers.iter_mut().all(|l| l.truncate(len))
    }

    /// An independent copy: the buffers are copied, so writes to one never show in the other.
    pub fn deep_clone(&self) -> Result<Self> {
        let layers = self.layers.iter().map(LayerCache::deep_clone).collect::<Result<Vec<_>>>()?;
        Ok(Self { layers })
    }

    /// Forgets everything (buffers are dropped).
    pub fn reset(&mut self) {
        for layer in &mut self.layers {
            *layer = LayerCache::new(layer.window, layer.max_positions);
        }
    }

    pub(crate) fn layer_mut(&mut self, i: usize) -> Option<&mut LayerCache> {
        self.layers.get_mut(i)
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
        for (i, layer) in c.layers.iter_mut().enumerate() {
            layer.append(&seq(3, 0), &seq(3, 0)).unwrap_or_else(|e| panic!("layer {i}: {e}"));
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
