//! Built-in example plugins, written against the SDK's safe layer only (the host sees them
//! through the C ABI like any third-party library):
//! - `median`: a median-filter purifier (host service `median_filter`);
//! - `gaussian`: a Gaussian-blur purifier (host service `gaussian_filter`);
//! - `fgsm`: the fast gradient sign attack (host services `model_loss_grad`, `sign_step`,
//!   `clip_to_range`, `model_forward`).
//!
//! Each reports how far it moved every frame (`l2_change`, `linf_change`, in stored units) in
//! the audit record, so a result row shows what the plugin did.

use adverse_plugin_sdk::serde::Deserialize;
use adverse_plugin_sdk::{
    Attack, Batch, Host, LossKind, Norm, PluginInfo, Purifier, Result, Tensor, export_plugins,
};

/// Writes the per-frame L2 and L∞ distance between `before` and `after`.
fn audit_change(batch: &Batch<'_>, before: Tensor, after: Tensor) -> Result<()> {
    let h = batch.host();
    let d = h.axpby(1.0, after, -1.0, before)?;
    let l2 = h.norm_per_sample(d, Norm::L2)?;
    let li = h.norm_per_sample(d, Norm::Linf)?;
    for (i, (a, b)) in l2.iter().zip(&li).enumerate() {
        batch.audit_number(i, "l2_change", f64::from(*a))?;
        batch.audit_number(i, "linf_change", f64::from(*b))?;
    }
    h.free(d)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, crate = "adverse_plugin_sdk::serde")]
pub struct MedianParams {
    #[serde(default = "one")]
    pub radius: u32,
}

fn one() -> u32 {
    1
}

/// Median filter over a `(2r+1)^2` window of every channel plane.
#[derive(Debug)]
pub struct Median {
    radius: u32,
}

impl PluginInfo for Median {
    const NAME: &'static str = "median";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str = "Median-filter purifier ((2r+1)^2 window, reflect border)";
    type Params = MedianParams;
    fn param_schema() -> &'static str {
        r#"{"type":"object","properties":{"radius":{"type":"integer","minimum":1,"maximum":8,"default":1,"description":"window radius r (window 2r+1)"}},"additionalProperties":false}"#
    }
    fn create(p: MedianParams, _host: &Host<'_>) -> Result<Self> {
        Ok(Median { radius: p.radius })
    }
}

impl Purifier for Median {
    fn purify(&mut self, batch: &Batch<'_>) -> Result<Tensor> {
        let x = batch.input();
        let y = batch.host().median_filter(x, self.radius)?;
        audit_change(batch, x, y)?;
        Ok(y)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, crate = "adverse_plugin_sdk::serde")]
pub struct GaussianParams {
    pub sigma: f32,
}

/// Gaussian blur of every channel plane.
#[derive(Debug)]
pub struct Gaussian {
    sigma: f32,
}

impl PluginInfo for Gaussian {
    const NAME: &'static str = "gaussian";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str = "Gaussian-blur purifier (sigma in pixels, reflect border)";
    type Params = GaussianParams;
    fn param_schema() -> &'static str {
        r#"{"type":"object","properties":{"sigma":{"type":"number","exclusiveMinimum":0,"maximum":20,"description":"standard deviation in pixels"}},"required":["sigma"],"additionalProperties":false}"#
    }
    fn create(p: GaussianParams, _host: &Host<'_>) -> Result<Self> {
        Ok(Gaussian { sigma: p.sigma })
    }
}

impl Purifier for Gaussian {
    fn purify(&mut self, batch: &Batch<'_>) -> Result<Tensor> {
        let x = batch.input();
        let y = batch.host().gaussian_filter(x, self.sigma)?;
        audit_change(batch, x, y)?;
        Ok(y)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, crate = "adverse_plugin_sdk::serde")]
pub struct FgsmParams {
    /// Step size in stored units.
    pub eps: f32,
    #[serde(default)]
    pub targeted: bool,
}

/// One signed-gradient step of cross-entropy, clipped to each frame's stored range.
#[derive(Debug)]
pub struct Fgsm {
    eps: f32,
    targeted: bool,
}

impl PluginInfo for Fgsm {
    const NAME: &'static str = "fgsm";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str =
        "Fast gradient sign attack (one L-inf step of eps stored units)";
    type Params = FgsmParams;
    fn param_schema() -> &'static str {
        r#"{"type":"object","properties":{"eps":{"type":"number","minimum":0,"description":"step in stored units"},"targeted":{"type":"boolean","default":false}},"required":["eps"],"additionalProperties":false}"#
    }
    fn create(p: FgsmParams, _host: &Host<'_>) -> Result<Self> {
        Ok(Fgsm {
            eps: p.eps,
            targeted: p.targeted,
        })
    }
}

