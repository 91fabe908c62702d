// Perturbation family (attacks, adversarial training): per-sample norms, sign / L2 steps,
// projections, per-sample clamps and the counter-based RNG. Rust twin:
// core/src/runtime/gpu/perturbation.rs. "Per sample" = all axes but the first: sample s owns
// elements [s * per, (s + 1) * per).

const WG: u32 = 256u;

// Norm kind for `norm_sample`: 0 L1, 1 L2, 2 Linf.
override OP: u32 = 0u;

var<workgroup> partial: array<f32, 256>;

// ---- per-sample norm: 0 params, 1 x, 2 x0 (read), 3 out [N] (write) ----------------------------
// diff = 1 measures x - x0 (projection onto a ball around x0), else x alone (x0 is ignored).
struct NormParams {
    samples: u32,
    per: u32,
    diff: u32,
    _p: u32,
}

@group(0) @binding(0) var<uniform> np: NormParams;
@group(0) @binding(1) var<storage, read> nx: array<f32>;
@group(0) @binding(2) var<storage, read> nx0: array<f32>;
@group(0) @binding(3) var<storage, read_write> nout: array<f32>;

fn combine(a: f32, b: f32) -> f32 {
    if (OP == 2u) {
        return max(a, b);
    }
    return a + b;
}

@compute @workgroup_size(256)
fn norm_sample(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let s = wg_linear(wid, nwg);
    if (s >= np.samples) {
        return;
    }
    let base = s * np.per;
    var acc = 0.0;
    for (var i = lid; i < np.per; i += WG) {
        var v = nx[base + i];
        if (np.diff != 0u) {
            v -= nx0[base + i];
        }
        if (OP == 1u) {
            acc += v * v;
        } else {
            acc = combine(acc, abs(v));
        }
    }
    partial[lid] = acc;
    for (var w = WG / 2u; w > 0u; w = w >> 1u) {
        workgroupBarrier();
        if (lid < w) {
            partial[lid] = combine(partial[lid], partial[lid + w]);
        }
    }
    workgroupBarrier();
    if (lid == 0u) {
        if (OP == 1u) {
            nout[s] = sqrt(partial[0]);
        } else {
            nout[s] = partial[0];
        }
    }
}

// ---- sign step: 0 params, 1 x, 2 g (read), 3 y (write): y = x + alpha * sign(g) ---------------
struct StepParams {
    n: u32,
    per: u32,
    alpha: f32,
    mode: u32,
}

@group(0) @binding(0) var<uniform> sp: StepParams;
@group(0) @binding(1) var<storage, read> sx: array<f32>;
@group(0) @binding(2) var<storage, read> sg: array<f32>;
@group(0) @binding(3) var<storage, read_write> sy: array<f32>;

@compute @workgroup_size(256)
fn sign_step(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32) {
    let i = wg_linear(wid, nwg) * WG + lid;
    if (i >= sp.n) {
        return;
    }
    let g = sg[i];
    var s = 0.0;
    if (g > 0.0) {
        s = 1.0;
    } else if (g < 0.0) {
        s = -1.0;
    }
    sy[i] = sx[i] + sp.alpha * s;
}

// ---- steps that need a per-sample norm: 0 params, 1 x, 2 other, 3 norms [N] (read), 4 y --------
// mode 0 (l2 step): other = g, y = x + alpha * g / |g| (unchanged where |g| = 0).
// mode 1 (L2 projection): other = x0, y = x0 + (x - x0) * eps / |x - x0| where that norm > eps.
// mode 2 (Linf projection): other = x0, y = clamp(x, x0 - eps, x0 + eps) (norms unused).
// `alpha` carries eps for the projections.
@group(0) @binding(0) var<uniform> qp: StepParams;
@group(0) @binding(1) var<storage, read> qx: array<f32>;
@group(0) @binding(2) var<storage, read> qo: array<f32>;
@group(0) @binding(3) var<storage, read> qn: array<f32>;
@group(0) @binding(4) var<storage, read_write> qy: array<f32>;

@compute @workgroup_size(256)
fn normed_step(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let i = wg_linear(wid, nwg) * WG + lid;
    if (i >= qp.n) {
        return;
    }
    let x = qx[i];
    let o = qo[i];
    if (qp.mode == 2u) {
        qy[i] = min(max(x, o - qp.alpha), o + qp.alpha);
        return;
    }
    let nrm = qn[i / qp.per];
    if (qp.mode == 0u) {
        qy[i] = select(x, x + qp.alpha * o / nrm, nrm > 0.0);
    } else {
        qy[i] = select(x, o + (x - o) * (qp.alpha / nrm), nrm > qp.alpha);
    }
}

// ---- per-sample clamp: 0 params, 1 x, 2 bounds (read: lo[0..N], hi[0..N]), 3 y -----------------
struct ClampParams {
    n: u32,
    per: u32,
    samples: u32,
    _p: u32,
}

@group(0) @binding(0) var<uniform> cp: ClampParams;
@group(0) @binding(1) var<storage, read> cx: array<f32>;
@group(0) @binding(2) var<storage, read> cb: array<f32>;
@group(0) @binding(3) var<storage, read_write> cy: array<f32>;

@compute @workgroup_size(256)
fn clamp_sample(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let i = wg_linear(wid, nwg) * WG + lid;
    if (i >= cp.n) {
        return;
    }
    let s = i / cp.per;
    cy[i] = min(max(cx[i], cb[s]), cb[cp.samples + s]);
}

// ---- counter-based RNG: 0 params, 1 y (write) --------------------------------------------------
// Bit-exact twin of `backend::pcg_hash` / `counter_uniform` (u32 arithmetic wraps in WGSL).
struct RandParams {
    n: u32,
    seed_lo: u32,
    seed_hi: u32,
    _p: u32,
    lo: f32,
    hi: f32,
    sd: f32,
    _q: u32,
}

@group(0) @binding(0) var<uniform> gp: RandParams;
@group(0) @binding(1) var<storage, read_write> gy: array<f32>;

fn pcg_hash(v: u32) -> u32 {
    let state = v * 747796405u + 2891336453u;
    let word = ((state >> ((state >> 28u) + 4u)) ^ state) * 277803737u;
    return (word >> 22u) ^ word;
}

fn counter_uniform(i: u32) -> f32 {
    let k = pcg_hash(gp.seed_lo ^ pcg_hash(gp.seed_hi));
    let h = pcg_hash(i ^ k);
    return f32(h >> 8u) * (1.0 / 16777216.0);
}

@compute @workgroup_size(256)
fn random_uniform(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) lid: u32) {
    let i = wg_linear(wid, nwg) * WG + lid;
    if (i >= gp.n) {
        return;
    }
    gy[i] = gp.lo + (gp.hi - gp.lo) * counter_uniform(i);
}

@compute @workgroup_size(256)
fn random_normal(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let i = wg_linear(wid, nwg) * WG + lid;
    if (i >= gp.n) {
        return;
    }
    let u1 = max(counter_uniform(i * 2u), 1.0 / 16777216.0);
    let u2 = counter_uniform(i * 2u + 1u);
    // cos(2 pi u2) = -cos(2 pi (u2 - 1/2)): keeps the argument in [-pi, pi), where GPU cos is
    // specified most tightly.
    let c = -cos(6.283185307179586 * (u2 - 0.5));
    gy[i] = gp.sd * sqrt(-2.0 * log(u1)) * c;
}
