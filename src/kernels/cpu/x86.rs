//! x86-64 dot products: AVX2 + FMA + F16C, with AVX-512 VNNI (256-bit `vpdpbusd`) where the CPU
//! has it. One weight row against up to four activation rows (the driver's tile): each weight block is
//! unpacked once and reused for every row (prefill), and decode (one row) keeps two accumulators
//! so consecutive blocks do not wait on each other's FMA.
//!
//! Every function here computes exactly what [`super::reference`] computes, block by block: the
//! integer dot of a 32-value block is exact, only the float summation order differs.
//!
//! Safety: the `unsafe fn`s read through raw pointers. Callers ([`super::matmul`]) guarantee
//! `w.len() == k / block_values · block_bytes`, `act.k == k`, and that rows `r0..r0 + out.len()`
//! exist in `act` (or `x`), with `k` a multiple of 256 for K-quants and of 32 otherwise.

// The kernels index several per-row arrays (accumulators, pointers, products) in lockstep;
// index loops read more plainly than zipped iterators here and compile to the same code.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use super::act::{Q8Act, QK};
use super::blocks::{scale_min_k4, CpuQuant};

/// The instruction sets the kernels are compiled for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// AVX2 + FMA.
    Avx2,
    /// AVX-512 with VNNI (vpdpbusd).
    Avx512Vnni,
}

/// The best ISA of this CPU, or `None` without AVX2 + FMA + F16C.
pub fn detect() -> Option<Isa> {
    let base = is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c");
    let vnni = is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl");
    match (base, vnni) {
        (true, true) => Some(Isa::Avx512Vnni),
        (true, false) => Some(Isa::Avx2),
        _ => None,
    }
}

/// `out[i] = w · act row (r0 + i)` for a quantized (not F16) weight row.
///
/// # Safety
/// `isa` was returned by [`detect`] on this CPU; the sizes hold as in the module docs.
pub unsafe fn dot_q8(isa: Isa, q: CpuQuant, w: &[u8], act: &Q8Act, r0: usize, out: &mut [f32]) {
    match isa {
        Isa::Avx2 => dot_q8_avx2(q, w, act, r0, out),
        Isa::Avx512Vnni => dot_q8_vnni(q, w, act, r0, out),
    }
}

/// `out[i] = w · x[i]` for an F16 weight row and f32 activation rows of `w.len() / 2` values.
///
/// # Safety
/// As [`dot_q8`]; every `x[i]` has `w.len() / 2` values.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_f16(w: &[u8], x: &[&[f32]], out: &mut [f32]) {
    match x.len() {
        1 => f16_rows::<1>(w, x, out),
        2 => f16_rows::<2>(w, x, out),
        3 => f16_rows::<3>(w, x, out),
        _ => f16_rows::<4>(w, x, out),
    }
}

