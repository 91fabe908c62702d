//! Device plumbing shared by every kernel family: the pipeline cache, the buffer pool, the uniform
//! parameter block and the batched dispatch helper.
//!
//! Ops are recorded into one pending command encoder and submitted in batches (every
//! [`FLUSH_EVERY`] dispatches, or when a result is read back), so a chain of ops costs no device
//! poll and few submissions. Buffers referenced by recorded-but-unsubmitted commands are kept alive
//! by the pending batch, which is what makes returning freed buffers to the pool and refilling
//! them with `Queue::write_buffer` safe: a pooled buffer is never referenced by commands that run
//! after the staged write.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// The runtime checks wgpu compiles into our kernels: all of them but loop bounding (see
/// `Ctx::module`).
fn shader_checks() -> wgpu::ShaderRuntimeChecks {
    let mut c = wgpu::ShaderRuntimeChecks::checked();
    c.force_loop_bounding = false;
    c
}

/// Helpers prepended to every kernel family's WGSL (WGSL has no `#include`).
const COMMON_WGSL: &str = include_str!("../../../../shaders/common.wgsl");

/// Dispatches recorded before the pending batch is submitted. Small, so that the device starts
/// on the first ops of a step while the host records the rest: on an H100 the small CNN's
/// forward + input gradient at batch 64 (about 35 dispatches, all recorded before the first
/// readback) ran at 43,000 images/s submitting every 64 dispatches and 50,000 to 53,000 every 4
/// or 8.
const FLUSH_EVERY: usize = 8;

/// Smallest buffer handed out (binding a zero-sized buffer is invalid).
const MIN_BUFFER_BYTES: u64 = 256;

/// Freed buffers kept for reuse, in bytes, before further frees release memory to the driver.
const POOL_CAP_BYTES: u64 = 1 << 30;

/// How a kernel uses one storage binding. Binding 0 is always the uniform parameter block;
/// storage bindings follow from 1 in the order of [`Kernel::storage`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Access {
    Read,
    ReadWrite,
}

/// One compute entry point: its WGSL family, entry name and binding signature.
#[derive(Debug)]
pub(crate) struct Kernel {
    /// Family name (also the shader-module cache key and debug label).
    pub family: &'static str,
    pub source: &'static str,
    pub entry: &'static str,
    pub storage: &'static [Access],
}

