// Matmul family: batched C = op(A) * op(B) with a shared-memory tiled kernel.
// Rust twin: core/src/runtime/gpu/matmul.rs.
//
// Each 256-invocation workgroup computes a 64 x 64 tile of C, stepping through K in slices of 16
// staged in workgroup memory; each invocation owns a 4 x 4 micro-tile (rows ty + 16 i, columns
// tx + 16 j) and accumulates over the whole K in a fixed order (deterministic, no atomics).
// Transposes are strides: element (r, k) of op(A) is a[a_off + r * a_rs + k * a_cs].

const BM: u32 = 64u;
const BN: u32 = 64u;
const BK: u32 = 16u;

struct MatmulParams {
    m: u32,
    n: u32,
    k: u32,
    batch: u32,
    a_rs: u32,
    a_cs: u32,
    b_rs: u32,
    b_cs: u32,
    tiles_m: u32,
    tiles_n: u32,
    total: u32,
    _p: u32,
}

// 0 params, 1 a, 2 b (read), 3 batch offsets (u32 pairs [a_off, b_off] per output batch entry,
// which is how NumPy batch broadcasting is expressed), 4 c [batch, m, n] (write).
@group(0) @binding(0) var<uniform> mp: MatmulParams;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read> offs: array<u32>;
@group(0) @binding(4) var<storage, read_write> c: array<f32>;

var<workgroup> tile_a: array<f32, 1024>; // [BK][BM]
var<workgroup> tile_b: array<f32, 1024>; // [BK][BN]

@compute @workgroup_size(256)
fn matmul(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) lid: u32) {
    let lin = wg_linear(wid, nwg);
    if (lin >= mp.total) {
        return;
    }
    let tn = lin % mp.tiles_n;
    let tm = (lin / mp.tiles_n) % mp.tiles_m;
    let bi = lin / (mp.tiles_n * mp.tiles_m);
    let a_off = offs[2u * bi];
    let b_off = offs[2u * bi + 1u];
    let row0 = tm * BM;
    let col0 = tn * BN;
    let tx = lid % 16u;
    let ty = lid / 16u;
    var acc: array<f32, 16>;
    for (var i = 0u; i < 16u; i++) {
        acc[i] = 0.0;
    }
    for (var k0 = 0u; k0 < mp.k; k0 += BK) {
        for (var e = 0u; e < 4u; e++) {
            let idx = lid + e * 256u;
            // Pick the slot order whose fastest-varying index is contiguous in memory.
            var kl: u32;
            var ml: u32;
            if (mp.a_cs == 1u) {
                kl = idx % BK;
                ml = idx / BK;
            } else {
                kl = idx / BM;
                ml = idx % BM;
            }
            let r = row0 + ml;
            let kk = k0 + kl;
            var va = 0.0;
            if (r < mp.m && kk < mp.k) {
                va = a[a_off + r * mp.a_rs + kk * mp.a_cs];
            }
            tile_a[kl * BM + ml] = va;
            var kb: u32;
            var nl: u32;
            if (mp.b_cs == 1u) {
                kb = idx / BN;
                nl = idx % BN;
            } else {
                kb = idx % BK;
                nl = idx / BK;
            }
            let cc = col0 + nl;
            let kk2 = k0 + kb;
            var vb = 0.0;
            if (cc < mp.n && kk2 < mp.k) {
                vb = b[b_off + kk2 * mp.b_rs + cc * mp.b_cs];
            }
            tile_b[kb * BN + nl] = vb;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk++) {
            var ra: array<f32, 4>;
            var rb: array<f32, 4>;
            for (var i = 0u; i < 4u; i++) {
                ra[i] = tile_a[kk * BM + ty + 16u * i];
                rb[i] = tile_b[kk * BN + tx + 16u * i];
            }
            for (var i = 0u; i < 4u; i++) {
                for (var j = 0u; j < 4u; j++) {
                    acc[i * 4u + j] += ra[i] * rb[j];
                }
            }
        }
        workgroupBarrier();
    }
    let c_off = bi * mp.m * mp.n;
    for (var i = 0u; i < 4u; i++) {
        let r = row0 + ty + 16u * i;
        for (var j = 0u; j < 4u; j++) {
            let cc = col0 + tx + 16u * j;
            if (r < mp.m && cc < mp.n) {
                c[c_off + r * mp.n + cc] = acc[i * 4u + j];
            }
        }
    }
}
