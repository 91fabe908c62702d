//! Universal adversarial perturbations (Moosavi-Dezfooli et al. 2017, arXiv 1610.08401;
//! medical: Hirano et al. 2021): `uap-fit` learns one perturbation over every frame it sees,
//! `uap-apply` adds a saved one to new frames.

use std::path::{Path, PathBuf};

use adverse_plugin_sdk::serde::Deserialize;
use adverse_plugin_sdk::{Attack, Batch, Error, Host, LossKind, PluginInfo, Result, Tensor};

use crate::common::{Budget, NormKind, Setup, Unit, audit, finalize, project_linf};
use crate::deepfool::deepfool;

/// The inner step that pushes a still-correct frame across the boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase", crate = "adverse_plugin_sdk::serde")]
pub enum Inner {
    #[default]
    Deepfool,
    Fgsm,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, crate = "adverse_plugin_sdk::serde")]
pub struct UapFitParams {
    pub eps: f32,
    #[serde(default)]
    pub unit: Unit,
    pub path: String,
    #[serde(default)]
    pub inner: Inner,
    #[serde(default)]
    pub passes: Option<u32>,
    #[serde(default)]
    pub fooling_target: Option<f32>,
    #[serde(default)]
    pub step: Option<f32>,
    #[serde(default)]
    pub overshoot: Option<f32>,
    #[serde(default)]
    pub deepfool_steps: Option<u32>,
}

/// Writes `v` (`[C, H, W]`) as a float32 .npy, through a temporary file so a reader never sees
/// a half-written perturbation.
pub fn save_npy(path: &Path, v: &[f32], shape: [usize; 3]) -> Result<()> {
    use npyz::WriterBuilder;
    let io = |e: std::io::Error| Error::new(format!("cannot write {}: {e}", path.display()));
    let tmp = path.with_extension("npy.tmp");
    {
        let f = std::fs::File::create(&tmp).map_err(io)?;
        let mut w = npyz::WriteOptions::<f32>::new()
            .default_dtype()
            .shape(&shape.map(|d| d as u64))
            .writer(std::io::BufWriter::new(f))
            .begin_nd()
            .map_err(io)?;
        w.extend(v.iter().copied()).map_err(io)?;
        w.finish().map_err(io)?;
    }
    std::fs::rename(&tmp, path).map_err(io)
}

/// Reads a float32 `[C, H, W]` .npy written by [`save_npy`] (or numpy).
pub fn load_npy(path: &Path) -> Result<(Vec<f32>, [usize; 3])> {
    let bad = |e: String| {
        Error::new(format!(
            "cannot read the perturbation {}: {e}",
            path.display()
        ))
    };
    let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let npy = npyz::NpyFile::new(&bytes[..]).map_err(|e| bad(e.to_string()))?;
    let shape: Vec<usize> = npy.shape().iter().map(|&d| d as usize).collect();
    let [c, h, w] = <[usize; 3]>::try_from(shape.as_slice())
        .map_err(|_| bad(format!("expected a [C, H, W] array, got shape {shape:?}")))?;
    let v = npy
        .into_vec::<f32>()
        .map_err(|e| bad(format!("expected float32 values ({e})")))?;
    if v.len() != c * h * w || v.iter().any(|x| !x.is_finite()) {
        return Err(bad("values do not match the shape or are not finite".into()));
    }
    Ok((v, [c, h, w]))
}

/// UAP fit: one perturbation v for every frame the instance sees, across batches. For each
/// batch, up to `passes` (5) times: frames that `x + v` does not yet fool get an inner step
/// (`inner`: `deepfool` (default; L2, `overshoot` 0.02, `deepfool_steps` 10) or `fgsm` (a sign
/// step of `step`, default ε/10)), added to v one frame after the other with v projected onto
/// the L∞ ε-ball each time; a batch stops early once its fooling rate reaches
/// `fooling_target` (0.8). The inner steps of a batch are computed at the same v (one batched
/// model call) and then applied in turn. Outputs `x + v` rounded (no per-frame repair: the
/// perturbation must stay universal), saves v as a float32 `[C, H, W]` .npy at `path` after
/// every batch, and reports per frame `fooled` plus the running `fooling_rate` (the fraction
/// of frames seen so far that `x + v` moves off their label, or off the model's clean
/// prediction when no label is given). ε and its unit are fixed by the first batch.
#[derive(Debug)]
pub struct UapFit {
    p: UapFitParams,
    path: PathBuf,
    v: Option<(Vec<f32>, [usize; 3], f32)>,
    seen: usize,
    fooled: usize,
}

