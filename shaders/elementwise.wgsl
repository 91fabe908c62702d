// Elementwise family: unary forward/backward, broadcasting binary ops, fill.
// Rust twin: core/src/runtime/gpu/elementwise.rs (bind-group layouts documented there).
//
// The op is a pipeline-overridable constant, so each (kernel, op) pair compiles to a
// branch-free pipeline. Unary op codes follow `elementwise::unary_code`:
// 0 relu, 1 leaky_relu(a), 2 sigmoid, 3 tanh, 4 clip(a, b), 5 neg, 6 exp, 7 log, 8 sqrt,
// 9 abs, 10 affine(a, b), 11 powf(a), 12 sign. Binary: 0 add, 1 sub, 2 mul, 3 div, 4 max, 5 min.

override OP: u32 = 0u;

const WG: u32 = 256u;

struct UnaryParams {
    n: u32,
    a: f32,
    b: f32,
    _pad: u32,
}

fn inf() -> f32 {
    return bitcast<f32>(0x7f800000u);
}

fn nan() -> f32 {
    return bitcast<f32>(0x7fc00000u);
}

// sign(0) = 0 (WGSL `sign` agrees, but NaN handling is unspecified, so spell it out).
fn sgn(v: f32) -> f32 {
    if (v > 0.0) {
        return 1.0;
    }
    if (v < 0.0) {
        return -1.0;
    }
    return 0.0;
}

// tanh without the cancellation of (e^2x - 1) / (e^2x + 1) near zero: odd Taylor series below
// 0.1 (truncation error < 1e-10 relative), 1 - 2 / (e^2|x| + 1) above (saturates cleanly).
fn tanh_acc(v: f32) -> f32 {
    let a = abs(v);
    if (a < 0.1) {
        let v2 = v * v;
        return v * (1.0 + v2 * (-1.0 / 3.0 + v2 * (2.0 / 15.0 + v2 * (-17.0 / 315.0))));
    }
    let t = 1.0 - 2.0 / (exp(2.0 * a) + 1.0);
    return select(t, -t, v < 0.0);
}

// x^p with the real-valued semantics of `f64::powf` (WGSL `pow` is undefined for x < 0).
fn powf(x: f32, p: f32) -> f32 {
    if (p == 0.0) {
        return 1.0;
    }
    if (p == 1.0) {
        return x;
    }
    if (p == 2.0) {
        return x * x;
    }
    if (x == 0.0) {
        return select(0.0, inf(), p < 0.0);
    }
    let r = exp2(p * log2(abs(x)));
    if (x < 0.0) {
        if (fract(p) != 0.0) {
            return nan();
        }
        return select(r, -r, fract(p * 0.5) != 0.0);
    }
    return r;
}

fn unary_op(v: f32, a: f32, b: f32) -> f32 {
    switch OP {
        case 0u: { return max(v, 0.0); }
        case 1u: { return select(a * v, v, v > 0.0); }
        case 2u: { return 1.0 / (1.0 + exp(-v)); }
        case 3u: { return tanh_acc(v); }
        case 4u: { return min(max(v, a), b); }
        case 5u: { return -v; }
        case 6u: { return exp(v); }
        case 7u: { return log(v); }
        case 8u: { return sqrt(v); }
        case 9u: { return abs(v); }
        case 10u: { return a * v + b; }
        case 11u: { return powf(v, a); }
        default: { return sgn(v); }
    }
}

// d y / d x at input x with output y (see `reference::unary_derivative` for the kink rules).
fn unary_deriv(x: f32, y: f32, a: f32, b: f32) -> f32 {
    switch OP {
        case 0u: { return select(0.0, 1.0, x > 0.0); }
        case 1u: { return select(a, 1.0, x > 0.0); }
        case 2u: { return y * (1.0 - y); }
        case 3u: { return 1.0 - y * y; }
        case 4u: { return select(0.0, 1.0, x >= a && x <= b); }
        case 5u: { return -1.0; }
        case 6u: { return y; }
        case 7u: { return 1.0 / x; }
        case 8u: { return 0.5 / y; }
        case 9u: { return sgn(x); }
        case 10u: { return a; }
        case 11u: { return a * powf(x, a - 1.0); }
        default: { return 0.0; }
    }
}