/// Pipeline-overridable constants (`override` in WGSL): the specialisation part of the cache key.
pub(crate) type Spec<'a> = &'a [(&'static str, f64)];

/// Little-endian u32 words of a WGSL uniform struct. Fields are pushed in declaration order;
/// `arr8` appends an `array<vec4<u32>, 2>` (8 slots), which WGSL aligns to 16 bytes.
#[derive(Default, Debug, Clone)]
pub(crate) struct Params(Vec<u32>);

impl Params {
    pub fn new() -> Self {
        Params(Vec::with_capacity(32))
    }
    /// A dimension or index; tensors beyond u32 indexing cannot be addressed by the kernels.
    pub fn u(mut self, v: usize) -> Self {
        self.0
            .push(u32::try_from(v).expect("tensor dimension exceeds the GPU's u32 indexing"));
        self
    }
    pub fn raw(mut self, v: u32) -> Self {
        self.0.push(v);
        self
    }
    pub fn f(mut self, v: f32) -> Self {
        self.0.push(v.to_bits());
        self
    }
    /// Pads to the next 16-byte boundary (before an array field or at the end).
    pub fn align16(mut self) -> Self {
        while !self.0.len().is_multiple_of(4) {
            self.0.push(0);
        }
        self
    }
    /// Up to 8 entries as `array<vec4<u32>, 2>`.
    pub fn arr8(self, vals: &[usize]) -> Self {
        assert!(
            vals.len() <= 8,
            "rank {} exceeds the GPU kernels' limit of 8",
            vals.len()
        );
        let mut s = self.align16();
        for i in 0..8 {
            s = s.u(vals.get(i).copied().unwrap_or(0));
        }
        s
    }
    fn words(&self) -> Vec<u32> {
        let mut w = self.clone().align16().0;
        if w.is_empty() {
            w.resize(4, 0);
        }
        w
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Usage {
    Storage,
    Uniform,
}

/// Freed buffers by (usage, size class).
struct Pool {
    free: Mutex<PoolInner>,
}

#[derive(Default)]
struct PoolInner {
    buffers: HashMap<(Usage, u64), Vec<wgpu::Buffer>>,
    bytes: u64,
}

/// A device buffer that returns itself to the pool when the last handle is dropped.
pub struct GpuBuffer {
    buffer: Option<wgpu::Buffer>,
    usage: Usage,
    class: u64,
    pool: Arc<Pool>,
}

impl std::fmt::Debug for GpuBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuBuffer")
            .field("bytes", &self.class)
            .finish()
    }
}

impl GpuBuffer {
    pub(crate) fn raw(&self) -> &wgpu::Buffer {
        self.buffer.as_ref().expect("buffer present until drop")
    }
}

impl Drop for GpuBuffer {
    fn drop(&mut self) {
        let Some(buffer) = self.buffer.take() else {
            return;
        };
        let mut inner = lock(&self.pool.free);
        if inner.bytes + self.class <= POOL_CAP_BYTES {
            inner.bytes += self.class;
            inner
                .buffers
                .entry((self.usage, self.class))
                .or_default()
                .push(buffer);
        }
    }
}

/// The tensor storage handle of the GPU backend.
pub type Buf = Arc<GpuBuffer>;

/// Rounds a request up to a size class: powers of two up to 64 KiB, then eighths of an octave, so
/// reuse is likely while at most 12.5% of a large buffer is wasted.
fn size_class(bytes: u64) -> u64 {
    let b = bytes.max(MIN_BUFFER_BYTES);
    let p = b.next_power_of_two();
    if p <= 65_536 {
        return p;
    }
    let step = p / 16;
    b.div_ceil(step) * step
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain caches behind; they stay usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct PipelineKey {
    family: &'static str,
    entry: &'static str,
    spec: Vec<(&'static str, u64)>,
}

struct Pending {
    encoder: Option<wgpu::CommandEncoder>,
    keep: Vec<Buf>,
    ops: usize,
}

/// Everything one device needs; shared by all tensors of a [`super::GpuBackend`].
pub(crate) struct Ctx {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    pub max_groups_per_dim: u32,
    /// Largest storage buffer one binding can see (the adapter's own limit).
    max_binding_bytes: u64,
    modules: Mutex<HashMap<&'static str, Arc<wgpu::ShaderModule>>>,
    layouts: Mutex<HashMap<Vec<Access>, Arc<(wgpu::BindGroupLayout, wgpu::PipelineLayout)>>>,
    pipelines: Mutex<HashMap<PipelineKey, Arc<wgpu::ComputePipeline>>>,
    pool: Arc<Pool>,
    pending: Mutex<Pending>,
}

impl Ctx {
    pub fn new(device: wgpu::Device, queue: wgpu::Queue, info: wgpu::AdapterInfo) -> Self {
        let limits = device.limits();
        let max_groups_per_dim = limits.max_compute_workgroups_per_dimension;
        let max_binding_bytes = limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size)
            & !3;
        Ctx {
            device,
            queue,
            info,
            max_groups_per_dim,
            max_binding_bytes,
            modules: Mutex::new(HashMap::new()),
            layouts: Mutex::new(HashMap::new()),
            pipelines: Mutex::new(HashMap::new()),
            pool: Arc::new(Pool {
                free: Mutex::new(PoolInner::default()),
            }),
            pending: Mutex::new(Pending {
                encoder: None,
                keep: Vec::new(),
                ops: 0,
            }),
        }
    }

    fn take(&self, usage: Usage, bytes: u64) -> Buf {
        assert!(
            bytes <= self.max_binding_bytes,
            "a tensor of {bytes} bytes exceeds this GPU's largest storage binding ({} bytes)",
            self.max_binding_bytes
        );
        // Rounding up to a class must not cross the device limit.
        let class = size_class(bytes).min(self.max_binding_bytes);
        let reused = {
            let mut inner = lock(&self.pool.free);
            let b = inner.buffers.get_mut(&(usage, class)).and_then(|v| v.pop());
            if b.is_some() {
                inner.bytes -= class;
            }
            b
        };
        let buffer = reused.unwrap_or_else(|| {
            let u = match usage {
                Usage::Storage => {
                    wgpu::BufferUsages::STORAGE
                        | wgpu::BufferUsages::COPY_SRC
                        | wgpu::BufferUsages::COPY_DST
                }
                Usage::Uniform => wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            };
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("adverse pooled"),
                size: class,
                usage: u,
                mapped_at_creation: false,
            })
        });
        Arc::new(GpuBuffer {
            buffer: Some(buffer),
            usage,
            class,
            pool: self.pool.clone(),
        })
    }

    /// Storage for `len` f32 (contents undefined until a kernel writes them).
    pub fn alloc(&self, len: usize) -> Buf {
        self.take(Usage::Storage, (len as u64) * 4)
    }

    /// A storage buffer holding `words` (f32 bits or u32 values).
    pub fn upload_words(&self, words: &[u32]) -> Buf {
        let buf = self.take(Usage::Storage, (words.len() as u64) * 4);
        if !words.is_empty() {
            self.queue
                .write_buffer(buf.raw(), 0, bytemuck::cast_slice(words));
        }
        buf
    }

    pub fn upload_f32(&self, data: &[f32]) -> Buf {
        let buf = self.alloc(data.len());
        if !data.is_empty() {
            self.queue
                .write_buffer(buf.raw(), 0, bytemuck::cast_slice(data));
        }
        buf
    }

    fn module(&self, k: &Kernel) -> Arc<wgpu::ShaderModule> {
        let mut modules = lock(&self.modules);
        modules
            .entry(k.family)
            .or_insert_with(|| {
                let src = format!("{COMMON_WGSL}\n{}", k.source);
                let desc = wgpu::ShaderModuleDescriptor {
                    label: Some(k.family),
                    source: wgpu::ShaderSource::Wgsl(src.into()),
                };
                // SAFETY: `force_loop_bounding` (a counter naga adds to every loop so that a
                // non-terminating loop cannot be assumed unreachable) is the only check turned
                // off; buffer bounds and integer-division checks stay. Every loop in shaders/
                // runs over a constant or a count from its uniform parameters, stepping by a
                // positive constant towards a bound that tensor sizes (at most the device's
                // largest binding, far below u32::MAX) keep from wrapping, so none can run
                // forever. The counter stops NVIDIA's compiler from unrolling the GEMM tiles'
                // inner loops and keeping their accumulators in registers: measured on an H100,
                // the convolutions ran 10x to 15x slower with it.
                Arc::new(unsafe {
                    self.device
                        .create_shader_module_trusted(desc, shader_checks())
                })
            })
            .clone()
    }

    fn layout(&self, storage: &[Access]) -> Arc<(wgpu::BindGroupLayout, wgpu::PipelineLayout)> {
        let mut layouts = lock(&self.layouts);
        layouts
            .entry(storage.to_vec())
            .or_insert_with(|| {
                let mut entries = vec![wgpu::BindGroupLayoutEntry {
                    binding: 0,
                    visibility: wgpu::ShaderStages::COMPUTE,
                    ty: wgpu::BindingType::Buffer {
                        ty: wgpu::BufferBindingType::Uniform,
                        has_dynamic_offset: false,
                        min_binding_size: None,
                    },
                    count: None,
                }];
                for (i, a) in storage.iter().enumerate() {
                    entries.push(wgpu::BindGroupLayoutEntry {
                        binding: i as u32 + 1,
                        visibility: wgpu::ShaderStages::COMPUTE,
                        ty: wgpu::BindingType::Buffer {
                            ty: wgpu::BufferBindingType::Storage {
                                read_only: *a == Access::Read,
                            },
                            has_dynamic_offset: false,
                            min_binding_size: None,
                        },
                        count: None,
                    });
                }
                let bgl = self
                    .device
                    .create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                        label: Some("adverse kernel"),
                        entries: &entries,
                    });
                let pl = self
                    .device
                    .create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                        label: Some("adverse kernel"),
                        bind_group_layouts: &[Some(&bgl)],
                        immediate_size: 0,
                    });
                Arc::new((bgl, pl))
            })
            .clone()
    }

    fn pipeline(&self, k: &Kernel, spec: Spec<'_>) -> Arc<wgpu::ComputePipeline> {
        let key = PipelineKey {
            family: k.family,
            entry: k.entry,
            spec: spec.iter().map(|(n, v)| (*n, v.to_bits())).collect(),
        };
        if let Some(p) = lock(&self.pipelines).get(&key) {
            return p.clone();
        }
        // Compiled outside the cache lock: a slow driver compile must not serialise other kernels.
        let module = self.module(k);
        let layout = self.layout(k.storage);
        let p = Arc::new(
            self.device
                .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(k.entry),
                    layout: Some(&layout.1),
                    module: &module,
                    entry_point: Some(k.entry),
                    compilation_options: wgpu::PipelineCompilationOptions {
                        constants: spec,
                        zero_initialize_workgroup_memory: false,
                    },
                    cache: None,
                }),
        );
        lock(&self.pipelines).entry(key).or_insert(p).clone()
    }

    /// Splits a linear workgroup count over x and y (kernels recover the index with
    /// `wg_linear`), since one dimension is limited to `max_groups_per_dim`.
    fn grid(&self, groups: u64) -> (u32, u32) {
        let max = u64::from(self.max_groups_per_dim);
        let x = groups.min(max);
        let y = groups.div_ceil(x);
        assert!(
            y <= max,
            "dispatch of {groups} workgroups exceeds the device grid"
        );
        (x as u32, y as u32)
    }

    /// Records one dispatch of `k` over `groups` workgroups (linear count) with `params` at
    /// binding 0 and `bufs` at bindings 1.. .
    pub fn dispatch(&self, k: &Kernel, spec: Spec<'_>, params: Params, bufs: &[&Buf], groups: u64) {
        assert_eq!(
            bufs.len(),
            k.storage.len(),
            "kernel {} binding count",
            k.entry
        );
        if groups == 0 {
            return;
        }
        let pipeline = self.pipeline(k, spec);
        let layout = self.layout(k.storage);
        let words = params.words();
        let ubuf = self.take(Usage::Uniform, (words.len() as u64) * 4);
        self.queue
            .write_buffer(ubuf.raw(), 0, bytemuck::cast_slice(&words));
        let mut entries = vec![wgpu::BindGroupEntry {
            binding: 0,
            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: ubuf.raw(),
                offset: 0,
                size: wgpu::BufferSize::new((words.len() as u64) * 4),
            }),
        }];
        for (i, b) in bufs.iter().enumerate() {
            entries.push(wgpu::BindGroupEntry {
                binding: i as u32 + 1,
                resource: b.raw().as_entire_binding(),
            });
        }
        let bind = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(k.entry),
            layout: &layout.0,
            entries: &entries,
        });
        let (gx, gy) = self.grid(groups);
        let mut pending = lock(&self.pending);
        let encoder = pending.encoder.get_or_insert_with(|| {
            self.device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("adverse batch"),
                })
        });
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some(k.entry),
                timestamp_writes: None,
            });
            pass.set_pipeline(&pipeline);
            pass.set_bind_group(0, &bind, &[]);
            pass.dispatch_workgroups(gx, gy, 1);
        }
        pending.keep.push(ubuf);
        pending.keep.extend(bufs.iter().map(|b| (*b).clone()));
        pending.ops += 1;
        if pending.ops >= FLUSH_EVERY {
            self.submit(&mut pending);
        }
    }

    /// Records zeroing the whole buffer.
    pub fn clear(&self, buf: &Buf) {
        let mut pending = lock(&self.pending);
        let encoder = pending.encoder.get_or_insert_with(|| {
            self.device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("adverse batch"),
                })
        });
        encoder.clear_buffer(buf.raw(), 0, None);
        pending.keep.push(buf.clone());
        pending.ops += 1;
    }

    fn submit(&self, pending: &mut Pending) {
        if let Some(enc) = pending.encoder.take() {
            self.queue.submit([enc.finish()]);
        }
        // Submitted commands keep their own references inside wgpu; ours may go back to the pool.
        pending.keep.clear();
        pending.ops = 0;
    }

    /// Submits everything recorded so far.
    pub fn flush(&self) {
        let mut pending = lock(&self.pending);
        self.submit(&mut pending);
    }

    /// Submits everything recorded so far and blocks until the device has run it (profiling:
    /// per-op device time).
    pub fn wait(&self) {
        self.flush();
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .expect("GPU device lost while waiting");
    }

    /// Reads `len` f32 from `buf`: the only device-to-host transfer, and the only poll.
    pub fn read(&self, buf: &Buf, len: usize) -> Vec<f32> {
        if len == 0 {
            return Vec::new();
        }
        let bytes = (len as u64) * 4;
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("adverse readback"),
            size: bytes,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        {
            let mut pending = lock(&self.pending);
            let encoder = pending.encoder.get_or_insert_with(|| {
                self.device
                    .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                        label: Some("adverse batch"),
                    })
            });
            encoder.copy_buffer_to_buffer(buf.raw(), 0, &staging, 0, bytes);
            self.submit(&mut pending);
        }
        let (tx, rx) = std::sync::mpsc::channel();
        staging.map_async(wgpu::MapMode::Read, .., move |r| {
            // The receiver outlives the poll below; a send error cannot happen.
            let _ = tx.send(r);
        });
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .expect("GPU device lost while waiting for a readback");
        rx.recv()
            .expect("map_async callback runs during poll")
            .expect("GPU readback mapping failed");
        let out = {
            let view = staging.get_mapped_range(..).expect("mapped readback range");
            bytemuck::cast_slice::<u8, f32>(&view).to_vec()
        };
        staging.unmap();
        out
    }
}