impl Attack for Fgsm {
    fn attack(&mut self, batch: &Batch<'_>) -> Result<Tensor> {
        let h = batch.host();
        let targets: Vec<u32> = if self.targeted {
            (0..batch.len())
                .map(|i| {
                    batch.meta(i)?.target.ok_or_else(|| {
                        format!("frame {i} has no target class (give --target)").into()
                    })
                })
                .collect::<Result<_>>()?
        } else {
            batch.labels()?
        };
        let x = batch.input();
        let (losses, g) = h.model_loss_grad(x, LossKind::CrossEntropy, self.targeted, &targets)?;
        let stepped = h.sign_step(x, g, self.eps)?;
        let adv = h.clip_to_range(stepped)?;
        let logits = h.model_forward(adv)?;
        let k = h.shape(logits)?.get(1).copied().unwrap_or(0);
        let z = h.download(logits)?;
        for (i, loss) in losses.iter().enumerate() {
            batch.audit_number(i, "loss_before", f64::from(*loss))?;
            let row = &z[i * k..(i + 1) * k];
            let pred = row
                .iter()
                .enumerate()
                .fold(
                    (0, f32::NEG_INFINITY),
                    |m, (j, &v)| if v > m.1 { (j, v) } else { m },
                )
                .0;
            batch.audit_number(i, "adv_class", pred as f64)?;
            let success = if self.targeted {
                pred as u32 == targets[i]
            } else {
                pred as u32 != targets[i]
            };
            batch.audit_flag(i, "success", success)?;
        }
        audit_change(batch, x, adv)?;
        Ok(adv)
    }
}

export_plugins!(purifier: Median, purifier: Gaussian, attack: Fgsm);

#[cfg(test)]
mod tests {
    use super::*;
    use adverse_plugin_sdk::testing::{self, TestHost, TestModel};
    use serde_json::json;

    #[test]
    fn median_removes_an_impulse_and_audits_the_change() {
        let mut img = vec![100f32; 36];
        img[14] = 4000.0;
        let mut host = TestHost::new(vec![TestHost::frame(6, 6)]);
        let out = testing::run(
            adverse_plugin_library(),
            "median",
            &json!({"radius": 1}),
            &mut host,
            &img,
            [1, 1, 6, 6],
        )
        .unwrap();
        assert_eq!(out.output.unwrap(), vec![100f32; 36]);
        assert_eq!(out.audit[0]["linf_change"], json!(3900.0));
        assert_eq!(out.audit[0]["l2_change"], json!(3900.0));
    }

    #[test]
    fn bad_parameters_fail_create_with_the_serde_message() {
        let mut host = TestHost::new(vec![TestHost::frame(2, 2)]);
        let err = testing::run(
            adverse_plugin_library(),
            "gaussian",
            &json!({"sigma": "wide"}),
            &mut host,
            &[0.0; 4],
            [1, 1, 2, 2],
        )
        .unwrap_err();
        assert!(err.message.contains("invalid parameters"), "{err}");
        assert!(
            err.message.contains("sigma") || err.message.contains("f32"),
            "{err}"
        );
    }

    #[test]
    fn fgsm_flips_a_linear_model_and_stays_in_range() {
        // Two classes over 4 pixels: class 1 wins when the sum of pixels 0,1 exceeds that of 2,3.
        let model = TestModel {
            weights: vec![0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0],
            bias: vec![0.0, 0.0],
        };
        let mut f = TestHost::frame(2, 2);
        f.label = Some(0);
        let mut host = TestHost::new(vec![f]).with_model(model);
        // Logits (205, 200): class 0, but not saturated, so the gradient is non-zero.
        let x = [100.0, 100.0, 110.0, 95.0];
        let out = testing::run(
            adverse_plugin_library(),
            "fgsm",
            &json!({"eps": 100.0}),
            &mut host,
            &x,
            [1, 1, 2, 2],
        )
        .unwrap();
        // d CE(label 0) / dx = p1 * (+1, +1, -1, -1): pixels 0,1 go up, 2,3 down (3 clipped at 0).
        assert_eq!(out.output.unwrap(), vec![200.0, 200.0, 10.0, 0.0]);
        assert_eq!(out.audit[0]["success"], json!(true));
        assert_eq!(out.audit[0]["adv_class"], json!(1.0));
        assert_eq!(out.audit[0]["linf_change"], json!(100.0));
    }

    #[test]
    fn fgsm_without_a_label_reports_the_frame() {
        let model = TestModel {
            weights: vec![1.0; 8],
            bias: vec![0.0, 0.0],
        };
        let mut host = TestHost::new(vec![TestHost::frame(2, 2)]).with_model(model);
        let err = testing::run(
            adverse_plugin_library(),
            "fgsm",
            &json!({"eps": 1.0}),
            &mut host,
            &[0.0; 4],
            [1, 1, 2, 2],
        )
        .unwrap_err();
        assert_eq!(err.status, adverse_plugin_sdk::abi::ADV_ERR_FAILED);
        assert!(err.message.contains("frame 0 has no label"), "{err}");
    }
}