/// `out[i] = f16 value i of `w`` (little-endian pairs), 8 at a time with F16C.
///
/// # Safety
/// The CPU has F16C (any [`detect`]ed ISA); `w.len() == 2 * out.len()`.
#[target_feature(enable = "avx2,f16c")]
pub unsafe fn widen_f16(w: &[u8], out: &mut [f32]) {
    let n8 = out.len() / 8 * 8;
    for i in (0..n8).step_by(8) {
        let h = _mm_loadu_si128(w.as_ptr().add(2 * i) as *const __m128i);
        _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
    }
    for i in n8..out.len() {
        out[i] = half::f16::from_le_bytes([w[2 * i], w[2 * i + 1]]).to_f32();
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q8_avx2(q: CpuQuant, w: &[u8], act: &Q8Act, r0: usize, out: &mut [f32]) {
    match out.len() {
        1 => rows::<1, false>(q, w, act, r0, out),
        2 => rows::<2, false>(q, w, act, r0, out),
        3 => rows::<3, false>(q, w, act, r0, out),
        _ => rows::<4, false>(q, w, act, r0, out),
    }
}

#[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
unsafe fn dot_q8_vnni(q: CpuQuant, w: &[u8], act: &Q8Act, r0: usize, out: &mut [f32]) {
    match out.len() {
        1 => rows::<1, true>(q, w, act, r0, out),
        2 => rows::<2, true>(q, w, act, r0, out),
        3 => rows::<3, true>(q, w, act, r0, out),
        _ => rows::<4, true>(q, w, act, r0, out),
    }
}

/// Pointers to R activation rows.
struct Rows<const R: usize> {
    qs: [*const i8; R],
    d: [*const f32; R],
    s: [*const f32; R],
}

#[inline(always)]
unsafe fn rows<const R: usize, const VNNI: bool>(
    q: CpuQuant,
    w: &[u8],
    act: &Q8Act,
    r0: usize,
    out: &mut [f32],
) {
    let (k, nb) = (act.k, act.k / QK);
    let x = Rows::<R> {
        qs: std::array::from_fn(|i| act.qs.as_ptr().add((r0 + i) * k)),
        d: std::array::from_fn(|i| act.d.as_ptr().add((r0 + i) * nb)),
        s: std::array::from_fn(|i| act.s.as_ptr().add((r0 + i) * nb)),
    };
    if R == 1 {
        // Decode reads the rows in order: fetch the next row (contiguous in GGML order) while
        // this one is computed. A prefetch past the buffer's end is only a hint.
        for line in (0..w.len()).step_by(64) {
            _mm_prefetch::<_MM_HINT_T0>(w.as_ptr().wrapping_add(w.len() + line) as *const i8);
        }
    }
    let w = w.as_ptr();
    let res: [f32; R] = match q {
        CpuQuant::Q4_0 => small::<R, VNNI, Q40>(w, &x, nb),
        CpuQuant::Q4_1 => small::<R, VNNI, Q41>(w, &x, nb),
        CpuQuant::Q5_0 => small::<R, VNNI, Q50>(w, &x, nb),
        CpuQuant::Q5_1 => small::<R, VNNI, Q51>(w, &x, nb),
        CpuQuant::Q8_0 => small::<R, VNNI, Q80>(w, &x, nb),
        CpuQuant::Q4K => q4k::<R, VNNI>(w, &x, nb / 8),
        CpuQuant::Q6K => q6k::<R>(w, &x, nb / 8),
        CpuQuant::F16 => [0.0; R], // not a Q8 type: the caller routes F16 to `dot_f16`
    };
    out.copy_from_slice(&res);
}

/// Σ of 4 adjacent u8·i8 products per i32 lane.
#[inline(always)]
unsafe fn madd<const VNNI: bool>(u: __m256i, s: __m256i) -> __m256i {
    if VNNI {
        _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s)
    } else {
        _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
    }
}

#[inline(always)]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

#[inline(always)]
unsafe fn f16_at(p: *const u8) -> f32 {
    let bits = (p as *const u16).read_unaligned();
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

/// 16 bytes of packed nibbles → 32 bytes: low nibbles (elements 0..16), then high (16..32).
#[inline(always)]
unsafe fn nibbles(p: *const u8) -> __m256i {
    let v = _mm_loadu_si128(p as *const __m128i);
    let both = _mm256_set_m128i(_mm_srli_epi16(v, 4), v);
    _mm256_and_si256(both, _mm256_set1_epi8(15))
}

/// Byte j = 16 where bit j of `qh` is set, else 0.
#[inline(always)]
unsafe fn fifth_bits(qh: u32) -> __m256i {
    let spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(qh as i32),
        _mm256_setr_epi8(
            0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, //
            2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3,
        ),
    );
    let bit = _mm256_set1_epi64x(i64::from_le_bytes([1, 2, 4, 8, 16, 32, 64, 128]));
    let set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
    _mm256_and_si256(set, _mm256_set1_epi8(16))
}

/// A 32-value block type: block bytes, whether its values are signed (Q8_0), and its unpacker
/// returning (values, d, c) with block dot = `d·xd·Σ q·xq + c·xs`.
trait Small {
    const BYTES: usize;
    const SIGNED: bool = false;
    unsafe fn unpack(blk: *const u8) -> (__m256i, f32, f32);
}

struct Q40;
struct Q41;
struct Q50;
struct Q51;
struct Q80;

impl Small for Q40 {
    const BYTES: usize = 18;
    #[inline(always)]
    unsafe fn unpack(b: *const u8) -> (__m256i, f32, f32) {
        let d = f16_at(b);
        (nibbles(b.add(2)), d, -8.0 * d)
    }
}

impl Small for Q41 {
    const BYTES: usize = 20;
    #[inline(always)]
    unsafe fn unpack(b: *const u8) -> (__m256i, f32, f32) {
        (nibbles(b.add(4)), f16_at(b), f16_at(b.add(2)))
    }
}

impl Small for Q50 {
    const BYTES: usize = 22;
    #[inline(always)]
    unsafe fn unpack(b: *const u8) -> (__m256i, f32, f32) {
        let d = f16_at(b);
        let qh = (b.add(2) as *const u32).read_unaligned();
        (_mm256_or_si256(nibbles(b.add(6)), fifth_bits(qh)), d, -16.0 * d)
    }
}

impl Small for Q51 {
    const BYTES: usize = 24;
    #[inline(always)]
    unsafe fn unpack(b: *const u8) -> (__m256i, f32, f32) {
        let qh = (b.add(4) as *const u32).read_unaligned();
        let q = _mm256_or_si256(nibbles(b.add(8)), fifth_bits(qh));
        (q, f16_at(b), f16_at(b.add(2)))
    }
}

impl Small for Q80 {
    const BYTES: usize = 34;
    const SIGNED: bool = true;
    #[inline(always)]
    unsafe fn unpack(b: *const u8) -> (__m256i, f32, f32) {
        (_mm256_loadu_si256(b.add(2) as *const __m256i), f16_at(b), 0.0)
    }
}

/// Eight vectors of 8 i32 → one vector of their eight lane sums, in order.
#[inline(always)]
unsafe fn reduce8(p: [__m256i; 8]) -> __m256i {
    let h0 = _mm256_hadd_epi32(p[0], p[1]);
    let h1 = _mm256_hadd_epi32(p[2], p[3]);
    let h2 = _mm256_hadd_epi32(p[4], p[5]);
    let h3 = _mm256_hadd_epi32(p[6], p[7]);
    let g0 = _mm256_hadd_epi32(h0, h1); // [0 1 2 3 | 0 1 2 3] halves of p0..p3
    let g1 = _mm256_hadd_epi32(h2, h3);
    _mm256_add_epi32(
        _mm256_permute2x128_si256(g0, g1, 0x20),
        _mm256_permute2x128_si256(g0, g1, 0x31),
    )
}

/// Row · activations for a 32-value block type. Blocks go in groups of eight: their integer dots
/// are reduced to one vector and scaled with one FMA (weight scales gathered into a vector),
/// instead of one broadcast-and-FMA per block; leftover blocks go one at a time.
#[inline(always)]
unsafe fn small<const R: usize, const VNNI: bool, K: Small>(
    w: *const u8,
    x: &Rows<R>,
    nb: usize,
) -> [f32; R] {
    let mut acc = [_mm256_setzero_ps(); R];
    let mut off = [_mm256_setzero_ps(); R];
    let mut b = 0;
    while b + 8 <= nb {
        let mut q = [_mm256_setzero_si256(); 8];
        let (mut d, mut c) = ([0f32; 8], [0f32; 8]);
        for j in 0..8 {
            (q[j], d[j], c[j]) = K::unpack(w.add((b + j) * K::BYTES));
        }
        let mut uq = q;
        if K::SIGNED {
            for j in 0..8 {
                uq[j] = _mm256_sign_epi8(q[j], q[j]);
            }
        }
        let (d, c) = (_mm256_loadu_ps(d.as_ptr()), _mm256_loadu_ps(c.as_ptr()));
        for r in 0..R {
            let mut p = [_mm256_setzero_si256(); 8];
            for j in 0..8 {
                let xq = _mm256_loadu_si256(x.qs[r].add((b + j) * QK) as *const __m256i);
                let xq = if K::SIGNED { _mm256_sign_epi8(xq, q[j]) } else { xq };
                p[j] = madd::<VNNI>(uq[j], xq);
            }
            let isum = _mm256_cvtepi32_ps(reduce8(p));
            let xd = _mm256_loadu_ps(x.d[r].add(b));
            acc[r] = _mm256_fmadd_ps(isum, _mm256_mul_ps(d, xd), acc[r]);
            off[r] = _mm256_fmadd_ps(c, _mm256_loadu_ps(x.s[r].add(b)), off[r]);
        }
        b += 8;
    }
    let mut tail = [0f32; R];
    while b < nb {
        let (q, d, c) = K::unpack(w.add(b * K::BYTES));
        let uq = if K::SIGNED { _mm256_sign_epi8(q, q) } else { q };
        for r in 0..R {
            let xq = _mm256_loadu_si256(x.qs[r].add(b * QK) as *const __m256i);
            let xq = if K::SIGNED { _mm256_sign_epi8(xq, q) } else { xq };
            let p = hsum(_mm256_cvtepi32_ps(madd::<VNNI>(uq, xq)));
            tail[r] += p * d * *x.d[r].add(b) + c * *x.s[r].add(b);
        }
        b += 1;
    }
    let mut out = [0f32; R];
    for r in 0..R {
        out[r] = hsum(_mm256_add_ps(acc[r], off[r])) + tail[r];
    }
    out
}

/// Row · activations for Q4_K: a 256-value super-block is eight 32-value sub-blocks, one group.
#[inline(always)]
unsafe fn q4k<const R: usize, const VNNI: bool>(w: *const u8, x: &Rows<R>, nsb: usize) -> [f32; R] {
    let mut acc = [_mm256_setzero_ps(); R];
    let m4 = _mm256_set1_epi8(15);
    for sb in 0..nsb {
        let blk = w.add(sb * 144);
        let (d, dmin) = (f16_at(blk), f16_at(blk.add(2)));
        let scales = std::slice::from_raw_parts(blk.add(4), 12);
        let (mut sc, mut mn) = ([0f32; 8], [0f32; 8]);
        for j in 0..8 {
            let (s, m) = scale_min_k4(j, scales);
            (sc[j], mn[j]) = (d * s as f32, -dmin * m as f32);
        }
        let (sc, mn) = (_mm256_loadu_ps(sc.as_ptr()), _mm256_loadu_ps(mn.as_ptr()));
        let mut q = [_mm256_setzero_si256(); 8];
        for g in 0..4 {
            let v = _mm256_loadu_si256(blk.add(16 + 32 * g) as *const __m256i);
            q[2 * g] = _mm256_and_si256(v, m4);
            q[2 * g + 1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
        }
        let b = 8 * sb;
        for r in 0..R {
            let mut p = [_mm256_setzero_si256(); 8];
            for j in 0..8 {
                p[j] = madd::<VNNI>(q[j], _mm256_loadu_si256(x.qs[r].add((b + j) * QK) as *const __m256i));
            }
            let isum = _mm256_cvtepi32_ps(reduce8(p));
            let xd = _mm256_loadu_ps(x.d[r].add(b));
            acc[r] = _mm256_fmadd_ps(isum, _mm256_mul_ps(sc, xd), acc[r]);
            acc[r] = _mm256_fmadd_ps(mn, _mm256_loadu_ps(x.s[r].add(b)), acc[r]);
        }
    }
    let mut out = [0f32; R];
    for r in 0..R {
        out[r] = hsum(acc[r]);
    }
    out
}

/// Row · activations for Q6_K: the 16-value scales are applied in integers (`madd` with a scale
/// vector), then the eight 32-value dots of a super-block are reduced as one group.
#[inline(always)]
unsafe fn q6k<const R: usize>(w: *const u8, x: &Rows<R>, nsb: usize) -> [f32; R] {
    let mut acc = [_mm256_setzero_ps(); R];
    let m4 = _mm256_set1_epi8(15);
    let m2 = _mm256_set1_epi8(3);
    let m30 = _mm256_set1_epi8(0x30);
    for sb in 0..nsb {
        let blk = w.add(sb * 210);
        let d = _mm256_set1_ps(f16_at(blk.add(208)));
        let mut q = [_mm256_setzero_si256(); 8];
        let mut sc = [_mm256_setzero_si256(); 8];
        for half in 0..2 {
            let ql0 = _mm256_loadu_si256(blk.add(64 * half) as *const __m256i);
            let ql1 = _mm256_loadu_si256(blk.add(64 * half + 32) as *const __m256i);
            let qh = _mm256_loadu_si256(blk.add(128 + 32 * half) as *const __m256i);
            let quarters = [
                _mm256_or_si256(_mm256_and_si256(ql0, m4), _mm256_slli_epi16(_mm256_and_si256(qh, m2), 4)),
                _mm256_or_si256(
                    _mm256_and_si256(ql1, m4),
                    _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2), m2), 4),
                ),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4), _mm256_and_si256(qh, m30)),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4),
                    _mm256_and_si256(_mm256_srli_epi16(qh, 2), m30),
                ),
            ];
            for (i, v) in quarters.into_iter().enumerate() {
                let j = 4 * half + i;
                q[j] = _mm256_sub_epi8(v, _mm256_set1_epi8(32)); // [-32, 31]
                let s = blk.add(192 + 8 * half + 2 * i) as *const i8;
                sc[j] = _mm256_set_m128i(_mm_set1_epi16(*s.add(1) as i16), _mm_set1_epi16(*s as i16));
            }
        }
        let mut uq = q;
        for j in 0..8 {
            uq[j] = _mm256_sign_epi8(q[j], q[j]);
        }
        let b = 8 * sb;
        for r in 0..R {
            let mut p = [_mm256_setzero_si256(); 8];
            for j in 0..8 {
                let xq = _mm256_loadu_si256(x.qs[r].add((b + j) * QK) as *const __m256i);
                p[j] = _mm256_madd_epi16(_mm256_maddubs_epi16(uq[j], _mm256_sign_epi8(xq, q[j])), sc[j]);
            }
            let isum = _mm256_cvtepi32_ps(reduce8(p));
            let xd = _mm256_loadu_ps(x.d[r].add(b));
            acc[r] = _mm256_fmadd_ps(isum, _mm256_mul_ps(d, xd), acc[r]);
        }
    }
    let mut out = [0f32; R];
    for r in 0..R {
        out[r] = hsum(acc[r]);
    }
    out
}

