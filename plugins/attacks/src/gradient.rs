//! The sign-gradient family: FGSM, BIM / I-FGSM, PGD (L∞ and L2, random start, restarts),
//! MI-FGSM, TI-FGSM and DI-FGSM. They are one loop with options (steps, step size, random
//! start, momentum, translation-invariant smoothing, input diversity), so DI + MI + TI is one
//! configuration rather than three stacked attacks.

use adverse_plugin_sdk::serde::Deserialize;
use adverse_plugin_sdk::{Attack, Batch, Error, Host, LossKind, PluginInfo, Result, Tensor};

use crate::common::{Budget, NormKind, Setup, Unit, common_props, finish, normals, uniforms};

/// One configuration of the iterative loop, resolved from a plugin's parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct IterConfig {
    pub eps: f32,
    pub unit: Unit,
    pub targeted: bool,
    pub early_stop: bool,
    pub steps: u32,
    /// Step size in `unit` (converted per frame with the same factor as ε).
    pub alpha: f32,
    pub norm: NormKind,
    pub random_start: bool,
    pub restarts: u32,
    /// μ: `g ← μ g + ∇/‖∇‖₁` (0 = no memory; the normalisation does not change a sign step).
    pub momentum: f32,
    /// Translation-invariant smoothing: (kernel size, 0 = by image size; σ in pixels).
    pub ti: Option<(u32, f32)>,
    /// Input diversity: (probability, smallest resize ratio).
    pub di: Option<(f32, f32)>,
}

impl IterConfig {
    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::new(m));
        if !(self.eps.is_finite() && self.eps >= 0.0) {
            return bad(format!("eps must be finite and >= 0, got {}", self.eps));
        }
        if !(self.alpha.is_finite() && self.alpha >= 0.0) {
            return bad(format!("alpha must be finite and >= 0, got {}", self.alpha));
        }
        if self.steps == 0 || self.restarts == 0 {
            return bad("steps and restarts must be at least 1".into());
        }
        if !(self.momentum.is_finite() && self.momentum >= 0.0) {
            return bad(format!("momentum must be >= 0, got {}", self.momentum));
        }
        if let Some((k, sigma)) = self.ti {
            if k != 0 && k % 2 == 0 {
                return bad(format!("the TI kernel size must be odd, got {k}"));
            }
            if !(sigma.is_finite() && sigma > 0.0) {
                return bad(format!("the TI sigma must be > 0, got {sigma}"));
            }
        }
        if let Some((p, r)) = self.di
            && !((0.0..=1.0).contains(&p) && r > 0.0 && r <= 1.0)
        {
            return bad(format!(
                "input diversity needs 0 <= prob <= 1 and 0 < resize <= 1, got {p} and {r}"
            ));
        }
        Ok(())
    }
}

/// Normalised 1-D Gaussian taps of odd size `k` (outer product = the 2-D TI kernel W).
pub fn gaussian_taps(k: usize, sigma: f32) -> Vec<f32> {
    let r = (k / 2) as f32;
    let t: Vec<f32> = (0..k)
        .map(|j| (-(j as f32 - r).powi(2) / (2.0 * sigma * sigma)).exp())
        .collect();
    let sum: f32 = t.iter().sum();
    t.iter().map(|v| v / sum).collect()
}