impl PluginInfo for UapFit {
    const NAME: &'static str = "uap-fit";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str = "Universal adversarial perturbation: fit one L-inf perturbation over all frames and save it (.npy)";
    type Params = UapFitParams;
    fn param_schema() -> &'static str {
        concat!(
            r#"{"type":"object","properties":{"eps":{"type":"number","minimum":0,"maximum":100000,"description":"L-inf budget in `unit`"},"unit":{"enum":["stored","hu","window"],"default":"stored"},"#,
            r#""path":{"type":"string","minLength":1,"description":"where to save the perturbation (.npy, float32 [C, H, W])"},"inner":{"enum":["deepfool","fgsm"],"default":"deepfool"},"passes":{"type":"integer","minimum":1,"maximum":1000,"default":5},"fooling_target":{"type":"number","minimum":0,"maximum":1,"default":0.8},"step":{"type":"number","minimum":0,"description":"fgsm inner step in `unit`; default eps/10"},"overshoot":{"type":"number","minimum":0,"maximum":10,"default":0.02},"deepfool_steps":{"type":"integer","minimum":1,"maximum":1000,"default":10}},"required":["eps","path"],"additionalProperties":false}"#
        )
    }
    fn create(p: UapFitParams, _host: &Host<'_>) -> Result<Self> {
        if !(p.eps.is_finite() && p.eps >= 0.0) {
            return Err(Error::new("uap-fit: eps must be finite and >= 0"));
        }
        let path = PathBuf::from(&p.path);
        Ok(UapFit {
            p,
            path,
            v: None,
            seen: 0,
            fooled: 0,
        })
    }
}

impl Attack for UapFit {
    fn attack(&mut self, batch: &Batch<'_>) -> Result<Tensor> {
        let mut s = Setup::new(batch, false, Some((self.p.eps, self.p.unit)))?;
        let (n, d) = (s.n, s.d);
        let [_, c, h, w] = s.shape;
        let batch_eps = s.eps.iter().copied().fold(f32::INFINITY, f32::min);
        let (mut v, shape, eps) = match self.v.take() {
            None => (vec![0f32; d], [c, h, w], batch_eps),
            Some((v, shape, eps)) => {
                if shape != [c, h, w] {
                    return Err(Error::new(format!(
                        "uap-fit: this batch's frames are {c}x{h}x{w}, the perturbation being fitted is {}x{}x{} (run one geometry per fit)",
                        shape[0], shape[1], shape[2]
                    )));
                }
                (v, shape, eps)
            }
        };
        s.eps = vec![eps; n];
        let ratio = if self.p.eps > 0.0 {
            eps / self.p.eps
        } else {
            0.0
        };
        let step = self.p.step.unwrap_or(self.p.eps / 10.0) * ratio;
        let target = self.p.fooling_target.unwrap_or(0.8);
        let with_v = |v: &[f32]| {
            let mut x = s.x0.clone();
            for (j, xv) in x.iter_mut().enumerate() {
                *xv += v[j % d];
            }
            s.clip(&mut x);
            x
        };
        for _ in 0..self.p.passes.unwrap_or(5) {
            let xv = with_v(&v);
            let fooled = s.success(&s.preds(&s.forward(&xv)?));
            let rate = fooled.iter().filter(|&&f| f).count() as f32 / n as f32;
            if rate >= target || fooled.iter().all(|&f| f) {
                break;
            }
            let active: Vec<bool> = fooled.iter().map(|f| !f).collect();
            let moved = match self.p.inner {
                Inner::Deepfool => {
                    deepfool(
                        &s,
                        &xv,
                        NormKind::L2,
                        self.p.overshoot.unwrap_or(0.02),
                        self.p.deepfool_steps.unwrap_or(10),
                        active.clone(),
                    )?
                    .0
                }
                Inner::Fgsm => {
                    let (_, g) = s.loss_grad(&xv, LossKind::CrossEntropy)?;
                    xv.iter()
                        .zip(&g)
                        .map(|(x, g)| {
                            x + step
                                * if *g > 0.0 {
                                    1.0
                                } else if *g < 0.0 {
                                    -1.0
                                } else {
                                    0.0
                                }
                        })
                        .collect()
                }
            };
            for i in (0..n).filter(|&i| active[i]) {
                for j in 0..d {
                    v[j] += moved[i * d + j] - xv[i * d + j];
                }
                let zero = vec![0f32; d];
                project_linf(&mut v, &zero, &[eps], d);
            }
        }
        let fin = finalize(&s, &with_v(&v), Budget::Linf, false)?;
        self.seen += n;
        self.fooled += fin.success.iter().filter(|&&f| f).count();
        let rate = self.fooled as f64 / self.seen as f64;
        let rates = vec![rate; n];
        let fooled: Vec<f64> = fin
            .success
            .iter()
            .map(|&f| f64::from(u8::from(f)))
            .collect();
        audit(&s, &fin, &[("fooling_rate", &rates), ("fooled", &fooled)])?;
        save_npy(&self.path, &v, shape)?;
        self.v = Some((v, shape, eps));
        s.output(&fin.x)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, crate = "adverse_plugin_sdk::serde")]
