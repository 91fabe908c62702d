//! `adverse train CONFIG.yaml`: train a classifier (optionally adversarially), evaluate it on the
//! test split (accuracy, ROC AUC, PGD robust accuracy) and export it as ONNX plus model card.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use serde::Serialize;

use crate::runtime::backend::{Backend, Norm};
use crate::runtime::card;
use crate::runtime::export;
use crate::runtime::pgd::PgdParams;
use crate::runtime::select::{self, BackendChoice};
use crate::train::checkpoint::EpochStats;
use crate::train::config::TrainConfig;
use crate::train::trainer::{self, Trainer};

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// The training config (YAML; see pipelines/train/).
    pub config: PathBuf,
    /// Continue from this checkpoint (written by the same config).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// auto, cpu, gpu or gpu-software (default: $ADVERSE_BACKEND, else auto).
    #[arg(long)]
    pub backend: Option<BackendChoice>,
    /// Stop after this many epochs in total (resume later with `--resume`); nothing is
    /// evaluated or exported until the run is complete.
    #[arg(long)]
    pub stop_after: Option<usize>,
    /// No progress bar (per-epoch lines are still printed).
    #[arg(long)]
    pub quiet: bool,
    /// Also write the final summary (metrics, history) as JSON here.
    #[arg(long)]
    pub summary: Option<PathBuf>,
}

#[derive(Serialize)]
struct PgdResult {
    /// Radius in model-input units and in 8-bit stored units (eps * 255).
    eps: f32,
    eps_stored_8bit: f32,
    steps: usize,
    step_size: f32,
    n: usize,
    accuracy: f64,
}

#[derive(Serialize)]
struct Evaluation {
    split: String,
    n: usize,
    accuracy: f64,
    roc_auc: Option<f64>,
    loss: f64,
    pgd: Vec<PgdResult>,
}

#[derive(Serialize)]
struct TrainingInfo {
    command: String,
    config: String,
    seed: u64,
    backend: String,
    epochs_run: usize,
    best_epoch: Option<usize>,
    stopped_early: bool,
    seconds: f64,
    train_samples: usize,
    adversarial: Option<String>,
}

#[derive(Serialize)]
struct Summary {
    training: TrainingInfo,
    evaluation: Option<Evaluation>,
    history: Vec<EpochStats>,
}

pub fn run(a: TrainArgs) -> anyhow::Result<ExitCode> {
    let cfg = TrainConfig::load(&a.config)?;
    let backend = select::select(select::resolve_choice(a.backend)?)?;
    crate::with_backend!(&backend, |b| run_on(b, cfg, &a))
}

