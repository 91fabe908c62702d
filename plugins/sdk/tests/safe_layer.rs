//! The safe layer through its C entry points (via the in-process test host): errors and panics
//! become status codes with the message, host service failures carry the host's message, and
//! every plugin kind's result reaches the host.

use adverse_plugin_sdk::abi::{ADV_ERR_FAILED, ADV_ERR_PANIC, ADV_KIND_DETECTOR, ADV_KIND_OTHER};
use adverse_plugin_sdk::serde::Deserialize;
use adverse_plugin_sdk::testing::{self, TestHost};
use adverse_plugin_sdk::{
    Batch, Detector, Host, LogLevel, PluginInfo, Result, Stage, Tensor, export_plugins,
};
use serde_json::json;

#[derive(Debug, Deserialize)]
#[serde(crate = "adverse_plugin_sdk::serde")]
struct P {
    mode: String,
}

#[derive(Debug)]
struct Chaos {
    mode: String,
}

impl PluginInfo for Chaos {
    const NAME: &'static str = "chaos";
    const VERSION: &'static str = "0.0.0";
    const DESCRIPTION: &'static str = "misbehaves on request";
    type Params = P;
    fn param_schema() -> &'static str {
        r#"{"type":"object"}"#
    }
    fn create(p: P, _host: &Host<'_>) -> Result<Self> {
        if p.mode == "refuse" {
            return Err("refused at create".into());
        }
        Ok(Chaos { mode: p.mode })
    }
}

impl Stage for Chaos {
    fn run(&mut self, batch: &Batch<'_>) -> Result<Option<Tensor>> {
        let h = batch.host();
        match self.mode.as_str() {
            "panic" => panic!("boom {}", 42),
            "error" => Err("plain error".into()),
            "bad_handle" => h.download(Tensor(9999)).map(|_| None),
            "double" => {
                h.log(LogLevel::Info, "doubling");
                let x = batch.input();
                Ok(Some(h.axpby(2.0, x, 0.0, x)?))
            }
            _ => Ok(None),
        }
    }
}

#[derive(Debug)]
struct Counter;

impl PluginInfo for Counter {
    const NAME: &'static str = "counter";
    const VERSION: &'static str = "0.0.0";
    const DESCRIPTION: &'static str = "counts frames";
    type Params = serde_json::Value;
    fn param_schema() -> &'static str {
        "{}"
    }
    fn create(_p: serde_json::Value, _host: &Host<'_>) -> Result<Self> {
        Ok(Counter)
    }
}

impl Detector for Counter {
    fn detect(&mut self, batch: &Batch<'_>) -> Result<()> {
        for i in 0..batch.len() {
            batch.audit_number(i, "index", i as f64)?;
            batch.audit_text(i, "modality", &batch.meta(i)?.modality)?;
        }
        Ok(())
    }
}

export_plugins!(stage: Chaos, detector: Counter);

fn run(mode: &str) -> std::result::Result<testing::Outcome, testing::Failure> {
    let mut host = TestHost::new(vec![TestHost::frame(1, 2)]);
    testing::run(
        adverse_plugin_library(),
        "chaos",
        &json!({ "mode": mode }),
        &mut host,
        &[1.0, 2.0],
        [1, 1, 1, 2],
    )
}

#[test]
fn panics_and_errors_become_status_codes_with_messages() {
    let e = run("panic").unwrap_err();
    assert_eq!(e.status, ADV_ERR_PANIC);
    assert_eq!(e.message, "plugin panicked: boom 42");
    let e = run("error").unwrap_err();
    assert_eq!(
        (e.status, e.message.as_str()),
        (ADV_ERR_FAILED, "plain error")
    );
    let e = run("refuse").unwrap_err();
    assert_eq!(e.message, "refused at create");
    let e = run("bad_handle").unwrap_err();
    assert!(
        e.message.starts_with("host service tensor_shape failed")
            && e.message.contains("unknown tensor handle 9999"),
        "{e}"
    );
}

#[test]
fn stage_and_detector_results_reach_the_host() {
    let out = run("double").unwrap();
    assert_eq!(out.output, Some(vec![2.0, 4.0]));
    assert_eq!(out.logs, vec!["doubling".to_string()]);
    assert_eq!(run("nothing").unwrap().output, None);
    let mut host = TestHost::new(vec![TestHost::frame(1, 1), TestHost::frame(1, 1)]);
    let out = testing::run(
        adverse_plugin_library(),
        "counter",
        &json!({}),
        &mut host,
        &[0.0, 0.0],
        [2, 1, 1, 1],
    )
    .unwrap();
    assert_eq!(out.audit[1]["index"], json!(1.0));
    assert_eq!(out.audit[0]["modality"], json!("OT"));
    assert_eq!(
        testing::find(adverse_plugin_library(), "counter").map(|d| d.kind),
        Some(ADV_KIND_DETECTOR)
    );
    assert_eq!(
        testing::find(adverse_plugin_library(), "chaos").map(|d| d.kind),
        Some(ADV_KIND_OTHER)
    );
}