#[inline(always)]
unsafe fn f16_rows<const R: usize>(w: &[u8], x: &[&[f32]], out: &mut [f32]) {
    let k = w.len() / 2;
    let wp = w.as_ptr();
    let xp: [*const f32; R] = std::array::from_fn(|r| x[r].as_ptr());
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    let main = k - k % 16;
    let mut i = 0;
    while i < main {
        let w0 = _mm256_cvtph_ps(_mm_loadu_si128(wp.add(2 * i) as *const __m128i));
        let w1 = _mm256_cvtph_ps(_mm_loadu_si128(wp.add(2 * i + 16) as *const __m128i));
        for r in 0..R {
            acc[r][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xp[r].add(i)), acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xp[r].add(i + 8)), acc[r][1]);
        }
        i += 16;
    }
    for r in 0..R {
        let mut t = hsum(_mm256_add_ps(acc[r][0], acc[r][1]));
        for j in main..k {
            t += f16_at(wp.add(2 * j)) * *xp[r].add(j);
        }
        out[r] = t;
    }
}

/// `out[j] = w[j] · x` for 4 F16 weight rows against one activation row: four independent
/// load streams (one row at a time leaves memory bandwidth unused in decode).
///
/// # Safety
/// The CPU has AVX2, FMA and F16C; every `w[j]` has `2 · x.len()` bytes.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_f16_x4(w: [&[u8]; 4], x: &[f32], out: &mut [f32; 4]) {
    let k = x.len();
    let xp = x.as_ptr();
    let wp: [*const u8; 4] = std::array::from_fn(|j| w[j].as_ptr());
    let mut acc = [[_mm256_setzero_ps(); 2]; 4];
    let main = k - k % 16;
    let mut i = 0;
    while i < main {
        let x0 = _mm256_loadu_ps(xp.add(i));
        let x1 = _mm256_loadu_ps(xp.add(i + 8));
        if i % 32 == 0 {
            // One cache line (32 values) per row ahead of the loads, as in `packed`.
            for p in wp {
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(2 * i + PREFETCH_BYTES) as *const i8);
            }
        }
        for j in 0..4 {
            let w0 = _mm256_cvtph_ps(_mm_loadu_si128(wp[j].add(2 * i) as *const __m128i));
            let w1 = _mm256_cvtph_ps(_mm_loadu_si128(wp[j].add(2 * i + 16) as *const __m128i));
            acc[j][0] = _mm256_fmadd_ps(w0, x0, acc[j][0]);
            acc[j][1] = _mm256_fmadd_ps(w1, x1, acc[j][1]);
        }
        i += 16;
    }
    for j in 0..4 {
        let mut t = hsum(_mm256_add_ps(acc[j][0], acc[j][1]));
        for e in main..k {
            t += f16_at(wp[j].add(2 * e)) * *xp.add(e);
        }
        out[j] = t;
    }
}

