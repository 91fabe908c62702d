// Data movement family: strided copy (transpose, broadcast_to, slice, concat) and per-axis pad
// with its adjoint. Rust twin: core/src/runtime/gpu/movement.rs.

const WG: u32 = 256u;

// ---- strided copy: 0 params, 1 src (read), 2 dst (write) ---------------------------------------
// Element i of `shape` (rank <= 8) reads src[src_off + sum idx*ss] and writes
// dst[dst_off + sum idx*ds]. Transpose permutes the source strides, broadcast zeroes them,
// slice offsets the source, concat offsets the destination.
struct CopyParams {
    n: u32,
    rank: u32,
    src_off: u32,
    dst_off: u32,
    shape: array<vec4<u32>, 2>,
    ss: array<vec4<u32>, 2>,
    ds: array<vec4<u32>, 2>,
}

@group(0) @binding(0) var<uniform> cp: CopyParams;
@group(0) @binding(1) var<storage, read> csrc: array<f32>;
@group(0) @binding(2) var<storage, read_write> cdst: array<f32>;

@compute @workgroup_size(256)
fn strided_copy(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let i = wg_linear(wid, nwg) * WG + lid;
    if (i >= cp.n) {
        return;
    }
    var rem = i;
    var s = cp.src_off;
    var t = cp.dst_off;
    for (var d = i32(cp.rank) - 1; d >= 0; d--) {
        let du = u32(d);
        let len = cp.shape[du >> 2u][du & 3u];
        let c = rem % len;
        rem = rem / len;
        s += c * cp.ss[du >> 2u][du & 3u];
        t += c * cp.ds[du >> 2u][du & 3u];
    }
    cdst[t] = csrc[s];
}

// ---- pad one axis: 0 params, 1 src (read), 2 dst (write) ---------------------------------------
// The tensor is viewed as [outer, len, inner] with `len` = len_in (src) / len_out (dst). A
// multi-axis pad is a chain of these (NumPy pads axis by axis the same way), and its adjoint is
// the chain of `pad_axis_bwd` in reverse order. mode: 0 constant, 1 reflect, 2 edge.
struct PadParams {
    n: u32,
    outer: u32,
    len_in: u32,
    len_out: u32,
    inner: u32,
    before: u32,
    mode: u32,
    value: f32,
}

@group(0) @binding(0) var<uniform> pp: PadParams;
@group(0) @binding(1) var<storage, read> psrc: array<f32>;
@group(0) @binding(2) var<storage, read_write> pdst: array<f32>;

// Source index along the axis for output position o, or -1 for constant fill
// (mirrors `reference::pad_source`).
fn pad_source(o: u32) -> i32 {
    let n = i32(pp.len_in);
    let i = i32(o) - i32(pp.before);
    if (i >= 0 && i < n) {
        return i;
    }
    if (pp.mode == 0u) {
        return -1;
    }
    if (pp.mode == 2u) {
        return select(n - 1, 0, i < 0);
    }
    if (n == 1) {
        return 0;
    }
    let period = 2 * (n - 1);
    var r = i % period;
    if (r < 0) {
        r += period;
    }
    if (r >= n) {
        r = period - r;
    }
    return r;
}

@compute @workgroup_size(256)
fn pad_axis(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    let i = wg_linear(wid, nwg) * WG + lid;
    if (i >= pp.n) {
        return;
    }
    let k = i % pp.inner;
    let j = (i / pp.inner) % pp.len_out;
    let o = i / (pp.inner * pp.len_out);
    let s = pad_source(j);
    if (s < 0) {
        pdst[i] = pp.value;
    } else {
        pdst[i] = psrc[(o * pp.len_in + u32(s)) * pp.inner + k];
    }
}

// Adjoint of `pad_axis`: one invocation per input element gathers every output position that
// maps to it (the interior one plus any pad-region copies), so no atomics are needed and the
// summation order is fixed. Here src is dy ([outer, len_out, inner]) and dst is dx.
@compute @workgroup_size(256)
fn pad_axis_bwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let i = wg_linear(wid, nwg) * WG + lid;
    if (i >= pp.n) {
        return;
    }
    let k = i % pp.inner;
    let x = (i / pp.inner) % pp.len_in;
    let o = i / (pp.inner * pp.len_in);
    let base = o * pp.len_out * pp.inner + k;
    var acc = psrc[base + (x + pp.before) * pp.inner];
    if (pp.mode != 0u) {
        for (var j = 0u; j < pp.before; j++) {
            if (pad_source(j) == i32(x)) {
                acc += psrc[base + j * pp.inner];
            }
        }
        for (var j = pp.before + pp.len_in; j < pp.len_out; j++) {
            if (pad_source(j) == i32(x)) {
                acc += psrc[base + j * pp.inner];
            }
        }
    }
    pdst[i] = acc;
}