// ---- unary forward: 0 params, 1 x (read), 2 y (write) ------------------------------------------
@group(0) @binding(0) var<uniform> up: UnaryParams;
@group(0) @binding(1) var<storage, read> ux: array<f32>;
@group(0) @binding(2) var<storage, read_write> uy: array<f32>;

@compute @workgroup_size(256)
fn unary_fwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32) {
    let i = wg_linear(wid, nwg) * WG + lid;
    if (i >= up.n) {
        return;
    }
    uy[i] = unary_op(ux[i], up.a, up.b);
}

// ---- unary backward: 0 params, 1 x, 2 y, 3 dy (read), 4 dx (write) -----------------------------
@group(0) @binding(0) var<uniform> bp: UnaryParams;
@group(0) @binding(1) var<storage, read> bx: array<f32>;
@group(0) @binding(2) var<storage, read> by: array<f32>;
@group(0) @binding(3) var<storage, read> bdy: array<f32>;
@group(0) @binding(4) var<storage, read_write> bdx: array<f32>;

@compute @workgroup_size(256)
fn unary_bwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32) {
    let i = wg_linear(wid, nwg) * WG + lid;
    if (i >= bp.n) {
        return;
    }
    bdx[i] = bdy[i] * unary_deriv(bx[i], by[i], bp.a, bp.b);
}

// ---- binary with broadcasting: 0 params, 1 a, 2 b (read), 3 out (write) ------------------------
// Output element i is unravelled over `shape` (rank <= 8 after the host merged contiguous axes);
// each operand's stride is 0 along its broadcast axes.
struct BinaryParams {
    n: u32,
    rank: u32,
    _p0: u32,
    _p1: u32,
    shape: array<vec4<u32>, 2>,
    sa: array<vec4<u32>, 2>,
    sb: array<vec4<u32>, 2>,
}

@group(0) @binding(0) var<uniform> np: BinaryParams;
@group(0) @binding(1) var<storage, read> na: array<f32>;
@group(0) @binding(2) var<storage, read> nb: array<f32>;
@group(0) @binding(3) var<storage, read_write> nout: array<f32>;

fn binary_op(a: f32, b: f32) -> f32 {
    switch OP {
        case 0u: { return a + b; }
        case 1u: { return a - b; }
        case 2u: { return a * b; }
        case 3u: { return a / b; }
        case 4u: { return max(a, b); }
        default: { return min(a, b); }
    }
}

@compute @workgroup_size(256)
fn binary(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) lid: u32) {
    let i = wg_linear(wid, nwg) * WG + lid;
    if (i >= np.n) {
        return;
    }
    var rem = i;
    var ia = 0u;
    var ib = 0u;
    for (var d = i32(np.rank) - 1; d >= 0; d--) {
        let du = u32(d);
        let len = np.shape[du >> 2u][du & 3u];
        let c = rem % len;
        rem = rem / len;
        ia += c * np.sa[du >> 2u][du & 3u];
        ib += c * np.sb[du >> 2u][du & 3u];
    }
    nout[i] = binary_op(na[ia], nb[ib]);
}

// ---- fill: 0 params, 1 out (write) -------------------------------------------------------------
struct FillParams {
    n: u32,
    value: f32,
}

@group(0) @binding(0) var<uniform> fp: FillParams;
@group(0) @binding(1) var<storage, read_write> fout: array<f32>;

@compute @workgroup_size(256)
fn fill(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = wg_linear(wid, nwg) * WG + lid;
    if (i >= fp.n) {
        return;
    }
    fout[i] = fp.value;
}
