//! Giving parts of a buffer back to the operating system, and measuring what is resident.
//!
//! ZeRO-2 and ZeRO-3 keep full-size gradient and parameter buffers so that models index them as
//! usual, but only the parts in use hold memory: a finished gradient chunk and a parameter chunk
//! no longer needed are released with `madvise(MADV_DONTNEED)`, after which they read as zeros and
//! take no memory until written again. `mincore` then tells exactly how much is resident, which
//! is what the memory figures report.

use std::ops::Range;

fn page() -> usize {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as usize
    } else {
        4096
    }
}

/// Zeroes `buf[range]` and returns its whole pages to the OS.
pub fn release(buf: &mut [f32], range: Range<usize>) {
    let range = range.start.min(buf.len())..range.end.min(buf.len());
    if range.is_empty() {
        return;
    }
    let pg = page();
    let base = buf.as_mut_ptr() as usize;
    let (start, end) = (base + range.start * 4, base + range.end * 4);
    let (a, b) = (start.div_ceil(pg) * pg, end / pg * pg);
    if a >= b {
        buf[range].fill(0.0);
        return;
    }
    // The partial pages at the edges are shared with neighbouring data: zero them by hand.
    buf[range.start..(a - base) / 4].fill(0.0);
    buf[(b - base) / 4..range.end].fill(0.0);
    // SAFETY: [a, b) lies inside `buf`, which this function borrows mutably, so nothing else can
    // observe the pages; on private anonymous memory (all heap memory) MADV_DONTNEED makes them
    // read as zeros afterwards, which is exactly the value written by hand around them.
    let r = unsafe { libc::madvise(a as *mut libc::c_void, b - a, libc::MADV_DONTNEED) };
    if r != 0 {
        // Not fatal: the values are what matters. Fall back to writing the zeros.
        buf[(a - base) / 4..(b - base) / 4].fill(0.0);
    }
}

/// Bytes of `buf` that are resident in memory.
pub fn resident_bytes(buf: &[f32]) -> u64 {
    if buf.is_empty() {
        return 0;
    }
    let pg = page();
    let start = buf.as_ptr() as usize;
    let end = start + buf.len() * 4;
    let a = start / pg * pg;
    let pages = (end - a).div_ceil(pg);
    let mut vec = vec![0u8; pages];
    // SAFETY: [a, a + pages·pg) covers `buf`'s pages, all mapped (they belong to its allocation or
    // share a page with it); mincore only reads the page tables and writes `pages` bytes to `vec`.
    let r = unsafe { libc::mincore(a as *mut libc::c_void, pages * pg, vec.as_mut_ptr()) };
    if r != 0 {
        return (buf.len() * 4) as u64;
    }
    let resident = vec.iter().filter(|v| **v & 1 == 1).count() as u64 * pg as u64;
    resident.min((buf.len() * 4) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn released_ranges_read_as_zero_hold_no_memory_and_spare_their_neighbours() {
        let n = 4 << 20;
        let mut buf = vec![1.0f32; n];
        assert!(resident_bytes(&buf) >= (n * 4) as u64 * 9 / 10);
        release(&mut buf, 1001..n - 777);
        // (Measured before reading the released pages: a read maps the kernel's shared zero page,
        // which mincore counts as resident although it costs no memory.)
        assert!(resident_bytes(&buf) < (n * 4) as u64 / 100, "{}", resident_bytes(&buf));
        buf[n / 2] = 3.0;
        assert!(resident_bytes(&buf) < (n * 4) as u64 / 50);
        assert!(buf[1000] == 1.0 && buf[n - 777] == 1.0 && buf[n / 2] == 3.0);
        assert!(buf[1001..n / 2].iter().chain(&buf[n / 2 + 1..n - 777]).all(|x| *x == 0.0));
    }
}
