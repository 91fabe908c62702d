//! Recycled tensor storage for the CPU backend.
//!
//! Every primitive returns a fresh tensor, and a forward pass at batch 64 allocates megabytes per
//! op. Fresh multi-megabyte allocations come from `mmap`, so each op paid a page fault plus a
//! kernel zeroing per 4 KiB page: on the demo CNN that cost more than the arithmetic. Buffers
//! of dropped tensors go back to a free list owned by the backend, and the kernels take their
//! outputs from it.

use std::sync::{Arc, Mutex};

/// Buffers below this many f32s go straight to the allocator (its small-size bins are fast and
/// never fault).
const MIN_POOLED: usize = 4096;
/// At most this many free buffers are kept...
const MAX_FREE: usize = 64;
/// ...holding at most this many f32s in all (1 GiB).
const MAX_FREE_ELEMS: usize = 256 << 20;

/// The free list. Shared (through `Arc`) by the backend and every live buffer it handed out, so
/// a tensor that outlives its backend still has somewhere to go (and the memory is released
/// when the last of them is dropped).
#[derive(Default)]
pub(crate) struct BufPool {
    free: Mutex<Vec<Vec<f32>>>,
}

impl BufPool {
    /// A buffer of exactly `len` elements whose contents are unspecified (left over from an
    /// earlier tensor, or zero). For kernels that write every element.
    pub(crate) fn take_dirty(&self, len: usize) -> Vec<f32> {
        let Some(mut v) = self.take_cap(len) else {
            return vec![0.0; len];
        };
        if v.len() >= len {
            v.truncate(len);
        } else {
            v.resize(len, 0.0);
        }
        v
    }

    /// A zero-filled buffer of `len` elements. For kernels that accumulate into their output.
    pub(crate) fn take_zeroed(&self, len: usize) -> Vec<f32> {
        let Some(mut v) = self.take_cap(len) else {
            return vec![0.0; len];
        };
        v.clear();
        v.resize(len, 0.0);
        v
    }

    /// The smallest free buffer with room for `len` that does not waste more than half of
    /// itself, preferring one whose length already covers `len`: growing a buffer's length
    /// zero-fills the new part (the demo CNN's forward spent 4% of its time there, on buffers
    /// whose capacity sufficed).
    fn take_cap(&self, len: usize) -> Option<Vec<f32>> {
        if len < MIN_POOLED {
            return None;
        }
        // A poisoned lock only means another thread panicked mid-push/pop; the list is still a
        // valid Vec of buffers.
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        let best = free
            .iter()
            .enumerate()
            .filter(|(_, v)| v.capacity() >= len && v.capacity() / 2 <= len)
            .min_by_key(|(_, v)| (v.len() < len, v.capacity()))
            .map(|(i, _)| i)?;
        Some(free.swap_remove(best))
    }

    fn put(&self, v: Vec<f32>) {
        if v.capacity() < MIN_POOLED {
            return;
        }
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        free.push(v);
        // Over budget: drop the smallest buffers first (the large ones are the expensive ones
        // to fault in again).
        let mut total: usize = free.iter().map(Vec::capacity).sum();
        while free.len() > MAX_FREE || total > MAX_FREE_ELEMS {
            let Some((i, _)) = free.iter().enumerate().min_by_key(|(_, v)| v.capacity()) else {
                break;
            };
            total -= free.swap_remove(i).capacity();
        }
    }

    #[cfg(test)]
    pub(crate) fn free_count(&self) -> usize {
        self.free.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// Storage that returns its vector to the pool when dropped.
struct Block {
    data: Vec<f32>,
    home: Arc<BufPool>,
}

impl Drop for Block {
    fn drop(&mut self) {
        self.home.put(std::mem::take(&mut self.data));
    }
}

/// The CPU backend's buffer handle: shared, immutable f32 storage (`Deref` to a slice).
#[derive(Clone)]
pub struct CpuBuf(Arc<Block>);

impl CpuBuf {
    pub(crate) fn new(data: Vec<f32>, home: &Arc<BufPool>) -> CpuBuf {
        CpuBuf(Arc::new(Block {
            data,
            home: home.clone(),
        }))
    }
}

/// A weak handle on a buffer: its identity (the allocation, which this keeps from being
/// reused) without keeping its storage alive.
pub(crate) struct BufRef(std::sync::Weak<Block>);

impl BufRef {
    /// Whether `b` is the buffer this handle was made from.
    pub(crate) fn is(&self, b: &CpuBuf) -> bool {
        std::ptr::eq(self.0.as_ptr(), Arc::as_ptr(&b.0))
    }

    pub(crate) fn alive(&self) -> bool {
        self.0.strong_count() > 0
    }
}

impl CpuBuf {
    pub(crate) fn weak(&self) -> BufRef {
        BufRef(Arc::downgrade(&self.0))
    }
}

impl std::ops::Deref for CpuBuf {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.0.data
    }
}

impl std::fmt::Debug for CpuBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CpuBuf({} f32)", self.0.data.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropped_buffers_are_reused_and_sized_exactly() {
        let pool = Arc::new(BufPool::default());
        let a = CpuBuf::new(vec![7.0; 10_000], &pool);
        assert_eq!(pool.free_count(), 0);
        drop(a);
        assert_eq!(pool.free_count(), 1);
        // Too small a request for that buffer (would waste over half): not reused.
        assert_eq!(pool.take_dirty(MIN_POOLED).len(), MIN_POOLED);
        assert_eq!(pool.free_count(), 1);
        let z = pool.take_zeroed(9_000);
        assert_eq!(z.len(), 9_000);
        assert!(z.iter().all(|&v| v == 0.0));
        assert_eq!(pool.free_count(), 0);
        drop(CpuBuf::new(z, &pool));
        let d = pool.take_dirty(9_500);
        assert_eq!(d.len(), 9_500);
        assert_eq!(pool.free_count(), 0);
    }

    #[test]
    fn free_list_is_bounded() {
        let pool = Arc::new(BufPool::default());
        let bufs: Vec<CpuBuf> = (0..MAX_FREE + 10)
            .map(|i| CpuBuf::new(vec![0.0; MIN_POOLED + i], &pool))
            .collect();
        drop(bufs);
        assert_eq!(pool.free_count(), MAX_FREE);
        // Small buffers are never kept.
        drop(CpuBuf::new(vec![0.0; 16], &pool));
        assert_eq!(pool.free_count(), MAX_FREE);
    }
}
