//! Built-in example plugins, written against the SDK's safe layer only (the host sees them
//! through the C ABI like any third-party library):
//! - `median`: a median-filter purifier (host service `median_filter`);
//! - `gaussian`: a Gaussian-blur purifier (host service `gaussian_filter`).
//!
//! The attacks (FGSM and the rest of the catalogue) live in `plugins/attacks`.
//!
//! Each reports how far it moved every frame (`l2_change`, `linf_change`, in stored units) in
//! the audit record, so a result row shows what the plugin did.

use adverse_plugin_sdk::serde::Deserialize;
use adverse_plugin_sdk::{Batch, Host, Norm, PluginInfo, Purifier, Result, Tensor, export_plugins};

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

export_plugins!(purifier: Median, purifier: Gaussian);

#[cfg(test)]
mod tests {
    use super::*;
    use adverse_plugin_sdk::testing::{self, TestHost};
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
}
