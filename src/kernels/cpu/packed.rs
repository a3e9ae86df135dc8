//! The interleaved 8-row layout of the 32-value block types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) and
//! of Q4_K (its 8 sub-blocks of 32 values each in the Q4_0 arrangement, see [`Q4K_UNIT`]).
//!
//! GGML stores a matrix row by row. The SIMD kernels want the same block of 8 consecutive rows
//! side by side, so that one 256-bit register holds 4 values of each of the 8 rows and one
//! `vpdpbusd` against 4 broadcast activations yields a partial dot for all 8 rows at once — no
//! horizontal sums, and the 8 rows' scales load as one vector. Rows are repacked once at load;
//! a matrix whose row count is not a multiple of 8 keeps its last rows in GGML order.
//!
//! Per group of 8 rows and block b (32 values; element e of row r):
//!
//! | part | bytes | content |
//! |------|-------|---------|
//! | d    | 16    | 8 × f16, row r at 2r |
//! | m    | 16    | 8 × f16 (Q4_1, Q5_1 only) |
//! | qh   | 32    | 8 × u32 (Q5 only): word g, bit 4r + t = fifth bit of element 4g + t |
//! | qs   | 128   | 4-bit: byte 32p + 4r + t = element 4p + t (low nibble), 16 + 4p + t (high) |
//! | qs   | 256   | Q8_0: byte 32g + 4r + t = element 4g + t (i8) |
//!
//! Groups are stored one after another, each with its blocks in order.

use rayon::prelude::*;

use super::blocks::{nibble, CpuQuant};

/// Rows interleaved per group.
pub const GROUP_ROWS: usize = 8;

/// One 32-value block taken apart: scale bits, min bits, and the 32 integer values (4/5-bit
/// unsigned, or Q8_0's i8 as u8).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SmallBlock {
    /// The block scale (f16 bytes).
    pub d: [u8; 2],
    /// The block minimum (f16 bytes; zero for the types without one).
    pub m: [u8; 2],
    /// The 32 integer values, one per byte.
    pub q: [u8; 32],
}

/// Whether the type uses this layout.
pub fn packable(q: CpuQuant) -> bool {
    matches!(
        q,
        CpuQuant::Q4_0 | CpuQuant::Q4_1 | CpuQuant::Q5_0 | CpuQuant::Q5_1 | CpuQuant::Q8_0 | CpuQuant::Q4K
    )
}

/// Bytes of one packed unit: one GGML block (32 or 256 values) of each of 8 rows.
pub fn unit_bytes(q: CpuQuant) -> usize {
    match q {
        CpuQuant::Q4K => Q4K_UNIT,
        _ => offsets(q).3,
    }
}

/// Q4_K unit: d (8 × f16), dmin (8 × f16), scales `[sub-block j][row]` (64 × u8), mins likewise,
/// then per sub-block j the 32 4-bit values of the 8 rows in the Q4_0 arrangement (8 × 128).
pub const Q4K_UNIT: usize = 16 + 16 + 64 + 64 + 8 * 128;
/// Offset of the scales inside a Q4_K unit.
pub const Q4K_SC: usize = 32;
/// Offset of the mins inside a Q4_K unit.
pub const Q4K_MN: usize = 96;
/// Offset of the 4-bit values inside a Q4_K unit.
pub const Q4K_QS: usize = 160;

/// Packs the 32 4-bit values of 8 rows (`vals[r][e]`) in the Q4_0 arrangement.
fn pack_nibbles(vals: &[[u8; 32]; GROUP_ROWS], out: &mut Vec<u8>) {
    for p in 0..4 {
        for v in vals {
            for t in 0..4 {
                out.push((v[4 * p + t] & 15) | ((v[16 + 4 * p + t] & 15) << 4));
            }
        }
    }
}

/// Value e of row r from a Q4_0-arranged 128-byte nibble block.
fn nibble_at(bytes: &[u8], r: usize, e: usize) -> u8 {
    let byte = bytes[32 * ((e % 16) / 4) + 4 * r + e % 4];
    if e >= 16 { byte >> 4 } else { byte & 15 }
}

