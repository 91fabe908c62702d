//! A bounds-checked wrapper over `gemm::gemm`, the only `unsafe` in the CPU backend.

use gemm::Parallelism;

/// A read-only strided matrix view: element (i, j) lives at `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub(crate) struct MatRef<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl<'a> MatRef<'a> {
    pub fn new(data: &'a [f32], rs: usize, cs: usize) -> Self {
        MatRef { data, rs, cs }
    }

    /// Index of the last element of a `rows x cols` view (None for an empty view).
    fn last(&self, rows: usize, cols: usize) -> Option<usize> {
        (rows > 0 && cols > 0).then(|| (rows - 1) * self.rs + (cols - 1) * self.cs)
    }
}

/// `c = a * b` (or `c += a * b` when `accumulate`), with `a` m x k, `b` k x n, and `c` m x n stored
/// row-major with row stride `ldc`.
///
/// Panics if a view would reach outside its slice, which is what makes the `unsafe` call sound.
/// Determinism: gemm splits work by output tiles and reduces each tile's `k` loop in a fixed
/// order, so a given (shape, parallelism) always produces the same bits.
pub(crate) fn gemm_f32(
    m: usize,
    n: usize,
    k: usize,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    a: MatRef<'_>,
    b: MatRef<'_>,
    par: Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        (m - 1) * ldc + n <= c.len() && n <= ldc,
        "gemm: destination view out of bounds"
    );
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                c[i * ldc..i * ldc + n].fill(0.0);
            }
        }
        return;
    }
    assert!(
        a.last(m, k).is_some_and(|l| l < a.data.len()),
        "gemm: lhs view out of bounds"
    );
    assert!(
        b.last(k, n).is_some_and(|l| l < b.data.len()),
        "gemm: rhs view out of bounds"
    );
    // SAFETY: the asserts above prove that every element each view addresses lies inside its
    // slice; `c` is borrowed mutably (no aliasing with `a`/`b`, which are shared borrows), and
    // all strides fit in isize because they index existing allocations.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            ldc as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}