/// Convolves every `h x w` plane of `g` with the separable kernel `taps ⊗ taps`, zero padding
/// (each channel on its own, so 1-channel frames work).
pub fn smooth(g: &[f32], taps: &[f32], h: usize, w: usize) -> Vec<f32> {
    let r = (taps.len() / 2) as isize;
    let mut tmp = vec![0f32; g.len()];
    let mut out = vec![0f32; g.len()];
    for (src, dst) in g.chunks(h * w).zip(tmp.chunks_mut(h * w)) {
        for i in 0..h {
            for j in 0..w {
                let mut acc = 0f32;
                for (t, &k) in taps.iter().enumerate() {
                    let jj = j as isize + t as isize - r;
                    if (0..w as isize).contains(&jj) {
                        acc += k * src[i * w + jj as usize];
                    }
                }
                dst[i * w + j] = acc;
            }
        }
    }
    for (src, dst) in tmp.chunks(h * w).zip(out.chunks_mut(h * w)) {
        for i in 0..h {
            for j in 0..w {
                let mut acc = 0f32;
                for (t, &k) in taps.iter().enumerate() {
                    let ii = i as isize + t as isize - r;
                    if (0..h as isize).contains(&ii) {
                        acc += k * src[ii as usize * w + j];
                    }
                }
                dst[i * w + j] = acc;
            }
        }
    }
    out
}

/// One frame's input-diversity transform: for every output pixel of an `h x w` plane, the
/// source pixel it copies (nearest-neighbour shrink) or `None` where it is padding.
pub type DiMap = Option<Vec<Option<u32>>>;

/// Draws the transforms of `n` frames: with probability `prob`, shrink to a random size in
/// `[ceil(resize * h), h]` (aspect kept) and pad back to `h x w` at a random offset.
pub fn di_maps(
    n: usize,
    h: usize,
    w: usize,
    prob: f32,
    resize: f32,
    seed: u64,
    stream: u64,
) -> Vec<DiMap> {
    let u = uniforms(seed, stream, n * 4);
    (0..n)
        .map(|i| {
            if u[4 * i] >= prob {
                return None;
            }
            let pick = |v: f32, count: usize| ((v * count as f32) as usize).min(count - 1);
            let rh_min = ((resize * h as f32).ceil() as usize).clamp(1, h);
            let rh = rh_min + pick(u[4 * i + 1], h - rh_min + 1);
            let rw = ((rh * w + h / 2) / h).clamp(1, w);
            let top = pick(u[4 * i + 2], h - rh + 1);
            let left = pick(u[4 * i + 3], w - rw + 1);
            let map = (0..h * w)
                .map(|p| {
                    let (oi, oj) = (p / w, p % w);
                    if oi < top || oi >= top + rh || oj < left || oj >= left + rw {
                        return None;
                    }
                    let si = ((2 * (oi - top) + 1) * h / (2 * rh)).min(h - 1);
                    let sj = ((2 * (oj - left) + 1) * w / (2 * rw)).min(w - 1);
                    Some((si * w + sj) as u32)
                })
                .collect();
            Some(map)
        })
        .collect()
}

/// Applies the transforms; padding takes each plane's minimum (its background).
pub fn di_apply(x: &[f32], maps: &[DiMap], c: usize, hw: usize) -> Vec<f32> {
    let mut out = x.to_vec();
    for (i, m) in maps.iter().enumerate() {
        let Some(m) = m else { continue };
        for ch in 0..c {
            let off = (i * c + ch) * hw;
            let plane = &x[off..off + hw];
            let pad = plane.iter().copied().fold(f32::INFINITY, f32::min);
            for (p, src) in m.iter().enumerate() {
                out[off + p] = src.map_or(pad, |s| plane[s as usize]);
            }
        }
    }
    out
}

/// The transpose of [`di_apply`] (the padding value is treated as a constant).
pub fn di_adjoint(g: &[f32], maps: &[DiMap], c: usize, hw: usize) -> Vec<f32> {
    let mut out = g.to_vec();
    for (i, m) in maps.iter().enumerate() {
        let Some(m) = m else { continue };
        for ch in 0..c {
            let off = (i * c + ch) * hw;
            let mut acc = vec![0f32; hw];
            for (p, src) in m.iter().enumerate() {
                if let Some(s) = src {
                    acc[*s as usize] += g[off + p];
                }
            }
            out[off..off + hw].copy_from_slice(&acc);
        }
    }
    out
}