fn pack_q4k(rows: &[&[u8]; GROUP_ROWS], out: &mut Vec<u8>) {
    for part in [0, 2] {
        for r in rows {
            out.extend_from_slice(&r[part..part + 2]);
        }
    }
    let sm: Vec<[(u8, u8); 8]> = rows
        .iter()
        .map(|r| std::array::from_fn(|j| super::blocks::scale_min_k4(j, &r[4..16])))
        .collect();
    for pick in [0, 1] {
        for j in 0..8 {
            for row in &sm {
                out.push(if pick == 0 { row[j].0 } else { row[j].1 });
            }
        }
    }
    for j in 0..8 {
        let vals: [[u8; 32]; GROUP_ROWS] = std::array::from_fn(|r| {
            std::array::from_fn(|l| (rows[r][16 + 32 * (j / 2) + l] >> (4 * (j % 2))) & 15)
        });
        pack_nibbles(&vals, out);
    }
}

/// Row `r`'s GGML Q4_K block from a packed unit (the inverse of `pack_q4k`).
fn unpack_q4k(unit: &[u8], r: usize, out: &mut Vec<u8>) {
    out.extend_from_slice(&unit[2 * r..2 * r + 2]);
    out.extend_from_slice(&unit[16 + 2 * r..16 + 2 * r + 2]);
    let sc = |j: usize| unit[Q4K_SC + 8 * j + r];
    let mn = |j: usize| unit[Q4K_MN + 8 * j + r];
    let mut s = [0u8; 12];
    for j in 0..4 {
        s[j] = (sc(j) & 63) | ((sc(j + 4) >> 4) << 6);
        s[j + 4] = (mn(j) & 63) | ((mn(j + 4) >> 4) << 6);
        s[j + 8] = (sc(j + 4) & 15) | ((mn(j + 4) & 15) << 4);
    }
    out.extend_from_slice(&s);
    for g in 0..4 {
        let (lo, hi) = (&unit[Q4K_QS + 128 * (2 * g)..], &unit[Q4K_QS + 128 * (2 * g + 1)..]);
        out.extend((0..32).map(|l| nibble_at(lo, r, l) | (nibble_at(hi, r, l) << 4)));
    }
}

fn has_min(q: CpuQuant) -> bool {
    matches!(q, CpuQuant::Q4_1 | CpuQuant::Q5_1)
}

fn has_qh(q: CpuQuant) -> bool {
    matches!(q, CpuQuant::Q5_0 | CpuQuant::Q5_1)
}

/// Byte offsets of (m, qh, qs) inside one packed block of 8 rows, and its size.
pub fn offsets(q: CpuQuant) -> (usize, usize, usize, usize) {
    let m = 16;
    let qh = m + if has_min(q) { 16 } else { 0 };
    let qs = qh + if has_qh(q) { 32 } else { 0 };
    let size = qs + if q == CpuQuant::Q8_0 { 256 } else { 128 };
    (m, qh, qs, size)
}

/// Parses one GGML block.
pub fn parse(q: CpuQuant, blk: &[u8]) -> SmallBlock {
    let mut b = SmallBlock { d: [blk[0], blk[1]], ..Default::default() };
    let (qs, qh) = match q {
        CpuQuant::Q4_0 => (&blk[2..18], None),
        CpuQuant::Q4_1 => (&blk[4..20], None),
        CpuQuant::Q5_0 => (&blk[6..22], Some(u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]))),
        CpuQuant::Q5_1 => (&blk[8..24], Some(u32::from_le_bytes([blk[4], blk[5], blk[6], blk[7]]))),
        _ => {
            b.q.copy_from_slice(&blk[2..34]);
            return b;
        }
    };
    if has_min(q) {
        b.m = [blk[2], blk[3]];
    }
    for (j, v) in b.q.iter_mut().enumerate() {
        *v = nibble(qs, j) | qh.map_or(0, |h| (((h >> j) & 1) << 4) as u8);
    }
    b
}

/// Writes one GGML block (the inverse of [`parse`]).
pub fn emit(q: CpuQuant, b: &SmallBlock, out: &mut Vec<u8>) {
    out.extend_from_slice(&b.d);
    if q == CpuQuant::Q8_0 {
        out.extend_from_slice(&b.q);
        return;
    }
    if has_min(q) {
        out.extend_from_slice(&b.m);
    }
    if has_qh(q) {
        let qh = b.q.iter().enumerate().fold(0u32, |h, (j, v)| h | (((v >> 4) as u32 & 1) << j));
        out.extend_from_slice(&qh.to_le_bytes());
    }
    out.extend((0..16).map(|j| (b.q[j] & 15) | ((b.q[j + 16] & 15) << 4)));
}

