// Kernels of the purifier plugins (plugins/purifiers: bit-depth, tv, lgs), run through the
// plugin SDK's `run_shader`. Each kernel has a CPU twin in plugins/purifiers/src that performs
// the same f32 operations in the same order; that twin is the CPU backend's fallback.
//
// Binding layout (fixed by the host, see AdvShaderCall): binding 0 = `params` (f32 array),
// bindings 1..=n = the n inputs (read), binding n+1 = the output (read_write, zeroed by the host).
// Integers travel as f32 (exact below 2^24). Distinct entry points reuse binding numbers with
// different variables: only the variables an entry point uses enter its interface.
//
// Every kernel that writes stored values ends with `finish`: round half up to the stored integer
// grid (unless the frame is floating point) and clamp to the frame's stored range.
//
// Entry points:
//
// bit_depth        (1-D dispatch, workgroup 64, global index i = id.x + id.y * 64 * groups.x)
//   @1 x   [N*C*H*W] stored values
//   @2 out [N*C*H*W]
//   params: [n_frames, per_frame_len, then per frame: anchor, step, 1/step, lo, hi, round]
//   out = finish(anchor + floor((x - anchor) / step + 0.5) * step)
//
// tv_chambolle     (one workgroup of 256 per channel plane, plane = wg.x + wg.y * groups.x)
//   @1 x   [P*H*W] stored values, P = N*C planes
//   @2 out [3*P*H*W]: [0, T) the result, [T, 2T) dual field p (rows), [2T, 3T) p (cols), T = P*H*W
//   params: [H, W, C, P, iterations, then per frame: weight, lo, hi, round]
//   Chambolle's projection algorithm in the form of scikit-image's denoise_tv_chambolle
//   (tau = 1/4, fixed iteration count, no early stop); the dual field lives in the output's tail,
//   synchronised between phases with storageBarrier. Use take_prefix to keep the result.
//
// take_prefix      (1-D dispatch, workgroup 64)
//   @1 src [>= n]
//   @2 out [n]
//   params: [n]
//
// lgs_grad         (1-D dispatch over N*H*W, workgroup 64)
//   @1 x   [N*C*H*W]
//   @2 out [N*H*W] first-order gradient magnitude of the frame's grey level: the channel mean of
//          (clamp(x, lo, hi) - lo) / (hi - lo); forward differences, 0 on the last row/column
//   params: [H, W, C, N, then per frame: lo, hi]
//
// lgs_windows      (one workgroup of 256 per frame, frame = wg.x + wg.y * groups.x)
//   @1 g   [N*H*W] from lgs_grad
//   @2 out [N*(2 + NY*NX)]: per frame min(g), max(g), then one flag per window (1 = the mean of
//          the normalised gradient (g - min) / (max - min + 1e-7) over the window > threshold)
//   params: [H, W, N, window, stride, NY, NX, threshold]
//
// lgs_apply        (1-D dispatch over N*C*H*W, workgroup 64)
//   @1 x   [N*C*H*W]
//   @2 g   [N*H*W]
//   @3 win [N*(2 + NY*NX)] from lgs_windows
//   @4 out [N*C*H*W] = finish(lo + (x - lo) * (1 - clamp(lam * gn * covered, 0, 1)))
//   params: [H, W, C, N, window, stride, NY, NX, lambda, then per frame: lo, range_lo, range_hi,
//           round]; lo = the lower edge of the reference interval (window or stored range)
//
// Window origins along a side of length L (window k, stride s): 0, s, 2s, ... while o + k < L,
// then L - k (so the last window touches the border); one window of extent L when L <= k.

@group(0) @binding(0) var<storage, read> params: array<f32>;

// One-input kernels.
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read_write> dst: array<f32>;

// lgs_apply (three inputs).
@group(0) @binding(1) var<storage, read> ap_x: array<f32>;
@group(0) @binding(2) var<storage, read> ap_g: array<f32>;
@group(0) @binding(3) var<storage, read> ap_win: array<f32>;
@group(0) @binding(4) var<storage, read_write> ap_out: array<f32>;

fn finish(v: f32, lo: f32, hi: f32, round_it: f32) -> f32 {
    var r = v;
    if (round_it > 0.5) {
        r = floor(r + 0.5);
    }
    return clamp(r, lo, hi);
}