/// How far ahead of the current block decode prefetches (bytes).
const PREFETCH_BYTES: usize = 2048;

/// A 32-value block type in the interleaved 8-row layout ([`super::packed`]).
trait Packed {
    /// Byte offsets of m, qh, qs and the size of one packed block of 8 rows.
    const M: usize = 16;
    const QH: usize;
    const QS: usize;
    const SIZE: usize;
    const MIN: bool = false;
    const FIFTH: bool = false;
    const Q8: bool = false;
    /// The offset per unit of d: value = d·(q + OFFSET) (Q4_0: −8, Q5_0: −16).
    const OFFSET: f32 = 0.0;
}

struct P40;
struct P41;
struct P50;
struct P51;
struct P80;

impl Packed for P40 {
    const QH: usize = 16;
    const QS: usize = 16;
    const SIZE: usize = 144;
    const OFFSET: f32 = -8.0;
}
impl Packed for P41 {
    const QH: usize = 32;
    const QS: usize = 32;
    const SIZE: usize = 160;
    const MIN: bool = true;
}
impl Packed for P50 {
    const QH: usize = 16;
    const QS: usize = 48;
    const SIZE: usize = 176;
    const FIFTH: bool = true;
    const OFFSET: f32 = -16.0;
}
impl Packed for P51 {
    const QH: usize = 32;
    const QS: usize = 64;
    const SIZE: usize = 192;
    const MIN: bool = true;
    const FIFTH: bool = true;
}
impl Packed for P80 {
    const QH: usize = 16;
    const QS: usize = 16;
    const SIZE: usize = 272;
    const Q8: bool = true;
}

