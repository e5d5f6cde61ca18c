//! Explicit AVX2 block dots for Q4_0, Q4_1, Q8_0, Q4_K and Q6_K (the other types take the
//! portable [`super::row_dot`]), and the same with AVX-512 VNNI's `vpdpbusd` for the 32-value
//! types where the CPU has it.
//!
//! Register tiles of R activation rows × C weight rows (R·C = 8 outputs, one per f32 lane,
//! lane `c·R + r`): each weight block is decoded once per tile and used for R rows, each
//! activation block loaded once and used for C weight rows. The integer part of a block's dot
//! product is exact in i32, so its order is free: per output, 8 i32 lanes of partial sums,
//! reduced across lanes for the 8 outputs at once. The f32 part is [`super::row_dot`]'s
//! expression, lane by lane, block by block (separate multiplies and adds, no FMA), so every
//! ISA gives the same bits.
//!
//! Why the 8-bit products cannot saturate `vpmaddubsw`'s i16 pair sums: the activations are
//! in [-127, 127] (Q8_0/Q8_1/Q8_K never give -128); Q4 nibbles are at most 15 (2·15·127),
//! Q6_K's unsigned 6-bit values at most 63 (2·63·127), Q8_0's weights enter as |w| ≤ 128 with
//! the sign moved onto the activation (2·128·127 = 32512). Offsets (Q4_0's 8, Q6_K's 32) come
//! out afterwards through the activations' exact block sums.

use super::{scale_min_k4, BlockType, QuantActs, Target};
use crate::cpu::Isa;

/// Whether [`columns`] has kernels for `t`.
pub(super) fn handles(t: BlockType) -> bool {
    matches!(
        t,
        BlockType::Q4_0 | BlockType::Q4_1 | BlockType::Q8_0 | BlockType::Q4K | BlockType::Q6K
    )
}

/// Output columns `cols` of every activation row for weight type `t` (one of [`handles`]).
///
/// # Safety
/// `isa` proves AVX2; `w` holds the weight rows of `row_bytes` each, `acts` the quantized
/// activations in `t`'s format, `target` an (acts.m, n) output whose columns `cols` only this
/// call writes.
pub(super) unsafe fn columns(
    isa: Isa,
    t: BlockType,
    w: &[u8],
    row_bytes: usize,
    acts: &QuantActs,
    cols: (usize, usize),
    target: Target,
) {
    assert!(isa.avx2() && handles(t) && cols.1 * row_bytes <= w.len());
    let job = Job {
        w: w.as_ptr(),
        row_bytes,
        acts,
        target,
    };
    if isa.avx512_vnni() {
        vnni::columns(t, &job, cols);
    } else {
        avx2::columns(t, &job, cols);
    }
}

/// Before the parallel part of a product: activation rows in groups of 8 with their dwords
/// interleaved (for the 8-row tiles of the 32-value types, whose lanes are rows): for group
/// g, block b, dword t, the 4 bytes of row r lie at `((g·blocks + b)·8 + t)·32 + 4·r`.
pub(super) fn prepared(t: BlockType, mut acts: QuantActs) -> QuantActs {
    if !matches!(t, BlockType::Q4_0 | BlockType::Q4_1 | BlockType::Q8_0) || acts.m < 8 {
        return acts;
    }
    let (m, k) = (acts.m, acts.k);
    let blocks = k / 32;
    let mut out = vec![0i8; m / 8 * 8 * k];
    for (g, group) in out.chunks_exact_mut(8 * k).enumerate() {
        for (b, block) in group.chunks_exact_mut(256).enumerate() {
            for (t, dwords) in block.chunks_exact_mut(32).enumerate() {
                for (r, word) in dwords.chunks_exact_mut(4).enumerate() {
                    let at = (8 * g + r) * k + b * 32 + 4 * t;
                    word.copy_from_slice(&acts.q[at..at + 4]);
                }
            }
        }
        debug_assert_eq!(group.len(), blocks * 256);
    }
    acts.interleaved = out;
    acts
}

/// What every tile of one call reads and writes.
struct Job<'a> {
    w: *const u8,
    row_bytes: usize,
    acts: &'a QuantActs,
    target: Target<'a>,
}

/// The 32-value block kinds of `tile32`.
const Q4_0: u8 = 0;
const Q4_1: u8 = 1;
const Q8_0: u8 = 2;

#[inline(always)]
unsafe fn read_u16(p: *const u8) -> u16 {
    (p as *const u16).read_unaligned()
}

