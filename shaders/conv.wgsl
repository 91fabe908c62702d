// Conv family: 2-D convolution (ONNX Conv: strides, explicit pads, dilation, groups) as implicit
// GEMM, plus both adjoints. Rust twin: core/src/runtime/gpu/conv.rs.
//
// Per group g, each entry is a tiled GEMM whose operand tiles are gathered straight from the
// NCHW tensors (no im2col buffer):
//   forward       y[g]  (mg x N*oh*ow)  = W[g] (mg x cg*kh*kw) * im2col(x)[g]
//   backward in   dx[g] (cg x N*H*W)    = W[g]^T-ish (cg x mg*kh*kw) * col2im-gather(dy)[g]
//   backward w    dW[g] (mg x cg*kh*kw) = dy[g] (mg x N*oh*ow) * im2col(x)[g]^T
// The backward-input gather reads dy[oy, ox] for oy = (iy + pad - ky*dil) / stride when that
// divides exactly, so it is a gather (one invocation per output element, no atomics) and doubles
// as ConvTranspose's forward. Tiles are 64 x 64 with K slices of 16 in workgroup memory; each of
// the 256 invocations owns a 4 x 4 micro-tile and reduces over its K range in a fixed order.
// Every entry takes the split-K parameters: workgroup z index = group + groups * split, the split
// covering K in [split * k_chunk, (split + 1) * k_chunk) and writing its own partial plane
// (`splits` = 1: one plane, k_chunk >= K). The forward adds the bias in split 0 only.

const BM: u32 = 64u;
const BN: u32 = 64u;
const BK: u32 = 16u;

struct ConvParams {
    n: u32,
    c: u32,
    h: u32,
    w: u32,
    m: u32,
    oh: u32,
    ow: u32,
    groups: u32,
    kh: u32,
    kw: u32,
    sh: u32,
    sw: u32,
    pt: u32,
    pl: u32,
    dh: u32,
    dw: u32,
    has_bias: u32,
    tiles_m: u32,
    tiles_n: u32,
    total: u32,
    // Backward weight only: the reduction is split into `splits` chunks of `k_chunk` (a multiple
    // of BK) written to separate partial planes, summed afterwards in a fixed order.
    k_chunk: u32,
    splits: u32,
}

@group(0) @binding(0) var<uniform> cp: ConvParams;

var<workgroup> tile_a: array<f32, 1024>; // [BK][BM]
var<workgroup> tile_b: array<f32, 1024>; // [BK][BN]

// Accumulates one staged K slice into the invocation's 4 x 4 micro-tile.
fn mma(acc: ptr<function, array<f32, 16>>, tx: u32, ty: u32) {
    for (var kk = 0u; kk < BK; kk++) {
        var ra: array<f32, 4>;
        var rb: array<f32, 4>;
        for (var i = 0u; i < 4u; i++) {
            ra[i] = tile_a[kk * BM + ty + 16u * i];
            rb[i] = tile_b[kk * BN + tx + 16u * i];
        }
        for (var i = 0u; i < 4u; i++) {
            for (var j = 0u; j < 4u; j++) {
                (*acc)[i * 4u + j] += ra[i] * rb[j];
            }
        }
    }
}

// Tile coordinates of this workgroup: (row tile, column tile, group [+ groups * split]).
fn tile_coords(lin: u32) -> vec3<u32> {
    return vec3<u32>((lin / cp.tiles_n) % cp.tiles_m, lin % cp.tiles_n,
                     lin / (cp.tiles_n * cp.tiles_m));
}

// Input element (n, channel, iy, ix) of x, 0 in the padding.
fn x_at(xs: u32, ch: u32, iy: i32, ix: i32) -> u32 {
    return ((xs * cp.c + ch) * cp.h + u32(iy)) * cp.w + u32(ix);
}

// ---- forward: 0 params, 1 x [N, C, H, W], 2 w [M, C/g, kh, kw], 3 bias [M] (read; any buffer
// when has_bias = 0), 4 y [N, M, oh, ow] (write) ------------------------------------------------
@group(0) @binding(1) var<storage, read> fx: array<f32>;
@group(0) @binding(2) var<storage, read> fw: array<f32>;
@group(0) @binding(3) var<storage, read> fbias: array<f32>;
@group(0) @binding(4) var<storage, read_write> fy: array<f32>;

fn fwd_b(g: u32, cg: u32, k: u32, q: u32, kk: u32, p: u32) -> f32 {
    if (k >= kk || q >= p) {
        return 0.0;
    }
    let khw = cp.kh * cp.kw;
    let ci = k / khw;
    let ky = (k % khw) / cp.kw;
    let kx = k % cp.kw;
    let ohw = cp.oh * cp.ow;
    let xs = q / ohw;
    let oy = (q % ohw) / cp.ow;
    let ox = q % cp.ow;
    let iy = i32(oy * cp.sh + ky * cp.dh) - i32(cp.pt);
    let ix = i32(ox * cp.sw + kx * cp.dw) - i32(cp.pl);
    if (iy < 0 || iy >= i32(cp.h) || ix < 0 || ix >= i32(cp.w)) {
        return 0.0;
    }
    return fx[x_at(xs, g * cg + ci, iy, ix)];
}