/// `out[r][i]` = row i of a packed group of 8 rows · activation row `r0 + r`, r < `out.len()`.
///
/// # Safety
/// `isa` came from [`detect`]; `group` holds `act.k / 32` packed blocks of type `q` (one of the
/// [`super::packed::packable`] types) and rows `r0..r0 + out.len()` exist in `act`.
pub unsafe fn dot_group(isa: Isa, q: CpuQuant, group: &[u8], act: &Q8Act, r0: usize, out: &mut [[f32; 8]]) {
    match isa {
        Isa::Avx2 => group_avx2(q, group, act, r0, out),
        Isa::Avx512Vnni => group_vnni(q, group, act, r0, out),
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn group_avx2(q: CpuQuant, g: &[u8], act: &Q8Act, r0: usize, out: &mut [[f32; 8]]) {
    group_dispatch::<false>(q, g, act, r0, out)
}

#[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
unsafe fn group_vnni(q: CpuQuant, g: &[u8], act: &Q8Act, r0: usize, out: &mut [[f32; 8]]) {
    group_dispatch::<true>(q, g, act, r0, out)
}

#[inline(always)]
unsafe fn group_dispatch<const VNNI: bool>(q: CpuQuant, g: &[u8], act: &Q8Act, r0: usize, out: &mut [[f32; 8]]) {
    match out.len() {
        1 => group_rows::<1, VNNI>(q, g, act, r0, out),
        2 => group_rows::<2, VNNI>(q, g, act, r0, out),
        3 => group_rows::<3, VNNI>(q, g, act, r0, out),
        4 => group_rows::<4, VNNI>(q, g, act, r0, out),
        5 => group_rows::<5, VNNI>(q, g, act, r0, out),
        6 => group_rows::<6, VNNI>(q, g, act, r0, out),
        7 => group_rows::<7, VNNI>(q, g, act, r0, out),
        _ => group_rows::<8, VNNI>(q, g, act, r0, out),
    }
}

#[inline(always)]
unsafe fn group_rows<const R: usize, const VNNI: bool>(
    q: CpuQuant,
    g: &[u8],
    act: &Q8Act,
    r0: usize,
    out: &mut [[f32; 8]],
) {
    let (k, nb) = (act.k, act.k / QK);
    let x = Rows::<R> {
        qs: std::array::from_fn(|i| act.qs.as_ptr().add((r0 + i) * k)),
        d: std::array::from_fn(|i| act.d.as_ptr().add((r0 + i) * nb)),
        s: std::array::from_fn(|i| act.s.as_ptr().add((r0 + i) * nb)),
    };
    let g = g.as_ptr();
    let res = match q {
        CpuQuant::Q4_0 => packed::<R, VNNI, P40>(g, &x, nb),
        CpuQuant::Q4_1 => packed::<R, VNNI, P41>(g, &x, nb),
        CpuQuant::Q5_0 => packed::<R, VNNI, P50>(g, &x, nb),
        CpuQuant::Q5_1 => packed::<R, VNNI, P51>(g, &x, nb),
        CpuQuant::Q4K => packed_q4k::<R, VNNI>(g, &x, nb / 8),
        _ => packed::<R, VNNI, P80>(g, &x, nb),
    };
    out.copy_from_slice(&res);
}

/// `acc + Σ` of 4 adjacent u8·i8 products per i32 lane (`vpdpbusd`, or its AVX2 equivalent).
#[inline(always)]
unsafe fn dp<const VNNI: bool>(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
    if VNNI {
        _mm256_dpbusd_epi32(acc, u, s)
    } else {
        _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)))
    }
}