/// Tiles `R` rows × `C` columns from row `i0` over columns `cols` (one-column tiles for what
/// is short of `C`), then `i0 += R`.
macro_rules! tile_row {
    ($job:ident, $cols:ident, $i0:ident, $tile:ident, $kind:expr, $r:literal, $c:literal) => {{
        let mut j = $cols.0;
        while $cols.1 - j >= $c {
            $tile::<{ $kind }, $r, $c>($job, $i0, j);
            j += $c;
        }
        while j < $cols.1 {
            $tile::<{ $kind }, $r, 1>($job, $i0, j);
            j += 1;
        }
        $i0 += $r;
    }};
}

/// All of a job's rows: 8-row tiles while 8 rows are left (prefill), then 4 × 2, 2 × 4, 1 × 8
/// (decode).
macro_rules! sweep {
    ($job:ident, $cols:ident, $tile:ident, $kind:expr) => {{
        let mut i0 = 0;
        while i0 < $job.acts.m {
            match $job.acts.m - i0 {
                8.. => tile_row!($job, $cols, i0, $tile, $kind, 8, 1),
                4..=7 => tile_row!($job, $cols, i0, $tile, $kind, 4, 2),
                2..=3 => tile_row!($job, $cols, i0, $tile, $kind, 2, 4),
                _ => tile_row!($job, $cols, i0, $tile, $kind, 1, 8),
            }
        }
    }};
}