@compute @workgroup_size(256)
fn conv_fwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    let lin = wg_linear(wid, nwg);
    if (lin >= cp.total) {
        return;
    }
    let t = tile_coords(lin);
    let g = t.z % cp.groups;
    let split = t.z / cp.groups;
    let cg = cp.c / cp.groups;
    let mg = cp.m / cp.groups;
    let kk = cg * cp.kh * cp.kw;
    let kend = min(kk, (split + 1u) * cp.k_chunk);
    let p = cp.n * cp.oh * cp.ow;
    let row0 = t.x * BM;
    let col0 = t.y * BN;
    var acc: array<f32, 16>;
    for (var i = 0u; i < 16u; i++) {
        acc[i] = 0.0;
    }
    for (var k0 = split * cp.k_chunk; k0 < kend; k0 += BK) {
        for (var e = 0u; e < 4u; e++) {
            let idx = lid + e * 256u;
            let ka = idx % BK;
            let ra = idx / BK;
            var va = 0.0;
            if (row0 + ra < mg && k0 + ka < kend) {
                va = fw[(g * mg + row0 + ra) * kk + k0 + ka];
            }
            tile_a[ka * BM + ra] = va;
            let kb = idx / BN;
            let cb = idx % BN;
            tile_b[kb * BN + cb] = fwd_b(g, cg, k0 + kb, col0 + cb, kend, p);
        }
        workgroupBarrier();
        mma(&acc, lid % 16u, lid / 16u);
        workgroupBarrier();
    }
    let ohw = cp.oh * cp.ow;
    for (var i = 0u; i < 4u; i++) {
        let r = row0 + lid / 16u + 16u * i;
        if (r >= mg) {
            continue;
        }
        let mo = g * mg + r;
        var bias = 0.0;
        if (cp.has_bias != 0u && split == 0u) {
            bias = fbias[mo];
        }
        for (var j = 0u; j < 4u; j++) {
            let q = col0 + lid % 16u + 16u * j;
            if (q < p) {
                let xs = q / ohw;
                fy[split * p * cp.m + (xs * cp.m + mo) * ohw + q % ohw] = acc[i * 4u + j] + bias;
            }
        }
    }
}

// ---- backward input: 0 params, 1 dy [N, M, oh, ow], 2 w (read), 3 dx [N, C, H, W] (write) -----
@group(0) @binding(1) var<storage, read> idy: array<f32>;
@group(0) @binding(2) var<storage, read> iw: array<f32>;
@group(0) @binding(3) var<storage, read_write> idx_out: array<f32>;

// Output position along an axis whose tap t reads input position i, or -1.
fn out_pos(i: u32, t: u32, s: u32, d: u32, pad: u32, n_out: u32) -> i32 {
    let pnum = i32(i + pad) - i32(t * d);
    if (pnum < 0 || pnum % i32(s) != 0) {
        return -1;
    }
    let o = pnum / i32(s);
    return select(-1, o, o < i32(n_out));
}

fn bwd_in_b(g: u32, mg: u32, k: u32, q: u32, kk: u32, p: u32) -> f32 {
    if (k >= kk || q >= p) {
        return 0.0;
    }
    let khw = cp.kh * cp.kw;
    let mo = k / khw;
    let ky = (k % khw) / cp.kw;
    let kx = k % cp.kw;
    let hw = cp.h * cp.w;
    let xs = q / hw;
    let iy = (q % hw) / cp.w;
    let ix = q % cp.w;
    let oy = out_pos(iy, ky, cp.sh, cp.dh, cp.pt, cp.oh);
    let ox = out_pos(ix, kx, cp.sw, cp.dw, cp.pl, cp.ow);
    if (oy < 0 || ox < 0) {
        return 0.0;
    }
    return idy[((xs * cp.m + g * mg + mo) * cp.oh + u32(oy)) * cp.ow + u32(ox)];
}

