//! Plugin-supplied WGSL kernels (the plugin host's `run_shader` service) on the backend's own
//! device, so a plugin's tensors never leave the GPU.
//!
//! Binding layout (group 0), fixed by the plugin ABI: 0 = `params: array<f32>` (read-only
//! storage, at least one element), 1..=n = the inputs (read-only storage), n+1 = the output
//! (read-write storage). The source is untrusted: compilation, layout and dispatch run inside
//! wgpu validation error scopes, so a broken shader is an error message, not a device panic.
//! Modules are compiled per call (no cache): plugin kernels are run a few times per batch.

use super::GpuBackend;
use crate::runtime::backend::Tensor;

fn storage_entry(binding: u32, read_only: bool) -> wgpu::BindGroupLayoutEntry {
    wgpu::BindGroupLayoutEntry {
        binding,
        visibility: wgpu::ShaderStages::COMPUTE,
        ty: wgpu::BindingType::Buffer {
            ty: wgpu::BufferBindingType::Storage { read_only },
            has_dynamic_offset: false,
            min_binding_size: None,
        },
        count: None,
    }
}

impl GpuBackend {
    /// Compiles `wgsl`, runs `entry` over `workgroups` and returns the output tensor of
    /// `out_shape` (zero-initialised before the dispatch).
    pub fn run_custom_wgsl(
        &self,
        wgsl: &str,
        entry: &str,
        inputs: &[&Tensor<GpuBackend>],
        params: &[f32],
        out_shape: &[usize],
        workgroups: [u32; 3],
    ) -> Result<Tensor<GpuBackend>, String> {
        let ctx = &self.ctx;
        let dev = &ctx.device;
        if workgroups
            .iter()
            .any(|&g| g == 0 || g > ctx.max_groups_per_dim)
        {
            return Err(format!(
                "workgroups {workgroups:?} must each be in 1..={}",
                ctx.max_groups_per_dim
            ));
        }
        let out_len: usize = out_shape.iter().product();
        let params_buf = ctx.upload_f32(if params.is_empty() { &[0.0] } else { params });
        let out = ctx.alloc(out_len.max(1));
        ctx.clear(&out);
        // Inputs and the cleared output may still sit in the pending batch: submit it first so
        // the queue orders this dispatch after them.
        ctx.flush();

        let scope = dev.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = dev.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some("plugin kernel"),
            source: wgpu::ShaderSource::Wgsl(wgsl.into()),
        });
        let mut entries = vec![storage_entry(0, true)];
        for i in 0..inputs.len() {
            entries.push(storage_entry(i as u32 + 1, true));
        }
        entries.push(storage_entry(inputs.len() as u32 + 1, false));
        let bgl = dev.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("plugin kernel"),
            entries: &entries,
        });
        let pl = dev.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some("plugin kernel"),
            bind_group_layouts: &[Some(&bgl)],
            immediate_size: 0,
        });
        let pipeline = dev.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some("plugin kernel"),
            layout: Some(&pl),
            module: &module,
            entry_point: Some(entry),
            compilation_options: wgpu::PipelineCompilationOptions::default(),
            cache: None,
        });
        let mut binds = vec![wgpu::BindGroupEntry {
            binding: 0,
            resource: params_buf.raw().as_entire_binding(),
        }];
        for (i, t) in inputs.iter().enumerate() {
            binds.push(wgpu::BindGroupEntry {
                binding: i as u32 + 1,
                resource: t.buf.raw().as_entire_binding(),
            });
        }
        binds.push(wgpu::BindGroupEntry {
            binding: inputs.len() as u32 + 1,
            resource: out.raw().as_entire_binding(),
        });
        let bind = dev.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("plugin kernel"),
            layout: &bgl,
            entries: &binds,
        });
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(format!("plugin WGSL rejected: {e}"));
        }

        let scope = dev.push_error_scope(wgpu::ErrorFilter::Validation);
        let mut enc = dev.create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("plugin kernel"),
        });
        {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("plugin kernel"),
                timestamp_writes: None,
            });
            pass.set_pipeline(&pipeline);
            pass.set_bind_group(0, &bind, &[]);
            pass.dispatch_workgroups(workgroups[0], workgroups[1], workgroups[2]);
        }
        ctx.queue.submit([enc.finish()]);
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(format!("plugin kernel dispatch failed: {e}"));
        }
        Ok(Tensor {
            buf: out,
            shape: out_shape.to_vec(),
        })
    }
}