pub struct UapApplyParams {
    pub path: String,
}

/// UAP apply: adds the perturbation saved by `uap-fit` (`path`, a float32 `[C, H, W]` .npy) to
/// every frame, clipped to the stored range and rounded inside `max |v|` (no per-frame search:
/// the perturbation stays universal). Reports `fooled` per frame and the running
/// `fooling_rate` over the frames seen (held-out frames give the held-out fooling rate).
#[derive(Debug)]
pub struct UapApply {
    v: Vec<f32>,
    shape: [usize; 3],
    seen: usize,
    fooled: usize,
}

impl PluginInfo for UapApply {
    const NAME: &'static str = "uap-apply";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str = "Apply a saved universal adversarial perturbation (.npy)";
    type Params = UapApplyParams;
    fn param_schema() -> &'static str {
        r#"{"type":"object","properties":{"path":{"type":"string","minLength":1,"description":"the .npy saved by uap-fit"}},"required":["path"],"additionalProperties":false}"#
    }
    fn create(p: UapApplyParams, _host: &Host<'_>) -> Result<Self> {
        let (v, shape) = load_npy(Path::new(&p.path))?;
        Ok(UapApply {
            v,
            shape,
            seen: 0,
            fooled: 0,
        })
    }
}

impl Attack for UapApply {
    fn attack(&mut self, batch: &Batch<'_>) -> Result<Tensor> {
        let mut s = Setup::new(batch, false, None)?;
        let [_, c, h, w] = s.shape;
        if self.shape != [c, h, w] {
            return Err(Error::new(format!(
                "uap-apply: the perturbation is {}x{}x{}, these frames are {c}x{h}x{w}",
                self.shape[0], self.shape[1], self.shape[2]
            )));
        }
        let reach = self.v.iter().fold(0f32, |m, x| m.max(x.abs()));
        s.eps = vec![reach; s.n];
        let d = s.d;
        let mut x = s.x0.clone();
        for (j, xv) in x.iter_mut().enumerate() {
            *xv += self.v[j % d];
        }
        let fin = finalize(&s, &x, Budget::Linf, false)?;
        self.seen += s.n;
        self.fooled += fin.success.iter().filter(|&&f| f).count();
        let rates = vec![self.fooled as f64 / self.seen as f64; s.n];
        let fooled: Vec<f64> = fin
            .success
            .iter()
            .map(|&f| f64::from(u8::from(f)))
            .collect();
        audit(&s, &fin, &[("fooling_rate", &rates), ("fooled", &fooled)])?;
        s.output(&fin.x)
    }
}