/// The shared loop.
pub fn run_iterative(cfg: &IterConfig, batch: &Batch<'_>) -> Result<Tensor> {
    let s = Setup::new(batch, cfg.targeted, Some((cfg.eps, cfg.unit)))?;
    let (n, d) = (s.n, s.d);
    let [_, c, h, w] = s.shape;
    let ratio = if cfg.eps > 0.0 {
        cfg.alpha / cfg.eps
    } else {
        0.0
    };
    let alpha: Vec<f32> = s.eps.iter().map(|e| e * ratio).collect();
    let taps = cfg.ti.map(|(k, sigma)| {
        let k = match k {
            0 if h.min(w) < 64 => 7,
            0 => 15,
            k => k as usize,
        };
        gaussian_taps(k, sigma)
    });
    let seed = batch.seed();
    let mut best = s.x0.clone();
    let mut best_obj = vec![f32::NEG_INFINITY; n];
    let mut best_ok = vec![false; n];
    let mut iters = vec![0f64; n];
    for r in 0..cfg.restarts {
        if r > 0 && cfg.early_stop && best_ok.iter().all(|&o| o) {
            break;
        }
        let mut x = s.x0.clone();
        if cfg.random_start {
            random_start(&s, &mut x, cfg.norm, seed, 2 * u64::from(r));
        }
        s.constrain(&mut x, cfg.norm);
        let mut gm = vec![0f32; n * d];
        let mut active = vec![true; n];
        for t in 0..cfg.steps {
            if cfg.early_stop {
                let ok = s.success(&s.preds(&s.forward(&x)?));
                active.iter_mut().zip(&ok).for_each(|(a, o)| *a &= !o);
                if !active.iter().any(|&a| a) {
                    break;
                }
            }
            let maps = cfg.di.map(|(p, rz)| {
                let stream = 1 + 2 * u64::from(r) + (u64::from(t) << 20);
                di_maps(n, h, w, p, rz, seed, stream | (1 << 40))
            });
            let (_, mut g) = match &maps {
                Some(m) => s.loss_grad(&di_apply(&x, m, c, h * w), LossKind::CrossEntropy)?,
                None => s.loss_grad(&x, LossKind::CrossEntropy)?,
            };
            if let Some(m) = &maps {
                g = di_adjoint(&g, m, c, h * w);
            }
            if let Some(k) = &taps {
                g = smooth(&g, k, h, w);
            }
            for i in (0..n).filter(|&i| active[i]) {
                let range = i * d..(i + 1) * d;
                let l1: f32 = g[range.clone()].iter().map(|v| v.abs()).sum();
                let inv = if l1 > 0.0 { 1.0 / l1 } else { 0.0 };
                for j in range.clone() {
                    gm[j] = cfg.momentum * gm[j] + g[j] * inv;
                }
                match cfg.norm {
                    NormKind::Linf => {
                        for j in range {
                            x[j] += alpha[i] * signum0(gm[j]);
                        }
                    }
                    NormKind::L2 => {
                        let l2 = gm[range.clone()]
                            .iter()
                            .map(|v| f64::from(*v).powi(2))
                            .sum::<f64>()
                            .sqrt() as f32;
                        if l2 > 0.0 {
                            for j in range {
                                x[j] += alpha[i] * gm[j] / l2;
                            }
                        }
                    }
                }
                iters[i] += 1.0;
            }
            s.constrain(&mut x, cfg.norm);
        }
        let z = s.forward(&x)?;
        let ok = s.success(&s.preds(&z));
        let obj = s.ce_objective(&z);
        for i in 0..n {
            if (ok[i] && !best_ok[i]) || (ok[i] == best_ok[i] && obj[i] > best_obj[i]) {
                best[i * d..(i + 1) * d].copy_from_slice(&x[i * d..(i + 1) * d]);
                best_obj[i] = obj[i];
                best_ok[i] = ok[i];
            }
        }
    }
    let budget = match cfg.norm {
        NormKind::Linf => Budget::Linf,
        NormKind::L2 => Budget::L2,
    };
    finish(&s, &best, budget, true, &[("iterations", &iters)])
}