/// The dot products of 8 interleaved rows with R activation rows: lane i of every vector is
/// weight row i. Per block: 8 unpacked registers (4 values of each row), each against 4
/// broadcast activation bytes.
#[inline(always)]
unsafe fn packed<const R: usize, const VNNI: bool, P: Packed>(g: *const u8, x: &Rows<R>, nb: usize) -> [[f32; 8]; R] {
    let mut acc = [_mm256_setzero_ps(); R];
    let mut off = [_mm256_setzero_ps(); R];
    for b in 0..nb {
        let base = g.add(b * P::SIZE);
        if R == 1 {
            // Decode streams the weights once: ask for data further ahead than the hardware
            // prefetcher does (it runs past the group end into the next, which is contiguous).
            _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add(PREFETCH_BYTES) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add(PREFETCH_BYTES + 64) as *const i8);
        }
        let d = _mm256_cvtph_ps(_mm_loadu_si128(base as *const __m128i));
        let c = if P::MIN {
            _mm256_cvtph_ps(_mm_loadu_si128(base.add(P::M) as *const __m128i))
        } else if P::Q8 && VNNI {
            _mm256_mul_ps(d, _mm256_set1_ps(-128.0)) // weights biased by +128 below
        } else {
            _mm256_mul_ps(d, _mm256_set1_ps(P::OFFSET))
        };
        let mut w = [_mm256_setzero_si256(); 8];
        if P::Q8 {
            for i in 0..8 {
                let v = _mm256_loadu_si256(base.add(P::QS + 32 * i) as *const __m256i);
                w[i] = if VNNI { _mm256_xor_si256(v, _mm256_set1_epi8(-128)) } else { v };
            }
        } else {
            w = nibble_regs(base.add(P::QS));
            if P::FIFTH {
                for i in 0..8 {
                    let h = (base.add(P::QH + 4 * i) as *const u32).read_unaligned();
                    w[i] = _mm256_or_si256(w[i], fifth_bits(h));
                }
            }
        }
        // AVX2 cannot multiply signed by signed bytes: |w| against x with w's sign.
        let mut uw = w;
        if P::Q8 && !VNNI {
            for i in 0..8 {
                uw[i] = _mm256_sign_epi8(w[i], w[i]);
            }
        }
        let isums = block_dots::<R, VNNI>(&w, &uw, x, b, P::Q8 && !VNNI);
        for r in 0..R {
            let isum = _mm256_cvtepi32_ps(isums[r]);
            acc[r] = _mm256_fmadd_ps(isum, _mm256_mul_ps(d, _mm256_set1_ps(*x.d[r].add(b))), acc[r]);
            off[r] = _mm256_fmadd_ps(c, _mm256_set1_ps(*x.s[r].add(b)), off[r]);
        }
    }
    sum_rows(&acc, &off)
}

