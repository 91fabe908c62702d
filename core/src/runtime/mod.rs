//! The tensor runtime: ONNX import, a graph IR with shape inference, reverse-mode autodiff, and
//! two backends behind one kernel contract ([`backend::Backend`]): `cpu` (native, rayon + GEMM)
//! and `gpu` (wgpu + the WGSL kernels in `shaders/`).

pub mod backend;
