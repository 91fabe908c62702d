//! In-process host tests: a plugin defined here with the SDK (no library is built or loaded)
//! runs through the real host services on the CPU backend and on the GPU backend (lavapipe).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use adverse_plugin_sdk::abi::{self, AdvAbiVersion, AdvLibrary};
use adverse_plugin_sdk::serde::Deserialize;
use adverse_plugin_sdk::{
    Batch, CpuInput, FrameMeta, Host, PluginInfo, Purifier, Result, Shader, Tensor, cpu,
    export_plugins,
};
use serde_json::json;

use super::host::{BatchInput, Instance, PluginBackend};
use super::loader::{Pins, PluginLibrary};
use super::{PluginError, PluginHandle};
use crate::runtime::backend::Backend;
use crate::runtime::cpu::CpuBackend;
use crate::runtime::gpu::{AdapterPolicy, GpuBackend, GpuOptions};

static CREATED: AtomicUsize = AtomicUsize::new(0);

#[derive(Debug, Deserialize)]
#[serde(crate = "adverse_plugin_sdk::serde")]
struct ProbeParams {
    mode: String,
    #[serde(default)]
    bias: f32,
}

/// Exercises services according to `mode`.
#[derive(Debug)]
struct Probe {
    p: ProbeParams,
}

const WGSL: &str = r#"
@group(0) @binding(0) var<storage, read> params: array<f32>;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
    if (id.x < u32(params[1])) {
        y[id.x] = 2.0 * x[id.x] + params[0];
    }
}
"#;

impl PluginInfo for Probe {
    const NAME: &'static str = "probe";
    const VERSION: &'static str = "1.2.3";
    const DESCRIPTION: &'static str = "host test probe";
    type Params = ProbeParams;
    fn param_schema() -> &'static str {
        r#"{"type":"object","properties":{"mode":{"enum":["shader","broken_shader","bad_shapes"]},"bias":{"type":"number"}},"required":["mode"],"additionalProperties":false}"#
    }
    fn create(p: ProbeParams, _host: &Host<'_>) -> Result<Self> {
        CREATED.fetch_add(1, Ordering::SeqCst);
        Ok(Probe { p })
    }
}

impl Purifier for Probe {
    fn purify(&mut self, batch: &Batch<'_>) -> Result<Tensor> {
        let h = batch.host();
        let x = batch.input();
        let shape = h.shape(x)?;
        let n: usize = shape.iter().product();
        match self.p.mode.as_str() {
            "bad_shapes" => {
                let other = h.zeros(&[1, 2])?;
                h.sign_step(x, other, 1.0)
            }
            mode => {
                let wgsl = if mode == "broken_shader" {
                    "fn main( {"
                } else {
                    WGSL
                };
                let cpu_fn =
                    |ins: &[CpuInput<'_>], params: &[f32], out: &mut [f32]| -> Result<()> {
                        for (o, v) in out.iter_mut().zip(ins[0].data) {
                            *o = 2.0 * v + params[0];
                        }
                        Ok(())
                    };
                let y = h.run_shader(&Shader {
                    wgsl,
                    entry: "main",
                    inputs: &[x],
                    out_shape: &shape,
                    params: &[self.p.bias, n as f32],
                    workgroups: [(n as u32).div_ceil(64), 1, 1],
                    cpu: Some(&cpu_fn),
                })?;
                let u = h.download(h.random_uniform(&[3], 0.0, 1.0, 5)?)?;
                let z = h.download(h.random_normal(&[3], 2.0, 6)?)?;
                let clipped = h.download(h.clip_to_range(y)?)?;
                for i in 0..batch.len() {
                    batch.audit_number(i, "u2", f64::from(u[2]))?;
                    batch.audit_number(i, "z1", f64::from(z[1]))?;
                    batch.audit_number(
                        i,
                        "max_clipped",
                        f64::from(clipped.iter().cloned().fold(f32::MIN, f32::max)),
                    )?;
                    batch.audit_text(i, "modality", &batch.meta(i)?.modality)?;
                }
                Ok(y)
            }
        }
    }
}

export_plugins!(purifier: Probe);

fn probe() -> Arc<PluginHandle> {
    let mut hs = PluginLibrary::in_process("core-tests", adverse_plugin_library())
        .expect("probe table loads");
    assert_eq!(hs.len(), 1);
    Arc::new(hs.remove(0))
}