fn flat_index(id: vec3<u32>, groups: vec3<u32>) -> u32 {
    return id.x + id.y * groups.x * 64u;
}

@compute @workgroup_size(64)
fn bit_depth(@builtin(global_invocation_id) id: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let i = flat_index(id, groups);
    let nf = u32(params[0]);
    let per = u32(params[1]);
    if (i >= nf * per) {
        return;
    }
    let b = 2u + (i / per) * 6u;
    let anchor = params[b];
    let stp = params[b + 1u];
    let inv = params[b + 2u];
    let t = (src[i] - anchor) * inv;
    let q = anchor + floor(t + 0.5) * stp;
    dst[i] = finish(q, params[b + 3u], params[b + 4u], params[b + 5u]);
}

@compute @workgroup_size(64)
fn take_prefix(@builtin(global_invocation_id) id: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let i = flat_index(id, groups);
    if (i < u32(params[0])) {
        dst[i] = src[i];
    }
}

@compute @workgroup_size(256)
fn tv_chambolle(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
) {
    let h = u32(params[0]);
    let w = u32(params[1]);
    let c = u32(params[2]);
    let np = u32(params[3]);
    let iters = u32(params[4]);
    let plane = wid.x + wid.y * groups.x;
    if (plane >= np) {
        return;
    }
    let fb = 5u + (plane / c) * 4u;
    let weight = params[fb];
    let hw = h * w;
    let base = plane * hw;
    let total = np * hw;
    let p0 = total + base;
    let p1 = 2u * total + base;
    let tau = 0.25;
    let scale = tau / weight;
    for (var it = 0u; it < iters; it++) {
        // out = x + d, d = the negative divergence of p (backward differences).
        for (var k = lid; k < hw; k += 256u) {
            let r = k / w;
            let col = k % w;
            var d = -dst[p0 + k] - dst[p1 + k];
            if (r > 0u) {
                d += dst[p0 + k - w];
            }
            if (col > 0u) {
                d += dst[p1 + k - 1u];
            }
            dst[base + k] = src[base + k] + d;
        }
        storageBarrier();
        if (it + 1u < iters) {
            // p = (p - tau * grad(out)) / (1 + tau / weight * |grad(out)|), forward differences.
            for (var k = lid; k < hw; k += 256u) {
                let r = k / w;
                let col = k % w;
                let o = dst[base + k];
                var g0 = 0.0;
                var g1 = 0.0;
                if (r + 1u < h) {
                    g0 = dst[base + k + w] - o;
                }
                if (col + 1u < w) {
                    g1 = dst[base + k + 1u] - o;
                }
                let norm = sqrt(g0 * g0 + g1 * g1) * scale + 1.0;
                dst[p0 + k] = (dst[p0 + k] - tau * g0) / norm;
                dst[p1 + k] = (dst[p1 + k] - tau * g1) / norm;
            }
            storageBarrier();
        }
    }
    for (var k = lid; k < hw; k += 256u) {
        dst[base + k] = finish(dst[base + k], params[fb + 1u], params[fb + 2u], params[fb + 3u]);
    }
}

@compute @workgroup_size(64)
fn lgs_grad(@builtin(global_invocation_id) id: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let i = flat_index(id, groups);
    let h = u32(params[0]);
    let w = u32(params[1]);
    let c = u32(params[2]);
    let n = u32(params[3]);
    let hw = h * w;
    if (i >= n * hw) {
        return;
    }
    let f = i / hw;
    let k = i % hw;
    let r = k / w;
    let col = k % w;
    let lo = params[4u + f * 2u];
    let hi = params[5u + f * 2u];
    let inv = 1.0 / (hi - lo);
    let fbase = f * c * hw;
    var v = 0.0;
    var vr = 0.0;
    var vd = 0.0;
    for (var ch = 0u; ch < c; ch++) {
        let pb = fbase + ch * hw;
        v += (clamp(src[pb + k], lo, hi) - lo) * inv;
        if (col + 1u < w) {
            vr += (clamp(src[pb + k + 1u], lo, hi) - lo) * inv;
        }
        if (r + 1u < h) {
            vd += (clamp(src[pb + k + w], lo, hi) - lo) * inv;
        }
    }
    let cf = f32(c);
    var gx = 0.0;
    var gy = 0.0;
    if (col + 1u < w) {
        gx = (v - vr) / cf;
    }
    if (r + 1u < h) {
        gy = (v - vd) / cf;
    }
    dst[i] = sqrt(gx * gx + gy * gy);
}