fn run_on<B: Backend>(b: &B, cfg: TrainConfig, a: &TrainArgs) -> anyhow::Result<ExitCode> {
    let graph = trainer::build_graph(&cfg)?;
    let (chw, k) = trainer::model_io(&graph)?;
    let (train, val, test) = trainer::load_data(&cfg, chw, k)?;
    eprintln!(
        "training on {} ({} samples{}), backend {}",
        train.origin,
        train.len(),
        val.as_ref()
            .map_or(String::new(), |v| format!(", validation {}", v.len())),
        b.describe()
    );
    let t0 = Instant::now();
    let mut tr = Trainer::new(b, cfg.clone(), graph)?;
    if let Some(r) = &a.resume {
        tr.resume(r)?;
        eprintln!(
            "resumed from {} at epoch {}",
            r.display(),
            tr.state.next_epoch + 1
        );
    }
    tr.run(&train, val.as_ref(), !a.quiet, a.stop_after, |s| {
        let v = match (s.val_loss, s.val_accuracy) {
            (Some(l), Some(acc)) => format!(" val_loss {l:.4} val_acc {acc:.4}"),
            _ => String::new(),
        };
        eprintln!(
            "epoch {:>3} lr {:.2e} loss {:.4} acc {:.4}{v} ({:.1}s)",
            s.epoch + 1,
            s.lr,
            s.train_loss,
            s.train_accuracy,
            s.seconds
        );
    })?;
    let seconds = t0.elapsed().as_secs_f64();
    if !tr.finished() {
        println!(
            "stopped after epoch {} of {} ({seconds:.1}s); continue with --resume CHECKPOINT",
            tr.state.next_epoch, cfg.epochs
        );
        if cfg.checkpoint.is_none() {
            eprintln!(
                "warning: the config has no `checkpoint:` path, so this run cannot be resumed"
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    if tr.state.stopped_early {
        eprintln!("early stopping after epoch {}", tr.state.next_epoch);
    }
    let model = tr.final_model()?;
    let eval = match &test {
        None => None,
        Some(ts) => {
            let e = trainer::evaluate(b, &model, ts, 128)?;
            let mut pgd = Vec::new();
            if let Some(p) = &cfg.pgd_eval {
                let sub = ts.clone().truncate(p.limit.unwrap_or(usize::MAX));
                for eps in &p.eps {
                    let pp = PgdParams {
                        eps: eps.0,
                        steps: p.steps,
                        step_size: (eps.0 * p.rel_step).max(f32::MIN_POSITIVE),
                        norm: Norm::Linf,
                        random_start: true,
                        seed: cfg.seed,
                    };
                    let acc = trainer::pgd_accuracy(b, &model, &sub, 128, &pp, cfg.input_range)?;
                    eprintln!(
                        "PGD-{} eps {:.4} ({:.1}/255): accuracy {acc:.4} on {} samples",
                        p.steps,
                        eps.0,
                        eps.0 * 255.0,
                        sub.len()
                    );
                    pgd.push(PgdResult {
                        eps: eps.0,
                        eps_stored_8bit: (eps.0 * 255.0 * 1000.0).round() / 1000.0,
                        steps: p.steps,
                        step_size: pp.step_size,
                        n: sub.len(),
                        accuracy: acc,
                    });
                }
            }
            println!(
                "test: accuracy {:.4}, ROC AUC {}, loss {:.4} ({} samples)",
                e.accuracy,
                e.auc.map_or("n/a".into(), |v| format!("{v:.4}")),
                e.loss,
                e.n
            );
            Some(Evaluation {
                split: ts.origin.clone(),
                n: e.n,
                accuracy: e.accuracy,
                roc_auc: e.auc,
                loss: e.loss,
                pgd,
            })
        }
    };
    let summary = Summary {
        training: TrainingInfo {
            command: format!(
                "adverse train {}{}",
                a.config.display(),
                a.backend
                    .map_or(String::new(), |c| format!(" --backend {}", backend_name(c)))
            ),
            config: a.config.display().to_string(),
            seed: cfg.seed,
            backend: b.describe(),
            epochs_run: tr.state.next_epoch,
            best_epoch: tr.state.best.as_ref().map(|b| b.0 + 1),
            stopped_early: tr.state.stopped_early,
            seconds: (seconds * 10.0).round() / 10.0,
            train_samples: train.len(),
            adversarial: cfg.adversarial.as_ref().map(|a| {
                format!(
                    "{:?} eps {:.5} ({:.1}/255) steps {} step {:.5} mix {:?} beta {}",
                    a.method,
                    a.eps.0,
                    a.eps.0 * 255.0,
                    a.steps,
                    a.step_size.0,
                    a.mix,
                    a.beta
                )
            }),
        },
        evaluation: eval,
        history: tr.state.history.clone(),
    };
    if let Some(out) = &cfg.output {
        export::save(&model.graph, None, &out.name, &out.onnx)?;
        let cp = card::card_path(&out.onnx);
        let text = card_yaml(&cfg, chw, &summary)?;
        std::fs::write(&cp, text).with_context(|| format!("cannot write {}", cp.display()))?;
        // The card must load back: a card the runtime rejects would ship a broken model.
        card::ModelCard::load(&cp)?;
        println!("wrote {} and {}", out.onnx.display(), cp.display());
    }
    if let Some(p) = &a.summary {
        std::fs::write(p, serde_json::to_string_pretty(&summary)?)
            .with_context(|| format!("cannot write {}", p.display()))?;
    }
    println!("trained in {seconds:.1}s ({} epochs)", tr.state.next_epoch);
    Ok(ExitCode::SUCCESS)
}

fn backend_name(c: BackendChoice) -> &'static str {
    match c {
        BackendChoice::Auto => "auto",
        BackendChoice::Cpu => "cpu",
        BackendChoice::Gpu => "gpu",
        BackendChoice::GpuSoftware => "gpu-software",
    }
}

#[derive(Serialize)]
struct CardOut<'a> {
    name: &'a str,
    input: [usize; 3],
    #[serde(skip_serializing_if = "Option::is_none")]
    preprocessing: Option<&'a serde_yaml::Value>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    classes: &'a [String],
    logits: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    notes: Option<&'a str>,
    training: &'a TrainingInfo,
    #[serde(skip_serializing_if = "Option::is_none")]
    evaluation: Option<&'a Evaluation>,
}

fn card_yaml(cfg: &TrainConfig, chw: [usize; 3], s: &Summary) -> anyhow::Result<String> {
    let Some(out) = &cfg.output else {
        anyhow::bail!("no output section");
    };
    let c = CardOut {
        name: &out.name,
        input: chw,
        preprocessing: out.preprocessing.as_ref(),
        classes: &out.classes,
        logits: 0,
        notes: out.notes.as_deref(),
        training: &s.training,
        evaluation: s.evaluation.as_ref(),
    };
    Ok(format!(
        "# Written by `adverse train`; the numbers below were measured by that run.\n{}",
        serde_yaml::to_string(&c)?
    ))
}
