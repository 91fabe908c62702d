// Pool family: 2-D max / average pooling and its adjoint. Rust twin: core/src/runtime/gpu/pool.rs.
//
// Window semantics mirror `reference::pool_axis_taps`: tap t of output o sits at
// o*stride + t*dilation - pad_begin; taps inside the input are valid; with count_include_pad the
// divisor counts taps inside the padded extent [-pad_begin, n + pad_end). Max takes the first
// maximal valid tap in row-major tap order; a window without valid taps outputs 0 and receives no
// gradient. kind: 0 max, 1 avg counting pads, 2 avg over valid taps only.

const WG: u32 = 256u;

struct PoolParams {
    nc: u32,
    h: u32,
    w: u32,
    oh: u32,
    ow: u32,
    kh: u32,
    kw: u32,
    sh: u32,
    sw: u32,
    pt: u32,
    pl: u32,
    pb: u32,
    pr: u32,
    dh: u32,
    dw: u32,
    kind: u32,
}

// ---- forward: 0 params, 1 x [N, C, H, W] (read), 2 y [N, C, oh, ow] (write) --------------------
@group(0) @binding(0) var<uniform> pp: PoolParams;
@group(0) @binding(1) var<storage, read> px: array<f32>;
@group(0) @binding(2) var<storage, read_write> py: array<f32>;

// Input row/col of tap t of output o along an axis (may be negative or past the end).
fn tap(o: u32, t: u32, s: u32, d: u32, pad: u32) -> i32 {
    return i32(o * s + t * d) - i32(pad);
}

// The divisor of an average window (0 = empty window).
fn avg_count(oy: u32, ox: u32) -> u32 {
    var cy = 0u;
    var vy = 0u;
    for (var ky = 0u; ky < pp.kh; ky++) {
        let iy = tap(oy, ky, pp.sh, pp.dh, pp.pt);
        if (iy >= -i32(pp.pt) && iy < i32(pp.h + pp.pb)) {
            cy++;
        }
        if (iy >= 0 && iy < i32(pp.h)) {
            vy++;
        }
    }
    var cx = 0u;
    var vx = 0u;
    for (var kx = 0u; kx < pp.kw; kx++) {
        let ix = tap(ox, kx, pp.sw, pp.dw, pp.pl);
        if (ix >= -i32(pp.pl) && ix < i32(pp.w + pp.pr)) {
            cx++;
        }
        if (ix >= 0 && ix < i32(pp.w)) {
            vx++;
        }
    }
    if (pp.kind == 1u) {
        return cy * cx;
    }
    return vy * vx;
}

// Flat index (within the nc plane) of the first maximal valid tap, or -1 when the window is empty.
fn argmax_window(plane: u32, oy: u32, ox: u32) -> i32 {
    var best = -1;
    var bv = 0.0;
    for (var ky = 0u; ky < pp.kh; ky++) {
        let iy = tap(oy, ky, pp.sh, pp.dh, pp.pt);
        if (iy < 0 || iy >= i32(pp.h)) {
            continue;
        }
        for (var kx = 0u; kx < pp.kw; kx++) {
            let ix = tap(ox, kx, pp.sw, pp.dw, pp.pl);
            if (ix < 0 || ix >= i32(pp.w)) {
                continue;
            }
            let idx = iy * i32(pp.w) + ix;
            let v = px[plane + u32(idx)];
            if (best < 0 || v > bv) {
                best = idx;
                bv = v;
            }
        }
    }
    return best;
}

@compute @workgroup_size(256)
fn pool_fwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    let i = wg_linear(wid, nwg) * WG + lid;
    if (i >= pp.nc * pp.oh * pp.ow) {
        return;
    }
    let ox = i % pp.ow;
    let oy = (i / pp.ow) % pp.oh;
    let plane = (i / (pp.ow * pp.oh)) * pp.h * pp.w;
    if (pp.kind == 0u) {
        let b = argmax_window(plane, oy, ox);
        py[i] = select(px[plane + u32(max(b, 0))], 0.0, b < 0);
        return;
    }
    let div = avg_count(oy, ox);
    if (div == 0u) {
        py[i] = 0.0;
        return;
    }
    var acc = 0.0;
    for (var ky = 0u; ky < pp.kh; ky++) {
        let iy = tap(oy, ky, pp.sh, pp.dh, pp.pt);
        if (iy < 0 || iy >= i32(pp.h)) {
            continue;
        }
        for (var kx = 0u; kx < pp.kw; kx++) {
            let ix = tap(ox, kx, pp.sw, pp.dw, pp.pl);
            if (ix < 0 || ix >= i32(pp.w)) {
                continue;
            }
            acc += px[plane + u32(iy) * pp.w + u32(ix)];
        }
    }
    py[i] = acc / f32(div);
}

// ---- backward: 0 params, 1 x [N, C, H, W], 2 dy [N, C, oh, ow] (read), 3 dx (write) ------------
// One invocation per input element gathers from every window containing it (no atomics). Shares
// `pp` and `px` with the forward entry.
@group(0) @binding(2) var<storage, read> bdy: array<f32>;
@group(0) @binding(3) var<storage, read_write> bdx: array<f32>;

// Output index o whose tap t lands on input i along an axis, or -1.
fn window_of(i: u32, t: u32, s: u32, d: u32, pad: u32, n_out: u32) -> i32 {
    let p = i32(i + pad) - i32(t * d);
    if (p < 0 || p % i32(s) != 0) {
        return -1;
    }
    let o = p / i32(s);
    return select(-1, o, o < i32(n_out));
}

@compute @workgroup_size(256)
fn pool_bwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    let i = wg_linear(wid, nwg) * WG + lid;
    if (i >= pp.nc * pp.h * pp.w) {
        return;
    }
    let ix = i % pp.w;
    let iy = (i / pp.w) % pp.h;
    let nc = i / (pp.w * pp.h);
    let plane_in = nc * pp.h * pp.w;
    let plane_out = nc * pp.oh * pp.ow;
    let me = i32(iy * pp.w + ix);
    var acc = 0.0;
    for (var ky = 0u; ky < pp.kh; ky++) {
        let oy = window_of(iy, ky, pp.sh, pp.dh, pp.pt, pp.oh);
        if (oy < 0) {
            continue;
        }
        for (var kx = 0u; kx < pp.kw; kx++) {
            let ox = window_of(ix, kx, pp.sw, pp.dw, pp.pl, pp.ow);
            if (ox < 0) {
                continue;
            }
            let g = bdy[plane_out + u32(oy) * pp.ow + u32(ox)];
            if (pp.kind == 0u) {
                if (argmax_window(plane_in, u32(oy), u32(ox)) == me) {
                    acc += g;
                }
            } else {
                let div = avg_count(u32(oy), u32(ox));
                if (div > 0u) {
                    acc += g / f32(div);
                }
            }
        }
    }
    bdx[i] = acc;
}
