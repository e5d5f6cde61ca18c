//! How the kernels split work over the thread pool they are called in (the model's own pool:
//! the kernels never name a pool): one driver for column ranges, one for row blocks, one for
//! rows of element-wise work, and the one shared-output pointer they write through.

use rayon::prelude::*;

/// A raw pointer shared by tasks that write disjoint parts of one buffer.
#[derive(Clone, Copy)]
pub(crate) struct SharedMut<T>(*mut T);
// SAFETY: every user writes disjoint elements and the buffer outlives the parallel loop.
unsafe impl<T> Send for SharedMut<T> {}
unsafe impl<T> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    pub(crate) fn new(buf: &mut [T]) -> Self {
        Self(buf.as_mut_ptr())
    }

    /// The pointer (a method, so that closures capture the whole `Send` wrapper).
    pub(crate) fn get(self) -> *mut T {
        self.0
    }
}

/// `parts` ranges covering `0..n` in order, each boundary a multiple of `align`; empty ranges
/// are dropped.
pub(crate) fn split(n: usize, parts: usize, align: usize) -> Vec<(usize, usize)> {
    let per = n.div_ceil(parts.max(1)).next_multiple_of(align);
    (0..parts.max(1))
        .map(|i| ((i * per).min(n), ((i + 1) * per).min(n)))
        .filter(|(a, b)| a < b)
        .collect()
}

/// Column ranges of the threads' split of an `n`-column product: one per thread of the
/// current pool, multiples of 64 (so a packed weight part and a tile agree on them).
pub(crate) fn thread_columns(n: usize) -> Vec<(usize, usize)> {
    split(n, rayon::current_num_threads(), 64)
}

/// Calls `f(j0, j1)` in parallel over ranges covering `0..n`, boundaries multiples of `align`,
/// at least `min_per_task` wide, and a few per thread (for balance on a busy machine).
pub(crate) fn for_ranges(
    n: usize,
    align: usize,
    min_per_task: usize,
    f: impl Fn(usize, usize) + Sync,
) {
    let tasks = n
        .div_ceil(min_per_task.max(1))
        .min(rayon::current_num_threads().max(1) * 8)
        .max(1);
    split(n, tasks, align)
        .into_par_iter()
        .for_each(|(j0, j1)| f(j0, j1));
}

/// Equal blocks of at most `max_rows` rows: 257 rows are 3 × 86, not 128 + 128 + 1 (a one-row
/// product costs nearly as much as a full block).
pub(crate) fn rows_per_block(m: usize, max_rows: usize) -> usize {
    m.div_ceil(m.div_ceil(max_rows.max(1)).max(1)).max(1)
}

/// Calls `block(i0, i1, part)` for blocks of rows `i0..i1` covering `m` rows, for every part
/// (one task per part, in parallel; each walks its row blocks in order).
pub(crate) fn for_row_blocks<P: Sync>(
    m: usize,
    max_rows: usize,
    parts: &[P],
    block: impl Fn(usize, usize, &P) + Sync,
) {
    let rows = rows_per_block(m, max_rows);
    parts.par_iter().for_each(|part| {
        for i0 in (0..m).step_by(rows) {
            block(i0, (i0 + rows).min(m), part);
        }
    });
}

/// Calls `tile(i0, i1, j0, j1)` for blocks of rows `i0..i1` and columns `j0..j1` covering an
/// (m, n) output: the columns are split between the threads, each thread walks its columns'
/// row blocks in order. Tiles never overlap.
pub(crate) fn for_tiles(
    m: usize,
    n: usize,
    max_rows: usize,
    tile: impl Fn(usize, usize, usize, usize) + Sync,
) {
    let columns = thread_columns(n);
    for_row_blocks(m, max_rows, &columns, |i0, i1, &(j0, j1)| {
        tile(i0, i1, j0, j1)
    });
}

/// Element-wise work below this many elements stays on the calling thread; above, tasks hold
/// at least this many.
const TASK_ELEMS: usize = 1 << 14;

/// Runs `f(row_index, row)` over the rows of `data` (rows of `width`), in parallel when large.
pub fn for_rows<T: Send>(data: &mut [T], width: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let rows = data.len() / width.max(1);
    if data.len() < 2 * TASK_ELEMS || rows < 2 {
        data.chunks_mut(width)
            .enumerate()
            .for_each(|(i, r)| f(i, r));
        return;
    }
    let per_task = TASK_ELEMS.div_ceil(width).max(1);
    data.par_chunks_mut(per_task * width)
        .enumerate()
        .for_each(|(t, chunk)| {
            for (i, r) in chunk.chunks_mut(width).enumerate() {
                f(t * per_task + i, r)
            }
        });
}

/// Applies `f(offset, chunk)` to chunks of `data` (`offset` is the chunk's first index), in
/// parallel when large.
pub fn for_chunks<T: Send>(data: &mut [T], f: impl Fn(usize, &mut [T]) + Sync) {
    if data.len() < 2 * TASK_ELEMS {
        return f(0, data);
    }
    let chunk = 2 * TASK_ELEMS;
    data.par_chunks_mut(chunk)
        .enumerate()
        .for_each(|(i, c)| f(i * chunk, c));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_cover_every_index_once() {
        for (n, parts, align) in [
            (100, 2, 64),
            (5, 3, 64),
            (4096, 2, 64),
            (64, 4, 64),
            (10, 3, 4),
        ] {
            let ranges = split(n, parts, align);
            assert_eq!(ranges.first().unwrap().0, 0);
            assert_eq!(ranges.last().unwrap().1, n);
            for w in ranges.windows(2) {
                assert_eq!(w[0].1, w[1].0);
                assert_eq!(w[0].1 % align, 0);
            }
        }
        assert_eq!(rows_per_block(257, 128), 86);
        assert_eq!(rows_per_block(257, 320), 257);
        assert_eq!(rows_per_block(1, 320), 1);
    }
}
