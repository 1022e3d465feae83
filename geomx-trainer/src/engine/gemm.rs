//! A bounds-checked wrapper over `matrixmultiply::sgemm`.

/// A strided matrix view: `rows × cols`, element (i, j) at `i·rs + j·cs`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Layout {
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl Layout {
    /// Row-major `rows × cols`.
    pub fn row_major(rows: usize, cols: usize) -> Self {
        Self {
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose of a row-major `rows × cols` matrix, seen as `cols × rows`.
    pub fn transposed(rows: usize, cols: usize) -> Self {
        Self {
            rows: cols,
            cols: rows,
            rs: 1,
            cs: cols,
        }
    }

    fn fits(&self, len: usize) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < len
    }
}

/// `c ← a·b + beta·c` with `a: m×k`, `b: k×n`, `c: m×n` (row-major `c`).
///
/// Panics if the shapes disagree or a view reaches past its slice: callers are this crate's
/// engines, which size every buffer from the model's own layer sizes.
pub(crate) fn gemm(a: &[f32], la: Layout, b: &[f32], lb: Layout, beta: f32, c: &mut [f32]) {
    let (m, k, n) = (la.rows, la.cols, lb.cols);
    assert_eq!(lb.rows, k, "inner dimensions differ");
    assert!(
        la.fits(a.len()) && lb.fits(b.len()) && c.len() >= m * n,
        "gemm view out of bounds"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        c[..m * n].iter_mut().for_each(|v| *v *= beta);
        return;
    }
    // SAFETY: the asserts above keep every element the views address inside `a`, `b` and `c`;
    // `c` is borrowed mutably, so it aliases neither input.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            la.rs as isize,
            la.cs as isize,
            b.as_ptr(),
            lb.rs as isize,
            lb.cs as isize,
            beta,
            c.as_mut_ptr(),
            n as isize,
            1,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_naive_product_with_transposes() {
        // a: 2×3, b stored as 4×3 and used transposed (3×4).
        let a: Vec<f32> = (0..6).map(|v| v as f32 - 2.0).collect();
        let b: Vec<f32> = (0..12).map(|v| (v as f32) * 0.5).collect();
        let mut c = vec![1.0f32; 8];
        gemm(
            &a,
            Layout::row_major(2, 3),
            &b,
            Layout::transposed(4, 3),
            1.0,
            &mut c,
        );
        for i in 0..2 {
            for j in 0..4 {
                let want: f32 = 1.0 + (0..3).map(|t| a[i * 3 + t] * b[j * 3 + t]).sum::<f32>();
                assert_eq!(c[i * 4 + j], want);
            }
        }
    }
}