/// Row-major strides of `shape`.
pub(crate) fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// Drops size-1 axes and merges neighbours that are contiguous in every operand, so most
/// strided kernels see rank 1 or 2 (and arbitrary-rank tensors fit the kernels' rank-8 limit).
pub(crate) fn coalesce(shape: &[usize], strides: &[Vec<usize>]) -> (Vec<usize>, Vec<Vec<usize>>) {
    let mut out_shape: Vec<usize> = Vec::new();
    let mut out_strides: Vec<Vec<usize>> = vec![Vec::new(); strides.len()];
    for d in 0..shape.len() {
        if shape[d] == 1 {
            continue;
        }
        let mergeable = !out_shape.is_empty()
            && strides.iter().enumerate().all(|(k, s)| {
                let last = *out_strides[k].last().expect("non-empty");
                last == s[d] * shape[d]
            });
        if mergeable {
            *out_shape.last_mut().expect("non-empty") *= shape[d];
            for (k, s) in strides.iter().enumerate() {
                *out_strides[k].last_mut().expect("non-empty") = s[d];
            }
        } else {
            out_shape.push(shape[d]);
            for (k, s) in strides.iter().enumerate() {
                out_strides[k].push(s[d]);
            }
        }
    }
    (out_shape, out_strides)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_classes_cover_requests_with_bounded_waste() {
        for b in [1u64, 255, 256, 257, 4096, 65_537, 1_000_000, 123_456_789] {
            let c = size_class(b);
            assert!(c >= b && c.is_multiple_of(4), "{b} -> {c}");
            if b > 65_536 {
                assert!((c - b) as f64 <= b as f64 / 8.0, "{b} -> {c}");
            }
        }
    }

    #[test]
    fn coalesce_merges_contiguous_and_keeps_broadcast() {
        let (s, st) = coalesce(&[2, 3, 4], &[strides(&[2, 3, 4])]);
        assert_eq!((s, st), (vec![24], vec![vec![1]]));
        // b broadcast along the middle axis: cannot merge across it.
        let (s, st) = coalesce(&[2, 3, 4], &[vec![12, 4, 1], vec![4, 0, 1]]);
        assert_eq!(s, vec![2, 3, 4]);
        assert_eq!(st[1], vec![4, 0, 1]);
        let (s, _) = coalesce(&[1, 5, 1], &[vec![5, 1, 1]]);
        assert_eq!(s, vec![5]);
    }
}