var<workgroup> wg_min: array<f32, 256>;
var<workgroup> wg_max: array<f32, 256>;

fn window_origin(j: u32, n: u32, len: u32, k: u32, s: u32) -> u32 {
    if (len <= k) {
        return 0u;
    }
    if (j + 1u == n) {
        return len - k;
    }
    return j * s;
}

@compute @workgroup_size(256)
fn lgs_windows(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
) {
    let h = u32(params[0]);
    let w = u32(params[1]);
    let n = u32(params[2]);
    let k = u32(params[3]);
    let s = u32(params[4]);
    let ny = u32(params[5]);
    let nx = u32(params[6]);
    let thr = params[7];
    let f = wid.x + wid.y * groups.x;
    if (f >= n) {
        return;
    }
    let hw = h * w;
    let gb = f * hw;
    var lo = 3.0e38;
    var hi = -3.0e38;
    for (var i = lid; i < hw; i += 256u) {
        lo = min(lo, src[gb + i]);
        hi = max(hi, src[gb + i]);
    }
    wg_min[lid] = lo;
    wg_max[lid] = hi;
    workgroupBarrier();
    for (var hs = 128u; hs > 0u; hs = hs / 2u) {
        if (lid < hs) {
            wg_min[lid] = min(wg_min[lid], wg_min[lid + hs]);
            wg_max[lid] = max(wg_max[lid], wg_max[lid + hs]);
        }
        workgroupBarrier();
    }
    let gmin = wg_min[0];
    let gmax = wg_max[0];
    let ob = f * (2u + ny * nx);
    if (lid == 0u) {
        dst[ob] = gmin;
        dst[ob + 1u] = gmax;
    }
    let inv = 1.0 / (gmax - gmin + 1e-7);
    let ey = min(k, h);
    let ex = min(k, w);
    for (var j = lid; j < ny * nx; j += 256u) {
        let oy = window_origin(j / nx, ny, h, k, s);
        let ox = window_origin(j % nx, nx, w, k, s);
        var sum = 0.0;
        for (var y = 0u; y < ey; y++) {
            for (var x = 0u; x < ex; x++) {
                sum += (src[gb + (oy + y) * w + ox + x] - gmin) * inv;
            }
        }
        var flag = 0.0;
        if (sum / f32(ey * ex) > thr) {
            flag = 1.0;
        }
        dst[ob + 2u + j] = flag;
    }
}

@compute @workgroup_size(64)
fn lgs_apply(@builtin(global_invocation_id) id: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let i = flat_index(id, groups);
    let h = u32(params[0]);
    let w = u32(params[1]);
    let c = u32(params[2]);
    let n = u32(params[3]);
    let k = u32(params[4]);
    let s = u32(params[5]);
    let ny = u32(params[6]);
    let nx = u32(params[7]);
    let lam = params[8];
    let hw = h * w;
    if (i >= n * c * hw) {
        return;
    }
    let f = i / (c * hw);
    let px = i % hw;
    let r = px / w;
    let col = px % w;
    let ob = f * (2u + ny * nx);
    let gmin = ap_win[ob];
    let gmax = ap_win[ob + 1u];
    let ey = min(k, h);
    let ex = min(k, w);
    var covered = 0.0;
    for (var jy = 0u; jy < ny; jy++) {
        let oy = window_origin(jy, ny, h, k, s);
        if (oy > r) {
            break;
        }
        if (oy + ey <= r) {
            continue;
        }
        for (var jx = 0u; jx < nx; jx++) {
            let ox = window_origin(jx, nx, w, k, s);
            if (ox > col) {
                break;
            }
            if (ox + ex > col && ap_win[ob + 2u + jy * nx + jx] > 0.5) {
                covered = 1.0;
            }
        }
    }
    let gn = (ap_g[f * hw + px] - gmin) * (1.0 / (gmax - gmin + 1e-7));
    let m = clamp(lam * gn * covered, 0.0, 1.0);
    let fb = 9u + f * 4u;
    let lo = params[fb];
    let v = lo + (ap_x[i] - lo) * (1.0 - m);
    ap_out[i] = finish(v, params[fb + 1u], params[fb + 2u], params[fb + 3u]);
}