/// Appends the packed form of block `b` of 8 rows.
pub fn pack(q: CpuQuant, rows: &[SmallBlock; GROUP_ROWS], out: &mut Vec<u8>) {
    for r in rows {
        out.extend_from_slice(&r.d);
    }
    if has_min(q) {
        for r in rows {
            out.extend_from_slice(&r.m);
        }
    }
    if has_qh(q) {
        for g in 0..8 {
            let mut word = 0u32;
            for (r, row) in rows.iter().enumerate() {
                for t in 0..4 {
                    word |= (((row.q[4 * g + t] >> 4) & 1) as u32) << (4 * r + t);
                }
            }
            out.extend_from_slice(&word.to_le_bytes());
        }
    }
    if q == CpuQuant::Q8_0 {
        for g in 0..8 {
            for row in rows {
                out.extend_from_slice(&row.q[4 * g..4 * g + 4]);
            }
        }
    } else {
        for p in 0..4 {
            for row in rows {
                for t in 0..4 {
                    out.push((row.q[4 * p + t] & 15) | ((row.q[16 + 4 * p + t] & 15) << 4));
                }
            }
        }
    }
}

/// The 8 blocks of one packed block (the inverse of [`pack`]).
pub fn unpack(q: CpuQuant, bytes: &[u8]) -> [SmallBlock; GROUP_ROWS] {
    let (mo, qho, qso, _) = offsets(q);
    let mut rows = [SmallBlock::default(); GROUP_ROWS];
    for (r, row) in rows.iter_mut().enumerate() {
        row.d = [bytes[2 * r], bytes[2 * r + 1]];
        if has_min(q) {
            row.m = [bytes[mo + 2 * r], bytes[mo + 2 * r + 1]];
        }
        for e in 0..32 {
            row.q[e] = if q == CpuQuant::Q8_0 {
                bytes[qso + 32 * (e / 4) + 4 * r + e % 4]
            } else {
                let (p, hi) = ((e % 16) / 4, e >= 16);
                let byte = bytes[qso + 32 * p + 4 * r + e % 4];
                let v = if hi { byte >> 4 } else { byte & 15 };
                let fifth = if has_qh(q) {
                    let g = e / 4;
                    let w = u32::from_le_bytes([
                        bytes[qho + 4 * g],
                        bytes[qho + 4 * g + 1],
                        bytes[qho + 4 * g + 2],
                        bytes[qho + 4 * g + 3],
                    ]);
                    (((w >> (4 * r + e % 4)) & 1) as u8) << 4
                } else {
                    0
                };
                v | fifth
            };
        }
    }
    rows
}

/// Repacks the first `n / 8 · 8` rows of a row-major GGML matrix; returns (packed, tail rows in
/// GGML order).
pub fn pack_matrix(q: CpuQuant, data: &[u8], n: usize, k: usize) -> (Vec<u8>, Vec<u8>) {
    let nb = k / q.block_values();
    let bb = q.block_bytes();
    let rb = nb * bb;
    let groups = n / GROUP_ROWS;
    let size = unit_bytes(q);
    let mut packed = vec![0u8; groups * nb * size];
    packed.par_chunks_mut(nb * size).enumerate().for_each(|(g, out)| {
        let mut buf = Vec::with_capacity(nb * size);
        for b in 0..nb {
            let raw: [&[u8]; GROUP_ROWS] = std::array::from_fn(|r| {
                let off = (g * GROUP_ROWS + r) * rb + b * bb;
                &data[off..off + bb]
            });
            if q == CpuQuant::Q4K {
                pack_q4k(&raw, &mut buf);
            } else {
                pack(q, &raw.map(|blk| parse(q, blk)), &mut buf);
            }
        }
        out.copy_from_slice(&buf);
    });
    (packed, data[groups * GROUP_ROWS * rb..].to_vec())
}

/// Row `r` (< the packed row count) of a packed matrix back in GGML order.
pub fn unpack_row(q: CpuQuant, packed: &[u8], k: usize, r: usize) -> Vec<u8> {
    let nb = k / q.block_values();
    let size = unit_bytes(q);
    let (g, i) = (r / GROUP_ROWS, r % GROUP_ROWS);
    let mut out = Vec::with_capacity(nb * q.block_bytes());
    for b in 0..nb {
        let unit = &packed[(g * nb + b) * size..(g * nb + b + 1) * size];
        if q == CpuQuant::Q4K {
            unpack_q4k(unit, i, &mut out);
        } else {
            emit(q, &unpack(q, unit)[i], &mut out);
        }
    }
    out
}
