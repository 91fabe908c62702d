//! The 2x2 median filter of feature squeezing (Xu et al. 2018 use it on small images): window
//! rows {i-1, i} and columns {j-1, j}, index -1 reflected to 0, the upper of the two middle
//! values (scipy's `median_filter(size=2, mode="reflect")`, the convention of the
//! `feature-squeezing` detector). As a purifier it lets an evaluation attack that detector
//! adaptively (a shadow purifier standing for the squeezer), or squeeze what is written.
//!
//! CPU work on either backend (download, filter, upload): a 2x2 window is cheap and the
//! order-statistics kernel of `median` covers odd windows only.

use adverse_plugin_sdk::serde::Deserialize;
use adverse_plugin_sdk::{Batch, Host, PluginInfo, Purifier, Result, Tensor};

use crate::{audit_change, nchw};

pub use adverse_plugin_sdk::cpu::median2x2;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, crate = "adverse_plugin_sdk::serde")]
pub struct Median2Params {}

/// 2x2 median of every `[H, W]` plane.
#[derive(Debug)]
pub struct Median2;

impl PluginInfo for Median2 {
    const NAME: &'static str = "median-2x2";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str =
        "2x2 median filter (feature squeezing's squeezer for small images)";
    type Params = Median2Params;
    fn param_schema() -> &'static str {
        r#"{"type":"object","properties":{},"additionalProperties":false}"#
    }
    fn create(_p: Median2Params, _host: &Host<'_>) -> Result<Self> {
        Ok(Median2)
    }
}

impl Purifier for Median2 {
    fn purify(&mut self, batch: &Batch<'_>) -> Result<Tensor> {
        let h = batch.host();
        let x = batch.input();
        let (_, _, hh, w) = nchw(batch, x)?;
        let data = h.download(x)?;
        let out: Vec<f32> = data
            .chunks(hh * w)
            .flat_map(|p| median2x2(p, hh, w))
            .collect();
        let y = h.upload(&out, &h.shape(x)?)?;
        audit_change(batch, x, y)?;
        Ok(y)
    }
}
