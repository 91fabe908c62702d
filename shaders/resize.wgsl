// Resize family. Rust twin: core/src/runtime/gpu/resize.rs.
//
// Every resize mode (nearest, bilinear, area) is separable: output (r, c) of a plane is
// sum_i sum_j wy(r, i) * wx(c, j) * in(i, j) over short per-row and per-column tap lists. The host
// builds those lists (CSR: offsets + (index, weight) pairs) from `reference::resize_taps`, so
// the GPU applies exactly the reference's taps. The adjoint is the same kernel with transposed
// (CSC) lists, which keeps the backward a deterministic gather.

const WG: u32 = 256u;

// Table layout (u32 words): row offsets [out_h + 1] at 0, column offsets [out_w + 1] at
// `col_off`, row taps at `row_taps`, column taps at `col_taps`; a tap is (index, f32 bits) and
// offsets count taps.
struct ResizeParams {
    planes: u32,
    in_h: u32,
    in_w: u32,
    out_h: u32,
    out_w: u32,
    col_off: u32,
    row_taps: u32,
    col_taps: u32,
}

// 0 params, 1 src [planes, in_h, in_w] (read), 2 table (u32, read), 3 dst [planes, out_h, out_w].
@group(0) @binding(0) var<uniform> rp: ResizeParams;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read> table: array<u32>;
@group(0) @binding(3) var<storage, read_write> dst: array<f32>;

@compute @workgroup_size(256)
fn resize_separable(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_index) lid: u32) {
    let i = wg_linear(wid, nwg) * WG + lid;
    if (i >= rp.planes * rp.out_h * rp.out_w) {
        return;
    }
    let c = i % rp.out_w;
    let r = (i / rp.out_w) % rp.out_h;
    let plane = (i / (rp.out_w * rp.out_h)) * rp.in_h * rp.in_w;
    let r0 = table[r];
    let r1 = table[r + 1u];
    let c0 = table[rp.col_off + c];
    let c1 = table[rp.col_off + c + 1u];
    var acc = 0.0;
    for (var a = r0; a < r1; a++) {
        let iy = table[rp.row_taps + 2u * a];
        let wy = bitcast<f32>(table[rp.row_taps + 2u * a + 1u]);
        var row = 0.0;
        for (var b = c0; b < c1; b++) {
            let ix = table[rp.col_taps + 2u * b];
            let wx = bitcast<f32>(table[rp.col_taps + 2u * b + 1u]);
            row += wx * src[plane + iy * rp.in_w + ix];
        }
        acc += wy * row;
    }
    dst[i] = acc;
}
