//! Weights in the forms the kernels read them (packed panels, Winograd-domain matrices,
//! flipped or transposed copies), kept for as long as the weight tensor lives.
//!
//! Why: a model's weights are the same buffers on every call, but the kernels used to derive
//! their forms per call: ResNet-18's forward spent 7% of its time packing weights, and the
//! Winograd transform of a 256-channel layer (about a millisecond) kept that path off the deep
//! layers at small batches. An attack calls the model ten to hundreds of times per batch.
//!
//! Soundness: CPU buffers are immutable once made (`CpuBuf` derefs to `&[f32]` only), so a
//! live buffer's derived forms never go stale. An entry holds a weak reference to its buffer:
//! identity is the `Arc` allocation, which the weak reference keeps from being reused, and
//! entries whose buffer has been dropped are removed on the next insertion, so the cache holds
//! derived forms of live tensors only.

use std::any::Any;
use std::sync::{Arc, Mutex};

use super::pool::{BufRef, CpuBuf};

/// A derived form of a weight tensor; with the tensor's identity, the cache key. Each form
/// names the shape it reads the buffer as: tensors reshaped from one another share their
/// buffer (`Tensor::reshape`), and their forms differ.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Form {
    /// Convolution weights of shape `ws` packed per group for the panel kernel (`flipped`:
    /// of the input gradient's flipped, channel-swapped weights).
    ConvPacked {
        flipped: bool,
        ws: [usize; 4],
        groups: usize,
    },
    /// Convolution weights of shape `ws` packed per group for the lane kernel, in chunks of
    /// `chunk` output channels (the group's `mg` where it is one).
    ConvLanes {
        flipped: bool,
        ws: [usize; 4],
        groups: usize,
        chunk: usize,
    },
    /// Winograd-domain weights of shape `ws` split into `splits` output-channel ranges.
    Winograd {
        flipped: bool,
        ws: [usize; 4],
        splits: usize,
    },
    /// The input gradient's flipped, channel-swapped weights, from weights of shape `ws`.
    Flipped { ws: [usize; 4], groups: usize },
    /// An `n x k` matrix operand transposed (`k x n`).
    Transposed { n: usize, k: usize },
}

struct Entry {
    owner: BufRef,
    form: Form,
    value: Arc<dyn Any + Send + Sync>,
}

#[derive(Default)]
pub(super) struct WeightCache {
    entries: Mutex<Vec<Entry>>,
}

impl WeightCache {
    /// `form` of the tensor `w`: cached, or made by `make` (outside the lock: two threads
    /// may both make it once; the results are equal) and kept while `w` lives.
    pub fn get<T: Any + Send + Sync>(
        &self,
        w: &CpuBuf,
        form: Form,
        make: impl FnOnce() -> T,
    ) -> Arc<T> {
        {
            let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            let hit = entries
                .iter()
                .find(|e| e.form == form && e.owner.is(w))
                .and_then(|e| e.value.clone().downcast::<T>().ok());
            if let Some(v) = hit {
                return v;
            }
        }
        let v = Arc::new(make());
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.retain(|e| e.owner.alive());
        entries.push(Entry {
            owner: w.weak(),
            form,
            value: v.clone(),
        });
        v
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// A weight slice and, where it is derived from a whole backend tensor, that tensor's buffer
/// (the cache key).
#[derive(Clone, Copy)]
pub(super) struct Weights<'a> {
    pub data: &'a [f32],
    pub id: Option<&'a CpuBuf>,
    /// `data` is the flipped, channel-swapped form of the tensor `id` (an input gradient's
    /// convolution), so its own derived forms are keyed apart from the tensor's.
    pub flipped: bool,
}

impl<'a> Weights<'a> {
    pub fn of(buf: &'a CpuBuf) -> Weights<'a> {
        Weights {
            data: buf,
            id: Some(buf),
            flipped: false,
        }
    }

    /// Weights with no tensor behind them: derived forms are made per call.
    #[cfg(test)]
    pub fn transient(data: &'a [f32]) -> Weights<'a> {
        Weights {
            data,
            id: None,
            flipped: false,
        }
    }

    /// `form` from the cache where the tensor is known, else made now.
    pub fn derive<T: Any + Send + Sync>(
        &self,
        cache: &WeightCache,
        form: Form,
        make: impl FnOnce() -> T,
    ) -> Arc<T> {
        match self.id {
            Some(buf) => cache.get(buf, form, make),
            None => Arc::new(make()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::cpu::pool::BufPool;

    #[test]
    fn a_form_is_made_once_per_live_buffer_and_dropped_with_it() {
        const TR: Form = Form::Transposed { n: 1, k: 2 };
        const FL: Form = Form::Flipped {
            ws: [1, 1, 1, 2],
            groups: 1,
        };
        let home = Arc::new(BufPool::default());
        let cache = WeightCache::default();
        let a = CpuBuf::new(vec![1.0, 2.0], &home);
        let made = std::cell::Cell::new(0);
        let sum = |b: &CpuBuf| {
            made.set(made.get() + 1);
            b.iter().sum::<f32>()
        };
        assert_eq!(*cache.get(&a, TR, || sum(&a)), 3.0);
        assert_eq!(*cache.get(&a, TR, || sum(&a)), 3.0);
        assert_eq!(made.get(), 1, "the second call is a hit");
        // Another form of the same buffer is another entry, and so is the same form read as
        // another shape (a reshaped tensor shares its buffer).
        cache.get(&a, FL, || sum(&a));
        assert_eq!(made.get(), 2);
        cache.get(&a, Form::Transposed { n: 2, k: 1 }, || sum(&a));
        assert_eq!(made.get(), 3);
        // A buffer with the same contents but another identity is not a hit: the key is the
        // tensor, not its data (which the cache never reads).
        let b = CpuBuf::new(vec![1.0, 2.0], &home);
        cache.get(&b, TR, || sum(&b));
        assert_eq!(made.get(), 4);
        // Dropping `a` returns its storage to the pool; a new buffer made from it (different
        // contents, possibly the same storage) must not see a's forms, and a's entries go.
        drop(a);
        let c = CpuBuf::new(vec![5.0; 2], &home);
        let c_sum = *cache.get(&c, TR, || {
            made.set(made.get() + 1);
            -1.0
        });
        assert_eq!(c_sum, -1.0);
        assert_eq!(made.get(), 5);
        assert_eq!(cache.len(), 2, "b's and c's entries; a's were removed");
    }
}
