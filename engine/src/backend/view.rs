//! Views into a backend's buffers that carry their shape: a span of elements, or a strided
//! matrix. A view names its buffer and where in it the data lies, so one model reads a layer's
//! slice of an activation stack, or a column block of the fused QKV buffer, the same way on
//! either backend; the backend turns it into a slice or a device pointer with leading dimension.

use std::ops::Range;

/// Elements `range` of a buffer, read.
#[derive(Debug)]
pub struct Span<'a, X: ?Sized> {
    pub buf: &'a X,
    pub range: Range<usize>,
}

impl<X: ?Sized> Clone for Span<'_, X> {
    fn clone(&self) -> Self {
        Span { buf: self.buf, range: self.range.clone() }
    }
}

impl<'a, X: ?Sized> Span<'a, X> {
    pub fn new(buf: &'a X, range: Range<usize>) -> Self {
        Span { buf, range }
    }

    /// Elements `at..at + len`.
    pub fn at(buf: &'a X, at: usize, len: usize) -> Self {
        Span { buf, range: at..at + len }
    }

    pub fn len(&self) -> usize {
        self.range.len()
    }

    pub fn is_empty(&self) -> bool {
        self.range.is_empty()
    }

    /// The same elements as a row-major `[rows, len / rows]` matrix.
    pub fn mat(&self, rows: usize, cols: usize) -> Mat<'a, X> {
        debug_assert_eq!(rows * cols, self.len(), "a span of {} as {rows}×{cols}", self.len());
        Mat::new(self.buf, self.range.start, rows, cols)
    }
}

/// Elements `range` of a buffer, written.
#[derive(Debug)]
pub struct SpanMut<'a, X: ?Sized> {
    pub buf: &'a mut X,
    pub range: Range<usize>,
}

impl<'a, X: ?Sized> SpanMut<'a, X> {
    pub fn new(buf: &'a mut X, range: Range<usize>) -> Self {
        SpanMut { buf, range }
    }

    pub fn at(buf: &'a mut X, at: usize, len: usize) -> Self {
        SpanMut { buf, range: at..at + len }
    }

    pub fn len(&self) -> usize {
        self.range.len()
    }

    pub fn is_empty(&self) -> bool {
        self.range.is_empty()
    }

    /// A shorter-lived view of the same elements.
    pub fn reborrow(&mut self) -> SpanMut<'_, X> {
        SpanMut { buf: &mut *self.buf, range: self.range.clone() }
    }

    pub fn read(&self) -> Span<'_, X> {
        Span { buf: &*self.buf, range: self.range.clone() }
    }

    pub fn mat(self, rows: usize, cols: usize) -> MatMut<'a, X> {
        debug_assert_eq!(rows * cols, self.len(), "a span of {} as {rows}×{cols}", self.len());
        let at = self.range.start;
        MatMut::new(self.buf, at, rows, cols)
    }
}

/// A `[rows, cols]` matrix inside a buffer: element `(r, c)` at `offset + r·rs + c·cs`. Row-major
/// views have `cs = 1`; `t()` swaps the strides, so a transposed operand is read in place.
#[derive(Debug)]
pub struct Mat<'a, X: ?Sized> {
    pub buf: &'a X,
    pub offset: usize,
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<X: ?Sized> Clone for Mat<'_, X> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<X: ?Sized> Copy for Mat<'_, X> {}

impl<'a, X: ?Sized> Mat<'a, X> {
    /// Row-major and packed.
    pub fn new(buf: &'a X, offset: usize, rows: usize, cols: usize) -> Self {
        Mat { buf, offset, rows, cols, rs: cols, cs: 1 }
    }

    /// Row-major with rows `ld` apart (a column block of a wider buffer).
    pub fn strided(buf: &'a X, offset: usize, rows: usize, cols: usize, ld: usize) -> Self {
        Mat { buf, offset, rows, cols, rs: ld, cs: 1 }
    }

    /// The transposed view (no copy).
    pub fn t(self) -> Self {
        Mat { rows: self.cols, cols: self.rows, rs: self.cs, cs: self.rs, ..self }
    }

    /// `(transposed, leading dimension)` as BLAS takes them: the stored matrix is row-major with
    /// rows `ld` apart, read as is or transposed. Panics for a view that is neither (only the
    /// two layouts are ever built).
    pub fn blas(&self) -> (bool, usize) {
        if self.cs == 1 && (self.rs >= self.cols || self.rows <= 1) {
            (false, self.rs.max(self.cols))
        } else if self.rs == 1 {
            (true, self.cs.max(self.rows))
        } else {
            panic!("a matrix view with strides ({}, {}) is neither row- nor column-major", self.rs, self.cs)
        }
    }

    /// Elements from the first to one past the last the view reads.
    pub fn extent(&self) -> Range<usize> {
        if self.rows == 0 || self.cols == 0 {
            return self.offset..self.offset;
        }
        self.offset..self.offset + (self.rows - 1) * self.rs + (self.cols - 1) * self.cs + 1
    }
}

/// A `[rows, cols]` row-major matrix inside a buffer, written (rows `rs` apart).
#[derive(Debug)]
pub struct MatMut<'a, X: ?Sized> {
    pub buf: &'a mut X,
    pub offset: usize,
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
}

impl<'a, X: ?Sized> MatMut<'a, X> {
    pub fn new(buf: &'a mut X, offset: usize, rows: usize, cols: usize) -> Self {
        MatMut { buf, offset, rows, cols, rs: cols }
    }

    pub fn strided(buf: &'a mut X, offset: usize, rows: usize, cols: usize, ld: usize) -> Self {
        MatMut { buf, offset, rows, cols, rs: ld }
    }

    pub fn extent(&self) -> Range<usize> {
        if self.rows == 0 || self.cols == 0 {
            return self.offset..self.offset;
        }
        self.offset..self.offset + (self.rows - 1) * self.rs + self.cols
    }

    pub fn reborrow(&mut self) -> MatMut<'_, X> {
        MatMut { buf: &mut *self.buf, offset: self.offset, rows: self.rows, cols: self.cols, rs: self.rs }
    }

    pub fn read(&self) -> Mat<'_, X> {
        Mat { buf: &*self.buf, offset: self.offset, rows: self.rows, cols: self.cols, rs: self.rs, cs: 1 }
    }
}
