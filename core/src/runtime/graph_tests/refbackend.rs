//! A float64 [`Backend`] over `runtime::reference`, so whole-graph gradients can be checked
//! against finite differences computed in float64 through the very same executor.

use std::sync::Arc;

use crate::runtime::backend::*;
use crate::runtime::reference::{self as r, RefLossTargets, RefTensor};

pub struct RefBackend;

pub type RT = Tensor<RefBackend>;

fn to_ref(t: &RT) -> RefTensor {
    RefTensor {
        data: (*t.buf).clone(),
        shape: t.shape.clone(),
    }
}

fn from_ref(t: RefTensor) -> RT {
    Tensor {
        buf: Arc::new(t.data),
        shape: t.shape,
    }
}

/// A tensor with exact f64 contents (bypasses the f32 upload).
pub fn tensor64(data: Vec<f64>, shape: &[usize]) -> RT {
    assert_eq!(data.len(), shape.iter().product::<usize>());
    Tensor {
        buf: Arc::new(data),
        shape: shape.to_vec(),
    }
}

pub fn data64(t: &RT) -> Vec<f64> {
    (*t.buf).clone()
}

impl Backend for RefBackend {
    type Buf = Arc<Vec<f64>>;
    fn describe(&self) -> String {
        "reference (f64)".into()
    }
    fn upload(&self, data: &[f32], shape: &[usize]) -> RT {
        from_ref(r::upload(data, shape))
    }
    fn download(&self, t: &RT) -> Vec<f32> {
        r::download(&to_ref(t))
    }
    fn zeros(&self, shape: &[usize]) -> RT {
        from_ref(r::zeros(shape))
    }
    fn fill(&self, shape: &[usize], value: f32) -> RT {
        from_ref(r::fill(shape, value))
    }
    fn transpose(&self, x: &RT, perm: &[usize]) -> RT {
        from_ref(r::transpose(&to_ref(x), perm))
    }
    fn concat(&self, xs: &[&RT], axis: usize) -> RT {
        let v: Vec<RefTensor> = xs.iter().map(|t| to_ref(t)).collect();
        let refs: Vec<&RefTensor> = v.iter().collect();
        from_ref(r::concat(&refs, axis))
    }
    fn slice(&self, x: &RT, axis: usize, start: usize, end: usize) -> RT {
        from_ref(r::slice(&to_ref(x), axis, start, end))
    }
    fn pad(&self, x: &RT, pads: &[(usize, usize)], mode: PadMode, value: f32) -> RT {
        from_ref(r::pad(&to_ref(x), pads, mode, value))
    }
    fn pad_backward(
        &self,
        dy: &RT,
        x_shape: &[usize],
        pads: &[(usize, usize)],
        mode: PadMode,
    ) -> RT {
        from_ref(r::pad_backward(&to_ref(dy), x_shape, pads, mode))
    }
    fn broadcast_to(&self, x: &RT, shape: &[usize]) -> RT {
        from_ref(r::broadcast_to(&to_ref(x), shape))
    }
    fn conv2d(&self, x: &RT, w: &RT, bias: Option<&RT>, p: &Conv2dParams) -> RT {
        let b = bias.map(to_ref);
        from_ref(r::conv2d(&to_ref(x), &to_ref(w), b.as_ref(), p))
    }
    fn conv2d_backward_input(&self, dy: &RT, w: &RT, p: &Conv2dParams, x_shape: [usize; 4]) -> RT {
        from_ref(r::conv2d_backward_input(
            &to_ref(dy),
            &to_ref(w),
            p,
            x_shape,
        ))
    }
    fn conv2d_backward_weight(&self, dy: &RT, x: &RT, p: &Conv2dParams, w_shape: [usize; 4]) -> RT {
        from_ref(r::conv2d_backward_weight(
            &to_ref(dy),
            &to_ref(x),
            p,
            w_shape,
        ))
    }
    fn matmul(&self, a: &RT, b: &RT, trans_a: bool, trans_b: bool) -> RT {
        from_ref(r::matmul(&to_ref(a), &to_ref(b), trans_a, trans_b))
    }
    fn pool2d(&self, x: &RT, p: &Pool2dParams) -> RT {
        from_ref(r::pool2d(&to_ref(x), p))
    }
    fn pool2d_backward(&self, dy: &RT, x: &RT, p: &Pool2dParams) -> RT {
        from_ref(r::pool2d_backward(&to_ref(dy), &to_ref(x), p))
    }
    fn unary(&self, op: Unary, x: &RT) -> RT {
        from_ref(r::unary(op, &to_ref(x)))
    }
    fn unary_backward(&self, op: Unary, x: &RT, y: &RT, dy: &RT) -> RT {
        from_ref(r::unary_backward(op, &to_ref(x), &to_ref(y), &to_ref(dy)))
    }
    fn binary(&self, op: Binary, a: &RT, b: &RT) -> RT {
        from_ref(r::binary(op, &to_ref(a), &to_ref(b)))
    }
    fn reduce_sum_to(&self, x: &RT, shape: &[usize]) -> RT {
        from_ref(r::reduce_sum_to(&to_ref(x), shape))
    }
    fn reduce(&self, x: &RT, axes: &[usize], op: ReduceOp, keepdims: bool) -> RT {
        from_ref(r::reduce(&to_ref(x), axes, op, keepdims))
    }
    fn softmax(&self, x: &RT, axis: usize, log: bool) -> RT {
        from_ref(r::softmax(&to_ref(x), axis, log))
    }
    fn softmax_backward(&self, y: &RT, dy: &RT, axis: usize, log: bool) -> RT {
        from_ref(r::softmax_backward(&to_ref(y), &to_ref(dy), axis, log))
    }
    fn loss(&self, kind: Loss, logits: &RT, targets: &LossTargets<'_, Self>) -> (RT, RT) {
        let dense;
        let t = match targets {
            LossTargets::Classes(c) => RefLossTargets::Classes(c),
            LossTargets::Dense(d) => {
                dense = to_ref(d);
                RefLossTargets::Dense(&dense)
            }
        };
        let (l, g) = r::loss(kind, &to_ref(logits), &t);
        (from_ref(l), from_ref(g))
    }
    fn resize(&self, x: &RT, p: &ResizeParams) -> RT {
        from_ref(r::resize(&to_ref(x), p))
    }
    fn resize_backward(&self, dy: &RT, x_shape: [usize; 4], p: &ResizeParams) -> RT {
        from_ref(r::resize_backward(&to_ref(dy), x_shape, p))
    }
    fn sign_step(&self, x: &RT, g: &RT, alpha: f32) -> RT {
        from_ref(r::sign_step(&to_ref(x), &to_ref(g), alpha))
    }
    fn l2_step(&self, x: &RT, g: &RT, alpha: f32) -> RT {
        from_ref(r::l2_step(&to_ref(x), &to_ref(g), alpha))
    }
    fn project(&self, x: &RT, x0: &RT, eps: f32, norm: Norm) -> RT {
        from_ref(r::project(&to_ref(x), &to_ref(x0), eps, norm))
    }
    fn clamp_per_sample(&self, x: &RT, lo: &[f32], hi: &[f32]) -> RT {
        from_ref(r::clamp_per_sample(&to_ref(x), lo, hi))
    }
    fn norm_per_sample(&self, x: &RT, norm: Norm) -> RT {
        from_ref(r::norm_per_sample(&to_ref(x), norm))
    }
    fn random_uniform(&self, shape: &[usize], seed: u64, lo: f32, hi: f32) -> RT {
        from_ref(r::random_uniform(shape, seed, lo, hi))
    }
    fn random_normal(&self, shape: &[usize], seed: u64, std: f32) -> RT {
        from_ref(r::random_normal(shape, seed, std))
    }
}