fn frame(rows: u32, cols: u32) -> FrameMeta {
    FrameMeta {
        rows,
        cols,
        samples_per_pixel: 1,
        bits_allocated: 8,
        bits_stored: 8,
        signed: false,
        float: false,
        frame_index: 0,
        rescale_slope: 1.0,
        rescale_intercept: 0.0,
        window: None,
        value_range: (0.0, 255.0),
        label: None,
        target: None,
        modality: "CT".into(),
    }
}

fn run_probe<B: PluginBackend>(
    b: &B,
    params: serde_json::Value,
) -> std::result::Result<
    (
        Vec<f32>,
        Vec<std::collections::BTreeMap<String, serde_json::Value>>,
    ),
    PluginError,
> {
    let mut inst = Instance::create(probe(), &params, b)?;
    let data: Vec<f32> = (0..32).map(|i| i as f32 * 5.0).collect();
    let input = b.upload(&data, &[2, 1, 4, 4]);
    let out = inst.process(BatchInput {
        backend: b,
        frames: vec![frame(4, 4), frame(4, 4)],
        input,
        model: None,
        seed: 42,
    })?;
    let y = out.output.map(|t| b.download(&t)).unwrap_or_default();
    Ok((y, out.audit))
}

fn lavapipe() -> GpuBackend {
    GpuBackend::new(GpuOptions {
        adapter: AdapterPolicy::SoftwareOnly,
    })
    .expect("the software GPU adapter (lavapipe) must be installed")
}

#[test]
fn in_process_plugin_gets_the_same_services_on_cpu_and_gpu() {
    let params = json!({"mode": "shader", "bias": 1.5});
    let (y_cpu, a_cpu) = run_probe(&CpuBackend::new(Some(1)), params.clone()).unwrap();
    let (y_gpu, a_gpu) = run_probe(&lavapipe(), params).unwrap();
    let want: Vec<f32> = (0..32).map(|i| 2.0 * (i as f32 * 5.0) + 1.5).collect();
    assert_eq!(y_cpu, want, "CPU callback path");
    assert_eq!(y_gpu, want, "plugin WGSL on the GPU");
    // Counter-based random streams: the same numbers on both backends and in the SDK.
    let u2 = cpu::counter_uniform(cpu::stream_seed(42, 5), 2);
    assert_eq!(a_cpu[0]["u2"], json!(u2 as f64));
    assert_eq!(a_gpu[1]["u2"], json!(u2 as f64));
    let z1_cpu = a_cpu[0]["z1"].as_f64().unwrap();
    let z1_gpu = a_gpu[0]["z1"].as_f64().unwrap();
    assert!(
        (z1_cpu - z1_gpu).abs() < 1e-4
            && (z1_cpu - 2.0 * cpu::counter_normal(cpu::stream_seed(42, 6), 1) as f64).abs() < 1e-4
    );
    // clip_to_range used the frames' 8-bit range.
    assert_eq!(a_cpu[0]["max_clipped"], json!(255.0));
    assert_eq!(a_gpu[1]["modality"], json!("CT"));
}

#[test]
fn broken_wgsl_is_an_error_not_a_crash() {
    let err = run_probe(&lavapipe(), json!({"mode": "broken_shader"})).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, PluginError::Process { .. }), "{msg}");
    assert!(
        msg.contains("plugin `probe`") && msg.contains("WGSL"),
        "{msg}"
    );
}

#[test]
fn service_argument_errors_reach_the_plugin_message() {
    let msg = run_probe(&CpuBackend::new(Some(1)), json!({"mode": "bad_shapes"}))
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("sign_step") && msg.contains("shapes differ"),
        "{msg}"
    );
}

#[test]
fn parameters_are_validated_before_create() {
    let before = CREATED.load(Ordering::SeqCst);
    let err = Instance::create(
        probe(),
        &json!({"mode": "shader", "bias": "x"}),
        &CpuBackend::new(Some(1)),
    )
    .unwrap_err();
    assert!(
        matches!(&err, PluginError::InvalidParam { plugin, param, .. } if plugin == "probe" && param == "bias"),
        "{err}"
    );
    let err =
        Instance::create(probe(), &json!({"mode": "fast"}), &CpuBackend::new(Some(1))).unwrap_err();
    assert!(
        err.to_string().contains("parameter `mode` must be one of"),
        "{err}"
    );
    assert_eq!(
        CREATED.load(Ordering::SeqCst),
        before,
        "create must not run on invalid parameters"
    );
}