/// `acc + off` per activation row, lane i = weight row i.
#[inline(always)]
unsafe fn sum_rows<const R: usize>(acc: &[__m256; R], off: &[__m256; R]) -> [[f32; 8]; R] {
    let mut out = [[0f32; 8]; R];
    for r in 0..R {
        _mm256_storeu_ps(out[r].as_mut_ptr(), _mm256_add_ps(acc[r], off[r]));
    }
    out
}

/// The integer dots of one 32-value block of 8 interleaved rows (`uw`, unsigned; `w` carries
/// the signs when `signed`) with block `b` of R activation rows: lane i = weight row i.
/// `vpdpbusd` has a latency of several cycles, so the chains must be independent: for few rows
/// two chains per row, for many rows the register loop runs inside (R chains side by side).
#[inline(always)]
unsafe fn block_dots<const R: usize, const VNNI: bool>(
    w: &[__m256i; 8],
    uw: &[__m256i; 8],
    x: &Rows<R>,
    b: usize,
    signed: bool,
) -> [__m256i; R] {
    let bcast = |r: usize, i: usize| {
        let v = _mm256_set1_epi32((x.qs[r].add(b * QK + 4 * i) as *const i32).read_unaligned());
        if signed { _mm256_sign_epi8(v, w[i]) } else { v }
    };
    let mut s = [_mm256_setzero_si256(); R];
    if R < 4 {
        for (r, sr) in s.iter_mut().enumerate() {
            let (mut s0, mut s1) = (_mm256_setzero_si256(), _mm256_setzero_si256());
            for i in (0..8).step_by(2) {
                s0 = dp::<VNNI>(s0, uw[i], bcast(r, i));
                s1 = dp::<VNNI>(s1, uw[i + 1], bcast(r, i + 1));
            }
            *sr = _mm256_add_epi32(s0, s1);
        }
    } else {
        for i in 0..8 {
            for (r, sr) in s.iter_mut().enumerate() {
                *sr = dp::<VNNI>(*sr, uw[i], bcast(r, i));
            }
        }
    }
    s
}

