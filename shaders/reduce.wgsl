// Reduce / softmax / loss family. Rust twin: core/src/runtime/gpu/reduce.rs.
//
// Every reduction has a fixed summation order (per-thread strided partial sums, then a fixed
// shared-memory tree), so results are bit-reproducible without atomics.

const WG: u32 = 256u;

var<workgroup> partial: array<f32, 256>;

// Tree-reduces `partial` (sum); the total ends up in partial[0]. Call from uniform control flow.
fn tree_sum(lid: u32) {
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        workgroupBarrier();
        if (lid < s) {
            partial[lid] = partial[lid] + partial[lid + s];
        }
    }
    workgroupBarrier();
}

// ---- strided reduction: 0 params, 1 x (read), 2 y (write) --------------------------------------
// Output o is unravelled over the kept axes (shape `out_shape`, x strides `out_strides`); the
// reduced axes (`red_shape`, `red_strides`) are walked in row-major order. Both lists are
// rank <= 8 after the host merged contiguous axes. y = scale * sum.
struct ReduceParams {
    n_out: u32,
    n_red: u32,
    rank_out: u32,
    rank_red: u32,
    scale: f32,
    _p0: u32,
    _p1: u32,
    _p2: u32,
    out_shape: array<vec4<u32>, 2>,
    out_strides: array<vec4<u32>, 2>,
    red_shape: array<vec4<u32>, 2>,
    red_strides: array<vec4<u32>, 2>,
}

@group(0) @binding(0) var<uniform> rp: ReduceParams;
@group(0) @binding(1) var<storage, read> rx: array<f32>;
@group(0) @binding(2) var<storage, read_write> ry: array<f32>;

fn out_base(o: u32) -> u32 {
    var rem = o;
    var off = 0u;
    for (var d = i32(rp.rank_out) - 1; d >= 0; d--) {
        let du = u32(d);
        let len = rp.out_shape[du >> 2u][du & 3u];
        off += (rem % len) * rp.out_strides[du >> 2u][du & 3u];
        rem = rem / len;
    }
    return off;
}

fn red_offset(j: u32) -> u32 {
    var rem = j;
    var off = 0u;
    for (var d = i32(rp.rank_red) - 1; d >= 0; d--) {
        let du = u32(d);
        let len = rp.red_shape[du >> 2u][du & 3u];
        off += (rem % len) * rp.red_strides[du >> 2u][du & 3u];
        rem = rem / len;
    }
    return off;
}

// One invocation per output: for short reductions with many outputs.
@compute @workgroup_size(256)
fn reduce_small(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let o = wg_linear(wid, nwg) * WG + lid;
    if (o >= rp.n_out) {
        return;
    }
    let base = out_base(o);
    var acc = 0.0;
    for (var j = 0u; j < rp.n_red; j++) {
        acc += rx[base + red_offset(j)];
    }
    ry[o] = acc * rp.scale;
}

// One workgroup per output: for long reductions (pairwise-ish summation also keeps f32 error low).
@compute @workgroup_size(256)
fn reduce_large(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let o = wg_linear(wid, nwg);
    if (o >= rp.n_out) {
        return;
    }
    let base = out_base(o);
    var acc = 0.0;
    for (var j = lid; j < rp.n_red; j += WG) {
        acc += rx[base + red_offset(j)];
    }
    partial[lid] = acc;
    tree_sum(lid);
    if (lid == 0u) {
        ry[o] = partial[0] * rp.scale;
    }
}

// ---- softmax along an axis: 0 params, 1 x (read), 2 y (write) ----------------------------------
// Viewed as [outer, len, inner]; one invocation per (outer, inner) row. log = 1: log-softmax.
struct SoftmaxParams {
    rows: u32,
    len: u32,
    inner: u32,
    log: u32,
}

@group(0) @binding(0) var<uniform> sp: SoftmaxParams;
@group(0) @binding(1) var<storage, read> sx: array<f32>;
@group(0) @binding(2) var<storage, read_write> sy: array<f32>;

@compute @workgroup_size(256)
fn softmax_fwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let r = wg_linear(wid, nwg) * WG + lid;
    if (r >= sp.rows) {
        return;
    }
    let base = (r / sp.inner) * sp.len * sp.inner + r % sp.inner;
    var mx = sx[base];
    for (var k = 1u; k < sp.len; k++) {
        mx = max(mx, sx[base + k * sp.inner]);
    }
    var sum = 0.0;
    for (var k = 0u; k < sp.len; k++) {
        sum += exp(sx[base + k * sp.inner] - mx);
    }
    let ls = log(sum);
    for (var k = 0u; k < sp.len; k++) {
        let z = sx[base + k * sp.inner] - mx;
        if (sp.log != 0u) {
            sy[base + k * sp.inner] = z - ls;
        } else {
            sy[base + k * sp.inner] = exp(z) / sum;
        }
    }
}

// ---- softmax backward: 0 params, 1 y, 2 dy (read), 3 dx (write) --------------------------------
// softmax: dx = y * (dy - sum(dy * y)); log-softmax: dx = dy - exp(y) * sum(dy).
@group(0) @binding(0) var<uniform> sbp: SoftmaxParams;
@group(0) @binding(1) var<storage, read> sby: array<f32>;
@group(0) @binding(2) var<storage, read> sbdy: array<f32>;
@group(0) @binding(3) var<storage, read_write> sbdx: array<f32>;

