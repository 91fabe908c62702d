//! The tensor runtime: ONNX import, a graph IR with shape inference, reverse-mode autodiff, and
//! two backends behind one kernel contract ([`backend::Backend`]): `cpu` (native, rayon + GEMM)
//! and `gpu` (wgpu + the WGSL kernels in `shaders/`).

pub mod autodiff;
pub mod backend;
pub mod card;
pub mod cpu;
pub mod exec;
pub mod export;
pub mod gpu;
#[cfg(test)]
mod graph_tests;
pub mod ir;
pub mod loss;
pub mod onnx;
pub mod pgd;
pub mod preprocess;
pub mod reference;
pub mod select;
pub mod shape;
pub mod split;