fn signum0(v: f32) -> f32 {
    if v > 0.0 {
        1.0
    } else if v < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// Uniform start in the L∞ ball, or a random direction at a uniform radius in the L2 ball.
fn random_start(s: &Setup<'_>, x: &mut [f32], norm: NormKind, seed: u64, stream: u64) {
    let d = s.d;
    match norm {
        NormKind::Linf => {
            let u = uniforms(seed, stream, x.len());
            for (j, v) in x.iter_mut().enumerate() {
                *v += s.eps[j / d] * (2.0 * u[j] - 1.0);
            }
        }
        NormKind::L2 => {
            let g = normals(seed, stream, x.len());
            let radius = uniforms(seed, stream + 1, s.n);
            for i in 0..s.n {
                let gs = &g[i * d..(i + 1) * d];
                let nrm = gs.iter().map(|v| v * v).sum::<f32>().sqrt();
                if nrm > 0.0 {
                    let k = s.eps[i] * radius[i] / nrm;
                    for j in 0..d {
                        x[i * d + j] += k * gs[j];
                    }
                }
            }
        }
    }
}

/// Declares a sign-gradient plugin: its parameter struct (the common fields plus its own, all
/// optional with the plugin's defaults), schema and the mapping to an [`IterConfig`].
macro_rules! iter_plugin {
    (
        $(#[$doc:meta])*
        $ty:ident, $params:ident, $name:literal, $desc:literal,
        { $($field:ident : $fty:ty),* $(,)? },
        $schema:expr,
        |$p:ident| $cfg:expr
    ) => {
        #[derive(Debug, Clone, Deserialize)]
        #[serde(deny_unknown_fields, crate = "adverse_plugin_sdk::serde")]
        pub struct $params {
            pub eps: f32,
            #[serde(default)]
            pub unit: Unit,
            #[serde(default)]
            pub targeted: bool,
            #[serde(default)]
            pub early_stop: bool,
            $(#[serde(default)] pub $field: $fty,)*
        }

        $(#[$doc])*
        #[derive(Debug)]
        pub struct $ty {
            pub cfg: IterConfig,
        }

        impl PluginInfo for $ty {
            const NAME: &'static str = $name;
            const VERSION: &'static str = env!("CARGO_PKG_VERSION");
            const DESCRIPTION: &'static str = $desc;
            type Params = $params;
            fn param_schema() -> &'static str {
                $schema
            }
            fn create($p: $params, _host: &Host<'_>) -> Result<Self> {
                let cfg: IterConfig = $cfg;
                cfg.validate()?;
                Ok($ty { cfg })
            }
        }

        impl Attack for $ty {
            fn attack(&mut self, batch: &Batch<'_>) -> Result<Tensor> {
                run_iterative(&self.cfg, batch)
            }
        }
    };
}

macro_rules! schema {
    ($($extra:literal)?) => {
        concat!(
            r#"{"type":"object","properties":{"#,
            common_props!(),
            $($extra,)?
            r#"},"required":["eps"],"additionalProperties":false}"#
        )
    };
}

iter_plugin!(
    /// FGSM (Goodfellow et al. 2015, arXiv 1412.6572): one step `x' = x + ε·sign(∇ₓ CE)`.
    /// Parameters: `eps` (required), `unit`, `targeted`, `early_stop` (skip frames the model
    /// already gets wrong). On pixels with a non-zero gradient `|δ| = ε` before clipping.
    Fgsm, FgsmParams, "fgsm", "Fast gradient sign attack (one L-inf step of eps)",
    {},
    schema!(),
    |p| IterConfig {
        eps: p.eps, unit: p.unit, targeted: p.targeted, early_stop: p.early_stop,
        steps: 1, alpha: p.eps, norm: NormKind::Linf, random_start: false, restarts: 1,
        momentum: 0.0, ti: None, di: None,
    }
);

iter_plugin!(
    /// BIM / I-FGSM (Kurakin et al. 2017, arXiv 1607.02533): `steps` (default 10) sign steps of
    /// `alpha` (default ε/steps), each projected onto the L∞ ball and the stored range.
    Bim, BimParams, "bim", "Basic iterative method / I-FGSM (L-inf)",
    { steps: Option<u32>, alpha: Option<f32> },
    schema!(r#","steps":{"type":"integer","minimum":1,"maximum":100000,"default":10},"alpha":{"type":"number","minimum":0,"description":"step in `unit`; default eps/steps"}"#),
    |p| {
        let steps = p.steps.unwrap_or(10);
        IterConfig {
            eps: p.eps, unit: p.unit, targeted: p.targeted, early_stop: p.early_stop,
            steps, alpha: p.alpha.unwrap_or(p.eps / steps.max(1) as f32), norm: NormKind::Linf,
            random_start: false, restarts: 1, momentum: 0.0, ti: None, di: None,
        }
    }
);

iter_plugin!(
    /// PGD (Madry et al. 2018, arXiv 1706.06083): BIM from a uniform random start in the ε-ball,
    /// L∞ (sign step, clamp) or L2 (step `alpha·g/‖g‖₂`, projection by rescaling). `steps` 10,
    /// `alpha` ε/4, `norm` linf, `random_start` true, `restarts` 1: per frame the best restart
    /// is kept (an adversarial one first, then the highest cross-entropy).
    Pgd, PgdParams, "pgd", "Projected gradient descent (L-inf or L2, random start, restarts)",
    { steps: Option<u32>, alpha: Option<f32>, norm: NormKind, random_start: Option<bool>, restarts: Option<u32> },
    schema!(r#","steps":{"type":"integer","minimum":1,"maximum":100000,"default":10},"alpha":{"type":"number","minimum":0,"description":"step in `unit`; default eps/4"},"norm":{"enum":["linf","l2"],"default":"linf","description":"the budget's norm (eps is an L2 radius for l2)"},"random_start":{"type":"boolean","default":true},"restarts":{"type":"integer","minimum":1,"maximum":1000,"default":1}"#),
    |p| IterConfig {
        eps: p.eps, unit: p.unit, targeted: p.targeted, early_stop: p.early_stop,
        steps: p.steps.unwrap_or(10), alpha: p.alpha.unwrap_or(p.eps / 4.0), norm: p.norm,
        random_start: p.random_start.unwrap_or(true), restarts: p.restarts.unwrap_or(1),
        momentum: 0.0, ti: None, di: None,
    }
);

iter_plugin!(
    /// MI-FGSM (Dong et al. 2018, arXiv 1710.06081): `g ← μ·g + ∇/‖∇‖₁` per frame, then a sign
    /// step of `alpha` (default ε/steps). `steps` 10, `momentum` μ = 1.0. One step equals FGSM.
    MiFgsm, MiFgsmParams, "mifgsm", "Momentum iterative FGSM (L-inf)",
    { steps: Option<u32>, alpha: Option<f32>, momentum: Option<f32> },
    schema!(r#","steps":{"type":"integer","minimum":1,"maximum":100000,"default":10},"alpha":{"type":"number","minimum":0,"description":"step in `unit`; default eps/steps"},"momentum":{"type":"number","minimum":0,"maximum":10,"default":1.0}"#),
    |p| {
        let steps = p.steps.unwrap_or(10);
        IterConfig {
            eps: p.eps, unit: p.unit, targeted: p.targeted, early_stop: p.early_stop,
            steps, alpha: p.alpha.unwrap_or(p.eps / steps.max(1) as f32), norm: NormKind::Linf,
            random_start: false, restarts: 1, momentum: p.momentum.unwrap_or(1.0), ti: None, di: None,
        }
    }
);

iter_plugin!(
    /// TI-FGSM (Dong et al. 2019, arXiv 1904.02884): the gradient is convolved with a Gaussian
    /// kernel W (each channel on its own, zero padding; 1-channel frames work) before the sign
    /// step. `kernel` odd size (default 15, or 7 = radius 3 when the frame is smaller than
    /// 64 pixels), `sigma` 3 pixels, `momentum` 0 (1.0 gives TI-MI-FGSM), `steps` 10,
    /// `alpha` ε/steps. A 1x1 kernel equals MI-FGSM / I-FGSM.
    TiFgsm, TiFgsmParams, "tifgsm", "Translation-invariant FGSM (Gaussian-smoothed gradient, L-inf)",
    { steps: Option<u32>, alpha: Option<f32>, momentum: Option<f32>, kernel: Option<u32>, sigma: Option<f32> },
    schema!(r#","steps":{"type":"integer","minimum":1,"maximum":100000,"default":10},"alpha":{"type":"number","minimum":0,"description":"step in `unit`; default eps/steps"},"momentum":{"type":"number","minimum":0,"maximum":10,"default":0.0},"kernel":{"type":"integer","minimum":1,"maximum":101,"description":"odd kernel size; default 15 (7 for frames under 64 pixels)"},"sigma":{"type":"number","exclusiveMinimum":0,"maximum":50,"default":3.0,"description":"Gaussian sigma in pixels"}"#),
    |p| {
        let steps = p.steps.unwrap_or(10);
        IterConfig {
            eps: p.eps, unit: p.unit, targeted: p.targeted, early_stop: p.early_stop,
            steps, alpha: p.alpha.unwrap_or(p.eps / steps.max(1) as f32), norm: NormKind::Linf,
            random_start: false, restarts: 1, momentum: p.momentum.unwrap_or(0.0),
            ti: Some((p.kernel.unwrap_or(0), p.sigma.unwrap_or(3.0))), di: None,
        }
    }
);

iter_plugin!(
    /// DI-FGSM (Xie et al. 2019, arXiv 1803.06978): before each gradient, with probability
    /// `prob` (0.5) the frame is shrunk to a random size in `[resize·H, H]` (`resize` 0.9,
    /// nearest neighbour) and padded back at a random offset with its own minimum. Composable:
    /// `momentum` (MI, default 0) and `ti_kernel` / `ti_sigma` (TI, default off) make DI-MI-TI
    /// one configuration. `steps` 10, `alpha` ε/steps. Draws come from the batch seed.
    DiFgsm, DiFgsmParams, "difgsm", "Diverse-input FGSM, composable with momentum (MI) and Gaussian smoothing (TI)",
    { steps: Option<u32>, alpha: Option<f32>, prob: Option<f32>, resize: Option<f32>, momentum: Option<f32>, ti_kernel: Option<u32>, ti_sigma: Option<f32> },
    schema!(r#","steps":{"type":"integer","minimum":1,"maximum":100000,"default":10},"alpha":{"type":"number","minimum":0,"description":"step in `unit`; default eps/steps"},"prob":{"type":"number","minimum":0,"maximum":1,"default":0.5},"resize":{"type":"number","exclusiveMinimum":0,"maximum":1,"default":0.9},"momentum":{"type":"number","minimum":0,"maximum":10,"default":0.0},"ti_kernel":{"type":"integer","minimum":1,"maximum":101,"description":"odd TI kernel size; absent = no smoothing"},"ti_sigma":{"type":"number","exclusiveMinimum":0,"maximum":50,"default":3.0}"#),
    |p| {
        let steps = p.steps.unwrap_or(10);
        IterConfig {
            eps: p.eps, unit: p.unit, targeted: p.targeted, early_stop: p.early_stop,
            steps, alpha: p.alpha.unwrap_or(p.eps / steps.max(1) as f32), norm: NormKind::Linf,
            random_start: false, restarts: 1, momentum: p.momentum.unwrap_or(0.0),
            ti: p.ti_kernel.map(|k| (k, p.ti_sigma.unwrap_or(3.0))),
            di: Some((p.prob.unwrap_or(0.5), p.resize.unwrap_or(0.9))),
        }
    }
);