#[test]
fn a_table_of_another_abi_major_is_refused_naming_both_versions() {
    let other: &'static AdvLibrary = Box::leak(Box::new(AdvLibrary {
        abi: AdvAbiVersion {
            major: abi::ADVERSE_ABI_MAJOR + 1,
            minor: 0,
        },
        size: std::mem::size_of::<AdvLibrary>() as u32,
        plugin_count: 0,
        plugins: std::ptr::null(),
        plugin_desc_size: 0,
    }));
    let err = PluginLibrary::in_process("other", other).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, PluginError::AbiMismatch { .. }), "{msg}");
    assert!(
        msg.contains(&format!("ABI {}.0", abi::ADVERSE_ABI_MAJOR + 1))
            && msg.contains(&format!(
                "ABI {}.{}",
                abi::ADVERSE_ABI_MAJOR,
                abi::ADVERSE_ABI_MINOR
            )),
        "{msg}"
    );
}

#[test]
fn a_table_of_an_older_minor_abi_loads_and_runs() {
    // The probe's own table, declared as built against ABI 1.1 (before model_features,
    // model_head and model_id were appended): same major, older minor, so it loads.
    let own = adverse_plugin_library();
    let older: &'static AdvLibrary = Box::leak(Box::new(AdvLibrary {
        abi: AdvAbiVersion {
            major: abi::ADVERSE_ABI_MAJOR,
            minor: 1,
        },
        size: own.size,
        plugin_count: own.plugin_count,
        plugins: own.plugins,
        plugin_desc_size: own.plugin_desc_size,
    }));
    let h = PluginLibrary::in_process("older", older)
        .expect("an ABI 1.1 table loads on this host")
        .remove(0);
    assert_eq!(h.library.abi, AdvAbiVersion { major: 1, minor: 1 });
    let b = CpuBackend::new(Some(1));
    let mut inst =
        Instance::create(Arc::new(h), &json!({"mode": "shader", "bias": 1.5}), &b).expect("create");
    let input = b.upload(&[1.0; 32], &[2, 1, 4, 4]);
    inst.process(BatchInput {
        backend: &b,
        frames: vec![frame(4, 4), frame(4, 4)],
        input,
        model: None,
        seed: 42,
    })
    .expect("an ABI 1.1 plugin runs");
}

#[test]
fn pins_are_parsed_and_enforced() {
    assert!(matches!(
        Pins::parse(&["probe".into()]),
        Err(PluginError::BadPin(_))
    ));
    assert!(matches!(
        Pins::parse(&["probe=abc".into()]),
        Err(PluginError::BadPin(_))
    ));
    let h = probe();
    let pins = Pins::parse(&[format!("probe={}", "AB".repeat(32))]).unwrap();
    let msg = pins.check(&h).unwrap_err().to_string();
    assert!(
        msg.contains(&"ab".repeat(32)) && msg.contains("refusing"),
        "{msg}"
    );
    assert!(
        Pins::parse(&[format!("other={}", "ab".repeat(32))])
            .unwrap()
            .check(&h)
            .is_ok()
    );
}

/// A hand-written (C-style) purifier whose process succeeds without setting an output.
unsafe extern "C" fn silent_create(
    _h: *const abi::AdvHost,
    _p: *const std::ffi::c_char,
    _l: usize,
    out: *mut *mut std::ffi::c_void,
) -> abi::AdvStatus {
    // SAFETY: the host passes a writable out pointer; any non-null value is a valid instance here.
    unsafe { *out = std::ptr::NonNull::<u8>::dangling().as_ptr().cast() };
    abi::ADV_OK
}
unsafe extern "C" fn silent_process(
    _i: *mut std::ffi::c_void,
    _h: *const abi::AdvHost,
    _b: *const abi::AdvBatch,
) -> abi::AdvStatus {
    abi::ADV_OK
}
unsafe extern "C" fn silent_destroy(_i: *mut std::ffi::c_void) {}