@compute @workgroup_size(256)
fn conv_bwd_input(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) lid: u32) {
    let lin = wg_linear(wid, nwg);
    if (lin >= cp.total) {
        return;
    }
    let t = tile_coords(lin);
    let g = t.z % cp.groups;
    let split = t.z / cp.groups;
    let cg = cp.c / cp.groups;
    let mg = cp.m / cp.groups;
    let khw = cp.kh * cp.kw;
    let kk = min(mg * khw, (split + 1u) * cp.k_chunk);
    let p = cp.n * cp.h * cp.w;
    let row0 = t.x * BM;
    let col0 = t.y * BN;
    var acc: array<f32, 16>;
    for (var i = 0u; i < 16u; i++) {
        acc[i] = 0.0;
    }
    for (var k0 = split * cp.k_chunk; k0 < kk; k0 += BK) {
        for (var e = 0u; e < 4u; e++) {
            let idx = lid + e * 256u;
            let ka = idx % BK;
            let ra = idx / BK;
            var va = 0.0;
            let k = k0 + ka;
            if (row0 + ra < cg && k < kk) {
                let mo = k / khw;
                va = iw[((g * mg + mo) * cg + row0 + ra) * khw + k % khw];
            }
            tile_a[ka * BM + ra] = va;
            let kb = idx / BN;
            let cb = idx % BN;
            tile_b[kb * BN + cb] = bwd_in_b(g, mg, k0 + kb, col0 + cb, kk, p);
        }
        workgroupBarrier();
        mma(&acc, lid % 16u, lid / 16u);
        workgroupBarrier();
    }
    let hw = cp.h * cp.w;
    for (var i = 0u; i < 4u; i++) {
        let r = row0 + lid / 16u + 16u * i;
        if (r >= cg) {
            continue;
        }
        for (var j = 0u; j < 4u; j++) {
            let q = col0 + lid % 16u + 16u * j;
            if (q < p) {
                let xs = q / hw;
                idx_out[split * p * cp.c + (xs * cp.c + g * cg + r) * hw + q % hw] = acc[i * 4u + j];
            }
        }
    }
}

// ---- backward weight: 0 params, 1 dy [N, M, oh, ow], 2 x (read), 3 dw partials
// [splits, M, C/g, kh, kw] (write) ----------------------------------------------------------------
@group(0) @binding(1) var<storage, read> wdy: array<f32>;
@group(0) @binding(2) var<storage, read> wx: array<f32>;
@group(0) @binding(3) var<storage, read_write> wdw: array<f32>;

// im2col(x)^T element (reduction index k = (n, oy, ox), column q = (ci, ky, kx)).
fn bwd_w_b(g: u32, cg: u32, k: u32, q: u32, kk: u32, cols: u32) -> f32 {
    if (k >= kk || q >= cols) {
        return 0.0;
    }
    let khw = cp.kh * cp.kw;
    let ci = q / khw;
    let ky = (q % khw) / cp.kw;
    let kx = q % cp.kw;
    let ohw = cp.oh * cp.ow;
    let xs = k / ohw;
    let oy = (k % ohw) / cp.ow;
    let ox = k % cp.ow;
    let iy = i32(oy * cp.sh + ky * cp.dh) - i32(cp.pt);
    let ix = i32(ox * cp.sw + kx * cp.dw) - i32(cp.pl);
    if (iy < 0 || iy >= i32(cp.h) || ix < 0 || ix >= i32(cp.w)) {
        return 0.0;
    }
    return wx[x_at(xs, g * cg + ci, iy, ix)];
}

@compute @workgroup_size(256)
fn conv_bwd_weight(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let lin = wg_linear(wid, nwg);
    if (lin >= cp.total) {
        return;
    }
    let t = tile_coords(lin);
    let g = t.z % cp.groups;
    let split = t.z / cp.groups;
    let cg = cp.c / cp.groups;
    let mg = cp.m / cp.groups;
    let cols = cg * cp.kh * cp.kw;
    let ohw = cp.oh * cp.ow;
    let kk = min(cp.n * ohw, (split + 1u) * cp.k_chunk);
    let row0 = t.x * BM;
    let col0 = t.y * BN;
    var acc: array<f32, 16>;
    for (var i = 0u; i < 16u; i++) {
        acc[i] = 0.0;
    }
    for (var k0 = split * cp.k_chunk; k0 < kk; k0 += BK) {
        for (var e = 0u; e < 4u; e++) {
            let idx = lid + e * 256u;
            let ka = idx % BK;
            let ra = idx / BK;
            var va = 0.0;
            let k = k0 + ka;
            if (row0 + ra < mg && k < kk) {
                va = wdy[((k / ohw) * cp.m + g * mg + row0 + ra) * ohw + k % ohw];
            }
            tile_a[ka * BM + ra] = va;
            let kb = idx % BK;
            let cb = idx / BK;
            tile_b[kb * BN + cb] = bwd_w_b(g, cg, k0 + kb, col0 + cb, kk, cols);
        }
        workgroupBarrier();
        mma(&acc, lid % 16u, lid / 16u);
        workgroupBarrier();
    }
    for (var i = 0u; i < 4u; i++) {
        let r = row0 + lid / 16u + 16u * i;
        if (r >= mg) {
            continue;
        }
        for (var j = 0u; j < 4u; j++) {
            let q = col0 + lid % 16u + 16u * j;
            if (q < cols) {
                wdw[split * cp.m * cols + (g * mg + r) * cols + q] = acc[i * 4u + j];
            }
        }
    }
}