/// One set of kernels compiled for `$features`, with `$dot` (`acc + Σ` of each 4 adjacent
/// u8·s8 products, per i32 lane) as the 32-value blocks' integer dot.
macro_rules! kernels {
    ($module:ident, $features:literal, $offset_q8:literal, $dot:item) => {
        mod $module {
            use std::arch::x86_64::*;

            use super::{read_u16, scale_min_k4, BlockType, Job, Q4_0, Q4_1, Q8_0};

            $dot

            /// Lane k of the result: the sum of the 8 lanes of `v[k]`.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn reduce8(v: &[__m256i; 8]) -> __m256i {
                let s01 = _mm256_hadd_epi32(v[0], v[1]);
                let s23 = _mm256_hadd_epi32(v[2], v[3]);
                let s45 = _mm256_hadd_epi32(v[4], v[5]);
                let s67 = _mm256_hadd_epi32(v[6], v[7]);
                // Per 128-bit half: the partial sums of v0..v3 (of v4..v7).
                let s0123 = _mm256_hadd_epi32(s01, s23);
                let s4567 = _mm256_hadd_epi32(s45, s67);
                let low = _mm256_permute2x128_si256::<0x20>(s0123, s4567);
                let high = _mm256_permute2x128_si256::<0x31>(s0123, s4567);
                _mm256_add_epi32(low, high)
            }

            /// Lane `c·R + r` = `p[r]` (the tile's rows' values, side by side in memory).
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn rows_f32<const R: usize>(p: *const f32) -> __m256 {
                match R {
                    8 => _mm256_loadu_ps(p),
                    4 => {
                        let x = _mm_loadu_ps(p);
                        _mm256_set_m128(x, x)
                    }
                    2 => _mm256_castpd_ps(_mm256_set1_pd((p as *const f64).read_unaligned())),
                    _ => _mm256_set1_ps(*p),
                }
            }

            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn rows_i32<const R: usize>(p: *const i32) -> __m256i {
                _mm256_castps_si256(rows_f32::<R>(p as *const f32))
            }

            /// Lane `c·R + r` = the f16 `h[c]` as f32 (the tile's weight rows' scales).
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn columns_f16<const R: usize, const C: usize>(h: &[u16; C]) -> __m256 {
                if C == 1 {
                    return _mm256_cvtph_ps(_mm_set1_epi16(h[0] as i16));
                }
                let mut lanes = [0u16; 8];
                for c in 0..C {
                    for r in 0..R {
                        lanes[c * R + r] = h[c];
                    }
                }
                _mm256_cvtph_ps(_mm_loadu_si128(lanes.as_ptr() as *const __m128i))
            }

            /// For 8-column tiles (lane c = weight row j0 + c): the two f16 at byte `offset`
            /// of each row, as f32 (one gather instead of 16 inserts).
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn scales8(job: &Job, j0: usize, offset: usize) -> (__m256, __m256) {
                let base = job.w.add(j0 * job.row_bytes + offset) as *const i32;
                let rb = job.row_bytes as i32;
                let index = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(rb));
                let words = _mm256_i32gather_epi32::<1>(base, index);
                let low = _mm256_and_si256(words, _mm256_set1_epi32(0xFFFF));
                // Per 128-bit half: 4 low f16, then 4 high ones; then the halves in order.
                let packed = _mm256_packus_epi32(low, _mm256_srli_epi32::<16>(words));
                let packed = _mm256_permute4x64_epi64::<0b11_01_10_00>(packed);
                (
                    _mm256_cvtph_ps(_mm256_castsi256_si128(packed)),
                    _mm256_cvtph_ps(_mm256_extracti128_si256::<1>(packed)),
                )
            }

            /// Values 0..16 of a block from the low nibbles of its 16 bytes, 16..32 from the
            /// high ones.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn nibbles(p: *const u8) -> __m256i {
                let x = _mm_loadu_si128(p as *const __m128i);
                let both = _mm256_set_m128i(_mm_srli_epi16::<4>(x), x);
                _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
            }

            /// One-row tiles (decoding) stream the weights from memory once: each asks for
            /// its part of the next tile (`p`, the same block C rows on) while it works.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn prefetch<const R: usize>(p: *const u8) {
                if R == 1 {
                    _mm_prefetch::<_MM_HINT_T0>(p as *const i8);
                }
            }

            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn load(p: *const u8) -> __m256i {
                _mm256_loadu_si256(p as *const __m256i)
            }

            /// The tile's 8 lanes into the output.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn store<const R: usize, const C: usize>(
                job: &Job,
                acc: __m256,
                i0: usize,
                j0: usize,
            ) {
                let mut lanes = [0f32; 8];
                _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
                for c in 0..C {
                    for r in 0..R {
                        job.target.put(i0 + r, j0 + c, lanes[c * R + r]);
                    }
                }
            }

            /// Rows `i0..i0 + R` × weight rows `j0..j0 + C` for the 32-value types.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn tile32<const KIND: u8, const R: usize, const C: usize>(
                job: &Job,
                i0: usize,
                j0: usize,
            ) {
                let acts = job.acts;
                let (m, k) = (acts.m, acts.k);
                let block_bytes = match KIND {
                    Q4_0 => 18,
                    Q4_1 => 20,
                    _ => 34,
                };
                let q = acts.q.as_ptr() as *const u8;
                let mut acc = _mm256_setzero_ps();
                for b in 0..k / 32 {
                    let mut dh = [0u16; C];
                    let mut mh = [0u16; C];
                    let mut wv = [_mm256_setzero_si256(); C];
                    for c in 0..C {
                        let blk = job.w.add((j0 + c) * job.row_bytes + b * block_bytes);
                        prefetch::<R>(blk.wrapping_add(C * job.row_bytes));
                        dh[c] = read_u16(blk);
                        wv[c] = match KIND {
                            Q4_0 => nibbles(blk.add(2)),
                            Q4_1 => {
                                mh[c] = read_u16(blk.add(2));
                                nibbles(blk.add(4))
                            }
                            _ => load(blk.add(2)),
                        };
                    }
                    let mut isum = if R == 8 && C == 1 {
                        // Lanes are the 8 rows: each weight dword broadcast against the rows'
                        // interleaved dwords, no reduction across lanes.
                        let qi = acts.interleaved.as_ptr().add(((i0 / 8) * (k / 32) + b) * 256);
                        let w = if KIND == Q8_0 && $offset_q8 {
                            _mm256_xor_si256(wv[0], _mm256_set1_epi8(-128))
                        } else {
                            wv[0]
                        };
                        let mut words = [0i32; 8];
                        _mm256_storeu_si256(words.as_mut_ptr() as *mut __m256i, w);
                        let mut sum = _mm256_setzero_si256();
                        for (t, &word) in words.iter().enumerate() {
                            let wt = _mm256_set1_epi32(word);
                            let a = load(qi.add(t * 32) as *const u8);
                            sum = if KIND == Q8_0 && !$offset_q8 {
                                dot(sum, _mm256_abs_epi8(wt), _mm256_sign_epi8(a, wt))
                            } else {
                                dot(sum, wt, a)
                            };
                        }
                        if KIND == Q8_0 && $offset_q8 {
                            // Σ (w + 128)·a - 128·Σ a.
                            let sums = rows_i32::<R>(acts.sums.as_ptr().add(b * m + i0));
                            sum = _mm256_sub_epi32(sum, _mm256_slli_epi32::<7>(sums));
                        }
                        sum
                    } else {
                        let mut dots = [_mm256_setzero_si256(); 8];
                        for r in 0..R {
                            let a = load(q.add((i0 + r) * k + b * 32));
                            for c in 0..C {
                                dots[c * R + r] = if KIND == Q8_0 {
                                    // |w| · (a with w's sign): u8 × s8 for the same products.
                                    dot(
                                        _mm256_setzero_si256(),
                                        _mm256_abs_epi8(wv[c]),
                                        _mm256_sign_epi8(a, wv[c]),
                                    )
                                } else {
                                    dot(_mm256_setzero_si256(), wv[c], a)
                                };
                            }
                        }
                        reduce8(&dots)
                    };
                    if KIND == Q4_0 {
                        // Σ (w - 8)·a = Σ w·a - 8·Σ a.
                        let sums = rows_i32::<R>(acts.sums.as_ptr().add(b * m + i0));
                        isum = _mm256_sub_epi32(isum, _mm256_slli_epi32::<3>(sums));
                    }
                    let da = rows_f32::<R>(acts.d.as_ptr().add(b * m + i0));
                    let (dw, mw) = if C == 8 {
                        scales8(job, j0, b * block_bytes)
                    } else {
                        (columns_f16::<R, C>(&dh), columns_f16::<R, C>(&mh))
                    };
                    let scale = _mm256_mul_ps(dw, da);
                    let mut term = _mm256_mul_ps(scale, _mm256_cvtepi32_ps(isum));
                    if KIND == Q4_1 {
                        let sa = rows_f32::<R>(acts.s.as_ptr().add(b * m + i0));
                        term = _mm256_add_ps(term, _mm256_mul_ps(mw, sa));
                    }
                    acc = _mm256_add_ps(acc, term);
                }
                store::<R, C>(job, acc, i0, j0);
            }

            /// Rows `i0..i0 + R` × weight rows `j0..j0 + C` for Q4_K.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn tile_q4k<const KIND: u8, const R: usize, const C: usize>(job: &Job, i0: usize, j0: usize) {
                let acts = job.acts;
                let (m, k) = (acts.m, acts.k);
                let blocks = k / 256;
                let q = acts.q.as_ptr() as *const u8;
                let low4 = _mm256_set1_epi8(0x0F);
                let mut acc = _mm256_setzero_ps();
                for b in 0..blocks {
                    let mut isums = [_mm256_setzero_si256(); 8];
                    let mut msums = [_mm256_setzero_si256(); 8];
                    let mut dh = [0u16; C];
                    let mut mh = [0u16; C];
                    for c in 0..C {
                        let blk = job.w.add((j0 + c) * job.row_bytes + b * 144);
                        prefetch::<R>(blk.wrapping_add(C * job.row_bytes));
                        dh[c] = read_u16(blk);
                        mh[c] = read_u16(blk.add(2));
                        let scales = std::slice::from_raw_parts(blk.add(4), 12);
                        let mut sc = [0i16; 8];
                        // Each sub-block's min twice: once per 16-value sum of the activations.
                        let mut mins = [0u8; 16];
                        for sb in 0..8 {
                            let (s, min) = scale_min_k4(sb, scales);
                            sc[sb] = s as i16;
                            mins[2 * sb] = min as u8;
                            mins[2 * sb + 1] = min as u8;
                        }
                        let mins = _mm256_cvtepu8_epi16(_mm_loadu_si128(
                            mins.as_ptr() as *const __m128i
                        ));
                        let qs = blk.add(16);
                        for chunk in 0..4 {
                            let x = load(qs.add(32 * chunk));
                            let halves = [
                                _mm256_and_si256(x, low4),
                                _mm256_and_si256(_mm256_srli_epi16::<4>(x), low4),
                            ];
                            for (half, wv) in halves.into_iter().enumerate() {
                                let sb = 2 * chunk + half;
                                let scale = _mm256_set1_epi16(sc[sb]);
                                for r in 0..R {
                                    let a = load(q.add((i0 + r) * k + b * 256 + sb * 32));
                                    let o = c * R + r;
                                    let p = _mm256_madd_epi16(_mm256_maddubs_epi16(wv, a), scale);
                                    isums[o] = _mm256_add_epi32(isums[o], p);
                                }
                            }
                        }
                        for r in 0..R {
                            let bs = acts.bsums.as_ptr().add(((i0 + r) * blocks + b) * 16);
                            let bs = _mm256_loadu_si256(bs as *const __m256i);
                            msums[c * R + r] = _mm256_madd_epi16(mins, bs);
                        }
                    }
                    let isum = _mm256_cvtepi32_ps(reduce8(&isums));
                    let msum = _mm256_cvtepi32_ps(reduce8(&msums));
                    let da = rows_f32::<R>(acts.d.as_ptr().add(b * m + i0));
                    let (dw, dmin) = if C == 8 {
                        scales8(job, j0, b * 144)
                    } else {
                        (columns_f16::<R, C>(&dh), columns_f16::<R, C>(&mh))
                    };
                    let scaled = _mm256_mul_ps(_mm256_mul_ps(dw, da), isum);
                    let mins = _mm256_mul_ps(_mm256_mul_ps(dmin, da), msum);
                    acc = _mm256_add_ps(acc, _mm256_sub_ps(scaled, mins));
                }
                store::<R, C>(job, acc, i0, j0);
            }

            /// Rows `i0..i0 + R` × weight rows `j0..j0 + C` for Q6_K.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn tile_q6k<const KIND: u8, const R: usize, const C: usize>(job: &Job, i0: usize, j0: usize) {
                let acts = job.acts;
                let (m, k) = (acts.m, acts.k);
                let blocks = k / 256;
                let q = acts.q.as_ptr() as *const u8;
                let low4 = _mm256_set1_epi8(0x0F);
                let high2 = _mm256_set1_epi8(0x30);
                let mut acc = _mm256_setzero_ps();
                for b in 0..blocks {
                    let mut isums = [_mm256_setzero_si256(); 8];
                    let mut dh = [0u16; C];
                    for c in 0..C {
                        let blk = job.w.add((j0 + c) * job.row_bytes + b * 210);
                        prefetch::<R>(blk.wrapping_add(C * job.row_bytes));
                        dh[c] = read_u16(blk.add(208));
                        let sc = blk.add(192) as *const i8;
                        for chunk in 0..2 {
                            let ql = blk.add(chunk * 64);
                            let (la, lb, qh) = (load(ql), load(ql.add(32)), load(blk.add(128 + chunk * 32)));
                            // The four parts of 32 values: a nibble and two high bits each.
                            let parts = [
                                _mm256_or_si256(
                                    _mm256_and_si256(la, low4),
                                    _mm256_and_si256(_mm256_slli_epi16::<4>(qh), high2),
                                ),
                                _mm256_or_si256(
                                    _mm256_and_si256(lb, low4),
                                    _mm256_and_si256(_mm256_slli_epi16::<2>(qh), high2),
                                ),
                                _mm256_or_si256(
                                    _mm256_and_si256(_mm256_srli_epi16::<4>(la), low4),
                                    _mm256_and_si256(qh, high2),
                                ),
                                _mm256_or_si256(
                                    _mm256_and_si256(_mm256_srli_epi16::<4>(lb), low4),
                                    _mm256_and_si256(_mm256_srli_epi16::<2>(qh), high2),
                                ),
                            ];
                            for (part, wv) in parts.into_iter().enumerate() {
                                let g = chunk * 8 + part * 2;
                                // i16 lanes 0..8 hold values 0..16 of the part, 8..16 the rest.
                                let scale = _mm256_set_m128i(
                                    _mm_set1_epi16(*sc.add(g + 1) as i16),
                                    _mm_set1_epi16(*sc.add(g) as i16),
                                );
                                for r in 0..R {
                                    let a = load(q.add((i0 + r) * k + b * 256 + g * 16));
                                    let o = c * R + r;
                                    let p = _mm256_madd_epi16(_mm256_maddubs_epi16(wv, a), scale);
                                    isums[o] = _mm256_add_epi32(isums[o], p);
                                }
                            }
                        }
                        // Σ sc·(q - 32)·a = Σ sc·q·a - 32·Σ_g sc_g·bsum_g.
                        let scales = _mm256_cvtepi8_epi16(_mm_loadu_si128(sc as *const __m128i));
                        for r in 0..R {
                            let bs = acts.bsums.as_ptr().add(((i0 + r) * blocks + b) * 16);
                            let bs = _mm256_loadu_si256(bs as *const __m256i);
                            let o = c * R + r;
                            let offset = _mm256_slli_epi32::<5>(_mm256_madd_epi16(scales, bs));
                            isums[o] = _mm256_sub_epi32(isums[o], offset);
                        }
                    }
                    let isum = _mm256_cvtepi32_ps(reduce8(&isums));
                    let da = rows_f32::<R>(acts.d.as_ptr().add(b * m + i0));
                    let dw = if C == 8 {
                        // The dword ending with d (the block's last two bytes).
                        scales8(job, j0, b * 210 + 206).1
                    } else {
                        columns_f16::<R, C>(&dh)
                    };
                    let scaled = _mm256_mul_ps(_mm256_mul_ps(dw, da), isum);
                    acc = _mm256_add_ps(acc, scaled);
                }
                store::<R, C>(job, acc, i0, j0);
            }

            /// Every activation row × weight rows `cols`: tiles of 8 rows × 1 column while 8
            /// rows are left (prefill), then 4 × 2, 2 × 4, 1 × 8 (decode); columns short of a
            /// tile take one-column tiles.
            #[target_feature(enable = $features)]
            pub(super) unsafe fn columns(t: BlockType, job: &Job, cols: (usize, usize)) {
                match t {
                    BlockType::Q4_0 => sweep!(job, cols, tile32, Q4_0),
                    BlockType::Q4_1 => sweep!(job, cols, tile32, Q4_1),
                    BlockType::Q8_0 => sweep!(job, cols, tile32, Q8_0),
                    BlockType::Q4K => sweep!(job, cols, tile_q4k, 0),
                    BlockType::Q6K => sweep!(job, cols, tile_q6k, 0),
                    _ => unreachable!("{t:?} has no x86 kernel"),
                }
            }
        }
    };
}