@compute @workgroup_size(256)
fn softmax_bwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let r = wg_linear(wid, nwg) * WG + lid;
    if (r >= sbp.rows) {
        return;
    }
    let base = (r / sbp.inner) * sbp.len * sbp.inner + r % sbp.inner;
    var s = 0.0;
    for (var k = 0u; k < sbp.len; k++) {
        let i = base + k * sbp.inner;
        if (sbp.log != 0u) {
            s += sbdy[i];
        } else {
            s += sbdy[i] * sby[i];
        }
    }
    for (var k = 0u; k < sbp.len; k++) {
        let i = base + k * sbp.inner;
        if (sbp.log != 0u) {
            sbdx[i] = sbdy[i] - exp(sby[i]) * s;
        } else {
            sbdx[i] = sby[i] * (sbdy[i] - s);
        }
    }
}

// ---- class losses: 0 params, 1 logits [N, K], 2 classes (u32, read), 3 loss [N], 4 dlogits ------
// OP: 0 cross-entropy, 1 Carlini-Wagner margin, 2 DLR. One invocation per sample; corner cases
// follow `reference::loss` (first maximal index wins ties; CW gradient only strictly above -kappa).
override OP: u32 = 0u;

struct LossParams {
    n: u32,
    k: u32,
    kappa: f32,
    _p: u32,
}

@group(0) @binding(0) var<uniform> lp: LossParams;
@group(0) @binding(1) var<storage, read> lz: array<f32>;
@group(0) @binding(2) var<storage, read> lt: array<u32>;
@group(0) @binding(3) var<storage, read_write> lloss: array<f32>;
@group(0) @binding(4) var<storage, read_write> lgrad: array<f32>;

// First index of the maximal logit of row `base`, skipping up to two indices.
fn argmax_skip(base: u32, s0: u32, s1: u32) -> u32 {
    var best = 0xffffffffu;
    for (var i = 0u; i < lp.k; i++) {
        if (i == s0 || i == s1) {
            continue;
        }
        if (best == 0xffffffffu || lz[base + i] > lz[base + best]) {
            best = i;
        }
    }
    return best;
}

@compute @workgroup_size(64)
fn loss_class(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let s = wg_linear(wid, nwg) * 64u + lid;
    if (s >= lp.n) {
        return;
    }
    let base = s * lp.k;
    let t = lt[s];
    let none = 0xffffffffu;
    for (var i = 0u; i < lp.k; i++) {
        lgrad[base + i] = 0.0;
    }
    if (OP == 0u) {
        var mx = lz[base];
        for (var i = 1u; i < lp.k; i++) {
            mx = max(mx, lz[base + i]);
        }
        var sum = 0.0;
        for (var i = 0u; i < lp.k; i++) {
            sum += exp(lz[base + i] - mx);
        }
        let lse = mx + log(sum);
        lloss[s] = lse - lz[base + t];
        for (var i = 0u; i < lp.k; i++) {
            lgrad[base + i] = exp(lz[base + i] - lse) - select(0.0, 1.0, i == t);
        }
    } else if (OP == 1u) {
        let j = argmax_skip(base, t, none);
        let margin = lz[base + t] - lz[base + j];
        if (margin > -lp.kappa) {
            lloss[s] = margin;
            lgrad[base + t] = 1.0;
            lgrad[base + j] = -1.0;
        } else {
            lloss[s] = -lp.kappa;
        }
    } else {
        let j = argmax_skip(base, t, none);
        let p1 = argmax_skip(base, none, none);
        let p2 = argmax_skip(base, p1, none);
        let p3 = argmax_skip(base, p1, p2);
        let num = lz[base + t] - lz[base + j];
        let den = lz[base + p1] - lz[base + p3] + 1e-12;
        lloss[s] = -num / den;
        let q = num / (den * den);
        lgrad[base + t] -= 1.0 / den;
        lgrad[base + j] += 1.0 / den;
        lgrad[base + p1] += q;
        lgrad[base + p3] -= q;
    }
}

// ---- MSE: 0 params, 1 logits, 2 target (f32, read), 3 loss [N], 4 dlogits ----------------------
// One workgroup per sample of `k` elements: loss = mean (z - t)^2, grad = 2 (z - t) / k.
@group(0) @binding(0) var<uniform> mp: LossParams;
@group(0) @binding(1) var<storage, read> mz: array<f32>;
@group(0) @binding(2) var<storage, read> mt: array<f32>;
@group(0) @binding(3) var<storage, read_write> mloss: array<f32>;
@group(0) @binding(4) var<storage, read_write> mgrad: array<f32>;

@compute @workgroup_size(256)
fn loss_mse(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    let s = wg_linear(wid, nwg);
    if (s >= mp.n) {
        return;
    }
    let base = s * mp.k;
    let inv = 1.0 / f32(mp.k);
    var acc = 0.0;
    for (var i = lid; i < mp.k; i += WG) {
        let d = mz[base + i] - mt[base + i];
        acc += d * d;
        mgrad[base + i] = 2.0 * d * inv;
    }
    partial[lid] = acc;
    tree_sum(lid);
    if (lid == 0u) {
        mloss[s] = partial[0] * inv;
    }
}