#[test]
fn a_purifier_that_sets_no_output_breaks_the_contract() {
    let descs: &'static [abi::AdvPluginDesc] = Box::leak(Box::new([abi::AdvPluginDesc {
        size: std::mem::size_of::<abi::AdvPluginDesc>() as u32,
        kind: abi::ADV_KIND_PURIFIER,
        name: c"silent".as_ptr(),
        version: c"0".as_ptr(),
        description: c"sets no output".as_ptr(),
        param_schema: c"{}".as_ptr(),
        create: Some(silent_create),
        process: Some(silent_process),
        destroy: Some(silent_destroy),
        score_grad: None,
    }]));
    let lib: &'static AdvLibrary = Box::leak(Box::new(AdvLibrary {
        abi: super::host_abi(),
        size: std::mem::size_of::<AdvLibrary>() as u32,
        plugin_count: 1,
        plugins: descs.as_ptr(),
        plugin_desc_size: std::mem::size_of::<abi::AdvPluginDesc>() as u32,
    }));
    let h = Arc::new(PluginLibrary::in_process("silent", lib).unwrap().remove(0));
    let b = CpuBackend::new(Some(1));
    let mut inst = Instance::create(h, &json!({}), &b).unwrap();
    let input = b.upload(&[1.0], &[1, 1, 1, 1]);
    let err = inst
        .process(BatchInput {
            backend: &b,
            frames: vec![frame(1, 1)],
            input,
            model: None,
            seed: 0,
        })
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("plugin `silent`: a purifier must set an output"),
        "{err}"
    );
}

/// The descriptor layout of ABI 1.0 to 1.2: `AdvPluginDesc` before `score_grad` was appended.
#[repr(C)]
struct DescV1_2 {
    size: u32,
    kind: u32,
    name: *const std::ffi::c_char,
    version: *const std::ffi::c_char,
    description: *const std::ffi::c_char,
    param_schema: *const std::ffi::c_char,
    create: Option<abi::AdvCreateFn>,
    process: Option<abi::AdvProcessFn>,
    destroy: Option<abi::AdvDestroyFn>,
}

fn v1_2_desc(name: &'static std::ffi::CStr) -> DescV1_2 {
    DescV1_2 {
        size: std::mem::size_of::<DescV1_2>() as u32,
        kind: abi::ADV_KIND_PURIFIER,
        name: name.as_ptr(),
        version: c"0".as_ptr(),
        description: c"an ABI 1.2 descriptor".as_ptr(),
        param_schema: c"{}".as_ptr(),
        create: Some(silent_create),
        process: Some(silent_process),
        destroy: Some(silent_destroy),
    }
}

/// Fields are only ever appended: a library built against ABI 1.2 has shorter descriptors
/// (stride without `score_grad`) and still loads, every plugin of its array found at the old
/// stride and without a score gradient; a library declaring 1.3 must have the full layout.
#[test]
fn descriptors_of_the_shorter_abi_1_2_layout_load_without_a_score_gradient() {
    assert_eq!(
        std::mem::size_of::<DescV1_2>(),
        std::mem::offset_of!(abi::AdvPluginDesc, score_grad)
    );
    let descs: &'static [DescV1_2] =
        Box::leak(Box::new([v1_2_desc(c"old-one"), v1_2_desc(c"old-two")]));
    let table = |minor: u32| -> &'static AdvLibrary {
        Box::leak(Box::new(AdvLibrary {
            abi: AdvAbiVersion {
                major: abi::ADVERSE_ABI_MAJOR,
                minor,
            },
            size: std::mem::size_of::<AdvLibrary>() as u32,
            plugin_count: 2,
            plugins: descs.as_ptr().cast(),
            plugin_desc_size: std::mem::size_of::<DescV1_2>() as u32,
        }))
    };
    let hs = PluginLibrary::in_process("old", table(2)).expect("an ABI 1.2 table loads");
    let names: Vec<&str> = hs.iter().map(|h| h.name.as_str()).collect();
    assert_eq!(names, ["old-one", "old-two"]);
    assert!(hs.iter().all(|h| h.score_grad.is_none()));
    let b = CpuBackend::new(Some(1));
    let mut inst =
        Instance::create(Arc::new(hs.into_iter().next().unwrap()), &json!({}), &b).expect("create");
    let err = inst
        .score_grad(&b, None, &[0.0; 4], 1, 4)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("old-one") && err.contains("score gradient"),
        "{err}"
    );
    let err = PluginLibrary::in_process("short", table(3))
        .unwrap_err()
        .to_string();
    assert!(err.contains("smaller than ABI 1.3 requires"), "{err}");
}
