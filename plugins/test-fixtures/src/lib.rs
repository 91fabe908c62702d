//! Plugins that misbehave on purpose, so the host's tests can check that a plugin failure fails
//! only that batch's files: `panicky` panics on frames of a chosen height, `failing` returns an
//! error on them; both pass other frames through unchanged.

use adverse_plugin_sdk::serde::Deserialize;
use adverse_plugin_sdk::{Batch, Host, PluginInfo, Purifier, Result, Tensor, export_plugins};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, crate = "adverse_plugin_sdk::serde")]
pub struct Params {
    /// Frames with this many rows trigger the misbehaviour.
    pub rows: u32,
}

const SCHEMA: &str = r#"{"type":"object","properties":{"rows":{"type":"integer","minimum":1}},"required":["rows"],"additionalProperties":false}"#;

fn triggered(batch: &Batch<'_>, rows: u32) -> Result<bool> {
    Ok(batch.meta(0)?.rows == rows)
}

#[derive(Debug)]
pub struct Panicky {
    rows: u32,
}

impl PluginInfo for Panicky {
    const NAME: &'static str = "panicky";
    const VERSION: &'static str = "0.0.1";
    const DESCRIPTION: &'static str = "Test fixture: panics on frames of a given height";
    type Params = Params;
    fn param_schema() -> &'static str {
        SCHEMA
    }
    fn create(p: Params, _host: &Host<'_>) -> Result<Self> {
        Ok(Panicky { rows: p.rows })
    }
}

impl Purifier for Panicky {
    fn purify(&mut self, batch: &Batch<'_>) -> Result<Tensor> {
        if triggered(batch, self.rows)? {
            panic!("fixture panic on a frame of {} rows", self.rows);
        }
        for i in 0..batch.len() {
            batch.audit_flag(i, "passed", true)?;
        }
        Ok(batch.input())
    }
}

#[derive(Debug)]
pub struct Failing {
    rows: u32,
}

impl PluginInfo for Failing {
    const NAME: &'static str = "failing";
    const VERSION: &'static str = "0.0.1";
    const DESCRIPTION: &'static str = "Test fixture: returns an error on frames of a given height";
    type Params = Params;
    fn param_schema() -> &'static str {
        SCHEMA
    }
    fn create(p: Params, _host: &Host<'_>) -> Result<Self> {
        Ok(Failing { rows: p.rows })
    }
}

impl Purifier for Failing {
    fn purify(&mut self, batch: &Batch<'_>) -> Result<Tensor> {
        if triggered(batch, self.rows)? {
            return Err(format!("fixture error on a frame of {} rows", self.rows).into());
        }
        Ok(batch.input())
    }
}

export_plugins!(purifier: Panicky, purifier: Failing);