/// 128 bytes of nibbles in the Q4_0 arrangement → 8 registers, register i = values 4i..4i+4 of
/// each of the 8 rows.
#[inline(always)]
unsafe fn nibble_regs(p: *const u8) -> [__m256i; 8] {
    let m4 = _mm256_set1_epi8(15);
    let mut w = [_mm256_setzero_si256(); 8];
    for i in 0..4 {
        let v = _mm256_loadu_si256(p.add(32 * i) as *const __m256i);
        w[i] = _mm256_and_si256(v, m4);
        w[i + 4] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
    }
    w
}

/// 8 bytes → 8 f32.
#[inline(always)]
unsafe fn u8x8(p: *const u8) -> __m256 {
    _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const __m128i)))
}

/// Q4_K in the interleaved layout ([`super::packed::Q4K_UNIT`]): per sub-block, the 8 rows'
/// scales and mins are one vector each.
#[inline(always)]
unsafe fn packed_q4k<const R: usize, const VNNI: bool>(g: *const u8, x: &Rows<R>, nsb: usize) -> [[f32; 8]; R] {
    use super::packed::{Q4K_MN, Q4K_QS, Q4K_SC, Q4K_UNIT};
    let mut acc = [_mm256_setzero_ps(); R];
    let mut off = [_mm256_setzero_ps(); R];
    for sb in 0..nsb {
        let base = g.add(sb * Q4K_UNIT);
        if R == 1 {
            for line in 0..Q4K_UNIT.div_ceil(64) {
                _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add(PREFETCH_BYTES + 64 * line) as *const i8);
            }
        }
        let d = _mm256_cvtph_ps(_mm_loadu_si128(base as *const __m128i));
        let dmin = _mm256_cvtph_ps(_mm_loadu_si128(base.add(16) as *const __m128i));
        for j in 0..8 {
            let dsc = _mm256_mul_ps(d, u8x8(base.add(Q4K_SC + 8 * j)));
            let dmn = _mm256_mul_ps(dmin, u8x8(base.add(Q4K_MN + 8 * j)));
            let w = nibble_regs(base.add(Q4K_QS + 128 * j));
            let b = 8 * sb + j;
            let isums = block_dots::<R, VNNI>(&w, &w, x, b, false);
            for r in 0..R {
                let isum = _mm256_cvtepi32_ps(isums[r]);
                acc[r] = _mm256_fmadd_ps(isum, _mm256_mul_ps(dsc, _mm256_set1_ps(*x.d[r].add(b))), acc[r]);
                off[r] = _mm256_fnmadd_ps(dmn, _mm256_set1_ps(*x.s[r].add(b)), off[r]);
            }
        }
    }
    sum_rows(&acc, &off)
}