kernels!(
    avx2,
    "avx2,fma,f16c",
    // Q8_0 weights + 128 would overflow vpmaddubsw's i16 pairs: the sign trick instead.
    false,
    /// `vpmaddubsw` pairs, `vpmaddwd` by ones to i32.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot(acc: __m256i, w: __m256i, a: __m256i) -> __m256i {
        let pairs = _mm256_maddubs_epi16(w, a);
        _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
    }
);

kernels!(
    vnni,
    "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c",
    // vpdpbusd sums in i32: Q8_0 weights enter as w + 128 (u8), 128·Σa comes out after.
    true,
    /// `vpdpbusd`: the four products and their sum in one instruction.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
    unsafe fn dot(acc: __m256i, w: __m256i, a: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(acc, w, a)
    }
);

/// [`super::quantize_q8_32`] with AVX2, the same operations on 8 values at a time (max of
/// |x|, one scalar division, `x·id` rounded half to even, exact integer sums): the same bits
/// for any input without NaNs.
///
/// # Safety
/// The CPU has AVX2.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn quantize_q8_32(x: &[f32; 32], q: &mut [i8; 32]) -> (f32, i32) {
    use std::arch::x86_64::*;
    let p = x.as_ptr();
    let v = [
        _mm256_loadu_ps(p),
        _mm256_loadu_ps(p.add(8)),
        _mm256_loadu_ps(p.add(16)),
        _mm256_loadu_ps(p.add(24)),
    ];
    let sign = _mm256_set1_ps(-0.0);
    let abs = |x| _mm256_andnot_ps(sign, x);
    let m8 = _mm256_max_ps(
        _mm256_max_ps(abs(v[0]), abs(v[1])),
        _mm256_max_ps(abs(v[2]), abs(v[3])),
    );
    let m4 = _mm_max_ps(_mm256_castps256_ps128(m8), _mm256_extractf128_ps::<1>(m8));
    let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    let amax = _mm_cvtss_f32(_mm_max_ss(m2, _mm_movehdup_ps(m2)));
    let d = amax / 127.0;
    let id = _mm256_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
    let r = v.map(|v| {
        _mm256_cvtps_epi32(_mm256_round_ps::<
            { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
        >(_mm256_mul_ps(v, id)))
    });
    let s8 = _mm256_add_epi32(_mm256_add_epi32(r[0], r[1]), _mm256_add_epi32(r[2], r[3]));
    let s4 = _mm_add_epi32(
        _mm256_castsi256_si128(s8),
        _mm256_extracti128_si256::<1>(s8),
    );
    let s2 = _mm_add_epi32(s4, _mm_shuffle_epi32::<0b01_00_11_10>(s4));
    let sum = _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32::<0b10_11_00_01>(s2)));
    // Packing works per 128-bit half: the dwords come out as 0 4 1 5 2 6 3 7.
    let words = _mm256_packs_epi16(
        _mm256_packs_epi32(r[0], r[1]),
        _mm256_packs_epi32(r[2], r[3]),
    );
    let ordered = _mm256_permutevar8x32_epi32(words, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(q.as_mut_ptr() as *mut __m256i, ordered);
    (d, sum)
}
